"""Messaging: messages, queues and buses, and event stores connected to them.

A ``ConnectedEventStore`` publishes a message after every pushed event to a channel
(``NotificationMessageQueue``, ``StateCarryingMessageBus``, ...). A channel carries its
messages through an adapter: the in-memory ones in ``castore_pydantic.messaging.memory``, or
real brokers in ``castore_pydantic.messaging.rabbitmq`` and ``castore_pydantic.messaging.redis``.
Workers and bus listeners are called as ``handler(message, context)`` with a
``MessageContext``, and what they return is awaited when it is awaitable (``async def``
handlers, or plain functions as in Castore).
"""

from castore_pydantic.messaging._channels import (
    AggregateExistsMessageBus,
    AggregateExistsMessageChannel,
    AggregateExistsMessageQueue,
    MessageChannel,
    MessageChannelAdapter,
    NotificationMessageBus,
    NotificationMessageChannel,
    NotificationMessageQueue,
    StateCarryingMessageBus,
    StateCarryingMessageChannel,
    StateCarryingMessageQueue,
)
from castore_pydantic.messaging._connected import ConnectedEventStore
from castore_pydantic.messaging._messages import (
    AggregateExistsMessage,
    DeadLetter,
    DeliveryGuarantee,
    FilterPattern,
    Message,
    MessageContext,
    MessageHandler,
    MessageType,
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

__all__ = [
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
