from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from castore_pydantic import EventStore
from castore_pydantic.errors import EventLimitExceededError, StoredEventValidationError
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from castore_pydantic.testing import mock_event_store
from castore_pydantic.testing.contracts import AdapterFactory, EventStorageAdapterContract
from castore_pydantic.testing.contracts._storage import Counter, NoteAdded, reduce_counter


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


def _notes(adapter: InMemoryEventStorageAdapter | None = None) -> EventStore[Counter, Any]:
    return EventStore(
        event_store_id="NOTES",
        event_types=[NoteAdded],
        reducer=reduce_counter,
        event_storage_adapter=adapter,
    )


class TestSeedShapes:
    def test_castores_single_list_is_a_clear_type_error(self) -> None:
        """Castore's adapter takes one list of events; ours is keyed by store id. The list
        failed deep inside with "'list' object has no attribute 'items'"."""
        seed = {"aggregateId": "n1", "version": 1, "type": "NOTE_ADDED"}
        with pytest.raises(TypeError, match=r"maps event store ids .* not a list"):
            InMemoryEventStorageAdapter(initial_events=[seed])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"initial_events\['NOTES'\] must be a list"):
            InMemoryEventStorageAdapter(initial_events={"NOTES": seed})  # type: ignore[dict-item]
        lone = NoteAdded(aggregate_id="n1", version=1)
        for wrong in (lone, None):
            with pytest.raises(TypeError, match=r"initial_events\['NOTES'\] must be a list"):
                InMemoryEventStorageAdapter(initial_events={"NOTES": wrong})  # type: ignore[dict-item]


class TestSeedsAreStoredByValue:
    """Seeds are copied when the adapter is made: nothing done later changes them."""

    async def test_a_seed_mapping_changed_after_construction(self) -> None:
        seed: dict[str, Any] = {
            "aggregateId": "n1",
            "version": 1,
            "type": "NOTE_ADDED",
            "payload": {"tags": ["a"]},
            "timestamp": "2024-01-01T00:00:00.000+01:00",
        }
        store = _notes(InMemoryEventStorageAdapter(initial_events={"NOTES": [seed]}))
        seed["payload"]["tags"].append("changed")
        seed["version"] = 7
        (event,) = (await store.get_events("n1")).events
        assert event.payload == {"tags": ["a"]}
        assert event.version == 1
        # Normalised to UTC milliseconds, as a pushed timestamp is (and listed so).
        assert event.timestamp == datetime(2023, 12, 31, 23, tzinfo=UTC)
        (entry,) = (await store.list_aggregate_ids()).aggregate_ids
        assert entry.initial_event_timestamp == event.timestamp

    async def test_reset_brings_back_seeds_a_test_changed_through_reads(self) -> None:
        mocked = mock_event_store(
            _notes(), [NoteAdded(aggregate_id="n1", version=1, payload={"tags": ["a"]})]
        )
        (event,) = (await mocked.get_events("n1")).events
        assert event.payload is not None
        event.payload["tags"].append("changed")
        mocked.initial_events[0].payload["tags"].append("changed too")  # type: ignore[index]
        await mocked.push_event(NoteAdded(aggregate_id="n1", version=2))
        mocked.reset()
        (event,) = (await mocked.get_events("n1")).events
        assert event.payload == {"tags": ["a"]}

    async def test_a_seed_json_cannot_hold_is_refused_at_construction(self) -> None:
        seed = {"aggregateId": "n1", "version": 1, "type": "NOTE_ADDED", "payload": {"x": object()}}
        with pytest.raises(TypeError, match="cannot be stored as JSON"):
            InMemoryEventStorageAdapter(initial_events={"NOTES": [seed]})

    async def test_a_seed_holding_nan_or_infinity_is_refused(self) -> None:
        """Seeds skip the store's limits; NaN would have been stored as null."""
        for value in (float("nan"), float("inf")):
            mapping = {"aggregateId": "n1", "version": 1, "type": "NOTE_ADDED",
                       "payload": {"x": [value]}}  # fmt: skip
            with pytest.raises(TypeError, match="NaN or infinity"):
                InMemoryEventStorageAdapter(initial_events={"NOTES": [mapping]})
            event = NoteAdded(aggregate_id="n1", version=1, metadata={"x": value})
            with pytest.raises(EventLimitExceededError, match="NaN and infinity"):
                InMemoryEventStorageAdapter(initial_events={"NOTES": [event]})

    async def test_deep_cyclic_and_float_subclass_seeds_get_the_documented_errors(
        self,
    ) -> None:
        """The NaN scan walks without recursion and follows float subclasses: a very deep
        or cyclic seed is the serialiser's TypeError, not a RecursionError."""

        class Precise(float):
            pass

        deep: Any = [1.5]
        for _ in range(600):
            deep = {"a": deep}
        cyclic: dict[str, Any] = {"x": 1}
        cyclic["self"] = cyclic
        for payload in (deep, cyclic):
            seed = {"aggregateId": "n1", "version": 1, "type": "NOTE_ADDED", "payload": payload}
            with pytest.raises(TypeError, match="cannot be stored as JSON"):
                InMemoryEventStorageAdapter(initial_events={"NOTES": [seed]})
        event = NoteAdded(aggregate_id="n1", version=1, payload={"x": Precise("nan")})
        with pytest.raises(EventLimitExceededError, match="NaN and infinity"):
            InMemoryEventStorageAdapter(initial_events={"NOTES": [event]})

    async def test_a_seed_timestamp_that_does_not_parse_fails_when_read(self) -> None:
        seed = {"aggregateId": "n1", "version": 1, "type": "NOTE_ADDED", "timestamp": "soon"}
        store = _notes(InMemoryEventStorageAdapter(initial_events={"NOTES": [seed]}))
        with pytest.raises(StoredEventValidationError):
            await store.get_events("n1")
        with pytest.raises(StoredEventValidationError):
            await store.list_aggregate_ids()

    async def test_a_seed_deeper_than_reads_parse_names_its_event(self) -> None:
        """A seeded payload nested deeper than reads parse (but not than JSON holds) fails
        reads, and listing a first event whose timestamp did not parse, naming the event."""
        deep: Any = 1
        for _ in range(210):
            deep = [deep]
        seeds = [
            {"aggregateId": "n1", "version": v, "type": "NOTE_ADDED", "payload": {"x": x}}
            for v, x in [(1, 1), (2, deep), (3, 3)]
        ]
        seeds.append(
            {"aggregateId": "n2", "version": 1, "type": "NOTE_ADDED", "timestamp": "soon"}
            | {"payload": {"x": deep}}
        )
        store = _notes(InMemoryEventStorageAdapter(initial_events={"NOTES": seeds}))
        reads: list[tuple[Callable[[], Awaitable[object]], tuple[str, int]]] = [
            (lambda: store.get_events("n1"), ("n1", 2)),
            (lambda: store.get_events("n1", reverse=True), ("n1", 2)),
            (lambda: store.get_aggregate("n1"), ("n1", 2)),
            (store.list_aggregate_ids, ("n2", 1)),
        ]
        for read, named in reads:
            with pytest.raises(StoredEventValidationError) as info:
                await read()
            assert (info.value.aggregate_id, info.value.version) == named
            assert f"aggregate {named[0]}, version {named[1]} " in str(info.value)


