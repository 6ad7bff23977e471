"""Read options given to the library's adapters directly are checked as the event store checks them.

Through an event store, a negative or non-int bound or limit never reaches an adapter; called
directly, an adapter refuses it the same way, before it reads anything. (SQLite used to take
a negative limit for a long read, which ran without the adapter's lock and then released a
lock it did not hold; a bound below -2**63 raised a raw OverflowError.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from castore_pydantic.testing.contracts._storage import created, incremented
from tests.storage._adapters import BACKENDS, backend_params
from tests.storage.postgres_support import counter_store

BAD_OPTIONS = [
    ({"limit": -1}, ValueError),
    ({"limit": -(2**70)}, ValueError),
    ({"min_version": -1}, ValueError),
    ({"min_version": -(2**70)}, ValueError),
    ({"max_version": -(2**70)}, ValueError),
    ({"limit": 1.5}, TypeError),
    ({"max_version": True}, TypeError),
    ({"min_version": "1"}, TypeError),
]


@pytest.mark.parametrize("backend", backend_params("memory", "sqlite", "postgres"))
@pytest.mark.parametrize(("options", "error"), BAD_OPTIONS)
async def test_bad_read_options_are_refused_and_the_adapter_goes_on(
    backend: str, tmp_path: Path, options: dict[str, Any], error: type[Exception]
) -> None:
    async with BACKENDS[backend](tmp_path) as make:
        adapter = await make()
        store = counter_store(adapter)
        await store.push_event(created("a"))
        await store.push_event(incremented("a", 2))
        with pytest.raises(error):
            await adapter.get_events("a", store.context, **options)
        with pytest.raises(error):
            await store.get_events("a", **options)
        for _ in range(2):  # the adapter is free: nothing waits for a lock left taken
            events = await adapter.get_events("a", store.context, limit=5)
            assert [e.version for e in events] == [1, 2]


@pytest.mark.parametrize("backend", backend_params("memory", "sqlite", "postgres"))
@pytest.mark.parametrize("aggregate_id", [123, None, b"a"])
async def test_an_id_that_is_not_text_is_a_type_error_on_every_adapter(
    backend: str, tmp_path: Path, aggregate_id: Any
) -> None:
    """Memory and SQLite answered an int id as an unknown aggregate (with "123" stored),
    PostgreSQL with a bare TypeError from deep inside; Castore's in-memory adapter would
    have found "123". Every adapter now refuses it the same way, before reading."""
    async with BACKENDS[backend](tmp_path) as make:
        store = counter_store(await make())
        await store.push_event(created("123"))
        await store.push_event(created("a"))
        for read in (store.get_events, store.get_aggregate, store.get_existing_aggregate):
            with pytest.raises(TypeError, match="aggregate_id must be a str"):
                await read(aggregate_id)
        assert (await store.get_aggregate("123")).aggregate is not None
