"""Hostile input at the boundaries: every case is a clear error and nothing is written."""

from __future__ import annotations

import collections
import dataclasses
import enum
import json
import threading
from collections.abc import Sequence
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal

import pytest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    RootModel,
    ValidationError,
    create_model,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from castore_pydantic import CastoreError, Command, Event, EventLimits, EventStore
from castore_pydantic.errors import EventLimitExceededError, UnknownEventTypeError
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
from tests.domain import PokemonAppeared, PokemonCaught, appeared, reduce_pokemon


class NoteAdded(Event):
    """Free-form payload and metadata: the limits, not the model, must stop abuse."""

    type: Literal["NOTE_ADDED"] = "NOTE_ADDED"
    payload: Any = None
    metadata: Any = None


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def make_store(limits: EventLimits | None = None) -> EventStore[Any, Any]:
    return EventStore(
        event_store_id="HOSTILE",
        event_types=[PokemonAppeared, PokemonCaught, NoteAdded],
        reducer=reduce_pokemon,
        event_storage_adapter=InMemoryEventStorageAdapter(),
        limits=limits,
    )


def note(payload: Any = None, **fields: Any) -> dict[str, Any]:
    return {"aggregateId": "n1", "version": 1, "type": "NOTE_ADDED", "payload": payload, **fields}


TEN_MB = "x" * (10 * 1024 * 1024)

HOSTILE: list[tuple[str, object]] = [
    ("an int", 42),
    ("a list", [appeared()]),
    ("None", None),
    ("an arbitrary object", object()),
    ("unknown type", {"aggregateId": "n1", "version": 1, "type": "DROP_TABLE"}),
    ("type of the wrong kind", {"aggregateId": "n1", "version": 1, "type": 7}),
    ("missing aggregate id", {"version": 1, "type": "NOTE_ADDED"}),
    ("missing version", {"aggregateId": "n1", "type": "NOTE_ADDED"}),
    ("missing type", {"aggregateId": "n1", "version": 1}),
    ("version zero", note(version=0)),
    ("version as text", {**note(), "version": "one"}),
    ("aggregate id as a dict", {**note(), "aggregateId": {"$ne": None}}),
    ("extra top-level field", note(colour="red")),
    ("extra payload field where forbidden", appeared(payload={"name": "P", "level": 3, "x": 1})),
    ("payload out of range", appeared(payload={"name": "P", "level": 1000})),
    ("10,000 nested levels", note(nested(10_000))),
    ("10,000 nested levels in metadata", note(None, metadata=nested(10_000))),
    ("10 MB string in a free payload", note({"text": TEN_MB})),
    ("10 MB string in a bounded field", appeared(payload={"name": TEN_MB, "level": 3})),
    ("NaN", note({"value": float("nan")})),
    ("infinity", note([float("inf")])),
    ("NaN in an int field", appeared(payload={"name": "P", "level": float("nan")})),
    ("lone surrogate", note({"text": "\ud800"})),
    ("lone surrogate as a key", note({"\udfff": 1})),
    ("NUL in payload", note({"text": "a\u0000b"})),
    ("NUL in aggregate id", {**note(), "aggregateId": "n\u00001"}),
    ("naive timestamp", note(timestamp="2024-01-01T00:00:00")),
    ("garbage timestamp", note(timestamp="yesterday")),
    ("JSON text: not JSON", "{not json"),
    ("JSON text: 10,000 nested levels", '{"a":' * 10_000),
    ("JSON text: 10 MB", json.dumps(note({"text": TEN_MB}))),
    ("JSON text: NaN literal",
     '{"aggregateId":"n1","version":1,"type":"NOTE_ADDED","payload":NaN}'),
    ("JSON text: lone surrogate escape",
     '{"aggregateId":"n1","version":1,"type":"NOTE_ADDED","payload":"\\ud800"}'),
    ("JSON text: NUL escape",
     '{"aggregateId":"n1","version":1,"type":"NOTE_ADDED","payload":"\\u0000"}'),
    ("JSON text: unknown type", '{"aggregateId":"n1","version":1,"type":"NOPE"}'),
    ("JSON text: a list", "[1, 2, 3]"),
    ("bytes: invalid UTF-8", b"\xff\xfe\xfd"),
    ("timestamp before year 1 in UTC", note(timestamp="0001-01-01T00:00:00+05:00")),
    ("timestamp after 9999 in UTC", json.dumps(note(timestamp="9999-12-31T23:59:59-05:00"))),
]  # fmt: skip


