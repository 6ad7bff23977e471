from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from castore_pydantic import messaging
from castore_pydantic.messaging import (
    AggregateExistsMessage,
    FilterPattern,
    MessageContext,
    NotificationMessage,
    RetryPolicy,
    StateCarryingMessage,
    check_filter_pattern,
    is_aggregate_exists_message,
    is_event_carrying_message,
    is_notification_message,
    is_state_carrying_message,
    matches,
)
from tests.domain import Appeared, Pokemon, PokemonAppeared, PokemonCaught

T0 = datetime(2024, 1, 1, tzinfo=UTC)

PUBLIC_MESSAGING_API = [
    "AggregateExistsMessage",
    "AggregateExistsMessageBus",
    "AggregateExistsMessageChannel",
    "AggregateExistsMessageQueue",
    "ConnectedEventStore",
    "DeadLetter",
    "DeliveryGuarantee",
    "FilterPattern",
    "Message",
    "MessageChannel",
    "MessageChannelAdapter",
    "MessageContext",
    "MessageHandler",
    "MessageType",
    "NotificationMessage",
    "NotificationMessageBus",
    "NotificationMessageChannel",
    "NotificationMessageQueue",
    "RetryPolicy",
    "StateCarryingMessage",
    "StateCarryingMessageBus",
    "StateCarryingMessageChannel",
    "StateCarryingMessageQueue",
    "check_filter_pattern",
    "is_aggregate_exists_message",
    "is_event_carrying_message",
    "is_notification_message",
    "is_state_carrying_message",
    "matches",
]


def appeared_event(aggregate_id: str = "pikachu") -> PokemonAppeared:
    return PokemonAppeared(
        aggregate_id=aggregate_id,
        version=1,
        timestamp=T0,
        payload=Appeared(name="Pikachu", level=3),
    )


def caught_event(aggregate_id: str = "pikachu") -> PokemonCaught:
    return PokemonCaught(aggregate_id=aggregate_id, version=2, timestamp=T0)


