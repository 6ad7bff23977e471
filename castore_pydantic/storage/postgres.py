"""``PostgresEventStorageAdapter``: events in a PostgreSQL table shared with Castore.

The table has the layout of ``@castore/event-storage-adapter-postgres``, so a TypeScript
Castore service and a Python service can share it. A write is ONE statement in one round trip
(PostgreSQL runs a single statement as its own transaction), or, for a group of more than
5,000 events, several statements in one transaction; either way a push or a group is stored
completely or not at all, whatever happens to the calling task or the connection.
Needs the ``postgres`` extra: ``pip install 'castore-pydantic[postgres]'``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ClassVar, Self, cast

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg_pool import AsyncConnectionPool
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "castore_pydantic.storage.postgres needs psycopg 3 and psycopg-pool: "
        "pip install 'castore-pydantic[postgres]'"
    ) from exc

from castore_pydantic._event import MAX_VERSION, Event, stamped
from castore_pydantic._paging import ListingOptions, check_read_options
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic._types import AggregateIdEntry, GroupedEvent, ListAggregateIdsResult
from castore_pydantic.errors import (
    CastoreError,
    EventAlreadyExistsError,
    EventGroupError,
    InvalidPageTokenError,
    StorageError,
)
from castore_pydantic.storage import _postgres_direct as direct
from castore_pydantic.storage._postgres_connect import Attempts, Failure
from castore_pydantic.storage._postgres_connection import (
    AsyncConnection,
    Connections,
    Settings,
    tables_changed,
    tuple_cursor,
)
from castore_pydantic.storage._postgres_sql import AggregateIdType, Statements, check_identifier
from castore_pydantic.storage._postgres_writes import (
    GroupPlan,
    check_store_id,
    event_row,
    recast,
    refused_id,
    storable,
)

__all__ = ["AggregateIdType", "PostgresEventStorageAdapter"]

_LAYOUT = ("aggregate_name", "aggregate_id", "version", "type", "data", "metadata", "timestamp")
_FIRST_EVENTS = 1000  # events read by the first statement; longer aggregates are streamed
_STREAM_CHUNK = 1000  # events per streamed chunk
#: Aggregates remembered as long (per adapter), read straight in a snapshot.
_KNOWN_LONG = 1024
# libpq 17 can hand rows over in batches (``direct.stream``); older ones get the
# server-built chunks of ``Statements.events_after`` instead. Asked of psycopg, which also
# knows the libpq its C extension was built against (a build older than 17 cannot).
_CHUNKED_ROWS = psycopg.capabilities.has_stream_chunked()
#: Starts the one snapshot a long read's statements share.
_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"
_IN_TRANSACTION = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR)


def _long_params(
    event_store_id: str, aggregate_id: str, min_version: int | None, max_version: int | None
) -> list[Any]:
    """The parameters of a long read (``Statements.events_after``).

    Chunk size, store, aggregate, the version before the first one wanted, and the last one
    wanted if the read is bounded.
    """
    after = -1 if min_version is None else min_version - 1
    rest = [_STREAM_CHUNK, event_store_id, aggregate_id, after]
    if max_version is not None:
        rest.append(max_version)
    return rest


def _text(conn: AsyncConnection, value: bytes | None) -> str:
    """A text value of a result row (never NULL where it is read)."""
    assert value is not None
    text = direct.decoded(conn, value)
    return text.decode() if isinstance(text, bytes) else text


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None)


def _encoded(conn: AsyncConnection, statement: str) -> bytes:
    """A statement without parameters in the connection's client encoding.

    Raises:
        psycopg.NotSupportedError: A name in it cannot be written in that encoding.
    """
    encoding = conn.info.encoding
    try:
        return statement.encode(encoding)
    except UnicodeEncodeError as exc:
        raise direct.unencodable_name(exc, encoding) from exc


class PostgresEventStorageAdapter:
    """Stores events in a PostgreSQL table, through a psycopg 3 connection pool.

    Construct it from a connection string (it then owns a pool, opened by ``async with`` or on
    first use, after one connection succeeded, and closed by ``aclose()`` / ``async with``) or
    from an ``AsyncConnectionPool`` you manage. Several adapters may share one table: event
    stores are kept apart by their id.

    Args:
        connection_string: A libpq connection string or URI; ``None`` uses the ``PG*``
            environment variables. The password never appears in ``repr()`` or errors.
        pool: An ``psycopg_pool.AsyncConnectionPool`` to use instead (neither opened nor
            closed by the adapter). Its connections are switched to autocommit while the
            adapter uses them, and back before they return to it, also when a call is
            cancelled. Their ``row_factory`` and ``cursor_factory`` may be any.
        table_name: The events table (any name of at most 63 bytes; it is quoted).
        schema: The table's schema; ``None`` follows the connections' ``search_path``.
        min_size: Connections the owned pool keeps open.
        max_size: Connections the owned pool may open.
        timeout: Seconds to wait for a free connection before ``StorageUnavailableError``
            (also how long ``async with`` tries to reach the server; a ``connect_timeout``
            bounds each attempt within it).
        connect_kwargs: Extra connection parameters (``application_name``,
            ``connect_timeout``, ``prepare_threshold=None`` behind PgBouncer, ...).

    Raises:
        ValueError: Both or a malformed connection string (also a URI whose user or
            password holds an ``@`` or ``/`` that is not URL-encoded, or whose database
            name holds an ``@`` that libpq could read as such, as given or as a borrowed
            pool's conninfo), or a table or schema name that PostgreSQL cannot hold.
        TypeError: ``pool`` is not an ``AsyncConnectionPool``.
    """

    #: ``EventStore`` hands groups to this adapter as they are: ``group_event`` only wraps,
    #: and ``push_event_group`` gives the events without a timestamp one timestamp.
    _stamps_groups: ClassVar[bool] = True

    def __init__(
        self,
        connection_string: str | None = None,
        *,
        pool: AsyncConnectionPool[AsyncConnection] | None = None,
        table_name: str = "event",
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 30.0,
        connect_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self._table = check_identifier(table_name, "table_name")
        self._schema = None if schema is None else check_identifier(schema, "schema")
        self._sql = Statements(self._schema, self._table)
        # Unique indexes found to be the event key, by schema, table and name.
        self._keys: set[tuple[str, str, str]] = set()
        self._group_sql: dict[tuple[Any, ...], str] = {}
        # Aggregates a read found long, most recently read last, with the last version seen:
        # a later read whose bounds hold 1,000 of those versions skips the first statement,
        # which would read its first events only to read them again (``_likely_long``).
        self._long: dict[tuple[str, str], int] = {}
        if pool is not None:
            if connection_string is not None or connect_kwargs:
                raise ValueError("pass either a connection string or a pool, not both")
            if not isinstance(pool, AsyncConnectionPool):
                raise TypeError(f"pool must be a psycopg_pool.AsyncConnectionPool, not {pool!r}")
            settings = Settings.of_pool(pool)
            owned, attempts = False, None
        else:
            kwargs = dict(connect_kwargs or {})
            settings = Settings.parse(connection_string or "", kwargs)
            kwargs["autocommit"] = True
            if settings.chooses_encoding == "SQL_ASCII":
                raise ValueError(
                    "client_encoding SQL_ASCII hands text over as bytes, which the adapter "
                    "cannot read: leave it out (the adapter uses UTF8) or choose an encoding"
                )
            if not settings.chooses_encoding and "PGCLIENTENCODING" not in os.environ:
                # libpq's default is the database's encoding: with SQL_ASCII, text would come
                # back as bytes. The server converts from UTF-8 to any encoding it stores.
                kwargs["client_encoding"] = "UTF8"
            attempts = Attempts(settings.redact)
            pool = AsyncConnectionPool(
                connection_string or "",
                connection_class=attempts.connection_class(),
                kwargs=kwargs,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout,
                open=False,
                name=f"castore-{self._table}"[:60],
            )
            owned = True
        self._settings = settings
        self._conns = Connections(
            pool, owned=owned, settings=settings, name=repr(self), attempts=attempts
        )

    def __repr__(self) -> str:
        return (
            f"PostgresEventStorageAdapter({self._settings.describe!r}, "
            f"table_name={self._table!r}, schema={self._schema!r})"
        )

    @property
    def table_name(self) -> str:
        """The events table."""
        return self._table

    @property
    def schema(self) -> str | None:
        """The table's schema (``None``: the connections' ``search_path`` decides)."""
        return self._schema

    @property
    def pool(self) -> AsyncConnectionPool[AsyncConnection]:
        """The connection pool the adapter uses."""
        return self._conns.pool

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Connect once, then open the owned pool (a borrowed pool is used as it is).

        Raises:
            StorageError: The adapter is closed, or PostgreSQL refuses the connection in a
                way retrying cannot fix (no such database or role, a wrong password).
            StorageUnavailableError: No connection within ``timeout``; nothing stays open.
        """
        await self._conns.open(f"opening the adapter of {self._sql.table_ddl}")
        return self

    async def _open_once(self, seconds: float | None) -> Failure | None:
        """Connect once, and open the owned pool if that worked (for the command line).

        ``async with`` then connects no more. ``seconds`` bounds the attempt (``None``: the
        ``connect_timeout`` does); see ``Connections.open_once``.

        Returns:
            ``None``, or why the attempt failed (nothing is open then).
        """
        return await self._conns.open_once(seconds)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for the operations in progress, then close the owned pool; idempotent.

        New operations raise ``StorageError`` from the moment it is called; those already
        started (waiting for a connection too) finish first. A pool passed in is left open.
        Cancelled while it waits, the adapter stays closed to new operations and its pool
        is closed when the last one ends.
        """
        await self._conns.close()

    def _where(self, doing: str) -> str:
        return f"{doing} in {self._sql.table_ddl}"

    async def _is_event_key(self, conn: AsyncConnection, exc: pg_errors.UniqueViolation) -> bool:
        """Whether a unique violation is on this table's ``(store, aggregate, version)`` key.

        PostgreSQL names the table and index where the row went: for a partitioned table
        (or one whose rows a trigger sends to inheritance children), a partition and its
        own index.
        """
        diag = exc.diag
        schema, table, index = diag.schema_name, diag.table_name, diag.constraint_name
        if schema is None or table is None or index is None:
            return False
        if (
            index == self._sql.unique_name
            and table == self._table
            and (self._schema is None or schema == self._schema)
        ):
            return True
        if (schema, table, index) in self._keys:
            return True
        # A table or partition created by someone else: look its unique index up once.
        params = {"schema": schema, "table": table, "index": index, "events": self._sql.table_ddl}
        cursor = await tuple_cursor(conn).execute(Statements.is_event_key(), params)
        row = await cursor.fetchone()
        if row is not None and row[0]:
            self._keys.add((schema, table, index))
            return True
        return False

    # -- schema ----------------------------------------------------------------------------

    async def create_event_table(self, *, aggregate_id_type: AggregateIdType = "text") -> None:
        """Create the schema (if named), the table and its index unless they exist.

        They are looked up in the catalog first, and only what is missing is created: on a
        table that has everything, the call takes no lock (it never waits behind, or holds
        up, other sessions' writes) and needs no privilege beyond ``USAGE`` on the schema.
        Safe to call concurrently and on a table created by Castore (it then only adds the
        listing index).

        Args:
            aggregate_id_type: ``"text"`` (any string id) or ``"uuid"`` (Castore's default;
                ids must then be UUIDs).

        Raises:
            ValueError: Another ``aggregate_id_type``.
            StorageError: The table exists without the expected columns, or PostgreSQL
                refused the DDL.
            StorageUnavailableError: PostgreSQL cannot be reached.
        """
        if aggregate_id_type not in ("text", "uuid"):
            raise ValueError(
                f"aggregate_id_type must be 'text' or 'uuid', not {aggregate_id_type!r}"
            )
        where = self._where("creating the event table")
        conn = await self._conns.acquire(where)
        try:
            async with tuple_cursor(conn) as cursor:
                schema, table, missing, index = await self._existing(cursor)
                if not (schema and table and (missing or index)):
                    missing = await self._create_missing(conn, cursor, aggregate_id_type)
        except psycopg.Error as exc:
            raise self._conns.error(exc, where) from self._settings.cause(exc)
        finally:
            tables_changed()
            await self._conns.release(conn)
        if missing:
            raise StorageError(
                f"{self._sql.table_ddl} exists but lacks the columns {', '.join(missing)}"
            )

    async def _existing(
        self, cursor: psycopg.AsyncCursor[tuple[Any, ...]]
    ) -> tuple[bool, bool, list[str], bool]:
        """What exists: ``(schema, table, missing columns, listing index)``.

        See ``Statements.existing``; the missing columns are the layout's that the table
        lacks (none when there is no table).
        """
        params = {
            "schema": self._schema,
            "table": self._sql.table_ddl,
            "index": self._sql.listing_index,
        }
        with direct.encoding_errors(cursor.connection):  # its parameters are names, not values
            await cursor.execute(self._sql.existing(), params)
        row = await cursor.fetchone()
        assert row is not None
        schema, table, columns, index = row
        missing = [column for column in _LAYOUT if column not in columns] if table else []
        return schema, table, missing, index

    async def _create_missing(
        self,
        conn: AsyncConnection,
        cursor: psycopg.AsyncCursor[tuple[Any, ...]],
        aggregate_id_type: AggregateIdType,
    ) -> list[str]:
        """Create what is missing of the schema, the table and its index, in a transaction.

        Concurrent calls for the table (CREATE ... IF NOT EXISTS can still collide in the
        catalog) are serialised with an advisory lock, after which what exists is looked up
        again, in a snapshot taken then: the transaction is ``READ COMMITTED`` whatever the
        connection's default (``REPEATABLE READ`` would keep the snapshot of the statement
        that waited for the lock, and not see the columns of a table made meanwhile). The
        schema may be made meanwhile by a call for another of its tables, or by
        anyone: its creation has a savepoint of its own, and a collision there means that
        it exists. Returns the layout's columns the table lacks (its index is then not made).
        """
        digest = hashlib.sha256(f"castore_pydantic:{self._sql.table_ddl}".encode()).digest()
        lock = int.from_bytes(digest[:8], "big", signed=True)
        async with conn.transaction():
            await cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
            schema, table, missing, index = await self._existing(cursor)
            if not schema:
                try:
                    async with conn.transaction():
                        await cursor.execute(_encoded(conn, self._sql.create_schema()))
                except pg_errors.UniqueViolation:
                    pass  # made and committed by another session since it was looked up
            if not table:
                await cursor.execute(_encoded(conn, self._sql.create_table(aggregate_id_type)))
                # Made here, or by someone else meanwhile.
                _, _, missing, index = await self._existing(cursor)
            if not (missing or index):
                await cursor.execute(_encoded(conn, self._sql.create_index()))
        return missing

    async def drop_event_table(self) -> None:
        """Drop the table if it exists (the schema stays).

        Raises:
            StorageError: PostgreSQL refused.
            StorageUnavailableError: PostgreSQL cannot be reached.
        """
        where = self._where("dropping the event table")
        conn = await self._conns.acquire(where)
        try:
            await tuple_cursor(conn).execute(_encoded(conn, self._sql.drop()))
        except psycopg.Error as exc:
            raise self._conns.error(exc, where) from self._settings.cause(exc)
        finally:
            tables_changed()
            await self._conns.release(conn)

    # -- writing ---------------------------------------------------------------------------

    async def push_event(
        self, event: Event, context: EventStoreContext, *, force: bool = False
    ) -> Event:
        """Store one event with a single INSERT (see ``EventStorageAdapter.push_event``).

        The event returned has the id as the table holds it: on a ``uuid`` table, a UUID
        spelt in upper case, in braces or without hyphens comes back lower-case canonical
        (the row's id is then returned by the INSERT itself: no further round trip). When
        no row comes back (a trigger skipped it), the id is returned as given.

        Raises:
            EventAlreadyExistsError: The version is taken (and ``force`` is false).
            EventLimitExceededError: A value does not fit the table (e.g. a non-UUID id on a
                ``uuid`` table); nothing is written.
            StorageUnavailableError: The connection failed (the message says when the
                outcome is unknown).
            StorageError: Any other database error.
        """
        event_store_id = context.event_store_id
        check_store_id(event_store_id)
        event = stamped(event)
        params = event_row(event, event_store_id)
        returning = recast(event.aggregate_id)
        if returning:
            query = self._sql.write(force=force, returning=True)
        else:
            query = self._sql.upsert if force else self._sql.insert
        where = self._where("pushing an event")
        held = event.aggregate_id
        conn = await self._conns.acquire(where)
        try:
            result = await direct.execute(conn, query, params)
            if returning and result.ntuples:  # none when a trigger skipped the row
                held = _text(conn, result.get_value(0, 0))
        except pg_errors.UniqueViolation as exc:
            try:
                conflict = await self._is_event_key(conn, exc)
            except psycopg.Error as lookup:  # the write failed; finding out why did too
                error = self._conns.error(lookup, where, event_store_id=event_store_id)
                raise error from self._settings.cause(lookup)
            if conflict:
                raise EventAlreadyExistsError(
                    event_store_id, event.aggregate_id, event.version
                ) from exc
            error = self._conns.error(exc, where, event_store_id=event_store_id)
            raise error from self._settings.cause(exc)
        except psycopg.Error as exc:
            members = [(self._sql, event_store_id, event.aggregate_id)]
            error = await self._write_error(conn, exc, where, members)
            raise error from self._settings.cause(exc)
        finally:
            await self._conns.release(conn)
        if held != event.aggregate_id:
            return event.model_copy(update={"aggregate_id": held})
        return event

    async def _write_error(
        self,
        conn: AsyncConnection,
        exc: psycopg.Error,
        where: str,
        members: Sequence[tuple[Statements, str, str]],
        *,
        sent: bool = True,
    ) -> CastoreError:
        """The library's error for a write of ``members`` that PostgreSQL refused.

        ``members`` are ``(statements, event store id, aggregate id)`` in push order; the
        first one's store is named when no event can be told. ``sent``: the write was sent
        (not only a lookup before it), so a lost connection leaves its outcome unknown.

        For an id that is no UUID on a uuid table, PostgreSQL's own error says only that
        some text is no valid input for ``uuid`` (in the server's language): the ids and
        the tables' column types, looked up then, tell which event it was.
        """
        if isinstance(exc, pg_errors.InvalidTextRepresentation) and not conn.broken:
            try:
                refused = await refused_id(conn, members)
            except psycopg.Error:
                refused = None  # the write failed; finding out why did too: say what is known
            if refused is not None:
                return refused
        return self._conns.error(
            exc, where, event_store_id=members[0][1], lost_write=sent and conn.broken
        )

    def group_event(self, event: Event, context: EventStoreContext) -> GroupedEvent:
        """Wrap an event for a group pushed by PostgreSQL adapters."""
        return GroupedEvent(event=event, event_storage_adapter=self, context=context)

    def _unlike(self, other: PostgresEventStorageAdapter) -> str | None:
        """Why this adapter's connection cannot write ``other``'s events, if it cannot.

        A group runs on one connection: ``other``'s table must be on its database, and a
        table named without a schema must resolve there as on ``other``'s own connections.
        """
        if other.pool is self.pool:
            return None
        mine, theirs = self._settings, other._settings
        if mine.database is None or theirs.database is None:
            return (
                "uses another pool whose conninfo is computed, so its database cannot be"
                " told: a group is one transaction on one database"
            )
        if mine.database != theirs.database:
            return (
                f"is stored in another database ({theirs.describe or 'libpq defaults'}, not "
                f"{mine.describe or 'libpq defaults'}): a group is one transaction"
            )
        if other._schema is None and not (
            mine.session == theirs.session and self._conns.owned and other._conns.owned
        ):
            # Its table name would resolve through this connection's search_path, which
            # another user, other options or a borrowed pool's own setup may change.
            return (
                "names its table without a schema, and its connections (another user,"
                " other options or a borrowed pool) may find another table under that"
                " name: give the adapters a schema to group their events"
            )
        return None

    async def push_event_group(
        self, grouped_events: Sequence[GroupedEvent], *, force: bool = False
    ) -> list[Event]:
        """Store the group with ONE statement on one connection: all events or none.

        Each event goes to its own grouped event's adapter's table; those adapters must all
        be PostgreSQL adapters on this adapter's database. Groups of more than 5,000 events
        (one statement holds at most 65,535 values) are written by several statements in
        one transaction.

        Raises:
            EventGroupError: The group is empty, lacks a context, or mixes other adapters or
                databases; nothing is written.
            EventAlreadyExistsError: A version is taken (names the first such event);
                nothing is written.
            EventLimitExceededError: A value does not fit a table; nothing is written.
            StorageUnavailableError: The connection failed (the message says when the
                outcome is unknown).
        """
        plan = self._plan_group(grouped_events, force=force)
        where = self._where("pushing an event group")
        if plan.repeat is not None:
            await self._refuse_repeated_key(plan, where)
        # One connection for the whole call, its retry with folded UUIDs included: ``aclose``
        # lets an operation in progress finish, and counts them by connection.
        conn = await self._conns.acquire(where)
        try:
            while True:
                try:
                    held = await self._write_group(conn, plan)
                except pg_errors.CardinalityViolation as exc:
                    plan = await self._fold_uuids(conn, plan, grouped_events, exc, where)
                    continue
                if held is None:
                    return [member.event for member in plan.members]
                return plan.stored_events(held)
        finally:
            await self._conns.release(conn)

    async def _write_group(
        self, conn: AsyncConnection, plan: GroupPlan
    ) -> list[tuple[str, str, str, int]] | None:
        """Write a planned group, raising the library's errors (see ``push_event_group``).

        When a member's id may be held in another spelling (``GroupPlan.recast``), returns
        the rows written, as ``(table, store, aggregate id, version)``: the statements
        return them, so that no further round trip is needed. ``None`` otherwise.

        Raises:
            psycopg.errors.CardinalityViolation: A forced group holds one UUID in two
                spellings (``_fold_uuids``).
        """
        where = self._where("pushing an event group")
        returning = plan.recast
        batches = plan.statements(self._group_sql, returning=returning)
        held: list[tuple[str, str, str, int]] = []
        try:
            if len(batches) == 1:
                query, params, tables = batches[0]
                result = await direct.execute(conn, query, params)
                if returning:
                    for row in range(result.ntuples):
                        index, store, aggregate_id, version = (
                            _text(conn, result.get_value(row, column)) for column in range(4)
                        )
                        held.append((tables[int(index)], store, aggregate_id, int(version)))
            else:
                # A cursor of its own: a cached one would keep the huge statement's parsed
                # text and values alive until its next use.
                async with tuple_cursor(conn) as cursor, conn.transaction():
                    for query, params, tables in batches:
                        with direct.encoding_errors(conn, params):
                            await cursor.execute(query, params)
                        if returning:
                            held.extend(
                                (tables[int(index)], store, aggregate_id, int(version))
                                for index, store, aggregate_id, version in await cursor.fetchall()
                            )
        except pg_errors.UniqueViolation as exc:
            try:
                culprit = await plan.culprit(conn, exc)
            except psycopg.Error as lookup:  # the write failed; finding out why did too
                raise self._conns.error(lookup, where) from self._settings.cause(lookup)
            if culprit is not None:
                raise EventAlreadyExistsError(*culprit) from exc
            raise self._conns.error(exc, where) from self._settings.cause(exc)
        except pg_errors.CardinalityViolation:
            raise
        except psycopg.Error as exc:
            error = await self._write_error(conn, exc, where, plan.id_members())
            raise error from self._settings.cause(exc)
        return held if returning else None

    async def _fold_uuids(
        self,
        conn: AsyncConnection,
        plan: GroupPlan,
        grouped_events: Sequence[GroupedEvent],
        exc: pg_errors.CardinalityViolation,
        where: str,
    ) -> GroupPlan:
        """The plan of a forced group again, one key per UUID on its uuid tables.

        With force, two members named one aggregate of a uuid table in two spellings (upper
        and lower case): one statement may not update a row twice. Nothing was written; as
        for any key repeated with force, the later member wins. Only on uuid tables: on a
        text table, two spellings are two aggregates.

        Raises:
            StorageError: Not that case (no force, already folded, or no uuid table).
        """
        if not plan.force or plan.fold_uuids:
            raise self._conns.error(exc, where) from self._settings.cause(exc)
        try:
            uuid_tables = await plan.uuid_tables(conn)
        except psycopg.Error as lookup:  # the write failed; finding out why did too
            raise self._conns.error(lookup, where) from self._settings.cause(lookup)
        if not uuid_tables:
            raise self._conns.error(exc, where) from self._settings.cause(exc)
        return self._plan_group(grouped_events, force=True, fold_uuids=uuid_tables)

    def _plan_group(
        self,
        grouped_events: Sequence[GroupedEvent],
        *,
        force: bool,
        fold_uuids: frozenset[str] = frozenset(),
    ) -> GroupPlan:
        """Check every grouped event and gather their rows, before anything is written.

        On the tables in ``fold_uuids``, ids that spell one UUID count as one key
        (``GroupPlan``).
        """
        if not grouped_events:
            raise EventGroupError("An event group needs at least one grouped event")
        plan = GroupPlan(force, fold_uuids=fold_uuids)
        for index, grouped in enumerate(grouped_events):
            adapter = grouped.event_storage_adapter
            if not isinstance(adapter, PostgresEventStorageAdapter):
                raise EventGroupError(
                    f"Event group event #{index} is not connected to a PostgresEventStorageAdapter"
                )
            if grouped.context is None:
                raise EventGroupError(f"Event group event #{index} misses context")
            unlike = None if adapter is self else self._unlike(adapter)
            if unlike is not None:
                raise EventGroupError(f"Event group event #{index} {unlike}")
            plan.add(adapter, grouped.context.event_store_id, grouped.event)
        return plan

    async def _refuse_repeated_key(self, plan: GroupPlan, where: str) -> None:
        """Raise the conflict of a group that repeats a key, naming its first conflict."""
        conn = await self._conns.acquire(where)
        try:
            culprit = await plan.first_conflict(conn)
        except psycopg.Error as exc:
            # A value the table refuses (an id that is no UUID, on a uuid table) is the
            # event's, as when the group is written.
            error = await self._write_error(conn, exc, where, plan.id_members(), sent=False)
            raise error from self._settings.cause(exc)
        finally:
            await self._conns.release(conn)
        raise EventAlreadyExistsError(*culprit)

    # -- reading ---------------------------------------------------------------------------

    async def get_events(
        self,
        aggregate_id: str,
        context: EventStoreContext,
        *,
        min_version: int | None = None,
        max_version: int | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[Event]:
        """Return events ordered by version, bounds inclusive (``limit=0`` gives none).

        PostgreSQL builds the JSON array of the rows, which is validated in one pass. A read
        without ``limit`` that finds more than its first statement holds is read again (from
        its first version) in one snapshot, in chunks, each validated while the server builds
        the next one; an aggregate a read found long is read in the snapshot at once the next
        time its bounds hold 1,000 of the versions seen.

        Raises:
            StoredEventValidationError: A stored event does not validate.
            StorageUnavailableError: The connection failed.
            TypeError, ValueError: A bound or the limit is not ``None`` or an int >= 0.
        """
        check_read_options(min_version, max_version, limit)
        event_store_id = context.event_store_id
        if limit == 0 or not (storable(aggregate_id) and storable(event_store_id)):
            return []  # no such aggregate can be stored
        streamed = limit is None and not reverse  # may be long, see ``_read_statement``
        key = (event_store_id, aggregate_id)
        known_long = streamed and self._likely_long(key, min_version, max_version)
        where = self._where("reading events")
        conn = await self._conns.acquire(where)
        events: list[Event] | None = None
        try:
            long = known_long
            if not known_long:
                query, params = self._read_statement(
                    event_store_id,
                    aggregate_id,
                    min_version,
                    max_version,
                    limit=limit,
                    reverse=reverse,
                )
                try:
                    result = await direct.execute(conn, query, params)
                except pg_errors.ProgramLimitExceeded:
                    # Their JSON array is longer than PostgreSQL's 1 GB for one value (a
                    # thousand events of a megabyte): a forward read streams them row by row.
                    if not (streamed and _CHUNKED_ROWS):
                        raise
                    long = True
                else:
                    value = result.get_value(0, 0) if result.ntuples else None
                    if value is None:
                        return []
                    text = direct.decoded(conn, value)
                    # At the limit: long, read it all again, streamed, in one snapshot.
                    long = streamed and int(result.get_value(0, 1) or 0) >= _FIRST_EVENTS
            if long:
                rest = _long_params(event_store_id, aggregate_id, min_version, max_version)
                events = await self._read_long(conn, context, rest)
                self._remember_long(key, events, whole=min_version is None and max_version is None)
        except pg_errors.InvalidTextRepresentation:
            return []  # not a UUID, on a uuid table: no such aggregate
        except psycopg.Error as exc:
            raise self._conns.error(exc, where) from self._settings.cause(exc)
        finally:
            await self._conns.release(conn)
        return context.parse_events_json(text) if events is None else events

    def _read_statement(
        self,
        event_store_id: str,
        aggregate_id: str,
        min_version: int | None,
        max_version: int | None,
        *,
        limit: int | None,
        reverse: bool,
    ) -> tuple[str, list[Any]]:
        """The first statement of a read and its parameters.

        A read of everything in order (a fold) reads its first events and their count, and
        streams them all if there are more (``_read_long``); others are one statement.
        """
        params: list[Any] = [event_store_id, aggregate_id]
        if min_version is not None:
            params.append(min_version)
        if max_version is not None:
            params.append(max_version)
        bounds = {"min_version": min_version is not None, "max_version": max_version is not None}
        if limit is None and not reverse:
            params.append(_FIRST_EVENTS)
            query = self._sql.first_events(**bounds)
        else:
            params.append(None if limit is None else min(limit, MAX_VERSION))
            query = self._sql.get_events(**bounds, reverse=reverse)
        return query, params

    def _likely_long(
        self, key: tuple[str, str], min_version: int | None, max_version: int | None
    ) -> bool:
        """Whether a read of ``key`` within these bounds is long, as far as reads have seen.

        Versions are counted between the bounds and the last version seen: an aggregate's
        versions start at 1 and have no gaps when written through an event store.
        """
        last = self._long.get(key)
        if last is None:
            return False
        end = last if max_version is None else min(last, max_version)
        start = 1 if min_version is None else max(min_version, 1)
        return end - start + 1 >= _FIRST_EVENTS

    def _remember_long(self, key: tuple[str, str], events: list[Event], *, whole: bool) -> None:
        """Remember what a long read saw of an aggregate, as its most recent.

        Past ``_KNOWN_LONG`` aggregates, the least recently read is forgotten. A read that
        came back short was judged long on an outdated memory (the table was made again,
        say): the aggregate is forgotten. A bounded read only saw up to its bound, so the
        memory never goes down for it.
        """
        known = self._long
        seen = known.pop(key, 0)
        if len(events) < _FIRST_EVENTS:
            return
        last = events[-1].version
        known[key] = last if whole else max(last, seen)
        if len(known) > _KNOWN_LONG:
            del known[next(iter(known))]

    async def _read_long(
        self, conn: AsyncConnection, context: EventStoreContext, rest: list[Any]
    ) -> list[Event]:
        """Stream a long aggregate's events in one ``REPEATABLE READ`` snapshot.

        ``rest`` holds the parameters of ``Statements.events_after`` (``_long_params``).

        Unless an earlier full read found the aggregate long, its first events were read by
        a statement of their own, before the read was known to be long; they are read again
        inside the snapshot, so that a write committed in between (a ``force`` rewrite) is
        never seen half-way. The cost is two short round trips and the first chunk's work on
        the server.
        """
        try:
            await direct.execute(conn, _SNAPSHOT, ())
            events = await self._read_rest(conn, context, rest)
            await direct.execute(conn, "COMMIT", ())
        except BaseException:
            # Cancelled too: ended here, the pool does not have to (it warns when it does).
            if conn.pgconn.transaction_status in _IN_TRANSACTION:
                with contextlib.suppress(psycopg.Error):
                    await direct.execute(conn, "ROLLBACK", ())
            raise
        return events

    async def _read_rest(
        self, conn: AsyncConnection, context: EventStoreContext, rest: list[Any]
    ) -> list[Event]:
        """Stream and validate the events after a version, in chunks.

        ``rest`` holds the parameters of ``Statements.events_after``. Validating a chunk
        overlaps with PostgreSQL building the next one.
        """
        if _CHUNKED_ROWS:
            return await self._read_rows(conn, context, rest[1:])
        query = self._sql.events_after(max_version=len(rest) > 4)
        events: list[Event] = []
        async with tuple_cursor(conn) as cursor:
            stream = cast("AsyncGenerator[tuple[str], None]", cursor.stream(query, rest))
            with direct.encoding_errors(conn, rest):
                async with aclosing(stream) as chunks:
                    async for (chunk,) in chunks:
                        events += context.parse_events_json(chunk)
        return events

    async def _read_rows(
        self, conn: AsyncConnection, context: EventStoreContext, params: list[Any]
    ) -> list[Event]:
        """``_read_rest`` with one JSON object per row, received in batches (libpq 17+).

        The server sends rows as they are produced; each batch of rows is joined into one
        JSON array and validated in one call while the server produces the next batch.
        ``params`` are those of ``Statements.event_rows_after``.
        """
        events: list[Event] = []

        def take(rows: list[bytes | None]) -> None:
            if None in rows:  # never written by an adapter: fails validation as JSON null
                rows = [row or b"null" for row in rows]
            array = b"[%b]" % b",".join(cast("list[bytes]", rows))
            events.extend(context.parse_events_json(direct.decoded(conn, array)))

        query = self._sql.event_rows_after(max_version=len(params) > 3)
        await direct.stream(conn, query, params, _STREAM_CHUNK, take)
        return events

    async def list_aggregate_ids(
        self,
        context: EventStoreContext,
        *,
        limit: int | None = None,
        page_token: str | None = None,
        initial_event_after: datetime | None = None,
        initial_event_before: datetime | None = None,
        reverse: bool | None = None,
    ) -> ListAggregateIdsResult:
        """List aggregates with a version-1 event, by (initial timestamp, id), paged.

        Raises:
            InvalidPageTokenError: ``page_token`` is malformed.
            StorageUnavailableError: The connection failed.
        """
        options = ListingOptions.resolve(
            limit=limit,
            page_token=page_token,
            initial_event_after=initial_event_after,
            initial_event_before=initial_event_before,
            reverse=reverse,
        )
        event_store_id = context.event_store_id
        if options.lists_nothing or not storable(event_store_id):
            return ListAggregateIdsResult(aggregate_ids=[])
        cursor = options.cursor
        if cursor is not None and not storable(cursor.aggregate_id):
            raise InvalidPageTokenError("'lastEvaluatedKey.aggregateId' cannot be stored")
        params: list[Any] = [event_store_id]
        if options.initial_event_after is not None:
            params.append(_naive_utc(options.initial_event_after))
        if options.initial_event_before is not None:
            params.append(_naive_utc(options.initial_event_before))
        if cursor is not None:
            params += [_naive_utc(cursor.initial_event_timestamp), cursor.aggregate_id]
        if options.limit is not None:
            params.append(min(options.limit + 1, MAX_VERSION))
        query = self._sql.list_aggregate_ids(
            after=options.initial_event_after is not None,
            before=options.initial_event_before is not None,
            cursor=cursor is not None,
            reverse=options.reverse,
            limit=options.limit is not None,
        )
        where = self._where("listing aggregates")
        conn = await self._conns.acquire(where)
        try:
            rows = await self._fetch_all(conn, query, params)
        except pg_errors.InvalidTextRepresentation as exc:
            raise InvalidPageTokenError(
                "'lastEvaluatedKey.aggregateId' does not fit this table's aggregate ids"
            ) from exc
        except psycopg.Error as exc:
            raise self._conns.error(exc, where) from self._settings.cause(exc)
        finally:
            await self._conns.release(conn)
        return options.finish(
            [AggregateIdEntry(aggregate_id, ts.replace(tzinfo=UTC)) for aggregate_id, ts in rows]
        )

    async def _fetch_all(
        self, conn: AsyncConnection, query: str, params: Sequence[Any]
    ) -> list[Any]:
        """The rows of a query through psycopg (which prepares it once it is frequent).

        A table made again elsewhere with other column types fails psycopg's prepared
        statement ("cached plan must not change result type") until it is prepared again:
        that is done once, here.
        """
        with direct.encoding_errors(conn, params):
            try:
                return await (await self._conns.cursor(conn).execute(query, params)).fetchall()
            except pg_errors.FeatureNotSupported:
                await self._conns.forget_prepared(conn)
                return await (await self._conns.cursor(conn).execute(query, params)).fetchall()

    async def _unlisted_aggregate_ids(self, context: EventStoreContext) -> list[str]:
        """Aggregates without a version-1 event, which listing leaves out (by id).

        For ``castore export``, which exports every event.

        Raises:
            StorageUnavailableError: The connection failed.
        """
        if not storable(context.event_store_id):
            return []
        where = self._where("listing aggregates")
        conn = await self._conns.acquire(where)
        try:
            rows = await self._fetch_all(
                conn, self._sql.unlisted_aggregate_ids(), [context.event_store_id]
            )
        except psycopg.Error as exc:
            raise self._conns.error(exc, where) from self._settings.cause(exc)
        finally:
            await self._conns.release(conn)
        return [aggregate_id for (aggregate_id,) in rows]
