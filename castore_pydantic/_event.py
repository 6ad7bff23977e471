"""The ``Event`` base model and the timestamp rules every event follows."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    model_serializer,
)
from pydantic.alias_generators import to_camel

__all__ = [
    "RESERVED_EVENT_TYPES",
    "Event",
    "Timestamp",
    "format_timestamp",
    "utc_now",
]

#: Types Castore keeps for its own messages; no event store may declare them.
RESERVED_EVENT_TYPES = frozenset({"__REPLAYED__", "__AGGREGATE_EXISTS__"})


def _to_utc_millis(value: datetime) -> datetime:
    """Make a timestamp timezone-aware UTC with millisecond precision (truncated)."""
    if value.tzinfo is None:
        # A naive datetime is ambiguous; refusing it beats guessing the wrong zone.
        raise ValueError("timestamp must be timezone-aware (e.g. 2024-01-01T00:00:00.000Z)")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    micro = value.microsecond
    if micro % 1000:
        value = value.replace(microsecond=micro - micro % 1000)
    return value


def format_timestamp(value: datetime) -> str:
    """Render a UTC timestamp in Castore's form: ``2024-01-01T00:00:00.000Z``."""
    # isoformat pads years to four digits (strftime's %Y does not for years < 1000).
    return _to_utc_millis(value).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The last millisecond handed out and its datetime: pushes within one millisecond share one
# (immutable) datetime instead of building a new one each time.
_clock_cache: list[Any] = [-1, _EPOCH]


def utc_now() -> datetime:
    """The current time, timezone-aware UTC, truncated to milliseconds."""
    millis = time.time_ns() // 1_000_000
    cache = _clock_cache
    if millis != cache[0]:
        cache[1] = _EPOCH + timedelta(milliseconds=millis)
        cache[0] = millis
    now: datetime = cache[1]
    return now


#: A timezone-aware UTC datetime with millisecond precision that serialises to JSON as
#: ``2024-01-01T00:00:00.000Z``. ISO strings are accepted on input; other offsets are converted.
Timestamp = Annotated[
    datetime,
    AfterValidator(_to_utc_millis),
    PlainSerializer(format_timestamp, return_type=str, when_used="json"),
]

_CAMEL_CONFIG = ConfigDict(
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
)


class Event(BaseModel):
    """Base class of every event type: subclass it with a ``Literal`` ``type``.

    An event type *is* a Pydantic model::

        class PokemonAppeared(Event):
            type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARED"
            payload: Appeared

    Events are immutable. Their JSON form is Castore's: camelCase keys (``aggregateId``), a
    ``...000Z`` timestamp, and ``payload`` / ``metadata`` keys left out when they are ``None``.
    Both ``aggregate_id`` and ``aggregateId`` are accepted on input; unknown top-level keys are
    refused so that no data is silently dropped.

    Attributes:
        aggregate_id: The id of the aggregate the event belongs to.
        version: The position of the event in its aggregate, from 1.
        timestamp: When the event happened (set when pushed if missing).
        type: What happened; each subclass narrows it to a ``Literal``.
        payload: The event's data (``None`` when it has none).
        metadata: Data about the event (``None`` when it has none).
    """

    model_config = ConfigDict(**_CAMEL_CONFIG, frozen=True, extra="forbid")

    aggregate_id: str
    version: int = Field(ge=1)
    timestamp: Timestamp | None = None
    type: str
    payload: Any = None
    metadata: Any = None

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave ``payload`` and ``metadata`` out when absent, as Castore does."""
        data: dict[str, Any] = handler(self)
        if self.payload is None:
            data.pop("payload", None)
        if self.metadata is None:
            data.pop("metadata", None)
        return data
