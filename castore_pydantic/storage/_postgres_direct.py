"""The adapter's frequent statements, sent through psycopg's libpq layer.

A push, a group that fits one statement and a read of an aggregate are one statement each
(long reads then stream the rest with ``stream``, or through a cursor with libpq older than
17). Through a psycopg cursor such a statement costs about 20 µs more client time than the
same statement sent with the connection's ``PGconn`` (psycopg's public ``psycopg.pq``
wrapper of libpq), spent in the cursor's general machinery: on a local server that is
several percent of a committed write, and most of what separates psycopg from the fastest
asyncio driver.
``execute`` sends such a statement as a prepared statement on the ``PGconn`` of a pooled
psycopg connection, with psycopg's own adaptation (``Transformer``) and error classes, and
waits on the socket with the event loop. ``stream`` does the same, unprepared, for a statement
whose rows are taken in batches as the server sends them (a long read): a psycopg cursor's
stream makes a Python row and an async-generator step per row, which cost more than the
row's validation. Every other statement goes through a cursor.

The connection belongs to the calling operation while the statement runs (it was taken from
the pool), and psycopg finds it idle before and after (or in the caller's transaction, for
the statements of a long read). A cancelled task's statement is cancelled on the server and
awaited, so the connection is idle again when the cancellation goes on; if that fails, or
the connection is lost, it is closed or left busy, and the adapter hands it back to the
pool, which discards it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.adapt import PyFormat, Transformer

from castore_pydantic.storage import _postgres_wait as wait
from castore_pydantic.storage._postgres_connection import SESSION as _SESSION
from castore_pydantic.storage._postgres_connection import AsyncConnection

__all__ = [
    "Result",
    "decoded",
    "encoding_errors",
    "execute",
    "numbered",
    "stream",
    "unencodable",
    "unencodable_name",
]

Result = pq.abc.PGresult

logger = logging.getLogger(__name__)

_DONE = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)
_CHUNK = pq.ExecStatus.TUPLES_CHUNK
_ACTIVE = pq.TransactionStatus.ACTIVE
_INTERRUPTED = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)
#: Seconds to wait for the server to end a statement cancelled by an interruption.
_CANCEL_SECONDS = 5.0
_FATAL = pq.ExecStatus.FATAL_ERROR
#: Prepared statements per connection; further statements are sent unprepared.
_MAX_PREPARED = 64
#: Statements with more parameters (groups of more than ten events) are not prepared: they
#: are rare, and each prepared one keeps server memory for the connection's lifetime.
_MAX_PREPARED_PARAMS = 70
_PLACEHOLDER = re.compile(r"%%|%s")
_NUMBERED_CACHE = 1024


def numbered(query: str) -> str:
    """A query with psycopg's ``%s`` placeholders in libpq's ``$1, $2, ...`` form.

    ``%%`` (how psycopg spells a literal ``%``) becomes ``%``.
    """
    counter = itertools.count(1)
    return _PLACEHOLDER.sub(lambda m: "%" if m[0] == "%%" else f"${next(counter)}", query)


_numbered: dict[str, bytes] = {}  # statements that may be prepared, as UTF-8 libpq text
_formats: dict[int, list[PyFormat]] = {}  # by parameter count, for those statements


def _encoded(query: str, encoding: str, *, cache: bool) -> bytes:
    """The statement in libpq's form and the client encoding.

    Raises:
        psycopg.NotSupportedError: Its table or schema name cannot be written in that
            encoding (``unencodable_name``).
    """
    try:
        if not cache or encoding != "utf-8":
            return numbered(query).encode(encoding)
        text = _numbered.get(query)
        if text is None:
            text = numbered(query).encode(encoding)
            if len(_numbered) < _NUMBERED_CACHE:
                _numbered[query] = text
    except UnicodeEncodeError as exc:
        raise unencodable_name(exc, encoding) from exc
    return text


def _formats_for(count: int) -> list[PyFormat]:
    if count > _MAX_PREPARED_PARAMS:
        return [PyFormat.AUTO] * count  # a large group: rare, and not worth keeping
    formats = _formats.get(count)
    if formats is None:
        formats = _formats[count] = [PyFormat.AUTO] * count
    return formats


#: Error codes of a prepared statement that no longer fits its table (the table was dropped
#: and created with other column types, or altered): it is prepared again, once.
_STALE_PLAN = frozenset({"0A000", "42804", "42883"})


class _Session:
    """What one connection keeps between statements: its adaptation and prepared names.

    It is stored on the connection itself, so that both are freed together.
    """

    __slots__ = ("client_encoding", "encoding", "names", "prepares", "transformer")

    def __init__(self, conn: AsyncConnection) -> None:
        self.adapt_to(conn)
        # By query and parameter types: psycopg types an int by its size, and a statement
        # prepared for a smallint would refuse a larger value.
        self.names: dict[tuple[str, Sequence[int] | None], bytes] = {}
        # Names are never reused: a PREPARE whose outcome is unknown (it was interrupted)
        # may exist on the server. Only ``names`` counts against the budget.
        self.prepares = 0

    def adapt_to(self, conn: AsyncConnection) -> None:
        """Adapt values to the connection's client encoding (again, if it changed)."""
        self.transformer = Transformer(conn)
        self.encoding = conn.info.encoding
        self.client_encoding = conn.pgconn.parameter_status(b"client_encoding")


