"""SQL of the PostgreSQL adapter: identifiers, the table layout and every statement.

Identifiers are quoted with ``psycopg.sql.Identifier`` and never interpolated raw; values are
always bound parameters. Statements are rendered to text once per adapter (composing them
on every call would cost more than the round trip saves). A rendered identifier has its
``%`` doubled, because psycopg reads ``%`` in the query text as a placeholder even inside a
quoted identifier: a table named ``t%sx`` would otherwise break, and one named ``t%%x`` would
silently address the table ``t%x``.
"""

# ruff: noqa: S608 - statements are built from quoted identifiers and %s placeholders only

from __future__ import annotations

import hashlib
from typing import Literal, TypeAlias

from psycopg import sql

__all__ = [
    "AggregateIdType",
    "Statements",
    "check_identifier",
    "derived_name",
]

#: PostgreSQL silently truncates longer identifiers, so two long names could meet.
MAX_IDENTIFIER_BYTES = 63

AggregateIdType: TypeAlias = Literal["text", "uuid"]
"""How ``create_event_table`` types the ``aggregate_id`` column."""

_ID_COLUMN_TYPES: dict[str, str] = {"text": 'text COLLATE "C"', "uuid": "uuid"}
_UNIQUE_SUFFIX = "aggregate_name_aggregate_id_version_key"
_LISTING_SUFFIX = "initial_events_idx"
_COLUMNS = 'aggregate_name, aggregate_id, version, type, data, metadata, "timestamp"'
_ROW = "(%s, %s, %s, %s, %s, %s, %s)"
_UPSERT = (
    " ON CONFLICT (aggregate_name, aggregate_id, version) DO UPDATE SET"
    " type = EXCLUDED.type, data = EXCLUDED.data, metadata = EXCLUDED.metadata,"
    ' "timestamp" = EXCLUDED."timestamp"'
)
# The id as the row holds it: a uuid column stores another spelling of a UUID (upper case,
# braces, no hyphens) in lower-case canonical form.
_RETURNING_ID = " RETURNING aggregate_id::text"
# The initial event timestamp as listed: UTC, truncated to the millisecond like every
# timestamp this library hands out, so that page cursors (which carry milliseconds) compare
# equal to the rows they came from even when another program wrote microseconds.
# Both functions are immutable, so the expression can be indexed.
INITIAL_TIMESTAMP = "date_trunc('milliseconds', \"timestamp\" AT TIME ZONE 'UTC')"
# Columns of one event as a JSON object in Castore's wire shape. ``timestamp`` is rendered
# in Castore's text form, UTC and truncated to the millisecond (``MS``), whatever the
# session's time zone and even for rows another program wrote with microseconds.
_EVENT_JSON_COLUMNS = (
    'aggregate_id AS "aggregateId", version, type,'
    """ to_char("timestamp" AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"""
    ' AS "timestamp", data AS payload, metadata'
)


