"""The lock of one SQLite adapter: a thread lock whose waiting calls are woken in turn.

An adapter runs one operation at a time on its connection. Most operations take the lock
and give it back within one synchronous call, but a long read hands it to a worker thread
for as long as the read lasts, and an adapter may be shared by threads. A call that finds
the lock taken waits in line with a ``Ticket``: each release wakes the call at the head of
the line (through the call's own event loop, from whichever thread releases). A woken call
that loses the lock to a newcomer goes back to the head. Each wait also ends after a short
pause (growing to 50 ms, see the adapter's ``_run``), so that a wake-up sent to a loop that
is busy, closing, or gone after a fork delays the others by at most that pause.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from types import TracebackType

__all__ = ["AdapterLock", "Ticket"]


class Ticket:
    """One call's place in line, kept from its first failed attempt until it has the lock."""

    __slots__ = ("done", "loop", "owner", "queued", "woken")

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: AdapterLock) -> None:
        self.loop = loop
        self.owner = owner
        self.woken: asyncio.Future[None] | None = None  # the current wait, if any
        self.queued = False  # in the line (a release takes it out to wake it)
        self.done = False  # the call has the lock, or gave up


class AdapterLock:
    """A ``threading.Lock`` (same ``acquire``/``release``/``locked``) with a line of waiters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._line: deque[Ticket] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """As ``threading.Lock.acquire``."""
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        """As ``threading.Lock.release``; then wake the call at the head of the line."""
        self._lock.release()
        if self._line:
            self._wake_next()

    def locked(self) -> bool:
        """As ``threading.Lock.locked``."""
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def wait(self, ticket: Ticket | None, pause: float) -> Ticket:
        """Wait in line until a release wakes this call, at most ``pause`` seconds.

        Pass the returned ticket to the next ``wait`` of the same call (it keeps the call's
        place), and to ``leave`` once the call has the lock or gives up. The caller tries
        ``acquire`` after each wait: another caller may have taken the lock first.
        """
        loop = asyncio.get_running_loop()
        if ticket is None or ticket.owner is not self:  # (a lock replaced after a fork)
            ticket = Ticket(loop, self)
            ticket.queued = True
            self._line.append(ticket)
        elif not ticket.queued:
            ticket.queued = True
            self._line.appendleft(ticket)  # a release woke it, a newcomer won: still first
        woken: asyncio.Future[None] = loop.create_future()
        ticket.woken = woken
        if not self._lock.locked():
            return ticket  # released since the caller's attempt: try again now
        timer = loop.call_later(pause, _end, woken)
        try:
            await woken
        except BaseException:
            self.leave(ticket)
            raise
        finally:
            timer.cancel()
        return ticket

    def leave(self, ticket: Ticket | None) -> None:
        """The call is done waiting: it has the lock or gives up (a wake passes it over)."""
        if ticket is None or ticket.done:
            return
        ticket.done = True
        woken = ticket.woken
        if woken is not None and woken.done() and not woken.cancelled() and not self.locked():
            # Woken for a free lock it will not take: the next call's turn.
            self._wake_next()

    def _wake_next(self) -> None:
        """Wake the call at the head of the line that still waits (from any thread)."""
        while True:
            try:
                ticket = self._line.popleft()
            except IndexError:
                return
            ticket.queued = False
            if ticket.done:
                continue
            try:
                ticket.loop.call_soon_threadsafe(self._wake, ticket)
            except RuntimeError:  # its event loop is closed
                ticket.done = True
                continue
            return

    def _wake(self, ticket: Ticket) -> None:
        woken = ticket.woken
        if ticket.done or woken is None or woken.done():
            self._wake_next()  # it stopped waiting meanwhile: the next call's turn
        else:
            woken.set_result(None)


def _end(woken: asyncio.Future[None]) -> None:
    """End a wait whose pause is over (the call keeps its place in line)."""
    if not woken.done():
        woken.set_result(None)
