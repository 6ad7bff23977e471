"""What the PostgreSQL adapter writes: rows, event groups, and who a group's conflict was."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

from castore_pydantic._event import Event, stamped, utc_now, utf8_encodable
from castore_pydantic.errors import EventLimitExceededError
from castore_pydantic.storage import _postgres_direct as direct
from castore_pydantic.storage._columns import storable_columns
from castore_pydantic.storage._postgres_connection import AsyncConnection, tuple_cursor
from castore_pydantic.storage._postgres_jsonb import jsonb_text
from castore_pydantic.storage._postgres_sql import Statements

__all__ = [
    "GroupPlan",
    "Member",
    "event_row",
    "not_a_uuid",
    "recast",
    "refused_id",
    "storable",
]

# A statement holds at most 65,535 parameters (7 per event): larger groups are split.
ROWS_PER_STATEMENT = 5000
_GROUP_SQL_CACHE = 256  # group statements kept per adapter, by tables and sizes
_LOOKUP_BATCH = 500  # grouped events checked per query when finding a conflict's culprit


# What PostgreSQL's uuid input accepts: 32 hex digits, a hyphen allowed after each group of
# four, all in braces or none (``string_to_uuid`` in its ``uuid.c``).
_UUID_INPUT = re.compile(r"(\{)?[0-9A-Fa-f]{4}(?:-?[0-9A-Fa-f]{4}){7}(?(1)\})")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def recast(aggregate_id: str) -> bool:
    """Whether a uuid column would hold ``aggregate_id`` in another spelling.

    True for a UUID spelt other than lower-case canonical (upper case, braces, no hyphens):
    a push of such an id asks the row for the id it holds. Cheap for every other id, so
    that pushes to text tables pay (almost) nothing for it.
    """
    if len(aggregate_id) == 36 and _CANONICAL_UUID.fullmatch(aggregate_id) is not None:
        return False
    return 32 <= len(aggregate_id) <= 41 and _UUID_INPUT.fullmatch(aggregate_id) is not None


def not_a_uuid(aggregate_id: str) -> bool:
    """Whether PostgreSQL's uuid input refuses ``aggregate_id``."""
    return _UUID_INPUT.fullmatch(aggregate_id) is None


def uuid_refused(event_store_id: str, aggregate_id: str, table: str) -> EventLimitExceededError:
    """The error of an id that is no UUID pushed to a table whose ids are uuid."""
    return EventLimitExceededError(
        event_store_id,
        f"aggregate id {aggregate_id!r} is not a UUID, and the aggregate_id column of"
        f" {table} is uuid (as in Castore's default table): push UUIDs to it, or use a"
        " table made with create_event_table() (text ids)",
        ("aggregateId",),
    )


async def uuid_tables(conn: AsyncConnection, tables: Iterable[str]) -> frozenset[str]:
    """Which of ``tables`` (``regclass`` texts) have a ``uuid`` ``aggregate_id``.

    Raises:
        psycopg.Error: The lookup failed.
    """
    names = list(dict.fromkeys(tables))
    with direct.encoding_errors(conn):  # its parameters are names, not values
        cursor = await tuple_cursor(conn).execute(Statements.uuid_id_tables(), (names,))
    return frozenset(name for (name,) in await cursor.fetchall())


async def refused_id(
    conn: AsyncConnection, members: Sequence[tuple[Statements, str, str]]
) -> EventLimitExceededError | None:
    """The error naming the first of ``members`` whose id a uuid table refuses, if any.

    For a write that PostgreSQL refused as invalid text (``22P02``): ``members`` are
    ``(statements, event store id, aggregate id)`` in push order. An id that is no UUID is
    at fault if its table's ``aggregate_id`` is a ``uuid`` (or a domain over it). Looked
    up after the failure, so that writes pay nothing for it.

    Raises:
        psycopg.Error: The lookup failed.
    """
    suspects = [member for member in members if not_a_uuid(member[2])]
    if not suspects:
        return None
    found = await uuid_tables(conn, (statements.table_ddl for statements, _, _ in suspects))
    for statements, event_store_id, aggregate_id in suspects:
        if statements.table_ddl in found:
            return uuid_refused(event_store_id, aggregate_id, statements.table_ddl)
    return None


def storable(text: str) -> bool:
    """Whether PostgreSQL text can hold ``text`` (no NUL, valid Unicode)."""
    return "\x00" not in text and utf8_encodable(text)


def check_store_id(event_store_id: str) -> None:
    """Refuse an event store id PostgreSQL text cannot hold.

    Raises:
        EventLimitExceededError: It holds NUL or a lone surrogate.
    """
    if not storable(event_store_id):
        raise EventLimitExceededError(
            event_store_id,
            "PostgreSQL text cannot hold NUL or lone surrogates",
            ("eventStoreId",),
        )


