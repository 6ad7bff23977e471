"""Inputs a schema must refuse: not a mapping, a field missing, of the wrong type or out of range.

Each candidate starts from a valid input and breaks one thing. Every candidate is checked
against the real validator before it is produced, so what comes out is always refused, even
when a mutation happens to produce something the schema accepts (``None`` for an optional
field, a digit string for an ``int``).
"""

from __future__ import annotations

import datetime as dt
import functools
import types
from collections.abc import Callable
from decimal import Decimal
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin

import pydantic_core
from hypothesis import strategies as st
from pydantic import (
    BaseModel,
    ValidationError,
)

from castore_pydantic.testing._derive import ModelPlan, Resolver
from castore_pydantic.testing._scalars import Constraints, pydantic_pattern

__all__ = ["invalid_inputs"]

#: Values of the wrong kind for most fields; those a field accepts are filtered out later.
_WRONG_VALUES: tuple[Any, ...] = (
    [],
    ["unexpected"],
    {},
    {"unexpected": True},
    "not a valid value",
    "",
    3.5,
    -1,
    True,
    None,
)
#: Not an input at all (JSON text that does not parse, or parses to the wrong shape).
_NOT_INPUTS: tuple[Any, ...] = (
    None,
    42,
    3.5,
    True,
    ["a", "list"],
    "not JSON",
    "[1, 2]",
    '"text"',
    "{",
)
#: Strings tried against a pattern; the first few that do not match it are used.
_PATTERN_PROBES = ("", " ", "!", "0", "a", "A", "-", "\t", "zz", "__")


def _rejected(validate: Callable[[Any], Any], value: Any) -> bool:
    try:
        validate(value)
    except ValidationError:
        return True
    return False


def _as_json(value: Any) -> str:
    return pydantic_core.to_json(value).decode()


def invalid_inputs(
    schema: Any, validate: Callable[[Any], Any], resolver: Resolver
) -> st.SearchStrategy[Any]:
    """Inputs that ``validate`` (the schema's validator) refuses with ``ValidationError``."""
    families: list[st.SearchStrategy[Any]] = [st.sampled_from(_NOT_INPUTS)]
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        plan = resolver.plan(schema)
        broken = _broken_models(plan)
        # JSON text of a broken mapping is refused as well: it exercises the JSON path.
        families += [broken, broken.map(_as_json)]
    else:
        families.append(st.sampled_from(_WRONG_VALUES))
    return st.one_of(families).filter(lambda value: _rejected(validate, value))


def _broken_models(plan: ModelPlan) -> st.SearchStrategy[Any]:
    model = plan.model
    fields = model.model_fields
    required = [name for name, field in fields.items() if field.is_required()]
    violations = {
        name: _violations(field.annotation, tuple(field.metadata)) for name, field in fields.items()
    }
    constrained = [name for name, found in violations.items() if found]
    forbid_extra = model.model_config.get("extra") == "forbid"
    kinds = ["wrong type"] * bool(fields) + ["missing"] * bool(required)
    kinds += ["out of range"] * bool(constrained) + ["extra"] * forbid_extra
    if not kinds:
        return st.nothing()

    @st.composite
    def broken(draw: st.DrawFn) -> Any:
        values = draw(plan.inputs())
        kind = draw(st.sampled_from(kinds))
        if kind == "missing":
            values.pop(draw(st.sampled_from(required)), None)
        elif kind == "wrong type":
            values[draw(st.sampled_from(list(fields)))] = draw(st.sampled_from(_WRONG_VALUES))
        elif kind == "out of range":
            name = draw(st.sampled_from(constrained))
            values[name] = draw(st.sampled_from(violations[name]))(values.get(name))
        data = plan.assemble(values)
        if kind == "extra" and isinstance(data, dict):
            data["unexpected_field"] = draw(st.sampled_from(_WRONG_VALUES))
        return data

    return broken()


Breaker = Callable[[Any], Any]


def _violations(annotation: Any, metadata: tuple[Any, ...]) -> list[Breaker]:
    """Ways to turn a field's valid value into one that breaks its constraints."""
    while get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            return []
        annotation = members[0]
    c = Constraints.of(metadata)
    past = [_step(c.ge, -1), c.gt, _step(c.le, +1), c.lt]
    breakers: list[Breaker] = [_constant(value) for value in past if value is not None]
    if isinstance(c.multiple_of, int) and c.multiple_of > 1:
        breakers.append(_constant(c.multiple_of + 1))
    if c.min_length:
        breakers.append(functools.partial(_resize, size=c.min_length - 1))
    if c.max_length is not None:
        breakers.append(functools.partial(_resize, size=c.max_length + 1))
    if c.pattern is not None:
        accepts = pydantic_pattern(c.pattern)
        misses = [p for p in _PATTERN_PROBES if not accepts(p)][:3]
        breakers.extend(_constant(miss) for miss in misses)
    if c.max_digits is not None:
        breakers.append(_constant(Decimal("9" * (c.max_digits + 1))))
    if c.decimal_places is not None:
        breakers.append(_constant(Decimal("0." + "1" * (c.decimal_places + 1))))
    if get_origin(annotation) is Literal or (
        isinstance(annotation, type) and issubclass(annotation, Enum)
    ):
        breakers.append(_constant("__not_an_allowed_value__"))
    return breakers


def _constant(value: Any) -> Breaker:
    return lambda _: value


def _step(bound: Any, direction: int) -> Any:
    """A value just past ``bound`` in ``direction``, or ``None`` for unknown kinds."""
    if bound is None or isinstance(bound, bool):
        return None
    if isinstance(bound, int | float | Decimal):
        return bound + direction
    if isinstance(bound, dt.datetime | dt.date):
        return bound + direction * dt.timedelta(days=1)
    if isinstance(bound, dt.timedelta):
        return bound + direction * dt.timedelta(seconds=1)
    return None


def _resize(value: Any, size: int) -> Any:
    """``value`` cut or padded to ``size`` items (characters for strings)."""
    if isinstance(value, str):
        return value[:size] + "x" * max(0, size - len(value))
    if isinstance(value, bytes):
        return value[:size] + b"x" * max(0, size - len(value))
    if isinstance(value, dict):
        items = list(value.items())[:size]
        filler = next(iter(value.values()), "x")
        items += [(f"extra_key_{i}", filler) for i in range(size - len(items))]
        return dict(items)
    if isinstance(value, list | tuple | set | frozenset):
        elements = list(value)[:size]
        return elements + [elements[-1] if elements else "x"] * (size - len(elements))
    return "x" * size
