from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from castore_pydantic import Event, EventStore
from castore_pydantic.errors import (
    AggregateNotFoundError,
    MessageChannelEventStoreNotFoundError,
    UndefinedMessageChannelAdapterError,
    UnknownEventTypeError,
)
from castore_pydantic.messaging import (
    AggregateExistsMessage,
    AggregateExistsMessageBus,
    AggregateExistsMessageQueue,
    Message,
    MessageChannel,
    MessageChannelAdapter,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
    StateCarryingMessage,
    StateCarryingMessageBus,
    StateCarryingMessageQueue,
)
from castore_pydantic.messaging.memory import (
    InMemoryMessageBusAdapter,
    InMemoryMessageQueueAdapter,
)
from tests.domain import (
    Pokemon,
    PokemonAppeared,
    PokemonCaught,
    appeared,
    make_store,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


class RecordingAdapter:
    """A minimal third-party adapter: records what the channel hands it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Message], bool]] = []

    async def publish_message(self, message: Message, *, replay: bool = False) -> None:
        self.calls.append(("one", [message], replay))

    async def publish_messages(self, messages: Sequence[Message], *, replay: bool = False) -> None:
        self.calls.append(("many", list(messages), replay))


def caught_message(
    store_id: str = "POKEMONS", aggregate_id: str = "pikachu"
) -> NotificationMessage:
    return NotificationMessage(
        event_store_id=store_id,
        event=PokemonCaught(aggregate_id=aggregate_id, version=2, timestamp=T0),
    )


QUEUES = [NotificationMessageQueue, StateCarryingMessageQueue, AggregateExistsMessageQueue]
BUSES = [NotificationMessageBus, StateCarryingMessageBus, AggregateExistsMessageBus]
KINDS = ["notification", "stateCarrying", "aggregateExists"]


class TestConstruction:
    @pytest.mark.parametrize(
        ("cls", "message_type"),
        list(zip(QUEUES, KINDS, strict=True)),
    )
    def test_queues(self, cls: Any, message_type: str) -> None:
        """B62: queues take message_queue_id/message_queue_adapter and are of type "queue"."""
        adapter = RecordingAdapter()
        store = make_store()
        queue = cls(
            message_queue_id="q", source_event_stores=[store], message_queue_adapter=adapter
        )
        assert (queue.message_channel_id, queue.message_queue_id) == ("q", "q")
        assert queue.message_channel_type == "queue"
        assert queue.message_type == message_type
        assert queue.source_event_stores == (store,)
        assert queue.message_channel_adapter is adapter
        assert queue.message_queue_adapter is adapter
        other = RecordingAdapter()
        queue.message_queue_adapter = other
        assert queue.get_message_channel_adapter() is other

    @pytest.mark.parametrize(
        ("cls", "message_type"),
        list(zip(BUSES, KINDS, strict=True)),
    )
    def test_buses(self, cls: Any, message_type: str) -> None:
        """B62: every bus, AggregateExistsMessageBus included, takes message_bus_id."""
        adapter = RecordingAdapter()
        bus = cls(
            message_bus_id="b", source_event_stores=[make_store()], message_bus_adapter=adapter
        )
        assert (bus.message_channel_id, bus.message_bus_id) == ("b", "b")
        assert bus.message_channel_type == "bus"
        assert bus.message_type == message_type
        assert bus.message_bus_adapter is adapter
        bus.message_channel_adapter = None
        assert bus.message_bus_adapter is None

    def test_aggregate_exists_bus_refuses_the_queue_keyword(self) -> None:
        """Castore's naming quirk is not copied: message_queue_id is not a bus keyword."""
        with pytest.raises(TypeError, match="message_queue_id"):
            AggregateExistsMessageBus(message_queue_id="b", source_event_stores=[])  # type: ignore[call-arg]

    def test_an_empty_id_is_refused(self) -> None:
        """A channel id must be a non-empty string."""
        with pytest.raises(ValueError, match="non-empty"):
            NotificationMessageQueue(message_queue_id="", source_event_stores=[])

    def test_first_store_with_an_id_wins(self) -> None:
        """Two source stores with one id: get_event_store returns the first."""
        first, second = make_store(), make_store()
        queue = NotificationMessageQueue(message_queue_id="q", source_event_stores=[first, second])
        assert queue.get_event_store("POKEMONS") is first

    def test_unknown_store_error_names_the_channel(self) -> None:
        """get_event_store raises Castore's message for an unknown store."""
        bus = NotificationMessageBus(message_bus_id="my-bus", source_event_stores=[make_store()])
        with pytest.raises(MessageChannelEventStoreNotFoundError) as info:
            bus.get_event_store("TRAINERS")
        assert str(info.value) == (
            "Unable to find event store TRAINERS in message bus my-bus. "
            "Did you provide it in the constructor?"
        )
        assert info.value.event_store_id == "TRAINERS"

    def test_missing_adapter_error_names_the_channel(self) -> None:
        """get_message_channel_adapter raises Castore's message without an adapter."""
        queue = NotificationMessageQueue(message_queue_id="my-queue", source_event_stores=[])
        with pytest.raises(UndefinedMessageChannelAdapterError) as info:
            queue.get_message_channel_adapter()
        assert str(info.value) == "Adapter undefined for message queue my-queue"

    def test_adapters_satisfy_the_protocol(self) -> None:
        """The in-memory adapters and a plain class are MessageChannelAdapters."""
        for adapter in (InMemoryMessageQueueAdapter(), InMemoryMessageBusAdapter()):
            assert isinstance(adapter, MessageChannelAdapter)
        assert isinstance(RecordingAdapter(), MessageChannelAdapter)


class TestPublishing:
    async def test_publish_message_forwards_the_replay_flag(self) -> None:
        """B65: the adapter gets the message with replay False by default, True when asked."""
        adapter = RecordingAdapter()
        queue = NotificationMessageQueue(
            message_queue_id="q", source_event_stores=[make_store()], message_queue_adapter=adapter
        )
        message = caught_message()
        await queue.publish_message(message)
        await queue.publish_message(message, replay=True)
        assert adapter.calls == [("one", [message], False), ("one", [message], True)]

    async def test_unknown_store_is_refused_before_the_adapter(self) -> None:
        """B63: a message of a store that is not a source never reaches the adapter."""
        adapter = RecordingAdapter()
        queue = NotificationMessageQueue(
            message_queue_id="q", source_event_stores=[make_store()], message_queue_adapter=adapter
        )
        with pytest.raises(MessageChannelEventStoreNotFoundError, match="in message queue q"):
            await queue.publish_message(caught_message("TRAINERS"))
        assert adapter.calls == []

    async def test_store_is_checked_before_the_adapter(self) -> None:
        """B64: without adapter the error is Undefined...; an unknown store is reported first."""
        queue = NotificationMessageQueue(message_queue_id="q", source_event_stores=[make_store()])
        with pytest.raises(MessageChannelEventStoreNotFoundError):
            await queue.publish_message(caught_message("TRAINERS"))
        with pytest.raises(UndefinedMessageChannelAdapterError, match="message queue q"):
            await queue.publish_message(caught_message())

    async def test_publish_messages_checks_all_then_calls_once(self) -> None:
        """B66: every store id is checked before anything is published; one adapter call."""
        adapter = RecordingAdapter()
        bus = NotificationMessageBus(
            message_bus_id="b", source_event_stores=[make_store()], message_bus_adapter=adapter
        )
        good = caught_message()
        with pytest.raises(MessageChannelEventStoreNotFoundError):
            await bus.publish_messages([good, caught_message("TRAINERS")])
        assert adapter.calls == []
        await bus.publish_messages([good, good], replay=True)
        assert adapter.calls == [("many", [good, good], True)]

    async def test_a_message_of_another_kind_is_refused(self) -> None:
        """A notification published to a state-carrying channel is a TypeError."""
        adapter = RecordingAdapter()
        queue = StateCarryingMessageQueue(
            message_queue_id="q", source_event_stores=[make_store()], message_queue_adapter=adapter
        )
        with pytest.raises(TypeError, match="publishes StateCarryingMessages"):
            await queue.publish_message(caught_message())  # type: ignore[arg-type]
        assert adapter.calls == []

    async def test_a_mapping_is_validated_into_a_message(self) -> None:
        """A mapping in Castore's form is validated and published as a message model."""
        adapter = RecordingAdapter()
        queue = NotificationMessageQueue(
            message_queue_id="q", source_event_stores=[make_store()], message_queue_adapter=adapter
        )
        await queue.publish_message(
            {"eventStoreId": "POKEMONS", "event": {**appeared(), "timestamp": "2024-01-01T00:00Z"}}
        )
        ((_, [published], _),) = adapter.calls
        assert isinstance(published, NotificationMessage)
        assert isinstance(published.event, PokemonAppeared)

    async def test_an_invalid_event_is_refused_before_the_adapter(self) -> None:
        """An event that is not one of the store's types is refused; nothing is published."""
        adapter = RecordingAdapter()
        queue = NotificationMessageQueue(
            message_queue_id="q", source_event_stores=[make_store()], message_queue_adapter=adapter
        )
        foreign = Event(aggregate_id="a", version=1, type="TRAINER_CREATED", timestamp=T0)
        with pytest.raises(UnknownEventTypeError):
            await queue.publish_message(
                NotificationMessage(event_store_id="POKEMONS", event=foreign)
            )
        assert adapter.calls == []

    async def test_a_base_event_becomes_the_stores_class(self) -> None:
        """An event built as a plain Event is published as the store's event class."""
        adapter = RecordingAdapter()
        queue = NotificationMessageQueue(
            message_queue_id="q", source_event_stores=[make_store()], message_queue_adapter=adapter
        )
        plain = Event(aggregate_id="a", version=2, type="POKEMON_CAUGHT", timestamp=T0)
        await queue.publish_message(NotificationMessage(event_store_id="POKEMONS", event=plain))
        ((_, [published], _),) = adapter.calls
        assert isinstance(published.event, PokemonCaught)  # type: ignore[union-attr]
        assert published.event.model_dump() == plain.model_dump()  # type: ignore[union-attr]


class TestGetAggregateAndPublishMessage:
    async def test_publishes_the_aggregate_at_the_events_version(self) -> None:
        """B67: the aggregate is built up to the notification's version, not the latest."""
        store = make_store()
        await store.push_event(appeared())
        second = await store.push_event(
            {"aggregateId": "pikachu", "version": 2, "type": "POKEMON_CAUGHT"}
        )
        await store.push_event(
            {"aggregateId": "pikachu", "version": 3, "type": "POKEMON_LEVELED_UP"}
        )
        adapter = RecordingAdapter()
        bus = StateCarryingMessageBus(
            message_bus_id="b", source_event_stores=[store], message_bus_adapter=adapter
        )
        notification = NotificationMessage(event_store_id="POKEMONS", event=second.event)
        await bus.get_aggregate_and_publish_message(notification, replay=True)
        ((_, [published], replay),) = adapter.calls
        assert replay is True
        assert published == StateCarryingMessage(
            event_store_id="POKEMONS",
            event=second.event,
            aggregate=Pokemon(
                aggregate_id="pikachu", version=2, name="Pikachu", level=3, status="caught"
            ),
        )

    async def test_missing_aggregate_raises(self) -> None:
        """B67: an aggregate without events raises AggregateNotFoundError; nothing is published."""
        adapter = RecordingAdapter()
        queue = StateCarryingMessageQueue(
            message_queue_id="q", source_event_stores=[make_store()], message_queue_adapter=adapter
        )
        with pytest.raises(AggregateNotFoundError):
            await queue.get_aggregate_and_publish_message(caught_message(aggregate_id="ghost"))
        assert adapter.calls == []

    async def test_a_version_that_is_not_stored_is_refused(self) -> None:
        """A notification whose version is not stored would get the aggregate of an earlier
        version, not matching its event: it is a ValueError and nothing is published (the
        last stored version's aggregate used to go out)."""
        store = make_store()
        await store.push_event(appeared())
        adapter = RecordingAdapter()
        queue = StateCarryingMessageQueue(
            message_queue_id="q", source_event_stores=[store], message_queue_adapter=adapter
        )
        with pytest.raises(ValueError, match="version 2 of aggregate pikachu is not stored"):
            await queue.get_aggregate_and_publish_message(caught_message())
        assert adapter.calls == []

    async def test_unknown_store_raises(self) -> None:
        """The notification's store must be a source of the channel."""
        queue = StateCarryingMessageQueue(message_queue_id="q", source_event_stores=[make_store()])
        with pytest.raises(MessageChannelEventStoreNotFoundError):
            await queue.get_aggregate_and_publish_message(caught_message("TRAINERS"))


def untyped_reducer(aggregate, event):  # type: ignore[no-untyped-def]
    return {"aggregateId": event.aggregate_id, "version": event.version}


class TestParseMessage:
    def channel(self, cls: type[MessageChannel[Any]] = NotificationMessageQueue) -> Any:
        return cls(message_queue_id="q", source_event_stores=[make_store()])  # type: ignore[call-arg]

    @pytest.mark.parametrize("as_bytes", [False, True])
    def test_json_text_becomes_the_stores_event_class(self, as_bytes: bool) -> None:
        """A wire body parses into a message whose event is the store's own class."""
        message = caught_message()
        text = message.model_dump_json()
        parsed = self.channel().parse_message(text.encode() if as_bytes else text)
        assert parsed == message
        assert type(parsed.event) is PokemonCaught

    def test_snake_case_mapping_is_accepted(self) -> None:
        """Mappings may use snake_case keys."""
        parsed = self.channel().parse_message(
            {"event_store_id": "POKEMONS", "event": {**appeared(), "timestamp": T0}}
        )
        assert type(parsed.event) is PokemonAppeared

    def test_state_carrying_aggregate_becomes_the_reducers_model(self) -> None:
        """The aggregate is validated as the model the store's reducer returns."""
        channel = self.channel(StateCarryingMessageQueue)
        aggregate = {"aggregateId": "p", "version": 1, "name": "Mew", "level": 5, "status": "wild"}
        parsed = channel.parse_message(
            {
                "eventStoreId": "POKEMONS",
                "event": {**appeared("p"), "timestamp": "2024-01-01T00:00:00.000Z"},
                "aggregate": aggregate,
            }
        )
        assert parsed.aggregate == Pokemon.model_validate(aggregate)

    def test_aggregate_stays_data_without_a_model(self) -> None:
        """With an unannotated reducer the aggregate is kept as given."""
        store = EventStore(
            event_store_id="POKEMONS", event_types=[PokemonCaught], reducer=untyped_reducer
        )
        queue = StateCarryingMessageQueue(message_queue_id="q", source_event_stores=[store])
        raw = {"aggregateId": "p", "version": 2, "anything": [1]}
        parsed = queue.parse_message(
            {"eventStoreId": "POKEMONS", "event": caught_message().event, "aggregate": raw}
        )
        assert parsed.aggregate == raw

    def test_aggregate_exists_message(self) -> None:
        """An aggregate-exists body parses on an aggregate-exists channel."""
        text = (
            '{"eventStoreId":"POKEMONS","aggregateId":"a",'
            '"initialEventTimestamp":"2024-01-01T00:00:00.000Z"}'
        )
        parsed = self.channel(AggregateExistsMessageQueue).parse_message(text)
        assert parsed == AggregateExistsMessage(
            event_store_id="POKEMONS", aggregate_id="a", initial_event_timestamp=T0
        )

    def test_unknown_event_type_is_refused(self) -> None:
        """An event type the store does not declare is an UnknownEventTypeError."""
        with pytest.raises(UnknownEventTypeError):
            self.channel().parse_message(
                {"eventStoreId": "POKEMONS", "event": {**appeared(), "type": "NOPE"}}
            )

    def test_invalid_payload_is_a_validation_error(self) -> None:
        """An event that breaks its model's constraints is a ValidationError."""
        with pytest.raises(ValidationError, match="level"):
            self.channel().parse_message(
                {"eventStoreId": "POKEMONS", "event": appeared(payload={"name": "x", "level": 0})}
            )

    def test_unknown_store_is_refused(self) -> None:
        """A message of a store that is not a source is refused."""
        with pytest.raises(MessageChannelEventStoreNotFoundError):
            self.channel().parse_message(caught_message("TRAINERS").model_dump_json())

    def test_message_of_another_kind_is_refused(self) -> None:
        """A state-carrying body is not a notification: its extra key is refused."""
        with pytest.raises(ValidationError, match="aggregate"):
            self.channel().parse_message(
                {"eventStoreId": "POKEMONS", "event": caught_message().event, "aggregate": {}}
            )

    @pytest.mark.parametrize(
        ("data", "error"),
        [
            ("[1, 2]", TypeError),
            ("not json", ValueError),
            ('{"event": {}}', ValidationError),
            ('{"eventStoreId": 3, "event": {}}', ValidationError),
        ],
    )
    def test_malformed_bodies_are_refused(self, data: str, error: type[Exception]) -> None:
        """Bodies that are not message objects raise a clear error."""
        with pytest.raises(error):
            self.channel().parse_message(data)