class TestPublicSurface:
    def test_messaging_all_is_pinned(self) -> None:
        """castore_pydantic.messaging exports exactly the pinned names, all importable."""
        assert messaging.__all__ == PUBLIC_MESSAGING_API
        for name in messaging.__all__:
            assert getattr(messaging, name) is not None

    def test_importing_messaging_imports_no_broker_driver(self) -> None:
        """The messaging package needs neither aio-pika nor redis."""
        import subprocess
        import sys

        code = (
            "import sys, castore_pydantic.messaging, castore_pydantic.messaging.memory;"
            "print(any(m.split('.')[0] in ('aio_pika', 'aiormq', 'redis') for m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "False"


class TestMessageJson:
    def test_aggregate_exists_message_has_castores_shape(self) -> None:
        """An aggregate-exists message dumps to Castore's exact camelCase JSON."""
        message = AggregateExistsMessage(
            event_store_id="POKEMONS",
            aggregate_id="pikachu",
            initial_event_timestamp=T0 + timedelta(microseconds=123_999),
        )
        assert json.loads(message.model_dump_json()) == {
            "eventStoreId": "POKEMONS",
            "aggregateId": "pikachu",
            "initialEventTimestamp": "2024-01-01T00:00:00.123Z",
        }

    def test_notification_message_has_castores_shape(self) -> None:
        """A notification message carries the event in its Castore form (no null payload)."""
        message = NotificationMessage(event_store_id="POKEMONS", event=caught_event())
        assert json.loads(message.model_dump_json()) == {
            "eventStoreId": "POKEMONS",
            "event": {
                "aggregateId": "pikachu",
                "version": 2,
                "type": "POKEMON_CAUGHT",
                "timestamp": "2024-01-01T00:00:00.000Z",
            },
        }

    def test_an_event_without_a_timestamp_has_no_null_timestamp(self) -> None:
        """A message built by hand about an event not stored yet leaves ``timestamp`` out,
        as ``payload`` (Castore's event JSON never holds a null timestamp); it reads back."""
        event = PokemonCaught(aggregate_id="mew", version=2)
        message = NotificationMessage(event_store_id="POKEMONS", event=event)
        text = message.model_dump_json()
        assert json.loads(text)["event"] == {
            "aggregateId": "mew",
            "version": 2,
            "type": "POKEMON_CAUGHT",
        }
        assert NotificationMessage.model_validate_json(text).event.timestamp is None

    def test_state_carrying_message_has_castores_shape(self) -> None:
        """A state-carrying message dumps the event's payload model and the aggregate, camelCase."""
        aggregate = Pokemon(
            aggregate_id="pikachu", version=1, name="Pikachu", level=3, status="wild"
        )
        message = StateCarryingMessage(
            event_store_id="POKEMONS", event=appeared_event(), aggregate=aggregate
        )
        assert message.model_dump(mode="json") == {
            "eventStoreId": "POKEMONS",
            "event": {
                "aggregateId": "pikachu",
                "version": 1,
                "type": "POKEMON_APPEARED",
                "timestamp": "2024-01-01T00:00:00.000Z",
                "payload": {"name": "Pikachu", "level": 3},
            },
            "aggregate": {
                "aggregateId": "pikachu",
                "version": 1,
                "name": "Pikachu",
                "level": 3,
                "status": "wild",
            },
        }

    def test_timestamps_are_normalised_to_utc_milliseconds(self) -> None:
        """Offsets are converted to UTC and sub-milliseconds truncated, as for events."""
        paris = timezone(timedelta(hours=1))
        message = AggregateExistsMessage(
            event_store_id="S",
            aggregate_id="a",
            initial_event_timestamp=datetime(2024, 1, 1, 1, 0, 0, 999_999, tzinfo=paris),
        )
        assert message.initial_event_timestamp == datetime(2024, 1, 1, 0, 0, 0, 999_000, tzinfo=UTC)

    def test_messages_accept_both_spellings_and_are_frozen(self) -> None:
        """camelCase and snake_case keys validate; messages are immutable."""
        camel = AggregateExistsMessage.model_validate(
            {"eventStoreId": "S", "aggregateId": "a", "initialEventTimestamp": "2024-01-01T00:00Z"}
        )
        snake = AggregateExistsMessage(
            event_store_id="S", aggregate_id="a", initial_event_timestamp=T0
        )
        assert camel == snake
        with pytest.raises(ValidationError):
            camel.aggregate_id = "b"

    def test_a_key_of_another_message_kind_is_refused(self) -> None:
        """A notification with an aggregate key is not a notification: the key is refused."""
        with pytest.raises(ValidationError, match="aggregate"):
            NotificationMessage.model_validate(
                {"eventStoreId": "S", "event": caught_event(), "aggregate": {}}
            )

    def test_naive_timestamps_are_refused(self) -> None:
        """A naive initial event timestamp is ambiguous and refused."""
        with pytest.raises(ValidationError, match="timezone"):
            AggregateExistsMessage(
                event_store_id="S", aggregate_id="a", initial_event_timestamp=datetime(2024, 1, 1)
            )

    @given(
        aggregate_id=st.text(min_size=1, max_size=20),
        store=st.text(min_size=1, max_size=10),
        millis=st.integers(min_value=0, max_value=10**12),
    )
    def test_aggregate_exists_json_round_trip(
        self, aggregate_id: str, store: str, millis: int
    ) -> None:
        """Any aggregate-exists message survives a JSON round trip unchanged."""
        message = AggregateExistsMessage(
            event_store_id=store,
            aggregate_id=aggregate_id,
            initial_event_timestamp=datetime(1970, 1, 1, tzinfo=UTC)
            + timedelta(milliseconds=millis),
        )
        assert AggregateExistsMessage.model_validate_json(message.model_dump_json()) == message


class TestTypeGuards:
    def test_guards_tell_kinds_by_keys(self) -> None:
        """B68: aggregateId → aggregate-exists; event → event-carrying; aggregate → state."""
        exists = {"eventStoreId": "S", "aggregateId": "a", "initialEventTimestamp": "x"}
        notification = {"eventStoreId": "S", "event": {}}
        state: dict[str, object] = {"eventStoreId": "S", "event": {}, "aggregate": None}
        table = [
            (exists, True, False, False, False),
            (notification, False, True, True, False),
            (state, False, True, False, True),
        ]
        for message, is_exists, carries, is_notification, is_state in table:
            assert is_aggregate_exists_message(message) is is_exists
            assert is_event_carrying_message(message) is carries
            assert is_notification_message(message) is is_notification
            assert is_state_carrying_message(message) is is_state

    def test_guards_accept_models(self) -> None:
        """The guards also recognise message models."""
        notification = NotificationMessage(event_store_id="S", event=caught_event())
        assert is_notification_message(notification)
        assert is_event_carrying_message(notification)
        assert not is_state_carrying_message(notification)
        assert not is_aggregate_exists_message(notification)


class TestRetryPolicy:
    def test_defaults_are_castores(self) -> None:
        """2 retries, 30 s then 60 s."""
        policy = RetryPolicy()
        assert (policy.retry_attempts, policy.retry_delay_in_ms, policy.retry_backoff_rate) == (
            2,
            30000,
            2,
        )
        assert [policy.delay_for(1), policy.delay_for(2)] == [30.0, 60.0]

    def test_delays_grow_with_the_backoff_rate(self) -> None:
        """B103: 1000 ms with rate 1.5 gives 1, 1.5 and 2.25 s."""
        policy = RetryPolicy(retry_attempts=3, retry_delay_in_ms=1000, retry_backoff_rate=1.5)
        assert [policy.delay_for(n) for n in (1, 2, 3)] == [1.0, 1.5, 2.25]

    def test_zero_is_allowed(self) -> None:
        """Zero retries, zero delay and a zero rate are valid options."""
        policy = RetryPolicy(0, 0, 0)
        assert policy.first_context(replay=True) == MessageContext(1, 0, True)

    @pytest.mark.parametrize(
        ("options", "name"),
        [
            ({"retry_attempts": -1}, "retry_attempts"),
            ({"retry_attempts": 1.5}, "retry_attempts"),
            ({"retry_attempts": "2"}, "retry_attempts"),
            ({"retry_attempts": True}, "retry_attempts"),
            ({"retry_delay_in_ms": -1}, "retry_delay_in_ms"),
            ({"retry_delay_in_ms": "fast"}, "retry_delay_in_ms"),
            ({"retry_delay_in_ms": float("inf")}, "retry_delay_in_ms"),
            ({"retry_backoff_rate": -0.5}, "retry_backoff_rate"),
            ({"retry_backoff_rate": float("nan")}, "retry_backoff_rate"),
            ({"retry_backoff_rate": None}, "retry_backoff_rate"),
        ],
    )
    def test_invalid_options_are_refused_by_name(
        self, options: dict[str, object], name: str
    ) -> None:
        """B103: a negative or non-numeric option raises ValueError naming it."""
        with pytest.raises(ValueError, match=f"Invalid {name}, please select a positive"):
            RetryPolicy(**options)  # type: ignore[arg-type]


class TestFilterPatterns:
    notification = NotificationMessage(event_store_id="POKEMONS", event=caught_event())
    exists = AggregateExistsMessage(
        event_store_id="POKEMONS", aggregate_id="a", initial_event_timestamp=T0
    )

    @pytest.mark.parametrize(
        ("pattern", "expected"),
        [
            ({}, True),
            ({"event_store_id": "POKEMONS"}, True),
            ({"event_store_id": "TRAINERS"}, False),
            ({"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"}, True),
            ({"event_store_id": "POKEMONS", "event_type": "POKEMON_APPEARED"}, False),
            ({"event_store_id": "TRAINERS", "event_type": "POKEMON_CAUGHT"}, False),
            # Castore's rule: a type without a store filters nothing.
            ({"event_type": "POKEMON_APPEARED"}, True),
        ],
    )
    def test_live_messages(self, pattern: FilterPattern, expected: bool) -> None:
        """B104/B106: store and type select live messages; {} takes everything."""
        assert matches(pattern, self.notification, replay=False) is expected

    def test_replays_need_on_replay(self) -> None:
        """B106: a replayed message matches only patterns with on_replay=True."""
        assert not matches({}, self.notification, replay=True)
        assert not matches({"on_replay": False}, self.notification, replay=True)
        assert matches({"on_replay": True}, self.notification, replay=True)
        assert not matches(
            {"on_replay": True, "event_store_id": "TRAINERS"}, self.notification, replay=True
        )
        assert matches({"on_replay": True}, self.notification, replay=False)

    def test_aggregate_exists_messages_never_match_a_typed_pattern(self) -> None:
        """An aggregate-exists message has no event type: typed patterns never match it."""
        assert matches({"event_store_id": "POKEMONS"}, self.exists, replay=False)
        assert not matches(
            {"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"},
            self.exists,
            replay=False,
        )

    def test_check_accepts_known_keys(self) -> None:
        """A well-formed pattern comes back as a plain dict."""
        pattern = {"event_store_id": "S", "event_type": "T", "on_replay": True}
        assert check_filter_pattern(pattern) == pattern

    @pytest.mark.parametrize(
        ("pattern", "error", "match"),
        [
            ({"eventStoreId": "S"}, ValueError, "unknown filter pattern key 'eventStoreId'"),
            ({"event_store_id": 3}, TypeError, "must be a str"),
            ({"on_replay": "yes"}, TypeError, "must be a bool"),
            (["event_store_id"], TypeError, "must be a mapping"),
        ],
    )
    def test_check_refuses_bad_patterns(
        self, pattern: object, error: type[Exception], match: str
    ) -> None:
        """Typos and wrong types in a pattern are refused instead of matching everything."""
        with pytest.raises(error, match=match):
            check_filter_pattern(pattern)  # type: ignore[arg-type]
