"""``SQLiteEventStorageAdapter``: events in a SQLite database (standard library ``sqlite3``).

Every operation is one short SQL transaction run synchronously on the calling thread with
SQLite's busy timeout at zero, so it never waits on a lock while holding the event loop. When
another connection holds the write lock (another adapter, thread or process on the same file),
SQLite answers "busy" at once; the adapter then sleeps asynchronously with a growing, jittered
delay and tries again, until ``busy_timeout`` has passed. A write transaction therefore
never spans an ``await``: a cancelled call has either not started its transaction or finished
it, and a cancelled push or group writes nothing.

A read that may return more than 1,000 events is the exception: it reads in slices of 1,000
inside one read transaction (one snapshot, which never blocks writers in WAL mode). The first
slice is read on the calling thread; a worker thread reads the others while the caller
validates, and that thread ends the transaction and frees the adapter, also when the caller
is cancelled or fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import sqlite3
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, Literal, NamedTuple, ParamSpec, Self, TypeVar

from castore_pydantic._event import (
    Event,
    needs_normalizing,
    read_timestamp,
    stamped,
    utc_now,
    utf8_encodable,
)
from castore_pydantic._paging import ListingOptions, check_read_options, lower_bound
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic._types import AggregateIdEntry, GroupedEvent, ListAggregateIdsResult
from castore_pydantic.errors import (
    EventAlreadyExistsError,
    EventGroupError,
    EventLimitExceededError,
    StorageError,
    StorageUnavailableError,
    StoredEventValidationError,
)
from castore_pydantic.storage._columns import storable_columns
from castore_pydantic.storage._sqlite_lock import AdapterLock, Ticket
from castore_pydantic.storage._sqlite_rows import (
    MAX_INTEGER,
    SLICE,
    LongRead,
    Statements,
    timestamp_text,
)

__all__ = ["SQLiteEventStorageAdapter", "Synchronous"]

Synchronous = Literal["NORMAL", "FULL"]
"""SQLite's ``synchronous`` setting: ``"NORMAL"`` (WAL default: an acknowledged commit survives a
crash of the process, the last commits may be lost on power failure) or ``"FULL"`` (every commit
is flushed to disk before it is acknowledged).
"""

_T = TypeVar("_T")
_P = ParamSpec("_P")

_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_BUSY_CODES: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_UNAVAILABLE_CODES: Final = _BUSY_CODES | {sqlite3.SQLITE_CANTOPEN}
_UNIQUE_CODES: Final = frozenset(
    {sqlite3.SQLITE_CONSTRAINT_UNIQUE, sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY}
)
_FIRST_DELAY: Final = 0.0005
_MAX_DELAY: Final = 0.02
#: Longest pause of a call waiting for the adapter's own lock (a release wakes it before).
_MAX_LOCK_PAUSE: Final = 0.05
#: Longest stretch of back-to-back operations before an adapter call yields to the loop.
_MAX_LOOP_HOLD: Final = 0.01


class _BusyError(Exception):
    """Another connection holds the lock; nothing was written and the call may be retried."""


class _TooBigError(Exception):
    """A slice's JSON text passed SQLite's longest string; the read's slices are now smaller."""


class _NotJsonError(Exception):
    """A row of a slice holds text that SQLite does not read as JSON (another program's)."""


def _error_code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0) or 0)


