"""How the SQLite adapter lays out events: its SQL and the text of its columns.

Timestamps are stored as fixed-width text (``2024-01-01T00:00:00.000Z``), so that text order is
time order and round trips are exact; ``data`` and ``metadata`` hold the JSON form of the event's
payload and metadata, or NULL.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from pydantic import PydanticSchemaGenerationError, PydanticUserError, TypeAdapter

from castore_pydantic._event import Event

__all__ = ["Statements", "ceil_timestamp_text", "json_columns", "timestamp_text"]

#: One (timestamp, text) pair, replaced as a whole so that threads never see a torn pair.
_LAST_TIMESTAMP: list[tuple[datetime | None, str]] = [(None, "")]


def timestamp_text(value: datetime) -> str:
    """``2024-01-01T00:00:00.000Z``: UTC, truncated to the millisecond, fixed width."""
    # Back-to-back writes mostly share their millisecond: remember the last rendering.
    last, text = _LAST_TIMESTAMP[0]
    if value == last:
        return text
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    extra = utc.microsecond % 1000
    if extra:
        utc = utc.replace(microsecond=utc.microsecond - extra)
    # isoformat pads the year to four digits, so the text sorts like the instant.
    text = utc.isoformat(timespec="milliseconds")[:-6] + "Z"
    _LAST_TIMESTAMP[0] = (value, text)
    return text


def ceil_timestamp_text(value: datetime) -> str | None:
    """The first whole millisecond at or after ``value``; ``None`` past the last one."""
    value = value.astimezone(UTC)
    extra = value.microsecond % 1000
    if extra:
        try:
            value += timedelta(microseconds=1000 - extra)
        except OverflowError:
            return None
    return timestamp_text(value)


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

    def columns(event: Event) -> tuple[str | None, str | None]:
        p, m = event.payload, event.metadata
        return (
            None if p is None else payload.dump_json(p, by_alias=True).decode(),
            None if m is None else metadata.dump_json(m, by_alias=True).decode(),
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


class Statements:
    """The SQL of one events table.

    The table name is checked against ``_IDENTIFIER`` before it gets here, and quoted; that
    is why the f-strings below are safe (``S608``).
    """

    __slots__ = ("create", "get", "insert", "list_base", "upsert")

    def __init__(self, table: str) -> None:
        quoted = f'"{table}"'
        self.create = (
            f"CREATE TABLE IF NOT EXISTS {quoted} ("
            " id INTEGER PRIMARY KEY,"
            " aggregate_name TEXT NOT NULL,"
            " aggregate_id TEXT NOT NULL,"
            " version INTEGER NOT NULL,"
            " type TEXT NOT NULL,"
            " data TEXT,"
            " metadata TEXT,"
            " timestamp TEXT NOT NULL,"
            " UNIQUE (aggregate_name, aggregate_id, version))",
            f'CREATE INDEX IF NOT EXISTS "{table}_initial_events"'
            f" ON {quoted} (aggregate_name, version, timestamp, aggregate_id)",
        )
        self.insert = (
            f"INSERT INTO {quoted}"  # noqa: S608
            " (aggregate_name, aggregate_id, version, type, data, metadata, timestamp)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        self.upsert = (
            f"{self.insert} ON CONFLICT (aggregate_name, aggregate_id, version) DO UPDATE SET"
            " type = excluded.type, data = excluded.data, metadata = excluded.metadata,"
            " timestamp = excluded.timestamp"
        )
        # The outer aggregate keeps the inner ORDER BY: SQLite never flattens an ordered
        # subquery into an aggregate query.
        get: dict[tuple[bool, bool, bool, bool], str] = {}
        for has_min in (False, True):
            for has_max in (False, True):
                for has_limit in (False, True):
                    for reverse in (False, True):
                        get[has_min, has_max, has_limit, reverse] = (
                            "SELECT json_group_array(json_object("  # noqa: S608
                            "'aggregateId', aggregate_id, 'version', version, 'type', type,"
                            " 'timestamp', timestamp, 'payload', json(data),"
                            " 'metadata', json(metadata)))"
                            " FROM (SELECT aggregate_id, version, type, timestamp, data, metadata"
                            f" FROM {quoted} WHERE aggregate_name = ? AND aggregate_id = ?"
                            + (" AND version >= ?" if has_min else "")
                            + (" AND version <= ?" if has_max else "")
                            + (" ORDER BY version DESC" if reverse else " ORDER BY version")
                            + (" LIMIT ?" if has_limit else "")
                            + ")"
                        )
        self.get = get
        self.list_base = (
            f"SELECT aggregate_id, timestamp FROM {quoted}"  # noqa: S608
            " WHERE aggregate_name = ? AND version = 1"
        )
