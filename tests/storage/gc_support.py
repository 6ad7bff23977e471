"""Watching the cyclic garbage collector from another task while reads run."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any


@dataclass
class CollectorWatch:
    """What a watching task saw: how often it looked, and how often the collector was off."""

    looks: int = 0
    paused: int = 0

    def assert_never_paused(self) -> None:
        """The watcher ran while reads waited, and never found the collector off."""
        assert self.looks > 10, "the reads never waited: nothing was watched"
        assert self.paused == 0
        assert gc.isenabled()


async def cancelled_midway(read: Awaitable[Any], turns: int) -> None:
    """Start ``read``, let the loop turn ``turns`` times, cancel it and wait for its end."""
    task = asyncio.ensure_future(read)
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@contextlib.asynccontextmanager
async def collector_watch() -> AsyncIterator[CollectorWatch]:
    """A task that looks at the collector at every turn of the loop, while the block runs.

    It sees what any other task of the process would see while a read waits.
    """
    watch = CollectorWatch()

    async def sample() -> None:
        while True:
            watch.looks += 1
            watch.paused += not gc.isenabled()
            await asyncio.sleep(0)

    sampler = asyncio.ensure_future(sample())
    try:
        yield watch
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
