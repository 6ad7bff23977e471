"""The ``Aggregate`` base model and the reducer type."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from castore_pydantic._event import Event, WireModel
from castore_pydantic._types import function_of

__all__ = ["Aggregate", "AggregateT", "EventT", "Reducer"]


class Aggregate(WireModel):
    """Base class of aggregates: the state of one entity, folded from its events.

    Subclass it with your own fields; ``aggregate_id`` and ``version`` (the version of the last
    event folded in) come from here. Aggregates are immutable: a reducer returns a new one,
    usually with ``aggregate.model_copy(update={...})``. Their JSON form uses camelCase keys.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        frozen=True,
    )

    aggregate_id: str
    version: int = Field(ge=0)


AggregateT = TypeVar("AggregateT")
EventT = TypeVar("EventT", bound=Event)

Reducer: TypeAlias = Callable[[AggregateT | None, EventT], AggregateT]
"""A reducer folds one event into the aggregate: ``(aggregate | None, event) -> aggregate``."""


def reduced_model(reducer: Callable[..., Any]) -> type[BaseModel] | None:
    """The Pydantic model a reducer returns, when its return annotation names exactly one.

    The annotation is read where a command's are (``function_of``): through a partial or a
    decorator, and on a callable object's ``__call__``.
    """
    try:
        hint = typing.get_type_hints(function_of(reducer)).get("return")
    except Exception:  # an unresolvable annotation just means "unknown"
        return None
    candidates = (
        typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    )
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if len(models) == 1 else None
