"""Connections of the PostgreSQL adapter: its pool, its secrets and its errors.

Settings keep the password out of every message; ``Connections`` opens the pool after one
connection succeeded, keeps its connections in autocommit with one cursor each, returns them
safely, and closes the pool once the operations in progress ended; ``translate`` turns
driver errors into the library's errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import time
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from castore_pydantic.errors import (
    CastoreError,
    EventLimitExceededError,
    StorageError,
    StorageUnavailableError,
)
from castore_pydantic.storage import _postgres_wait as wait
from castore_pydantic.storage._postgres_connect import Attempts, Failure, try_connect

__all__ = ["AsyncConnection", "Connections", "Settings", "translate", "tuple_cursor"]

AsyncConnection = psycopg.AsyncConnection[Any]
_IDLE = TransactionStatus.IDLE
_IN_TRANSACTION = (TransactionStatus.INTRANS, TransactionStatus.INERROR)
#: Seconds an owned pool's connection may stay with the adapter before it goes back to the
#: pool (which then applies its ``max_lifetime`` and replaces connections that are too old).
_KEEP_SECONDS = 30.0
#: Seconds a kept connection may stay unused before it goes back to the pool, where code
#: using ``adapter.pool`` directly may be waiting for it.
_IDLE_SECONDS = 0.05
# What the adapter keeps on each connection (freed with it): its cursor, and when an owned
# pool's connection was taken from the pool.
_CURSOR = "_castore_cursor"
_TAKEN_AT = "_castore_taken_at"
#: Where ``_postgres_direct`` keeps a connection's prepared statement names.
SESSION = "_castore_direct_session"
#: How many changes of events tables (``create_event_table``, ``drop_event_table``) a
#: connection's prepared statements have seen, against ``_TABLE_CHANGES``.
_TABLES_SEEN = "_castore_tables_seen"
#: Changes of events tables made by this process. A statement prepared before a table was
#: made again with another aggregate id type keeps the old parameter type: on a text table,
#: an INSERT prepared for uuid would quietly rewrite upper-case UUIDs and refuse other ids.
_TABLE_CHANGES = [0]
_DEALLOCATIONS = [0]
_T = TypeVar("_T")


def tuple_cursor(conn: AsyncConnection) -> psycopg.AsyncCursor[tuple[Any, ...]]:
    """A new cursor of psycopg's own class on ``conn``, giving rows as tuples.

    What ``conn.cursor()`` and ``conn.execute()`` make follows the connection's
    ``cursor_factory`` and ``row_factory``, which a borrowed pool may set (``dict_row``, a raw
    cursor taking ``$1`` placeholders): the adapter's statements expect neither.
    """
    return psycopg.AsyncCursor(conn, row_factory=tuple_row)


def tables_changed() -> None:
    """Say that an events table was made or dropped: connections prepare afresh."""
    _TABLE_CHANGES[0] += 1


#: A fragment of a connection string libpq quotes in its error messages.
_QUOTED = re.compile(r'"[^"]*"')


#: The environment variables libpq reads for parameters a connection string leaves out.
_ENVIRONMENT = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "service": "PGSERVICE",
}


def _param(params: Mapping[str, Any], *names: str, environment: bool = True) -> str:
    """The first of ``names`` the parameters (or libpq's environment variables) set, or ""."""
    for name in names:
        value = params.get(name) or (environment and os.environ.get(_ENVIRONMENT[name]))
        if value:
            return str(value)
    return ""


def _url_password(conninfo: str) -> set[str]:
    """The password of a URI, found without a parser that could fail on it."""
    head, sep, _ = conninfo.partition("@")
    if not sep or "://" not in head:
        return set()
    _, _, credentials = head.partition("://")
    _, colon, password = credentials.partition(":")
    return {password} - {""} if colon else set()


_AT_IN_CREDENTIALS = (
    "invalid PostgreSQL connection string: the user, password or query hold an '@' that is "
    "not URL-encoded; write it as %40"
)
_MISREAD_AS_DATABASE = (
    "invalid PostgreSQL connection string: it reads as a user or password holding a '/' or "
    "'@' that is not URL-encoded (libpq would take part of it for the host, port and "
    "database name), or as a database name holding an '@'; write each such '/' as %2F and "
    "'@' as %40"
)
#: The digits of a port, or none (libpq then uses its default).
_PORT = re.compile(r"[0-9]*")
#: Where libpq's host list ends: the first ``/`` or ``?`` outside ``[...]`` (IPv6).
_HOSTS_END = re.compile(r"(?:\[[^\]]*\]?|[^/?\[])*")


def _ports(hosts: str) -> list[str]:
    """The ports of a URI's host list, as libpq splits it."""
    ports = []
    for host in hosts.split(","):
        after = host.rpartition("]")[2] if host.startswith("[") else host
        _, colon, port = after.partition(":")
        if colon:
            ports.append(port)
    return ports


def _misread(conninfo: str) -> str | None:
    """Why libpq could read part of a URI's user or password as its host, port or database.

    libpq takes the credentials to end at the first ``@`` that comes before any ``/``. The
    host list then runs to the first ``/`` or ``?`` (outside ``[...]``), and the database
    name to the next ``?``. A password (or user) holding an unencoded ``@`` or ``/`` is cut
    there, and the rest of it becomes a host, a port or part of the database name, which
    ``repr()`` and errors show. Such a URI is refused when its text allows that reading:

    - a user holding a ``?`` (an ``@`` in a query with no path before it);
    - an ``@`` in the host list, or a port that is not a number (libpq could not connect
      there anyway);
    - an ``@`` in the database name, when a ``:`` might have started a password before it
      (libpq found a password; or no credentials but a port, as in ``user:1234/abc@...``;
      or a ``:`` in the database name, as in ``us/er:password@...``), or when a host and
      path seem to follow it (a ``/`` after it).

    Any other ``@`` in the database name (``postgresql://host/team@prod``,
    ``postgresql://user@host:5432/team@prod``) and every ``@`` in the query are read as
    written.

    Returns:
        The message of the ``ValueError`` to raise, or ``None``: libpq reads it as written.
    """
    scheme, sep, rest = conninfo.partition("://")
    if not sep or scheme.lower() not in ("postgresql", "postgres") or "@" not in rest:
        return None
    at, slash = rest.find("@"), rest.find("/")
    if at != -1 and (slash == -1 or at < slash):
        credentials, after = rest[:at], rest[at + 1 :]
    else:
        credentials, after = None, rest
    user, colon, _ = (credentials or "").partition(":")
    if "?" in user:
        return _AT_IN_CREDENTIALS
    hosts_end = _HOSTS_END.match(after)
    assert hosts_end is not None  # it matches the empty string
    hosts, tail = after[: hosts_end.end()], after[hosts_end.end() :]
    if "@" in hosts:
        return _AT_IN_CREDENTIALS
    ports = _ports(hosts)
    if any(not _PORT.fullmatch(port) for port in ports):
        return _MISREAD_AS_DATABASE
    database = tail[1:].split("?", 1)[0] if tail.startswith("/") else ""
    _, at_sign, after_at = database.partition("@")
    if at_sign and (colon or (credentials is None and ports) or ":" in database or "/" in after_at):
        return _MISREAD_AS_DATABASE
    return None


def _refuse_misread(conninfo: str) -> None:
    """Refuse a URI whose password libpq could read, in part, as the host or database.

    Those show in ``repr()`` and errors, where the password never may.

    Raises:
        ValueError: It holds an ``@`` or ``/`` that is not URL-encoded where libpq could
            misread it (the message names the fix, never the password).
    """
    message = _misread(conninfo)
    if message is not None:
        raise ValueError(message)


def _message(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    primary = diag.message_primary if diag is not None else None
    return primary or str(exc).strip() or type(exc).__name__


@dataclass(frozen=True, slots=True)
class Settings:
    """What the adapter may say about its connection, and what it must never say.

    Attributes:
        secrets: The password, as given and URL-encoded (never shown).
        database: ``(host, port, dbname, service)``: adapters with equal ones share a
            database (a service file may name another for each service). ``None`` when
            unknown (a borrowed pool's conninfo is a callable).
        session: ``(user, options)``: with ``database``, what decides how the server
            resolves a table name without a schema (the role's and the options'
            ``search_path``).
        describe: ``host=... port=... dbname=... user=...`` for messages and ``repr()``.
    """

    secrets: tuple[str, ...]
    database: tuple[str, str, str, str] | None
    session: tuple[str, str]
    describe: str
    #: The ``client_encoding`` the connection string or keywords set (upper case), or "".
    chooses_encoding: str = ""

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Settings:
        """Settings from parsed connection parameters."""
        password = str(params.get("password") or "")
        service = _param(params, "service")
        # What libpq connects to: hostaddr when given, else host. What the string leaves out
        # comes from a service's file first, then from the environment (PGHOST...): with a
        # service, only what the string itself says is compared, beside the service's name.
        environment = not service
        return cls(
            secrets=tuple({password, quote(password, safe="")} - {""}),
            database=(
                _param(params, "hostaddr", "host", environment=environment),
                _param(params, "port", environment=environment) or "5432",
                _param(params, "dbname", "user", environment=environment),
                service,
            ),
            session=(str(params.get("user") or ""), str(params.get("options") or "")),
            chooses_encoding=str(params.get("client_encoding") or "").upper().replace("-", "_"),
            describe=" ".join(
                f"{key}={params[key]}"
                for key in ("service", "host", "hostaddr", "port", "dbname", "user")
                if params.get(key)
            ),
        )

    @classmethod
    def parse(cls, conninfo: str, kwargs: Mapping[str, Any]) -> Settings:
        """Parse a connection string (and keyword parameters) up front.

        Raises:
            ValueError: libpq cannot parse it; the message never holds the password.
        """
        _refuse_misread(conninfo)
        try:
            return cls.of(conninfo_to_dict(conninfo, **kwargs))
        except psycopg.Error as exc:
            # libpq may echo the string it could not parse, password included.
            text = str(exc)
            url_password = _url_password(conninfo)
            for secret in ({str(kwargs.get("password") or "")} | url_password) - {""}:
                text = text.replace(secret, "***")
            if url_password or "password" in conninfo.lower():
                # A password in a query or a key=value string may be quoted in part
                # (``missing "=" after "..."``): libpq's quotes are left out.
                text = _QUOTED.sub('"***"', text)
            raise ValueError(f"invalid PostgreSQL connection string: {text}") from None

    @classmethod
    def of_pool(cls, pool: AsyncConnectionPool[Any]) -> Settings:
        """Settings of a borrowed pool (its database unknown when its conninfo is computed).

        Raises:
            ValueError: Its conninfo is a URI whose password libpq would misread.
        """
        if isinstance(pool.conninfo, str):
            _refuse_misread(pool.conninfo)
        if isinstance(pool.conninfo, str) and isinstance(pool.kwargs, Mapping):
            try:
                return cls.of(conninfo_to_dict(pool.conninfo, **pool.kwargs))
            except psycopg.Error:
                pass
        return cls(secrets=(), database=None, session=("", ""), describe="")

    def redact(self, text: str) -> str:
        """``text`` with the password replaced by ``***``."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def cause(self, exc: BaseException) -> BaseException | None:
        """``exc``, or ``None`` when its text (or its causes') would reveal the password."""
        if not self.secrets:
            return exc
        seen: BaseException | None = exc
        while seen is not None:
            if any(secret in str(seen) for secret in self.secrets):
                return None
            seen = seen.__cause__ or seen.__context__
        return exc


def translate(  # noqa: PLR0911 - a flat dispatch on the error's type
    exc: BaseException,
    *,
    where: str,
    settings: Settings,
    timeout: float,
    event_store_id: str | None = None,
    lost_write: bool = False,
) -> CastoreError:
    """The library's error for a driver or pool error raised ``where`` (a phrase).

    ``lost_write`` says that the connection broke after a write was sent: the server may have
    committed it before the connection went, and the caller must be told so.
    """
    text = settings.redact(_message(exc))
    if isinstance(exc, PoolTimeout):
        return StorageUnavailableError(
            f"{where}: no PostgreSQL connection available within {timeout}s"
        )
    if isinstance(exc, PoolClosed):
        return StorageError(
            f"{where}: {text} (the adapter was closed, or its borrowed pool is not open yet)"
        )
    if isinstance(exc, pg_errors.ProgramLimitExceeded):
        # One of PostgreSQL's own limits (an index row of 8 kB, a value of 1 GB): psycopg
        # files it under OperationalError, but no retry can pass it.
        if event_store_id is not None:
            return EventLimitExceededError(
                event_store_id, f"PostgreSQL cannot hold a value of the event ({text})"
            )
        return StorageError(f"{where}: {text} (a limit of PostgreSQL's: retrying cannot help)")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        outcome = (
            "; the connection was lost after the write was sent, so its outcome is unknown: "
            "read the aggregate before retrying (a retry of a stored version raises "
            "EventAlreadyExistsError)"
            if lost_write
            else ""
        )
        return StorageUnavailableError(
            f"{where}: PostgreSQL is unavailable ({text}){outcome}", outcome_unknown=lost_write
        )
    if isinstance(exc, pg_errors.UndefinedTable):
        # The server names the table: in a group, it may be another member's.
        return StorageError(
            f"{where}: the table does not exist ({text}); create it with "
            "await adapter.create_event_table() on its adapter"
        )
    if isinstance(exc, psycopg.DataError) and event_store_id is not None:
        return EventLimitExceededError(
            event_store_id, f"PostgreSQL refused a value of the event ({text})"
        )
    return StorageError(f"{where}: {text}")


def _closed_by_server(conn: AsyncConnection) -> bool:
    """Whether an idle connection's socket has something to read (the server said goodbye)."""
    if conn.closed:
        return True
    try:
        fileno = conn.pgconn.socket
        if hasattr(select, "poll"):  # select() cannot watch descriptors past 1023
            poller = select.poll()
            poller.register(fileno, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fileno], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


class Connections:
    """The adapter's pool: opened on first use, autocommit, one cursor per connection.

    With an owned pool, a released connection that is idle and healthy stays with the adapter
    for its next operation instead of going back to the pool: taking a connection from the
    pool and giving it back costs a third of the client time of a small INSERT. It goes back
    to the pool when an operation of the adapter is waiting there, when it was not used for
    ``_IDLE_SECONDS``, when it was taken ``_KEEP_SECONDS`` ago, when it is not idle or broken,
    and when the adapter closes. A borrowed pool may have checks and resets of its own, so
    every connection goes straight back to it.

    An owned pool is opened once a connection made outside it succeeded (``try_connect``): a
    configuration no retry can fix (a database that does not exist, a password the server
    refuses) is then told at once, where the pool would retry it until the timeout. That
    connection becomes the pool's first (``Attempts.spare``), not one more; with
    ``min_size=0``, ``open`` closes it instead (no connection is to stay open unused), while
    ``open_once`` and the first operation keep it for the work that follows. Closing refuses
    new operations at once, stops ``open`` trying, and closes the pool once the operations
    in progress (those waiting for a connection included) have ended.

    Args:
        pool: The pool.
        owned: Whether the adapter made it (then it opens and closes it).
        settings: What may be said about the connection.
        name: The adapter's description, for "is closed" errors.
        attempts: Where an owned pool's connection class records its attempts.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConnection],
        *,
        owned: bool,
        settings: Settings,
        name: str,
        attempts: Attempts | None = None,
    ) -> None:
        self.pool = pool
        self.owned = owned
        self.settings = settings
        self._name = name
        self._attempts = attempts
        self._opened = False
        self._closed = False
        # Opening an owned pool (its first connection, then the pool) runs once at a time.
        self._opening = asyncio.Lock()
        # Operations between ``acquire`` and ``release`` (waiting for a connection too), and
        # the task closing the pool once they have ended (``close``).
        self._active = 0
        self._drained: asyncio.Future[None] | None = None
        self._shutdown: asyncio.Task[None] | None = None
        self._shut_down = False
        # What ``open`` waits for while it tries to connect: ``close`` ends those waits.
        self._close_waiters: set[asyncio.Future[None]] = set()
        self._switched: set[int] = set()
        # Owned pools only: idle connections kept for the next operation with the time each
        # was released (the most recent last), how many operations wait for the pool, the
        # timer returning unused ones and those returns.
        self._kept: list[tuple[AsyncConnection, float]] = []
        self._waiting = 0
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_loop: asyncio.AbstractEventLoop | None = None
        self._returns: set[asyncio.Task[None]] = set()

    async def open(self, where: str) -> None:
        """Open an owned pool once PostgreSQL accepted a connection (idempotent).

        Connections that fail for a while (the server is down or full) are retried until
        the pool's timeout; a configuration no retry can fix fails at once. ``close``
        stops the retries at once.

        Raises:
            StorageError: The adapter is closed (also while this tries), or PostgreSQL
                refuses the connection in a way retrying cannot fix (the message says why).
            StorageUnavailableError: No connection within the pool's timeout (with the
                reason).
        """
        if self._closed:
            raise StorageError(f"{self._name} is closed")
        if not self._opened:
            await self._open(where, wait=True)
            if self.pool.min_size == 0 and self._attempts is not None:
                # No connection is to stay open unused: the pool makes one when needed.
                await self._attempts.discard_spare()

    async def open_once(self, seconds: float | None) -> Failure | None:
        """Open an owned pool if one connection attempt succeeds; never try again.

        For a caller that decides itself what a failure means (the command line): the one
        attempt is libpq's (every host of the connection string, each within its
        ``connect_timeout``), bounded by ``seconds`` (``None``: by ``connect_timeout``
        alone). The pool opens only after it succeeded, with that connection as its first.

        Returns:
            ``None`` once the pool is open (a borrowed or already open pool: at once), or
            why the attempt failed (nothing is open then).

        Raises:
            StorageError: The adapter is closed (also while this tries).
        """
        if self._closed:
            raise StorageError(f"{self._name} is closed")
        if not self.owned:
            self._opened = True
            return None
        async with self._opening, self._spare_discarded_unless_opened():
            if self._opened:
                return None
            failure = await self._unless_closed(self._try_connect(seconds))
            if failure is not None:
                return failure
            await self._open_pool()
        return None

    @contextlib.asynccontextmanager
    async def _spare_discarded_unless_opened(self) -> AsyncIterator[None]:
        """Close the connection ``try_connect`` made if the pool did not open after all.

        A cancellation (a timeout around ``async with adapter``) or an error between a
        successful connection and the pool's opening would leave it open, with nothing to
        use or close it until ``aclose``.
        """
        try:
            yield
        except BaseException:
            if not self._opened and self._attempts is not None:
                await self._attempts.discard_spare()  # closing it does not wait
            raise

    async def _try_connect(self, seconds: float | None) -> Failure | None:
        """``try_connect`` for this owned pool (its connection becomes the pool's)."""
        assert self._attempts is not None  # an owned pool has them
        return await try_connect(self.pool, self.settings.redact, seconds, self._attempts)

    async def _open_pool(self) -> None:
        """Open the owned pool after a connection succeeded (``_opening`` held).

        Raises:
            StorageError: The adapter was closed meanwhile.
        """
        if self._shut_down:  # no pool may open after its close
            if self._attempts is not None:
                await self._attempts.discard_spare()
            raise StorageError(f"{self._name} is closed")
        await self.pool.open()
        self._opened = True

    async def _open(self, where: str, *, wait: bool) -> tuple[float, Failure | None]:
        """Open the pool, after connecting once outside it (an owned pool's).

        Every attempt keeps to what is left of the pool's timeout. Without ``wait``, a
        failure that may pass opens the pool anyway: the caller (an operation, which
        ``close`` lets finish) then waits for the pool's connection, which retries, for the
        time left. With ``wait``, ``close`` ends the retries.

        Returns:
            The seconds spent connecting, and why connecting failed without ``wait``.
        """
        if not self.owned:
            self._opened = True
            return 0.0, None
        started = time.monotonic()
        async with self._opening, self._spare_discarded_unless_opened():
            if self._opened:
                return time.monotonic() - started, None
            timeout = self.pool.timeout
            pause = 0.05
            told: Failure | None = None  # the last failure that says why
            while True:
                left = max(timeout - (time.monotonic() - started), 0.001)
                attempt = self._try_connect(left)
                failure = await (self._unless_closed(attempt) if wait else attempt)
                if failure is None or not (failure.lasting or wait):
                    break
                if failure.lasting:
                    raise self._refused(where, failure)
                if not failure.cut_short or told is None:
                    told = failure
                waited = time.monotonic() - started
                if waited >= timeout:
                    raise StorageUnavailableError(
                        f"{where}: no PostgreSQL connection available within {waited:.1f}s "
                        f"because connecting fails: {told.reason}"
                    )
                # The last attempt at the timeout.
                await self._unless_closed(asyncio.sleep(min(pause, timeout - waited)))
                pause = min(pause * 2, 1.0)
            await self._open_pool()
        return time.monotonic() - started, failure

    async def _unless_closed(self, work: Coroutine[Any, Any, _T]) -> _T:
        """The result of ``work``, unless ``close`` is called first (``work`` is then cancelled).

        Raises:
            StorageError: The adapter is closed.
        """
        task = asyncio.ensure_future(work)
        closing = asyncio.get_running_loop().create_future()
        self._close_waiters.add(closing)
        try:
            if not self._closed:
                await asyncio.wait((task, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._close_waiters.discard(closing)
            task.cancel()  # nothing, once it is done
        if self._closed:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the close is what the caller hears
            raise StorageError(f"{self._name} is closed")
        return task.result()

    @staticmethod
    def _refused(where: str, failure: Failure) -> StorageError:
        return StorageError(
            f"{where}: PostgreSQL refuses the connection ({failure.reason}); retrying cannot "
            "help: check the connection string, or the database, role and password it names"
        )

    async def close(self) -> None:
        """Refuse new operations, and close an owned pool once those in progress ended.

        Idempotent. Interrupted while it waits (a cancelled caller), the pool is still
        closed when the operations end: a task does it all, from the start.
        """
        self._closed = True
        for waiter in self._close_waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self._shutdown is None:
            if self._sweep is not None:
                self._sweep.cancel()
            kept, self._kept = self._kept, []
            for conn, _ in kept:
                wait.forget(conn)
            self._shutdown = asyncio.get_running_loop().create_task(self._shut(kept))
        await asyncio.shield(self._shutdown)

    async def _shut(self, kept: list[tuple[AsyncConnection, float]]) -> None:
        """Hand the ``kept`` connections back, let the operations in progress end, close."""
        # Idle: the operations still waiting for a connection may take them from the pool.
        for conn, _ in kept:
            await self.pool.putconn(conn)
        if self._active:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self._returns:
            await asyncio.gather(*self._returns, return_exceptions=True)
        async with self._opening:  # an opening in progress ends first
            self._shut_down = True
            if self.owned:
                await self.pool.close()
            if self._attempts is not None:
                await self._attempts.discard_spare()

    def _ended(self) -> None:
        """One operation ended: the last one lets a waiting ``close`` go on."""
        self._active -= 1
        drained = self._drained
        if not self._active and drained is not None and not drained.done():
            drained.set_result(None)

    def error(self, exc: BaseException, where: str, **options: Any) -> CastoreError:
        """``translate`` with this pool's settings."""
        return translate(
            exc, where=where, settings=self.settings, timeout=self.pool.timeout, **options
        )

    async def acquire(self, where: str) -> AsyncConnection:
        """A connection in autocommit mode for one operation; give it back with ``release``.

        The operation counts as in progress from here until ``release`` (or until this
        fails): ``close`` waits for it.

        Raises:
            StorageError: The adapter or a borrowed pool is closed, or PostgreSQL refuses
                the connection in a way retrying cannot fix.
            StorageUnavailableError: No connection within the pool's timeout (with the
                reason when connecting fails).
        """
        if self._closed:
            raise StorageError(f"{self._name} is closed")
        self._active += 1
        try:
            conn = await self._acquire(where)
            seen = conn.__dict__.get(_TABLES_SEEN)
            if seen != _TABLE_CHANGES[0]:
                if seen is None or conn.prepare_threshold is None:
                    # A new connection, or one that prepares nothing: nothing to forget.
                    setattr(conn, _TABLES_SEEN, _TABLE_CHANGES[0])
                    return conn
                async with self._given_back_on_failure(conn, where):
                    await self.forget_prepared(conn)
        except BaseException:
            self._ended()
            raise
        return conn

    async def _acquire(self, where: str) -> AsyncConnection:
        """``acquire``, before the prepared statements are checked."""
        spent, failed = 0.0, None
        if not self._opened:
            spent, failed = await self._open(where, wait=False)
        kept = self._kept
        while kept:
            conn, _ = kept.pop()
            if not conn.closed and not wait.stirred(conn):
                return conn
            # Closed, or the server spoke while it was kept (a goodbye, as a rule; its end
            # may still be on the way): the pool replaces it.
            wait.forget(conn)
            await conn.close()
            await asyncio.shield(self.pool.putconn(conn))
        self._waiting += 1
        try:
            conn = await self._getconn(max(self.pool.timeout - spent, 0.001))
        except PoolTimeout as exc:
            error = self.error(exc, where)
            # The pool's last attempt, else the adapter's own when it opened the pool now.
            failure = (self._attempts.failure if self._attempts else None) or failed
            if failure is not None:
                if failure.lasting:
                    error = self._refused(where, failure)
                else:
                    error = StorageUnavailableError(
                        f"{error} because connecting fails: {failure.reason}"
                    )
            raise error from self.settings.cause(exc)
        except (PoolClosed, psycopg.Error) as exc:
            raise self.error(exc, where) from self.settings.cause(exc)
        finally:
            self._waiting -= 1
        if self.owned:
            setattr(conn, _TAKEN_AT, time.monotonic())
        if not conn.autocommit:
            # Only a borrowed pool lends such connections; each write is one statement, so
            # autocommit is what makes it atomic without BEGIN/COMMIT round trips. Marked
            # first: psycopg switches the flag, then may suspend, where a cancellation can
            # land; the connection must then be switched back too.
            self._switched.add(id(conn))
            async with self._given_back_on_failure(conn, where, as_lent=True):
                await conn.set_autocommit(True)
        return conn

    @contextlib.asynccontextmanager
    async def _given_back_on_failure(
        self, conn: AsyncConnection, where: str, *, as_lent: bool = False
    ) -> AsyncIterator[None]:
        """Give back ``conn``, which the caller will not return, if the block fails.

        A psycopg error is then raised translated; anything else (a cancellation) goes on
        as it is. The connection is released, or with ``as_lent`` handed straight back to
        the pool as it was lent (``_hand_back``).
        """
        try:
            yield
        except BaseException as exc:
            if as_lent:
                wait.forget(conn)
                await self._hand_back(conn)
            else:
                await self._put_back(conn)
            if isinstance(exc, psycopg.Error):
                raise self.error(exc, where) from self.settings.cause(exc)
            raise

    async def forget_prepared(self, conn: AsyncConnection) -> None:
        """Drop the connection's prepared statements: psycopg's and the adapter's own.

        Through psycopg, which then forgets its own too; ``_postgres_direct`` prepares its
        statements again on their next use. (psycopg looks at the outcome of a statement
        the first time it sees its text only: each one here is told apart by a comment.)
        """
        seen = _TABLE_CHANGES[0]
        _DEALLOCATIONS[0] += 1
        await tuple_cursor(conn).execute(b"DEALLOCATE ALL /* %d */" % _DEALLOCATIONS[0])
        conn.__dict__.pop(SESSION, None)
        setattr(conn, _TABLES_SEEN, seen)

    async def _getconn(self, seconds: float) -> AsyncConnection:
        """A connection from the pool, skipping those the server has closed while they idled.

        A restarted server (or ``pg_terminate_backend``) ends every idle connection with a
        message and a close that wait unread in its socket; used, such a connection fails
        the statement as a lost connection, with an outcome that looks unknown. An idle
        connection has nothing to read, so one that does is closed and another is taken.
        """
        deadline = time.monotonic() + seconds
        for _ in range(self.pool.max_size):
            conn = await self.pool.getconn(seconds)
            if not _closed_by_server(conn):
                return conn
            await conn.close()
            await asyncio.shield(self.pool.putconn(conn))  # the pool replaces it
            seconds = max(deadline - time.monotonic(), 0.001)
        return await self.pool.getconn(seconds)

    def cursor(self, conn: AsyncConnection) -> psycopg.AsyncCursor[tuple[Any, ...]]:
        """The connection's ``tuple_cursor``, made once and kept on it (freed with it).

        A new cursor per call costs more client time than the rest of a small query.
        """
        cursor: psycopg.AsyncCursor[tuple[Any, ...]] | None = conn.__dict__.get(_CURSOR)
        if cursor is None or cursor.closed:
            cursor = tuple_cursor(conn)
            setattr(conn, _CURSOR, cursor)
        return cursor

    @property
    def kept(self) -> int:
        """Idle connections the adapter keeps out of the pool for its next operations."""
        return len(self._kept)

    async def release(self, conn: AsyncConnection) -> None:
        """Give a connection back (idle, or discarded by the pool if it is not).

        The operation that acquired it has ended.
        """
        try:
            await self._put_back(conn)
        finally:
            self._ended()

    async def _put_back(self, conn: AsyncConnection) -> None:
        """``release``, for a connection whose operation goes on or has been counted out."""
        if (
            self.owned
            and not self._waiting
            and not self._closed
            and not conn.broken
            and conn.pgconn.transaction_status == _IDLE
        ):
            now = time.monotonic()
            if now - conn.__dict__.get(_TAKEN_AT, 0.0) < _KEEP_SECONDS:
                wait.register_idle(conn)  # hears the server's goodbye while kept
                self._kept.append((conn, now))
                loop = asyncio.get_running_loop()
                if self._sweep is None or self._sweep_loop is not loop:
                    # (A timer left on a loop that has ended would never run.)
                    self._sweep_loop = loop
                    self._sweep = loop.call_later(_IDLE_SECONDS, self._return_unused)
                return
        wait.forget(conn)
        if self._switched and id(conn) in self._switched:
            await self._hand_back(conn)
        elif conn.pgconn.transaction_status == _IDLE:
            await self.pool.putconn(conn)
        else:
            # Rolling back or closing suspends: don't let a second cancellation lose it.
            await asyncio.shield(self.pool.putconn(conn))

    async def _hand_back(self, conn: AsyncConnection) -> None:
        """Give a borrowed connection back to its pool as it was lent: not in autocommit.

        A transaction the adapter left open (an interrupted long read or large group) is
        rolled back first: in autocommit, only the adapter opens one. Whatever interrupts
        this (a cancellation lands where psycopg suspends, after switching the flag), the
        connection reaches the pool, and the interruption then goes on. One that could not
        be switched back is closed, and the pool replaces it: the application never gets
        an autocommit connection from its own pool.
        """
        self._switched.discard(id(conn))
        interrupted: BaseException | None = None
        try:
            if conn.autocommit:
                if conn.pgconn.transaction_status in _IN_TRANSACTION:
                    await conn.rollback()
                if conn.pgconn.transaction_status == _IDLE:
                    await conn.set_autocommit(False)
        except psycopg.Error:
            pass  # closed below
        except BaseException as exc:
            interrupted = exc
        if conn.autocommit or conn.pgconn.transaction_status != _IDLE:
            conn.pgconn.finish()  # not as it was lent
        if interrupted is None and not conn.closed:
            await self.pool.putconn(conn)
        else:
            # Don't let a (second) cancellation lose it while the pool takes it back.
            await asyncio.shield(self.pool.putconn(conn))
        if interrupted is not None:
            raise interrupted

    def _return_unused(self) -> None:
        """Give the pool back the kept connections unused for ``_IDLE_SECONDS``."""
        self._sweep = None
        kept = self._kept
        cutoff = time.monotonic() - _IDLE_SECONDS
        unused = 0
        while unused < len(kept) and kept[unused][1] <= cutoff:
            unused += 1
        loop = asyncio.get_running_loop()
        for conn, _ in kept[:unused]:
            wait.forget(conn)
            task = loop.create_task(self.pool.putconn(conn))
            self._returns.add(task)
            task.add_done_callback(self._returns.discard)
        del kept[:unused]
        if kept:
            self._sweep = loop.call_later(_IDLE_SECONDS, self._return_unused)
