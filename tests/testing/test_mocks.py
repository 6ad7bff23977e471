from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from castore_pydantic import EventLimits, EventStore, PushEventResult
from castore_pydantic.errors import (
    EventAlreadyExistsError,
    EventLimitExceededError,
    UndefinedEventStorageAdapterError,
    UnknownEventTypeError,
)
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from castore_pydantic.testing import MockedEventStore, mock_event_store, mute_event_store
from tests.domain import (
    Appeared,
    Pokemon,
    PokemonAppeared,
    PokemonCaught,
    PokemonEvent,
    make_store,
    reduce_pokemon,
)

T1 = datetime(2024, 1, 1, tzinfo=UTC)
T2 = datetime(2024, 1, 2, tzinfo=UTC)

PIKACHU_APPEARED = PokemonAppeared(
    aggregate_id="pikachu",
    version=1,
    timestamp=T1,
    payload=Appeared(name="Pikachu", level=3),
)
PIKACHU_CAUGHT = PokemonCaught(aggregate_id="pikachu", version=2, timestamp=T2)


def bare_store() -> EventStore[Pokemon, PokemonEvent]:
    """A Pokémon store without any adapter."""
    return EventStore(
        event_store_id="POKEMONS",
        event_types=[PokemonAppeared, PokemonCaught],
        reducer=reduce_pokemon,
    )


class TestMockEventStore:
    """``mock_event_store`` copies a store onto a seeded in-memory adapter."""

    def test_copies_identity_and_leaves_original_alone(self) -> None:
        """The mock has the store's id, types, reducer; the original keeps no adapter (B115)."""
        store = bare_store()
        mocked = mock_event_store(store, [PIKACHU_APPEARED])
        assert isinstance(mocked, MockedEventStore)
        assert isinstance(mocked, EventStore)
        assert mocked is not store
        assert mocked.event_store_id == "POKEMONS"
        assert mocked.event_types == store.event_types
        assert mocked.reducer is store.reducer
        assert mocked.simulate_side_effect is store.simulate_side_effect
        assert isinstance(mocked.event_storage_adapter, InMemoryEventStorageAdapter)
        assert store.event_storage_adapter is None
        with pytest.raises(UndefinedEventStorageAdapterError):
            store.get_event_storage_adapter()

    async def test_original_adapter_is_not_written(self) -> None:
        """Pushing to the mock writes nothing to the original store's adapter."""
        store = make_store()
        mocked = mock_event_store(store)
        await mocked.push_event(PIKACHU_APPEARED)
        assert (await store.get_events("pikachu")).events == []
        assert [e.aggregate_id for e in (await store.list_aggregate_ids()).aggregate_ids] == []

    async def test_lists_and_reads_seeded_events_and_appends_pushes(self) -> None:
        """Seeded aggregates are listed with their initial timestamp; pushes append (B116)."""
        mocked = mock_event_store(bare_store(), [PIKACHU_APPEARED])
        listed = (await mocked.list_aggregate_ids()).aggregate_ids
        assert [(e.aggregate_id, e.initial_event_timestamp) for e in listed] == [("pikachu", T1)]
        assert (await mocked.get_events("pikachu")).events == [PIKACHU_APPEARED]
        await mocked.push_event(PIKACHU_CAUGHT)
        assert (await mocked.get_events("pikachu")).events == [PIKACHU_APPEARED, PIKACHU_CAUGHT]
        aggregate = (await mocked.get_existing_aggregate("pikachu")).aggregate
        assert aggregate.status == "caught"

    async def test_seeded_versions_conflict(self) -> None:
        """Seeded events take their versions: pushing one again is a conflict."""
        mocked = mock_event_store(bare_store(), [PIKACHU_APPEARED])
        with pytest.raises(EventAlreadyExistsError) as caught:
            await mocked.push_event(PIKACHU_APPEARED)
        assert (caught.value.event_store_id, caught.value.version) == ("POKEMONS", 1)

    async def test_reset_restores_exactly_the_seed(self) -> None:
        """``reset()`` drops everything pushed and brings back the seeded events (B117)."""
        mocked = mock_event_store(bare_store(), [PIKACHU_APPEARED])
        await mocked.push_event(PIKACHU_CAUGHT)
        await mocked.push_event(
            {
                "aggregateId": "eevee",
                "version": 1,
                "type": "POKEMON_APPEARED",
                "payload": {"name": "Eevee", "level": 5},
            }
        )
        mocked.reset()
        assert (await mocked.get_events("pikachu")).events == [PIKACHU_APPEARED]
        assert (await mocked.get_events("eevee")).events == []
        assert [e.aggregate_id for e in (await mocked.list_aggregate_ids()).aggregate_ids] == [
            "pikachu"
        ]

    async def test_reset_keeps_filled_timestamps(self) -> None:
        """Seed events without a timestamp get one at mock time and keep it across resets."""
        seed = {
            "aggregate_id": "pikachu",
            "version": 1,
            "type": "POKEMON_APPEARED",
            "payload": {"name": "Pikachu", "level": 3},
        }
        mocked = mock_event_store(bare_store(), [seed])
        before = (await mocked.get_events("pikachu")).events
        assert before[0].timestamp is not None
        mocked.reset()
        assert (await mocked.get_events("pikachu")).events == before
        assert mocked.initial_events == tuple(before)

    async def test_accepts_mappings_in_either_spelling_and_json(self) -> None:
        """Seeds may be models, camelCase or snake_case mappings, or JSON text."""
        camel = {
            "aggregateId": "a",
            "version": 1,
            "type": "POKEMON_APPEARED",
            "timestamp": "2024-01-01T00:00:00.000Z",
            "payload": {"name": "A", "level": 1},
        }
        snake = {
            "aggregate_id": "b",
            "version": 1,
            "type": "POKEMON_APPEARED",
            "timestamp": T2,
            "payload": {"name": "B", "level": 2},
        }
        text = json.dumps({"aggregateId": "a", "version": 2, "type": "POKEMON_CAUGHT"})
        mocked = mock_event_store(bare_store(), [camel, snake, text])
        events = (await mocked.get_events("a")).events
        assert [type(e).__name__ for e in events] == ["PokemonAppeared", "PokemonCaught"]
        assert events[0].timestamp == T1
        assert (await mocked.get_existing_aggregate("b")).aggregate.level == 2

    def test_invalid_seed_raises_at_mock_time(self) -> None:
        """A seed that breaks the payload's constraints fails when the mock is made."""
        bad = {
            "aggregateId": "a",
            "version": 1,
            "type": "POKEMON_APPEARED",
            "payload": {"name": "A", "level": 101},
        }
        with pytest.raises(ValidationError):
            mock_event_store(bare_store(), [bad])

    def test_unknown_seed_type_raises(self) -> None:
        """A seed whose type the store does not declare is refused at mock time."""
        with pytest.raises(UnknownEventTypeError):
            mock_event_store(bare_store(), [{"aggregateId": "a", "version": 1, "type": "NOPE"}])

    def test_repeated_seed_version_raises(self) -> None:
        """Two seeds with one aggregate and version are refused at mock time."""
        with pytest.raises(ValueError, match="repeat"):
            mock_event_store(bare_store(), [PIKACHU_APPEARED, PIKACHU_APPEARED])

    def test_single_event_instead_of_a_list_is_refused(self) -> None:
        """Passing one event rather than a list of events is a clear TypeError."""
        with pytest.raises(TypeError, match="wrap it in a list"):
            mock_event_store(bare_store(), PIKACHU_APPEARED)  # type: ignore[arg-type]

    def test_limits_are_copied(self) -> None:
        """The mock enforces the original store's event limits."""
        store: EventStore[Pokemon, PokemonEvent] = EventStore(
            event_store_id="POKEMONS",
            event_types=[PokemonAppeared, PokemonCaught],
            reducer=reduce_pokemon,
            limits=EventLimits(max_bytes=64),
        )
        big = PokemonAppeared(aggregate_id="a", version=1, payload=Appeared(name="x" * 50, level=1))
        with pytest.raises(EventLimitExceededError):
            mock_event_store(store, [big])

    async def test_on_event_pushed_is_not_copied(self) -> None:
        """The original's hook is not called by the mock; a hook set on the mock is."""
        calls: list[str] = []

        async def original_hook(result: PushEventResult[Any, Any]) -> None:
            calls.append("original")

        async def mock_hook(result: PushEventResult[Any, Any]) -> None:
            calls.append(f"mock:{result.event.aggregate_id}")

        store = bare_store()
        store.on_event_pushed = original_hook
        mocked = mock_event_store(store)
        assert mocked.on_event_pushed is None
        await mocked.push_event(PIKACHU_APPEARED)
        mocked.on_event_pushed = mock_hook
        await mocked.push_event(PIKACHU_CAUGHT)
        assert calls == ["mock:pikachu"]

    async def test_mocks_are_independent(self) -> None:
        """Two mocks of one store do not share events."""
        store = bare_store()
        first, second = mock_event_store(store), mock_event_store(store)
        await first.push_event(PIKACHU_APPEARED)
        assert (await second.get_events("pikachu")).events == []


