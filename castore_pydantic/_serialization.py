"""Validation of events at the boundary: input to ``push_event``, and data read back.

One ``EventStoreContext`` exists per event store. The store validates pushed events with it;
adapters receive it with every call and use its ``parse_*`` methods to turn stored rows back
into validated events of the store's types.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError
from pydantic_core import from_json

from castore_pydantic import _gc
from castore_pydantic._event import (
    LONE_SURROGATE,
    RESERVED_EVENT_TYPES,
    Event,
    needs_normalizing,
    normalize_timestamp,
    utc_now,
    with_timestamp,
)
from castore_pydantic._event_limits import EventLimits, LimitScan
from castore_pydantic._event_size import FAST_SCAN_MAX_DEPTH, JSON_CHARACTER_WIDTH, fast_size
from castore_pydantic._event_types import check_keys_read_back, event_type_names
from castore_pydantic.errors import (
    EventLimitExceededError,
    ReservedEventTypeError,
    StoredEventValidationError,
    UnknownEventTypeError,
)

__all__ = ["EventStoreContext"]

_JSON_TEXT = (str, bytes, bytearray)
# Batches this large are validated with the cyclic GC paused (see ``_gc``): 256 events, or
# JSON text of 64 KiB (a few hundred events).
_BULK_ITEMS = 256
_BULK_TEXT = 64 * 1024


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
        "_limit_scan",
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
        self._limit_scan = LimitScan(event_store_id, self.limits, self.known_types)
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
            self._limit_scan.explain(fresh)  # raises, unless the fast scan was unsure
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
            self._limit_scan.explain(event)

    def _within_limits(self, event: Event) -> bool:
        """Fast scan without paths: whether the event respects every limit."""
        if event.type not in self._by_type:  # declared types were checked at registration
            return False
        return 0 <= fast_size(event, self._fast_scan_depth, self._max_bytes) <= self._max_bytes

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
