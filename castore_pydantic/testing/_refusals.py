"""Say which generated values keep being refused, where Hypothesis only says "filtered".

A strategy that draws raw values and keeps those a validator (or a store's limits) accepts
ends, when nothing is ever accepted, in Hypothesis' generic "filtering out a lot of inputs"
health check or ``Unsatisfiable``, or, inside a larger strategy, in values that silently
never appear. A ``Refusals`` counter per kind of value names the kind and the reason in a
logged warning once 50 have been refused and none accepted.

The counters live across the examples of a test, so they must never change what is drawn
nor raise while drawing: Hypothesis replays examples and calls a strategy that behaves
differently the second time flaky. That is also why the signal is a logged warning and not
a ``warnings`` one, which is raised mid-draw where warnings are errors.

``watching()`` lets a caller (``check_reducer``) learn which counters gave up during a run.
``histories()`` also counts, per event type name, the events it set out to draw and whether
each was made (``drawing()``), whatever strategy made its parts: ``check_reducer`` judges
coverage by those counts, since a counter of a payload strategy built by ``models()`` or
given in ``overrides`` knows nothing of the event type it ends up in.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import ValidationError

__all__ = [
    "REFUSALS_BEFORE_WARNING",
    "Refusals",
    "Slots",
    "counting_slots",
    "drawing",
    "reason_of",
    "watching",
]

#: Values of one kind refused, none accepted yet, before a warning is logged.
REFUSALS_BEFORE_WARNING = 50
_SHOWN_REASON = 300

# Named after the public module: that is the logger users look for and configure.
logger = logging.getLogger("castore_pydantic.testing.strategies")

_WATCHERS: contextvars.ContextVar[tuple[set[Refusals], ...]] = contextvars.ContextVar(
    "castore_refusal_watchers", default=()
)
_SLOT_WATCHERS: contextvars.ContextVar[tuple[dict[str, Slots], ...]] = contextvars.ContextVar(
    "castore_slot_watchers", default=()
)
_CURRENT_SLOT: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar(
    "castore_current_slot", default=None
)


class Refusals:
    """Counts refusals of one kind of value until one is accepted.

    Args:
        origin: The class whose values these are at the top (an event type when the values
            are parts of its events), so that a watcher can tell which type never appeared.
        warning: Builds the warning's text from the count and the last reason.
    """

    def __init__(self, origin: type | None, warning: Callable[[int, str], str]) -> None:
        self.origin = origin
        self.warning = warning
        self.count = 0
        self.accepted = False
        self.reason = ""

    @property
    def given_up(self) -> bool:
        """Refused often enough, and never accepted: the kind is as good as never drawn."""
        return not self.accepted and self.count >= REFUSALS_BEFORE_WARNING

    def refused(self, reason: str) -> None:
        """Count one refusal; log the warning at the threshold."""
        if self.accepted:
            return
        self.count += 1
        self.reason = reason
        slot = _CURRENT_SLOT.get()
        if slot is not None:
            slot.last = (self, reason)
        if self.count == REFUSALS_BEFORE_WARNING:
            logger.warning("%s", self.warning(self.count, reason))
        if self.given_up:
            for watcher in _WATCHERS.get():
                watcher.add(self)

    def describe(self, reason: str) -> str:
        """The refusal, in the warning's words while nothing has been accepted."""
        if self.accepted:
            return f"a value was refused ({reason})"
        return self.warning(self.count, reason)

    def passed(self) -> None:
        """Note that a value of this kind was accepted: no warning from now on."""
        self.accepted = True


@contextlib.contextmanager
def watching() -> Iterator[set[Refusals]]:
    """Collect, while the block runs, the counters that refuse values after giving up."""
    found: set[Refusals] = set()
    token = _WATCHERS.set((*_WATCHERS.get(), found))
    try:
        yield found
    finally:
        _WATCHERS.reset(token)


class _Slot:
    """One event ``histories()`` sets out to draw: made or not, and the last refusal."""

    def __init__(self) -> None:
        self.made = False
        self.last: tuple[Refusals, str] | None = None


class Slots:
    """The events of one type ``histories()`` set out to draw during a check.

    ``search`` is a strategy of what ``histories()`` draws up to an event of the type (a
    history's prefix ending with one, or ``None`` when it cannot be made), so that a type
    none of whose events was made can be told apart from a rarely valid one.
    """

    def __init__(self, search: Any = None) -> None:
        self.made = 0
        self.refused = 0
        self.last: tuple[Refusals, str] | None = None
        self.search = search

    def reason(self) -> str:
        """What refused the last event that could not be made."""
        if self.last is None:
            return "drawing its fields was given up"
        counter, reason = self.last
        return counter.describe(reason)


@contextlib.contextmanager
def drawing(name: str, search: Any = None) -> Iterator[_Slot]:
    """Count one event of type ``name`` that ``histories()`` sets out to draw.

    The caller sets ``made`` when the event is made; any refusal counted while the block
    runs, by whichever counter, is remembered as the reason. The block may end in an
    exception (Hypothesis abandoning a draw that a filter kept refusing): the event was
    not made.
    """
    slot = _Slot()
    token = _CURRENT_SLOT.set(slot)
    try:
        yield slot
    finally:
        _CURRENT_SLOT.reset(token)
        for watcher in _SLOT_WATCHERS.get():
            slots = watcher.setdefault(name, Slots(search))
            if slot.made:
                slots.made += 1
            else:
                slots.refused += 1
                if slot.last is not None:
                    slots.last = slot.last


@contextlib.contextmanager
def counting_slots() -> Iterator[dict[str, Slots]]:
    """Collect, while the block runs, what ``histories()`` made of each event type name."""
    found: dict[str, Slots] = {}
    token = _SLOT_WATCHERS.set((*_SLOT_WATCHERS.get(), found))
    try:
        yield found
    finally:
        _SLOT_WATCHERS.reset(token)


def reason_of(error: ValidationError) -> str:
    """The first error of a ``ValidationError``, located, for a one-line warning."""
    errors = error.errors(include_url=False)
    if not errors:
        return str(error)[:_SHOWN_REASON]
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    text = f"{where}: {first['msg']}" if where else str(first["msg"])
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more)"
    return text if len(text) <= _SHOWN_REASON else text[: _SHOWN_REASON - 3] + "..."