class TestMuteEventStore:
    """``mute_event_store`` swaps a store's adapter in place."""

    async def test_replaces_the_adapter_in_place(self) -> None:
        """The same store object now reads the seed and accepts pushes (B118)."""
        original = InMemoryEventStorageAdapter()
        store = make_store(original)
        await store.push_event(PIKACHU_APPEARED)
        mute_event_store(store, [PIKACHU_APPEARED.model_copy(update={"version": 5})])
        assert store.event_storage_adapter is not original
        assert [e.version for e in (await store.get_events("pikachu")).events] == [5]
        await store.push_event(PIKACHU_APPEARED)
        assert [e.version for e in (await store.get_events("pikachu")).events] == [1, 5]
        listed = (await store.list_aggregate_ids()).aggregate_ids
        assert [e.aggregate_id for e in listed] == ["pikachu"]

    async def test_store_without_adapter_gets_one(self) -> None:
        """A store that had no adapter works after muting."""
        store = bare_store()
        mute_event_store(store)
        assert (await store.get_events("pikachu")).events == []

    async def test_invalid_seed_leaves_the_store_unchanged(self) -> None:
        """A bad seed raises and the store keeps its adapter and its events."""
        original = InMemoryEventStorageAdapter()
        store = make_store(original)
        await store.push_event(PIKACHU_APPEARED)
        with pytest.raises(ValidationError):
            mute_event_store(store, [{"aggregateId": "x", "version": 0, "type": "POKEMON_CAUGHT"}])
        assert store.event_storage_adapter is original
        assert (await store.get_events("pikachu")).events == [PIKACHU_APPEARED]

    async def test_keeps_on_event_pushed(self) -> None:
        """Muting changes only the adapter: the store's hook still runs."""
        pushed: list[int] = []

        async def hook(result: PushEventResult[Any, Any]) -> None:
            pushed.append(result.event.version)

        store = bare_store()
        store.on_event_pushed = hook
        mute_event_store(store)
        await store.push_event(PIKACHU_APPEARED)
        assert pushed == [1]
