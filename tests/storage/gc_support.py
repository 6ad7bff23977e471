"""Watching the cyclic garbage collector from another task while a read runs."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def collector_watch() -> AsyncIterator[asyncio.Event]:
    """An event that a task of the loop sets each time it finds the collector paused.

    The task looks at every turn of the loop, so it sees what other tasks see while a
    read waits; clear the event to watch again.
    """
    paused = asyncio.Event()

    async def sample() -> None:
        while True:
            if not gc.isenabled():
                paused.set()
            await asyncio.sleep(0)

    sampler = asyncio.ensure_future(sample())
    try:
        yield paused
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
