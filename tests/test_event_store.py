from __future__ import annotations

import asyncio
import functools
import json
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from castore_pydantic import (
    Aggregate,
    AggregateNotFoundError,
    Event,
    EventAlreadyExistsError,
    EventLimits,
    EventStore,
    PushEventResult,
    UndefinedEventStorageAdapterError,
)
from castore_pydantic.errors import (
    EventGroupError,
    EventLimitExceededError,
    ReservedEventTypeError,
    UnknownEventTypeError,
)
from castore_pydantic.messaging import ConnectedEventStore, NotificationMessageQueue
from castore_pydantic.messaging.memory import InMemoryMessageQueueAdapter
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from tests.domain import (
    Appeared,
    Pokemon,
    PokemonAppeared,
    PokemonCaught,
    PokemonEvent,
    PokemonLeveledUp,
    appeared,
    make_store,
    reduce_pokemon,
)


def ts(year: int, month: int = 1, day: int = 1) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


class TestDeclaration:
    def test_exposes_castore_properties(self) -> None:
        """A store exposes its id, event types, reducer and adapter (B4)."""
        adapter = InMemoryEventStorageAdapter()
        store = make_store(adapter)
        assert store.event_store_id == "POKEMONS"
        assert store.event_types == (PokemonAppeared, PokemonCaught, PokemonLeveledUp)
        assert store.reducer is reduce_pokemon
        assert store.event_storage_adapter is adapter
        assert store.get_event_storage_adapter() is adapter
        assert store.on_event_pushed is None
        assert callable(store.simulate_side_effect)

    @pytest.mark.parametrize("reserved", ["__REPLAYED__", "__AGGREGATE_EXISTS__"])
    def test_reserved_event_types_are_refused(self, reserved: str) -> None:
        """Declaring a store with a reserved type raises ReservedEventTypeError (B1)."""
        reserved_type = type(
            "Reserved",
            (Event,),
            {"__annotations__": {"type": Literal[reserved]}, "type": reserved},  # type: ignore[valid-type]
        )
        with pytest.raises(ReservedEventTypeError, match=reserved):
            EventStore(event_store_id="S", event_types=[reserved_type], reducer=reduce_pokemon)

    def test_event_type_needs_a_literal_type(self) -> None:
        """An event class whose type is a plain str cannot be registered."""
        with pytest.raises(TypeError, match="Literal"):
            EventStore(event_store_id="S", event_types=[Event], reducer=reduce_pokemon)

    def test_one_type_name_cannot_be_declared_twice(self) -> None:
        """Two classes claiming one type string are refused."""

        class OtherCaught(Event):
            type: Literal["POKEMON_CAUGHT"] = "POKEMON_CAUGHT"

        with pytest.raises(ValueError, match="declared twice"):
            EventStore(
                event_store_id="S",
                event_types=[PokemonCaught, OtherCaught],
                reducer=reduce_pokemon,
            )

    def test_event_types_must_be_a_sequence_of_classes(self) -> None:
        """One class instead of a list gets a clear TypeError (it was 'not iterable')."""
        with pytest.raises(TypeError, match=r"sequence of Event subclasses"):
            EventStore(
                event_store_id="S",
                event_types=PokemonAppeared,  # type: ignore[arg-type]
                reducer=reduce_pokemon,
            )

    def test_event_types_may_be_any_iterable(self) -> None:
        """A generator of classes is read once, and each class is kept."""
        store = EventStore(
            event_store_id="S",
            event_types=(cls for cls in (PokemonAppeared, PokemonCaught)),  # type: ignore[arg-type]
            reducer=reduce_pokemon,
        )
        assert store.event_types == (PokemonAppeared, PokemonCaught)

    def test_reducer_must_be_callable(self) -> None:
        """reducer=None is refused when the store is made, not after the first write."""
        with pytest.raises(TypeError, match="reducer must be a function"):
            EventStore(
                event_store_id="S",
                event_types=[PokemonAppeared],
                reducer=None,  # type: ignore[arg-type]
            )

    def test_an_async_reducer_is_refused(self) -> None:
        """Folding never awaits: an async reducer made every aggregate a coroutine, which
        check_reducer then reported as a version-tracking failure."""

        async def reduce_later(pokemon: Any, event: Any) -> Any:
            return reduce_pokemon(pokemon, event)

        class Folder:
            async def __call__(self, pokemon: Any, event: Any) -> Any:
                return reduce_pokemon(pokemon, event)

        for reducer in (reduce_later, Folder()):
            with pytest.raises(TypeError, match="plain function, not async"):
                EventStore(event_store_id="S", event_types=[PokemonAppeared], reducer=reducer)
        # Calling the class itself makes an instance: no coroutine, whatever its __call__.
        EventStore(event_store_id="S", event_types=[PokemonAppeared], reducer=Folder)

    def test_without_adapter_fails_at_call_time(self) -> None:
        """A store without adapter constructs, then data methods raise (B5)."""
        store = EventStore(
            event_store_id="POKEMONS", event_types=[PokemonCaught], reducer=reduce_pokemon
        )
        with pytest.raises(UndefinedEventStorageAdapterError) as info:
            asyncio.run(store.get_events("p1"))
        assert info.value.event_store_id == "POKEMONS"
        assert str(info.value) == "EventStorageAdapter not found for event store POKEMONS"

    async def test_adapter_can_be_set_later(self) -> None:
        """Assigning event_storage_adapter takes effect for later calls (B6)."""
        store = EventStore(
            event_store_id="POKEMONS",
            event_types=[PokemonAppeared, PokemonCaught],
            reducer=reduce_pokemon,
        )
        store.event_storage_adapter = InMemoryEventStorageAdapter()
        await store.push_event(appeared())
        assert len((await store.get_events("pikachu")).events) == 1