def _not_json(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed on a stored column that is not JSON."""
    return "malformed JSON" in str(exc)


def _storage_error(exc: BaseException, doing: str) -> StorageError:
    """The error to raise (``from exc``) for a driver failure that is not a conflict."""
    if isinstance(exc, sqlite3.Error) and _error_code(exc) & 0xFF in _UNAVAILABLE_CODES:
        return StorageUnavailableError(f"SQLite database unavailable while {doing}: {exc}")
    return StorageError(f"SQLite failed while {doing}: {exc}")


class _Location(NamedTuple):
    """Which database a name opens, as far as groups need to know."""

    #: The file, resolved; ``None`` for a database in memory or one SQLite cannot reach.
    file: str | None
    #: The name of an in-memory database that connections of this process share (a
    #: ``cache=shared`` or ``memdb`` URI); ``None`` when the database is private to its
    #: connection, or a file.
    shared: str | None
    #: The name to open it by.
    opened_as: str


def _locate(name: str) -> _Location:
    """Where a database name leads (see ``_Location``).

    A relative path, or a ``file:`` URI's relative path, is resolved now, so that a later
    change of directory does not move the database.
    """
    if name in ("", ":memory:"):
        return _Location(None, None, name)
    if not name.startswith("file:"):
        real = os.path.realpath(name)
        return _Location(real, None, real)
    rest = name[len("file:") :]
    end = len(rest)
    for mark in "?#":
        found = rest.find(mark)
        if found >= 0:
            end = min(end, found)
    path, tail = rest[:end], rest[end:]
    if path.startswith("//"):  # an authority: SQLite takes only "" and "localhost"
        authority, slash, path = path[2:].partition("/")
        if authority not in ("", "localhost"):
            return _Location(None, None, name)  # SQLite refuses it when it opens
        path = slash + path
    query = urllib.parse.parse_qs(tail[1:].partition("#")[0] if tail.startswith("?") else "")
    path = urllib.parse.unquote(path)
    if "memdb" in query.get("vfs", ()):
        # SQLite's memdb: a name starting with "/" is shared by the process's connections.
        return _Location(None, f"memdb:{path}" if path.startswith("/") else None, name)
    if path in ("", ":memory:") or "memory" in query.get("mode", ()):
        # In memory (or, without a path, a temporary file): shared only with cache=shared.
        shared = path != "" and "shared" in query.get("cache", ())
        return _Location(None, f"memory:{path}" if shared else None, name)
    real = os.path.realpath(path)
    return _Location(real, None, Path(real).as_uri() + tail)


_URL: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _lasting_open_failure(name: str, file: str | None) -> str | None:
    """Why a database SQLite cannot open will not open on a retry either, when it shows.

    A missing directory, a directory given as the file or a URL given as a path are
    mistakes to fix, not an outage (``StorageUnavailableError`` says "retry").
    """
    if _URL.match(name):
        return "it is a URL; give a file path (or a 'file:' URI)"
    if file is None:
        return None
    if os.path.isdir(file):
        return "it is a directory"
    folder = os.path.dirname(file)
    if not os.path.isdir(folder):
        return f"the directory {folder!r} does not exist"
    return None


def _listed_timestamp(text: object, event_store_id: str, aggregate_id: str) -> datetime:
    """A version-1 row's timestamp not in this adapter's form, read as its event would be.

    Raises:
        StoredEventValidationError: The event's timestamp does not validate (so the event
            would not either).
    """
    try:
        return read_timestamp(text)
    except ValueError as exc:  # a ValidationError, or out of range once converted to UTC
        raise StoredEventValidationError(event_store_id, aggregate_id, 1) from exc


#: Characters of payload and metadata beyond which a write first checks that the event's
#: JSON, as reads build it, stays within SQLite's longest string.
_LONG_EVENT: Final = 1 << 20


def _check_readable(conn: sqlite3.Connection, row: tuple[Any, ...]) -> None:
    """Refuse a row whose event JSON would be longer than SQLite's longest string.

    Reads build each event's JSON in SQLite: an event whose row fits but whose JSON does not
    would be stored, listed, and never read back.

    Raises:
        EventLimitExceededError: The JSON would be too long.
    """
    store, aggregate_id, _, event_type, payload, metadata, _ = row
    size = sum(len(text.encode(errors="surrogatepass")) for text in (payload, metadata) if text)
    size += 6 * (len(aggregate_id) + len(event_type)) + 128  # escapes at worst, keys, version
    if size > conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH):
        raise EventLimitExceededError(
            store,
            "event's JSON would be longer than SQLite's longest string (SQLITE_LIMIT_LENGTH):"
            " it could not be read back",
        )


def _no_loop() -> None:
    return None


class _Turns:
    """When an event loop last let other tasks run, as far as one adapter's calls know."""

    __slots__ = ("last_yield", "waiting")

    def __init__(self) -> None:
        self.last_yield = time.monotonic()
        #: Whether a callback waits for the loop's next turn (see ``_run``).
        self.waiting = False

    def turned(self) -> None:
        self.waiting = False


