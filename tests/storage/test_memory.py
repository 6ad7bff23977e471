from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from castore_pydantic.testing.contracts import AdapterFactory, EventStorageAdapterContract


class TestInMemoryContract(EventStorageAdapterContract):
    """The in-memory adapter honours the public storage contract."""

    @pytest.fixture
    async def adapter_factory(self) -> AsyncIterator[AdapterFactory]:
        # In-memory adapters cannot share storage, so the factory hands out one instance.
        shared = InMemoryEventStorageAdapter()

        async def make() -> InMemoryEventStorageAdapter:
            return shared

        yield make
        await shared.aclose()
