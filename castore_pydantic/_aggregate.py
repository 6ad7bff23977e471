"""The ``Aggregate`` base model and the reducer type."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias, TypeVar

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from castore_pydantic._event import Event, WireModel

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
