"""Message channels: queues and buses that carry one kind of message from event stores."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from castore_pydantic._aggregate import reduced_model
from castore_pydantic._event import Event
from castore_pydantic._event_store import EventStore
from castore_pydantic.errors import (
    MessageChannelEventStoreNotFoundError,
    UndefinedMessageChannelAdapterError,
)
from castore_pydantic.messaging._messages import (
    AggregateExistsMessage,
    Message,
    MessageType,
    NotificationMessage,
    StateCarryingMessage,
)
from castore_pydantic.messaging._wire import notification_parser

__all__ = [
    "AggregateExistsMessageBus",
    "AggregateExistsMessageChannel",
    "AggregateExistsMessageQueue",
    "MessageChannel",
    "MessageChannelAdapter",
    "NotificationMessageBus",
    "NotificationMessageChannel",
    "NotificationMessageQueue",
    "StateCarryingMessageBus",
    "StateCarryingMessageChannel",
    "StateCarryingMessageQueue",
]

M = TypeVar("M", AggregateExistsMessage, NotificationMessage, StateCarryingMessage)

#: What ``parse_message`` accepts: JSON text, a mapping, or a message model.
RawMessage = str | bytes | bytearray | Mapping[str, Any] | BaseModel


@runtime_checkable
class MessageChannelAdapter(Protocol):
    """What a message channel needs from its adapter. Third-party adapters need not subclass it.

    Channels validate messages before calling the adapter: every message is of the channel's
    kind and comes from one of its source event stores.
    """

    async def publish_message(self, message: Message, *, replay: bool = False) -> None:
        """Publish one message; ``replay`` tells consumers it replays history."""
        ...

    async def publish_messages(self, messages: Sequence[Message], *, replay: bool = False) -> None:
        """Publish several messages, in order."""
        ...


def _binds(adapter: object) -> bool:
    """Whether an adapter learns the channels it is handed (the in-memory ones do).

    Looked up on its class, not the instance: a mock adapter answers every attribute.
    """
    return inspect.getattr_static(type(adapter), "_bind_channel", None) is not None


class MessageChannel(Generic[M]):
    """Base of every channel: a queue or bus of one kind of message (see the subclasses).

    Attributes:
        message_channel_id: The channel's id.
        message_channel_adapter: The adapter that carries messages (``attach_to`` sets it).
        message_type: ``"notification"``, ``"stateCarrying"`` or ``"aggregateExists"``.
        message_channel_type: ``"queue"`` or ``"bus"``.
    """

    message_type: ClassVar[MessageType]
    message_channel_type: ClassVar[Literal["queue", "bus"]]
    message_class: ClassVar[type[BaseModel]]

    def __init__(
        self,
        *,
        message_channel_id: str,
        source_event_stores: Sequence[EventStore[Any, Any]],
        message_channel_adapter: MessageChannelAdapter | None = None,
    ) -> None:
        if not isinstance(message_channel_id, str) or not message_channel_id:
            raise ValueError("a message channel id must be a non-empty string")
        self.message_channel_id = message_channel_id
        self._message_channel_adapter = message_channel_adapter
        self._source_event_stores = tuple(source_event_stores)
        by_id: dict[str, EventStore[Any, Any]] = {}
        for store in self._source_event_stores:
            by_id.setdefault(store.event_store_id, store)  # the first store with an id wins
        self._stores_by_id = by_id
        self._aggregate_classes: dict[str, type[BaseModel] | None] = {}
        self._bind(message_channel_adapter)

    @property
    def message_channel_adapter(self) -> MessageChannelAdapter | None:
        """The adapter that carries the channel's messages (``attach_to`` sets it)."""
        return self._message_channel_adapter

    @message_channel_adapter.setter
    def message_channel_adapter(self, adapter: MessageChannelAdapter | None) -> None:
        previous = self._message_channel_adapter
        self._message_channel_adapter = adapter
        if previous is not adapter and _binds(previous):
            previous._unbind_channel(self)  # type: ignore[union-attr]
        self._bind(adapter)

    def _bind(self, adapter: MessageChannelAdapter | None) -> None:
        # An in-memory adapter given here (Castore's constructor or attribute) learns its
        # channel, as attach_to tells it.
        if _binds(adapter):
            adapter._bind_channel(self)  # type: ignore[union-attr]

    def _carries(self, message: object) -> bool:
        """Whether a message is of this channel's kind and from one of its stores."""
        return (
            isinstance(message, self.message_class)
            and getattr(message, "event_store_id", None) in self._stores_by_id
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message_channel_id!r})"

    @property
    def source_event_stores(self) -> tuple[EventStore[Any, Any], ...]:
        """The event stores whose messages this channel carries."""
        return self._source_event_stores

    def get_event_store(self, event_store_id: str) -> EventStore[Any, Any]:
        """Return the source event store with this id.

        Raises:
            MessageChannelEventStoreNotFoundError: It is not a source event store.
        """
        store = self._stores_by_id.get(event_store_id)
        if store is None:
            raise MessageChannelEventStoreNotFoundError(
                event_store_id, self.message_channel_type, self.message_channel_id
            )
        return store

    def get_message_channel_adapter(self) -> MessageChannelAdapter:
        """Return the adapter.

        Raises:
            UndefinedMessageChannelAdapterError: No adapter is attached.
        """
        adapter = self.message_channel_adapter
        if adapter is None:
            raise UndefinedMessageChannelAdapterError(
                self.message_channel_type, self.message_channel_id
            )
        return adapter

    # -- validation ------------------------------------------------------------------------

    def parse_message(self, data: RawMessage) -> M:
        """Validate a message of this channel's kind, e.g. a body read from a broker.

        The event store must be a source of the channel and the event is validated as one
        of that store's event types; a state-carrying message's aggregate is validated as
        the model the store's reducer is annotated to return (left as data otherwise).

        Args:
            data: Castore JSON text (``str`` or ``bytes``), a mapping with camelCase or
                snake_case keys, or a message model.

        Raises:
            MessageChannelEventStoreNotFoundError: The event store is not a source.
            pydantic.ValidationError: The message or its event is invalid.
            UnknownEventTypeError: The event's type is not one of the store's.
            ValueError: ``data`` is not valid JSON.
            TypeError: ``data`` is not a JSON object.
        """
        if isinstance(data, BaseModel):
            raw: Any = data.model_dump(by_alias=True)
        elif isinstance(data, str | bytes | bytearray):
            raw = json.loads(data)
        else:
            raw = data
        if not isinstance(raw, Mapping):
            raise TypeError(f"a message must be a JSON object, got {type(raw).__name__}")
        event_store_id = raw.get("eventStoreId", raw.get("event_store_id"))
        if not isinstance(event_store_id, str):
            self.message_class.model_validate(raw)  # raises a ValidationError naming the key
            raise TypeError("a message needs an eventStoreId")  # pragma: no cover
        store = self.get_event_store(event_store_id)
        fields = dict(raw)
        if "event" in fields:
            fields["event"] = store.context.validate_input(fields["event"], timestamp=False)
        if "aggregate" in fields:
            fields["aggregate"] = self._validate_aggregate(store, fields["aggregate"])
        return self.message_class.model_validate(fields)  # type: ignore[return-value]

    def _validate_aggregate(self, store: EventStore[Any, Any], aggregate: Any) -> Any:
        if store.event_store_id not in self._aggregate_classes:
            self._aggregate_classes[store.event_store_id] = reduced_model(store.reducer)
        model = self._aggregate_classes[store.event_store_id]
        if model is None or isinstance(aggregate, model):
            return aggregate
        return model.model_validate(aggregate)

    def _check(self, message: M | Mapping[str, Any]) -> M:
        """Check a message before publishing it: its kind, its store, its event's type."""
        if not isinstance(message, self.message_class):
            if isinstance(message, Mapping):
                return self.parse_message(message)
            raise TypeError(
                f"{type(self).__name__} {self.message_channel_id!r} publishes "
                f"{self.message_class.__name__}s, not {type(message).__name__}"
            )
        store = self.get_event_store(message.event_store_id)
        event: Event | None = getattr(message, "event", None)
        if event is not None and type(event) not in store.event_types:
            # e.g. a base ``Event`` built by hand: make it an instance of the store's class.
            validated = store.context.validate_input(event, timestamp=False)
            return message.model_copy(update={"event": validated})
        return message

    # -- publishing ------------------------------------------------------------------------

    async def publish_message(
        self, message: M | Mapping[str, Any], *, replay: bool = False
    ) -> None:
        """Publish one message through the adapter.

        Args:
            message: A message of the channel's kind (or a mapping, validated first).
            replay: Mark the message as a replay of history (bus listeners skip replays
                unless their pattern has ``on_replay=True``).

        Raises:
            MessageChannelEventStoreNotFoundError: Its event store is not a source (checked
                first; the adapter is not called).
            UndefinedMessageChannelAdapterError: No adapter is attached.
            TypeError: The message is of another kind.
            MessageBrokerUnavailableError: The broker cannot be reached (real brokers).
        """
        checked = self._check(message)
        await self.get_message_channel_adapter().publish_message(checked, replay=replay)

    async def publish_messages(
        self, messages: Sequence[M | Mapping[str, Any]], *, replay: bool = False
    ) -> None:
        """Publish several messages with one adapter call, after checking all of them.

        Raises:
            MessageChannelEventStoreNotFoundError: A message's event store is not a source;
                nothing is published.
            UndefinedMessageChannelAdapterError: No adapter is attached.
        """
        checked = [self._check(message) for message in messages]
        await self.get_message_channel_adapter().publish_messages(checked, replay=replay)


