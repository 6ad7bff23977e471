"""Waiting for a connection's answer: its socket stays registered with the event loop.

Registering a socket with the event loop for one statement and removing it afterwards costs
two ``epoll_ctl`` system calls and the loop's bookkeeping, about 5 µs per statement warm and
more between round trips; on a local server that is a few percent of a committed write.
``readable`` registers a connection's socket once and leaves it registered while the
adapter holds the connection (also while it keeps it between operations); ``forget`` removes
the registration when the connection goes back to the pool or may be closed.
``register_idle`` registers the socket of a connection the adapter keeps whose last
statement went through psycopg itself.

As asyncio's own transports do, the loop's callback reads what arrived (libpq's
``consume_input``) before it wakes the waiting statement: a socket left unread would be
reported again on the loop's next turn, after the statement had read it.

The registration is checked before each wait, because psycopg's own waits on the connection
(a cursor's statement, a transaction block) replace and then remove it: asyncio cancels the
handle of a reader it replaces or removes, so the check is whether the handle is cancelled.
The handle is read from the selector of asyncio's selector event loop once per
registration (the loop's ``_selector`` attribute, stable since Python 3.4 but not public
API). Other event loops (uvloop, for one), and selector loops that change how readers are
registered, register and remove the socket around each wait.

A socket that becomes readable while no statement runs (the server said goodbye before a
restart, or sent a rare notice) is read too, and the connection is marked: ``stirred`` tells
the adapter not to use it again. A connection found lost is unregistered at once, as libpq
has closed its socket.
"""

from __future__ import annotations

import asyncio
from asyncio.selector_events import BaseSelectorEventLoop
from selectors import BaseSelector
from typing import Any

from psycopg import pq

__all__ = ["forget", "readable", "register_idle", "resolve", "stirred"]

_WATCH = "_castore_watch"
_ACTIVE = pq.TransactionStatus.ACTIVE  # a statement is in progress
_ADD_READER = BaseSelectorEventLoop.add_reader
_REMOVE_READER = BaseSelectorEventLoop.remove_reader


class _Watch:
    """One registration of a connection's socket with one event loop."""

    __slots__ = ("fd", "handle", "loop", "pgconn", "stirred", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop, pgconn: Any, fd: int) -> None:
        self.loop = loop
        self.pgconn = pgconn
        self.fd = fd
        self.handle: asyncio.Handle | None = None  # the loop's handle of ``wake``
        self.waiter: asyncio.Future[None] | None = None  # set while a statement waits
        self.stirred = False

    def wake(self) -> None:
        """The socket is readable: read it, then wake the waiting statement, if any."""
        waiter = self.waiter
        if waiter is None and self.pgconn.transaction_status != _ACTIVE:
            # The server spoke while no statement ran. (With one running, this is its
            # answer, come while nobody waits: an interrupted wait, being settled.)
            self.stirred = True
        try:
            self.pgconn.consume_input()
        except Exception as exc:  # a psycopg.OperationalError, in practice
            # Lost: libpq has closed the socket, which must not stay registered.
            self.handle = None
            self.loop.remove_reader(self.fd)
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
            return
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def holds(self) -> bool:
        """Whether the loop's registration of the socket is still this one.

        asyncio cancels a reader's handle when another reader replaces it or it is removed.
        """
        handle = self.handle
        return handle is not None and not handle.cancelled()


def _selector(loop: asyncio.AbstractEventLoop) -> BaseSelector | None:
    """The selector of asyncio's own selector event loop; ``None`` for any other loop."""
    kind = type(loop)
    if (
        not isinstance(loop, BaseSelectorEventLoop)
        or kind.add_reader is not _ADD_READER
        or kind.remove_reader is not _REMOVE_READER
        or loop.is_closed()
    ):
        return None
    selector: BaseSelector | None = getattr(loop, "_selector", None)
    return selector


async def readable(conn: Any) -> None:
    """Wait until more of the server's answer to ``conn`` (a psycopg connection) was read.

    Raises:
        psycopg.OperationalError: The connection was lost.
    """
    loop = asyncio.get_running_loop()
    pgconn = conn.pgconn
    fd: int = pgconn.socket
    watch = _current(conn, loop, fd)
    if watch is None:
        selector = _selector(loop)
        watch = None if selector is None else _register(conn, loop, selector, fd)
        if watch is None:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, resolve, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            pgconn.consume_input()
            return
    ready = loop.create_future()
    watch.waiter = ready
    try:
        await ready
    finally:
        watch.waiter = None


def _current(conn: Any, loop: asyncio.AbstractEventLoop, fd: int) -> _Watch | None:
    """The registration of ``conn``'s socket with ``loop``, if it still holds."""
    watch: _Watch | None = conn.__dict__.get(_WATCH)
    if watch is None or watch.loop is not loop or watch.fd != fd or not watch.holds():
        return None
    return watch


def _register(
    conn: Any, loop: asyncio.AbstractEventLoop, selector: BaseSelector, fd: int
) -> _Watch | None:
    """Register ``conn``'s socket with ``loop``; ``None`` if the selector is not as expected."""
    forget(conn)  # a registration with another loop, still open, must not outlive this one
    watch = _Watch(loop, conn.pgconn, fd)
    loop.add_reader(fd, watch.wake)
    try:
        handle = selector.get_key(fd).data[0]
    except (KeyError, TypeError, AttributeError, IndexError):
        handle = None
    if not isinstance(handle, asyncio.Handle):
        loop.remove_reader(fd)
        return None
    watch.handle = handle
    setattr(conn, _WATCH, watch)
    return watch


def register_idle(conn: Any) -> None:
    """Keep ``conn``'s socket registered while the connection idles with the adapter.

    The server's goodbye (a restart) then marks the connection ``stirred``. Nothing happens
    on event loops other than asyncio's selector loop, or for a closed connection.
    """
    if conn.closed:
        return
    loop = asyncio.get_running_loop()
    fd: int = conn.pgconn.socket
    if _current(conn, loop, fd) is None:
        selector = _selector(loop)
        if selector is not None:
            _register(conn, loop, selector, fd)


def resolve(ready: asyncio.Future[None]) -> None:
    """Complete ``ready`` unless it already is (a reader or writer callback)."""
    if not ready.done():
        ready.set_result(None)


def forget(conn: Any) -> None:
    """Remove the registration of ``conn``'s socket, if it is still the one ``readable`` made.

    Called before the connection goes back to the pool or may be closed: a descriptor closed
    while registered stays in the loop's table, and a later socket given the same number
    would then never be watched.
    """
    watch: _Watch | None = conn.__dict__.pop(_WATCH, None)
    if watch is None or watch.handle is None:
        return
    if watch.holds() and not watch.loop.is_closed():
        watch.loop.remove_reader(watch.fd)
    watch.handle = None


def stirred(conn: Any) -> bool:
    """Whether the server sent ``conn`` something while no statement ran (since registered)."""
    watch: _Watch | None = conn.__dict__.get(_WATCH)
    return watch is not None and watch.stirred
