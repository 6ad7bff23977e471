"""The ``Event`` base model and the timestamp rules every event follows."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Final, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    model_serializer,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticUndefined, TzInfo

__all__ = [
    "LONE_SURROGATE",
    "MAX_VERSION",
    "RESERVED_EVENT_TYPES",
    "VERSION_TOO_LARGE",
    "Event",
    "MillisecondTimestamp",
    "Timestamp",
    "WireModel",
    "format_timestamp",
    "needs_normalizing",
    "normalize_timestamp",
    "read_timestamp",
    "stamped",
    "utc_now",
    "utf8_encodable",
    "with_timestamp",
]

#: The highest version every adapter can store: SQL's signed 64-bit integers.
MAX_VERSION: Final = 2**63 - 1
#: Why a version above ``MAX_VERSION`` is refused.
VERSION_TOO_LARGE: Final = "version does not fit a 64-bit integer, as SQL databases store it"

RESERVED_EVENT_TYPES = frozenset({"__REPLAYED__", "__AGGREGATE_EXISTS__"})
"""Types Castore keeps for its own messages; no event store may declare them."""


#: Lone surrogates are valid in a Python str but cannot be encoded as UTF-8 (nor stored).
LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def utf8_encodable(text: str) -> bool:
    """Whether UTF-8 can encode ``text``, as every store must (not a lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _to_utc_millis(value: datetime) -> datetime:
    """Make a timestamp timezone-aware UTC with millisecond precision (truncated)."""
    if value.tzinfo is None:
        # A naive datetime is ambiguous; refusing it beats guessing the wrong zone.
        raise ValueError("timestamp must be timezone-aware (e.g. 2024-01-01T00:00:00.000Z)")
    if value.tzinfo is not UTC:
        try:
            value = value.astimezone(UTC)
        except OverflowError:
            raise ValueError(
                f"timestamp {value.isoformat()} is out of range once converted to UTC"
            ) from None
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


#: Zones that are UTC whenever their offset is zero: fixed offsets (``datetime.timezone``,
#: and what Pydantic parses ``Z`` or ``+00:00`` into). A zone with daylight saving time at
#: offset zero (London in winter) is converted, so stored timestamps always hold UTC.
_FIXED_ZONES: Final = (timezone, TzInfo)


def needs_normalizing(value: datetime) -> bool:
    """Whether ``value`` is not yet UTC with millisecond precision."""
    return bool(
        value.microsecond % 1000 or value.utcoffset() or type(value.tzinfo) not in _FIXED_ZONES
    )


def normalize_timestamp(value: datetime) -> datetime:
    """``value`` in UTC with millisecond precision (the same object when it already is)."""
    if needs_normalizing(value):
        return _to_utc_millis(value)
    return value


_EventT = TypeVar("_EventT", bound="Event")


def with_timestamp(event: _EventT, stamp: datetime | None) -> _EventT:
    """A copy of ``event`` whose ``timestamp`` is ``stamp`` (already UTC milliseconds).

    What ``event.model_copy(update={"timestamp": stamp})`` gives, in about a third of the time:
    every push of an event without a timestamp makes one. The copy is as shallow as
    Pydantic's: the field values, the set of fields set, extra and private values.
    """
    cls = type(event)
    copy = cls.__new__(cls)
    values = event.__dict__.copy()
    values["timestamp"] = stamp
    extra = event.__pydantic_extra__
    private = getattr(event, "__pydantic_private__", None)
    object.__setattr__(copy, "__dict__", values)
    object.__setattr__(
        copy, "__pydantic_fields_set__", {*event.__pydantic_fields_set__, "timestamp"}
    )
    object.__setattr__(copy, "__pydantic_extra__", None if extra is None else dict(extra))
    object.__setattr__(
        copy,
        "__pydantic_private__",
        None
        if private is None
        else {k: v for k, v in private.items() if v is not PydanticUndefined},
    )
    return copy


def stamped(event: _EventT, now: datetime | None = None) -> _EventT:
    """``event`` itself if it has a timestamp, else a copy stamped ``now`` (default: now).

    The event store stamps what it pushes; adapters stamp again for callers that use them
    directly.
    """
    if event.timestamp is not None:
        return event
    return with_timestamp(event, utc_now() if now is None else now)


Timestamp = Annotated[
    AwareDatetime,
    PlainSerializer(format_timestamp, return_type=str, when_used="json"),
]
"""A timezone-aware datetime that serialises to JSON in UTC with millisecond precision, as
``2024-01-01T00:00:00.000Z``. ISO strings are accepted on input and naive datetimes are refused,
both checked by pydantic-core without a Python call (reading events back stays fast); the event
store converts timestamps to UTC milliseconds when events are pushed, so every backend round-
trips them exactly.
"""


_STORED_TIMESTAMP: TypeAdapter[datetime] = TypeAdapter(Timestamp)


def read_timestamp(value: object) -> datetime:
    """A timestamp as an event's ``timestamp`` field reads it, in UTC milliseconds.

    For timestamps stored by others (a seeded mapping, a row another tool rewrote).

    Raises:
        ValueError: It is no timestamp (a ``ValidationError``), or it is out of range once
            converted to UTC.
    """
    return normalize_timestamp(_STORED_TIMESTAMP.validate_python(value))


#: Like ``Timestamp``, but converted to UTC milliseconds when the model is validated: for
#: models whose timestamps are not normalised by an event store (messages).
MillisecondTimestamp = Annotated[
    AwareDatetime,
    AfterValidator(_to_utc_millis),
    PlainSerializer(format_timestamp, return_type=str, when_used="json"),
]


class WireModel(BaseModel):
    """Base of the models castore-pydantic writes to storage and brokers.

    ``model_dump`` and ``model_dump_json`` use aliases by default, also inside nested models
    (a payload field aliased ``firstName`` is written as ``firstName`` and reads back), since
    what is written must validate again.
    """

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """Like ``BaseModel.model_dump``, with ``by_alias=True`` unless told otherwise."""
        kwargs.setdefault("by_alias", True)
        return super().model_dump(**kwargs)

    def model_dump_json(self, **kwargs: Any) -> str:
        """Like ``BaseModel.model_dump_json``, with ``by_alias=True`` unless told otherwise."""
        kwargs.setdefault("by_alias", True)
        return super().model_dump_json(**kwargs)


_CAMEL_CONFIG = ConfigDict(
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
)


class Event(WireModel):
    """Base class of every event type: subclass it with a ``Literal`` ``type``.

    An event type *is* a Pydantic model::

        class PokemonAppeared(Event):
            type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARED"
            payload: Appeared

    Events are immutable. Their JSON form is Castore's: camelCase keys (``aggregateId``), a
    ``...000Z`` timestamp, and ``timestamp`` / ``payload`` / ``metadata`` keys left out when
    they are ``None``.
    Dumps use field aliases by default, nested payload models included.
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
        """Leave ``payload`` and ``metadata`` out when absent, as Castore does.

        Unless a missing key would not read back as ``None``: the event type requires it
        (``payload: int | None`` without a default) or defaults it to something else. The
        JSON then keeps it as ``null``. An event not stored yet may have no ``timestamp``:
        it is left out too (Castore's events always have one, never ``null``).
        """
        data: dict[str, Any] = handler(self)
        if self.timestamp is None:
            data.pop("timestamp", None)
        if self.payload is None or self.metadata is None:
            cls = type(self)
            payload_kept, metadata_kept = _KEEPS_NULL.get(cls) or _keeps_null(cls)
            if self.payload is None and not payload_kept:
                data.pop("payload", None)
            if self.metadata is None and not metadata_kept:
                data.pop("metadata", None)
        return data


#: Per event class: whether ``payload`` and ``metadata`` keep a ``null`` in JSON, since a
#: missing key would not validate as ``None`` again.
_KEEPS_NULL: dict[type[Event], tuple[bool, bool]] = {}


def _keeps_null(cls: type[Event]) -> tuple[bool, bool]:
    def keeps(name: str) -> bool:
        field = cls.model_fields[name]
        return field.is_required() or field.default_factory is not None or field.default is not None

    found = _KEEPS_NULL[cls] = (keeps("payload"), keeps("metadata"))
    return found