def _deeply_nested_json() -> str:
    return json.dumps(note(None))[:-1] + ',"metadata":' + '{"a":' * 10_000 + "1" + "}" * 10_001


class TestPushEventRefusesHostileInput:
    @pytest.mark.parametrize(("name", "given"), HOSTILE, ids=[name for name, _ in HOSTILE])
    async def test_refused_with_a_clear_error_and_nothing_written(
        self, name: str, given: object
    ) -> None:
        """Hostile input raises ValidationError or a CastoreError and stores nothing."""
        store = make_store()
        with pytest.raises((ValidationError, CastoreError)) as info:
            await store.push_event(given)  # type: ignore[arg-type]
        assert not isinstance(info.value, RecursionError)
        assert str(info.value)
        for aggregate_id in ("n1", "pikachu", "n\x001"):
            assert (await store.get_events(aggregate_id)).events == []
        assert (await store.list_aggregate_ids()).aggregate_ids == []

    async def test_deeply_nested_valid_json_text_is_refused(self) -> None:
        """Balanced JSON nested 10,000 levels deep is refused without a RecursionError."""
        store = make_store()
        with pytest.raises((ValidationError, CastoreError)):
            await store.push_event(_deeply_nested_json())
        assert (await store.get_events("n1")).events == []

    async def test_unknown_type_error_is_specific(self) -> None:
        """An unknown type is an UnknownEventTypeError, not a generic validation error."""
        with pytest.raises(UnknownEventTypeError):
            await make_store().push_event({"aggregateId": "n1", "version": 1, "type": "NOPE"})

    async def test_limit_errors_say_where(self) -> None:
        """Limit errors carry the path of the offending value."""
        with pytest.raises(EventLimitExceededError) as info:
            await make_store().push_event(note({"items": [1, 2, {"text": "\x00"}]}))
        assert info.value.path == ("payload", "items", 2, "text")
        assert "payload.items.2.text" in str(info.value)

    async def test_group_event_applies_the_same_limits(self) -> None:
        """group_event refuses hostile events too, so a group never carries them."""
        store = make_store()
        with pytest.raises(EventLimitExceededError):
            store.group_event(note(nested(1_000)))


class TestLimitsAreConfigurable:
    async def test_default_depth_allows_reasonable_nesting(self) -> None:
        """Nesting up to the default limit (64) is accepted; one more is refused."""
        store = make_store()
        await store.push_event(note(nested(63)))
        with pytest.raises(EventLimitExceededError, match="max_depth=64"):
            await store.push_event(note(nested(64), aggregateId="n2"))

    async def test_custom_limits_apply_per_store(self) -> None:
        """A store's own limits replace the defaults."""
        strict = make_store(EventLimits(max_depth=2, max_bytes=200))
        with pytest.raises(EventLimitExceededError, match="max_depth=2"):
            await strict.push_event(note(nested(2)))
        with pytest.raises(EventLimitExceededError, match="max_bytes=200"):
            await strict.push_event(note({"text": "x" * 300}))
        relaxed = make_store(EventLimits(max_depth=198, max_bytes=20 * 1024 * 1024))
        await relaxed.push_event(note({"text": TEN_MB, "deep": nested(196)}))
        (stored,) = (await relaxed.get_events("n1")).events
        assert stored.payload["text"] == TEN_MB

    async def test_the_deepest_allowed_payload_reads_back_from_json(self, tmp_path: Any) -> None:
        """At the highest max_depth allowed, the deepest payload is stored as JSON (SQLite)
        and read back; a higher max_depth is refused (Pydantic's JSON parser stops at about
        200 levels)."""
        adapter = SQLiteEventStorageAdapter(tmp_path / "deep.db")
        store = make_store(EventLimits(max_depth=198))
        store.event_storage_adapter = adapter
        async with adapter:
            await store.push_event(note(nested(197)))
            with pytest.raises(EventLimitExceededError, match="max_depth=198"):
                await store.push_event(note(nested(198), aggregateId="n2"))
            (stored,) = (await store.get_events("n1")).events
            assert stored.payload == nested(197)
        with pytest.raises(ValueError, match="at most 198"):
            EventLimits(max_depth=199)

    def test_limits_must_be_sane(self) -> None:
        """Nonsensical limits are refused."""
        with pytest.raises(ValueError, match="max_depth"):
            EventLimits(max_depth=0)
        with pytest.raises(ValueError, match="max_bytes"):
            EventLimits(max_bytes=1)


