"""The lock of one SQLite adapter: a thread lock whose waiting calls are woken in turn.

An adapter runs one operation at a time on its connection. Most operations take the lock
and give it back within one synchronous call, but a long read hands it to a worker thread
for as long as the read lasts, and an adapter may be shared by threads. A call that finds
the lock taken waits for a release to wake it, one waiter per release, oldest first; it also
looks again after its own pause (growing to a second, see the adapter's ``_run``), so that
a wake-up that goes astray (its waiter's loop closed) costs at most that pause.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from types import TracebackType

__all__ = ["AdapterLock"]


class AdapterLock:
    """A ``threading.Lock`` (same ``acquire``/``release``/``locked``) with async waiting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """As ``threading.Lock.acquire``."""
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        """As ``threading.Lock.release``; then wake the oldest waiting call, if any."""
        self._lock.release()
        if self._waiting:
            self._wake_one()

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

    async def wait(self, pause: float) -> None:
        """Wait until a release wakes this call, at most ``pause`` seconds.

        The caller then tries ``acquire`` again: another caller may have taken the lock
        first.
        """
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        self._waiting.append((loop, woken))
        if not self._lock.locked():
            # Released between the caller's failed attempt and now: no release will come.
            woken.cancel()
            return
        timer = loop.call_later(pause, _expire, woken)
        try:
            await woken
        except BaseException:
            if woken.done() and not woken.cancelled():
                self._wake_one()  # woken, but interrupted: the next waiter's turn
            raise
        finally:
            timer.cancel()
            if not woken.done():
                woken.cancel()  # a later release passes over it

    def _wake_one(self) -> None:
        """Wake the oldest waiting call that still waits (from any thread)."""
        while self._waiting:
            try:
                loop, woken = self._waiting.popleft()
            except IndexError:  # another thread took the last one
                return
            if woken.done():
                continue
            try:
                loop.call_soon_threadsafe(self._wake, woken)
            except RuntimeError:  # its event loop is closed
                continue
            return

    def _wake(self, woken: asyncio.Future[None]) -> None:
        if woken.done():
            self._wake_one()  # it stopped waiting meanwhile: the next one's turn
        else:
            woken.set_result(None)


def _expire(woken: asyncio.Future[None]) -> None:
    """End a wait whose pause is over (a later release passes over it)."""
    if not woken.done():
        woken.set_result(None)