def _session(conn: AsyncConnection) -> _Session:
    session: _Session | None = conn.__dict__.get(_SESSION)
    if session is None:
        session = _Session(conn)
        setattr(conn, _SESSION, session)
    elif session.client_encoding != conn.pgconn.parameter_status(b"client_encoding"):
        session.adapt_to(conn)  # someone ran SET client_encoding on the connection
    return session


async def execute(conn: AsyncConnection, query: str, params: Sequence[Any]) -> Result:
    """Run one statement (psycopg's ``%s`` placeholders) and return its result.

    The statement is prepared on the connection the first time it is seen there, unless the
    connection's ``prepare_threshold`` is ``None`` (behind a pooler that cannot keep them)
    or it has many parameters.

    Interrupted (a cancelled task) while the statement runs, the statement is cancelled on
    the server and its end awaited, as psycopg's cursor does: when the interruption goes on,
    the statement has either completed or not happened, and a later read sees which. Only
    if the server does not answer within ``_CANCEL_SECONDS`` (or a second interruption
    comes) is the connection closed, and the statement's outcome is then unknown, as after
    a lost connection.

    Raises:
        psycopg.Error: What psycopg raises for the same failure: the server's error as its
            ``psycopg.errors`` class (with ``diag``), ``OperationalError`` for a lost
            connection.
    """
    return await _execute(conn, query, params, retry=True)


#: Receives the first column's values of one batch of rows (bytes in the client encoding,
#: ``None`` for NULL).
Rows = Callable[[list[bytes | None]], None]


async def stream(
    conn: AsyncConnection, query: str, params: Sequence[Any], size: int, take: Rows
) -> None:
    """Run one statement, handing ``take`` its rows' first column in batches of ``size``.

    Each batch is handed over as libpq receives it (its chunked rows mode, libpq 17+), so
    the caller works on one batch while the server produces the next. The statement is
    interrupted and failed as with ``execute``, but never prepared: it runs once per long
    read, inside the read's transaction, where a prepared statement gone stale (its table
    made again) would fail the whole transaction instead of being prepared again. If
    ``take`` raises, the rest of the answer is received and dropped (the connection is
    idle again), then its exception goes on; no batch is handed over after that.

    Raises:
        psycopg.Error: As ``execute``; batches before the error were handed over.
    """
    await _execute(conn, query, params, retry=False, batches=(size, take))


