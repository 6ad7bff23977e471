"""Message models and the vocabulary every message channel adapter shares.

Messages keep Castore's JSON shapes (camelCase keys, ``...000Z`` timestamps), so a Python
service and a TypeScript Castore service can share a queue or a bus.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypedDict, TypeGuard, cast

from pydantic import ConfigDict, SerializeAsAny
from pydantic.alias_generators import to_camel

from castore_pydantic._event import Event, WireModel
from castore_pydantic._event import MillisecondTimestamp as Timestamp

__all__ = [
    "AggregateExistsMessage",
    "DeadLetter",
    "DeliveryGuarantee",
    "FilterPattern",
    "Message",
    "MessageContext",
    "MessageHandler",
    "MessageType",
    "NotificationMessage",
    "RetryPolicy",
    "StateCarryingMessage",
    "check_filter_pattern",
    "is_aggregate_exists_message",
    "is_event_carrying_message",
    "is_notification_message",
    "is_state_carrying_message",
    "matches",
]

_MESSAGE_CONFIG = ConfigDict(
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
    frozen=True,
    # Castore tells message kinds apart by which keys are present, so a key that does not
    # belong to the kind must be refused rather than dropped.
    extra="forbid",
)


class AggregateExistsMessage(WireModel):
    """Tells that an aggregate exists: published for its first event, or when replaying ids.

    JSON form: ``{"eventStoreId", "aggregateId", "initialEventTimestamp"}``.

    Attributes:
        event_store_id: The event store the aggregate belongs to.
        aggregate_id: The aggregate's id.
        initial_event_timestamp: The timestamp of its version-1 event.
    """

    model_config = _MESSAGE_CONFIG

    event_store_id: str
    aggregate_id: str
    initial_event_timestamp: Timestamp


class NotificationMessage(WireModel):
    """Carries one event of an event store.

    JSON form: ``{"eventStoreId", "event"}``. When a channel parses a message, ``event`` is
    validated as one of the source event store's event types.

    Attributes:
        event_store_id: The event store the event was pushed to.
        event: The event as stored (with its timestamp).
    """

    model_config = _MESSAGE_CONFIG

    event_store_id: str
    # SerializeAsAny: an event is dumped with its own class's serialiser, not Event's.
    event: SerializeAsAny[Event]


class StateCarryingMessage(WireModel):
    """Carries one event and the aggregate it produced.

    JSON form: ``{"eventStoreId", "event", "aggregate"}``.

    Attributes:
        event_store_id: The event store the event was pushed to.
        event: The event as stored (with its timestamp).
        aggregate: The aggregate after the event (usually an ``Aggregate`` model; a mapping
            when a channel cannot tell the store's aggregate class).
    """

    model_config = _MESSAGE_CONFIG

    event_store_id: str
    event: SerializeAsAny[Event]
    aggregate: Any


#: Any of the three messages.
Message: TypeAlias = AggregateExistsMessage | NotificationMessage | StateCarryingMessage

#: A channel's ``message_type``.
MessageType: TypeAlias = Literal["notification", "stateCarrying", "aggregateExists"]

#: What an adapter promises about delivery: ``"at-least-once"`` (a message may be handled
#: more than once, never lost once published) or ``"at-most-once"`` (never handled twice, may be
#: lost, e.g. when the process stops).
DeliveryGuarantee: TypeAlias = Literal["at-least-once", "at-most-once"]


def _has_key(message: object, snake: str, camel: str) -> bool:
    return isinstance(message, Mapping) and (snake in message or camel in message)


def is_aggregate_exists_message(message: object) -> TypeGuard[AggregateExistsMessage]:
    """Tell an aggregate-exists message (a model, or a mapping with an ``aggregateId`` key)."""
    return isinstance(message, AggregateExistsMessage) or _has_key(
        message, "aggregate_id", "aggregateId"
    )


def is_event_carrying_message(
    message: object,
) -> TypeGuard[NotificationMessage | StateCarryingMessage]:
    """Tell a message that carries an event (notification or state-carrying)."""
    return isinstance(message, NotificationMessage | StateCarryingMessage) or (
        isinstance(message, Mapping) and "event" in message
    )


def is_notification_message(message: object) -> TypeGuard[NotificationMessage]:
    """Tell a notification message: it carries an event and no aggregate."""
    return isinstance(message, NotificationMessage) or (
        isinstance(message, Mapping) and "event" in message and "aggregate" not in message
    )


def is_state_carrying_message(message: object) -> TypeGuard[StateCarryingMessage]:
    """Tell a state-carrying message: it carries an event and an aggregate."""
    return isinstance(message, StateCarryingMessage) or (
        isinstance(message, Mapping) and "event" in message and "aggregate" in message
    )


@dataclass(frozen=True, slots=True)
class MessageContext:
    """What a queue worker or bus listener receives with each message.

    Attributes:
        attempt: 1 for the first delivery, 2 for the first retry, and so on.
        retry_attempts_left: How many retries remain if this attempt fails.
        replay: Whether the message was published as a replay of history
            (``publish_message(..., replay=True)``); retries of a replay keep ``True``.
    """

    attempt: int
    retry_attempts_left: int
    replay: bool


#: A queue worker or bus listener: ``async def handler(message, context) -> None``, or a
#: plain function, as Castore allows (it runs on the event loop, so it must not block).
MessageHandler: TypeAlias = Callable[[Any, MessageContext], Awaitable[None] | None]


def _check_number(name: str, value: object, *, integer: bool) -> None:
    kind = "integer" if integer else "number"
    valid = (
        isinstance(value, int) if integer else isinstance(value, int | float)
    ) and not isinstance(value, bool)
    if not valid or value < 0 or not math.isfinite(value):  # type: ignore[operator,arg-type]
        raise ValueError(f"Invalid {name}, please select a positive {kind} (got {value!r}).")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how late a failed message is handled again.

    After attempt ``n`` fails, the message is retried after
    ``retry_delay_in_ms * retry_backoff_rate ** (n - 1)`` milliseconds, as long as retries
    remain. With the defaults a message is handled at most 3 times, 30 s then 60 s apart.

    Attributes:
        retry_attempts: How many retries after the first attempt (``0`` disables retrying).
        retry_delay_in_ms: The delay before the first retry.
        retry_backoff_rate: The factor applied to the delay for each further retry.

    Raises:
        ValueError: An option is negative, not a number, or not finite; the message names it.
    """

    retry_attempts: int = 2
    retry_delay_in_ms: float = 30000
    retry_backoff_rate: float = 2

    def __post_init__(self) -> None:
        _check_number("retry_attempts", self.retry_attempts, integer=True)
        _check_number("retry_delay_in_ms", self.retry_delay_in_ms, integer=False)
        _check_number("retry_backoff_rate", self.retry_backoff_rate, integer=False)

    def delay_for(self, attempt: int) -> float:
        """The delay in seconds before retrying a message whose ``attempt`` just failed."""
        return float(self.retry_delay_in_ms * self.retry_backoff_rate ** (attempt - 1) / 1000)

    def first_context(self, *, replay: bool) -> MessageContext:
        """The context of a message's first delivery."""
        return MessageContext(attempt=1, retry_attempts_left=self.retry_attempts, replay=replay)


class FilterPattern(TypedDict, total=False):
    """Which messages a bus listener receives; every key is optional.

    Attributes:
        event_store_id: Only messages of this event store.
        event_type: Only events of this type; taken into account together with
            ``event_store_id`` only (as in Castore: alone it filters nothing).
        on_replay: Also receive replayed messages (default ``False``: replays are skipped).
    """

    event_store_id: str
    event_type: str
    on_replay: bool


_PATTERN_KEYS = {"event_store_id": str, "event_type": str, "on_replay": bool}


#: Dead-letter error texts are cut to this length (RabbitMQ headers must fit in one frame).
MAX_ERROR_LENGTH = 4000


def describe_error(error: BaseException) -> str:
    """An error as dead-letter text: ``"ValueError: boom"``, cut to ``MAX_ERROR_LENGTH``."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 3] + "..."


class HandlerCancelledError(Exception):
    """A handler raised ``CancelledError`` while its task was not being cancelled."""


async def run_handler(handler: MessageHandler, message: Any, context: MessageContext) -> None:
    """Call ``handler(message, context)`` and await what it returns if that is awaitable.

    A plain function is a handler too (Castore awaits whatever its workers return): what
    it returns is ignored unless it is awaitable, as awaiting ``None`` would fail every
    delivery after the work was done. A ``concurrent.futures.Future`` (an executor's
    work) is awaited too, so its failure fails the attempt. A generator or an async
    generator (a stray ``yield``) means work that never ran: that is a failure, raised as
    ``TypeError``, so that the message is retried or dead-lettered instead of acknowledged.

    A handler that awaited something another task cancelled raises ``CancelledError``
    although nobody cancelled the handler's own task: that is the handler failing, and it
    is raised as ``HandlerCancelledError`` so that it is retried or dead-lettered like any
    failure. Cancelling the task itself (a worker stopping) still cancels it.
    """
    try:
        result = handler(message, context)
        if inspect.isawaitable(result):
            await result
        elif isinstance(result, concurrent.futures.Future):
            await asyncio.wrap_future(result)
        elif inspect.isasyncgen(result) or inspect.isgenerator(result):
            raise TypeError(
                f"handler {_handler_name(handler)} returned {type(result).__qualname__}: its"
                " body never ran (a stray yield?); a handler is a function or an async def"
            )
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise
        raise HandlerCancelledError(
            "the handler raised CancelledError without being cancelled (it awaited a task "
            "or future that something else cancelled)"
        ) from exc


def _handler_name(handler: MessageHandler) -> str:
    # A callable object has no __qualname__ of its own: it is named by its class.
    return str(getattr(handler, "__qualname__", type(handler).__qualname__))


def listener_name(handler: MessageHandler, listener_id: str | None) -> str:
    """A bus listener's id: ``listener_id``, or the handler's qualified name.

    Raises:
        ValueError: ``listener_id`` is given but not a non-empty string.
    """
    if listener_id is None:
        return _handler_name(handler)
    if not isinstance(listener_id, str) or not listener_id:
        raise ValueError("listener_id must be a non-empty string")
    return listener_id


def same_handler(first: MessageHandler, second: MessageHandler) -> bool:
    """Whether two registrations name one handler.

    The same object, or the same method of the same object (Python makes a new bound method
    on each attribute access). Never ``==``: two handler objects that compare equal (two
    dataclass instances with equal fields) are still two listeners.
    """
    if first is second:
        return True
    return (
        inspect.ismethod(first)
        and inspect.ismethod(second)
        and first.__self__ is second.__self__
        and first.__func__ is second.__func__
    )


def check_filter_pattern(pattern: Mapping[str, object]) -> FilterPattern:
    """Validate a filter pattern given to a bus adapter's ``on``.

    Returns:
        The pattern as a plain ``FilterPattern`` dict.

    Raises:
        ValueError: An unknown key (``eventStoreId`` instead of ``event_store_id``, say).
        TypeError: A value of the wrong type.
    """
    if not isinstance(pattern, Mapping):
        raise TypeError(f"a filter pattern must be a mapping, got {type(pattern).__name__}")
    for key, value in pattern.items():
        expected = _PATTERN_KEYS.get(key)
        if expected is None:
            known = ", ".join(_PATTERN_KEYS)
            raise ValueError(f"unknown filter pattern key {key!r}; the keys are: {known}")
        if not isinstance(value, expected):
            raise TypeError(
                f"filter pattern key {key!r} must be a {expected.__name__}, got {value!r}"
            )
    return cast("FilterPattern", dict(pattern))


def matches(pattern: FilterPattern, message: Message, replay: bool) -> bool:
    """Tell whether a bus listener with ``pattern`` receives ``message``.

    Castore's rules, in order: a replayed message needs ``on_replay=True``; with both
    ``event_store_id`` and ``event_type`` the store and the event's type must equal (an
    aggregate-exists message has no type, so it never matches); with ``event_store_id`` only,
    the store must equal; otherwise (``{}`` or ``event_type`` alone) everything matches.
    Bus adapters work out a listener's patterns once, when it registers, by these rules.
    """
    if replay and not pattern.get("on_replay", False):
        return False
    wanted_store = pattern.get("event_store_id")
    wanted_type = pattern.get("event_type")
    if wanted_store is not None and wanted_type is not None:
        event_type = None if isinstance(message, AggregateExistsMessage) else message.event.type
        return message.event_store_id == wanted_store and event_type == wanted_type
    if wanted_store is not None:
        return message.event_store_id == wanted_store
    return True


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message whose handling failed on every attempt, kept aside by its adapter.

    Attributes:
        message: The message.
        error: The last error, as text (``"ValueError: boom"``, cut to 4,000 characters).
        attempts: How many times it was handled.
        replay: Whether it was published as a replay.
        listener_id: The bus listener that failed (``None`` for queues).
    """

    message: Message
    error: str
    attempts: int
    replay: bool
    listener_id: str | None = None