def check_identifier(name: object, what: str) -> str:
    """Return ``name`` if PostgreSQL can hold it as one identifier, else raise.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: It is empty, contains NUL or is longer than 63 bytes in UTF-8.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    if "\x00" in name:
        raise ValueError(f"{what} must not contain NUL characters")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode: {name!r}") from None
    if size > MAX_IDENTIFIER_BYTES:
        raise ValueError(
            f"{what} is {size} bytes long in UTF-8; PostgreSQL identifiers hold at most "
            f"{MAX_IDENTIFIER_BYTES} (longer names would be truncated silently)"
        )
    return name


def derived_name(table: str, suffix: str) -> str:
    """A constraint or index name for ``table`` that fits in 63 bytes.

    Short tables get ``<table>_<suffix>``, which is also the name PostgreSQL gives the
    unique constraint of a table created by Castore. Longer ones keep a prefix of the table
    name and a hash of the whole, so that two long table names never share a derived name.
    """
    name = f"{table}_{suffix}"
    if len(name.encode("utf-8")) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha256(table.encode("utf-8")).hexdigest()[:10]
    budget = MAX_IDENTIFIER_BYTES - len(suffix) - len(digest) - 2
    prefix = table.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    return f"{prefix}_{digest}_{suffix}"


def _quote(*names: str, placeholders: bool = True) -> str:
    """Quote an identifier (optionally schema-qualified) for statement text."""
    text = sql.Identifier(*names).as_string(None)
    return text.replace("%", "%%") if placeholders else text


class Statements:
    """Every statement of one adapter, rendered once for its schema and table.

    Args:
        schema: The schema, or ``None`` to follow the connection's ``search_path``.
        table: The table name.
    """

    def __init__(self, schema: str | None, table: str) -> None:
        self.schema = schema
        self.table_name = table
        names = (schema, table) if schema is not None else (table,)
        self.table = _quote(*names)
        self.table_ddl = _quote(*names, placeholders=False)
        self.unique_name = derived_name(table, _UNIQUE_SUFFIX)
        self.listing_index = derived_name(table, _LISTING_SUFFIX)
        self.insert = f"INSERT INTO {self.table} ({_COLUMNS}) VALUES {_ROW}"
        self.upsert = self.insert + _UPSERT
        self.insert_returning = self.insert + _RETURNING_ID
        self.upsert_returning = self.upsert + _RETURNING_ID
        self._events: dict[tuple[bool, bool, bool], str] = {}
        self._first_events: dict[tuple[bool, bool], str] = {}
        self._listings: dict[tuple[bool, bool, bool, bool, bool], str] = {}

    # -- schema ------------------------------------------------------------------------------

    def existing(self) -> str:
        """What of the schema, the table and its listing index exists, from the catalog.

        Reading the catalog takes no lock on the table, unlike ``CREATE ... IF NOT EXISTS``,
        which asks for one before it finds that there is nothing to do (and then waits
        behind every open write), and needs no privilege beyond ``USAGE`` on the schema,
        whereas those statements check ``CREATE`` on the database or ownership of the table
        first. Parameters, by name: ``schema`` (``None`` without one), ``table`` (its
        ``regclass`` text) and ``index`` (the listing index's name). One row: whether the
        schema exists, whether the table does, its column names, and whether its schema
        holds a relation named like the index (what ``IF NOT EXISTS`` would look at).
        """
        return (
            "SELECT %(schema)s::text IS NULL"
            " OR EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = %(schema)s),"
            " r.oid IS NOT NULL,"
            " ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = r.oid"
            " AND a.attnum > 0 AND NOT a.attisdropped),"
            " EXISTS (SELECT 1 FROM pg_class t JOIN pg_class i"
            " ON i.relnamespace = t.relnamespace AND i.relname = %(index)s WHERE t.oid = r.oid)"
            " FROM (SELECT to_regclass(%(table)s) AS oid) r"
        )

    def create_schema(self) -> str:
        """DDL creating the named schema unless it exists."""
        assert self.schema is not None
        return f"CREATE SCHEMA IF NOT EXISTS {_quote(self.schema, placeholders=False)}"

    def create_table(self, aggregate_id_type: AggregateIdType) -> str:
        """DDL creating the table unless it exists."""
        id_type = _ID_COLUMN_TYPES[aggregate_id_type]
        unique = _quote(self.unique_name, placeholders=False)
        return (
            f"CREATE TABLE IF NOT EXISTS {self.table_ddl} ("
            " id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,"
            ' aggregate_name text COLLATE "C" NOT NULL,'
            f" aggregate_id {id_type} NOT NULL,"
            " version bigint NOT NULL,"
            " type text NOT NULL,"
            " data jsonb,"
            " metadata jsonb,"
            ' "timestamp" timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP(3),'
            f" CONSTRAINT {unique} UNIQUE (aggregate_name, aggregate_id, version))"
        )

    def create_index(self) -> str:
        """DDL creating the index that serves ``list_aggregate_ids``."""
        index = _quote(self.listing_index, placeholders=False)
        return (
            f"CREATE INDEX IF NOT EXISTS {index} ON {self.table_ddl}"
            f" (aggregate_name, ({INITIAL_TIMESTAMP}), aggregate_id) WHERE version = 1"
        )

    def drop(self) -> str:
        """DDL dropping the table (never the schema)."""
        return f"DROP TABLE IF EXISTS {self.table_ddl}"

    @staticmethod
    def is_event_key() -> str:
        """Whether a named unique index is the event key of the events table.

        Its key columns must be exactly the key's (the columns of its ``INCLUDE`` are not
        part of what it keeps unique), on the events table or one of its partitions (or
        inheritance children), at any depth. Parameters, by name: the ``schema``, ``table``
        and ``index`` PostgreSQL named in the error, and the events table's ``regclass``
        text (``events``).
        """
        return (
            "WITH RECURSIVE above(oid) AS ("
            " SELECT t.oid FROM pg_class t JOIN pg_namespace tn ON tn.oid = t.relnamespace"
            " WHERE tn.nspname = %(schema)s AND t.relname = %(table)s"
            " UNION SELECT h.inhparent FROM pg_inherits h JOIN above ON h.inhrelid = above.oid)"
            " SELECT EXISTS (SELECT 1 FROM pg_index i"
            " JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %(schema)s AND c.relname = %(index)s AND i.indisunique"
            " AND i.indrelid = (SELECT t.oid FROM pg_class t WHERE t.relnamespace = n.oid"
            " AND t.relname = %(table)s)"
            " AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a"
            " WHERE a.attrelid = i.indrelid AND a.attnum IN (SELECT k.attnum"
            " FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)"
            " WHERE k.n <= i.indnkeyatts))"
            " = ARRAY['aggregate_id', 'aggregate_name', 'version'])"
            " AND to_regclass(%(events)s) IN (SELECT oid FROM above)"
        )

    @staticmethod
    def uuid_id_tables() -> str:
        """Which of the tables named (``regclass`` texts, one text array) have uuid ids.

        The column's type is ``uuid`` or a domain over it, at any depth (a domain stores
        its base type's values, so one UUID in two spellings is one key there too).
        """
        return (
            "SELECT t FROM unnest(%s::text[]) AS t WHERE 'uuid'::regtype IN ("
            "WITH RECURSIVE types(oid) AS (SELECT a.atttypid FROM pg_attribute a"
            " WHERE a.attrelid = to_regclass(t) AND a.attname = 'aggregate_id'"
            " AND NOT a.attisdropped"
            " UNION SELECT d.typbasetype FROM pg_type d JOIN types ON d.oid = types.oid"
            " WHERE d.typtype = 'd')"
            " SELECT oid FROM types)"
        )

    # -- writes ------------------------------------------------------------------------------

    def write(self, *, force: bool, returning: bool = False) -> str:
        """One event; ``returning``: its row's ``aggregate_id`` as text."""
        if returning:
            return self.upsert_returning if force else self.insert_returning
        return self.upsert if force else self.insert

    @staticmethod
    def write_group(
        targets: list[tuple[Statements, int]], *, force: bool, returning: bool = False
    ) -> str:
        """Several tables' rows as ONE statement: atomic without BEGIN/COMMIT round trips.

        Each table gets one multi-row INSERT; all but the last run as data-modifying CTEs.
        With ``returning``, every row written is returned as ``(target index, aggregate_name,
        aggregate_id, version)``, all as text (the index is the table's in ``targets``).
        """
        inserts = []
        for index, (statements, count) in enumerate(targets):
            rows = ", ".join([_ROW] * count)
            text = f"INSERT INTO {statements.table} ({_COLUMNS}) VALUES {rows}"
            if force:
                text += _UPSERT
            if returning:
                text += (
                    f" RETURNING '{index}', aggregate_name::text, aggregate_id::text, version::text"
                )
            inserts.append(text)
        if len(inserts) == 1:
            return inserts[0]
        if returning:
            ctes = ", ".join(f"w{i} AS ({text})" for i, text in enumerate(inserts))
            union = " UNION ALL ".join(f"SELECT * FROM w{i}" for i in range(len(inserts)))
            return f"WITH {ctes} {union}"
        ctes = ", ".join(f"w{i} AS ({text})" for i, text in enumerate(inserts[:-1]))
        return f"WITH {ctes} {inserts[-1]}"

    def exists(self) -> str:
        """Select ``%s`` (an index) if the event key ``(%s, %s, %s)`` is stored."""
        return (
            f"SELECT %s::int WHERE EXISTS (SELECT 1 FROM {self.table}"
            " WHERE aggregate_name = %s AND aggregate_id = %s AND version = %s)"
        )

    # -- reads -------------------------------------------------------------------------------

    def get_events(self, *, min_version: bool, max_version: bool, reverse: bool) -> str:
        """An aggregate's events as one JSON array text (NULL when there are none).

        Parameters: store id, aggregate id, min and max when flagged, then the limit
        (``NULL``: no limit).
        """
        key = (min_version, max_version, reverse)
        text = self._events.get(key)
        if text is None:
            direction = " DESC" if reverse else ""
            where = "aggregate_name = %s AND aggregate_id = %s"
            if min_version:
                where += " AND version >= %s"
            if max_version:
                where += " AND version <= %s"
            text = (
                f"SELECT json_agg(e ORDER BY e.version{direction})::text FROM"
                f" (SELECT {_EVENT_JSON_COLUMNS} FROM {self.table} WHERE {where}"
                f" ORDER BY version{direction} LIMIT %s) e"
            )
            self._events[key] = text
        return text

    def first_events(self, *, min_version: bool, max_version: bool) -> str:
        """The first events (up to a limit) and their count (at the limit: read it in full).

        Parameters: store id, aggregate id, min and max when flagged, then the limit.
        """
        key = (min_version, max_version)
        text = self._first_events.get(key)
        if text is None:
            where = "aggregate_name = %s AND aggregate_id = %s"
            if min_version:
                where += " AND version >= %s"
            if max_version:
                where += " AND version <= %s"
            text = self._first_events[key] = (
                "SELECT json_agg(e ORDER BY e.version)::text, count(*) FROM"
                f" (SELECT {_EVENT_JSON_COLUMNS} FROM {self.table} WHERE {where}"
                " ORDER BY version LIMIT %s) e"
            )
        return text

    def events_after(self, *, max_version: bool) -> str:
        """The events after a version, one JSON array text per chunk, in version order.

        PostgreSQL sends each chunk as soon as it is built, so the client validates one
        chunk while the server builds the next. Parameters: chunk size, store id, aggregate
        id, the version to start after, then max when flagged.
        """
        where = "aggregate_name = %s AND aggregate_id = %s AND version > %s"
        if max_version:
            where += " AND version <= %s"
        return (
            "SELECT json_agg(c.e ORDER BY c.version)::text FROM"
            " (SELECT e, e.version, (row_number() OVER (ORDER BY e.version) - 1) / %s AS chunk"
            f" FROM (SELECT {_EVENT_JSON_COLUMNS} FROM {self.table} WHERE {where}) e) c"
            " GROUP BY c.chunk ORDER BY c.chunk"
        )

    def event_rows_after(self, *, max_version: bool) -> str:
        """The events after a version, one JSON object text per row, in version order.

        Nothing in the plan waits for all rows (the unique index gives the order), so
        PostgreSQL sends rows as it produces them and the client validates a batch of rows
        while the server produces the next. Parameters: store id, aggregate id, the version
        to start after, then max when flagged.
        """
        where = "aggregate_name = %s AND aggregate_id = %s AND version > %s"
        if max_version:
            where += " AND version <= %s"
        return (
            f"SELECT row_to_json(e)::text FROM (SELECT {_EVENT_JSON_COLUMNS}"
            f" FROM {self.table} WHERE {where} ORDER BY version) e"
        )

    def unlisted_aggregate_ids(self) -> str:
        """Aggregates of a store without a version-1 event, by id. Parameter: store id."""
        return (
            f"SELECT aggregate_id::text FROM {self.table} WHERE aggregate_name = %s"
            " GROUP BY aggregate_id HAVING min(version) > 1 ORDER BY aggregate_id"
        )

    def list_aggregate_ids(
        self, *, after: bool, before: bool, cursor: bool, reverse: bool, limit: bool
    ) -> str:
        """Version-1 rows of a store, ordered by (initial timestamp, aggregate id).

        Parameters: store id, then after, before, cursor timestamp and id, limit when flagged.
        """
        key = (after, before, cursor, reverse, limit)
        text = self._listings.get(key)
        if text is None:
            direction = " DESC" if reverse else ""
            where = "aggregate_name = %s AND version = 1"
            if after:
                where += f" AND {INITIAL_TIMESTAMP} >= %s"
            if before:
                where += f" AND {INITIAL_TIMESTAMP} <= %s"
            if cursor:
                where += f" AND ({INITIAL_TIMESTAMP}, aggregate_id) {'<' if reverse else '>'}"
                where += " (%s, %s)"
            text = (
                f"SELECT aggregate_id::text, {INITIAL_TIMESTAMP} FROM {self.table}"
                f" WHERE {where}"
                f" ORDER BY {INITIAL_TIMESTAMP}{direction}, aggregate_id{direction}"
                + (" LIMIT %s" if limit else "")
            )
            self._listings[key] = text
        return text
