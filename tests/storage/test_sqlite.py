"""The SQLite adapter: the public contract, then what is specific to SQLite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
from castore_pydantic.testing.contracts import AdapterFactory, EventStorageAdapterContract


class TestSQLiteContract(EventStorageAdapterContract):
    """The SQLite adapter honours the public storage contract (file database, WAL)."""

    @pytest.fixture
    async def adapter_factory(self, tmp_path: Path) -> AsyncIterator[AdapterFactory]:
        adapters: list[SQLiteEventStorageAdapter] = []
        path = tmp_path / "events.db"

        async def make() -> SQLiteEventStorageAdapter:
            adapter = SQLiteEventStorageAdapter(path)
            adapters.append(adapter)
            return adapter

        yield make
        for adapter in adapters:
            await adapter.aclose()


class TestSQLiteInMemoryContract(EventStorageAdapterContract):
    """A ":memory:" database honours the contract too (one adapter: memory is private)."""

    @pytest.fixture
    async def adapter_factory(self) -> AsyncIterator[AdapterFactory]:
        shared = SQLiteEventStorageAdapter(":memory:")

        async def make() -> SQLiteEventStorageAdapter:
            return shared

        yield make
        await shared.aclose()
