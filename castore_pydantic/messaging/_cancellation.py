"""Cancellations that a driver swallowed, raised again.

Before Python 3.12, ``asyncio.wait_for`` returns its result instead of raising when the task
is cancelled just as the awaited operation finishes: the cancellation is lost. redis-py runs
every command under it while a socket timeout is set, and aio-pika's ``connect`` runs the
connection handshake under it. A consumer task carrying on after such a cancellation would
never end, and ``asyncio.run``, which cancels the tasks left as its loop ends, would wait for
it for ever. ``Task.cancelling()`` still counts the request, so the task can tell.
"""

from __future__ import annotations

import asyncio

__all__ = ["cancellations", "raise_swallowed_cancellation"]


def cancellations() -> int:
    """How many cancellations of the running task are pending (0 outside a task).

    Taken before an await, it is what ``raise_swallowed_cancellation`` compares with after it,
    in a task that is not the library's own (its caller may have handled one already).
    """
    task = asyncio.current_task()
    return 0 if task is None else task.cancelling()


def raise_swallowed_cancellation(before: int = 0) -> None:
    """Raise ``CancelledError`` if the running task was cancelled and that was swallowed.

    Args:
        before: What ``cancellations()`` said before the awaits that may have swallowed one;
            0 in a task the library made, which nothing else cancels and uncancels.

    Raises:
        asyncio.CancelledError: More cancellations are pending than ``before``.
    """
    if cancellations() > before:
        raise asyncio.CancelledError