def event_row(event: Event, event_store_id: str) -> tuple[Any, ...]:
    """The values of an event's row, in the order of ``Statements.insert``.

    Payload and metadata are the JSON text the SQLite adapter stores (``json_columns``), with
    the floats ``jsonb`` would turn into integers written positionally (``jsonb_text``).

    Raises:
        EventLimitExceededError: The payload or metadata cannot be serialised as JSON.
    """
    payload, metadata = storable_columns(event, event_store_id)
    return (
        event_store_id,
        event.aggregate_id,
        event.version,
        event.type,
        jsonb_text(payload),
        jsonb_text(metadata),
        event.timestamp,
    )


def _uuid_text(aggregate_id: str) -> str:
    """The canonical text of an id that spells a UUID (as a uuid column stores it)."""
    try:
        return str(uuid.UUID(aggregate_id))
    except ValueError:
        return aggregate_id


def _same_uuid(aggregate_id: str) -> str:
    """One text for every spelling of a UUID (case, braces, hyphens); other ids as they are."""
    return _uuid_text(aggregate_id).casefold()


class Target(Protocol):
    """What a group needs of each member's adapter (the adapter's private parts)."""

    _sql: Statements

    async def _is_event_key(self, conn: AsyncConnection, exc: Any) -> bool:
        """Whether a unique violation is on the adapter's event key."""
        ...


class Member(NamedTuple):
    """One grouped event, ready to be written."""

    target: Target
    event_store_id: str
    event: Event