async def test_unlisted_aggregates_are_those_without_version_one() -> None:
    """``castore export`` finds the aggregates listing leaves out through this."""
    adapter = InMemoryEventStorageAdapter()
    store = _notes(adapter)
    await store.push_event(NoteAdded(aggregate_id="b", version=2))
    await store.push_event(NoteAdded(aggregate_id="a", version=5))
    await store.push_event(NoteAdded(aggregate_id="listed", version=1))
    assert await adapter._unlisted_aggregate_ids(store.context) == ["a", "b"]
    await store.push_event(NoteAdded(aggregate_id="b", version=1))
    assert await adapter._unlisted_aggregate_ids(store.context) == ["a"]


class TestVersionsSqlCannotStore:
    async def test_a_version_above_64_bits_is_refused_directly_and_in_seeds(self) -> None:
        """The event store refuses such versions; the adapter used directly, or seeded,
        still stored them, which SQLite and PostgreSQL refuse."""
        adapter = InMemoryEventStorageAdapter()
        store = _notes(adapter)
        huge = NoteAdded(aggregate_id="n", version=1, payload={"text": "x"}).model_copy(
            update={"version": 2**63}
        )
        with pytest.raises(EventLimitExceededError, match="64-bit"):
            await adapter.push_event(huge, store.context)
        with pytest.raises(EventLimitExceededError, match="64-bit"):
            InMemoryEventStorageAdapter(initial_events={"NOTES": [huge]})
        seed = {
            "aggregateId": "n",
            "version": 2**63,
            "type": "NOTE_ADDED",
            "payload": {"text": "x"},
        }
        with pytest.raises(EventLimitExceededError, match="2\\*\\*63-1"):
            InMemoryEventStorageAdapter(initial_events={"NOTES": [seed]})
        assert (await store.get_events("n")).events == []
