"""Every exception castore-pydantic raises, in one tree under :class:`CastoreError`.

Invalid *data* is reported with Pydantic's own :class:`pydantic.ValidationError` (a
``ValueError``), unchanged. Everything else is one of these classes. Each error carries typed
fields and builds its message from them, so callers never need to parse strings, and each also
subclasses the builtin exception that fits it::

    CastoreError
    ├── EventAlreadyExistsError (ValueError)         a version is taken for this aggregate
    ├── AggregateNotFoundError (LookupError)         get_existing_aggregate found nothing
    ├── UndefinedEventStorageAdapterError (RuntimeError)
    ├── UndefinedMessageChannelAdapterError (RuntimeError)
    ├── MessageChannelEventStoreNotFoundError (LookupError)
    ├── ReservedEventTypeError (ValueError)          __REPLAYED__ / __AGGREGATE_EXISTS__
    ├── UnknownEventTypeError (ValueError)           a type the event store does not declare
    ├── EventLimitExceededError (ValueError)         too deep, too large, or not storable as JSON
    ├── StoredEventValidationError (ValueError)      a stored event no longer validates
    ├── InvalidPageTokenError (ValueError)           a malformed list_aggregate_ids page token
    ├── EventGroupError (ValueError)                 an empty or mixed event group
    ├── StorageError (RuntimeError)                  the storage backend failed
    │   └── StorageUnavailableError (ConnectionError)  retriable: unreachable, lost, timed out
    ├── MessagingError (RuntimeError)                the message broker failed
    │   └── MessageBrokerUnavailableError (ConnectionError)  retriable: broker unreachable
    ├── NoStrategyError (TypeError)                  testing: no way to generate a type's values
    ├── ReducerLawError (AssertionError)             testing: a reducer breaks a law
    └── UncheckedEventTypesError (AssertionError)    testing: laws never saw an event type

Adapters translate driver errors at their edge with ``raise ... from exc``: a unique-key
violation is always :class:`EventAlreadyExistsError`, never a raw driver error.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

__all__ = [
    "AggregateNotFoundError",
    "CastoreError",
    "EventAlreadyExistsError",
    "EventGroupError",
    "EventLimitExceededError",
    "InvalidPageTokenError",
    "MessageBrokerUnavailableError",
    "MessageChannelEventStoreNotFoundError",
    "MessagingError",
    "NoStrategyError",
    "ReducerLawError",
    "ReservedEventTypeError",
    "StorageError",
    "StorageUnavailableError",
    "StoredEventValidationError",
    "UncheckedEventTypesError",
    "UndefinedEventStorageAdapterError",
    "UndefinedMessageChannelAdapterError",
    "UnknownEventTypeError",
    "is_event_already_exists_error",
]


class CastoreError(Exception):
    """Root of every error raised by castore-pydantic (never raised itself).

    Every error pickles (a worker process can raise it to its parent): it is rebuilt from
    the arguments it was made with, not from its message.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or cls.__module__ != __name__:
            # Exception's own (rebuilt from ``args`` like any exception), or a subclass
            # of the application's: pickled as it would be without us.
            return

        @functools.wraps(init)
        def remembering(self: CastoreError, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            # Set last by the outermost ``__init__``: the arguments the error was made with.
            self.__dict__["_made_with"] = (args, kwargs)

        cls.__init__ = remembering  # type: ignore[method-assign,assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuild from the arguments the error was made with, then restore its attributes."""
        made_with = self.__dict__.get("_made_with")
        if made_with is None:
            return super().__reduce__()  # type: ignore[return-value]
        args, kwargs = made_with
        return (_rebuild, (type(self), args, kwargs), self.__dict__)


def _rebuild(cls: type[CastoreError], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return cls(*args, **kwargs)


class EventAlreadyExistsError(CastoreError, ValueError):
    """An event with this version already exists for the aggregate: optimistic concurrency.

    Attributes:
        event_store_id: The id of the event store that refused the event.
        aggregate_id: The aggregate whose version is taken.
        version: The version that is taken.
    """

    code = "EventAlreadyExistsError"

    def __init__(self, event_store_id: str, aggregate_id: str, version: int) -> None:
        self.event_store_id = event_store_id
        self.aggregate_id = aggregate_id
        self.version = version
        super().__init__(
            f"Event already exists for {event_store_id} aggregate {aggregate_id} "
            f"and version {version}"
        )


def is_event_already_exists_error(error: object) -> bool:
    """Tell whether ``error`` is an optimistic-concurrency conflict.

    Like Castore's ``isEventAlreadyExistsError`` this is duck-typed: any object whose ``code``
    attribute is ``"EventAlreadyExistsError"`` counts, so third-party adapters' errors do too.
    """
    return getattr(error, "code", None) == EventAlreadyExistsError.code


class AggregateNotFoundError(CastoreError, LookupError):
    """``get_existing_aggregate`` found no events (or the reducer folded them to ``None``).

    Attributes:
        event_store_id: The event store that was searched.
        aggregate_id: The aggregate that was not found.
    """

    def __init__(self, event_store_id: str, aggregate_id: str) -> None:
        self.event_store_id = event_store_id
        self.aggregate_id = aggregate_id
        super().__init__(
            f"Unable to find aggregate {aggregate_id} in event store {event_store_id}."
        )


class UndefinedEventStorageAdapterError(CastoreError, RuntimeError):
    """The event store has no storage adapter; set ``store.event_storage_adapter`` first.

    Attributes:
        event_store_id: The event store without an adapter.
    """

    def __init__(self, event_store_id: str) -> None:
        self.event_store_id = event_store_id
        super().__init__(f"EventStorageAdapter not found for event store {event_store_id}")


class UndefinedMessageChannelAdapterError(CastoreError, RuntimeError):
    """A message channel has no adapter; attach one before publishing.

    Attributes:
        message_channel_type: ``"queue"`` or ``"bus"``.
        message_channel_id: The id of the channel.
    """

    def __init__(self, message_channel_type: str, message_channel_id: str) -> None:
        self.message_channel_type = message_channel_type
        self.message_channel_id = message_channel_id
        super().__init__(
            f"Adapter undefined for message {message_channel_type} {message_channel_id}"
        )


class MessageChannelEventStoreNotFoundError(CastoreError, LookupError):
    """A message names an event store that is not among the channel's source event stores.

    Attributes:
        event_store_id: The unknown event store id found in the message.
        message_channel_type: ``"queue"`` or ``"bus"``.
        message_channel_id: The id of the channel.
    """

    def __init__(
        self, event_store_id: str, message_channel_type: str, message_channel_id: str
    ) -> None:
        self.event_store_id = event_store_id
        self.message_channel_type = message_channel_type
        self.message_channel_id = message_channel_id
        super().__init__(
            f"Unable to find event store {event_store_id} in message {message_channel_type} "
            f"{message_channel_id}. Did you provide it in the constructor?"
        )


class ReservedEventTypeError(CastoreError, ValueError):
    """An event type uses a name Castore reserves for its own messages.

    Attributes:
        event_type: The reserved type name.
    """

    def __init__(self, event_type: str) -> None:
        self.event_type = event_type
        super().__init__(f"{event_type} is a reserved event type. Please choose another one.")


class UnknownEventTypeError(CastoreError, ValueError):
    """An event's ``type`` is not one of the event store's declared event types.

    Attributes:
        event_store_id: The event store that refused the event.
        event_type: The offending type (``None`` when the input had no ``type``).
        known_types: The types the event store declares, sorted.
    """

    def __init__(self, event_store_id: str, event_type: object, known_types: Sequence[str]) -> None:
        self.event_store_id = event_store_id
        self.event_type = event_type
        self.known_types = tuple(known_types)
        listed = ", ".join(self.known_types) or "(none)"
        super().__init__(
            f"Event type {event_type!r} is not declared by event store {event_store_id}; "
            f"its event types are: {listed}"
        )


class EventLimitExceededError(CastoreError, ValueError):
    """An event is too deep, too large, or holds a value that cannot be stored as JSON.

    Limits are set per event store (see ``EventLimits``); values such as ``NaN``, a lone
    surrogate or a NUL character are refused because JSON and PostgreSQL cannot hold them,
    and so is an aggregate id that is no UUID on a PostgreSQL table whose ids are ``uuid``.

    Attributes:
        event_store_id: The event store that refused the event.
        reason: What was wrong, in words.
        path: Where in the event it was found (``("payload", "items", 3)``).
    """

    def __init__(self, event_store_id: str, reason: str, path: Sequence[str | int] = ()) -> None:
        self.event_store_id = event_store_id
        self.reason = reason
        self.path = tuple(path)
        where = ".".join(str(part) for part in self.path) or "event"
        super().__init__(f"Event refused by event store {event_store_id} at {where}: {reason}")


class StoredEventValidationError(CastoreError, ValueError):
    """An event read back from storage does not validate against the store's event types.

    Also raised for stored text that cannot be read as JSON. The Pydantic ``ValidationError``
    is the ``__cause__`` (the ``sqlite3`` error, for text SQLite itself does not read as
    JSON).

    Attributes:
        event_store_id: The event store that read the event.
        aggregate_id: The aggregate it belongs to (``None`` when it cannot be told).
        version: Its version (``None`` when it cannot be told).
    """

    def __init__(self, event_store_id: str, aggregate_id: object, version: object) -> None:
        self.event_store_id = event_store_id
        self.aggregate_id = aggregate_id
        self.version = version
        super().__init__(
            f"Stored event of event store {event_store_id}, aggregate {aggregate_id}, "
            f"version {version} does not validate against the store's event types"
        )


class InvalidPageTokenError(CastoreError, ValueError):
    """A ``page_token`` given to ``list_aggregate_ids`` is not one this library produced.

    Attributes:
        reason: What is wrong with the token.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"Invalid page token: {reason}")


class EventGroupError(CastoreError, ValueError):
    """An event group cannot be pushed as given (empty, or adapters that cannot share it).

    Attributes:
        reason: What is wrong with the group.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class StorageError(CastoreError, RuntimeError):
    """The storage backend failed in a way that is not a version conflict."""


class StorageUnavailableError(StorageError, ConnectionError):
    """The storage backend could not be reached or the connection was lost: retry later.

    Attributes:
        outcome_unknown: The connection was lost after a write was sent, so it may have
            committed: read the aggregate before retrying (a retry of a stored version
            raises ``EventAlreadyExistsError``). When false, nothing of the failed call
            was committed.
    """

    def __init__(self, message: str, *, outcome_unknown: bool = False) -> None:
        super().__init__(message)
        self.outcome_unknown = outcome_unknown


class MessagingError(CastoreError, RuntimeError):
    """The message broker failed."""


class MessageBrokerUnavailableError(MessagingError, ConnectionError):
    """The message broker could not be reached or the connection was lost: retry later."""


class NoStrategyError(CastoreError, TypeError):
    """``castore_pydantic.testing.strategies`` cannot generate values of a type.

    Register a strategy for the type with ``register_type_strategy(type_, strategy)`` or pass
    ``overrides={type_: strategy}`` to the strategy function.

    Attributes:
        annotation: The type (annotation) that has no strategy.
        path: Where it was met, e.g. ``"Order.lines[].price"``.
        reason: Why it cannot be generated.
    """

    def __init__(self, annotation: object, path: str, reason: str) -> None:
        self.annotation = annotation
        self.path = path
        self.reason = reason
        where = f" at {path}" if path else ""
        super().__init__(
            f"Cannot generate values of {annotation!r}{where}: {reason}. Register one with "
            f"register_type_strategy(type_, strategy) or pass overrides={{type_: strategy}}"
        )


class ReducerLawError(CastoreError, AssertionError):
    """A reducer breaks one of the laws ``castore_pydantic.testing.laws`` checks.

    Attributes:
        law: The name of the broken law (``"determinism"``, ...).
        event_store_id: The event store whose reducer broke it.
        detail: What was observed.
        events: The history that shows it, in its JSON form.
    """

    def __init__(
        self, law: str, event_store_id: str, detail: str, events: Sequence[object]
    ) -> None:
        self.law = law
        self.event_store_id = event_store_id
        self.detail = detail
        self.events = list(events)
        rendered = json.dumps(self.events, indent=2, ensure_ascii=False, default=str)
        super().__init__(
            f"Reducer law {law!r} broken by event store {event_store_id}: {detail}\n"
            f"History ({len(self.events)} events):\n{rendered}"
        )


class UncheckedEventTypesError(CastoreError, AssertionError):
    """``check_reducer`` could not generate a single event of some of the store's types.

    Generation kept failing for them (their validators or the store's limits refused every
    event drawn, and none was ever made), so the laws never saw them: passing would be a
    false pass.

    Attributes:
        event_store_id: The event store whose reducer was checked.
        event_types: The names of the event types no checked history held (a tuple; an
            event class with several names counts each of them on its own).
        reasons: Why their events could not be generated, with how to fix it (a tuple).
    """

    def __init__(
        self, event_store_id: str, event_types: Sequence[str], reasons: Sequence[str]
    ) -> None:
        self.event_store_id = event_store_id
        self.event_types = tuple(event_types)
        self.reasons = tuple(reasons)
        listed = "".join(f"\n  - {reason}" for reason in self.reasons)
        super().__init__(
            f"The reducer of event store {event_store_id} was never checked on events of type "
            f"{', '.join(self.event_types)}: every value drawn for them was refused, so no "
            f"history held one.{listed}"
        )
