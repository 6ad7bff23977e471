"""``PostgresEventStorageAdapter``: events in a PostgreSQL table shared with Castore.

The table has the layout of ``@castore/event-storage-adapter-postgres``, so a TypeScript
Castore service and a Python service can share it. Every write is ONE statement in one round
trip (PostgreSQL runs a single statement as its own transaction), so a push or a group is
stored completely or not at all, whatever happens to the calling task or the connection.
Needs the ``postgres`` extra: ``pip install 'castore-pydantic[postgres]'``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg.conninfo import conninfo_to_dict
    from psycopg.pq import TransactionStatus
    from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "castore_pydantic.storage.postgres needs psycopg 3 and psycopg-pool: "
        "pip install 'castore-pydantic[postgres]'"
    ) from exc

from pydantic_core import PydanticSerializationError, to_json

from castore_pydantic._event import Event, utc_now
from castore_pydantic._paging import ListingOptions
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic._types import AggregateIdEntry, GroupedEvent, ListAggregateIdsResult
from castore_pydantic.errors import (
    CastoreError,
    EventAlreadyExistsError,
    EventGroupError,
    EventLimitExceededError,
    InvalidPageTokenError,
    StorageError,
    StorageUnavailableError,
)
from castore_pydantic.storage._postgres_sql import (
    AggregateIdType,
    Statements,
    check_identifier,
)

__all__ = ["AggregateIdType", "PostgresEventStorageAdapter"]

_AsyncConnection = psycopg.AsyncConnection[Any]
_BIGINT_MAX = 2**63 - 1
_LAYOUT = ("aggregate_name", "aggregate_id", "version", "type", "data", "metadata", "timestamp")
_IDLE = TransactionStatus.IDLE
_GROUP_SQL_CACHE = 256  # group statements kept, by tables and sizes


def _json(value: Any, event_store_id: str, field: str) -> str | None:
    if value is None:
        return None
    try:
        return to_json(value, by_alias=True).decode()
    except PydanticSerializationError as exc:
        raise EventLimitExceededError(
            event_store_id, f"not serialisable as JSON: {exc}", (field,)
        ) from exc


def _row(event: Event, event_store_id: str) -> tuple[Any, ...]:
    return (
        event_store_id,
        event.aggregate_id,
        event.version,
        event.type,
        _json(event.payload, event_store_id, "payload"),
        _json(event.metadata, event_store_id, "metadata"),
        event.timestamp,
    )


def _stamped(event: Event) -> Event:
    return (
        event if event.timestamp is not None else event.model_copy(update={"timestamp": utc_now()})
    )


def _storable(text: str) -> bool:
    """Whether PostgreSQL text can hold ``text`` (no NUL, valid Unicode)."""
    if text.isascii():
        return "\x00" not in text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _naive_utc(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None)


def _message(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    primary = diag.message_primary if diag is not None else None
    return primary or str(exc).strip() or type(exc).__name__


class PostgresEventStorageAdapter:
    """Stores events in a PostgreSQL table, through a psycopg 3 connection pool.

    Construct it from a connection string (it then owns a pool, opened on first use and closed
    by ``aclose()`` / ``async with``) or from an ``AsyncConnectionPool`` you manage. Several
    adapters may share one table: event stores are kept apart by their id.

    Args:
        connection_string: A libpq connection string or URI; ``None`` uses the ``PG*``
            environment variables. The password never appears in ``repr()`` or errors.
        pool: An open ``psycopg_pool.AsyncConnectionPool`` to use instead (not closed by the
            adapter). Its connections are switched to autocommit while the adapter uses them.
        table_name: The events table (any name of at most 63 bytes; it is quoted).
        schema: The table's schema; ``None`` follows the connections' ``search_path``.
        min_size: Connections the owned pool keeps open.
        max_size: Connections the owned pool may open.
        timeout: Seconds to wait for a free connection before ``StorageUnavailableError``.
        connect_kwargs: Extra connection parameters (``application_name``,
            ``connect_timeout``, ``prepare_threshold=None`` behind PgBouncer, ...).

    Raises:
        ValueError: Both or a malformed connection string, or a table or schema name that
            PostgreSQL cannot hold.
        TypeError: ``pool`` is not an ``AsyncConnectionPool``.
    """

    def __init__(
        self,
        connection_string: str | None = None,
        *,
        pool: AsyncConnectionPool[_AsyncConnection] | None = None,
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
        self._key_names = {self._sql.unique_name}
        self._closed = False
        self._opened = False
        self._switched: set[int] = set()
        self._group_sql: dict[tuple[Any, ...], str] = {}
        if pool is not None:
            if connection_string is not None or connect_kwargs:
                raise ValueError("pass either a connection string or a pool, not both")
            if not isinstance(pool, AsyncConnectionPool):
                raise TypeError(f"pool must be a psycopg_pool.AsyncConnectionPool, not {pool!r}")
            self._owns_pool = False
            self._pool: AsyncConnectionPool[_AsyncConnection] = pool
            params = self._pool_params(pool)
        else:
            kwargs = dict(connect_kwargs or {})
            params = self._parse(connection_string or "", kwargs)
            kwargs["autocommit"] = True
            self._owns_pool = True
            self._pool = AsyncConnectionPool(
                connection_string or "",
                kwargs=kwargs,
                min_size=min_size,
                max_size=max_size,
                timeout=timeout,
                open=False,
                name=f"castore-{self._table}"[:60],
            )
        password = str(params.get("password") or "")
        self._secrets = tuple({password, quote(password, safe="")} - {""})
        self._database = (
            str(params.get("host") or params.get("hostaddr") or ""),
            str(params.get("port") or "5432"),
            str(params.get("dbname") or params.get("user") or ""),
        )
        self._describe = " ".join(
            f"{key}={params[key]}" for key in ("host", "port", "dbname", "user") if params.get(key)
        )

    def _parse(self, conninfo: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        secrets = {str(kwargs.get("password") or "")} - {""}
        try:
            return conninfo_to_dict(conninfo, **kwargs)
        except psycopg.Error as exc:
            # libpq may echo the string it could not parse, password included.
            text = str(exc)
            for secret in secrets | self._url_password(conninfo):
                text = text.replace(secret, "***")
            raise ValueError(f"invalid PostgreSQL connection string: {text}") from None

    @staticmethod
    def _url_password(conninfo: str) -> set[str]:
        """The password of a URI, found without a parser that could fail on it."""
        head, sep, _ = conninfo.partition("@")
        if not sep or "://" not in head:
            return set()
        _, _, credentials = head.partition("://")
        _, colon, password = credentials.partition(":")
        return {password} - {""} if colon else set()

    @staticmethod
    def _pool_params(pool: AsyncConnectionPool[_AsyncConnection]) -> dict[str, Any]:
        if isinstance(pool.conninfo, str) and isinstance(pool.kwargs, Mapping):
            try:
                return conninfo_to_dict(pool.conninfo, **pool.kwargs)
            except psycopg.Error:
                return {}
        return {}

    def __repr__(self) -> str:
        return (
            f"PostgresEventStorageAdapter({self._describe!r}, table_name={self._table!r}, "
            f"schema={self._schema!r})"
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
    def pool(self) -> AsyncConnectionPool[_AsyncConnection]:
        """The connection pool the adapter uses."""
        return self._pool

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the owned pool (a pool passed in is left open); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_pool:
            await self._pool.close()

    async def _open(self) -> None:
        if self._closed:
            raise StorageError(f"{self!r} is closed")
        if self._owns_pool and not self._opened:
            await self._pool.open()
            self._opened = True

    async def _acquire(self, doing: str) -> _AsyncConnection:
        if not self._opened:
            await self._open()
        elif self._closed:
            raise StorageError(f"{self!r} is closed")
        try:
            conn = await self._pool.getconn()
        except PoolTimeout as exc:
            error = self._error(exc, doing)
            reason = await self._connect_failure()
            if reason is not None:
                error = StorageUnavailableError(f"{error} because connecting fails: {reason}")
            raise error from self._cause(exc)
        except (PoolClosed, psycopg.Error) as exc:
            raise self._error(exc, doing) from self._cause(exc)
        if not conn.autocommit:
            # Only a borrowed pool lends such connections; each write is one statement, so
            # autocommit is what makes it atomic without BEGIN/COMMIT round trips.
            try:
                await conn.set_autocommit(True)
            except BaseException:
                await asyncio.shield(self._pool.putconn(conn))
                raise
            self._switched.add(id(conn))
        return conn

    async def _connect_failure(self) -> str | None:
        """Why an owned pool fails to open connections (the pool itself only logs it)."""
        if not self._owns_pool or not self._pool.get_stats().get("connections_errors", 0):
            return None  # every connection busy, none broken
        kwargs = dict(self._pool.kwargs) if isinstance(self._pool.kwargs, Mapping) else {}
        kwargs.setdefault("connect_timeout", 5)
        conninfo = self._pool.conninfo if isinstance(self._pool.conninfo, str) else ""
        try:
            conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
        except psycopg.Error as exc:
            return self._redact(str(exc).strip())
        await conn.close()
        return None

    async def _release(self, conn: _AsyncConnection) -> None:
        if self._switched and id(conn) in self._switched:
            self._switched.discard(id(conn))
            if not conn.broken and conn.pgconn.transaction_status == _IDLE:
                await conn.set_autocommit(False)  # returned as it was lent
        if conn.pgconn.transaction_status == _IDLE:
            await self._pool.putconn(conn)
        else:
            # Rolling back or closing suspends: don't let a second cancellation lose it.
            await asyncio.shield(self._pool.putconn(conn))

    # -- errors ----------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _cause(self, exc: BaseException) -> BaseException | None:
        """``exc``, or ``None`` when its text would reveal the password."""
        if not self._secrets:
            return exc
        seen: BaseException | None = exc
        while seen is not None:
            if any(secret in str(seen) for secret in self._secrets):
                return None
            seen = seen.__cause__ or seen.__context__
        return exc

    def _error(
        self,
        exc: BaseException,
        doing: str,
        event_store_id: str | None = None,
        *,
        lost_write: bool = False,
    ) -> CastoreError:
        """Translate a driver or pool error raised while ``doing`` something.

        ``lost_write`` says that the connection broke after a write was sent: the server may
        have committed it before the connection went, and the caller must be told so.
        """
        text = self._redact(_message(exc))
        where = f"{doing} in {self._sql.table_ddl}"
        if isinstance(exc, PoolTimeout):
            return StorageUnavailableError(
                f"{where}: no PostgreSQL connection available within {self._pool.timeout}s"
            )
        if isinstance(exc, PoolClosed):
            return StorageError(f"{where}: the connection pool is closed")
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            outcome = (
                "; the connection was lost after the write was sent, so its outcome is "
                "unknown: read the aggregate before retrying (a retry of a stored version "
                "raises EventAlreadyExistsError)"
                if lost_write
                else ""
            )
            return StorageUnavailableError(f"{where}: PostgreSQL is unavailable ({text}){outcome}")
        if isinstance(exc, pg_errors.UndefinedTable):
            return StorageError(
                f"{where}: the table does not exist; call await adapter.create_event_table()"
            )
        if isinstance(exc, psycopg.DataError) and event_store_id is not None:
            return EventLimitExceededError(
                event_store_id, f"PostgreSQL refused a value of the event ({text})"
            )
        return StorageError(f"{where}: {text}")

    async def _is_event_key(self, conn: _AsyncConnection, exc: pg_errors.UniqueViolation) -> bool:
        """Whether a unique violation is on this table's ``(store, aggregate, version)`` key."""
        diag = exc.diag
        if diag.table_name != self._table or diag.constraint_name is None:
            return False
        if self._schema is not None and diag.schema_name != self._schema:
            return False
        if diag.constraint_name in self._key_names:
            return True
        # A table created by someone else: look its unique index up once.
        cursor = await conn.execute(
            Statements.is_event_key(), (diag.schema_name, diag.constraint_name, diag.table_name)
        )
        row = await cursor.fetchone()
        if row is not None and row[0]:
            self._key_names.add(diag.constraint_name)
            return True
        return False

    # -- schema ----------------------------------------------------------------------------

    async def create_event_table(self, *, aggregate_id_type: AggregateIdType = "text") -> None:
        """Create the schema (if named), the table and its indexes unless they exist.

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
        digest = hashlib.sha256(f"castore_pydantic:{self._sql.table_ddl}".encode()).digest()
        lock = int.from_bytes(digest[:8], "big", signed=True)
        doing = "creating the event table"
        conn = await self._acquire(doing)
        try:
            async with conn.transaction():
                # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalog.
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))
                for statement in self._sql.create_table(aggregate_id_type):
                    await conn.execute(statement.encode())
                cursor = await conn.execute(self._sql.columns(), (self._sql.table_ddl,))
                columns = {name for name, _ in await cursor.fetchall()}
                missing = [column for column in _LAYOUT if column not in columns]
                if not missing:
                    await conn.execute(self._sql.create_index().encode())
        except psycopg.Error as exc:
            raise self._error(exc, doing) from self._cause(exc)
        finally:
            await self._release(conn)
        if missing:
            raise StorageError(
                f"{self._sql.table_ddl} exists but lacks the columns {', '.join(missing)}"
            )

    async def drop_event_table(self) -> None:
        """Drop the table if it exists (the schema stays).

        Raises:
            StorageError: PostgreSQL refused.
            StorageUnavailableError: PostgreSQL cannot be reached.
        """
        doing = "dropping the event table"
        conn = await self._acquire(doing)
        try:
            await conn.execute(self._sql.drop().encode())
        except psycopg.Error as exc:
            raise self._error(exc, doing) from self._cause(exc)
        finally:
            await self._release(conn)

    # -- writing ---------------------------------------------------------------------------

    def _check_store_id(self, event_store_id: str) -> None:
        if not _storable(event_store_id):
            raise EventLimitExceededError(
                event_store_id,
                "PostgreSQL text cannot hold NUL or lone surrogates",
                ("eventStoreId",),
            )

    async def push_event(
        self, event: Event, context: EventStoreContext, *, force: bool = False
    ) -> Event:
        """Store one event with a single INSERT (see ``EventStorageAdapter.push_event``).

        Raises:
            EventAlreadyExistsError: The version is taken (and ``force`` is false).
            EventLimitExceededError: A value does not fit the table (e.g. a non-UUID id on a
                ``uuid`` table); nothing is written.
            StorageUnavailableError: The connection failed; nothing was written.
            StorageError: Any other database error.
        """
        event_store_id = context.event_store_id
        self._check_store_id(event_store_id)
        event = _stamped(event)
        params = _row(event, event_store_id)
        doing = "pushing an event"
        conn = await self._acquire(doing)
        try:
            await conn.execute(self._sql.upsert if force else self._sql.insert, params)
        except pg_errors.UniqueViolation as exc:
            if await self._is_event_key(conn, exc):
                raise EventAlreadyExistsError(
                    event_store_id, event.aggregate_id, event.version
                ) from exc
            raise self._error(exc, doing, event_store_id) from self._cause(exc)
        except psycopg.Error as exc:
            error = self._error(exc, doing, event_store_id, lost_write=conn.broken)
            raise error from self._cause(exc)
        finally:
            await self._release(conn)
        return event

    def group_event(self, event: Event, context: EventStoreContext) -> GroupedEvent:
        """Wrap an event for a group pushed by PostgreSQL adapters."""
        return GroupedEvent(event=event, event_storage_adapter=self, context=context)

    def _same_database(self, other: PostgresEventStorageAdapter) -> bool:
        return other._pool is self._pool or other._database == self._database

    async def push_event_group(
        self, grouped_events: Sequence[GroupedEvent], *, force: bool = False
    ) -> list[Event]:
        """Store the group with ONE statement on one connection: all events or none.

        Each event goes to its own grouped event's adapter's table; those adapters must all
        be PostgreSQL adapters on this adapter's database.

        Raises:
            EventGroupError: The group is empty, lacks a context, or mixes other adapters or
                databases; nothing is written.
            EventAlreadyExistsError: A version is taken (names the first such event);
                nothing is written.
            EventLimitExceededError: A value does not fit a table; nothing is written.
            StorageUnavailableError: The connection failed; nothing was written.
        """
        if not grouped_events:
            raise EventGroupError("An event group needs at least one grouped event")
        members: list[tuple[PostgresEventStorageAdapter, str, Event]] = []
        tables: dict[str, tuple[Statements, dict[tuple[str, str, int], tuple[Any, ...]]]] = {}
        for index, grouped in enumerate(grouped_events):
            adapter = grouped.event_storage_adapter
            if not isinstance(adapter, PostgresEventStorageAdapter):
                raise EventGroupError(
                    f"Event group event #{index} is not connected to a PostgresEventStorageAdapter"
                )
            if grouped.context is None:
                raise EventGroupError(f"Event group event #{index} misses context")
            if not self._same_database(adapter):
                raise EventGroupError(
                    f"Event group event #{index} is stored in another database "
                    f"({adapter._describe or 'libpq defaults'}, not "
                    f"{self._describe or 'libpq defaults'}): a group is one transaction"
                )
            event_store_id = grouped.context.event_store_id
            self._check_store_id(event_store_id)
            event = _stamped(grouped.event)
            key = (event_store_id, event.aggregate_id, event.version)
            _, rows = tables.setdefault(adapter._sql.table, (adapter._sql, {}))
            if key in rows and not force:
                raise EventAlreadyExistsError(*key)
            rows[key] = _row(event, event_store_id)  # with force, the last one wins
            members.append((adapter, event_store_id, event))
        shape = (force, *((table, len(rows)) for table, (_, rows) in tables.items()))
        query = self._group_sql.get(shape)
        if query is None:
            query = Statements.write_group(
                [(statements, len(rows)) for statements, rows in tables.values()], force=force
            )
            if len(self._group_sql) < _GROUP_SQL_CACHE:
                self._group_sql[shape] = query
        params = [value for _, rows in tables.values() for row in rows.values() for value in row]
        doing = "pushing an event group"
        conn = await self._acquire(doing)
        try:
            await conn.execute(query, params)
        except pg_errors.UniqueViolation as exc:
            culprit = await self._conflicting_member(conn, exc, members)
            if culprit is not None:
                raise EventAlreadyExistsError(*culprit) from exc
            raise self._error(exc, doing) from self._cause(exc)
        except psycopg.Error as exc:
            error = self._error(exc, doing, members[0][1], lost_write=conn.broken)
            raise error from self._cause(exc)
        finally:
            await self._release(conn)
        return [event for _, _, event in members]

    async def _conflicting_member(
        self,
        conn: _AsyncConnection,
        exc: pg_errors.UniqueViolation,
        members: list[tuple[PostgresEventStorageAdapter, str, Event]],
    ) -> tuple[str, str, int] | None:
        """Which grouped event a unique violation was about (the statement does not say).

        The failed statement rolled back, so a key that is stored now conflicted; the first
        one in group order is reported. If none is stored, two members were the same event
        spelled differently (e.g. a UUID in upper and lower case).
        """
        candidates = []
        checked: dict[int, bool] = {}
        for index, (adapter, event_store_id, event) in enumerate(members):
            if id(adapter) not in checked:
                checked[id(adapter)] = await adapter._is_event_key(conn, exc)
            if checked[id(adapter)]:
                candidates.append((index, adapter, event_store_id, event))
        if not candidates:
            return None
        query = " UNION ALL ".join(adapter._sql.exists() for _, adapter, _, _ in candidates)
        params = [
            value
            for index, _, event_store_id, event in candidates
            for value in (index, event_store_id, event.aggregate_id, event.version)
        ]
        cursor = await conn.execute(query, params)
        stored = sorted(row[0] for row in await cursor.fetchall())
        if stored:
            _, event_store_id, event = members[stored[0]]
            return event_store_id, event.aggregate_id, event.version
        seen: set[tuple[int, str, str, int]] = set()
        for _, adapter, event_store_id, event in candidates:
            key = (id(adapter), event_store_id, event.aggregate_id.casefold(), event.version)
            if key in seen:
                return event_store_id, event.aggregate_id, event.version
            seen.add(key)
        _, _, event_store_id, event = candidates[0]
        return event_store_id, event.aggregate_id, event.version

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

        PostgreSQL builds the JSON array of the rows; it is validated in one pass.

        Raises:
            StoredEventValidationError: A stored event does not validate.
            StorageUnavailableError: The connection failed.
        """
        event_store_id = context.event_store_id
        if limit == 0 or not (_storable(aggregate_id) and _storable(event_store_id)):
            return []  # no such aggregate can be stored
        params: list[Any] = [event_store_id, aggregate_id]
        if min_version is not None:
            params.append(min_version)
        if max_version is not None:
            params.append(max_version)
        if limit is not None:
            params.append(min(limit, _BIGINT_MAX))
        query = self._sql.get_events(
            min_version=min_version is not None,
            max_version=max_version is not None,
            limit=limit is not None,
            reverse=reverse,
        )
        doing = "reading events"
        conn = await self._acquire(doing)
        try:
            cursor = await conn.execute(query, params)
            row = await cursor.fetchone()
        except pg_errors.InvalidTextRepresentation:
            return []  # not a UUID, on a uuid table: no such aggregate
        except psycopg.Error as exc:
            raise self._error(exc, doing) from self._cause(exc)
        finally:
            await self._release(conn)
        if row is None or row[0] is None:
            return []
        return context.parse_events_json(row[0])

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
        if options.limit == 0 or not _storable(event_store_id):
            return ListAggregateIdsResult(aggregate_ids=[])
        cursor = options.cursor
        if cursor is not None and not _storable(cursor.aggregate_id):
            raise InvalidPageTokenError("'lastEvaluatedKey.aggregateId' cannot be stored")
        params: list[Any] = [event_store_id]
        if options.initial_event_after is not None:
            params.append(_naive_utc(options.initial_event_after))
        if options.initial_event_before is not None:
            params.append(_naive_utc(options.initial_event_before))
        if cursor is not None:
            params += [_naive_utc(cursor.initial_event_timestamp), cursor.aggregate_id]
        if options.limit is not None:
            params.append(min(options.limit + 1, _BIGINT_MAX))
        query = self._sql.list_aggregate_ids(
            after=options.initial_event_after is not None,
            before=options.initial_event_before is not None,
            cursor=cursor is not None,
            reverse=options.reverse,
            limit=options.limit is not None,
        )
        doing = "listing aggregates"
        conn = await self._acquire(doing)
        try:
            result = await conn.execute(query, params)
            rows = await result.fetchall()
        except pg_errors.InvalidTextRepresentation as exc:
            raise InvalidPageTokenError(
                "'lastEvaluatedKey.aggregateId' does not fit this table's aggregate ids"
            ) from exc
        except psycopg.Error as exc:
            raise self._error(exc, doing) from self._cause(exc)
        finally:
            await self._release(conn)
        return options.finish(
            [AggregateIdEntry(aggregate_id, ts.replace(tzinfo=UTC)) for aggregate_id, ts in rows]
        )