class NotificationMessageChannel(MessageChannel[NotificationMessage]):
    """Base of channels carrying ``NotificationMessage`` (``{eventStoreId, event}``)."""

    message_type: ClassVar[MessageType] = "notification"
    message_class: ClassVar[type[BaseModel]] = NotificationMessage
    _wire_parser: Callable[[str | bytes | bytearray], NotificationMessage] | None = None

    def parse_message(self, data: RawMessage) -> NotificationMessage:
        """Validate a notification (see ``MessageChannel.parse_message``).

        Wire bodies (JSON text) are validated in one pass straight from JSON; whatever that
        pass does not accept is parsed as any message, with the same result or error.
        """
        if isinstance(data, str | bytes | bytearray):
            parser = self._wire_parser
            if parser is None:
                parser = self._wire_parser = notification_parser(self.source_event_stores)
            try:
                return parser(data)
            except Exception:  # noqa: S110 - the general parsing below says what is wrong
                pass
        return super().parse_message(data)


class StateCarryingMessageChannel(MessageChannel[StateCarryingMessage]):
    """Base of channels carrying ``StateCarryingMessage`` (``{eventStoreId, event, aggregate}``)."""

    message_type: ClassVar[MessageType] = "stateCarrying"
    message_class: ClassVar[type[BaseModel]] = StateCarryingMessage

    async def get_aggregate_and_publish_message(
        self, notification: NotificationMessage | Mapping[str, Any], *, replay: bool = False
    ) -> None:
        """Build the aggregate up to the notification's event and publish it with the event.

        Args:
            notification: A ``NotificationMessage`` (or its mapping) of a source store.
            replay: Mark the message as a replay.

        Raises:
            MessageChannelEventStoreNotFoundError: Its event store is not a source.
            AggregateNotFoundError: The aggregate has no events up to that version.
            ValueError: The notification's version is not stored (the aggregate built up to
                it would not match its event); nothing is published.
            UndefinedMessageChannelAdapterError: No adapter is attached.
        """
        if not isinstance(notification, NotificationMessage):
            notification = NotificationMessage.model_validate(notification)
        store = self.get_event_store(notification.event_store_id)
        event = notification.event
        found = await store.get_existing_aggregate(event.aggregate_id, max_version=event.version)
        if found.last_event.version != event.version:
            raise ValueError(
                f"version {event.version} of aggregate {event.aggregate_id} is not stored in "
                f"event store {notification.event_store_id} (the last one up to it is "
                f"{found.last_event.version}): the aggregate would not match the event"
            )
        aggregate = found.aggregate
        message = StateCarryingMessage(
            event_store_id=notification.event_store_id, event=event, aggregate=aggregate
        )
        await self.publish_message(message, replay=replay)