class GroupPlan:
    """The members of a group and their rows, per table, in first-seen order.

    Attributes:
        force: Whether stored versions are overwritten.
        fold_uuids: The tables (``Statements.table``) whose ``aggregate_id`` column is
            ``uuid`` (or a domain over it): there, ids that spell one UUID in different
            ways (upper case, braces) make one key. Only looked up after PostgreSQL said so
            (``uuid_tables``); on a text table such ids stay distinct aggregates.
        members: Every grouped event, in group order.
        repeat: Index of the first member that repeats an earlier member's key (without
            force), if any.
        tables: Per table, its statements and its rows by event key.
        rows: Rows to write (members minus repeated keys).
    """

    __slots__ = ("fold_uuids", "force", "members", "now", "repeat", "rows", "tables")

    def __init__(self, force: bool, *, fold_uuids: frozenset[str] = frozenset()) -> None:
        self.force = force
        self.fold_uuids = fold_uuids
        self.now = utc_now()  # of every member without a timestamp
        self.members: list[Member] = []
        self.repeat: int | None = None
        self.tables: dict[str, tuple[Statements, dict[tuple[str, str, int], tuple[Any, ...]]]] = {}
        self.rows = 0

    def add(self, target: Target, event_store_id: str, event: Event) -> None:
        """Add a member.

        A member repeating an earlier member's key (without force) is recorded in
        ``repeat`` rather than raised, so that the first conflict in group order is named.

        Raises:
            EventLimitExceededError: A value cannot be stored.
        """
        check_store_id(event_store_id)
        event = stamped(event, self.now)
        aggregate_id = event.aggregate_id
        statements = target._sql
        key = (
            event_store_id,
            _uuid_text(aggregate_id) if statements.table in self.fold_uuids else aggregate_id,
            event.version,
        )
        entry = self.tables.get(statements.table)
        if entry is None:
            entry = self.tables[statements.table] = (statements, {})
        rows = entry[1]
        if key in rows and not self.force:
            # Not raised yet: an earlier member may conflict with a stored event, and the
            # first conflict in group order is the one to report (see ``first_conflict``).
            if self.repeat is None:
                self.repeat = len(self.members)
        else:
            if key not in rows:
                self.rows += 1
            rows[key] = event_row(event, event_store_id)  # with force, the last one wins
        self.members.append(Member(target, event_store_id, event))

    async def uuid_tables(self, conn: AsyncConnection) -> frozenset[str]:
        """The group's tables whose ``aggregate_id`` is a ``uuid`` (for ``fold_uuids``)."""
        ddl = {statements.table_ddl: table for table, (statements, _) in self.tables.items()}
        return frozenset(ddl[name] for name in await uuid_tables(conn, ddl))

    @property
    def recast(self) -> bool:
        """Whether a member's id may be held in another spelling (``recast``)."""
        return any(recast(member.event.aggregate_id) for member in self.members)

    def id_members(self) -> list[tuple[Statements, str, str]]:
        """Each member's statements, event store id and aggregate id (for ``refused_id``)."""
        return [(m.target._sql, m.event_store_id, m.event.aggregate_id) for m in self.members]

    def stored_events(self, held: Iterable[tuple[str, str, str, int]]) -> list[Event]:
        """The members' events with their ids as the rows hold them.

        ``held`` are the rows written, as ``(table, store, aggregate id, version)``. A
        member's id stands if its row holds it as given (a text table); otherwise the row
        of its canonical spelling (a uuid table) gives the id.
        """
        rows = set(held)
        events = []
        for member in self.members:
            event = member.event
            aggregate_id = event.aggregate_id
            if recast(aggregate_id):
                table = member.target._sql.table
                key = (table, member.event_store_id, aggregate_id, event.version)
                canonical = _uuid_text(aggregate_id)
                if key not in rows and (*key[:2], canonical, key[3]) in rows:
                    event = event.model_copy(update={"aggregate_id": canonical})
            events.append(event)
        return events

    async def first_conflict(self, conn: AsyncConnection) -> tuple[str, str, int]:
        """The first member in group order that conflicts, when the group repeats a key.

        Members before the repeated one are looked up: one that is already stored comes
        first; otherwise the repeated member itself is the conflict.
        """
        assert self.repeat is not None
        stored = await self._first_stored(conn, list(enumerate(self.members[: self.repeat])))
        found = self.members[self.repeat if stored is None else stored]
        return found.event_store_id, found.event.aggregate_id, found.event.version

    async def _first_stored(
        self, conn: AsyncConnection, candidates: list[tuple[int, Member]]
    ) -> int | None:
        """The smallest index among ``candidates`` whose event key is stored now.

        Raises:
            psycopg.DataError: A member's value cannot be sent in the client encoding.
            psycopg.NotSupportedError: A table or schema name cannot be sent in it.
        """
        for start in range(0, len(candidates), _LOOKUP_BATCH):
            batch = candidates[start : start + _LOOKUP_BATCH]
            query = " UNION ALL ".join(member.target._sql.exists() for _, member in batch)
            params = [
                value
                for index, member in batch
                for value in (
                    index,
                    member.event_store_id,
                    member.event.aggregate_id,
                    member.event.version,
                )
            ]
            with direct.encoding_errors(conn, params):
                cursor = await tuple_cursor(conn).execute(query, params)
            stored = sorted(row[0] for row in await cursor.fetchall())
            if stored:
                return int(stored[0])
        return None

    def statements(
        self, cache: dict[tuple[Any, ...], str], *, returning: bool = False
    ) -> list[tuple[str, list[Any], list[str]]]:
        """The statements writing the group: one, unless it holds too many values for one.

        Each comes with the tables it writes, in order: with ``returning``, its rows name
        their table by its index there (``Statements.write_group``). ``cache`` keeps single
        statements by shape (tables and sizes) between calls.
        """
        tables = self.tables
        if self.rows <= ROWS_PER_STATEMENT:
            shape = (
                self.force,
                returning,
                *[(table, len(rows)) for table, (_, rows) in tables.items()],
            )
            query = cache.get(shape)
            if query is None:
                query = Statements.write_group(
                    [(statements, len(rows)) for statements, rows in tables.values()],
                    force=self.force,
                    returning=returning,
                )
                if len(cache) < _GROUP_SQL_CACHE:
                    cache[shape] = query
            values = [v for _, rows in tables.values() for row in rows.values() for v in row]
            return [(query, values, list(tables))]
        batches = []
        for table, (statements, rows) in tables.items():
            listed = list(rows.values())
            for start in range(0, len(listed), ROWS_PER_STATEMENT):
                chunk = listed[start : start + ROWS_PER_STATEMENT]
                query = Statements.write_group(
                    [(statements, len(chunk))], force=self.force, returning=returning
                )
                batches.append((query, [value for row in chunk for value in row], [table]))
        return batches

    async def culprit(self, conn: AsyncConnection, exc: Any) -> tuple[str, str, int] | None:
        """Which member a unique violation was about (the error does not say).

        The failed write rolled back, so a key that is stored now is one that conflicted;
        the first in group order is reported. If none is stored, two members were the same
        event spelled differently (e.g. a UUID in upper and lower case). ``None`` when the
        violation is not on any member's event key.
        """
        candidates: list[tuple[int, Member]] = []
        checked: dict[int, bool] = {}
        for index, member in enumerate(self.members):
            target_id = id(member.target)
            if target_id not in checked:
                checked[target_id] = await member.target._is_event_key(conn, exc)
            if checked[target_id]:
                candidates.append((index, member))
        if not candidates:
            return None
        stored = await self._first_stored(conn, candidates)
        if stored is not None:
            found = self.members[stored]
            return found.event_store_id, found.event.aggregate_id, found.event.version
        seen: set[tuple[int, str, str, int]] = set()
        for _, member in candidates:
            event = member.event
            key = (
                id(member.target),
                member.event_store_id,
                _same_uuid(event.aggregate_id),  # a uuid table reads any spelling of one
                event.version,
            )
            if key in seen:
                return member.event_store_id, event.aggregate_id, event.version
            seen.add(key)
        first = candidates[0][1]
        return first.event_store_id, first.event.aggregate_id, first.event.version
