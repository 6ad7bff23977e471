"""Adapter factories shared by the cross-adapter tests (differential, random groups).

Each backend is an async context manager yielding an async factory of adapters that all share
one backing storage; leaving the context closes them and removes the storage.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from castore_pydantic.storage import EventStorageAdapter
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
from tests.services import POSTGRES_HOST, POSTGRES_PORT, require_postgres

AdapterMaker = Callable[[], Awaitable[EventStorageAdapter]]
Backend = Callable[[Path], AbstractAsyncContextManager[AdapterMaker]]

POSTGRES_DSN = f"host={POSTGRES_HOST} port={POSTGRES_PORT} user=postgres dbname=test"


@asynccontextmanager
async def memory_backend(tmp_path: Path) -> AsyncIterator[AdapterMaker]:
    """One in-memory adapter (in-memory adapters cannot share storage)."""
    shared = InMemoryEventStorageAdapter()

    async def make() -> EventStorageAdapter:
        return shared

    yield make
    await shared.aclose()


@asynccontextmanager
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[AdapterMaker]:
    """SQLite adapters on one WAL file."""
    adapters: list[SQLiteEventStorageAdapter] = []

    async def make() -> EventStorageAdapter:
        adapter = SQLiteEventStorageAdapter(tmp_path / "events.db")
        adapters.append(adapter)
        return adapter

    try:
        yield make
    finally:
        for adapter in adapters:
            await adapter.aclose()


@asynccontextmanager
async def postgres_backend(tmp_path: Path) -> AsyncIterator[AdapterMaker]:
    """PostgreSQL adapters on a table of their own, dropped afterwards."""
    require_postgres()
    from castore_pydantic.storage.postgres import PostgresEventStorageAdapter

    table = f"cross_{uuid.uuid4().hex[:12]}"
    owner = PostgresEventStorageAdapter(POSTGRES_DSN, table_name=table, max_size=2)
    adapters = [owner]
    await owner.create_event_table()

    async def make() -> EventStorageAdapter:
        adapter = PostgresEventStorageAdapter(POSTGRES_DSN, table_name=table, max_size=2)
        adapters.append(adapter)
        return adapter

    try:
        yield make
    finally:
        try:
            await owner.drop_event_table()
        finally:
            for adapter in adapters:
                await adapter.aclose()


BACKENDS: dict[str, Backend] = {
    "memory": memory_backend,
    "sqlite": sqlite_backend,
    "postgres": postgres_backend,
}


def backend_params(*names: str) -> list[object]:
    """pytest parameters for the named backends, with the postgres marker where it applies."""
    return [
        pytest.param(name, marks=pytest.mark.postgres) if name == "postgres" else name
        for name in names
    ]