class AggregateExistsMessageChannel(MessageChannel[AggregateExistsMessage]):
    """Base of channels carrying ``AggregateExistsMessage``."""

    message_type: ClassVar[MessageType] = "aggregateExists"
    message_class: ClassVar[type[BaseModel]] = AggregateExistsMessage


class _QueueAliases(MessageChannel[Any]):
    """The queue keywords of the constructor and Castore's queue spellings of attributes."""

    message_channel_type: ClassVar[Literal["queue", "bus"]] = "queue"

    def __init__(
        self,
        *,
        message_queue_id: str,
        source_event_stores: Sequence[EventStore[Any, Any]],
        message_queue_adapter: MessageChannelAdapter | None = None,
    ) -> None:
        super().__init__(
            message_channel_id=message_queue_id,
            source_event_stores=source_event_stores,
            message_channel_adapter=message_queue_adapter,
        )

    @property
    def message_queue_id(self) -> str:
        """The queue's id (same as ``message_channel_id``)."""
        return self.message_channel_id

    @property
    def message_queue_adapter(self) -> MessageChannelAdapter | None:
        """The queue's adapter (same as ``message_channel_adapter``)."""
        return self.message_channel_adapter

    @message_queue_adapter.setter
    def message_queue_adapter(self, adapter: MessageChannelAdapter | None) -> None:
        self.message_channel_adapter = adapter