@dataclasses.dataclass
class Reading:
    value: float
    label: str
    raw: bytes = b""
    child: Reading | None = None


class Measured(Event):
    """Payload values the limit scans do not walk as JSON types: dataclasses, deques, ints."""

    type: Literal["MEASURED"] = "MEASURED"
    payload: Reading | collections.deque[float] | Decimal | int


def measured_store(limits: EventLimits | None = None) -> EventStore[Any, Any]:
    return EventStore(
        event_store_id="MEASURES",
        event_types=[Measured, NoteAdded],
        reducer=reduce_pokemon,
        event_storage_adapter=InMemoryEventStorageAdapter(),
        limits=limits,
    )


def chain(depth: int) -> Reading:
    reading = Reading(1.0, "leaf")
    for _ in range(depth):
        reading = Reading(1.0, "link", child=reading)
    return reading


class Streamed(Event):
    type: Literal["STREAMED"] = "STREAMED"
    payload: Any = None


def note_of(event_type: type[Event], payload: Any) -> Event:
    return event_type(aggregate_id="s1", version=1, payload=payload)


class Point:
    """A type of the author's, written by a serializer of theirs."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


@dataclasses.dataclass
class PointHolder:
    point: Annotated[Any, PlainSerializer(lambda p: f"{p.x},{p.y}" if isinstance(p, Point) else p)]
    raw: bytes
    ORIGIN: ClassVar[Point] = Point(0, 0)


class Pointed(Event):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
    type: Literal["POINTED"] = "POINTED"
    payload: PointHolder


class Status(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Sku(RootModel[str]):
    pass


class Cached(BaseModel):
    name: str
    rendered: str = Field("", exclude=True)


@pydantic_dataclass
class Line:
    quantity_ordered: int = Field(alias="q")


class Perm(enum.IntFlag):
    READ = 1
    WRITE = 2


HUGE_INT = 10**4300  # 4,301 digits: pydantic-core's JSON parser reads at most 4,300 back

OTHER_KINDS: list[tuple[str, object, tuple[str | int, ...], str]] = [
    ("NaN in a dataclass", Reading(float("nan"), "x"), ("payload", "value"), "not a JSON number"),
    ("infinity in a deque", collections.deque([1.0, float("inf")]), ("payload", 1),
     "not a JSON number"),
    ("NUL in a dataclass string", Reading(1.0, "a\x00b"), ("payload", "label"), "NUL"),
    ("a long string in a dataclass", Reading(1.0, "x" * 20_000), ("payload", "label"),
     "max_bytes=10000"),
    ("a Decimal of 20,000 digits", Decimal("9" * 20_000), ("payload",), "max_bytes=10000"),
    ("dataclasses nested too deep", chain(70), ("payload", *["child"] * 64), "max_depth=64"),
    ("a typed int JSON cannot read back", HUGE_INT, ("payload",), "4301 digits"),
]  # fmt: skip


class TestOtherKindsOfValuesAreChecked:
    """Values the scan does not know (dataclasses, deques, Decimals) are checked in their JSON
    form, and long integers by their digits: none is stored only to fail every read."""

    @pytest.mark.parametrize(
        ("name", "payload", "path", "message"), OTHER_KINDS, ids=[c[0] for c in OTHER_KINDS]
    )
    async def test_refused_where_it_breaks_a_limit(
        self, name: str, payload: object, path: tuple[str | int, ...], message: str
    ) -> None:
        """Each is an EventLimitExceededError naming the value; nothing is written."""
        store = measured_store(EventLimits(max_bytes=10_000))
        with pytest.raises(EventLimitExceededError, match=message) as info:
            await store.push_event(Measured(aggregate_id="m1", version=1, payload=payload))
        assert info.value.path == path
        assert (await store.get_events("m1")).events == []

    async def test_a_long_integer_in_a_free_payload_is_refused(self) -> None:
        """An untyped payload's integer is measured too, also when given as a dict."""
        store = measured_store()
        with pytest.raises(EventLimitExceededError, match="4301 digits") as info:
            await store.push_event(note({"n": [1, -HUGE_INT]}))
        assert info.value.path == ("payload", "n", 1)
        with pytest.raises(EventLimitExceededError, match="max_bytes=1000"):
            await measured_store(EventLimits(max_bytes=1000)).push_event(note(10**2000))
        assert (await store.get_events("n1")).events == []

    @pytest.mark.parametrize("form", ["dict", "json"])
    async def test_keys_count_towards_the_size(self, form: str) -> None:
        """An event's size is its JSON's, keys included: one whose long keys pass max_bytes
        was accepted (only values were counted), and its exported line was then refused by
        castore import."""
        keys = {f"{index:03d}" + "k" * 60: 1 for index in range(200)}  # ~13 kB of keys
        store = measured_store(EventLimits(max_bytes=10_000))
        event = note(keys)
        with pytest.raises(EventLimitExceededError, match="max_bytes=10000"):
            await store.push_event(json.dumps(event) if form == "json" else event)
        fewer = dict(list(keys.items())[:100])  # ~6.6 kB: within the limit
        await store.push_event(note(fewer))
        (stored,) = (await store.get_events("n1")).events
        assert stored.payload == fewer

    async def test_the_size_is_close_to_the_json_s(self) -> None:
        """Small numbers, flags and aliased keys are counted at about their JSON width: a
        model of 200 small ints at 88% of max_bytes was refused once keys were counted, a
        Flag value was walked as a collection (it iterates to itself) until it was "nested
        too deep", and a long alias passed as its short field name."""
        many = create_model("Many", **{f"f{i:03d}": (int, 0) for i in range(200)})  # type: ignore[call-overload]
        wide = create_model(
            "Wide",
            value=(int, Field(0, serialization_alias="v" * 3000, validation_alias="v" * 3000)),
        )
        kinds = create_model("Kinds", perms=(Perm, Perm.READ), n=(int, 0))

        def event_of(payload_type: Any, name: str) -> type[Event]:
            return create_model(  # type: ignore[call-overload, no-any-return]
                name, __base__=Event, type=(Literal[name], name), payload=(payload_type, ...)
            )

        counted, aliased, flagged = (
            event_of(many, "MANY"),
            event_of(wide, "WIDE"),
            event_of(kinds, "KINDS"),
        )
        store = EventStore(
            event_store_id="SIZES",
            event_types=[counted, aliased, flagged],
            reducer=reduce_pokemon,
            event_storage_adapter=InMemoryEventStorageAdapter(),
            limits=EventLimits(max_bytes=2000),
        )
        fits = counted(aggregate_id="m", version=1, payload=many())
        assert len(fits.model_dump_json()) > 1700
        await store.push_event(fits)
        await store.push_event(flagged(aggregate_id="f", version=1, payload=kinds(perms=Perm(3))))
        with pytest.raises(EventLimitExceededError, match="max_bytes=2000"):
            await store.push_event(aliased(aggregate_id="w", version=1, payload=wide()))
        assert (await store.get_events("w")).events == []
        (stored,) = (await store.get_events("f")).events
        assert stored.payload.perms == Perm(3)

    @pytest.mark.parametrize(
        ("payload_type", "payload"),
        [
            (list[Status], [Status.OPEN] * 300),
            (list[float], [1.5] * 520),
            (list[Sku], [Sku("A1")] * 400),
            (Cached, Cached(name="x", rendered="y" * 5000)),
            (list[Line], [Line(q=1)] * 250),
        ],
        ids=["enum members", "floats", "root models", "excluded field", "dataclass aliases"],
    )
    async def test_values_are_counted_as_written(self, payload_type: Any, payload: Any) -> None:
        """Events at about half of max_bytes were refused: enum members and floats counted
        more than their JSON, a RootModel as a dict with a "root" key, a field excluded from
        dumps as if written, a Pydantic dataclass's keys by name instead of alias."""
        event_type = create_model(
            "Sized", __base__=Event, type=(Literal["SIZED"], "SIZED"), payload=(payload_type, ...)
        )
        event = event_type(aggregate_id="s", version=1, payload=payload)
        assert len(event.model_dump_json()) < 2300
        store = EventStore(
            event_store_id="SIZED",
            event_types=[event_type],
            reducer=reduce_pokemon,
            event_storage_adapter=InMemoryEventStorageAdapter(),
            limits=EventLimits(max_bytes=4096),
        )
        await store.push_event(event)
        assert len((await store.get_events("s")).events) == 1

    async def test_keys_that_are_not_strings_count_as_their_text(self) -> None:
        """A dict keyed by integers is written with the integers as text keys; they counted
        nothing, so such an event could pass max_bytes many times over."""
        store = measured_store(EventLimits(max_bytes=10_000))
        keys = {10**18 + index: 0 for index in range(500)}  # ~12 kB of JSON
        with pytest.raises(EventLimitExceededError, match="max_bytes=10000"):
            await store.push_event(note(keys))
        with pytest.raises(EventLimitExceededError, match="4302 digits"):  # not a ValueError
            await store.push_event(note({10**4301: 1}))
        assert (await store.get_events("n1")).events == []

    def test_shared_values_cost_no_more_than_the_limit(self) -> None:
        """A list holding one list twice, nested 40 levels, is a few hundred bytes of Python
        but 2**40 values of JSON: the size scan visited every one of them (20 levels took a
        second, each more level doubled it). It now stops at max_bytes and refuses it. A
        guard, not a speed test: past a minute the scan would be running for days."""
        shared: Any = [1]
        for _ in range(40):
            shared = [shared, shared]
        store = measured_store()
        outcome: list[BaseException] = []

        def push() -> None:
            try:
                store.context.validate_input(note(shared))
            except BaseException as exc:  # handed to the test's thread
                outcome.append(exc)

        worker = threading.Thread(target=push, daemon=True)
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "the size scan walked every shared value"
        (error,) = outcome
        assert isinstance(error, EventLimitExceededError)
        assert "max_bytes" in str(error)

    async def test_extra_keys_are_checked_as_strings(self) -> None:
        """A model allowing extra keys had its extra keys' NUL characters let through."""
        open_model = create_model("Open", __config__=ConfigDict(extra="allow"), n=(int, 0))
        event_type = create_model(
            "Opened", __base__=Event, type=(Literal["OPEN"], "OPEN"), payload=(open_model, ...)
        )
        store = EventStore(
            event_store_id="OPEN",
            event_types=[event_type],
            reducer=reduce_pokemon,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        with pytest.raises(EventLimitExceededError, match="NUL"):
            await store.push_event({**note(), "type": "OPEN", "payload": {"a\x00b": 1}})
        assert (await store.get_events("n1")).events == []

    async def test_values_the_scan_cannot_walk_are_stored_whole(self) -> None:
        """One-shot iterators are not consumed by the limits check (a generator payload was
        stored empty), a type written by its own serializer and base64 bytes holding NUL are
        not refused (the check converted them without the model's serializers), and a class
        variable of a dataclass is no field of its."""
        store = EventStore(
            event_store_id="WHOLE",
            event_types=[Streamed, Pointed],
            reducer=reduce_pokemon,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        payload = {"ids": (i for i in (1, 2, 3)), "names": map(str, (1, 2))}
        await store.push_event(note_of(Streamed, payload))
        (stored,) = (await store.get_events("s1")).events
        assert stored.payload == {"ids": [1, 2, 3], "names": ["1", "2"]}
        pointed = Pointed(aggregate_id="p1", version=1, payload=PointHolder(Point(1, 2), b"\x00"))
        await store.push_event(pointed)
        (back,) = (await store.get_events("p1")).events
        assert back.payload.raw == b"\x00"
        assert back.payload.point == "1,2"

    async def test_values_within_the_limits_read_back(self, tmp_path: Any) -> None:
        """The longest integer JSON reads back, and dataclasses within the limits, are stored
        and read back equal (SQLite: as JSON text)."""
        store = measured_store()
        adapter = SQLiteEventStorageAdapter(tmp_path / "kinds.db")
        store.event_storage_adapter = adapter
        longest = -(HUGE_INT - 1)  # 4,300 digits
        payloads: list[object] = [longest, chain(60), collections.deque([1.5, 2.5])]
        async with adapter:
            for index, payload in enumerate(payloads):
                event = Measured(aggregate_id=f"m{index}", version=1, payload=payload)
                await store.push_event(event)
                (stored,) = (await store.get_events(f"m{index}")).events
                assert stored.payload == payload
            await store.push_event(note({"n": longest}))
            (stored,) = (await store.get_events("n1")).events
            assert stored.payload == {"n": longest}


class NoteInput(BaseModel):
    aggregate_id: str
    data: Any = None


class TestCommandHandlerRefusesHostileInput:
    @staticmethod
    def command(store: EventStore[Any, Any], calls: list[Any]) -> Command[NoteInput, None]:
        async def handler(data: NoteInput, stores: Sequence[EventStore[Any, Any]]) -> None:
            calls.append(data)
            await stores[0].push_event(note(data.data, aggregateId=data.aggregate_id))

        return Command(
            command_id="ADD_NOTE",
            required_event_stores=[store],
            handler=handler,
            input_schema=NoteInput,
        )

    @pytest.mark.parametrize(
        "given",
        [
            42,
            None,
            [],
            "{broken",
            '{"aggregate_id": "n1", "data": ' + "[" * 10_000 + "]" * 10_000 + "}",
            {"data": 1},
            {"aggregate_id": ["n1"]},
            b"\xff",
        ],
    )
    async def test_invalid_input_never_runs_the_handler(self, given: object) -> None:
        """Input that cannot be a NoteInput raises ValidationError; the handler never runs."""
        store = make_store()
        calls: list[Any] = []
        with pytest.raises(ValidationError):
            await self.command(store, calls).handler(given, [store])
        assert calls == []
        assert (await store.list_aggregate_ids()).aggregate_ids == []

    @pytest.mark.parametrize(
        "data",
        [nested(10_000), {"text": TEN_MB}, float("nan"), "\x00", ["\udc00"]],
        ids=["deep", "10MB", "NaN", "NUL", "surrogate"],
    )
    async def test_hostile_payload_is_stopped_at_the_store(self, data: Any) -> None:
        """Valid command input carrying hostile data is refused by the store; nothing stored."""
        store = make_store()
        calls: list[Any] = []
        with pytest.raises(EventLimitExceededError):
            await self.command(store, calls).handler({"aggregate_id": "n1", "data": data}, [store])
        assert len(calls) == 1
        assert (await store.get_events("n1")).events == []
