"""The worker loop behind the Redis Streams adapters: read, handle, acknowledge, retry.

One ``StreamConsumer`` serves one consumer group (a queue's workers, or one bus listener). Its
loop reads entries with ``XREADGROUP``, hands each to the handler and acknowledges it with
``XACK`` only afterwards. A failed entry is acknowledged and written to the group's
delayed-retry sorted set in one Lua script (so the retry copy exists once the original is
gone), or, once the retry budget is spent, acknowledged and written to the dead-letter stream
in another. Entries left unacknowledged by a consumer that died are taken over once they
have been idle for ``reclaim_idle_ms``.

Reads come in batches of ``prefetch_count``; takeovers claim one entry at a time, just
before handling it. Redis counts a delivery for every entry a read or a claim returns, so a
batch whose consumer dies on one entry leaves a delivery on the others without their handler
having run. Taken over one at a time, they gain no more such deliveries: an entry's count is
at most its first delivery plus the number of times its handler started, and
``max_deliveries`` counts takeovers, never that first delivery.

The consumer is built in layers, a module each: ``_redis_handling`` handles an entry and
acknowledges, retries or dead-letters it; ``_redis_takeover`` takes pending entries over and
hands them back; this module runs the loop. Their Lua scripts are in ``_redis_wire``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from castore_pydantic.messaging._cancellation import raise_swallowed_cancellation
from castore_pydantic.messaging._messages import RetryPolicy
from castore_pydantic.messaging._redis_handling import Entry
from castore_pydantic.messaging._redis_subscription import (
    ConsumerOptions,
    Route,
    Subscription,
    ensure_group,
)
from castore_pydantic.messaging._redis_takeover import ConsumerTakeovers
from castore_pydantic.messaging._redis_wire import (
    CLAIM_NEXT,
    DEAD_LETTER,
    PROMOTE_RETRIES,
    REJOIN_GROUP,
    SCHEDULE_RETRY,
)

__all__ = ["StreamConsumer"]

logger = logging.getLogger("castore_pydantic.messaging.redis")

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0
_PROMOTE_BATCH = 500
#: The longest a stopping consumer spends handing its entries back. The hand-back only
#: spares other consumers the wait for ``reclaim_idle_ms``: a Redis that stalls (a network
#: partition, ``CLIENT PAUSE``) must not hold up the stop, which would never return.
RELEASE_TIMEOUT = 1.0


class StreamConsumer(ConsumerTakeovers):
    """Consumes one subscription until asked to stop (run it as a task)."""

    def __init__(
        self,
        client: Redis,
        subscription: Subscription,
        *,
        consumer_name: str,
        route: Route,
        retry_policy: RetryPolicy,
        options: ConsumerOptions,
    ) -> None:
        self.client = client
        self.subscription = subscription
        self.consumer_name = consumer_name
        self.route = route
        self.retry_policy = retry_policy
        self.options = options
        self.task: asyncio.Task[None] | None = None
        self._schedule_retry = client.register_script(SCHEDULE_RETRY)
        self._dead_letter_script = client.register_script(DEAD_LETTER)
        self._promote = client.register_script(PROMOTE_RETRIES)
        self._claim_next = client.register_script(CLAIM_NEXT)
        self._rejoin = client.register_script(REJOIN_GROUP)
        #: ``None`` until the groups were first created; then, for each stream the group
        #: started reading at its end, the last entry the group delivered here: where the
        #: group starts again if it disappears (see ``_join_groups``).
        self._positions: dict[str, bytes] | None = None
        #: How many times this adapter purged the channel under this consumer.
        self._purges = 0
        self._stopping = False
        self._reading = False
        #: Whether the final hand-back of pending entries has started (it runs once),
        #: whether it is running, and whether a stop cancelled the handler in flight.
        self._released = False
        self._releasing = False
        self._cancelled = False
        self._wake = asyncio.Event()
        #: Where the next takeover pass resumes, per stream (``None``: from the start).
        self._cursors: dict[str, bytes | None] = {}
        # Entries handled successfully whose XACK has not gone through yet, per stream: they
        # are acknowledged before anything else is read, never handed to the handler again.
        self._unacked: dict[bytes, list[bytes]] = {}
        #: How far the start-up takeover of the entries under this name went, per stream:
        #: the last entry it claimed, ``None`` once it reached the end. The entries after
        #: that point are an earlier worker's, left when it died under this name.
        self._start_up: dict[str, bytes | None] = {}
        self._next_reclaim = 0.0
        self._next_promote = 0.0

    def __repr__(self) -> str:
        return f"StreamConsumer(group={self.subscription.group!r}, name={self.consumer_name!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Start the loop in a task."""
        self.task = asyncio.get_running_loop().create_task(
            self.run(), name=f"castore-redis-consumer:{self.subscription.group}"
        )
        return self.task

    def request_stop(self) -> None:
        """Ask the loop to stop after the handler in flight; interrupts a blocked read."""
        self._stopping = True
        self._wake.set()
        if self._reading and self.task is not None:
            self.task.cancel()

    def forget_held(self) -> None:
        """The channel was just purged: drop what was read before and not started.

        Those entries were deleted with their stream, also those of a read under way (see
        ``ConsumerHandling._handle_batch``); the handler in flight, if any, runs to its end,
        but its message is neither retried nor dead-lettered (Redis no longer holds it as
        pending: see ``ConsumerHandling``).
        The consumer goes on with what is published from now on.
        """
        self._purges += 1
        self._unacked = {}

    def cancel(self) -> None:
        """Cancel the handler in flight of a consumer asked to stop (its grace period ran out).

        The consumer then hands back what it holds, as on a clean stop, for at most
        ``RELEASE_TIMEOUT`` seconds. A hand-back already running goes on: its handler
        ended within the grace period (``abort_release`` interrupts it).
        """
        if self.task is None or self.task.done():
            return
        if self._released or self._cancelled:
            return
        self._cancelled = True
        self.task.cancel()

    def abort_release(self) -> None:
        """Interrupt the hand-back of a stopping consumer (its stop was cancelled).

        What was not handed back is taken over by others after ``reclaim_idle_ms``.
        """
        if self.task is not None and not self.task.done() and self._releasing:
            self.task.cancel()

    async def run(self) -> None:
        """Read and handle entries until ``request_stop``; survive broker outages.

        On the way out, also when a stop cancels the handler in flight, the entries read
        but not handled are handed back. A cancellation without a stop (the worker killed)
        hands back nothing: other consumers take its entries over after ``reclaim_idle_ms``.
        """
        try:
            await self._consume()
        except asyncio.CancelledError:
            if self._stopping and not self._released:
                await self._release()
            raise
        await self._release()

    async def _release(self) -> None:
        """Hand back the entries held, giving up after ``RELEASE_TIMEOUT`` seconds."""
        self._released = self._releasing = True
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT):
                await self.release_pending()
        except TimeoutError:
            logger.warning(
                "Redis consumer %s could not hand its pending entries back within %ss; "
                "others take them over after %d ms",
                self.consumer_name,
                RELEASE_TIMEOUT,
                self.options.reclaim_idle_ms,
            )
        finally:
            self._releasing = False

    async def _consume(self) -> None:
        backoff = _BACKOFF_MIN
        ready = False
        while not self._stopping:
            raise_swallowed_cancellation()
            try:
                if self._unacked:
                    await self._acknowledge()
                if not ready:
                    await self._join_groups()
                    await self._recover_own_entries()
                    ready = True
                await self._maintain()
                purges = self._purges
                entries = await self._read()
                if entries:
                    await self._handle_batch(entries, purges)
                backoff = _BACKOFF_MIN
            except ResponseError as exc:
                # NOGROUP, or UNBLOCKED for a blocked read: the group or its stream was
                # deleted under us (a purge by another adapter, FLUSHDB). The next pass
                # creates the group again, without skipping what was published meanwhile.
                ready = False
                logger.warning(
                    "Redis consumer %s of group %s: %s; retrying",
                    self.consumer_name,
                    self.subscription.group,
                    exc,
                )
                await self._pause(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                # What it held (a batch or a takeover cut short) is handled again once Redis
                # is back, uncounted, rather than waiting reclaim_idle_ms for a takeover
                # that would count a delivery as if this worker had died.
                ready = False
                logger.warning(
                    "Redis consumer %s lost the broker (%s); retrying in %.2fs",
                    self.consumer_name,
                    exc,
                    backoff,
                )
                await self._pause(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            except Exception:
                # Keep going: a worker that silently stops consuming is the worst outcome.
                # What it held stays pending and is handled again.
                ready = False
                logger.exception("Redis consumer %s failed; retrying", self.consumer_name)
                await self._pause(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _join_groups(self) -> None:
        """Create the consumer groups, or create them again where they have disappeared.

        The first time, each group starts where the subscription says: a bus listener's at
        the end of the stream, where it was created when the adapter connected. A group
        that disappears later (the channel was purged by another adapter or process, its
        keys deleted, Redis restarted without persistence) must not start at the end again,
        which would skip what was published since. It starts again after the last entry
        it delivered here, if the stream still holds that entry (only the group was
        deleted), else at the stream's start: a stream created again after its deletion
        holds only what was published since, none of it read by the group.
        """
        subscription = self.subscription
        if self._positions is None:
            await ensure_group(self.client, subscription)
            positions: dict[str, bytes] = {}
            for stream, start_id in zip(subscription.streams, subscription.start_ids, strict=True):
                if start_id == "$":
                    positions[stream] = await self._group_position(stream)
            self._positions = positions
            return
        for stream in subscription.streams:
            await self._rejoin(
                keys=[stream], args=[subscription.group, self._positions.get(stream, b"0")]
            )

    async def _group_position(self, stream: str) -> bytes:
        """The last entry of ``stream`` delivered to the group (``b"0"`` if it is gone)."""
        groups: Any = await self.client.xinfo_groups(stream)
        name = self.subscription.group.encode()
        for group in groups:
            if group["name"] == name:
                return bytes(group["last-delivered-id"])
        return b"0"

    async def _pause(self, seconds: float) -> None:
        self._wake.clear()
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    # -- reading -----------------------------------------------------------------------------

    async def _read(self) -> list[Entry]:
        if self._stopping:
            return []
        loop = asyncio.get_running_loop()
        now = loop.time()
        wait = min(self._next_reclaim, self._next_promote) - now
        # A takeover pass stopped at prefetch_count goes on after this read: do not block.
        # However short its BLOCK, Redis ends a blocked read on its next timer tick (100 ms
        # at its default hz of 10), which made a large takeover crawl.
        block = (
            None
            if self._next_reclaim <= now
            else max(1, min(self.options.block_ms, int(wait * 1000)))
        )
        streams: dict[Any, Any] = dict.fromkeys(self.subscription.streams, ">")
        self._reading = True
        try:
            reply: Any = await self.client.xreadgroup(
                self.subscription.group,
                self.consumer_name,
                streams,
                count=self.options.prefetch_count,
                block=block,
            )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._stopping or task is None:
                raise
            # Our own stop interrupted a blocked read: not a cancellation of the worker.
            # Entries it may have taken stay pending and are released on the way out.
            task.uncancel()
            return []
        finally:
            self._reading = False
        positions = self._positions or {}
        for stream, stream_entries in reply or ():
            if stream_entries and stream.decode() in positions:
                positions[stream.decode()] = stream_entries[-1][0]
        return [
            (stream, entry_id, fields, None)
            for stream, stream_entries in reply or ()
            for entry_id, fields in stream_entries
        ]

    # -- maintenance: due retries and abandoned entries ------------------------------------------

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now >= self._next_promote:
            moved, wait_ms = await self._promote(
                keys=[self.subscription.delayed, self.subscription.retry_stream],
                args=[_PROMOTE_BATCH],
            )
            if moved >= _PROMOTE_BATCH:
                wait_ms = 0
            horizon = self.options.block_ms / 1000
            self._next_promote = now + (horizon if wait_ms < 0 else min(wait_ms / 1000, horizon))
        if now >= self._next_reclaim:
            more = await self._reclaim()
            interval = max(self.options.reclaim_idle_ms / 2000, 0.005)
            self._next_reclaim = now if more else loop.time() + interval
