"""Which event loop an adapter's connections and tasks belong to.

A socket transport, a task or a future belongs to the event loop that made it: used from
another loop it fails (``RuntimeError: Event loop is closed``, or a future attached to a
different loop). An adapter attached at import time may yet serve several loops in turn: one
``asyncio.run`` after another, or pytest-asyncio's loop per test. ``LoopBinding`` tells the
adapter when the loop it was used on has closed, so that it starts afresh on the running
one, and refuses a second loop while the first is still open.

Connections can only be closed on their own loop, and asyncio warns about a transport left
open (``ResourceWarning``, an error under ``-W error``). ``asyncio.run`` and
``asyncio.Runner`` close the asynchronous generators still suspended on their loop
(``loop.shutdown_asyncgens``), after cancelling its tasks and before closing it: the one
moment a library gets to run code on a loop that is ending. ``LoopBinding.close_at_end``
puts a generator there whose ``finally`` closes the adapter's connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable

__all__ = ["LoopBinding"]


class LoopBinding:
    """The event loop an adapter works on: the first that used it, until that loop closes."""

    __slots__ = ("_watch", "loop")

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._watch: AsyncGenerator[None, None] | None = None

    @property
    def closed(self) -> bool:
        """Whether the loop the adapter was used on has closed since."""
        return self.loop is not None and self.loop.is_closed()

    def enter(self, owner: object) -> bool:
        """Bind to the running loop; return whether the loop used before had closed.

        When it returns ``True``, whatever the owner kept from that loop (tasks, events,
        connections) is dead and must be dropped, without awaiting anything.

        Raises:
            RuntimeError: ``owner`` was used on another loop that is still open (another
                thread's, say); the message names ``owner`` and says what to do.
        """
        loop = asyncio.get_running_loop()
        previous = self.loop
        if previous is loop:
            return False
        if previous is not None and not previous.is_closed():
            raise RuntimeError(
                f"{owner!r} is in use on another event loop, which is still open: its "
                "connections and consumers work on that loop only. Use one adapter per "
                "event loop (one per thread), or close that loop before using the adapter "
                "on this one"
            )
        self.loop = loop
        self._watch = None
        return previous is not None

    def close_at_end(self, close: Callable[[], Awaitable[None]]) -> None:
        """Have the bound loop await ``close()`` when it ends, before it closes.

        Once per loop. Only loops ended by ``asyncio.run`` or an ``asyncio.Runner`` (or
        anything else that calls ``loop.shutdown_asyncgens()``) do so.
        """
        if self._watch is not None:
            return

        async def watch() -> AsyncGenerator[None, None]:
            try:
                yield
            finally:
                await close()

        generator = watch()
        # Its first step registers it with the running loop (``sys.set_asyncgen_hooks``),
        # which holds it weakly: kept here, it is closed when the loop shuts down. The step
        # reaches the ``yield`` at once, so it is driven here rather than awaited.
        with contextlib.suppress(StopIteration):
            generator.asend(None).send(None)
        self._watch = generator
