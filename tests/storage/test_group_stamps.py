"""The events of a group that have no timestamp share one, whoever stamps them.

The event store hands groups to the library's own adapters unstamped (each stamps a group
with one reading of the clock) and stamps them itself for any other adapter. A clock that
moves on every reading makes a second reading within one group visible.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import castore_pydantic._event as event_module
import castore_pydantic._event_store as event_store_module
from castore_pydantic import Event, EventStore
from castore_pydantic.storage import GroupedEvent
from castore_pydantic.storage import _postgres_writes as postgres_writes
from castore_pydantic.storage import memory as memory_module
from castore_pydantic.storage import sqlite as sqlite_module
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from castore_pydantic.testing.contracts._storage import created
from tests.storage._adapters import BACKENDS, backend_params
from tests.storage.postgres_support import counter_store

START = datetime.fromisoformat("2030-01-01T00:00:00.000+00:00")


class TickingClock:
    """``utc_now`` one millisecond later on every call."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> datetime:
        self.calls += 1
        return START + timedelta(milliseconds=self.calls)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> TickingClock:
    ticking = TickingClock()
    modules: list[Any] = [
        event_module,
        event_store_module,
        memory_module,
        sqlite_module,
        postgres_writes,
    ]
    for module in modules:
        monkeypatch.setattr(module, "utc_now", ticking)
    return ticking


BOTH = backend_params("memory", "sqlite", "postgres")


@pytest.mark.parametrize("backend", BOTH)
async def test_through_the_event_store(backend: str, tmp_path: Path, clock: TickingClock) -> None:
    async with BACKENDS[backend](tmp_path) as make:
        adapter = await make()
        first, second = counter_store(adapter), counter_store(adapter)
        result = await EventStore.push_event_group(
            first.group_event(created("a")),
            second.group_event(created("b")),
            first.group_event(created("c")),
        )
        stamps = {pushed.event.timestamp for pushed in result.event_group}
        assert len(stamps) == 1
        assert None not in stamps
        assert (await second.get_events("b")).events == [result.event_group[1].event]


@pytest.mark.parametrize("backend", BOTH)
async def test_an_adapter_called_directly(
    backend: str, tmp_path: Path, clock: TickingClock
) -> None:
    async with BACKENDS[backend](tmp_path) as make:
        adapter = await make()
        store = counter_store(adapter)
        grouped = [store.group_event(created(name)) for name in ("a", "b", "c")]
        assert all(g.event.timestamp is None for g in grouped)
        stored = await adapter.push_event_group(grouped)
        assert len({event.timestamp for event in stored}) == 1
        assert stored[0].timestamp is not None
        assert (await store.get_events("c")).events == [stored[2]]


class OtherAdapter(InMemoryEventStorageAdapter):
    """A subclass that overrides both group methods, as an adapter from elsewhere might.

    It gets what any adapter gets: its own ``group_event`` is called, and its
    ``push_event_group`` receives stamped events.
    """

    def __init__(self) -> None:
        super().__init__()
        self.wrapped = 0
        self.received: list[Event] = []

    def group_event(self, event: Event, context: Any) -> GroupedEvent:
        self.wrapped += 1
        return super().group_event(event, context)

    async def push_event_group(
        self, grouped_events: Sequence[GroupedEvent], *, force: bool = False
    ) -> list[Event]:
        self.received += [grouped.event for grouped in grouped_events]
        return await super().push_event_group(grouped_events, force=force)


async def test_another_adapter_receives_stamped_events(clock: TickingClock) -> None:
    adapter = OtherAdapter()
    store = counter_store(adapter)
    result = await EventStore.push_event_group(
        store.group_event(created("a")), store.group_event(created("b"))
    )
    assert adapter.wrapped == 2
    assert len({event.timestamp for event in adapter.received}) == 1
    assert adapter.received[0].timestamp is not None
    assert [pushed.event for pushed in result.event_group] == adapter.received
