"""The size of an event as JSON, estimated, and the facts the size limits rest on.

The fast scan sizes a pushed event without building paths; when it is unsure, or the
event breaks a limit, the slow scan (``LimitScan`` in ``_event_limits``) walks it again to
say where.
"""

from __future__ import annotations

import math
from datetime import date, datetime, time, timedelta
from typing import Any, Final
from uuid import UUID

from pydantic import BaseModel

from castore_pydantic._event import LONE_SURROGATE, MAX_VERSION, Event

__all__ = [
    "FAST_SCAN_MAX_DEPTH",
    "JSON_CHARACTER_WIDTH",
    "LONGEST_INT_DIGITS",
    "SMALL_INT",
    "fast_size",
    "int_digits",
    "key_widths",
]


#: The most characters or bytes JSON text takes for one character of an event.
JSON_CHARACTER_WIDTH = 6

#: Past this ``max_depth`` the recursive fast scan is not used.
FAST_SCAN_MAX_DEPTH = 200
_FAIL = -(1 << 62)  # a size so negative that any sum containing it stays negative


#: Integers within these bounds take at most 20 characters of JSON: the scans count their
#: digits with ``str``. Larger ones are measured, and refused past ``LONGEST_INT_DIGITS``.
SMALL_INT: Final = 1 << 63
#: The most digits pydantic-core's JSON parser reads back as an integer (and Python's default
#: ``sys.get_int_max_str_digits()``).
LONGEST_INT_DIGITS: Final = 4300

#: Per model class: bytes counted for its keys and bool fields; its int, str and other fields.
_ModelPlan = tuple[int, tuple[str, ...], tuple[str, ...], tuple[str, ...]]
_MODEL_PLANS: dict[type[BaseModel], _ModelPlan] = {}


def _model_plan(cls: type[BaseModel]) -> _ModelPlan:
    """How to scan instances of ``cls``: the size of its keys and of its bool fields is fixed."""
    plan = _MODEL_PLANS.get(cls)
    if plan is None:
        fixed, ints, texts, others = 0, [], [], []
        for name, width in key_widths(cls).items():  # excluded fields are never written
            # Its key, as written: ``"name":``; each value counts its own comma.
            fixed += width + 3
            field = cls.model_fields[name]
            if field.annotation is bool:
                fixed += 6
            elif field.annotation is int:
                ints.append(name)
            elif field.annotation is str:
                texts.append(name)
            else:
                others.append(name)
        plan = _MODEL_PLANS[cls] = (fixed, tuple(ints), tuple(texts), tuple(others))
    return plan


def int_digits(value: int) -> int:
    """How many digits ``value`` has (``str`` refuses to tell past 4,300 of them)."""
    bits = abs(value).bit_length()
    estimate = max(1, int(bits * math.log10(2)))  # the exact count, or one less
    power: int = 10**estimate
    return estimate + 1 if abs(value) >= power else estimate


def _scan_model(value: BaseModel, depth: int, max_depth: int, budget: int) -> int:
    """``_scan`` of a model without extra fields, at ``depth`` (already within the limit)."""
    kind = type(value)
    if kind.__pydantic_root_model__:
        return _scan(value.root, depth, max_depth, budget)  # type: ignore[attr-defined]
    fixed, ints, texts, others = _MODEL_PLANS.get(kind) or _model_plan(kind)
    size = 4 + fixed
    fields = value.__dict__
    for name in ints:
        number = fields[name]
        if type(number) is not int or not -SMALL_INT < number < SMALL_INT:
            return _FAIL  # a huge number (or a value assigned around validation)
        size += 2 if 0 <= number < 10 else len(str(number)) + 1
    for name in texts:
        text = fields[name]
        if type(text) is not str:
            size += _scan(text, depth + 1, max_depth, budget)
        elif "\x00" in text or (not text.isascii() and LONE_SURROGATE.search(text)):
            return _FAIL
        else:
            size += len(text) + 3
    for name in others:
        size += _scan(fields[name], depth + 1, max_depth, budget)
        if not 0 <= size <= budget:
            return _FAIL
    return size


#: Values of these types are written as short JSON strings: the fast scan counts them so.
_SHORT_TEXTS: Final = (datetime, date, time, timedelta, UUID)


def _scan(value: Any, depth: int, max_depth: int, budget: int) -> int:  # noqa: PLR0911, PLR0912
    """Approximate JSON size of ``value``, or a negative number if it breaks a limit.

    Recursion depth is bounded by ``max_depth`` (at most ``FAST_SCAN_MAX_DEPTH``). A
    container stops as soon as it has passed ``budget`` (the size allowed) or met anything
    unusual: values shared many times over (``[a, a]`` nested) cost no more than the budget.
    A negative number hands the decision to the slow scan.
    """
    kind = type(value)
    if kind is str:
        if "\x00" in value or (not value.isascii() and LONE_SURROGATE.search(value)):
            return _FAIL
        return len(value) + 3
    if kind is int:
        if 0 <= value < 10:
            return 2
        return len(str(value)) + 1 if -SMALL_INT < value < SMALL_INT else _FAIL
    if kind is bool or value is None:
        return 6  # false, and its comma
    if kind is float:
        return len(repr(value)) + 1 if math.isfinite(value) else _FAIL
    if kind in _SHORT_TEXTS:
        return 40
    if depth > max_depth:
        return _FAIL
    if isinstance(value, BaseModel) and not value.__pydantic_extra__:
        return _scan_model(value, depth, max_depth, budget)
    size = 4
    if kind is dict:
        for key, child in value.items():
            if type(key) is not str or "\x00" in key or not key.isascii():
                return _FAIL
            size += len(key) + 3 + _scan(child, depth + 1, max_depth, budget)
            if not 0 <= size <= budget:
                return _FAIL
        return size
    if kind is list or kind is tuple:
        for child in value:
            size += _scan(child, depth + 1, max_depth, budget)
            if not 0 <= size <= budget:
                return _FAIL
        return size
    return _FAIL


#: Per model (or Pydantic dataclass) class: how long each written field's key is, by field
#: name; fields excluded from dumps are left out.
_KEY_WIDTHS: dict[type, dict[str, int]] = {}


def key_widths(cls: type) -> dict[str, int]:
    widths = _KEY_WIDTHS.get(cls)
    if widths is None:
        fields = getattr(cls, "__pydantic_fields__", None) or {}
        widths = _KEY_WIDTHS[cls] = {
            name: len(field.serialization_alias or field.alias or name)
            for name, field in fields.items()
            if not field.exclude
        }
    return widths


def fast_size(event: Event, max_depth: int, budget: int) -> int:
    """Approximate JSON size of an event of a declared type, or negative if unsure or bad.

    ``max_depth`` 0 means the limit is too deep for the recursive scan: always unsure.
    """
    text = event.aggregate_id
    if (
        not max_depth
        or type(event.version) is not int
        or not 0 < event.version <= MAX_VERSION
        or type(text) is not str
        or "\x00" in text
        or (not text.isascii() and LONE_SURROGATE.search(text))
    ):
        return _FAIL
    size = len(text) + len(event.type) + 80
    payload, metadata = event.payload, event.metadata
    if payload is not None:
        if type(payload) in _MODEL_PLANS and not payload.__pydantic_extra__:
            size += _scan_model(payload, 1, max_depth, budget)  # the usual typed payload
        else:
            size += _scan(payload, 1, max_depth, budget)
    if metadata is not None:
        size += _scan(metadata, 1, max_depth, budget)
    return size
