"""1,000 random event groups with one conflicting member each: no adapter stores part of one."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from castore_pydantic import Aggregate, Event, EventAlreadyExistsError, EventStore
from castore_pydantic.storage import EventStorageAdapter, GroupedEvent
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from tests.storage._adapters import BACKENDS, AdapterMaker, backend_params

GROUPS = 1000


class Step(BaseModel):
    group: int
    position: int


class Stepped(Event):
    type: Literal["STEPPED"] = "STEPPED"
    payload: Step


class Walk(Aggregate):
    steps: int


def reduce_walk(walk: Walk | None, event: Stepped) -> Walk:
    steps = 0 if walk is None else walk.steps
    return Walk(aggregate_id=event.aggregate_id, version=event.version, steps=steps + 1)


def walk_store(adapter: EventStorageAdapter, event_store_id: str) -> EventStore[Walk, Stepped]:
    return EventStore(
        event_store_id=event_store_id,
        event_types=[Stepped],
        reducer=reduce_walk,
        event_storage_adapter=adapter,
    )


def stepped(aggregate_id: str, version: int, group: int, position: int) -> Stepped:
    return Stepped(
        aggregate_id=aggregate_id, version=version, payload=Step(group=group, position=position)
    )


class _OneByOneAdapter(InMemoryEventStorageAdapter):
    """A broken adapter for the negative control: it writes a group's events one by one."""

    async def push_event_group(
        self, grouped_events: Sequence[GroupedEvent], *, force: bool = False
    ) -> list[Event]:
        return [
            await self.push_event(g.event, g.context, force=force)  # type: ignore[arg-type]
            for g in grouped_events
        ]


async def run_groups(make: AdapterMaker) -> None:
    """Push the seeded groups, check each conflict's culprit, then every stored aggregate."""
    rng = random.Random(20240101)
    # Two stores, on two adapter instances sharing one storage where the backend can.
    stores = [walk_store(await make(), "WALK_A"), walk_store(await make(), "WALK_B")]
    keys = [(s, f"w{i}") for s in range(2) for i in range(40)]
    versions = dict.fromkeys(keys, 0)
    for store_index, aggregate_id in keys[::2]:
        await stores[store_index].push_event(stepped(aggregate_id, 1, -1, 0))
        versions[store_index, aggregate_id] = 1
    conflicts = 0
    for group in range(GROUPS):
        size = rng.randint(2, 10)
        members = rng.sample(keys, size)
        conflict_at = rng.choice(
            [i for i, key in enumerate(members) if versions[key] > 0] or [None]
        )
        if conflict_at is None:
            # No member has a version to collide with: make one repeat an earlier member.
            conflict_at = rng.randrange(1, size)
            members[conflict_at] = members[rng.randrange(conflict_at)]
            planned = [versions[key] + 1 for key in members]
        else:
            planned = [versions[key] + 1 for key in members]
            planned[conflict_at] = rng.randint(1, versions[members[conflict_at]])
        grouped = [
            stores[s].group_event(stepped(a, v, group, i))
            for i, ((s, a), v) in enumerate(zip(members, planned, strict=True))
        ]
        with pytest.raises(EventAlreadyExistsError) as info:
            await EventStore.push_event_group(*grouped)
        conflicts += 1
        culprit_store, culprit_id = members[conflict_at]
        assert (info.value.aggregate_id, info.value.version) == (
            culprit_id,
            planned[conflict_at],
        ), group
        assert info.value.event_store_id == stores[culprit_store].event_store_id
        if rng.random() < 0.3:
            # The same members without the conflict go through whole.
            valid = list(dict.fromkeys(members))
            await EventStore.push_event_group(
                *(
                    stores[s].group_event(stepped(a, versions[s, a] + 1, group, i))
                    for i, (s, a) in enumerate(valid)
                )
            )
            for key in valid:
                versions[key] += 1
    assert conflicts == GROUPS
    for (store_index, aggregate_id), version in versions.items():
        stored: list[Any] = (await stores[store_index].get_events(aggregate_id)).events
        assert [e.version for e in stored] == list(range(1, version + 1)), aggregate_id


@pytest.mark.parametrize("backend", backend_params("memory", "sqlite", "postgres"))
async def test_groups_with_a_conflict_never_store_part_of_themselves(
    backend: str, tmp_path: Path
) -> None:
    """Groups of 2-10 events with one taken version at a random position store nothing."""
    async with BACKENDS[backend](tmp_path) as make:
        await run_groups(make)


async def test_the_check_catches_an_adapter_that_writes_groups_piecemeal() -> None:
    """Negative control: an adapter writing group members one by one fails the same run."""
    broken = _OneByOneAdapter()

    async def make() -> EventStorageAdapter:
        return broken

    with pytest.raises((AssertionError, EventAlreadyExistsError)):
        await run_groups(make)
