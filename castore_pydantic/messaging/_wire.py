"""Reading messages in Castore's wire form: routing fields first, then one-pass parsing.

A bus listener's consumer first reads only what its filter patterns look at (the event
store id and the event type) from the raw body, so a message it did not ask for is skipped
without being validated: an event type or store this service does not know yet is none of
its business unless it asked for it.

Broker consumers parse every message they handle, so a notification body is validated
straight from JSON by one ``TypeAdapter`` (its event as one of its store's event types)
instead of ``json.loads`` followed by validation in Python. Anything this pass does not
accept is left to ``MessageChannel.parse_message``, which accepts every form it accepts and
raises its errors; both give the same message for the same body.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, NotRequired, Union

from pydantic import AliasChoices, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from castore_pydantic._event_store import EventStore
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic.messaging._messages import (
    FilterPattern,
    NotificationMessage,
    matches_fields,
)

__all__ = ["body_matches", "notification_parser"]


class _EventFields(TypedDict, total=False):
    type: str


class _RoutingFields(TypedDict):
    # Every other key is ignored: nothing but these is read. Both spellings, as channels
    # accept both.
    event_store_id: Annotated[
        str, Field(validation_alias=AliasChoices("eventStoreId", "event_store_id"))
    ]
    event: NotRequired[_EventFields]


_ROUTING_FIELDS: TypeAdapter[_RoutingFields] = TypeAdapter(_RoutingFields)


def body_matches(
    patterns: Sequence[FilterPattern], body: str | bytes | bytearray, replay: bool
) -> bool | None:
    """Whether a listener with ``patterns`` receives the message in ``body``, unvalidated.

    The same rules as ``matches``, read from the JSON body: ``eventStoreId`` and, when the
    message carries an event, ``event.type``. The body is read only when a pattern needs
    the store.

    Returns:
        ``True`` or ``False``; ``None`` when a pattern needs those fields and the body does
        not hold them in readable form, or holds an event without a type while a pattern
        looks at the type (validation may fill it in): the caller validates the body (which
        reports what is wrong with it) and, if it validates, checks the message with
        ``matches``.
    """
    candidates = [pattern for pattern in patterns if not replay or pattern.get("on_replay")]
    if not candidates:
        return False
    event_store_id, event_type = "", None
    if any("event_store_id" in pattern for pattern in candidates):
        try:
            fields = _ROUTING_FIELDS.validate_json(body)
        except ValidationError:
            return None
        event_store_id = fields["event_store_id"]
        event = fields.get("event")
        event_type = None if event is None else event.get("type")
        if event is not None and event_type is None and any(_typed(p) for p in candidates):
            # An event without a type: a store with one event class fills it in while
            # validating, so only the validated message says which type it is.
            return None
    return any(
        matches_fields(pattern, replay, event_store_id, event_type) for pattern in candidates
    )


def _typed(pattern: FilterPattern) -> bool:
    """Whether ``pattern`` looks at the event type (only with a store, as in Castore)."""
    return "event_store_id" in pattern and "event_type" in pattern


# Built at run time from the channel's stores, so typed as a plain callable.
_typed_dict: Any = TypedDict


def notification_parser(
    source_event_stores: Sequence[EventStore[Any, Any]],
) -> Callable[[str | bytes | bytearray], NotificationMessage]:
    """A parser of notification bodies in wire form; it raises on anything else.

    The first store with an id decides its event types, as in the channel; every event is
    checked against its store's limits.
    """
    contexts: dict[str, EventStoreContext] = {}
    shapes: list[Any] = []
    for store in source_event_stores:
        if store.event_store_id in contexts:
            continue
        contexts[store.event_store_id] = store.context
        classes = tuple(dict.fromkeys(store.event_types))
        event: Any = (
            classes[0]
            if len(classes) == 1
            else Annotated[Union[classes], Field(discriminator="type")]  # noqa: UP007
        )
        fields = {"eventStoreId": Literal[store.event_store_id], "event": event}
        shape = _typed_dict("NotificationShape", fields)
        shape.__pydantic_config__ = ConfigDict(extra="forbid")
        shapes.append(shape)
    union: Any = (
        shapes[0]
        if len(shapes) == 1
        else Annotated[Union[tuple(shapes)], Field(discriminator="eventStoreId")]  # noqa: UP007
    )
    wire: TypeAdapter[Any] = TypeAdapter(union)

    def parse(body: str | bytes | bytearray) -> NotificationMessage:
        data = wire.validate_json(body)
        event_store_id, event = data["eventStoreId"], data["event"]
        # Checked and its timestamp converted as the event store does with a pushed event.
        event = contexts[event_store_id].admit(event, timestamp=False)
        return NotificationMessage.model_construct(event_store_id=event_store_id, event=event)

    return parse
