"""Reading messages in Castore's wire form: routing fields alone, or one-pass parsing.

A bus listener's filter may need to know which store and event type a body holds before
deciding to validate it, so that a message it did not ask for is skipped whatever it holds
(``routing_fields`` reads just those).

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
from castore_pydantic.messaging._messages import NotificationMessage

__all__ = ["RoutingFields", "notification_parser", "routing_fields"]


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


#: ``(event_store_id, event_type, carries_event)``: ``event_type`` is ``None`` for a message
#: without an event, and for an event without a ``type``.
RoutingFields = tuple[str, str | None, bool]


def routing_fields(body: str | bytes | bytearray) -> RoutingFields | None:
    """What filter patterns look at in a JSON body, read without validating the message.

    The event store is ``eventStoreId`` (or ``event_store_id``, as channels accept both);
    the event type is ``event.type``. Every other key is left unread.

    Returns:
        The fields, or ``None`` when the body does not hold them in readable form (not JSON,
        not an object, a store id that is not a string, an ``event`` that is not an object
        or a ``type`` that is not a string).
    """
    try:
        fields = _ROUTING_FIELDS.validate_json(body)
    except ValidationError:
        return None
    event = fields.get("event")
    if event is None:
        return fields["event_store_id"], None, False
    return fields["event_store_id"], event.get("type"), True


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