async def _execute(
    conn: AsyncConnection,
    query: str,
    params: Sequence[Any],
    *,
    retry: bool,
    batches: tuple[int, Rows] | None = None,
) -> Result:
    session = _session(conn)
    transformer = session.transformer
    try:
        values = transformer.dump_sequence(params, _formats_for(len(params)))
    except UnicodeEncodeError as exc:
        raise unencodable(exc, session.encoding) from exc
    types = transformer.types
    pgconn = conn.pgconn
    key = (query, types)
    # A streamed statement is never prepared (see ``stream``).
    preparable = batches is None and len(params) <= _MAX_PREPARED_PARAMS
    name = session.names.get(key) if preparable else None
    prepared_now = False
    try:
        if (
            name is None
            and preparable
            and conn.prepare_threshold is not None
            and len(session.names) < _MAX_PREPARED
        ):
            name = b"castore_%d" % session.prepares
            session.prepares += 1
            text = _encoded(query, session.encoding, cache=True)
            pgconn.send_prepare(name, text, param_types=types)
            await _collect(conn, session)
            session.names[key] = name
            prepared_now = True
        if name is None:
            pgconn.send_query_params(
                _encoded(query, session.encoding, cache=preparable),
                values,
                param_types=types,
                param_formats=transformer.formats,
            )
        else:
            pgconn.send_query_prepared(name, values, param_formats=transformer.formats)
        if batches is None:
            return await _collect(conn, session)
        pgconn.set_chunked_rows_mode(batches[0])
        return await _collect(conn, session, batches[1])
    except pg_errors.InvalidSqlStatementName:
        if name is None or not retry:
            raise
        # Something ran DISCARD ALL or DEALLOCATE: the statement did nothing; prepare again.
        session.names.clear()
        return await _execute(conn, query, params, retry=False)
    except psycopg.Error as exc:
        if isinstance(exc, psycopg.OperationalError):
            wait.forget(conn)  # libpq may have closed the socket while sending
        if name is None or prepared_now or not retry or exc.sqlstate not in _STALE_PLAN:
            raise
        # Prepared before the table changed: drop it and prepare it again, once. A statement
        # that failed this way did nothing.
        del session.names[key]
        await _deallocate(conn, session, name)
        return await _execute(conn, query, params, retry=False)
    except _INTERRUPTED:
        if pgconn.transaction_status == _ACTIVE:
            await _settle(conn, session)
        raise


async def _deallocate(conn: AsyncConnection, session: _Session, name: bytes) -> None:
    conn.pgconn.send_query(b"DEALLOCATE " + name)
    with contextlib.suppress(psycopg.Error):
        await _collect(conn, session)


def unencodable(exc: UnicodeEncodeError, encoding: str) -> psycopg.DataError:
    """The error of a value the connection's client encoding cannot carry (before sending)."""
    return psycopg.DataError(
        f"a value cannot be sent in the connection's client encoding ({encoding}): {exc.reason}"
        f" for {exc.object[exc.start : exc.end]!r}"
    )


def unencodable_name(exc: UnicodeEncodeError, encoding: str) -> psycopg.NotSupportedError:
    """The error of a statement whose table or schema name the client encoding cannot carry.

    Not a ``DataError``: no event or value is at fault, and every statement on the table
    fails alike until the connections use another encoding.
    """
    return psycopg.NotSupportedError(
        f"the table or schema name cannot be sent in the connection's client encoding"
        f" ({encoding}): {exc.reason} for {exc.object[exc.start : exc.end]!r}; use a"
        " client_encoding that can write it (UTF8)"
    )


@contextlib.contextmanager
def encoding_errors(conn: AsyncConnection, values: Sequence[Any] = ()) -> Iterator[None]:
    """Translate the ``UnicodeEncodeError`` of a statement sent through a psycopg cursor.

    Such a cursor raises it alike for a value and for the statement's text: a text that is
    one of ``values`` (the statement's parameters that are values) is ``unencodable``, any
    other (a name, in the statement or a parameter) is ``unencodable_name``.
    """
    try:
        yield
    except UnicodeEncodeError as exc:
        encoding = conn.info.encoding
        if any(exc.object is value or exc.object == value for value in values):
            raise unencodable(exc, encoding) from exc
        raise unencodable_name(exc, encoding) from exc


