"""Values the store's limits let through but JSON cannot hold are refused by the SQL adapters.

The event store refuses NUL characters, lone surrogates and non-finite floats for every
adapter. Some values only fail when serialised: bytes that are not UTF-8, in a field whose
model writes bytes as UTF-8 text (Pydantic's default). The SQL adapters store JSON text, so
they refuse such an event as an ``EventLimitExceededError`` before anything is written,
alone or in a group, instead of letting Pydantic's serialisation error through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest

from castore_pydantic import Event, EventStore
from castore_pydantic.errors import EventLimitExceededError
from tests.storage._adapters import BACKENDS, backend_params


class Blob(Event):
    type: Literal["BLOB"] = "BLOB"
    payload: bytes


def blob_store(adapter: Any) -> EventStore[Any, Any]:
    return EventStore(
        event_store_id="BLOBS",
        event_types=[Blob],
        reducer=lambda state, event: event,
        event_storage_adapter=adapter,
    )


@pytest.mark.parametrize("backend", backend_params("sqlite", "postgres"))
async def test_bytes_that_are_not_utf8_are_refused_before_anything_is_written(
    backend: str, tmp_path: Path
) -> None:
    async with BACKENDS[backend](tmp_path) as make:
        store = blob_store(await make())
        with pytest.raises(EventLimitExceededError, match="not serialisable as JSON") as info:
            await store.push_event(Blob(aggregate_id="bad", version=1, payload=b"\xff\xfe"))
        assert info.value.event_store_id == "BLOBS"
        with pytest.raises(EventLimitExceededError):
            await EventStore.push_event_group(
                store.group_event(Blob(aggregate_id="fine", version=1, payload=b"ok")),
                store.group_event(Blob(aggregate_id="bad", version=1, payload=b"\xff")),
            )
        assert (await store.get_events("bad")).events == []
        assert (await store.get_events("fine")).events == []
        await store.push_event(Blob(aggregate_id="fine", version=1, payload=b"ok"))
        assert [e.payload for e in (await store.get_events("fine")).events] == [b"ok"]