#: Live adapters, reset in a forked child (see ``SQLiteEventStorageAdapter._forked``).
_ADAPTERS: weakref.WeakSet[SQLiteEventStorageAdapter] = weakref.WeakSet()
#: Connections a forked child inherited: never used, and never closed by garbage collection.
_INHERITED: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    for adapter in list(_ADAPTERS):
        adapter._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SQLiteEventStorageAdapter:
    """Stores events in one table of a SQLite database; safe across tasks, threads, processes.

    The table mirrors Castore's PostgreSQL layout: ``aggregate_name`` (the event store id),
    ``aggregate_id``, ``version``, ``type``, ``data`` (payload JSON or NULL), ``metadata``
    (JSON or NULL) and ``timestamp`` (text, ``2024-01-01T00:00:00.000Z``), unique on
    ``(aggregate_name, aggregate_id, version)``. It is created on first use, in WAL mode.

    Args:
        path: A file path, or ``":memory:"`` for a private in-memory database.
        table_name: The events table (letters, digits and ``_``, at most 63 characters).
        synchronous: ``"NORMAL"`` (default) or ``"FULL"``; see ``Synchronous``.
        busy_timeout: Seconds an operation keeps retrying while another connection holds
            the write lock before ``StorageUnavailableError`` is raised.

    Raises:
        ValueError: An invalid table name, synchronous setting or busy timeout.
    """

    #: ``EventStore`` hands groups to this adapter as they are: ``group_event`` only wraps,
    #: and ``push_event_group`` gives the events without a timestamp one timestamp.
    _stamps_groups: ClassVar[bool] = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table_name: str = "event",
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 5.0,
    ) -> None:
        if not isinstance(table_name, str) or not _IDENTIFIER.fullmatch(table_name):
            raise ValueError(
                f"table_name must be letters, digits and underscores, not starting with a "
                f"digit, at most 63 characters: {table_name!r}"
            )
        if table_name.lower().startswith("sqlite_"):
            raise ValueError(f"table names starting with 'sqlite_' are reserved: {table_name!r}")
        mode = synchronous.upper() if isinstance(synchronous, str) else synchronous
        if mode not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', not {synchronous!r}")
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, int | float):
            raise TypeError(f"busy_timeout must be a number of seconds, not {busy_timeout!r}")
        if not busy_timeout >= 0:
            raise ValueError(f"busy_timeout must be >= 0 seconds, got {busy_timeout}")
        self._database = os.fspath(path)
        self._location = _locate(self._database)
        self._table = table_name
        self._sql = Statements(table_name)
        self._synchronous: Synchronous = "FULL" if mode == "FULL" else "NORMAL"
        self._busy_timeout = float(busy_timeout)
        self._lock = AdapterLock()
        self._conn: sqlite3.Connection | None = None
        self._ready_tables: set[str] = set()
        self._closed = False
        #: Set by an operation that hands the lock on (a long read); ``_run`` then keeps it.
        self._keep_lock = False
        self._forget_loops()
        _ADAPTERS.add(self)

    def _forked(self) -> None:
        """In a child process: start afresh, leaving the parent's connection and lock alone.

        The child may have been forked while another thread held the lock (a long read's
        worker), which no thread of the child would ever release; and SQLite forbids using,
        or closing, a connection opened before a fork. The inherited connection is kept
        unused for the child's lifetime.
        """
        self._lock = AdapterLock()
        self._keep_lock = False
        self._forget_loops()
        if self._conn is not None:
            _INHERITED.append(self._conn)
        self._conn = None
        self._ready_tables = set()

    def __repr__(self) -> str:
        return f"SQLiteEventStorageAdapter({self._database!r}, table_name={self._table!r})"

    @property
    def path(self) -> str:
        """The database path as given (``":memory:"`` for an in-memory database)."""
        return self._database

    @property
    def table_name(self) -> str:
        """The events table."""
        return self._table

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self._run(self._connection)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; idempotent. The adapter cannot be used afterwards."""
        self._closed = True
        # A thread lock (the adapter may be shared by threads): wait for it without blocking.
        ticket: Ticket | None = None
        while not self._lock.acquire(blocking=False):
            ticket = await self._lock.wait(ticket, _MAX_LOCK_PAUSE)
        self._lock.leave(ticket)
        try:
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
        finally:
            self._lock.release()

    # -- running operations ----------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """The open, initialised connection (called with the lock held)."""
        conn = self._conn
        if conn is not None and self._ready_tables:
            return conn
        if self._closed:
            raise StorageError(f"{self!r} is closed")
        try:
            if conn is None:
                # The path resolved when the adapter was made: a relative path opened later
                # would follow the working directory, away from the file groups compare.
                conn = sqlite3.connect(
                    self._location.opened_as,
                    uri=self._location.opened_as.startswith("file:"),
                    timeout=0,
                    isolation_level=None,
                    check_same_thread=False,
                )
                self._conn = conn
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            for statement in self._sql.create:
                conn.execute(statement)
        except sqlite3.Error as exc:
            code = _error_code(exc) & 0xFF
            if code in _BUSY_CODES:
                raise _BusyError from exc
            if code == sqlite3.SQLITE_CANTOPEN:
                reason = _lasting_open_failure(self._database, self._location.file)
                if reason is not None:
                    message = f"SQLite cannot open {self._database!r}: {reason}"
                    raise StorageError(message) from exc
            raise _storage_error(exc, f"opening {self._database!r}") from exc
        self._ready_tables.add(self._table)
        return conn

    def _forget_loops(self) -> None:
        """Start the burst detection of ``_run`` afresh, for every event loop."""
        # Per loop: one adapter may serve loops in several threads, each with its own bursts.
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Turns] = (
            weakref.WeakKeyDictionary()  # a closed loop is not kept alive
        )
        #: The last loop's entry, found without a lookup while calls come from one loop.
        self._last_loop: tuple[Callable[[], asyncio.AbstractEventLoop | None], _Turns] = (
            _no_loop,
            _Turns(),
        )

    def _turns(self, loop: asyncio.AbstractEventLoop) -> _Turns:
        """The burst detection's entry of ``loop``."""
        last, turns = self._last_loop
        if last() is not loop:
            found = self._loops.get(loop)
            if found is None:
                found = self._loops[loop] = _Turns()
            turns = found
            self._last_loop = (weakref.ref(loop), turns)
        return turns

    def _discard_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._ready_tables = set()
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()  # closing rolls back whatever was left open

    async def _run(  # noqa: PLR0912 - one loop: turns, the lock, busy retries, closing
        self, operation: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Run a synchronous operation under the lock, retrying while the database is busy.

        Waiting for the adapter's own lock (another of its calls runs, a long read for
        instance) has no time limit, as waiting for any lock: ``busy_timeout`` bounds the time
        other connections keep the database locked, not counting those waits. Calls wait for
        the adapter's lock in line, and a release wakes the first (``AdapterLock``); each
        also looks again after a pause growing to 50 ms. Waits for other connections' locks
        (``SQLITE_BUSY``) look again after pauses growing (randomly spread) to 20 ms.
        """
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        turns = self._turns(loop)
        if not turns.waiting:
            # The loop ran the callback: it had a turn since this adapter's last call on it
            # (time between calls proves nothing: a caller may compute, or the host stall,
            # without yielding). Ask to hear of its next turn.
            turns.last_yield = now
            turns.waiting = True
            loop.call_soon(turns.turned)
        elif now - turns.last_yield > _MAX_LOOP_HOLD:
            # Back-to-back calls complete without suspending: in a long burst, let other
            # tasks run now and then, before this operation has started anything.
            turns.last_yield = now
            await asyncio.sleep(0)
        deadline = None
        delay = lock_delay = _FIRST_DELAY
        cause: BaseException | None = None
        ticket: Ticket | None = None  # this call's place in line for the adapter's lock
        while True:
            lock = self._lock
            if not lock.acquire(blocking=False):
                began = time.monotonic()
                ticket = await lock.wait(ticket, lock_delay * random.uniform(0.5, 1.0))  # noqa: S311
                lock_delay = min(lock_delay * 2, _MAX_LOCK_PAUSE)
                turns.last_yield = time.monotonic()
                if deadline is not None:
                    deadline += turns.last_yield - began  # not the others' lock: not counted
                continue
            lock.leave(ticket)
            ticket = None
            try:
                if self._closed:
                    # An ``aclose`` that was cancelled while it waited left this behind.
                    self._discard_connection()
                    raise StorageError(f"{self!r} is closed")
                result = operation(*args, **kwargs)
            except _BusyError as busy:
                cause = busy.__cause__
            else:
                return result
            finally:
                if self._keep_lock:
                    self._keep_lock = False
                else:
                    self._lock.release()
            now = time.monotonic()
            if deadline is None:
                deadline = now + self._busy_timeout
            if now >= deadline:
                raise StorageUnavailableError(
                    f"SQLite database {self._database!r} stayed locked by another connection "
                    f"for longer than busy_timeout={self._busy_timeout}s"
                ) from cause
            await asyncio.sleep(min(delay * random.uniform(0.5, 1.0), deadline - now))  # noqa: S311
            delay = min(delay * 2, _MAX_DELAY)
            turns.last_yield = time.monotonic()

    # -- writing ---------------------------------------------------------------------------

    @staticmethod
    def _row(event: Event, event_store_id: str) -> tuple[Any, ...]:
        """The values of an event's row (``EventLimitExceededError`` if JSON cannot hold it)."""
        timestamp = event.timestamp
        payload, metadata = storable_columns(event, event_store_id)
        return (
            event_store_id,
            event.aggregate_id,
            event.version,
            event.type,
            payload,
            metadata,
            timestamp_text(timestamp) if timestamp is not None else None,
        )

    @staticmethod
    def _execute_insert(
        conn: sqlite3.Connection, sql: str, row: tuple[Any, ...], event: Event
    ) -> None:
        """Run one INSERT; translate a taken version, busy and driver errors."""
        payload, metadata = row[4], row[5]
        if (len(payload) if payload else 0) + (len(metadata) if metadata else 0) > _LONG_EVENT:
            _check_readable(conn, row)
        try:
            conn.execute(sql, row)
        except sqlite3.IntegrityError as exc:
            if _error_code(exc) in _UNIQUE_CODES:
                raise EventAlreadyExistsError(row[0], event.aggregate_id, event.version) from exc
            raise _storage_error(exc, "inserting an event") from exc
        except sqlite3.DataError as exc:
            if _error_code(exc) & 0xFF != sqlite3.SQLITE_TOOBIG:
                raise
            raise EventLimitExceededError(
                row[0], "event longer than SQLite's longest string or row (SQLITE_LIMIT_LENGTH)"
            ) from exc
        except OverflowError as exc:
            if abs(event.version) > MAX_INTEGER:
                raise EventLimitExceededError(
                    row[0], "version does not fit SQLite's 64-bit INTEGER", ("version",)
                ) from exc
            # Python's sqlite3 binds no text of 2 GiB or more.
            raise EventLimitExceededError(
                row[0], "payload or metadata longer than SQLite can take (2 GiB)"
            ) from exc
        except UnicodeEncodeError as exc:  # an adapter used without an event store's checks
            raise EventLimitExceededError(
                row[0], "text is not valid Unicode (lone surrogate)", ("aggregateId",)
            ) from exc

    def _push_sync(self, row: tuple[Any, ...], event: Event, force: bool) -> None:
        conn = self._connection()
        try:
            self._execute_insert(conn, self._sql.upsert if force else self._sql.insert, row, event)
        except sqlite3.Error as exc:
            if _error_code(exc) & 0xFF in _BUSY_CODES:
                raise _BusyError from exc
            raise _storage_error(exc, "inserting an event") from exc

    async def push_event(
        self, event: Event, context: EventStoreContext, *, force: bool = False
    ) -> Event:
        """Store one event (see ``EventStorageAdapter.push_event``).

        Raises:
            EventAlreadyExistsError: The version is taken and ``force`` is false.
            StorageUnavailableError: The database stayed locked past ``busy_timeout`` or
                cannot be opened.
            StorageError: Another SQLite failure.
        """
        event = stamped(event)
        row = self._row(event, context.event_store_id)
        await self._run(self._push_sync, row, event, force)
        return event

    def group_event(self, event: Event, context: EventStoreContext) -> GroupedEvent:
        """Wrap an event for a group pushed by SQLite adapters on the same database."""
        return GroupedEvent(event=event, event_storage_adapter=self, context=context)

    def _same_database(self, other: SQLiteEventStorageAdapter) -> bool:
        if other is self:
            return True
        mine, theirs = self._location, other._location
        if mine.shared is not None or theirs.shared is not None:
            return mine.shared == theirs.shared
        if mine.file is None or theirs.file is None:
            return False
        if mine.file == theirs.file:
            return True
        try:
            return os.path.samefile(mine.file, theirs.file)
        except OSError:
            return False

    def _push_group_sync(
        self,
        rows: list[tuple[Statements, str, tuple[Any, ...], Event]],
        force: bool,
        synchronous: Synchronous,
    ) -> None:
        conn = self._connection()
        if synchronous != self._synchronous:
            # A member's adapter asks for more durability than this one: its events get it.
            try:
                conn.execute(f"PRAGMA synchronous = {synchronous}")
                self._push_group_in_transaction(conn, rows, force)
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            return
        self._push_group_in_transaction(conn, rows, force)

    def _push_group_in_transaction(
        self,
        conn: sqlite3.Connection,
        rows: list[tuple[Statements, str, tuple[Any, ...], Event]],
        force: bool,
    ) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if _error_code(exc) & 0xFF in _BUSY_CODES:
                raise _BusyError from exc
            raise _storage_error(exc, "starting a transaction") from exc
        created: list[str] = []
        try:
            for statements, table, _, _ in rows:
                if table not in self._ready_tables and table not in created:
                    for statement in statements.create:
                        conn.execute(statement)
                    created.append(table)
            for statements, _, row, event in rows:
                sql = statements.upsert if force else statements.insert
                self._execute_insert(conn, sql, row, event)
            conn.execute("COMMIT")
        except BaseException as exc:
            self._rollback(conn)
            if isinstance(exc, sqlite3.Error):
                if _error_code(exc) & 0xFF in _BUSY_CODES:
                    raise _BusyError from exc
                raise _storage_error(exc, "writing an event group") from exc
            raise
        self._ready_tables.update(created)

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except BaseException:
            # Never leave a transaction open on a connection others will use.
            self._discard_connection()
            raise

    async def push_event_group(
        self, grouped_events: Sequence[GroupedEvent], *, force: bool = False
    ) -> list[Event]:
        """Store the group in one ``BEGIN IMMEDIATE`` transaction: all events or none.

        Each event goes to its own store id and its own adapter's table; every adapter must
        be a ``SQLiteEventStorageAdapter`` on the same database file as this one.

        Raises:
            EventGroupError: A grouped event uses another kind of adapter, another database
                or lacks its context; nothing is written.
            EventAlreadyExistsError: A version is taken (or repeated in the group); nothing
                is written.
            StorageUnavailableError: The database stayed locked past ``busy_timeout``.
            StorageError: Another SQLite failure; nothing is written.
        """
        if not grouped_events:
            raise EventGroupError("An event group needs at least one grouped event")
        rows: list[tuple[Statements, str, tuple[Any, ...], Event]] = []
        stored: list[Event] = []
        stamp = utc_now()  # of every event without a timestamp
        synchronous: Synchronous = self._synchronous  # the strictest of the members' adapters
        for index, grouped in enumerate(grouped_events):
            adapter = grouped.event_storage_adapter
            if not isinstance(adapter, SQLiteEventStorageAdapter):
                raise EventGroupError(
                    f"Event group event #{index} is not connected to a SQLiteEventStorageAdapter"
                )
            if not self._same_database(adapter):
                which = (
                    f"({adapter.path!r}, private to each adapter)"
                    if adapter.path == self.path
                    else f"({adapter.path!r}, not {self.path!r})"
                )
                raise EventGroupError(
                    f"Event group event #{index} is connected to a SQLite adapter on another "
                    f"database {which}; a group is one transaction on one database"
                )
            if grouped.context is None:
                raise EventGroupError(f"Event group event #{index} misses context")
            event = stamped(grouped.event, stamp)
            row = self._row(event, grouped.context.event_store_id)
            rows.append((adapter._sql, adapter._table, row, event))
            stored.append(event)
            if adapter._synchronous == "FULL":
                synchronous = "FULL"
        await self._run(self._push_group_sync, rows, force, synchronous)
        return stored

    # -- reading ---------------------------------------------------------------------------

    def _query_sync(self, sql: str, params: tuple[Any, ...], *, slice_: bool = False) -> list[Any]:
        """Run a query; for a read's slice (``slice_``), a text too long is ``_TooBigError``."""
        conn = self._connection()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            code = _error_code(exc) & 0xFF
            if code in _BUSY_CODES:
                raise _BusyError from exc
            if code == sqlite3.SQLITE_TOOBIG and slice_:
                raise _TooBigError from exc
            if slice_ and _not_json(exc):
                raise _NotJsonError from exc
            raise _storage_error(exc, "reading events") from exc

    def _slice_sync(self, read: LongRead) -> str:
        """Read the next slice of ``read`` (its events' JSON array) and move past it.

        Raises:
            _TooBigError: The slice's text is longer than SQLite's longest string (1 GB by
                default: a thousand events of a megabyte); ``read`` now takes smaller slices.
            StorageError: One event alone is longer than that.
            StoredEventValidationError: A row holds text that SQLite does not read as JSON.
        """
        params = read.next_params()
        try:
            ((text, count, last),) = self._query_sync(read.sql, params, slice_=True)
        except _NotJsonError as exc:
            version = self._not_json_version_sync(read, params)
            raise StoredEventValidationError(*read.key, version) from exc.__cause__
        except _TooBigError as exc:
            if read.slice == 1:
                raise StorageError(
                    f"an event of aggregate {read.key[1]!r} is longer than SQLite's longest"
                    " string (SQLITE_LIMIT_LENGTH) as JSON: it cannot be read back"
                ) from exc.__cause__
            read.slice = max(1, read.slice // 10)
            raise
        read.advance(count, last)
        return str(text)

    def _not_json_version_sync(self, read: LongRead, params: tuple[Any, ...]) -> int | None:
        """The version of the slice's first row whose text SQLite does not read as JSON.

        Only run once the slice's statement (``params``) failed on such text: each of its
        rows is tried on its own. ``None`` if none fails now or the search itself fails.
        """
        conn = self._connection()
        try:
            versions = [version for (version,) in conn.execute(read.versions_sql, params)]
        except sqlite3.Error:
            return None
        for version in versions:
            try:
                conn.execute(self._sql.parses, (*read.key, version)).fetchall()
            except sqlite3.Error as exc:
                return version if _not_json(exc) else None
        return None

    def _next_slice_sync(self, read: LongRead) -> str:
        """``_slice_sync``, in smaller slices when a slice is too long (in a transaction)."""
        while True:
            with contextlib.suppress(_TooBigError):
                return self._slice_sync(read)

    def _first_slice_sync(self, read: LongRead, long: bool) -> str:
        """Read the first slice of events; a ``long`` read with more to come keeps the lock.

        A long read runs in one read transaction, so all its slices see the same events.
        When more slices follow, the transaction stays open and the lock stays taken: the
        worker thread that reads them ends both (``_end_long_read``).
        """
        # (A read retried after its slices became smaller is long: see below.)
        if not long and read.slice == SLICE:
            try:
                return self._slice_sync(read)
            except _TooBigError:
                pass  # in smaller slices, which one transaction keeps consistent
        conn = self._connection()
        conn.execute("BEGIN")
        try:
            text = self._next_slice_sync(read)
            if read.done:
                conn.execute("COMMIT")
        except BaseException:
            self._rollback(conn)
            raise
        self._keep_lock = not read.done
        return text

    def _end_long_read(self) -> None:
        """End a long read's transaction (it only read: nothing to keep) and free the lock."""
        try:
            if self._conn is not None:
                self._rollback(self._conn)
        finally:
            self._lock.release()

    def _read_rest_sync(
        self, read: LongRead, deliver: Callable[[str | BaseException | None], None]
    ) -> None:
        """Read a long read's other slices on a worker thread, then end it and free the lock."""
        outcome: BaseException | None = None
        try:
            while not read.done and not read.abandoned:
                deliver(self._next_slice_sync(read))
        except _BusyError as busy:
            outcome = StorageUnavailableError(
                f"SQLite database {self._database!r} was locked in the middle of a long read"
            )
            outcome.__cause__ = busy.__cause__
        except BaseException as exc:  # handed to the reading task, which raises it
            outcome = exc
        finally:
            try:
                self._end_long_read()
            except BaseException as exc:
                outcome = outcome or exc
            finally:
                deliver(outcome)

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

        Raises:
            StoredEventValidationError: A stored event does not validate against the store's
                event types.
            StorageUnavailableError: The database stayed locked past ``busy_timeout``.
            StorageError: Another SQLite failure.
            TypeError, ValueError: A bound or the limit is not ``None`` or an int >= 0.
        """
        check_read_options(min_version, max_version, limit)
        if limit == 0 or not isinstance(aggregate_id, str) or not utf8_encodable(aggregate_id):
            return []  # (no aggregate with a lone surrogate in its id can be stored)
        # Bounds past SQLite's 64-bit integers cannot be bound; no stored version is there.
        if min_version is not None and min_version > MAX_INTEGER:
            return []
        if max_version is not None and max_version > MAX_INTEGER:
            max_version = None
        if limit is not None and limit > MAX_INTEGER:
            limit = None
        read = LongRead(
            self._sql,
            (context.event_store_id, aggregate_id),
            min_version,
            max_version,
            limit,
            reverse=bool(reverse),
        )
        text = await self._run(self._first_slice_sync, read, limit is None or limit > SLICE)
        if text == "[]":
            return []
        if read.done:
            return context.parse_events_json(text)
        return await self._read_rest(read, context, text)

    async def _read_rest(
        self, read: LongRead, context: EventStoreContext, first: str
    ) -> list[Event]:
        """Validate a long read's slices, from ``first``, while a worker fetches the next ones.

        SQLite builds a slice's JSON with the GIL released, so fetching slice *n + 1*
        overlaps validating slice *n*. Called with the lock taken and a read transaction
        open; the worker ends both, also when this task is cancelled or fails.
        """
        loop = asyncio.get_running_loop()
        slices: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

        def deliver(item: str | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is reading
                loop.call_soon_threadsafe(slices.put_nowait, item)

        try:
            # A thread of its own (starting one costs ~0.1 ms, against milliseconds of
            # reading): unlike a pool's, it cannot be lost by a fork or queued behind others.
            threading.Thread(
                target=self._read_rest_sync,
                args=(read, deliver),
                name="castore-sqlite-read",
                daemon=True,
            ).start()
        except BaseException:  # no thread (the interpreter is shutting down): end it here
            self._end_long_read()
            raise
        try:
            events = context.parse_events_json(first)
            while (item := await slices.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                events += context.parse_events_json(item)
        finally:
            read.abandoned = True
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
        """List aggregates with a version-1 event, paged (see ``ListingOptions``).

        Raises:
            InvalidPageTokenError: ``page_token`` is malformed.
            StorageUnavailableError: The database stayed locked past ``busy_timeout``.
            StorageError: Another SQLite failure.
        """
        options = ListingOptions.resolve(
            limit=limit,
            page_token=page_token,
            initial_event_after=initial_event_after,
            initial_event_before=initial_event_before,
            reverse=reverse,
        )
        if options.lists_nothing:
            return ListAggregateIdsResult(aggregate_ids=[])
        sql = [self._sql.list_base]
        params: list[Any] = [context.event_store_id]
        if options.initial_event_after is not None:  # already whole UTC milliseconds
            sql.append("AND timestamp >= ?")
            params.append(timestamp_text(options.initial_event_after))
        if options.initial_event_before is not None:
            sql.append("AND timestamp <= ?")
            params.append(timestamp_text(options.initial_event_before))
        cursor = options.cursor
        if cursor is not None and not self._cursor_clause(cursor, options.reverse, sql, params):
            return ListAggregateIdsResult(aggregate_ids=[])
        sql.append(
            "ORDER BY timestamp DESC, aggregate_id DESC"
            if options.reverse
            else "ORDER BY timestamp, aggregate_id"
        )
        if options.limit is not None:
            sql.append("LIMIT ?")
            params.append(min(options.limit + 1, MAX_INTEGER))
        rows = await self._run(self._query_sync, " ".join(sql), tuple(params))
        entries = []
        for aggregate_id, text in rows:
            try:
                stamp = datetime.fromisoformat(text)  # as this adapter writes them
            except (TypeError, ValueError):
                stamp = None
            if stamp is None or needs_normalizing(stamp):
                stamp = _listed_timestamp(text, context.event_store_id, aggregate_id)
            entries.append(AggregateIdEntry(aggregate_id, stamp))
        return options.finish(entries)

    async def _unlisted_aggregate_ids(self, context: EventStoreContext) -> list[str]:
        """Aggregates without a version-1 event, which listing leaves out (by id).

        For ``castore export``, which exports every event.

        Raises:
            StorageUnavailableError: The database stayed locked past ``busy_timeout``.
            StorageError: Another SQLite failure.
        """
        rows = await self._run(self._query_sync, self._sql.unlisted, (context.event_store_id,))
        return [aggregate_id for (aggregate_id,) in rows]

    @staticmethod
    def _cursor_clause(
        cursor: AggregateIdEntry, reverse: bool, sql: list[str], params: list[Any]
    ) -> bool:
        """Keep only entries after the cursor in listing order; false if none can be."""
        stamp = cursor.initial_event_timestamp
        if not stamp.microsecond % 1000:
            sql.append(
                "AND (timestamp, aggregate_id) < (?, ?)"
                if reverse
                else "AND (timestamp, aggregate_id) > (?, ?)"
            )
            params.extend((timestamp_text(stamp), cursor.aggregate_id))
            return True
        # Stored timestamps are whole milliseconds, so none equals a finer cursor.
        if reverse:
            sql.append("AND timestamp <= ?")
            params.append(timestamp_text(stamp))
            return True
        after, none_reach = lower_bound(stamp)
        if after is None:
            return not none_reach
        sql.append("AND timestamp >= ?")
        params.append(timestamp_text(after))
        return True
