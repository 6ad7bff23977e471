from __future__ import annotations

import dataclasses
import json
import re
import zoneinfo
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Literal, NewType
from uuid import UUID

import pytest
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    Json,
    PlainSerializer,
    PositiveInt,
    PrivateAttr,
    SecretBytes,
    SecretStr,
    ValidationError,
    computed_field,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic import Secret as PydanticSecret
from pydantic.alias_generators import to_camel
from pydantic.dataclasses import dataclass as pydantic_dataclass
from typing_extensions import TypedDict

from castore_pydantic import Aggregate, Event, EventStore
from castore_pydantic._event import Timestamp, with_timestamp
from castore_pydantic.errors import EventLimitExceededError, UnknownEventTypeError
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
from tests.domain import Appeared, Pokemon, PokemonAppeared, PokemonCaught


class TestEventJson:
    def test_json_uses_castore_keys_and_millisecond_timestamp(self) -> None:
        """Events serialise with camelCase keys and a ...000Z timestamp."""
        event = PokemonAppeared(
            aggregate_id="p1",
            version=1,
            timestamp=datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
            payload=Appeared(name="Pikachu", level=3),
        )
        assert json.loads(event.model_dump_json()) == {
            "aggregateId": "p1",
            "version": 1,
            "timestamp": "2024-01-02T03:04:05.678Z",
            "type": "POKEMON_APPEARED",
            "payload": {"name": "Pikachu", "level": 3},
        }

    def test_absent_payload_and_metadata_are_left_out(self) -> None:
        """payload and metadata keys are absent, not null, when the event has none."""
        event = PokemonCaught(aggregate_id="p1", version=2)
        dumped = event.model_dump(mode="json")
        assert "payload" not in dumped
        assert "metadata" not in dumped

    def test_a_required_payload_keeps_its_key_when_none(self) -> None:
        """An event type whose payload may be None but has no default keeps "payload": null
        in its JSON: without the key, its own JSON failed to validate (as in a message)."""

        class Maybe(Event):
            type: Literal["MAYBE"] = "MAYBE"
            payload: int | None
            metadata: dict[str, str] | None

        event = Maybe(aggregate_id="a", version=1, payload=None, metadata=None)
        text = event.model_dump_json()
        assert json.loads(text) == {
            "aggregateId": "a", "version": 1, "type": "MAYBE", "payload": None, "metadata": None
        }  # fmt: skip
        assert Maybe.model_validate_json(text) == event
        assert "payload" not in PokemonCaught(aggregate_id="p1", version=2).model_dump()

    async def test_a_none_payload_whose_default_is_not_none_keeps_its_key(self) -> None:
        """With a default other than None, a payload or metadata set to None left the JSON
        without the key, which then read back as the default: an exported and imported
        event, or a message, came back changed."""

        class Counted(BaseModel):
            count: int = 1

        class Defaulted(Event):
            type: Literal["DEFAULTED"] = "DEFAULTED"
            payload: Counted | None = Counted()
            metadata: dict[str, str] | None = Field(default_factory=lambda: {"source": "app"})

        event = Defaulted(aggregate_id="a", version=1, payload=None, metadata=None)
        text = event.model_dump_json()
        assert json.loads(text) == {
            "aggregateId": "a", "version": 1, "type": "DEFAULTED", "payload": None, "metadata": None
        }  # fmt: skip
        assert Defaulted.model_validate_json(text) == event
        async with SQLiteEventStorageAdapter(":memory:") as adapter:
            for storage in (adapter, InMemoryEventStorageAdapter()):
                store = EventStore(
                    event_store_id="S", event_types=[Defaulted], reducer=lambda a, e: a,
                    event_storage_adapter=storage,
                )  # fmt: skip
                await store.push_event(text)
                (read,) = (await store.get_events("a")).events
                assert (read.payload, read.metadata) == (None, None)
                assert Defaulted.model_validate_json(read.model_dump_json()) == read
        kept = Defaulted(aggregate_id="a", version=1)
        assert Defaulted.model_validate_json(kept.model_dump_json()) == kept

    def test_both_key_spellings_are_accepted(self) -> None:
        """aggregateId and aggregate_id both validate to the same event."""
        camel = PokemonCaught.model_validate({"aggregateId": "p1", "version": 2})
        snake = PokemonCaught.model_validate({"aggregate_id": "p1", "version": 2})
        assert camel == snake

    def test_json_round_trip_is_exact(self) -> None:
        """Parsing the JSON form gives back an equal event."""
        event = PokemonAppeared(
            aggregate_id="p1",
            version=1,
            timestamp=datetime(2024, 1, 1, tzinfo=UTC),
            payload=Appeared(name="Pikachu", level=3),
            metadata={"trigger": "random"},
        )
        assert PokemonAppeared.model_validate_json(event.model_dump_json()) == event

    def test_unknown_top_level_keys_are_refused(self) -> None:
        """Extra top-level keys are an error, so no data is silently dropped."""
        with pytest.raises(ValidationError):
            PokemonCaught.model_validate({"aggregateId": "p1", "version": 2, "colour": "red"})

    def test_events_are_immutable(self) -> None:
        """Events cannot be modified after creation."""
        event = PokemonCaught(aggregate_id="p1", version=2)
        with pytest.raises(ValidationError):
            event.version = 3  # type: ignore[misc]

    @pytest.mark.parametrize("version", [0, -1])
    def test_version_starts_at_one(self, version: int) -> None:
        """A version below 1 is invalid."""
        with pytest.raises(ValidationError):
            PokemonCaught(aggregate_id="p1", version=version)