def decoded(conn: AsyncConnection, value: bytes) -> bytes | str:
    """A text value of a result, as UTF-8 bytes (as they come, usually) or decoded."""
    session: _Session | None = conn.__dict__.get(_SESSION)
    if session is None or session.encoding == "utf-8":
        return value
    return value.decode(session.encoding)


async def _settle(conn: AsyncConnection, session: _Session) -> None:
    """Cancel the running statement and wait until it ended (or close the connection).

    If the cancel request could not be confirmed, the connection is closed once the
    statement ended: a request arriving late would cancel a later statement instead.
    """
    cancelled = False
    try:
        try:
            await conn.cancel_safe(timeout=_CANCEL_SECONDS)
            cancelled = True
        except psycopg.Error as exc:
            logger.warning("cancelling an interrupted statement failed: %s", exc)
        async with asyncio.timeout(_CANCEL_SECONDS):
            await _collect(conn, session)
    except psycopg.Error:
        pass  # cancelled, or ended with its own error: either way it is over
    except BaseException as exc:
        # Not over in time, or interrupted again: the connection's state is unknown.
        logger.warning("an interrupted statement did not end (%s): closing its connection", exc)
        wait.forget(conn)
        conn.pgconn.finish()
        if not isinstance(exc, Exception):
            raise
        return
    if not cancelled:
        wait.forget(conn)
        conn.pgconn.finish()


async def _collect(conn: AsyncConnection, session: _Session, take: Rows | None = None) -> Result:
    """Send what is buffered, then collect the statement's result (raising its error).

    With ``take``, batches of rows (chunked rows mode) are handed to it as they come; if it
    raises, the rest is received and dropped before its exception goes on.
    """
    pgconn = conn.pgconn
    result: Result | None = None
    failure: Exception | None = None
    try:
        while pgconn.flush():
            await _flushable(pgconn)
        while True:
            # Wait until the socket had something to read and it was read (by the loop's
            # callback; a read attempted before the server could answer is a wasted call).
            while pgconn.is_busy():
                await wait.readable(conn)  # returns once more of the answer was read
            received = pgconn.get_result()
            if received is None:
                if failure is not None:
                    raise failure
                if result is not None and result.status in _DONE:
                    return result
                raise _error(result, session)
            if take is not None and received.status == _CHUNK:
                if failure is None:
                    value = received.get_value
                    try:
                        take([value(row, 0) for row in range(received.ntuples)])
                    except Exception as exc:  # raised once the whole answer is in
                        failure = exc
                continue
            if result is None or result.status != _FATAL:
                result = received  # an error is kept over anything after it
    except psycopg.OperationalError:
        # libpq closes the socket of a connection it finds lost: unregister it first.
        wait.forget(conn)
        raise


def _error(result: Result | None, session: _Session) -> psycopg.Error:
    if result is not None and result.status == _FATAL:
        return pg_errors.error_from_result(result, encoding=session.encoding)
    status = "no result" if result is None else pq.ExecStatus(result.status).name
    return psycopg.OperationalError(f"unexpected answer from PostgreSQL: {status}")


async def _flushable(pgconn: pq.abc.PGconn) -> None:
    """Wait until the socket takes more (a large statement did not fit its buffer).

    As libpq asks: wait for the socket to be writable *or* readable, and read what the server
    sent meanwhile, so that a server blocked on sending (notices, notifications) does not
    block the client in turn. (This replaces the registration ``wait.readable`` keeps; its
    next wait notices and registers again.)
    """
    loop = asyncio.get_running_loop()
    fileno = pgconn.socket
    ready = loop.create_future()
    loop.add_reader(fileno, wait.resolve, ready)
    loop.add_writer(fileno, wait.resolve, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fileno)
        loop.remove_writer(fileno)
    pgconn.consume_input()