class _BusAliases(MessageChannel[Any]):
    """The bus keywords of the constructor and Castore's bus spellings of attributes."""

    message_channel_type: ClassVar[Literal["queue", "bus"]] = "bus"

    def __init__(
        self,
        *,
        message_bus_id: str,
        source_event_stores: Sequence[EventStore[Any, Any]],
        message_bus_adapter: MessageChannelAdapter | None = None,
    ) -> None:
        super().__init__(
            message_channel_id=message_bus_id,
            source_event_stores=source_event_stores,
            message_channel_adapter=message_bus_adapter,
        )

    @property
    def message_bus_id(self) -> str:
        """The bus's id (same as ``message_channel_id``)."""
        return self.message_channel_id

    @property
    def message_bus_adapter(self) -> MessageChannelAdapter | None:
        """The bus's adapter (same as ``message_channel_adapter``)."""
        return self.message_channel_adapter

    @message_bus_adapter.setter
    def message_bus_adapter(self, adapter: MessageChannelAdapter | None) -> None:
        self.message_channel_adapter = adapter


class NotificationMessageQueue(_QueueAliases, NotificationMessageChannel):
    """A queue of ``NotificationMessage``: each message is handled by one worker.

    Args:
        message_queue_id: The queue's id.
        source_event_stores: The event stores whose events it carries.
        message_queue_adapter: The adapter; usually set by the adapter's ``attach_to``.
    """


class StateCarryingMessageQueue(_QueueAliases, StateCarryingMessageChannel):
    """A queue of ``StateCarryingMessage``: each message is handled by one worker.

    Args:
        message_queue_id: The queue's id.
        source_event_stores: The event stores whose events it carries.
        message_queue_adapter: The adapter; usually set by the adapter's ``attach_to``.
    """


class AggregateExistsMessageQueue(_QueueAliases, AggregateExistsMessageChannel):
    """A queue of ``AggregateExistsMessage``: each message is handled by one worker.

    Args:
        message_queue_id: The queue's id.
        source_event_stores: The event stores whose aggregates it announces.
        message_queue_adapter: The adapter; usually set by the adapter's ``attach_to``.
    """


class NotificationMessageBus(_BusAliases, NotificationMessageChannel):
    """A bus of ``NotificationMessage``: every matching listener gets each message.

    Args:
        message_bus_id: The bus's id.
        source_event_stores: The event stores whose events it carries.
        message_bus_adapter: The adapter; usually set by the adapter's ``attach_to``.
    """


class StateCarryingMessageBus(_BusAliases, StateCarryingMessageChannel):
    """A bus of ``StateCarryingMessage``: every matching listener gets each message.

    Args:
        message_bus_id: The bus's id.
        source_event_stores: The event stores whose events it carries.
        message_bus_adapter: The adapter; usually set by the adapter's ``attach_to``.
    """


class AggregateExistsMessageBus(_BusAliases, AggregateExistsMessageChannel):
    """A bus of ``AggregateExistsMessage``: every matching listener gets each message.

    Unlike Castore's, it takes the bus keywords (``message_bus_id=``), like the other buses.

    Args:
        message_bus_id: The bus's id.
        source_event_stores: The event stores whose aggregates it announces.
        message_bus_adapter: The adapter; usually set by the adapter's ``attach_to``.
    """
