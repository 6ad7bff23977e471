"""Bus listeners' filters: patterns worked out once, each body validated at most once."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from castore_pydantic.errors import MessageChannelEventStoreNotFoundError, UnknownEventTypeError
from castore_pydantic.messaging import (
    AggregateExistsMessage,
    AggregateExistsMessageBus,
    FilterPattern,
    Message,
    MessageChannel,
    NotificationMessageBus,
    _routing,
    matches,
)
from castore_pydantic.messaging._routing import ListenerFilter
from castore_pydantic.messaging._wire import routing_fields
from castore_pydantic.messaging.memory import InMemoryMessageBusAdapter
from castore_pydantic.messaging.rabbitmq import RabbitMQMessageBusAdapter
from castore_pydantic.messaging.redis import RedisMessageBusAdapter
from tests.domain import fleeing_store, make_store
from tests.messaging.redis_support import T0, caught, notification

_BUS = NotificationMessageBus(
    message_bus_id="routing",
    source_event_stores=[make_store(), make_store(event_store_id="RIVALS"), fleeing_store()],
)

_PATTERNS: list[FilterPattern] = [
    {},
    {"on_replay": True},
    {"event_type": "POKEMON_CAUGHT"},
    {"event_store_id": "POKEMONS"},
    {"event_store_id": "RIVALS", "on_replay": True},
    {"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"},
    {"event_store_id": "POKEMONS", "event_type": "POKEMON_APPEARED", "on_replay": True},
    {"event_store_id": "FLEES", "event_type": "POKEMON_FLED"},
    {"event_store_id": "FLEES", "event_type": "POKEMON_CAUGHT", "on_replay": True},
    {"event_store_id": "TRAINERS", "event_type": "TRAINER_CREATED"},
]
_MESSAGES: list[Message] = [
    notification(1),
    caught(2),
    notification(3, event_store_id="RIVALS"),
    AggregateExistsMessage(event_store_id="POKEMONS", aggregate_id="a", initial_event_timestamp=T0),
]


def _json(data: object) -> bytes:
    return json.dumps(data).encode()


#: Bodies ``_BUS`` validates and bodies it refuses, some of which no pattern can want.
_BODIES: list[bytes] = [
    *(message.model_dump_json().encode() for message in _MESSAGES[:3]),
    _json({"event_store_id": "RIVALS", "event": json.loads(caught(4).event.model_dump_json())}),
    _json({"eventStoreId": "FLEES", "event": {"aggregateId": "abra", "version": 2}}),
    _json({"eventStoreId": "POKEMONS", "event": {"aggregateId": "a", "version": 2}}),
    _json({"eventStoreId": "TRAINERS", "event": {"aggregateId": "ash", "version": 1}}),
    _json({"eventStoreId": "POKEMONS", "event": {"aggregateId": "a", "type": "EVOLVED"}}),
    _json({"eventStoreId": "TRAINERS", "event": {"type": "TRAINER_CREATED"}}),
    _MESSAGES[3].model_dump_json().encode(),  # not a notification
    b"not json",
    b"[]",
]


def may_want(patterns: list[FilterPattern], body: bytes, replay: bool) -> bool:
    """Whether some pattern could take the message in ``body``, going by its routing fields.

    Castore's rules, pattern by pattern: an event without a type could be of any type.
    """
    candidates = [pattern for pattern in patterns if not replay or pattern.get("on_replay")]
    if any("event_store_id" not in pattern for pattern in candidates):
        return True
    fields = routing_fields(body)
    if fields is None:
        return bool(candidates)
    event_store_id, event_type, carries_event = fields
    for pattern in candidates:
        if pattern["event_store_id"] != event_store_id:
            continue
        wanted_type = pattern.get("event_type")
        if wanted_type is None or wanted_type == event_type:
            return True
        if carries_event and event_type is None:
            return True
    return False


class TestMatching:
    @given(
        patterns=st.lists(st.sampled_from(_PATTERNS), max_size=4),
        message=st.sampled_from(_MESSAGES),
        replay=st.booleans(),
    )
    def test_agrees_with_matches(
        self, patterns: list[FilterPattern], message: Message, replay: bool
    ) -> None:
        """A listener receives a message when any of its patterns ``matches`` it."""
        expected = any(matches(pattern, message, replay) for pattern in patterns)
        assert ListenerFilter(patterns).matches(message, replay) is expected

    def test_keeps_the_patterns(self) -> None:
        """The patterns stay readable, in the order given (RabbitMQ binds them)."""
        patterns: list[FilterPattern] = [{"event_store_id": "A"}, {}]
        assert ListenerFilter(patterns).patterns == tuple(patterns)


class TestRoutingFromTheBody:
    @given(
        patterns=st.lists(st.sampled_from(_PATTERNS), max_size=4),
        message=st.sampled_from(_MESSAGES),
        replay=st.booleans(),
    )
    def test_agrees_with_matches(
        self, patterns: list[FilterPattern], message: Message, replay: bool
    ) -> None:
        """Read from the JSON body, the filter patterns select what ``matches`` selects."""
        expected = any(matches(pattern, message, replay) for pattern in patterns)
        body = message.model_dump_json().encode()
        assert ListenerFilter(patterns).body_matches(body, replay) is expected

    def test_skips_unknown_types_and_stores_it_was_not_asked_for(self) -> None:
        """A body no event store of this service could validate is still routed."""
        typed = ListenerFilter([{"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"}])
        by_store = ListenerFilter([{"event_store_id": "POKEMONS"}])
        evolved = _json({"eventStoreId": "POKEMONS", "event": {"type": "EVOLVED", "x": [1]}})
        trainer = _json({"eventStoreId": "TRAINERS", "event": {"type": "POKEMON_CAUGHT"}})
        assert typed.body_matches(evolved, False) is False
        assert typed.body_matches(trainer, False) is False
        assert by_store.body_matches(evolved, False) is True

    def test_reads_both_spellings(self) -> None:
        """The snake_case keys a channel accepts route as the camelCase ones do."""
        snake = _json({"event_store_id": "RIVALS", "event": {"type": "X"}})
        assert ListenerFilter([{"event_store_id": "RIVALS"}]).body_matches(snake, False) is True
        assert ListenerFilter([{"event_store_id": "POKEMONS"}]).body_matches(snake, False) is False

    def test_an_event_without_a_type_is_routed_after_validation(self) -> None:
        """A store with one event class accepts an event without its type (the class's
        default fills it in): only the validated message tells a pattern on the type."""
        typeless = _json({"eventStoreId": "FLEES", "event": {"aggregateId": "a", "version": 2}})
        wanted = ListenerFilter([{"event_store_id": "FLEES", "event_type": "POKEMON_FLED"}])
        other = ListenerFilter([{"event_store_id": "FLEES", "event_type": "POKEMON_CAUGHT"}])
        assert wanted.body_matches(typeless, False) is None
        message = _BUS.parse_message(typeless)
        assert wanted.matches(message, False)
        assert not other.matches(message, False)
        # A pattern on the store alone needs no type: decided from the body.
        assert ListenerFilter([{"event_store_id": "FLEES"}]).body_matches(typeless, False)

    def test_an_event_without_a_type_of_a_store_no_pattern_names_is_not_wanted(self) -> None:
        """Validation cannot change the store: no pattern naming it, no validation."""
        typeless = _json({"eventStoreId": "TRAINERS", "event": {"aggregateId": "a"}})
        typed = ListenerFilter([{"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"}])
        assert typed.body_matches(typeless, False) is False

    @pytest.mark.parametrize(
        "raw", [b"not json", b"[]", b'{"eventStoreId": 1}', b'{"eventStoreId": "P", "event": 2}']
    )
    def test_an_unreadable_body_is_left_to_validation(self, raw: bytes) -> None:
        """Unreadable routing fields give None when a pattern needs them, else no reading."""
        by_store = ListenerFilter([{"event_store_id": "POKEMONS"}])
        assert by_store.body_matches(raw, False) is None
        assert ListenerFilter([{}]).body_matches(raw, False) is True
        assert by_store.body_matches(raw, True) is False


def _outcome(select: Callable[[], Message | None]) -> tuple[str, Any]:
    try:
        return ("message", select())
    except Exception as exc:
        return ("error", type(exc))


#: Every listener of one to three of the patterns.
_LISTENERS = [
    list(patterns)
    for size in (1, 2, 3)
    for patterns in itertools.combinations_with_replacement(_PATTERNS, size)
]


class TestSelect:
    @pytest.mark.parametrize("body", _BODIES, ids=range(len(_BODIES)))
    def test_gives_the_validated_message_the_listener_receives(self, body: bytes) -> None:
        """A body that validates gives its message if the patterns match it, else None; one
        that does not raises its validation error if a pattern may want it, else None. In
        either order (filter first, or validate first as behind RabbitMQ bindings)."""
        parsed = _outcome(lambda: _BUS.parse_message(body))
        for patterns, replay, routed in itertools.product(_LISTENERS, (False, True), (False, True)):
            if parsed[0] == "message":
                taken = any(matches(pattern, parsed[1], replay) for pattern in patterns)
                expected = ("message", parsed[1] if taken else None)
            else:
                expected = parsed if may_want(patterns, body, replay) else ("message", None)
            listener = ListenerFilter(patterns)
            selected = _outcome(lambda: listener.select(body, replay, _BUS, routed=routed))  # noqa: B023
            assert selected == expected, (patterns, replay, routed)

    def test_the_validation_error_is_raised_as_is(self) -> None:
        """What the channel raises reaches the consumer (it names the dead letter's error)."""
        evolved = _json({"eventStoreId": "POKEMONS", "event": {"aggregateId": "a", "type": "X"}})
        listener = ListenerFilter([{"event_store_id": "POKEMONS"}])
        for routed in (False, True):
            with pytest.raises(UnknownEventTypeError) as raised:
                listener.select(evolved, False, _BUS, routed=routed)
            with pytest.raises(UnknownEventTypeError) as direct:
                _BUS.parse_message(evolved)
            assert str(raised.value) == str(direct.value)


class _Reads:
    """Counts what a filter reads of each body: routing fields and validations."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, channel: MessageChannel[Any]) -> None:
        self.routing = self.validations = 0
        read_fields, parse = routing_fields, channel.parse_message

        def counted_fields(body: Any) -> Any:
            self.routing += 1
            return read_fields(body)

        def counted_parse(body: Any) -> Any:
            self.validations += 1
            return parse(body)

        monkeypatch.setattr(_routing, "routing_fields", counted_fields)
        monkeypatch.setattr(channel, "parse_message", counted_parse)

    def per_body(self, count: int) -> tuple[float, float]:
        return (self.routing / count, self.validations / count)


@pytest.fixture
def bus() -> NotificationMessageBus:
    return NotificationMessageBus(
        message_bus_id="reads", source_event_stores=[make_store(), fleeing_store()]
    )


class TestEachBodyIsReadOnce:
    BODIES: tuple[bytes, ...] = tuple(
        message.model_dump_json().encode() for message in (notification(1), caught(2))
    )

    def _select_all(self, listener: ListenerFilter, bus: MessageChannel[Any], **kw: Any) -> int:
        return sum(listener.select(b, False, bus, **kw) is not None for b in self.BODIES)

    def test_a_listener_of_every_message_only_validates(
        self, monkeypatch: pytest.MonkeyPatch, bus: NotificationMessageBus
    ) -> None:
        """``{}`` takes everything: no routing field is read."""
        reads = _Reads(monkeypatch, bus)
        assert self._select_all(ListenerFilter([{}]), bus) == 2
        assert reads.per_body(2) == (0, 1)

    def test_patterns_covering_the_channel_validate_first(
        self, monkeypatch: pytest.MonkeyPatch, bus: NotificationMessageBus
    ) -> None:
        """Patterns that take every message the channel validates need no routing read."""
        by_store = ListenerFilter([{"event_store_id": "POKEMONS"}, {"event_store_id": "FLEES"}])
        by_type = ListenerFilter(
            [
                {"event_store_id": "FLEES"},
                *(
                    {"event_store_id": "POKEMONS", "event_type": name}
                    for name in ("POKEMON_APPEARED", "POKEMON_CAUGHT", "POKEMON_LEVELED_UP")
                ),
            ]
        )
        reads = _Reads(monkeypatch, bus)
        assert self._select_all(by_store, bus) + self._select_all(by_type, bus) == 4
        assert reads.per_body(4) == (0, 1)

    def test_a_narrower_listener_reads_the_routing_fields_first(
        self, monkeypatch: pytest.MonkeyPatch, bus: NotificationMessageBus
    ) -> None:
        """A listener taking part of the channel validates only what it takes."""
        listener = ListenerFilter([{"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"}])
        reads = _Reads(monkeypatch, bus)
        assert self._select_all(listener, bus) == 1
        assert reads.per_body(2) == (1, 0.5)

    def test_behind_broker_bindings_each_body_is_validated_once(
        self, monkeypatch: pytest.MonkeyPatch, bus: NotificationMessageBus
    ) -> None:
        """RabbitMQ routed the body by the patterns: it is validated, and nothing more."""
        listener = ListenerFilter([{"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"}])
        reads = _Reads(monkeypatch, bus)
        assert self._select_all(listener, bus, routed=True) == 1
        assert reads.per_body(2) == (0, 1)

    def test_replays_nobody_asked_for_are_not_read(
        self, monkeypatch: pytest.MonkeyPatch, bus: NotificationMessageBus
    ) -> None:
        """Without ``on_replay=True``, a replay is skipped unread, whatever else is asked."""
        reads = _Reads(monkeypatch, bus)
        for routed in (False, True):
            assert ListenerFilter([{}]).select(self.BODIES[0], True, bus, routed=routed) is None
        assert reads.per_body(1) == (0, 0)

    def test_aggregate_exists_buses_are_covered_by_store_patterns_only(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An aggregate-exists message has no type: a typed pattern never covers its bus."""
        bus = AggregateExistsMessageBus(message_bus_id="exists", source_event_stores=[make_store()])
        body = _MESSAGES[3].model_dump_json().encode()
        reads = _Reads(monkeypatch, bus)
        assert ListenerFilter([{"event_store_id": "POKEMONS"}]).select(body, False, bus)
        assert reads.per_body(1) == (0, 1)
        typed = ListenerFilter([{"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"}])
        assert typed.select(body, False, bus) is None
        assert reads.per_body(1) == (1, 1)


def _memory_bus_adapter(bus: MessageChannel[Any]) -> Any:
    return InMemoryMessageBusAdapter.attach_to(bus)


def _redis_bus_adapter(bus: MessageChannel[Any]) -> Any:
    return RedisMessageBusAdapter.attach_to(bus, "redis://127.0.0.1:1")  # never connects


def _rabbitmq_bus_adapter(bus: MessageChannel[Any]) -> Any:
    return RabbitMQMessageBusAdapter.attach_to(bus, "amqp://127.0.0.1:1")  # never connects


_BUS_ADAPTERS = [_memory_bus_adapter, _redis_bus_adapter, _rabbitmq_bus_adapter]


class TestPatternsAgainstTheBus:
    """``on`` refuses a pattern naming what its bus cannot carry (it then heard nothing)."""

    @pytest.mark.parametrize("attach", _BUS_ADAPTERS)
    def test_a_store_the_bus_does_not_carry_is_refused(self, attach: Any) -> None:
        """A misspelt or foreign event store id raises, naming the bus."""
        adapter = attach(_BUS)
        with pytest.raises(MessageChannelEventStoreNotFoundError, match="TRAINERS"):
            adapter.on({"event_store_id": "TRAINERS"}, _ignore, listener_id="l")

    @pytest.mark.parametrize("attach", _BUS_ADAPTERS)
    def test_a_type_its_store_does_not_declare_is_refused(self, attach: Any) -> None:
        """A type that is another store's, or nobody's, raises UnknownEventTypeError."""
        adapter = attach(_BUS)
        with pytest.raises(UnknownEventTypeError, match="POKEMON_CAUGHT"):
            adapter.on(
                {"event_store_id": "FLEES", "event_type": "POKEMON_CAUGHT"},
                _ignore,
                listener_id="l",
            )

    @pytest.mark.parametrize("attach", _BUS_ADAPTERS)
    def test_on_returns_the_listener_id(self, attach: Any) -> None:
        """Every bus adapter's on() returns the listener id, given or defaulted (only
        RabbitMQ's did; the others returned None)."""
        adapter = attach(_BUS)
        assert adapter.on({}, _ignore, listener_id="emails") == "emails"
        assert adapter.on({"on_replay": True}, _ignore) == _ignore.__qualname__

    @pytest.mark.parametrize("attach", _BUS_ADAPTERS)
    def test_patterns_castore_matches_are_accepted(self, attach: Any) -> None:
        """Known stores and types, a type alone (it matches everything), and a typed
        pattern on an aggregate-exists bus (it matches nothing, as in Castore) register."""
        adapter = attach(_BUS)
        for pattern in _PATTERNS[:-2]:
            adapter.on(pattern, _ignore, listener_id="l")
        adapter.on({"event_type": "NOBODY'S"}, _ignore, listener_id="l")
        exists = AggregateExistsMessageBus(
            message_bus_id="exists", source_event_stores=[make_store()]
        )
        attach(exists).on(
            {"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"}, _ignore, listener_id="l"
        )


async def _ignore(message: Message, context: Any) -> None:
    return None