def caught_store() -> EventStore[Any, Any]:
    return EventStore(
        event_store_id="S",
        event_types=[PokemonCaught],
        reducer=lambda aggregate, event: aggregate,
        event_storage_adapter=InMemoryEventStorageAdapter(),
    )


class TestTimestamp:
    async def test_sub_millisecond_precision_is_truncated_when_pushed(self) -> None:
        """Microseconds are truncated to milliseconds so every backend round-trips them."""
        event = PokemonCaught(
            aggregate_id="p1", version=2, timestamp=datetime(2024, 1, 1, 0, 0, 0, 123999, UTC)
        )
        assert event.model_dump(mode="json")["timestamp"] == "2024-01-01T00:00:00.123Z"
        stored = (await caught_store().push_event(event)).event
        assert stored.timestamp == datetime(2024, 1, 1, 0, 0, 0, 123000, UTC)

    async def test_offsets_are_normalised_to_utc(self) -> None:
        """A timestamp with another offset is written and stored in UTC."""
        plus_two = timezone(timedelta(hours=2))
        event = PokemonCaught(
            aggregate_id="p1", version=2, timestamp=datetime(2024, 1, 1, 2, 0, tzinfo=plus_two)
        )
        assert event.model_dump(mode="json")["timestamp"] == "2024-01-01T00:00:00.000Z"
        stored = (await caught_store().push_event(event)).event
        assert stored.timestamp == datetime(2024, 1, 1, 0, 0, tzinfo=UTC)
        assert stored.timestamp is not None
        assert stored.timestamp.utcoffset() == timedelta(0)

    async def test_mapping_input_is_normalised_too(self) -> None:
        """Offsets and microseconds given in a mapping are normalised by the store."""
        given = {"aggregateId": "p1", "version": 2, "type": "POKEMON_CAUGHT",
                 "timestamp": "2024-01-01T02:00:00.123456+02:00"}  # fmt: skip
        stored = (await caught_store().push_event(given)).event
        assert stored.timestamp == datetime(2024, 1, 1, 0, 0, 0, 123000, UTC)

    @pytest.mark.parametrize(
        ("moment", "text"),
        [
            (datetime(999, 1, 2, 3, 4, 5, 6000, UTC), "0999-01-02T03:04:05.006Z"),
            (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000Z"),
            (datetime(9999, 12, 31, 23, 59, 59, 999000, UTC), "9999-12-31T23:59:59.999Z"),
        ],
    )
    def test_formatting_pads_every_field(self, moment: datetime, text: str) -> None:
        """Timestamps always render as 24 characters, so they sort as text."""
        event = PokemonCaught(aggregate_id="p1", version=2, timestamp=moment)
        assert event.model_dump(mode="json")["timestamp"] == text
        assert PokemonCaught.model_validate_json(event.model_dump_json()) == event

    def test_iso_strings_with_z_are_accepted(self) -> None:
        """Castore's string form parses."""
        event = PokemonCaught.model_validate(
            {"aggregateId": "p1", "version": 2, "timestamp": "2024-01-01T00:00:00.500Z"}
        )
        assert event.timestamp == datetime(2024, 1, 1, 0, 0, 0, 500000, UTC)

    def test_naive_timestamps_are_refused(self) -> None:
        """A timestamp without a zone is ambiguous and refused."""
        with pytest.raises(ValidationError, match="timezone_aware"):
            PokemonCaught(aggregate_id="p1", version=2, timestamp=datetime(2024, 1, 1))

    async def test_seeded_mappings_read_back_normalised(self) -> None:
        """Stored mappings with offsets and microseconds are read back in UTC milliseconds."""
        seeded = {"aggregateId": "p1", "version": 2, "type": "POKEMON_CAUGHT",
                  "timestamp": "2024-01-01T02:00:00.123456+02:00"}  # fmt: skip
        store = caught_store()
        store.event_storage_adapter = InMemoryEventStorageAdapter(initial_events={"S": [seeded]})
        (event,) = (await store.get_events("p1")).events
        assert event.timestamp == datetime(2024, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
        assert event.timestamp is not None
        assert event.timestamp.utcoffset() == timedelta(0)

    async def test_seeded_mappings_with_a_null_timestamp_get_the_creation_time(self) -> None:
        """``"timestamp": None`` in a seeded mapping is a missing timestamp: the adapter's
        creation time (reading and listing used to find None, and listing failed)."""
        seeded = {"aggregateId": "p1", "version": 1, "type": "POKEMON_CAUGHT", "timestamp": None}
        store = caught_store()
        before = datetime.now(UTC) - timedelta(milliseconds=1)
        store.event_storage_adapter = InMemoryEventStorageAdapter(initial_events={"S": [seeded]})
        (event,) = (await store.get_events("p1")).events
        assert event.timestamp is not None
        assert event.timestamp >= before
        (entry,) = (await store.list_aggregate_ids()).aggregate_ids
        assert entry.initial_event_timestamp == event.timestamp

    @pytest.mark.parametrize("given", ["dict", "instance"])
    async def test_a_zone_at_offset_zero_is_still_converted_to_utc(self, given: str) -> None:
        """London in winter has offset zero but daylight saving time: a pushed timestamp
        there is stored in UTC, like any other zone (it used to keep the zone)."""
        winter = datetime(2024, 1, 15, 12, 0, tzinfo=zoneinfo.ZoneInfo("Europe/London"))
        store = caught_store()
        store.event_storage_adapter = InMemoryEventStorageAdapter()
        data = {"aggregateId": "p1", "version": 2, "type": "POKEMON_CAUGHT", "timestamp": winter}
        event = data if given == "dict" else PokemonCaught.model_validate(data)
        pushed = (await store.push_event(event)).event
        (stored,) = (await store.get_events("p1")).events
        for timestamp in (pushed.timestamp, stored.timestamp):
            assert timestamp == winter
            assert timestamp is not None
            # UTC: datetime's own, or Pydantic's fixed zone for what is read back from JSON.
            assert not isinstance(timestamp.tzinfo, zoneinfo.ZoneInfo)
            assert timestamp.utcoffset() == timedelta(0)
        assert pushed.timestamp is not None
        assert pushed.timestamp.tzinfo is UTC


class SerializedPerson(BaseModel):
    first_name: str = Field(serialization_alias="firstName")


@pydantic_dataclass
class DataPerson:
    first_name: str = Field(serialization_alias="firstName")


@dataclasses.dataclass
class PersonWrapper:
    person: SerializedPerson


class PeopleHolder(TypedDict):
    people: list[SerializedPerson]


class LenientComputed(BaseModel):
    first: str

    @computed_field  # type: ignore[prop-decorator]
    @property
    def upper(self) -> str:
        return self.first.upper()


class StrictComputed(LenientComputed):
    model_config = ConfigDict(extra="forbid")


class HiddenRequired(BaseModel):
    name: str
    internal: str = Field(exclude=True)


class HiddenDefaulted(BaseModel):
    name: str
    internal: str = Field(default="", exclude=True)


@dataclasses.dataclass
class FinePayload:
    lenient: LenientComputed
    defaulted: HiddenDefaulted


class FineEvent(Event):
    type: Literal["FINE"] = "FINE"
    payload: FinePayload


class TestAliases:
    def test_aliased_payload_fields_dump_by_alias_and_read_back(self) -> None:
        """Dumps use aliases inside nested payload models, so what is written validates."""

        class Renamed(BaseModel):
            new_name: str = Field(alias="newName")

        class PokemonRenamed(Event):
            type: Literal["POKEMON_RENAMED"] = "POKEMON_RENAMED"
            payload: Renamed

        event = PokemonRenamed(aggregate_id="p1", version=3, payload=Renamed(newName="Sparky"))
        assert json.loads(event.model_dump_json())["payload"] == {"newName": "Sparky"}
        assert PokemonRenamed.model_validate_json(event.model_dump_json()) == event
        assert PokemonRenamed.model_validate(event.model_dump()) == event
        assert event.model_dump(by_alias=False)["aggregate_id"] == "p1"

    def test_a_key_written_but_not_read_refuses_the_event_type(self) -> None:
        """A payload field written under a key it does not read (a serialization alias
        alone), also deep in a list of models, is refused when the store is made: its
        events would be stored, then fail every read (on SQLite they did)."""

        class Person(BaseModel):
            first_name: str = Field(serialization_alias="firstName")

        class Team(BaseModel):
            members: list[Person | None]

        for payload in (Person, Team):

            class Joined(Event):
                type: Literal["JOINED"] = "JOINED"
                payload: payload  # type: ignore[valid-type]

            with pytest.raises(TypeError, match="written as 'firstName'") as info:
                EventStore(event_store_id="S", event_types=[Joined], reducer=lambda a, e: a)
            assert "first_name" in str(info.value)

    async def test_keys_not_read_back_are_found_in_dataclasses_and_typeddicts_too(
        self, tmp_path: Any
    ) -> None:
        """A Pydantic dataclass writing a key it does not read, a model inside a standard
        dataclass or a TypedDict doing so, a computed field a model refuses on input
        (extra="forbid") and a required field excluded from dumps: each was stored, then
        failed every read; each is refused when the store is made. Their readable forms
        are stored and read back."""
        cases: list[tuple[Any, str]] = [
            (DataPerson, "payload.first_name is written as 'firstName'"),
            (PersonWrapper, "payload.person.first_name is written as 'firstName'"),
            (PeopleHolder, "payload.people.first_name is written as 'firstName'"),
            (StrictComputed, "computed field 'upper'"),
            (HiddenRequired, "payload.internal is required but excluded"),
        ]
        for payload_type, problem in cases:

            class Bad(Event):
                type: Literal["BAD"] = "BAD"
                payload: payload_type  # type: ignore[valid-type]

            with pytest.raises(TypeError, match=re.escape(problem)):
                EventStore(event_store_id="S", event_types=[Bad], reducer=lambda a, e: a)

        async with SQLiteEventStorageAdapter(tmp_path / "fine.db") as adapter:
            store = EventStore(
                event_store_id="S", event_types=[FineEvent], reducer=lambda a, e: a,
                event_storage_adapter=adapter,
            )  # fmt: skip
            payload = FinePayload(LenientComputed(first="ash"), HiddenDefaulted(name="x"))
            pushed = await store.push_event(FineEvent(aggregate_id="f", version=1, payload=payload))
            assert (await store.get_events("f")).events == [pushed.event]

    async def test_keys_read_back_are_accepted_and_round_trip(self, tmp_path: Any) -> None:
        """A serialization alias the field also reads, camelCase with names allowed, an
        excluded field, or a model that maps keys back itself is fine; such events read
        back from SQLite."""

        class Person(BaseModel):
            model_config = ConfigDict(alias_generator=to_camel, validate_by_name=True)
            first_name: str
            last_name: str = Field(
                serialization_alias="surname",
                validation_alias=AliasChoices("surname", "lastName"),
            )

        class Joined(Event):
            type: Literal["JOINED"] = "JOINED"
            payload: Person

        class Secret(BaseModel):  # never written: no key to read back
            code: str = Field(default="x", serialization_alias="secretCode", exclude=True)

        class Migrated(BaseModel):  # maps the key it writes back itself
            first_name: str = Field(serialization_alias="firstName")

            @model_validator(mode="before")
            @classmethod
            def _renamed(cls, data: Any) -> Any:
                if isinstance(data, dict) and "firstName" in data:
                    return {"first_name": data["firstName"]}
                return data

        for payload in (Secret, Migrated):

            class Other(Event):
                type: Literal["OTHER"] = "OTHER"
                payload: payload  # type: ignore[valid-type]

            EventStore(event_store_id="S", event_types=[Other], reducer=lambda a, e: a)

        adapter = SQLiteEventStorageAdapter(tmp_path / "people.db")
        store = EventStore(
            event_store_id="S", event_types=[Joined], reducer=lambda a, e: a,
            event_storage_adapter=adapter,
        )  # fmt: skip
        async with adapter:
            data = {
                "aggregateId": "p",
                "version": 1,
                "type": "JOINED",
                "payload": {"firstName": "Ash", "lastName": "Ketchum"},
            }
            pushed = (await store.push_event(data)).event
            assert (await store.get_events("p")).events == [pushed]

    def test_fields_whose_value_is_lost_when_written_refuse_the_event_type(self) -> None:
        """A Pydantic secret is written masked and ``Json[...]`` as its parsed value (which
        fails every read): both are refused when the store is made, also deep in models
        and containers, and also as the payload itself. They used to be stored, the secret
        as '**********'."""

        class Login(BaseModel):
            password: SecretStr

        class Team(BaseModel):
            logins: list[Login] | None = None

        class Keys(BaseModel):
            keys: dict[str, SecretBytes]

        class Pin(BaseModel):
            pin: PydanticSecret[int]

        class Raw(BaseModel):
            body: Json[list[int]]

        class LoginDict(TypedDict):
            password: SecretStr

        @dataclasses.dataclass
        class LoginData:
            password: SecretStr | None

        for payload, lost in [
            (Login, "payload.password is a Pydantic secret"),
            (LoginDict, "payload.password is a Pydantic secret"),
            (list[LoginData], "payload.password is a Pydantic secret"),
            (Team, "payload.logins.password is a Pydantic secret"),
            (Keys, "payload.keys is a Pydantic secret"),
            (Pin, "payload.pin is a Pydantic secret"),
            (SecretStr | None, "payload is a Pydantic secret"),
            (Raw, "payload.body is Json"),
            (Json[dict[str, int]], "payload is Json"),
        ]:

            class Joined(Event):
                type: Literal["JOINED"] = "JOINED"
                payload: payload  # type: ignore[valid-type]

            with pytest.raises(TypeError, match=re.escape(lost)):
                EventStore(event_store_id="S", event_types=[Joined], reducer=lambda a, e: a)

    async def test_a_secret_written_by_a_serializer_of_its_own_is_stored(
        self, tmp_path: Any
    ) -> None:
        """A secret written by a serializer of the author's (a ``field_serializer``, one on
        the model holding it, or a ``PlainSerializer`` in its annotation) is the author's
        choice: the event type is accepted and the secret reads back from SQLite."""

        class Login(BaseModel):
            password: SecretStr

            @field_serializer("password", when_used="json")
            def _reveal(self, value: SecretStr) -> str:
                return value.get_secret_value()

        class Inner(BaseModel):
            password: SecretStr

        class Outer(BaseModel):
            login: Inner

            @field_serializer("login", when_used="json")
            def _reveal(self, value: Inner) -> dict[str, str]:
                return {"password": value.password.get_secret_value()}

        revealed = Annotated[
            SecretStr,
            PlainSerializer(lambda v: v.get_secret_value(), return_type=str, when_used="json"),
        ]

        class Plain(BaseModel):
            password: revealed  # type: ignore[valid-type]

        for payload in (Outer, Plain):

            class Other(Event):
                type: Literal["OTHER"] = "OTHER"
                payload: payload  # type: ignore[valid-type]

            EventStore(event_store_id="S", event_types=[Other], reducer=lambda a, e: a)

        class LoggedIn(Event):
            type: Literal["LOGGED_IN"] = "LOGGED_IN"
            payload: Login

        async with SQLiteEventStorageAdapter(tmp_path / "logins.db") as adapter:
            store = EventStore(
                event_store_id="S", event_types=[LoggedIn], reducer=lambda a, e: a,
                event_storage_adapter=adapter,
            )  # fmt: skip
            await store.push_event(
                LoggedIn(aggregate_id="u", version=1, payload=Login(password=SecretStr("pw")))
            )
            (event,) = (await store.get_events("u")).events
            assert isinstance(event, LoggedIn)
            assert event.payload.password.get_secret_value() == "pw"


class TestFieldsOfTheirOwn:
    def test_event_types_with_fields_storage_would_drop_are_refused(self) -> None:
        """Storage keeps an event's six fields: an event type declaring more, a computed
        field, or extra="allow" is refused when the store is made. Such an event used to be
        stored without them and, when one was required, fail every read."""

        class Noted(Event):
            type: Literal["NOTED"] = "NOTED"
            note: str

        class Tagged(Event):
            type: Literal["TAGGED"] = "TAGGED"
            tag: str = "none"

        class Shouted(Event):
            type: Literal["SHOUTED"] = "SHOUTED"
            payload: str

            @computed_field  # type: ignore[prop-decorator]
            @property
            def loud(self) -> str:
                return self.payload.upper()

        class Loose(Event):
            model_config = ConfigDict(extra="allow")
            type: Literal["LOOSE"] = "LOOSE"

        for event_type, named in (
            (Noted, "['note']"),
            (Tagged, "['tag']"),
            (Shouted, "['loud']"),
            (Loose, 'extra="allow"'),
        ):
            with pytest.raises(TypeError, match=re.escape(named)) as info:
                EventStore(event_store_id="S", event_types=[event_type], reducer=lambda a, e: a)
            assert "payload or metadata" in str(info.value)

        class Quiet(Event):  # extra keys ignored on input: nothing is lost when stored
            model_config = ConfigDict(extra="ignore")
            type: Literal["QUIET"] = "QUIET"

        EventStore(event_store_id="S", event_types=[Quiet], reducer=lambda a, e: a)


PokemonId = NewType("PokemonId", str)


class TestBaseFields:
    """The six fields every adapter writes under Castore's keys keep their keys and types."""

    def test_a_type_default_outside_its_literal_is_refused(self) -> None:
        """Pydantic does not validate defaults: events pushed without a type were stored
        under the misspelt default, and their aggregate never read back."""

        class Appeared(Event):
            type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARD"  # type: ignore[assignment]

        with pytest.raises(TypeError, match="'POKEMON_APPEARD', which is not one of"):
            EventStore(event_store_id="S", event_types=[Appeared], reducer=lambda a, e: a)

        class Either(Event):
            type: Literal["A", "B"] = "B"

        EventStore(event_store_id="S", event_types=[Either], reducer=lambda a, e: a)

    def test_renamed_or_retyped_base_fields_are_refused(self) -> None:
        """An id typed UUID or int made every push a bare TypeError; an aliased field or
        validate_by_alias=False stored events that failed every read."""

        class ByUuid(Event):
            type: Literal["U"] = "U"
            aggregate_id: UUID  # type: ignore[assignment]

        class ByInt(Event):
            type: Literal["I"] = "I"
            aggregate_id: int  # type: ignore[assignment]

        class Renamed(Event):
            type: Literal["R"] = "R"
            aggregate_id: str = Field(alias="id")

        class Data(Event):
            type: Literal["D"] = "D"
            payload: int = Field(serialization_alias="data")

        class ByName(Event):
            model_config = ConfigDict(validate_by_alias=False)
            type: Literal["N"] = "N"

        class LooseTime(Event):
            type: Literal["T"] = "T"
            timestamp: str | None = None  # type: ignore[assignment]

        class Hidden(Event):
            type: Literal["H"] = "H"
            metadata: dict[str, str] | None = Field(default=None, exclude=True)

        for event_type, named in (
            (ByUuid, "aggregate_id must keep its type (str), not UUID"),
            (ByInt, "aggregate_id must keep its type (str), not int"),
            (Renamed, "aggregate_id must be written and read as 'aggregateId'"),
            (Data, "payload must be written and read as 'payload'"),
            (ByName, "validate_by_alias=False"),
            (LooseTime, "timestamp must keep its type"),
            (Hidden, "metadata is excluded from dumps"),
        ):
            with pytest.raises(TypeError, match=re.escape(named)):
                EventStore(event_store_id="S", event_types=[event_type], reducer=lambda a, e: a)

    async def test_constrained_base_fields_are_accepted_and_read_back(self) -> None:
        """Constraints, NewTypes and aliases of the same types are the author's to choose
        (a NewType id was refused by the first version of the check above)."""

        class Strict(Event):
            type: Literal["STRICT"] = "STRICT"
            aggregate_id: Annotated[PokemonId, Field(min_length=2)]
            version: PositiveInt = 1
            timestamp: Annotated[Timestamp | None, Field(description="when")] = None

        class Chosen(Event):
            type: Literal["CHOSEN"] = "CHOSEN"
            aggregate_id: str = Field(validation_alias=AliasChoices("aggregateId", "id"))

        EventStore(event_store_id="S", event_types=[Chosen], reducer=lambda a, e: a)

        async with SQLiteEventStorageAdapter(":memory:") as adapter:
            store = EventStore(
                event_store_id="S", event_types=[Strict], reducer=lambda a, e: a,
                event_storage_adapter=adapter,
            )  # fmt: skip
            await store.push_event({"aggregateId": "ab"})
            (event,) = (await store.get_events("ab")).events
            assert (event.aggregate_id, event.version) == ("ab", 1)

    async def test_an_instance_of_an_undeclared_type_or_id_is_not_written(self) -> None:
        """An instance whose type is none of the store's (built without validation), or
        whose id a validator of the author's turned into a number, passed the limits
        check: the first was stored under an unknown type, the second was a bare
        TypeError."""

        class Numbered(Event):
            type: Literal["NUMBERED"] = "NUMBERED"

            @field_validator("aggregate_id", mode="after")
            @classmethod
            def _number(cls, value: str) -> Any:
                return int(value)

        adapter = InMemoryEventStorageAdapter()
        store = EventStore(
            event_store_id="S", event_types=[PokemonAppeared, Numbered],
            reducer=lambda a, e: a, event_storage_adapter=adapter,
        )  # fmt: skip
        stray = PokemonAppeared.model_construct(
            aggregate_id="p", version=1, type="POKEMON_GONE", payload=None
        )
        with pytest.raises(UnknownEventTypeError):
            await store.push_event(stray)
        with pytest.raises(UnknownEventTypeError):
            store.group_event(stray)
        with pytest.raises(EventLimitExceededError, match="aggregate id must be text"):
            await store.push_event({"type": "NUMBERED", "aggregateId": "7", "version": 1})
        for version in ("1", 0, True):
            odd = PokemonAppeared.model_construct(aggregate_id="p", version=version, payload=None)
            with pytest.raises(EventLimitExceededError, match="version must be an int >= 1"):
                await store.push_event(odd)
        assert (await store.list_aggregate_ids()).aggregate_ids == []
        assert (await store.get_events("p")).events == []


class TestOneShotIterables:
    def test_iterable_fields_are_refused_when_the_store_is_made(self) -> None:
        """Pydantic validates an Iterable field lazily, into an iterator read once: the
        limits check could not look inside without using it up, so a NaN, a 10 MB string or
        a 250-deep value in it was stored and failed every read. Such fields are refused;
        sequences are not."""

        class Batch(BaseModel):
            items: Iterable[Any]

        for payload_type in (Batch, Iterable[int], list[Iterable[str]]):

            class Bad(Event):
                type: Literal["BAD"] = "BAD"
                payload: payload_type  # type: ignore[valid-type]

            with pytest.raises(TypeError, match="one-shot iterable"):
                EventStore(event_store_id="S", event_types=[Bad], reducer=lambda a, e: a)

        class Fine(Event):
            type: Literal["FINE"] = "FINE"
            payload: Sequence[int]

        class Listed(BaseModel):  # validators of the author's turn them into lists
            items: Annotated[Iterable[int], AfterValidator(list)]
            more: Iterable[int]

            @field_validator("more")
            @classmethod
            def _listed(cls, value: Iterable[int]) -> list[int]:
                return list(value)

        class AlsoFine(Event):
            type: Literal["ALSO_FINE"] = "ALSO_FINE"
            payload: Listed

        EventStore(event_store_id="S", event_types=[Fine, AlsoFine], reducer=lambda a, e: a)


class TestAggregate:
    def test_aggregate_json_uses_camel_case(self) -> None:
        """Aggregates serialise with camelCase keys and accept both spellings."""
        pokemon = Pokemon(aggregate_id="p1", version=1, name="Pikachu", level=3, status="wild")
        dumped = pokemon.model_dump(mode="json")
        assert dumped["aggregateId"] == "p1"
        assert Pokemon.model_validate(dumped) == pokemon

    def test_aggregate_base_needs_id_and_version(self) -> None:
        """The base aggregate requires aggregate_id and version."""
        with pytest.raises(ValidationError):
            Aggregate.model_validate({"aggregateId": "p1"})


def test_event_base_is_exported() -> None:
    """Event subclasses are plain Pydantic models."""
    assert issubclass(PokemonCaught, Event)


class TestWithTimestamp:
    """``with_timestamp`` is ``model_copy(update={"timestamp": ...})``, only faster."""

    def test_the_copy_equals_pydantics_and_leaves_the_original_alone(self) -> None:
        class Secretive(Event):
            type: Literal["SECRETIVE"] = "SECRETIVE"
            payload: dict[str, Any] | None = None
            _seen: list[int] = PrivateAttr(default_factory=list)

        original = Secretive(aggregate_id="a", version=2, payload={"k": [1]})
        original._seen.append(1)
        stamp = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
        ours = with_timestamp(original, stamp)
        theirs = original.model_copy(update={"timestamp": stamp})
        assert type(ours) is Secretive
        assert ours == theirs
        assert ours.model_dump(by_alias=True) == theirs.model_dump(by_alias=True)
        assert (
            ours.model_fields_set
            == theirs.model_fields_set
            == {
                "aggregate_id",
                "version",
                "payload",
                "timestamp",
            }
        )
        assert ours._seen == [1]
        assert ours.__pydantic_private__ is not original.__pydantic_private__
        assert original.timestamp is None
        assert "timestamp" not in original.model_fields_set
        with pytest.raises(ValidationError):
            ours.version = 3  # still frozen
