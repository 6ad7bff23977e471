"""How the SQLite adapter lays out events: its SQL, its column texts, reads in slices.

Timestamps are stored as fixed-width text (``2024-01-01T00:00:00.000Z``), so that text order is
time order and round trips are exact; ``data`` and ``metadata`` hold the JSON form of the event's
payload and metadata, or NULL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from castore_pydantic._event import MAX_VERSION, format_timestamp

__all__ = [
    "MAX_INTEGER",
    "SLICE",
    "LongRead",
    "Statements",
    "timestamp_text",
]

#: The largest value of SQLite's INTEGER (the highest version); bounds past it cannot be bound.
MAX_INTEGER: Final = MAX_VERSION

#: One (timestamp, text) pair, replaced as a whole so that threads never see a torn pair.
_LAST_TIMESTAMP: list[tuple[datetime | None, str]] = [(None, "")]


def timestamp_text(value: datetime) -> str:
    """``2024-01-01T00:00:00.000Z``: UTC, truncated to the millisecond, fixed width."""
    # Back-to-back writes mostly share their millisecond: remember the last rendering.
    last, text = _LAST_TIMESTAMP[0]
    if value is last:  # not ==, which ignores ``fold`` (an hour apart, at a DST change)
        return text
    # Years are padded to four digits, so the text sorts like the instant.
    text = format_timestamp(value)
    _LAST_TIMESTAMP[0] = (value, text)
    return text


class Statements:
    """The SQL of one events table.

    The table name is checked against ``_IDENTIFIER`` before it gets here, and quoted; that
    is why the f-strings below are safe (``S608``).
    """

    __slots__ = ("create", "get", "insert", "list_base", "parses", "unlisted", "upsert", "versions")

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
        # subquery into an aggregate query. Besides the JSON array, each statement returns
        # how many events it holds and the version of the last one, where a long read's
        # next statement starts.
        array = (
            "json_group_array(json_object('aggregateId', aggregate_id, 'version', version,"
            " 'type', type, 'timestamp', timestamp, 'payload', json(data),"
            " 'metadata', json(metadata))), count(*)"
        )
        get: dict[tuple[bool, bool, bool], str] = {}
        # ``versions``: the versions a statement of ``get`` reads (same parameters);
        # ``parses``: one row's columns through json(), which fails as ``get`` does on text
        # that is not JSON. Together they find the row a failed read stumbled on.
        versions: dict[tuple[bool, bool, bool], str] = {}
        for has_min in (False, True):
            for has_max in (False, True):
                for reverse in (False, True):
                    last = "min(version)" if reverse else "max(version)"
                    where = (" AND version >= ?" if has_min else "") + (
                        " AND version <= ?" if has_max else ""
                    )
                    order = "version DESC" if reverse else "version"
                    rows = (
                        f"FROM {quoted} WHERE aggregate_name = ? AND aggregate_id = ?{where}"
                        f" ORDER BY {order} LIMIT ?"
                    )
                    get[has_min, has_max, reverse] = (
                        f"SELECT {array}, {last} FROM (SELECT aggregate_id, version, type,"  # noqa: S608
                        f" timestamp, data, metadata {rows})"
                    )
                    versions[has_min, has_max, reverse] = f"SELECT version {rows}"
        self.get = get
        self.versions = versions
        self.parses = (
            f"SELECT length(json(data)), length(json(metadata)) FROM {quoted}"  # noqa: S608
            " WHERE aggregate_name = ? AND aggregate_id = ? AND version = ?"
        )
        self.unlisted = (
            f"SELECT aggregate_id FROM {quoted} WHERE aggregate_name = ?"  # noqa: S608
            " GROUP BY aggregate_id HAVING min(version) > 1 ORDER BY aggregate_id"
        )
        self.list_base = (
            f"SELECT aggregate_id, timestamp FROM {quoted}"  # noqa: S608
            " WHERE aggregate_name = ? AND version = 1"
        )


#: Events per statement of a long read (one without a limit, or a limit above this).
SLICE: Final = 1000


class LongRead:
    """Where a read of one aggregate's events stands: its bounds and what is left of it.

    Each slice starts after the version where the previous one stopped, so a read in slices
    returns what one statement would (inside one transaction, they see the same events).
    """

    __slots__ = (
        "abandoned",
        "done",
        "key",
        "left",
        "max_version",
        "min_version",
        "reverse",
        "size",
        "slice",
        "statements",
    )

    def __init__(
        self,
        statements: Statements,
        key: tuple[str, str],
        min_version: int | None,
        max_version: int | None,
        limit: int | None,
        *,
        reverse: bool,
    ) -> None:
        self.statements = statements
        self.key = key
        self.min_version = min_version
        self.max_version = max_version
        self.left = limit
        self.reverse = reverse
        #: Events per statement: ``SLICE``, less for events whose JSON text is very long.
        self.slice = SLICE
        self.size = 0
        self.done = False
        #: Set by the reading task when it stops listening; the worker then ends the read.
        self.abandoned = False

    @property
    def sql(self) -> str:
        return self.statements.get[
            self.min_version is not None, self.max_version is not None, self.reverse
        ]

    @property
    def versions_sql(self) -> str:
        """The versions that ``sql`` (with the same parameters) reads, in its order."""
        return self.statements.versions[
            self.min_version is not None, self.max_version is not None, self.reverse
        ]

    def next_params(self) -> tuple[Any, ...]:
        """The parameters of the next slice's statement (``sql`` as it is now)."""
        self.size = self.slice if self.left is None else min(self.slice, self.left)
        params: tuple[Any, ...] = self.key
        if self.min_version is not None:
            params += (self.min_version,)
        if self.max_version is not None:
            params += (self.max_version,)
        return (*params, self.size)

    def advance(self, count: int, last: int | None) -> None:
        """Move past a slice of ``count`` events whose last version is ``last``."""
        if self.left is not None:
            self.left -= count
        self.done = count < self.size or last is None or self.left == 0
        if last is None:
            return
        if self.reverse:
            self.max_version = last - 1
            self.done = self.done or last <= 1
        else:
            self.min_version = last + 1
            self.done = self.done or last >= MAX_INTEGER
