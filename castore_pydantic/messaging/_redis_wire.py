"""What the Redis adapters put on the wire and read back: entries, scripts, safe URLs.

A stream entry holds Castore's JSON message in its ``body`` field, the replay flag in
``replay`` (``"0"`` / ``"1"``) and, for a retry, the attempt number in ``attempt``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit, urlunsplit

from pydantic import ConfigDict, Field, TypeAdapter
from typing_extensions import TypedDict

from castore_pydantic._serialization import EventStoreContext
from castore_pydantic.messaging._channels import MessageChannel, NotificationMessageChannel
from castore_pydantic.messaging._messages import Message, NotificationMessage

__all__ = ["APPEND_MESSAGES", "message_parser", "positive", "redact"]

# Built at run time from the channel's stores, so typed as a plain callable.
_typed_dict: Any = TypedDict

#: Appends messages to a stream in one atomic step (a pipeline of XADDs costs a reply each).
#: KEYS: the stream. ARGV: replay flag, max length ("" for none), the bodies.
APPEND_MESSAGES = """
local replay, max_length = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  if max_length == '' then
    redis.call('XADD', KEYS[1], '*', 'body', ARGV[i], 'replay', replay)
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', max_length, '*', 'body', ARGV[i], 'replay', replay)
  end
end
return #ARGV - 2
"""


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def positive(name: str, value: object) -> int:
    """Check an option that must be a positive integer.

    Raises:
        ValueError: It is not (the message names the option).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def message_parser(channel: MessageChannel[Any]) -> Callable[[bytes], Message]:
    """How consumers turn entry bodies into messages: the channel's ``parse_message``.

    For notification channels, a body in Castore's wire form is first validated in one pass
    from JSON (the event as one of its store's event types, the store's limits checked); any
    body that pass does not accept goes through ``channel.parse_message``, which accepts every
    form it accepts and raises its errors. Both give the same message for the same body.
    """
    if not isinstance(channel, NotificationMessageChannel):
        return channel.parse_message
    contexts: dict[str, EventStoreContext] = {}
    shapes: list[Any] = []
    for store in channel.source_event_stores:
        if store.event_store_id in contexts:
            continue  # as in the channel, the first store with an id wins
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
    slow = channel.parse_message

    def parse(body: bytes) -> Message:
        try:
            data = wire.validate_json(body)
            event_store_id, event = data["eventStoreId"], data["event"]
            contexts[event_store_id].check_limits(event)
        except Exception:  # whatever is unusual: the channel's own parsing tells what is wrong
            return slow(body)
        return NotificationMessage.model_construct(event_store_id=event_store_id, event=event)

    return parse
