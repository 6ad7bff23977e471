"""Limits on pushed events, and the slow scan that says which value breaks one, and how.

The fast scan (``_event_size``) only tells whether an event is within its store's limits.
When it is unsure, or the event breaks one, ``LimitScan`` walks the event again with the
path of every value, and raises on the first violation it finds.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum
from typing import Any

from pydantic import BaseModel, RootModel

from castore_pydantic._event import MAX_VERSION, VERSION_TOO_LARGE, Event, utf8_encodable
from castore_pydantic._event_size import (
    LONGEST_INT_DIGITS,
    SMALL_INT,
    int_digits,
    key_widths,
)
from castore_pydantic.errors import EventLimitExceededError, UnknownEventTypeError

__all__ = ["EventLimits", "LimitScan"]


#: The deepest ``payload`` allowed. Storage reads and messages put each payload inside its
#: event, inside a list (or a message), and pydantic-core's JSON parser stops at about 200
#: levels (a payload of depth 199 reads back with pydantic-core 2.x today): one level is
#: kept as a margin between versions.
_DEEPEST_READABLE = 198


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


def _is_container(value: object) -> bool:
    """Whether the slow scan walks into ``value``.

    Mappings, models, dataclass instances, lists, tuples, sets and deques; never a one-shot
    iterator, which reading would empty.
    """
    if isinstance(value, Mapping | BaseModel | list | tuple | set | frozenset | deque):
        return True
    # Not any Collection: a Flag member iterates to itself, a range or an array may be huge,
    # and a type written by its own serializer is not written as its items.
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


class LimitScan:
    """The slow scan of pushed events: it names the value that breaks a limit, and how.

    Attributes:
        event_store_id: The id of the event store, named by the errors.
        limits: The limits pushed events must respect.
        known_types: The event type names of the store, sorted.
    """

    __slots__ = ("_known", "event_store_id", "known_types", "limits")

    def __init__(
        self, event_store_id: str, limits: EventLimits, known_types: tuple[str, ...]
    ) -> None:
        self.event_store_id = event_store_id
        self.limits = limits
        self.known_types = known_types
        self._known = frozenset(known_types)

    def explain(self, event: Event) -> None:
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
            if _is_container(value):
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
        if event.type not in self._known:
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
