"""Validation of events at the boundary: input to ``push_event``, and data read back.

One ``EventStoreContext`` exists per event store. The store validates pushed events with it;
adapters receive it with every call and use its ``parse_*`` methods to turn stored rows back
into validated events of the store's types.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, RootModel, TypeAdapter, ValidationError
from pydantic_core import from_json

from castore_pydantic import _gc
from castore_pydantic._event import (
    LONE_SURROGATE,
    MAX_VERSION,
    RESERVED_EVENT_TYPES,
    VERSION_TOO_LARGE,
    Event,
    needs_normalizing,
    normalize_timestamp,
    utc_now,
    utf8_encodable,
    with_timestamp,
)
from castore_pydantic._event_size import (
    FAST_SCAN_MAX_DEPTH,
    JSON_CHARACTER_WIDTH,
    LONGEST_INT_DIGITS,
    SMALL_INT,
    fast_size,
    int_digits,
    is_container,
    key_widths,
)
from castore_pydantic._event_types import check_keys_read_back, event_type_names
from castore_pydantic.errors import (
    EventLimitExceededError,
    ReservedEventTypeError,
    StoredEventValidationError,
    UnknownEventTypeError,
)

__all__ = ["EventLimits", "EventStoreContext"]

_JSON_TEXT = (str, bytes, bytearray)
# Batches this large are validated with the cyclic GC paused (see ``_gc``): 256 events, or
# JSON text of 64 KiB (a few hundred events).
_BULK_ITEMS = 256
_BULK_TEXT = 64 * 1024


#: The deepest ``payload`` allowed. Storage reads and messages put each payload inside its
#: event, inside a list (or a message), and pydantic-core's JSON parser stops at about 200
#: levels (a payload of depth 199 reads back with pydantic-core 2.x today): one level is
#: kept as a margin between versions.
_DEEPEST_READABLE = 198


def _failed_row(data: str | bytes, exc: ValidationError) -> object:
    """The row of a stored JSON array that ``exc`` is about (``None`` if none can be told).

    Only run once validation failed, so a read that validates pays nothing for it. An error
    about a row starts its location with the row's index. Text the validator could not
    parse at all (another program stored a lone surrogate, nesting deeper than the parser
    goes, bytes that are not UTF-8) has no location: Python's parser, which accepts all of
    these, splits the array, and the row is the first that the validator's parser refuses
    on its own (inside an array, to be as deep as it was).
    """
    try:
        text = data.decode("utf-8", "surrogateescape") if isinstance(data, bytes) else data
        rows = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(rows, list):
        return None
    loc = exc.errors(include_url=False)[0]["loc"]
    if loc:
        index = loc[0]
        return rows[index] if isinstance(index, int) and 0 <= index < len(rows) else None
    for row in rows:
        try:
            from_json(f"[{json.dumps(row)}]")
        except (ValueError, RecursionError):
            return row
    return None


@dataclass(frozen=True, slots=True)
class EventLimits:
    """Limits an event store enforces on every pushed event, before anything is written.

    Attributes:
        max_depth: How deeply ``payload`` and ``metadata`` may nest containers (dicts, lists,
            models). ``payload`` itself is level 1. At most 198: much deeper events could
            not be read back as JSON.
        max_bytes: The largest size of the event as JSON, estimated: keys and strings
            count their characters, integers their digits, other scalars and values a few
            characters each (escapes and long floats are not counted in full). JSON text
            input longer than six times this is refused before it is parsed.
    """

    max_depth: int = 64
    max_bytes: int = 1_048_576

    def __post_init__(self) -> None:
        if self.max_depth < 1:
            raise ValueError("max_depth must be at least 1")
        if self.max_depth > _DEEPEST_READABLE:
            raise ValueError(
                f"max_depth must be at most {_DEEPEST_READABLE}: stored and published events"
                " are read back as JSON, which Pydantic parses to about 200 levels, and a"
                " payload sits two levels down (in its event, in a list or a message)"
            )
        if self.max_bytes < 64:
            raise ValueError("max_bytes must be at least 64")


def _normalize_in_place(event: Event) -> None:
    """Give a freshly validated event (ours alone) a UTC millisecond timestamp."""
    stamp = event.timestamp
    if stamp is not None:
        normalized = normalize_timestamp(stamp)
        if normalized is not stamp:
            event.__dict__["timestamp"] = normalized


#: Validators of unions of event types, by the union's classes: building them is most of the
#: cost of making an event store, which tests do often (``mock_event_store``, each Hypothesis
#: example of ``check_reducer``).
_ADAPTERS: dict[tuple[type[Event], ...], tuple[TypeAdapter[Event], TypeAdapter[list[Event]]]] = {}
_ADAPTERS_KEPT = 64
_ADAPTERS_LOCK = threading.Lock()


def _adapters(
    classes: tuple[type[Event], ...],
) -> tuple[TypeAdapter[Event], TypeAdapter[list[Event]]]:
    """Validators of one event and of a list of events of these classes (a union)."""
    adapters = _ADAPTERS.get(classes)
    if adapters is None:
        union: Any = (
            classes[0]
            if len(classes) == 1
            else Annotated[Union[classes], Field(discriminator="type")]  # noqa: UP007
        )
        adapters = (TypeAdapter(union), TypeAdapter(list[union]))
        with _ADAPTERS_LOCK:  # stores may be made in several threads
            while len(_ADAPTERS) >= _ADAPTERS_KEPT:
                del _ADAPTERS[next(iter(_ADAPTERS))]  # the oldest
            _ADAPTERS[classes] = adapters
    return adapters


class EventStoreContext:
    """An event store's identity and validators, handed to storage adapters on every call.

    Attributes:
        event_store_id: The id of the event store; part of every storage key.
        limits: The limits pushed events must respect.
    """

    __slots__ = (
        "_by_type",
        "_classes",
        "_fast_scan_depth",
        "_many",
        "_max_bytes",
        "_one",
        "_validators",
        "event_store_id",
        "known_types",
        "limits",
    )

    def __init__(
        self,
        event_store_id: str,
        event_types: Sequence[type[Event]],
        limits: EventLimits | None = None,
    ) -> None:
        if not isinstance(event_store_id, str) or not event_store_id:
            raise ValueError("event_store_id must be a non-empty string")
        if "\x00" in event_store_id or LONE_SURROGATE.search(event_store_id):
            raise ValueError(
                f"event_store_id must be storable text (no NUL, no lone surrogate): "
                f"{event_store_id!r}"
            )
        self.event_store_id = event_store_id
        self.limits = limits or EventLimits()
        # Copies read on every push; 0 disables the recursive fast scan for deep limits.
        depth = self.limits.max_depth
        self._fast_scan_depth = depth if depth <= FAST_SCAN_MAX_DEPTH else 0
        self._max_bytes = self.limits.max_bytes
        by_type: dict[str, type[Event]] = {}
        for event_type in event_types:
            names = event_type_names(event_type)
            check_keys_read_back(event_type)
            for name in names:
                if name in RESERVED_EVENT_TYPES:
                    raise ReservedEventTypeError(name)
                if not name or "\x00" in name or LONE_SURROGATE.search(name):
                    raise ValueError(f"event type names must be storable text: {name!r}")
                if name in by_type and by_type[name] is not event_type:
                    raise ValueError(
                        f"event type {name!r} is declared twice in event store {event_store_id}"
                    )
                by_type[name] = event_type
        if not by_type:
            raise ValueError(f"event store {event_store_id} needs at least one event type")
        self._by_type = by_type
        self._validators = {
            name: cls.__pydantic_validator__.validate_python for name, cls in by_type.items()
        }
        self._classes = frozenset(by_type.values())
        self.known_types = tuple(sorted(by_type))
        self._one, self._many = _adapters(tuple(dict.fromkeys(by_type.values())))

    def __repr__(self) -> str:
        return f"EventStoreContext(event_store_id={self.event_store_id!r})"

    # -- pushed events ---------------------------------------------------------------------

    def validate_input(
        self, event: object, *, timestamp: bool = True, limits: bool = True
    ) -> Event:
        """Validate an event given to ``push_event`` / ``group_event``.

        Accepts an instance of one of the store's event types, a mapping (either key
        spelling) or JSON text. Fills in a missing timestamp when ``timestamp`` is true.
        ``limits=False`` (for events that are not written, as ``simulate_aggregate``'s)
        skips the limits.

        Raises:
            pydantic.ValidationError: The data does not fit the event type.
            UnknownEventTypeError: The ``type`` is not one of the store's event types.
            EventLimitExceededError: The event is too deep, too large or not storable.
        """
        if type(event) is dict:
            # The common case, kept lean: a plain dict naming one of the store's types.
            event_type = event.get("type")
            validate = self._validators.get(event_type) if type(event_type) is str else None
            if validate is not None:
                return self.admit(validate(event), timestamp=timestamp, limits=limits)
        return self._validate_other_input(event, timestamp=timestamp, limits=limits)

    def admit(self, fresh: Event, *, timestamp: bool, limits: bool = True) -> Event:
        """A freshly validated event of the store's types, nobody else's yet, made ready.

        Checked against the limits, its timestamp converted to UTC milliseconds in place
        (set to now when it has none and ``timestamp`` is true).

        Raises:
            EventLimitExceededError: The event is too deep, too large or not storable.
        """
        if limits and not (
            0 <= fast_size(fresh, self._fast_scan_depth, self._max_bytes) <= self._max_bytes
        ):
            self._explain_limits(fresh)  # raises, unless the fast scan was unsure
        stamp = fresh.timestamp
        if stamp is None:
            if timestamp:
                fresh.__dict__["timestamp"] = utc_now()
                fresh.__pydantic_fields_set__.add("timestamp")
        elif needs_normalizing(stamp):
            fresh.__dict__["timestamp"] = self._normalized(stamp)
        return fresh

    def _normalized(self, stamp: datetime) -> datetime:
        """``stamp`` in UTC milliseconds.

        Raises:
            EventLimitExceededError: It is out of range once converted to UTC.
        """
        try:
            return normalize_timestamp(stamp)
        except ValueError as exc:
            raise EventLimitExceededError(self.event_store_id, str(exc), ("timestamp",)) from exc

    def _validate_other_input(self, event: object, *, timestamp: bool, limits: bool) -> Event:
        """``validate_input`` for everything but a dict of a known type."""
        if type(event) in self._classes:
            # The caller's own instance: checked as it is, copied if it needs a timestamp.
            given: Event = event  # type: ignore[assignment]
            if limits:
                self.check_limits(given)
            stamp = given.timestamp
            if stamp is None:
                return with_timestamp(given, utc_now()) if timestamp else given
            normalized = self._normalized(stamp)
            return given if normalized is stamp else with_timestamp(given, normalized)
        if type(event) is dict or isinstance(event, Mapping):
            validated = self._validate_mapping(event)
        elif isinstance(event, _JSON_TEXT):
            validated = self._validate_json_input(event, limits=limits)
        elif isinstance(event, Event):
            cls = self._by_type.get(event.type)
            if cls is None:
                raise UnknownEventTypeError(self.event_store_id, event.type, self.known_types)
            validated = cls.model_validate(event.model_dump())
        else:
            validated = self._one.validate_python(event)  # raises a clear ValidationError
        return self.admit(validated, timestamp=timestamp, limits=limits)

    def _validate_mapping(self, event: Mapping[str, Any]) -> Event:
        event_type = event.get("type")
        cls = self._by_type.get(event_type) if isinstance(event_type, str) else None
        if cls is not None:
            validated: Event = cls.__pydantic_validator__.validate_python(event)
            return validated
        if "type" not in event:
            # A union reports the missing discriminator; a single type uses its default.
            return self._one.validate_python(event)
        raise UnknownEventTypeError(self.event_store_id, event_type, self.known_types)

    def _validate_json_input(self, text: str | bytes | bytearray, *, limits: bool) -> Event:
        # A guard against parsing huge texts, not the limit itself (``check_limits`` then
        # measures the event): the limit counts characters, and JSON writes one in up to
        # six (``\u00e9``; four bytes of UTF-8), so an event within it may be longer.
        longest = JSON_CHARACTER_WIDTH * self.limits.max_bytes
        if limits and len(text) > longest:
            raise EventLimitExceededError(
                self.event_store_id,
                f"JSON text of {len(text)} characters or bytes is longer than any event "
                f"within max_bytes={self.limits.max_bytes} can be",
            )
        try:
            return self._one.validate_json(text)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                if error["type"] == "union_tag_invalid" and not error["loc"]:
                    # Pydantic gives the tag as text: the type as given is in the JSON.
                    tag = error.get("ctx", {}).get("tag")
                    with contextlib.suppress(ValueError, AttributeError):
                        tag = json.loads(text).get("type", tag)
                    raise UnknownEventTypeError(self.event_store_id, tag, self.known_types) from exc
                if error["type"] == "literal_error" and error["loc"] == ("type",):
                    # A store of one type validates without a union: its Literal refused it.
                    raise UnknownEventTypeError(
                        self.event_store_id, error["input"], self.known_types
                    ) from exc
            raise

    def check_limits(self, event: Event) -> None:
        """Check depth, size and JSON-ability of an event's payload and metadata.

        Raises:
            EventLimitExceededError: With the path of the offending value.
        """
        if not self._within_limits(event):
            self._explain_limits(event)

    def _within_limits(self, event: Event) -> bool:
        """Fast scan without paths: whether the event respects every limit."""
        if event.type not in self._by_type:  # declared types were checked at registration
            return False
        return 0 <= fast_size(event, self._fast_scan_depth, self._max_bytes) <= self._max_bytes

    def _explain_limits(self, event: Event) -> None:
        """Slow scan with paths; raises on the first violation it finds."""
        max_depth = self.limits.max_depth
        max_bytes = self.limits.max_bytes
        self._check_identity(event)
        size = len(event.aggregate_id) + len(event.type) + 80
        stack: list[tuple[Any, int, tuple[str | int, ...]]] = []
        if event.payload is not None:
            stack.append((event.payload, 1, ("payload",)))
        if event.metadata is not None:
            stack.append((event.metadata, 1, ("metadata",)))
        too_large = f"event larger than max_bytes={max_bytes}"
        while stack:
            value, depth, path = stack.pop()
            while isinstance(value, RootModel):
                value = value.root  # written as its root alone
            if is_container(value):
                if depth > max_depth:
                    raise EventLimitExceededError(
                        self.event_store_id, f"nesting deeper than max_depth={max_depth}", path
                    )
                size += 4
                for child, child_depth, child_path, key_size in self._children(
                    value, depth + 1, path
                ):
                    size += key_size
                    if size > max_bytes:  # before walking on through a huge collection
                        raise EventLimitExceededError(self.event_store_id, too_large, child_path)
                    stack.append((child, child_depth, child_path))
            else:
                size += self._leaf_size(value, path)
            if size > max_bytes:
                raise EventLimitExceededError(self.event_store_id, too_large, path)

    def _check_identity(self, event: Event) -> None:
        """Check what names an event: its type, version and aggregate id."""
        if event.type not in self._by_type:
            raise UnknownEventTypeError(self.event_store_id, event.type, self.known_types)
        version = event.version
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise EventLimitExceededError(
                self.event_store_id, f"version must be an int >= 1, not {version!r}", ("version",)
            )
        if version > MAX_VERSION:
            raise EventLimitExceededError(
                self.event_store_id,
                VERSION_TOO_LARGE,
                ("version",),
            )
        if not isinstance(event.aggregate_id, str):
            raise EventLimitExceededError(
                self.event_store_id,
                f"aggregate id must be text, not {type(event.aggregate_id).__name__}",
                ("aggregateId",),
            )
        self._check_str(event.aggregate_id, ("aggregateId",))
        self._check_str(event.type, ("type",))

    def _leaf_size(self, value: object, path: tuple[str | int, ...]) -> int:  # noqa: PLR0911
        """The bytes the slow scan counts for a value that holds no others, checked."""
        if isinstance(value, Enum) and not isinstance(value, int | str):
            value = value.value  # written as its value
        if isinstance(value, str):
            self._check_str(value, path)
            return len(value) + 3
        if value is None or isinstance(value, bool):
            return 6
        if isinstance(value, int):
            return self._int_size(value, path)
        if isinstance(value, float):
            if not math.isfinite(value):
                raise EventLimitExceededError(
                    self.event_store_id, f"{value} is not a JSON number", path
                )
            return len(repr(value)) + 1
        if isinstance(value, bytes | bytearray):
            return len(value) + 3
        if isinstance(value, Decimal):
            return len(str(value)) + 4  # written as its text
        # Anything else (a datetime, a UUID, a type of the author's with its serializer, a
        # one-shot iterator that must not be consumed here) is counted as a short value.
        return 16

    def _int_size(self, value: int, path: tuple[str | int, ...]) -> int:
        """The bytes the slow scan counts for an int; one JSON cannot read back is refused."""
        if -SMALL_INT < value < SMALL_INT:
            return len(str(value)) + 1
        digits = int_digits(value)
        if digits > LONGEST_INT_DIGITS:
            raise EventLimitExceededError(
                self.event_store_id,
                f"an integer of {digits} digits cannot be read back from JSON"
                f" (at most {LONGEST_INT_DIGITS})",
                path,
            )
        return digits + 1

    def _children(
        self, value: Any, depth: int, path: tuple[str | int, ...]
    ) -> Iterable[tuple[Any, int, tuple[str | int, ...], int]]:
        """The values a container writes, with their paths and the size of their keys.

        Keys count as written (a model's by alias; its excluded fields are not written);
        string keys are checked as strings are.
        """
        widths: dict[str, int] | None = None
        keyed = isinstance(value, Mapping)
        if isinstance(value, BaseModel):
            widths = key_widths(type(value))
            items: Iterable[tuple[Any, Any]] = value.__dict__.items()
            extra = value.__pydantic_extra__
            if extra:
                for key in extra:
                    self._check_str(key, path)
                widths = {**widths, **{key: len(key) for key in extra}}
                items = [*items, *extra.items()]
        elif isinstance(value, Mapping):
            items = value.items()
        elif dataclasses.is_dataclass(value):
            if hasattr(type(value), "__pydantic_fields__"):
                widths = key_widths(type(value))
            items = [
                (field.name, getattr(value, field.name)) for field in dataclasses.fields(value)
            ]
        else:
            items = enumerate(value)
        for key, child in items:
            if widths is not None:
                width = widths.get(key)
                if width is None:
                    continue  # excluded from dumps: never written
                yield child, depth, (*path, key), width + 3
            else:
                yield child, depth, (*path, key), self._key_size(key, path, keyed=keyed)

    def _key_size(self, key: object, path: tuple[str | int, ...], *, keyed: bool) -> int:
        """The size of a mapping's key as written (checked), or 0 for a list's index."""
        if isinstance(key, str):
            self._check_str(key, path)
            return len(key) + 3
        if not keyed:
            return 0
        # Other keys are written as their text.
        return (self._int_size(key, path) if type(key) is int else len(str(key))) + 3

    def _check_str(self, value: str, path: tuple[str | int, ...]) -> None:
        if "\x00" in value:
            raise EventLimitExceededError(
                self.event_store_id, "NUL characters cannot be stored", path
            )
        if not utf8_encodable(value):
            raise EventLimitExceededError(
                self.event_store_id, "string is not valid Unicode (lone surrogate)", path
            )

    # -- stored events ---------------------------------------------------------------------

    def parse_event(self, data: Event | Mapping[str, Any]) -> Event:
        """Validate one stored event (an event instance or a mapping).

        Raises:
            StoredEventValidationError: It does not validate; the cause says why.
        """
        if type(data) in self._classes:
            return data  # type: ignore[return-value]
        raw = data.model_dump() if isinstance(data, Event) else data
        try:
            event = self._one.validate_python(raw)
        except ValidationError as exc:
            raise self._stored_error(raw) from exc
        _normalize_in_place(event)
        return event

    def parse_events(self, items: Iterable[Event | Mapping[str, Any]]) -> list[Event]:
        """Validate stored events; instances of the store's own types pass through.

        A list holding nothing but such instances is returned itself, not a copy.
        """
        classes = self._classes
        if not isinstance(items, list):
            items = list(items)
        if all(type(item) in classes for item in items):
            return items  # type: ignore[return-value]
        if not any(isinstance(item, Event) for item in items):
            try:  # all mappings: one validation call for the whole list
                if len(items) >= _BULK_ITEMS:
                    with _gc.paused:
                        events = self._many.validate_python(items)
                else:
                    events = self._many.validate_python(items)
            except ValidationError:
                pass  # validate one by one below to name the event that fails
            else:
                for event in events:
                    _normalize_in_place(event)
                return events
        return [self.parse_event(item) for item in items]

    def parse_events_json(self, data: str | bytes) -> list[Event]:
        """Validate a JSON array of stored events in one pass (fast path for SQL adapters).

        Raises:
            StoredEventValidationError: An element does not validate; names which.
        """
        try:
            if len(data) >= _BULK_TEXT:
                with _gc.paused:
                    return self._many.validate_json(data)
            return self._many.validate_json(data)
        except ValidationError as exc:
            raise self._stored_error(_failed_row(data, exc)) from exc

    def _stored_error(self, raw: object) -> StoredEventValidationError:
        aggregate_id = version = None
        if isinstance(raw, Mapping):
            aggregate_id = raw.get("aggregateId", raw.get("aggregate_id"))
            version = raw.get("version")
        return StoredEventValidationError(self.event_store_id, aggregate_id, version)
