"""The JSON text of an event's payload and metadata, as the SQL adapters store it.

Both SQL adapters write the same text for the same event, so that an event type's own
serialisation settings shape what is stored whichever backend stores it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

from pydantic import PydanticSchemaGenerationError, PydanticUserError, TypeAdapter
from pydantic_core import PydanticSerializationError

from castore_pydantic._event import Event
from castore_pydantic.errors import EventLimitExceededError

__all__ = ["json_columns", "storable_columns"]

#: Config keys that only affect validation or schemas, never how values serialise to JSON.
_SERIALISATION_NEUTRAL_CONFIG: Final = frozenset(
    {
        "title",
        "json_schema_extra",
        "extra",
        "frozen",
        "strict",
        "validate_assignment",
        "validate_default",
        "revalidate_instances",
        "from_attributes",
        "populate_by_name",
        "use_enum_values",
        "str_strip_whitespace",
        "str_to_lower",
        "str_to_upper",
        "str_min_length",
        "str_max_length",
        "protected_namespaces",
        "arbitrary_types_allowed",
    }
)
_JsonColumns = Callable[[Event], tuple[str | None, str | None]]
_JSON_COLUMNS: dict[type[Event], _JsonColumns] = {}


def json_columns(event: Event) -> tuple[str | None, str | None]:
    """The ``data`` and ``metadata`` column texts: the event's JSON form of each, or NULL."""
    columns = _JSON_COLUMNS.get(type(event))
    if columns is None:
        columns = _JSON_COLUMNS[type(event)] = _columns_for(type(event))
    return columns(event)


def storable_columns(event: Event, event_store_id: str) -> tuple[str | None, str | None]:
    """``json_columns``, refusing what JSON cannot hold as a limit of the event.

    Raises:
        EventLimitExceededError: The payload or metadata cannot be serialised as JSON (bytes
            that are not UTF-8, for instance); nothing is written.
    """
    try:
        return json_columns(event)
    except (PydanticSerializationError, ValueError) as exc:
        raise EventLimitExceededError(
            event_store_id, f"payload or metadata not serialisable as JSON: {exc}"
        ) from exc


def _columns_for(cls: type[Event]) -> _JsonColumns:
    """Serialise payload and metadata directly with their field types when that is exact.

    Dumping the whole event runs its model serialiser in Python; serialising the two fields
    with ``TypeAdapter``s of their declared types gives the same JSON several times faster,
    as long as the event class adds no serialiser and no serialisation setting of its own.
    Otherwise the event's own serialisation is used.
    """
    decorators = cls.__pydantic_decorators__
    base = Event.__pydantic_decorators__.model_serializers
    fields = cls.model_fields
    plain = (
        not decorators.field_serializers
        and decorators.model_serializers.keys() == base.keys()
        and all(decorators.model_serializers[k].func is base[k].func for k in base)
        and not fields["payload"].metadata
        and not fields["metadata"].metadata
        and all(
            value == Event.model_config.get(key)
            for key, value in cls.model_config.items()
            if key not in _SERIALISATION_NEUTRAL_CONFIG
        )
    )
    if plain:
        try:
            payload_type: Any = fields["payload"].annotation
            metadata_type: Any = fields["metadata"].annotation
            payload = TypeAdapter(payload_type)
            metadata = TypeAdapter(metadata_type)
        except (PydanticUserError, PydanticSchemaGenerationError):  # pragma: no cover
            plain = False
    if not plain:
        return _columns_via_event

    # The serialisers themselves: ``TypeAdapter.dump_json`` adds a Python call per value.
    payload_json = payload.serializer.to_json
    metadata_json = metadata.serializer.to_json

    def columns(event: Event) -> tuple[str | None, str | None]:
        p, m = event.payload, event.metadata
        return (
            None if p is None else payload_json(p, by_alias=True).decode(),
            None if m is None else metadata_json(m, by_alias=True).decode(),
        )

    return columns


def _columns_via_event(event: Event) -> tuple[str | None, str | None]:
    data = event.model_dump(mode="json", include={"payload", "metadata"})
    payload, metadata = data.get("payload"), data.get("metadata")
    return (
        None if payload is None else _dumps(payload),
        None if metadata is None else _dumps(metadata),
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
