"""One-pass parsing of notification messages in Castore's wire form.

Broker consumers parse every message they receive, so a notification body is validated
straight from JSON by one ``TypeAdapter`` (its event as one of its store's event types)
instead of ``json.loads`` followed by validation in Python. Anything this pass does not
accept is left to ``MessageChannel.parse_message``, which accepts every form it accepts and
raises its errors; both give the same message for the same body.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict

from castore_pydantic._event_store import EventStore
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic.messaging._messages import NotificationMessage

__all__ = ["notification_parser"]

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
