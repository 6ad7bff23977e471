"""Notification channels parse wire bodies in one pass; routing fields are read alone."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal

import pytest

from castore_pydantic import Event, EventStore
from castore_pydantic._event_limits import EventLimits
from castore_pydantic.messaging import (
    MessageChannel,
    NotificationMessage,
    NotificationMessageQueue,
)
from castore_pydantic.messaging._wire import routing_fields
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from tests.domain import Pokemon, PokemonAppeared, make_store
from tests.messaging.redis_support import caught, notification


class PokemonFled(Event):
    type: Literal["POKEMON_FLED"] = "POKEMON_FLED"


def queue(*stores: EventStore[Any, Any]) -> NotificationMessageQueue:
    return NotificationMessageQueue(message_queue_id="q", source_event_stores=list(stores))


def body(message: NotificationMessage, **changes: Any) -> bytes:
    data = json.loads(message.model_dump_json())
    data.update(changes)
    return json.dumps(data).encode()


def general(channel: MessageChannel[Any]) -> Any:
    """The parsing every channel kind does, without the one-pass shortcut."""
    return partial(MessageChannel.parse_message, channel)


def outcome(parse: Any, raw: bytes) -> tuple[str, Any]:
    """What parsing gives: the message's type and JSON, or the error's type."""
    try:
        message = parse(raw)
    except Exception as exc:
        return ("error", type(exc))
    return (type(message).__name__, (type(message.event), message.model_dump_json()))


class TestWireParsing:
    @pytest.mark.parametrize(
        "raw",
        [
            notification(1).model_dump_json().encode(),
            caught(2).model_dump_json().encode(),
            notification(3, event_store_id="RIVALS").model_dump_json().encode(),
            # snake_case keys: not the wire form, accepted by the channel
            json.dumps(
                {
                    "event_store_id": "POKEMONS",
                    "event": json.loads(caught(4).event.model_dump_json()),
                }
            ).encode(),
            body(notification(5), eventStoreId="TRAINERS"),  # not a source store
            body(notification(6), extra=True),  # unknown top-level key
            body(notification(7), event={"aggregateId": "a", "version": 1, "type": "NOPE"}),
            body(
                notification(8),
                event={"aggregateId": "a", "version": 1, "type": "POKEMON_APPEARED", "payload": {}},
            ),
            body(
                notification(9), event={"aggregateId": "a", "version": 0, "type": "POKEMON_CAUGHT"}
            ),
            b"not json",
            b"[]",
            # timestamps the event store converts to UTC milliseconds (or refuses)
            body(caught(10), event={**json.loads(caught(10).event.model_dump_json()),
                                    "timestamp": "2024-01-01T01:00:00.123456+01:00"}),
            body(caught(11), event={**json.loads(caught(11).event.model_dump_json()),
                                    "timestamp": "0001-01-01T00:00:00+05:00"}),
        ],
    )  # fmt: skip
    def test_gives_what_the_channel_gives(self, raw: bytes) -> None:
        """For any body, the one-pass parse gives the general message or raises its error type
        (timestamps included: they came out of the one-pass parse as given)."""
        channel = queue(make_store(), make_store(event_store_id="RIVALS"))
        assert outcome(channel.parse_message, raw) == outcome(general(channel), raw)
        with contextlib.suppress(Exception):
            assert channel.parse_message(raw) == general(channel)(raw)

    def test_timestamps_come_out_in_utc_milliseconds(self) -> None:
        """A body's timestamp with an offset and microseconds is converted, as by the store."""
        raw = body(
            caught(1),
            event={
                **json.loads(caught(1).event.model_dump_json()),
                "timestamp": "2024-01-01T01:00:00.123456+01:00",
            },
        )
        message = queue(make_store()).parse_message(raw)
        assert message.event.timestamp == datetime(2024, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
        assert message.event.timestamp.utcoffset() == timedelta(0)

    def test_returns_plain_notifications_with_the_stores_event_classes(self) -> None:
        """Parsed messages are NotificationMessage instances holding the store's event class."""
        parse = queue(make_store()).parse_message
        message = parse(notification(1).model_dump_json().encode())
        assert type(message) is NotificationMessage
        assert type(message.event) is PokemonAppeared
        assert message == notification(1)

    def test_wire_bodies_take_the_one_pass_path(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A notification in wire form never needs the general parsing."""
        channel = queue(make_store())

        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the general parsing was used")

        monkeypatch.setattr(MessageChannel, "parse_message", refuse)
        assert channel.parse_message(notification(1).model_dump_json().encode()) == notification(1)
        assert channel.parse_message(caught(2).model_dump_json()) == caught(2)

    def test_the_first_store_with_an_id_decides_the_event_types(self) -> None:
        """As in the channel, a second store with the same id is ignored."""

        def keep(pokemon: Pokemon | None, event: PokemonFled) -> Pokemon:
            assert pokemon is not None
            return pokemon

        other = EventStore(
            event_store_id="POKEMONS",
            event_types=[PokemonFled],
            reducer=keep,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        channel = queue(make_store(), other)
        fled = body(
            notification(1), event={"aggregateId": "a", "version": 2, "type": "POKEMON_FLED"}
        )
        assert outcome(channel.parse_message, fled) == outcome(general(channel), fled)
        assert outcome(channel.parse_message, fled)[0] == "error"

    def test_store_limits_are_enforced(self) -> None:
        """An event beyond its store's limits is refused as by the channel."""
        small = make_store()
        small = EventStore(
            event_store_id="POKEMONS",
            event_types=small.event_types,
            reducer=small.reducer,
            event_storage_adapter=InMemoryEventStorageAdapter(),
            limits=EventLimits(max_bytes=100),
        )
        channel = queue(small)
        long_name = body(
            notification(1),
            event={
                "aggregateId": "a",
                "version": 1,
                "type": "POKEMON_APPEARED",
                "payload": {"name": "x" * 49, "level": 3},
                "metadata": {"note": "y" * 200},
            },
        )
        result = outcome(channel.parse_message, long_name)
        assert result == outcome(general(channel), long_name)
        assert result[0] == "error"


class TestRoutingFields:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            (notification(1).model_dump_json(), ("POKEMONS", "POKEMON_APPEARED", True)),
            (b'{"event_store_id": "RIVALS", "event": {"type": "X"}}', ("RIVALS", "X", True)),
            (b'{"eventStoreId": "P", "event": {"version": 2}}', ("P", None, True)),
            (b'{"eventStoreId": "P", "aggregateId": "a"}', ("P", None, False)),
            # The camelCase key wins, as in the channel; the last of duplicate keys counts.
            (b'{"event_store_id": "B", "eventStoreId": "A"}', ("A", None, False)),
            (b'{"eventStoreId": "A", "eventStoreId": "B"}', ("B", None, False)),
            (b"not json", None),
            (b"[]", None),
            (b'{"eventStoreId": 1}', None),
            (b'{"eventStoreId": "P", "event": 2}', None),
            (b'{"eventStoreId": "P", "event": {"type": null}}', None),
        ],
    )
    def test_reads_the_store_and_the_event_type(
        self, raw: str | bytes, expected: tuple[str, str | None, bool] | None
    ) -> None:
        """The store and the event type are read without validating; unreadable is None."""
        assert routing_fields(raw) == expected