class TestPushEvent:
    async def test_version_one_returns_next_aggregate(self) -> None:
        """A version-1 push returns the reducer's aggregate without prev_aggregate (B16)."""
        store = make_store()
        result = await store.push_event(appeared())
        assert result.next_aggregate == Pokemon(
            aggregate_id="pikachu", version=1, name="Pikachu", level=3, status="wild"
        )
        assert result.event.timestamp is not None

    async def test_later_version_without_prev_aggregate_has_none(self) -> None:
        """A push of version > 1 without prev_aggregate computes no aggregate (B17)."""
        store = make_store()
        await store.push_event(appeared())
        result = await store.push_event(PokemonCaught(aggregate_id="pikachu", version=2))
        assert result.next_aggregate is None

    async def test_prev_aggregate_gives_the_folded_aggregate(self) -> None:
        """With prev_aggregate the next aggregate equals building from all events (B18)."""
        store = make_store()
        first = await store.push_event(appeared())
        second = await store.push_event(
            PokemonCaught(aggregate_id="pikachu", version=2), prev_aggregate=first.next_aggregate
        )
        built = (await store.get_aggregate("pikachu")).aggregate
        assert second.next_aggregate == built
        assert built is not None
        assert built.status == "caught"

    async def test_missing_timestamp_is_now_in_milliseconds(self) -> None:
        """A pushed event without timestamp gets the current UTC time, ms precision (B22)."""
        store = make_store()
        before = datetime.now(UTC)
        result = await store.push_event(appeared())
        after = datetime.now(UTC)
        stamp = result.event.timestamp
        assert stamp is not None
        assert stamp.microsecond % 1000 == 0
        assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= stamp <= after

    async def test_explicit_timestamp_is_kept(self) -> None:
        """An explicit timestamp is stored as given (B23)."""
        store = make_store()
        result = await store.push_event(appeared(timestamp="2021-05-06T07:08:09.010Z"))
        assert result.event.timestamp == datetime(2021, 5, 6, 7, 8, 9, 10000, UTC)

    async def test_json_text_input_is_accepted(self) -> None:
        """JSON text is validated into the store's event type."""
        store = make_store()
        text = '{"aggregateId":"p1","version":1,"type":"POKEMON_APPEARED",' + (
            '"payload":{"name":"Mew","level":50}}'
        )
        result = await store.push_event(text)
        assert isinstance(result.event, PokemonAppeared)
        assert result.event.payload == Appeared(name="Mew", level=50)

    async def test_unknown_type_names_store_and_types_and_writes_nothing(self) -> None:
        """An unregistered type is refused with the store id and its types listed."""
        store = make_store()
        with pytest.raises(UnknownEventTypeError) as info:
            await store.push_event({"aggregateId": "p1", "version": 1, "type": "TRAINER_BORN"})
        message = str(info.value)
        assert "POKEMONS" in message
        assert "TRAINER_BORN" in message
        assert "POKEMON_APPEARED, POKEMON_CAUGHT, POKEMON_LEVELED_UP" in message
        assert (await store.list_aggregate_ids()).aggregate_ids == []

    @pytest.mark.parametrize("form", [str, str.encode], ids=["text", "bytes"])
    async def test_unknown_type_in_json_is_refused_alike_by_a_store_of_one_type(
        self, form: Any
    ) -> None:
        """JSON naming an undeclared type is an UnknownEventTypeError also when the store
        has one event type (it used to be a plain ValidationError of its Literal)."""
        store = EventStore(
            event_store_id="ONLY",
            event_types=[PokemonAppeared],
            reducer=reduce_pokemon,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        for kind in ('"TRAINER_BORN"', "7"):
            text = f'{{"aggregateId":"p1","version":1,"type":{kind}}}'
            with pytest.raises(UnknownEventTypeError) as info:
                await store.push_event(form(text))
            assert info.value.known_types == ("POKEMON_APPEARED",)
        assert info.value.event_type == 7
        declared = '{"aggregateId":"p1","version":0,"type":"POKEMON_APPEARED"}'
        with pytest.raises(ValidationError):  # a declared type with bad data stays that
            await store.push_event(form(declared))
        assert (await store.get_events("p1")).events == []

    @pytest.mark.parametrize("kind", [None, True, 5, ["A"]])
    async def test_an_unknown_type_from_json_is_named_as_given(self, kind: Any) -> None:
        """A store of several types named the type of JSON input as Pydantic's text of it
        ('None' for null): the message read as if the type were the string "None"."""
        store = make_store()
        given = {"aggregateId": "p1", "version": 1, "type": kind}
        with pytest.raises(UnknownEventTypeError) as from_mapping:
            await store.push_event(given)
        with pytest.raises(UnknownEventTypeError) as from_json:
            await store.push_event(json.dumps(given))
        assert from_json.value.event_type == from_mapping.value.event_type == kind
        assert str(from_json.value) == str(from_mapping.value)

    async def test_a_version_no_sql_database_can_store_is_refused_in_memory_too(self) -> None:
        """The in-memory adapter stored version 2**63, which SQLite and PostgreSQL refuse:
        code tested against it behaved otherwise in production."""
        store = make_store()
        for version in (2**63, 2**70):
            with pytest.raises(EventLimitExceededError, match="64-bit") as info:
                await store.push_event(appeared(version=version))
            assert info.value.path == ("version",)
            with pytest.raises(EventLimitExceededError, match="64-bit"):
                store.group_event(appeared(version=version))
        assert (await store.get_events("pikachu")).events == []
        await store.push_event(appeared(version=2**63 - 1))
        assert [e.version for e in (await store.get_events("pikachu")).events] == [2**63 - 1]

    async def test_unregistered_event_class_is_refused(self) -> None:
        """An instance of a class the store does not declare is refused."""

        class TrainerBorn(Event):
            type: Literal["TRAINER_BORN"] = "TRAINER_BORN"

        store = make_store()
        with pytest.raises(UnknownEventTypeError):
            await store.push_event(TrainerBorn(aggregate_id="t1", version=1))  # type: ignore[arg-type]
        assert (await store.get_events("t1")).events == []

    async def test_invalid_payload_raises_validation_error_and_writes_nothing(self) -> None:
        """Invalid data raises pydantic's ValidationError unchanged; nothing is stored."""
        store = make_store()
        bad = appeared(payload={"name": "Pikachu", "level": 101})
        with pytest.raises(ValidationError):
            await store.push_event(bad)
        assert (await store.get_events("pikachu")).events == []

    async def test_duplicate_raises_with_fields_and_message(self) -> None:
        """A taken version raises EventAlreadyExistsError with Castore's message (B20)."""
        store = make_store()
        await store.push_event(appeared())
        with pytest.raises(EventAlreadyExistsError) as info:
            await store.push_event(appeared())
        error = info.value
        assert (error.event_store_id, error.aggregate_id, error.version) == (
            "POKEMONS",
            "pikachu",
            1,
        )
        assert error.code == "EventAlreadyExistsError"
        assert str(error) == "Event already exists for POKEMONS aggregate pikachu and version 1"

    async def test_on_event_pushed_runs_after_the_write(self) -> None:
        """on_event_pushed receives the push result after the event is stored (B24)."""
        store = make_store()
        seen: list[PushEventResult[Any, Any]] = []

        async def hook(result: PushEventResult[Any, Any]) -> None:
            assert len((await store.get_events(result.event.aggregate_id)).events) == 1
            seen.append(result)

        store.on_event_pushed = hook
        result = await store.push_event(appeared())
        assert seen == [result]

    async def test_failing_on_event_pushed_propagates_but_event_stays(self) -> None:
        """If on_event_pushed raises, the caller sees it and the event remains stored."""
        store = make_store()

        async def hook(result: PushEventResult[Any, Any]) -> None:
            raise RuntimeError("projection down")

        store.on_event_pushed = hook
        with pytest.raises(RuntimeError, match="projection down"):
            await store.push_event(appeared())
        assert len((await store.get_events("pikachu")).events) == 1

    async def test_a_plain_function_hook_is_called_as_a_coroutine_is_awaited(self) -> None:
        """Castore awaits whatever its hook returns. A plain function ran and then every
        push raised TypeError (None cannot be awaited), with the event stored: a caller
        retrying got EventAlreadyExistsError. Connected stores run it the same way."""
        store = make_store()
        seen: list[PushEventResult[Any, Any]] = []
        store.on_event_pushed = seen.append
        pushed = await store.push_event(appeared())
        grouped = await EventStore.push_event_group(
            store.group_event(PokemonCaught(aggregate_id="pikachu", version=2))
        )
        published: list[Any] = []

        async def worker(message: Any, context: Any) -> None:
            published.append(message)

        adapter = InMemoryMessageQueueAdapter(worker=worker)
        queue = NotificationMessageQueue(
            message_queue_id="q", source_event_stores=[store], message_queue_adapter=adapter
        )
        connected = ConnectedEventStore(store, queue)
        relayed = await connected.push_event(PokemonCaught(aggregate_id="pikachu", version=3))
        assert seen == [pushed, *grouped.event_group, relayed]
        await adapter.join()
        assert [message.event.version for message in published] == [3]

    async def test_a_reducer_failing_after_the_write_still_runs_the_hook(self) -> None:
        """The reducer runs once the event is stored: when it raises, the hook still runs
        (with no next aggregate) and the reducer's error is raised after it, noting that
        the event is stored (the hook was skipped)."""
        store = make_store()
        seen: list[PushEventResult[Any, Any]] = []
        store.on_event_pushed = seen.append
        # reduce_pokemon asserts that a catch follows an appearance: here it cannot.
        with pytest.raises(AssertionError) as raised:
            await store.push_event(PokemonCaught(aggregate_id="pikachu", version=1))
        assert any("is stored" in note for note in raised.value.__notes__)
        (stored,) = (await store.get_events("pikachu")).events
        assert [(r.event, r.next_aggregate) for r in seen] == [(stored, None)]

    async def test_a_prev_aggregate_of_another_aggregate_is_refused(self) -> None:
        """A prev_aggregate of another id, or at or past the event's version, would fold a
        wrong next aggregate: refused before writing (it was folded silently)."""
        store = make_store()
        pikachu = (await store.push_event(appeared())).next_aggregate
        eevee = (await store.push_event(appeared("eevee"))).next_aggregate
        caught_pikachu = PokemonCaught(aggregate_id="pikachu", version=2)
        with pytest.raises(ValueError, match="is aggregate 'eevee'"):
            await store.push_event(caught_pikachu, prev_aggregate=eevee)
        with pytest.raises(ValueError, match="already at version 1"):
            await store.push_event(appeared(version=1), prev_aggregate=pikachu, force=True)
        with pytest.raises(ValueError, match="is aggregate 'eevee'"):
            await EventStore.push_event_group(
                store.group_event(appeared("mew")),
                store.group_event(caught_pikachu, prev_aggregate=eevee),
            )
        assert [len((await store.get_events(a)).events) for a in ("pikachu", "mew")] == [1, 0]

    async def test_a_mapping_prev_aggregate_is_validated_into_the_reducers_model(self) -> None:
        """Castore code passes plain objects as prevAggregate. The reducer, annotated to
        return a model, got the mapping once the event was written and failed there; the
        mapping is now validated first (an invalid one writes nothing). A reducer whose
        model is unknown still gets what it was given."""
        store = make_store()
        first = await store.push_event(appeared())
        assert first.next_aggregate is not None
        as_json = first.next_aggregate.model_dump(mode="json", by_alias=True)
        caught = await store.push_event(
            PokemonCaught(aggregate_id="pikachu", version=2), prev_aggregate=as_json
        )
        assert caught.next_aggregate is not None
        assert caught.next_aggregate.status == "caught"
        with pytest.raises(ValidationError, match="name"):
            await store.push_event(
                PokemonLeveledUp(aggregate_id="pikachu", version=3),
                prev_aggregate={"aggregateId": "pikachu", "version": 2},
            )
        with pytest.raises(ValidationError, match="name"):
            store.group_event(
                PokemonLeveledUp(aggregate_id="pikachu", version=3),
                prev_aggregate={"aggregateId": "pikachu", "version": 2},
            )
        assert len((await store.get_events("pikachu")).events) == 2

        def count(tally: Any, event: Any) -> Any:  # dict aggregates, no annotation
            return {"count": (tally or {"count": 0})["count"] + 1}

        class Reducer:
            def __call__(self, pokemon: Pokemon | None, event: PokemonEvent) -> Pokemon:
                return reduce_pokemon(pokemon, event)

        # The model is found through a partial and through an object's __call__ too.
        for reducer in (functools.partial(reduce_pokemon), Reducer()):
            wrapped = EventStore(
                event_store_id="WRAPPED",
                event_types=[PokemonAppeared, PokemonCaught, PokemonLeveledUp],
                reducer=reducer,
                event_storage_adapter=InMemoryEventStorageAdapter(),
            )
            await wrapped.push_event(appeared())
            again = await wrapped.push_event(
                PokemonCaught(aggregate_id="pikachu", version=2), prev_aggregate=as_json
            )
            assert isinstance(again.next_aggregate, Pokemon)

        tallies = EventStore(
            event_store_id="TALLIES",
            event_types=[PokemonAppeared, PokemonCaught],
            reducer=count,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        await tallies.push_event(appeared())
        result = await tallies.push_event(
            PokemonCaught(aggregate_id="pikachu", version=2), prev_aggregate={"count": 1}
        )
        assert result.next_aggregate == {"count": 2}

    async def test_a_reducers_error_raised_again_keeps_one_note(self) -> None:
        """One exception object raised by the reducer on every push (a module-level
        instance) carries the note of the last push only, not one per push."""
        shared = RuntimeError("the reducer is broken")

        def broken(aggregate: Any, event: Any) -> Any:
            raise shared

        store = EventStore(
            event_store_id="S",
            event_types=[PokemonAppeared],
            reducer=broken,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        for name in ("a", "b", "c"):
            with pytest.raises(RuntimeError):
                await store.push_event(appeared(name))
        (note,) = shared.__notes__
        assert "of aggregate 'c'" in note

    async def test_a_prev_aggregate_with_a_uuid_id_is_compared_as_text(self) -> None:
        """An Aggregate subclass holding its id as a UUID is the event's aggregate."""

        class Tracked(Aggregate):
            aggregate_id: UUID  # type: ignore[assignment]

        def track(aggregate: Any, event: Any) -> Tracked:
            return Tracked(aggregate_id=UUID(event.aggregate_id), version=event.version)

        store = EventStore(
            event_store_id="S",
            event_types=[PokemonAppeared, PokemonCaught],
            reducer=track,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        key = str(uuid4())
        first = await store.push_event(appeared(key))
        second = await store.push_event(
            PokemonCaught(aggregate_id=key, version=2), prev_aggregate=first.next_aggregate
        )
        assert second.next_aggregate == Tracked(aggregate_id=UUID(key), version=2)

    async def test_an_older_prev_aggregate_is_accepted(self) -> None:
        """Versions need not be contiguous: an aggregate older than the event is folded."""
        store = make_store()
        first = await store.push_event(appeared())
        result = await store.push_event(
            PokemonCaught(aggregate_id="pikachu", version=5), prev_aggregate=first.next_aggregate
        )
        assert result.next_aggregate is not None
        assert (result.next_aggregate.version, result.next_aggregate.status) == (5, "caught")

    async def test_versions_need_not_be_contiguous_but_read_in_order(self) -> None:
        """v5 then v2 is accepted and read back ordered by version (B25, D10)."""
        store = make_store()
        await store.push_event(PokemonCaught(aggregate_id="p", version=5))
        await store.push_event(PokemonCaught(aggregate_id="p", version=2))
        assert [e.version for e in (await store.get_events("p")).events] == [2, 5]


class TestReading:
    async def test_get_events_validates_negative_options(self) -> None:
        """Negative limit or versions are a ValueError (D5)."""
        store = make_store()
        for option in ("limit", "min_version", "max_version"):
            with pytest.raises(ValueError, match=option):
                await store.get_events("p", **{option: -1})

    async def test_build_aggregate_edge_cases(self) -> None:
        """Empty folds return the initial aggregate; folding starts from it (B10)."""
        store = make_store()
        assert store.build_aggregate([]) is None
        start = Pokemon(aggregate_id="p", version=1, name="Eevee", level=5, status="wild")
        assert store.build_aggregate([], start) is start
        caught = store.build_aggregate([PokemonCaught(aggregate_id="p", version=2)], start)
        assert caught is not None
        assert (caught.status, caught.version) == ("caught", 2)

    async def test_get_existing_aggregate_raises_when_missing(self) -> None:
        """get_existing_aggregate raises AggregateNotFoundError with Castore's message (B13)."""
        store = make_store()
        with pytest.raises(AggregateNotFoundError) as info:
            await store.get_existing_aggregate("missingno")
        assert str(info.value) == "Unable to find aggregate missingno in event store POKEMONS."
        assert isinstance(info.value, LookupError)

    async def test_get_existing_aggregate_raises_when_reducer_gives_none(self) -> None:
        """Events that fold to None also count as missing (B14)."""
        store = EventStore(
            event_store_id="NULLS",
            event_types=[PokemonCaught],
            reducer=lambda aggregate, event: None,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        await store.push_event(PokemonCaught(aggregate_id="p", version=1))
        with pytest.raises(AggregateNotFoundError):
            await store.get_existing_aggregate("p")

    async def test_get_existing_aggregate_returns_all_parts(self) -> None:
        """An existing aggregate comes with its events and last event."""
        store = make_store()
        await store.push_event(appeared())
        await store.push_event(PokemonCaught(aggregate_id="pikachu", version=2))
        result = await store.get_existing_aggregate("pikachu")
        assert result.aggregate.status == "caught"
        assert [e.version for e in result.events] == [1, 2]
        assert result.last_event.version == 2

    async def test_listing_accepts_iso_strings_and_refuses_naive_bounds(self) -> None:
        """Listing bounds may be ISO strings; naive datetimes are refused."""
        store = make_store()
        await store.push_event(appeared(timestamp="2022-01-01T00:00:00.000Z"))
        listed = await store.list_aggregate_ids(initial_event_after="2022-01-01T00:00:00Z")
        assert [e.aggregate_id for e in listed.aggregate_ids] == ["pikachu"]
        with pytest.raises(ValueError, match="timezone-aware"):
            await store.list_aggregate_ids(initial_event_before=datetime(2022, 1, 1))


class TestGroups:
    async def test_group_event_writes_nothing_and_carries_context(self) -> None:
        """group_event validates and wraps without writing (B26)."""
        adapter = InMemoryEventStorageAdapter()
        store = make_store(adapter)
        grouped = store.group_event(appeared())
        assert grouped.event_store is store
        assert grouped.event_storage_adapter is adapter
        assert grouped.context is not None
        assert grouped.context.event_store_id == "POKEMONS"
        assert grouped.prev_aggregate is None
        assert (await store.get_events("pikachu")).events == []

    async def test_group_event_validates_input(self) -> None:
        """group_event refuses invalid and unknown events before anything is grouped."""
        store = make_store()
        with pytest.raises(ValidationError):
            store.group_event(appeared(payload={"name": ""}))
        with pytest.raises(UnknownEventTypeError):
            store.group_event({"aggregateId": "x", "version": 1, "type": "NOPE"})

    async def test_group_result_and_hooks(self) -> None:
        """Results come in input order with next aggregates; every store's hook runs (B29, B30)."""
        pokemons = make_store()
        trainers = make_store(event_store_id="TRAINERS")
        calls: list[str] = []

        async def hook(result: PushEventResult[Any, Any]) -> None:
            calls.append(result.event.aggregate_id)

        pokemons.on_event_pushed = hook
        trainers.on_event_pushed = hook
        first = await pokemons.push_event(appeared())
        result = await EventStore.push_event_group(
            pokemons.group_event(
                PokemonCaught(aggregate_id="pikachu", version=2),
                prev_aggregate=first.next_aggregate,
            ),
            trainers.group_event(appeared("ash")),
        )
        caught, ash = result.event_group
        assert caught.next_aggregate is not None
        assert caught.next_aggregate.status == "caught"
        assert ash.next_aggregate is not None
        assert ash.event.aggregate_id == "ash"
        assert sorted(calls) == ["ash", "pikachu", "pikachu"]

    async def test_empty_group_is_a_clear_error(self) -> None:
        """An empty group raises EventGroupError rather than a TypeError (B34)."""
        with pytest.raises(EventGroupError, match="at least one"):
            await EventStore.push_event_group()

    async def test_a_list_of_grouped_events_says_to_spread_it(self) -> None:
        """Castore's pushEventGroup takes its events spread too; a list given whole said
        "is not a GroupedEvent (use store.group_event)", though it held nothing else."""
        store = make_store()
        grouped = [store.group_event(appeared()), store.group_event(appeared("eevee"))]
        with pytest.raises(EventGroupError, match=r"#0 is a list: .*push_event_group\(\*"):
            await EventStore.push_event_group(grouped)  # type: ignore[arg-type]
        assert (await store.get_events("pikachu")).events == []

    async def test_in_memory_group_refuses_other_adapters(self) -> None:
        """An in-memory group refuses an event attached to another adapter kind (B32)."""
        store = make_store()

        class Other(InMemoryEventStorageAdapter):
            pass

        other = make_store(event_store_id="OTHER")
        grouped = store.group_event(appeared())
        foreign = other.group_event(appeared("x"))
        foreign = type(foreign)(
            event=foreign.event,
            event_storage_adapter=object(),  # type: ignore[arg-type]
            context=foreign.context,
            event_store=other,
        )
        with pytest.raises(EventGroupError, match="#1"):
            await EventStore.push_event_group(grouped, foreign)
        assert (await store.get_events("pikachu")).events == []
        assert Other  # subclasses of the in-memory adapter are accepted by isinstance

    async def test_failed_group_leaves_no_empty_aggregate(self) -> None:
        """After a failed group, listing works and lists no phantom aggregate (B36)."""
        store = make_store()
        await store.push_event(appeared("taken"))
        with pytest.raises(EventAlreadyExistsError):
            await EventStore.push_event_group(
                store.group_event(appeared("fresh")), store.group_event(appeared("taken"))
            )
        listed = await store.list_aggregate_ids()
        assert [e.aggregate_id for e in listed.aggregate_ids] == ["taken"]


class TestSimulateAggregate:
    def test_simulation_sorts_by_time_renumbers_and_cuts_at_date(self) -> None:
        """Events are filtered by date, sorted by timestamp and renumbered (B119)."""
        store = make_store()
        events = [
            appeared(timestamp="2020-01-01T00:00:00.000Z", payload={"name": "Pikachu", "level": 1}),
            {"aggregateId": "pikachu", "version": 2, "type": "POKEMON_LEVELED_UP",
             "timestamp": "2022-01-01T00:00:00.000Z"},
            {"aggregateId": "pikachu", "version": 3, "type": "POKEMON_CAUGHT",
             "timestamp": "2021-01-01T00:00:00.000Z"},
        ]  # fmt: skip
        simulated = store.simulate_aggregate(events, simulation_date="2021-06-01T00:00:00.000Z")
        assert simulated is not None
        assert (simulated.version, simulated.status, simulated.level) == (2, "caught", 1)
        full = store.simulate_aggregate(events)
        assert full is not None
        assert (full.version, full.status, full.level) == (3, "caught", 2)

    def test_same_version_later_event_wins(self) -> None:
        """With the default side effect a later event with the same version replaces one."""
        store = make_store()
        first = appeared(timestamp="2020-01-01T00:00:00.000Z")
        second = appeared(
            timestamp="2020-01-02T00:00:00.000Z", payload={"name": "Raichu", "level": 30}
        )
        simulated = store.simulate_aggregate([first, second])
        assert simulated is not None
        assert (simulated.name, simulated.version) == ("Raichu", 1)

    def test_events_of_one_timestamp_fold_in_version_order(self) -> None:
        """Events sharing a timestamp (a group's) fold in version order, as Castore's index
        lists them, not in the order given: newest-first input used to fold backwards."""
        folded: list[str] = []

        def recording(pokemon: Pokemon | None, event: Any) -> Pokemon:
            folded.append(event.type)
            return reduce_pokemon(pokemon, event)

        store = EventStore(
            event_store_id="POKEMONS",
            event_types=[PokemonAppeared, PokemonCaught, PokemonLeveledUp],
            reducer=recording,
        )
        same = "2021-01-01T00:00:00.000Z"
        events = [
            {"aggregateId": "pikachu", "version": 3, "type": "POKEMON_CAUGHT", "timestamp": same},
            {"aggregateId": "pikachu", "version": 2, "type": "POKEMON_LEVELED_UP",
             "timestamp": same},
            appeared(timestamp="2020-01-01T00:00:00.000Z"),
        ]  # fmt: skip
        simulated = store.simulate_aggregate(events)
        assert simulated is not None
        assert folded == ["POKEMON_APPEARED", "POKEMON_LEVELED_UP", "POKEMON_CAUGHT"]

    async def test_limits_of_pushes_do_not_apply_to_simulated_events(self) -> None:
        """Events stored under larger limits (another writer, an older deployment) are read
        and folded, but simulate_aggregate refused them with EventLimitExceededError: it
        checked them as pushes."""
        seeded = appeared(metadata={"note": "p" * 2000})
        store = EventStore(
            event_store_id="POKEMONS",
            event_types=[PokemonAppeared, PokemonCaught, PokemonLeveledUp],
            reducer=reduce_pokemon,
            event_storage_adapter=InMemoryEventStorageAdapter(
                initial_events={"POKEMONS": [seeded]}
            ),
            limits=EventLimits(max_bytes=1024),
        )
        with pytest.raises(EventLimitExceededError):
            await store.push_event({**seeded, "aggregateId": "other"})
        events = (await store.get_events("pikachu")).events
        for given in (events, [seeded], [json.dumps(seeded)]):
            simulated = store.simulate_aggregate(given)
            assert simulated is not None
            assert simulated.name == "Pikachu"

    def test_empty_simulation_is_none(self) -> None:
        """No events simulate to no aggregate."""
        assert make_store().simulate_aggregate([]) is None


class TestValidatorCache:
    """Event stores of the same event types share their union validators, a bounded few."""

    def test_stores_of_the_same_types_share_validators_and_the_cache_is_bounded(self) -> None:
        from castore_pydantic import _serialization

        def fresh_type(name: str) -> type[Event]:
            annotations = {"type": Literal[name]}  # type: ignore[valid-type]
            return type(name, (Event,), {"__annotations__": annotations, "type": name})

        first, second = fresh_type("FIRST"), fresh_type("SECOND")
        one = EventStore(event_store_id="A", event_types=[first, second], reducer=lambda a, e: a)
        two = EventStore(event_store_id="B", event_types=[first, second], reducer=lambda a, e: a)
        assert one.context._many is two.context._many
        other = EventStore(event_store_id="C", event_types=[first], reducer=lambda a, e: a)
        assert other.context._many is not one.context._many
        for index in range(_serialization._ADAPTERS_KEPT + 5):
            EventStore(
                event_store_id="D", event_types=[fresh_type(f"T{index}")], reducer=lambda a, e: a
            )
        assert len(_serialization._ADAPTERS) == _serialization._ADAPTERS_KEPT
        # Evicted validators are built again: the store still validates.
        again = EventStore(event_store_id="E", event_types=[first], reducer=lambda a, e: a)
        assert again.context.validate_input({"aggregateId": "x", "version": 1, "type": "FIRST"})
