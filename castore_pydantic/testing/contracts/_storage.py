"""The public contract suite for event storage adapters.

Subclass :class:`EventStorageAdapterContract` in a test module and override the
``adapter_factory`` fixture; every test of the contract then runs against your adapter::

    class TestMyAdapter(EventStorageAdapterContract):
        @pytest_asyncio.fixture
        async def adapter_factory(self):
            adapters = []

            async def make():
                adapter = MyAdapter(...)   # every adapter shares ONE backing storage
                adapters.append(adapter)
                return adapter

            yield make
            for adapter in adapters:
                await adapter.aclose()

Tests use fresh, short event store ids, so one backing storage may be reused across tests.
The suite needs pytest-asyncio, in its strict mode (the default) or its auto mode; declare the
factory with ``pytest_asyncio.fixture``, which both modes accept.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import pytest
import pytest_asyncio
from pydantic import BaseModel, ConfigDict, Field

from castore_pydantic._aggregate import Aggregate
from castore_pydantic._event import Event
from castore_pydantic._event_store import EventStore
from castore_pydantic._types import EventStorageAdapter, GroupedEvent, ListAggregateIdsResult
from castore_pydantic.errors import (
    EventAlreadyExistsError,
    EventGroupError,
    InvalidPageTokenError,
    StoredEventValidationError,
)
from castore_pydantic.testing.contracts._marks import async_tests

__all__ = ["AdapterFactory", "EventStorageAdapterContract"]

AdapterFactory = Callable[[], Awaitable[EventStorageAdapter]]
"""Makes a new adapter instance; all instances of one factory share one backing storage."""


class CounterCreatedPayload(BaseModel):
    """Payload of ``COUNTER_CREATED``."""

    model_config = ConfigDict(extra="forbid")
    name: str


class CounterCreated(Event):
    """A counter was created."""

    type: Literal["COUNTER_CREATED"] = "COUNTER_CREATED"
    payload: CounterCreatedPayload


class IncrementedPayload(BaseModel):
    """Payload of ``COUNTER_INCREMENTED``."""

    by: int


class CounterIncremented(Event):
    """A counter went up."""

    type: Literal["COUNTER_INCREMENTED"] = "COUNTER_INCREMENTED"
    payload: IncrementedPayload


class NoteAdded(Event):
    """Free-form data, to check that arbitrary JSON round-trips exactly."""

    type: Literal["NOTE_ADDED"] = "NOTE_ADDED"
    payload: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class RenamedPayload(BaseModel):
    """Payload of ``COUNTER_RENAMED``: an aliased field, as JSON APIs often have."""

    new_name: str = Field(alias="newName")


class CounterRenamed(Event):
    """A counter got a new name."""

    type: Literal["COUNTER_RENAMED"] = "COUNTER_RENAMED"
    payload: RenamedPayload


class Counter(Aggregate):
    """A counter folded from its events."""

    name: str
    value: int = 0
    notes: int = 0


CounterEvent = CounterCreated | CounterIncremented | NoteAdded | CounterRenamed


def reduce_counter(counter: Counter | None, event: CounterEvent) -> Counter:
    """Fold one event into a counter."""
    if isinstance(event, CounterCreated):
        return Counter(
            aggregate_id=event.aggregate_id, version=event.version, name=event.payload.name
        )
    if counter is None:
        counter = Counter(aggregate_id=event.aggregate_id, version=0, name="?")
    if isinstance(event, CounterIncremented):
        return counter.model_copy(
            update={"version": event.version, "value": counter.value + event.payload.by}
        )
    if isinstance(event, CounterRenamed):
        return counter.model_copy(update={"version": event.version, "name": event.payload.new_name})
    return counter.model_copy(update={"version": event.version, "notes": counter.notes + 1})


def _ts(seconds: int) -> datetime:
    return datetime(2024, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds)


def created(aggregate_id: str, version: int = 1, ts: datetime | None = None) -> CounterCreated:
    """A ``COUNTER_CREATED`` event."""
    return CounterCreated(
        aggregate_id=aggregate_id,
        version=version,
        timestamp=ts,
        payload=CounterCreatedPayload(name=f"counter {aggregate_id}"),
    )


def incremented(aggregate_id: str, version: int, by: int = 1) -> CounterIncremented:
    """A ``COUNTER_INCREMENTED`` event."""
    return CounterIncremented(
        aggregate_id=aggregate_id, version=version, payload=IncrementedPayload(by=by)
    )


class _ForeignAdapter:
    """An adapter of another kind, to check that groups refuse mixing kinds."""

    async def push_event_group(
        self, grouped_events: Sequence[GroupedEvent], *, force: bool = False
    ) -> list[Event]:
        raise AssertionError("a foreign adapter must never be asked to write a group")


@async_tests
class EventStorageAdapterContract:
    """Behaviour every ``EventStorageAdapter`` must show; subclass and override the fixture."""

    @pytest_asyncio.fixture
    async def adapter_factory(self) -> AdapterFactory:
        """Yield an async factory of adapters sharing one backing storage (override me)."""
        raise NotImplementedError("override the adapter_factory fixture")

    @pytest_asyncio.fixture
    async def adapter(self, adapter_factory: AdapterFactory) -> EventStorageAdapter:
        """One adapter from the factory."""
        return await adapter_factory()

    @staticmethod
    def store(
        adapter: EventStorageAdapter, event_store_id: str | None = None
    ) -> EventStore[Counter, CounterEvent]:
        """A counter event store on ``adapter`` with a fresh id unless one is given."""
        return EventStore(
            event_store_id=event_store_id or f"C{uuid.uuid4().hex[:12].upper()}",
            event_types=[CounterCreated, CounterIncremented, NoteAdded, CounterRenamed],
            reducer=reduce_counter,
            event_storage_adapter=adapter,
        )

    # -- push and read ---------------------------------------------------------------------

    async def test_push_then_read_returns_the_stored_event(
        self, adapter: EventStorageAdapter
    ) -> None:
        """A pushed event reads back equal, typed, with the timestamp the push returned."""
        store = self.store(adapter)
        pushed = await store.push_event(created("a1"))
        assert pushed.event.timestamp is not None
        events = (await store.get_events("a1")).events
        assert events == [pushed.event]
        assert type(events[0]) is CounterCreated

    async def test_mapping_input_is_validated_and_stored(
        self, adapter: EventStorageAdapter
    ) -> None:
        """A camelCase mapping is validated into the store's event type and stored."""
        store = self.store(adapter)
        pushed = await store.push_event(
            {"aggregateId": "a1", "version": 1, "type": "COUNTER_CREATED", "payload": {"name": "x"}}
        )
        assert isinstance(pushed.event, CounterCreated)
        assert (await store.get_events("a1")).events == [pushed.event]

    async def test_explicit_timestamp_round_trips_to_the_millisecond(
        self, adapter: EventStorageAdapter
    ) -> None:
        """An explicit timestamp is stored and read back exactly (ms precision, UTC)."""
        store = self.store(adapter)
        ts = datetime(2023, 5, 17, 10, 20, 30, 123000, tzinfo=UTC)
        await store.push_event(created("a1", ts=ts))
        (event,) = (await store.get_events("a1")).events
        assert event.timestamp == ts
        assert event.model_dump(mode="json")["timestamp"] == "2023-05-17T10:20:30.123Z"

    async def test_arbitrary_json_payload_and_metadata_round_trip(
        self, adapter: EventStorageAdapter
    ) -> None:
        """Nested JSON, unicode, None inside payloads, {} and metadata survive unchanged."""
        store = self.store(adapter)
        payload = {
            "text": "Pikachu ⚡ «ça» 😀",
            "nested": {"list": [1, 2.5, True, None, {"deep": ["x"]}], "empty": {}},
            "big": 2**53 - 1,
            "negative": -7,
            "quote": 'he said "hi"\n\\',
        }
        await store.push_event(
            NoteAdded(aggregate_id="n1", version=1, payload=payload, metadata={})
        )
        await store.push_event(NoteAdded(aggregate_id="n1", version=2, metadata={"by": "ash"}))
        first, second = (await store.get_events("n1")).events
        assert first.payload == payload
        assert first.metadata == {}
        assert second.payload is None
        assert second.metadata == {"by": "ash"}
        assert "payload" not in second.model_dump(mode="json")

    async def test_aliased_payload_fields_round_trip(self, adapter: EventStorageAdapter) -> None:
        """A payload field with an alias is stored under its alias and reads back."""
        store = self.store(adapter)
        await store.push_event(created("a1"))
        pushed = await store.push_event(
            {"aggregateId": "a1", "version": 2, "type": "COUNTER_RENAMED",
             "payload": {"newName": "renamed"}}
        )  # fmt: skip
        assert (await store.get_events("a1")).events[-1] == pushed.event
        aggregate = (await store.get_aggregate("a1")).aggregate
        assert aggregate is not None
        assert aggregate.name == "renamed"

    async def test_history_is_stored_by_value(self, adapter: EventStorageAdapter) -> None:
        """Changing a pushed event's payload, or an event read back, changes no stored event.

        Events are stored as a database stores them: by value, not by reference.
        """
        store = self.store(adapter)
        event = NoteAdded(
            aggregate_id="n1", version=1, payload={"tags": ["a"], "n": {"x": 1}}, metadata={}
        )
        pushed = (await store.push_event(event)).event
        grouped = store.group_event(NoteAdded(aggregate_id="n1", version=2, payload={"tags": []}))
        (result,) = (await EventStore.push_event_group(grouped)).event_group
        for changed in (event, pushed, grouped.event, result.event):
            assert changed.payload is not None
            changed.payload["tags"].append("changed")
            changed.payload["extra"] = True
        assert event.metadata is not None
        event.metadata["by"] = "changed"
        for read in (await store.get_events("n1")).events:
            assert isinstance(read, NoteAdded)
            assert read.payload is not None
            read.payload["tags"].append("read")
        first, second = (await store.get_events("n1")).events
        assert first.payload == {"tags": ["a"], "n": {"x": 1}}
        assert first.metadata == {}
        assert second.payload == {"tags": []}

    async def test_values_read_back_in_their_json_form(self, adapter: EventStorageAdapter) -> None:
        """A value JSON holds in another form (a tuple) reads back in that form (a list)."""
        store = self.store(adapter)
        await store.push_event(
            NoteAdded(aggregate_id="n1", version=1, payload={"pair": (1, "b"), "nested": [(2,)]})
        )
        (event,) = (await store.get_events("n1")).events
        assert event.payload == {"pair": [1, "b"], "nested": [[2]]}

    async def test_unknown_aggregate_has_no_events(self, adapter: EventStorageAdapter) -> None:
        """An aggregate never written reads as an empty list and no aggregate."""
        store = self.store(adapter)
        assert (await store.get_events("nope")).events == []
        result = await store.get_aggregate("nope")
        assert result.aggregate is None
        assert result.last_event is None

    async def test_events_are_read_in_version_order(self, adapter: EventStorageAdapter) -> None:
        """Events pushed out of order read back ordered by version."""
        store = self.store(adapter)
        for version in (3, 1, 5, 2):
            await store.push_event(created("a1") if version == 1 else incremented("a1", version))
        assert [e.version for e in (await store.get_events("a1")).events] == [1, 2, 3, 5]

    async def test_read_options_are_inclusive_and_combine(
        self, adapter: EventStorageAdapter
    ) -> None:
        """min/max versions are inclusive; limit and reverse combine; limit=0 reads nothing."""
        store = self.store(adapter)
        await store.push_event(created("a1"))
        for version in range(2, 6):
            await store.push_event(incremented("a1", version))

        async def versions(**options: Any) -> list[int]:
            return [e.version for e in (await store.get_events("a1", **options)).events]

        assert await versions(min_version=2, max_version=4) == [2, 3, 4]
        assert await versions(max_version=1) == [1]
        assert await versions(min_version=5) == [5]
        assert await versions(limit=2) == [1, 2]
        assert await versions(reverse=True) == [5, 4, 3, 2, 1]
        assert await versions(limit=2, reverse=True) == [5, 4]
        assert await versions(min_version=2, max_version=4, reverse=True, limit=2) == [4, 3]
        assert await versions(limit=0) == []
        assert await versions(min_version=4, max_version=2) == []

    async def test_get_aggregate_folds_up_to_max_version(
        self, adapter: EventStorageAdapter
    ) -> None:
        """get_aggregate folds all events, or only those up to max_version."""
        store = self.store(adapter)
        await store.push_event(created("a1"))
        await store.push_event(incremented("a1", 2, by=5))
        await store.push_event(incremented("a1", 3, by=7))
        full = await store.get_aggregate("a1")
        assert full.aggregate is not None
        assert (full.aggregate.value, full.aggregate.version) == (12, 3)
        partial = await store.get_aggregate("a1", max_version=2)
        assert partial.aggregate is not None
        assert (partial.aggregate.value, partial.aggregate.version) == (5, 2)
        assert partial.last_event is not None
        assert partial.last_event.version == 2

    # -- conflicts and force ----------------------------------------------------------------

    async def test_duplicate_version_raises_and_writes_nothing(
        self, adapter: EventStorageAdapter
    ) -> None:
        """Pushing a taken version raises EventAlreadyExistsError and keeps the stored event."""
        store = self.store(adapter)
        original = (await store.push_event(created("a1"))).event
        with pytest.raises(EventAlreadyExistsError) as info:
            await store.push_event(
                CounterCreated(
                    aggregate_id="a1", version=1, payload=CounterCreatedPayload(name="other")
                )
            )
        assert (info.value.event_store_id, info.value.aggregate_id, info.value.version) == (
            store.event_store_id,
            "a1",
            1,
        )
        assert (await store.get_events("a1")).events == [original]

    async def test_force_overwrites_an_existing_version(self, adapter: EventStorageAdapter) -> None:
        """force=True replaces the event with that version; other versions are untouched."""
        store = self.store(adapter)
        await store.push_event(created("a1"))
        await store.push_event(incremented("a1", 2, by=1))
        replacement = (await store.push_event(incremented("a1", 2, by=40), force=True)).event
        events = (await store.get_events("a1")).events
        assert [e.version for e in events] == [1, 2]
        assert events[1] == replacement
        assert isinstance(events[1], CounterIncremented)
        assert events[1].payload.by == 40

    async def test_concurrent_pushes_of_one_version_let_exactly_one_win(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Of many concurrent pushes of the same version, one succeeds, the rest conflict."""
        adapters = [await adapter_factory() for _ in range(4)]
        store_id = self.store(adapters[0]).event_store_id
        stores = [self.store(a, store_id) for a in adapters]
        await stores[0].push_event(created("race"))
        attempts = [
            stores[i % len(stores)].push_event(incremented("race", 2, by=i)) for i in range(12)
        ]
        outcomes = await asyncio.gather(*attempts, return_exceptions=True)
        winners = [o for o in outcomes if not isinstance(o, BaseException)]
        losers = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(winners) == 1
        assert all(isinstance(o, EventAlreadyExistsError) for o in losers), losers
        stored = (await stores[1].get_events("race")).events
        assert stored[-1] == winners[0].event

    # -- isolation ---------------------------------------------------------------------------

    async def test_stores_sharing_an_adapter_are_isolated(
        self, adapter: EventStorageAdapter
    ) -> None:
        """Two stores on one adapter never see each other's aggregates, even with equal ids."""
        first, second = self.store(adapter), self.store(adapter)
        await first.push_event(created("same", ts=_ts(1)))
        assert (await second.get_events("same")).events == []
        await second.push_event(created("same", ts=_ts(2)))
        assert [e.timestamp for e in (await first.get_events("same")).events] == [_ts(1)]
        listed = (await second.list_aggregate_ids()).aggregate_ids
        assert [(e.aggregate_id, e.initial_event_timestamp) for e in listed] == [("same", _ts(2))]

    async def test_adapters_of_one_factory_share_storage(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """What one adapter instance writes, another on the same storage reads."""
        writer, reader = await adapter_factory(), await adapter_factory()
        store_id = self.store(writer).event_store_id
        pushed = await self.store(writer, store_id).push_event(created("a1"))
        assert (await self.store(reader, store_id).get_events("a1")).events == [pushed.event]

    # -- validation on read ------------------------------------------------------------------

    async def test_stored_event_that_no_longer_validates_names_store_aggregate_version(
        self, adapter: EventStorageAdapter
    ) -> None:
        """Reading an event that fails the reader's types raises StoredEventValidationError."""
        writer = self.store(adapter)
        await writer.push_event(created("a1"))
        await writer.push_event(
            NoteAdded(aggregate_id="a1", version=2, payload={"unexpected": "shape"})
        )

        class StrictNote(Event):
            type: Literal["NOTE_ADDED"] = "NOTE_ADDED"
            payload: IncrementedPayload

        reader: EventStore[Counter, Any] = EventStore(
            event_store_id=writer.event_store_id,
            event_types=[CounterCreated, StrictNote],
            reducer=reduce_counter,
            event_storage_adapter=adapter,
        )
        with pytest.raises(StoredEventValidationError) as info:
            await reader.get_events("a1")
        assert info.value.event_store_id == writer.event_store_id
        assert info.value.aggregate_id == "a1"
        assert info.value.version == 2
        assert info.value.__cause__ is not None

    # -- groups ------------------------------------------------------------------------------

    async def test_group_writes_events_of_several_stores(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """A group across two stores (and two adapter instances) stores every event."""
        first = self.store(await adapter_factory())
        second = self.store(await adapter_factory())
        await first.push_event(created("a1"))
        result = await EventStore.push_event_group(
            first.group_event(incremented("a1", 2, by=3)),
            second.group_event(created("b1")),
        )
        first_event, second_event = (r.event for r in result.event_group)
        assert first_event.version == 2
        assert second_event.aggregate_id == "b1"
        assert first_event.timestamp == second_event.timestamp
        assert result.event_group[0].next_aggregate is None
        assert result.event_group[1].next_aggregate is not None
        assert (await first.get_events("a1")).events[-1] == first_event
        assert (await second.get_events("b1")).events == [second_event]

    async def test_group_keeps_explicit_timestamps(self, adapter: EventStorageAdapter) -> None:
        """Grouped events with their own timestamp keep it; the others share one."""
        store = self.store(adapter)
        result = await EventStore.push_event_group(
            store.group_event(created("a1", ts=_ts(10))),
            store.group_event(created("a2")),
            store.group_event(created("a3")),
        )
        stamps = [r.event.timestamp for r in result.event_group]
        assert stamps[0] == _ts(10)
        assert stamps[1] == stamps[2] != _ts(10)

    @pytest.mark.parametrize("conflict_at", [0, 1, 2])
    async def test_group_with_a_conflict_writes_nothing(
        self, adapter: EventStorageAdapter, conflict_at: int
    ) -> None:
        """A conflict at any position fails the group and none of its events is stored."""
        store = self.store(adapter)
        await store.push_event(created("taken"))
        grouped = [store.group_event(created(f"g{i}")) for i in range(3)]
        grouped[conflict_at] = store.group_event(created("taken"))
        with pytest.raises(EventAlreadyExistsError) as info:
            await EventStore.push_event_group(*grouped)
        assert info.value.aggregate_id == "taken"
        for i in range(3):
            assert (await store.get_events(f"g{i}")).events == []
        listed = [e.aggregate_id for e in (await store.list_aggregate_ids()).aggregate_ids]
        assert listed == ["taken"]

    @pytest.mark.parametrize("conflict_at", [0, 1, 2])
    async def test_group_across_adapter_instances_with_a_conflict_writes_nothing(
        self, adapter_factory: AdapterFactory, conflict_at: int
    ) -> None:
        """A group whose events use two adapter instances is one transaction too.

        The members alternate between two instances (first, second, first); a conflict in
        either instance's part leaves nothing of the other's stored.
        """
        first = self.store(await adapter_factory())
        second = self.store(await adapter_factory())
        owners = [first, second, first]
        taken = owners[conflict_at]
        await taken.push_event(created("taken"))
        grouped = [
            owner.group_event(created("taken" if i == conflict_at else f"g{i}"))
            for i, owner in enumerate(owners)
        ]
        with pytest.raises(EventAlreadyExistsError) as info:
            await EventStore.push_event_group(*grouped)
        assert (info.value.event_store_id, info.value.aggregate_id, info.value.version) == (
            taken.event_store_id,
            "taken",
            1,
        )
        for i, owner in enumerate(owners):
            if i != conflict_at:
                assert (await owner.get_events(f"g{i}")).events == [], f"g{i} was written"
        for owner in (first, second):
            listed = [e.aggregate_id for e in (await owner.list_aggregate_ids()).aggregate_ids]
            assert listed == (["taken"] if owner is taken else [])

    async def test_group_repeating_one_version_writes_nothing(
        self, adapter: EventStorageAdapter
    ) -> None:
        """The same aggregate and version twice in one group is a conflict."""
        store = self.store(adapter)
        with pytest.raises(EventAlreadyExistsError):
            await EventStore.push_event_group(
                store.group_event(created("dup")), store.group_event(created("dup"))
            )
        assert (await store.get_events("dup")).events == []

    async def test_group_with_force_overwrites(self, adapter: EventStorageAdapter) -> None:
        """force=True applies to every event of the group."""
        store = self.store(adapter)
        await store.push_event(created("a1"))
        await store.push_event(incremented("a1", 2, by=1))
        await EventStore.push_event_group(
            store.group_event(incremented("a1", 2, by=9)),
            store.group_event(incremented("a1", 3, by=1)),
            force=True,
        )
        aggregate = (await store.get_aggregate("a1")).aggregate
        assert aggregate is not None
        assert (aggregate.value, aggregate.version) == (10, 3)

    async def test_empty_group_is_refused(self) -> None:
        """An empty group is a clear EventGroupError."""
        with pytest.raises(EventGroupError):
            await EventStore.push_event_group()

    async def test_group_mixing_adapter_kinds_writes_nothing(
        self, adapter: EventStorageAdapter
    ) -> None:
        """A group whose events use another kind of adapter is refused before any write."""
        store = self.store(adapter)
        foreign = self.store(_ForeignAdapter())  # type: ignore[arg-type]
        foreign_grouped = GroupedEvent(
            event=created("f1"),
            event_storage_adapter=_ForeignAdapter(),  # type: ignore[arg-type]
            context=foreign.context,
            event_store=foreign,
        )
        with pytest.raises(EventGroupError):
            await EventStore.push_event_group(store.group_event(created("a1")), foreign_grouped)
        assert (await store.get_events("a1")).events == []

    # -- listing -----------------------------------------------------------------------------

    async def _seed(self, store: EventStore[Counter, CounterEvent], stamps: Sequence[int]) -> None:
        for i, seconds in enumerate(stamps):
            await store.push_event(created(f"agg-{i:02d}", ts=_ts(seconds)))
            await store.push_event(incremented(f"agg-{i:02d}", 2))

    async def test_listing_orders_by_initial_timestamp(self, adapter: EventStorageAdapter) -> None:
        """Aggregates are listed once each, by their version-1 timestamp, then id."""
        store = self.store(adapter)
        await self._seed(store, [30, 10, 20, 10])
        result = await store.list_aggregate_ids()
        assert [(e.aggregate_id, e.initial_event_timestamp) for e in result.aggregate_ids] == [
            ("agg-01", _ts(10)),
            ("agg-03", _ts(10)),
            ("agg-02", _ts(20)),
            ("agg-00", _ts(30)),
        ]
        assert result.next_page_token is None
        reverse = await store.list_aggregate_ids(reverse=True)
        assert [e.aggregate_id for e in reverse.aggregate_ids] == [
            "agg-00",
            "agg-02",
            "agg-03",
            "agg-01",
        ]

    async def test_aggregate_without_version_one_is_not_listed(
        self, adapter: EventStorageAdapter
    ) -> None:
        """Only aggregates with a version-1 event are listed."""
        store = self.store(adapter)
        await store.push_event(incremented("orphan", 2))
        await store.push_event(created("real"))
        assert [e.aggregate_id for e in (await store.list_aggregate_ids()).aggregate_ids] == [
            "real"
        ]

    async def test_version_one_pushed_after_a_later_one_lists_the_aggregate(
        self, adapter: EventStorageAdapter
    ) -> None:
        """Version 1 may come after a later version (an import may meet version 2 first).

        Once it is stored, the aggregate is listed, at version 1's timestamp.
        """
        store = self.store(adapter)
        await store.push_event(incremented("late", 2).model_copy(update={"timestamp": _ts(50)}))
        await store.push_event(created("early", ts=_ts(20)))
        await store.push_event(created("late", ts=_ts(10)))
        listed = (await store.list_aggregate_ids()).aggregate_ids
        assert [(e.aggregate_id, e.initial_event_timestamp) for e in listed] == [
            ("late", _ts(10)),
            ("early", _ts(20)),
        ]

    @pytest.mark.parametrize("reverse", [False, True])
    async def test_paging_visits_every_aggregate_once_over_many_pages(
        self, adapter: EventStorageAdapter, reverse: bool
    ) -> None:
        """Following tokens over 4+ pages, with equal timestamps, lists each aggregate once."""
        store = self.store(adapter)
        stamps = [5, 5, 5, 1, 9, 5, 5, 3, 9, 5]
        await self._seed(store, stamps)
        expected = (await store.list_aggregate_ids(reverse=reverse)).aggregate_ids
        pages: list[list[str]] = []
        token = None
        first = True
        while first or token is not None:
            page = (
                await store.list_aggregate_ids(limit=3, reverse=reverse)
                if first
                else await store.list_aggregate_ids(page_token=token)
            )
            first = False
            pages.append([e.aggregate_id for e in page.aggregate_ids])
            token = page.next_page_token
        assert [len(p) for p in pages] == [3, 3, 3, 1]
        assert list(itertools.chain(*pages)) == [e.aggregate_id for e in expected]
        assert len(set(itertools.chain(*pages))) == len(stamps)

    async def test_bounds_are_inclusive_and_carried_by_tokens(
        self, adapter: EventStorageAdapter
    ) -> None:
        """Bounds equal to an initial timestamp include it; tokens keep bounds and reverse."""
        store = self.store(adapter)
        await self._seed(store, [10, 20, 30, 40, 50])
        result = await store.list_aggregate_ids(
            initial_event_after=_ts(20), initial_event_before=_ts(40)
        )
        assert [e.aggregate_id for e in result.aggregate_ids] == ["agg-01", "agg-02", "agg-03"]
        page1 = await store.list_aggregate_ids(
            limit=1,
            initial_event_after=_ts(20).isoformat(),
            initial_event_before=_ts(40),
            reverse=True,
        )
        assert [e.aggregate_id for e in page1.aggregate_ids] == ["agg-03"]
        assert page1.next_page_token is not None
        decoded = json.loads(page1.next_page_token)
        assert decoded["limit"] == 1
        assert decoded["reverse"] is True
        assert decoded["lastEvaluatedKey"]["aggregateId"] == "agg-03"
        page2 = await store.list_aggregate_ids(page_token=page1.next_page_token)
        assert [e.aggregate_id for e in page2.aggregate_ids] == ["agg-02"]
        assert page2.next_page_token is not None
        page3 = await store.list_aggregate_ids(page_token=page2.next_page_token)
        assert [e.aggregate_id for e in page3.aggregate_ids] == ["agg-01"]
        assert page3.next_page_token is None

    @pytest.mark.parametrize("reverse", [False, True])
    async def test_bounds_between_two_milliseconds_page_like_one_listing(
        self, adapter: EventStorageAdapter, reverse: bool
    ) -> None:
        """Bounds finer than a millisecond page like one listing.

        Stored timestamps are whole milliseconds; every page selects what one listing does.
        """
        store = self.store(adapter)
        base = _ts(10)
        for i, ms in enumerate([0, 0, 1, 1, 2]):
            await store.push_event(created(f"m{i}", ts=base + timedelta(milliseconds=ms)))
        bounds: dict[str, Any] = {
            "initial_event_after": base + timedelta(microseconds=500),
            "initial_event_before": base + timedelta(milliseconds=1, microseconds=500),
        }
        whole = await store.list_aggregate_ids(reverse=reverse, **bounds)
        assert sorted(e.aggregate_id for e in whole.aggregate_ids) == ["m2", "m3"]
        paged: list[str] = []
        page = await store.list_aggregate_ids(limit=1, reverse=reverse, **bounds)
        while True:
            paged += [e.aggregate_id for e in page.aggregate_ids]
            if page.next_page_token is None:
                break
            page = await store.list_aggregate_ids(page_token=page.next_page_token)
        assert paged == [e.aggregate_id for e in whole.aggregate_ids]

    async def test_bounds_out_of_range_in_utc_bound_nothing_or_pass_nothing(
        self, adapter: EventStorageAdapter
    ) -> None:
        """A bound before year 1 or after 9999 in UTC bounds nothing or passes nothing.

        Such a timestamp in a page token's cursor makes the token invalid.
        """
        store = self.store(adapter)
        await self._seed(store, [1, 2])
        early = datetime(1, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))
        late = datetime(9999, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-1)))

        async def listed(**options: Any) -> list[str]:
            result = await store.list_aggregate_ids(**options)
            return [e.aggregate_id for e in result.aggregate_ids]

        assert await listed(initial_event_after=early) == ["agg-00", "agg-01"]
        assert await listed(initial_event_before=late) == ["agg-00", "agg-01"]
        assert await listed(initial_event_after=late) == []
        assert await listed(initial_event_before=early) == []
        cursor = {"aggregateId": "agg-00", "initialEventTimestamp": "0001-01-01T00:00:00+05:00"}
        with pytest.raises(InvalidPageTokenError, match="out of range"):
            await store.list_aggregate_ids(page_token=json.dumps({"lastEvaluatedKey": cursor}))

    async def test_explicit_options_override_the_token(self, adapter: EventStorageAdapter) -> None:
        """An explicit limit given with a token wins over the token's limit."""
        store = self.store(adapter)
        await self._seed(store, [1, 2, 3, 4, 5])
        page1 = await store.list_aggregate_ids(limit=1)
        page2 = await store.list_aggregate_ids(page_token=page1.next_page_token, limit=3)
        assert [e.aggregate_id for e in page2.aggregate_ids] == ["agg-01", "agg-02", "agg-03"]
        assert page2.next_page_token is not None

    async def test_explicit_bounds_override_the_tokens(self, adapter: EventStorageAdapter) -> None:
        """Bounds given with a token replace the token's from its cursor on.

        The next token carries the bounds given, as it carries every effective option.
        """
        store = self.store(adapter)
        await self._seed(store, [1, 2, 3, 4, 5])

        def ids(page: ListAggregateIdsResult) -> list[str]:
            return [e.aggregate_id for e in page.aggregate_ids]

        page1 = await store.list_aggregate_ids(limit=2, initial_event_before=_ts(3))
        assert ids(page1) == ["agg-00", "agg-01"]
        assert page1.next_page_token is not None
        wider = await store.list_aggregate_ids(
            page_token=page1.next_page_token, initial_event_before=_ts(5)
        )
        assert ids(wider) == ["agg-02", "agg-03"]
        assert wider.next_page_token is not None
        last = await store.list_aggregate_ids(page_token=wider.next_page_token)
        assert ids(last) == ["agg-04"]
        assert last.next_page_token is None
        moved = await store.list_aggregate_ids(
            page_token=page1.next_page_token,
            initial_event_after=_ts(4),
            initial_event_before=_ts(5),
        )
        assert ids(moved) == ["agg-03", "agg-04"]
        assert moved.next_page_token is None

    async def test_explicit_reverse_overrides_the_tokens(
        self, adapter: EventStorageAdapter
    ) -> None:
        """``reverse`` given with a token turns the listing around at the token's cursor."""
        store = self.store(adapter)
        await self._seed(store, [1, 2, 3, 4, 5])
        forward = await store.list_aggregate_ids(limit=2)
        back = await store.list_aggregate_ids(page_token=forward.next_page_token, reverse=True)
        assert [e.aggregate_id for e in back.aggregate_ids] == ["agg-00"]
        assert back.next_page_token is None
        backward = await store.list_aggregate_ids(limit=2, reverse=True)
        ahead = await store.list_aggregate_ids(page_token=backward.next_page_token, reverse=False)
        assert [e.aggregate_id for e in ahead.aggregate_ids] == ["agg-04"]
        assert ahead.next_page_token is None

    async def test_limit_zero_lists_nothing(self, adapter: EventStorageAdapter) -> None:
        """limit=0 gives an empty page without a token."""
        store = self.store(adapter)
        await self._seed(store, [1, 2])
        result = await store.list_aggregate_ids(limit=0)
        assert result.aggregate_ids == []
        assert result.next_page_token is None

    @pytest.mark.parametrize(
        "token",
        ["not json", "[]", '{"limit": 2}', '{"lastEvaluatedKey": {"aggregateId": 3}}', "{"],
    )
    async def test_malformed_page_token_is_a_clear_error(
        self, adapter: EventStorageAdapter, token: str
    ) -> None:
        """A token this library did not produce raises InvalidPageTokenError."""
        store = self.store(adapter)
        with pytest.raises(InvalidPageTokenError):
            await store.list_aggregate_ids(page_token=token)

    async def test_a_bad_explicit_option_next_to_a_token_is_not_blamed_on_the_token(
        self, adapter: EventStorageAdapter
    ) -> None:
        """Given to the adapter next to a valid token, a naive bound is the caller's error."""
        store = self.store(adapter)
        await self._seed(store, [1, 2, 3])
        page1 = await store.list_aggregate_ids(limit=1)
        with pytest.raises(ValueError, match="initial_event_after") as info:
            await adapter.list_aggregate_ids(
                store.context,
                page_token=page1.next_page_token,
                initial_event_after=datetime(2024, 1, 1),  # naive on purpose
            )
        assert not isinstance(info.value, InvalidPageTokenError)

    # -- cancellation ------------------------------------------------------------------------

    async def _cancel_after(self, coro: Awaitable[Any], steps: int) -> bool:
        """Run ``coro`` as a task, cancel it after ``steps`` loop iterations.

        Returns whether the task completed before it could be cancelled.
        """
        task = asyncio.ensure_future(coro)
        for _ in range(steps):
            if task.done():
                break
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return False
        return True

    async def test_push_cancelled_at_any_point_is_all_or_nothing(
        self, adapter: EventStorageAdapter
    ) -> None:
        """Cancelling a push at every await point leaves the event stored fully or not at all."""
        store = self.store(adapter)
        for steps in range(10_000):
            aggregate_id = f"c{steps}"
            completed = await self._cancel_after(store.push_event(created(aggregate_id)), steps)
            events = (await store.get_events(aggregate_id)).events
            assert len(events) in (0, 1)
            if completed:
                assert len(events) == 1
                break
            # Whatever happened, the adapter is usable and consistent with what it reports.
            if events:
                with pytest.raises(EventAlreadyExistsError):
                    await store.push_event(created(aggregate_id))
            else:
                await store.push_event(created(aggregate_id))
        else:  # pragma: no cover - a push that never completes is itself a failure
            pytest.fail("push never completed")
        await store.push_event(incremented("c0", 2))

    async def test_group_cancelled_at_any_point_is_all_or_nothing(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Cancelling a group at every await point stores all of its events or none."""
        first = self.store(await adapter_factory())
        second = self.store(await adapter_factory())
        for steps in range(10_000):
            ids = [f"g{steps}-{i}" for i in range(3)]
            group = EventStore.push_event_group(
                first.group_event(created(ids[0])),
                second.group_event(created(ids[1])),
                first.group_event(created(ids[2])),
            )
            completed = await self._cancel_after(group, steps)
            counts = [
                len((await first.get_events(ids[0])).events),
                len((await second.get_events(ids[1])).events),
                len((await first.get_events(ids[2])).events),
            ]
            assert counts in ([0, 0, 0], [1, 1, 1]), (steps, counts)
            if completed:
                assert counts == [1, 1, 1]
                break
        else:  # pragma: no cover
            pytest.fail("group never completed")
        await first.push_event(created("after-cancellations"))
