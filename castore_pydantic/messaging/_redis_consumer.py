"""The worker loop behind the Redis Streams adapters: read, handle, acknowledge, retry.

One ``StreamConsumer`` serves one consumer group (a queue's workers, or one bus listener). Its
loop reads entries with ``XREADGROUP``, hands each to the handler and acknowledges it with
``XACK`` only afterwards. A failed entry is written to the group's delayed-retry sorted set
and acknowledged in one Lua script (so the retry copy exists before the original is gone), or,
once the retry budget is spent, written to the dead-letter stream and acknowledged in one
``MULTI``. Entries left unacknowledged by a consumer that died are taken over once they
have been idle for ``reclaim_idle_ms``.

Reads come in batches of ``prefetch_count``; takeovers claim one entry at a time, just
before handling it. Redis counts a delivery for every entry a read or a claim returns, so a
batch whose consumer dies on one entry leaves a delivery on the others without their handler
having run. Taken over one at a time, they gain no more such deliveries: an entry's count is
at most its first delivery plus the number of times its handler started, and
``max_deliveries`` counts takeovers, never that first delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from castore_pydantic.messaging._messages import (
    MessageContext,
    RetryPolicy,
    describe_error,
    run_handler,
)
from castore_pydantic.messaging._redis_subscription import (
    ConsumerOptions,
    Route,
    Subscription,
    ensure_group,
)
from castore_pydantic.messaging._redis_wire import CLAIM_NEXT, PROMOTE_RETRIES, SCHEDULE_RETRY

__all__ = ["StreamConsumer"]

logger = logging.getLogger("castore_pydantic.messaging.redis")

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0
_PROMOTE_BATCH = 500
#: The longest a stopping consumer spends handing its entries back. The hand-back only
#: spares other consumers the wait for ``reclaim_idle_ms``: a Redis that stalls (a network
#: partition, ``CLIENT PAUSE``) must not hold up the stop, which would never return.
RELEASE_TIMEOUT = 1.0


# An entry as read: (stream, entry id, fields, delivery count when known).
_Entry = tuple[bytes, bytes, Mapping[bytes, bytes], int | None]


class StreamConsumer:
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
        self._promote = client.register_script(PROMOTE_RETRIES)
        self._claim_next = client.register_script(CLAIM_NEXT)
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
            try:
                if self._unacked:
                    await self._acknowledge()
                if not ready:
                    await ensure_group(self.client, self.subscription)
                    await self._recover_own_entries()
                    ready = True
                await self._maintain()
                entries = await self._read()
                if entries:
                    await self._handle_batch(entries)
                backoff = _BACKOFF_MIN
            except ResponseError as exc:
                # NOGROUP: the stream was deleted (purged) under us; create it again.
                ready = False
                logger.warning("Redis consumer %s: %s; retrying", self.consumer_name, exc)
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

    async def _pause(self, seconds: float) -> None:
        self._wake.clear()
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    # -- reading -----------------------------------------------------------------------------

    async def _read(self) -> list[_Entry]:
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
        return [
            (stream, entry_id, fields, None)
            for stream, stream_entries in reply or ()
            for entry_id, fields in stream_entries
        ]

    async def _recover_own_entries(self) -> None:
        """Handle the entries pending under this consumer's name, one at a time.

        At start-up they were left by a worker that died under this name (restarted with a
        stable name): taking them over counts a delivery, so one that keeps killing it
        reaches max_deliveries. A start-up that a Redis error interrupted resumes where it
        was, still counting. What this consumer itself read or claimed and still holds
        after a Redis error was not dropped by a dying worker: it is not counted.
        """
        for stream in self.subscription.streams:
            if self._start_up.get(stream, b"0-0") is not None:
                await self._take_over(
                    stream,
                    owner=self.consumer_name,
                    min_idle=0,
                    counted=True,
                    cursors=self._start_up,
                )
            await self._take_over(
                stream, owner=self.consumer_name, min_idle=0, counted=False, cursors={}
            )

    def _got_here(self, stream: str, entry_id: bytes) -> bool:
        """Whether this consumer read or claimed a pending entry under its name.

        The others are an earlier worker's, which its start-up takeover has not reached:
        it reads and claims nothing else before that takeover is done.
        """
        if stream not in self._start_up:
            return False
        reached = self._start_up[stream]
        return reached is None or _stream_id(entry_id) <= _stream_id(reached)

    async def _take_over(
        self,
        stream: str,
        *,
        owner: str,
        min_idle: int,
        counted: bool,
        cursors: dict[str, bytes | None],
        limit: int | None = None,
    ) -> None:
        """Claim pending entries one at a time, handling each at once.

        Claimed alone, just before its handler starts, an entry gets a delivery only when
        it is about to be handled: entries read in one batch with a message that kills its
        consumers are not charged for its deaths. Entries idle for at least ``min_idle`` ms
        are taken (of ``owner`` only, unless it is ``""``). A handled entry is acknowledged
        by the claim of the next one, or at the end; if that fails, it stays in
        ``_unacked``, as in a batch.

        The scan starts after ``cursors[stream]`` (at the start when it is missing or
        ``None``). It is set to each entry claimed, also when an error ends the scan, and to
        ``None`` once the scan reached the end.
        """
        key = stream.encode()
        head: list[Any] = [
            self.subscription.group,
            self.consumer_name,
            min_idle,
            owner,
            int(counted),
            int(stream in self.subscription.owned),
        ]
        cursor = cursors.get(stream) or b"0-0"
        taken = 0
        while not self._stopping and (limit is None or taken < limit):
            handled = self._unacked.get(key, [])
            reply: Any = await self._claim_next(keys=[stream], args=[*head, cursor, *handled])
            self._unacked.pop(key, None)
            if not reply:
                cursors[stream] = None
                break
            cursor, delivered = reply[0], int(reply[1])
            cursors[stream] = cursor
            taken += 1
            if len(reply) < 3:
                # Trimmed from the stream: nothing to handle, only to forget (Redis 7 has
                # forgotten it already).
                self._unacked[key] = [cursor]
            elif not self._stopping:
                fields = dict(zip(reply[2][::2], reply[2][1::2], strict=True))
                if await self._handle_entry(key, cursor, fields, delivered):
                    self._unacked[key] = [cursor]
        await self._acknowledge()

    async def release_pending(self) -> None:
        """Hand back this consumer's unacknowledged entries, for others to take at once.

        Their delivery time is set to 0 (idle "forever", so the next takeover pass of any
        consumer takes them) and the delivery this consumer counted is given back: an entry
        handed over unhandled must not count towards ``max_deliveries``. Entries an earlier
        worker under this name left, which the start-up takeover had not reached, keep
        their count: this consumer never had them. Entries already handled are
        acknowledged first, so they are not handed out again.
        """
        try:
            await self._acknowledge()
        except RedisError as exc:
            logger.warning(
                "Redis consumer %s could not acknowledge handled entries (%s); they will be "
                "delivered again",
                self.consumer_name,
                exc,
            )
        for stream in self.subscription.streams:
            try:
                pending: Any = await self.client.xpending_range(
                    stream,
                    self.subscription.group,
                    min="-",
                    max="+",
                    count=10_000,
                    consumername=self.consumer_name,
                )
                by_count: dict[int, list[Any]] = {}
                for row in pending:
                    count = int(row["times_delivered"])
                    if self._got_here(stream, row["message_id"]):
                        count = max(count - 1, 0)
                    by_count.setdefault(count, []).append(row["message_id"])
                for count, ids in by_count.items():
                    await self.client.xclaim(
                        stream,
                        self.subscription.group,
                        self.consumer_name,
                        0,
                        ids,
                        time=0,
                        retrycount=count,
                        justid=True,
                    )
            except RedisError as exc:
                logger.warning(
                    "Redis consumer %s could not release its pending entries (%s); others "
                    "take them over after %d ms",
                    self.consumer_name,
                    exc,
                    self.options.reclaim_idle_ms,
                )
                return

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

    async def _reclaim(self) -> bool:
        """Take over entries others left unacknowledged; return whether more may be waiting.

        An entry is taken once idle for ``reclaim_idle_ms``, one at a time, at most
        ``prefetch_count`` per stream and pass, so that reading goes on in between; the scan
        resumes from its cursor on the next pass.
        """
        more = False
        for stream in self.subscription.streams:
            if self._stopping:
                break
            await self._take_over(
                stream,
                owner="",
                min_idle=self.options.reclaim_idle_ms,
                counted=True,
                cursors=self._cursors,
                limit=self.options.prefetch_count,
            )
            more = more or self._cursors.get(stream) is not None
        return more

    # -- handling ----------------------------------------------------------------------------

    async def _handle_batch(self, entries: Sequence[_Entry]) -> None:
        """Handle entries in order; acknowledge the handled ones as the batch goes.

        A stop request lets the handler in flight finish; the entries not started yet stay
        pending and are released by ``run``. A cancellation (a killed worker) acknowledges
        nothing more: those entries are taken over by another consumer later. If the
        acknowledgement fails (a Redis error), the handled entries stay in ``_unacked`` and
        ``run`` acknowledges them before reading again: they are not handled twice.
        """
        loop = asyncio.get_running_loop()
        # Redis counts an entry's idle time from its read: entries waiting in a long batch
        # would be taken over by others. Every half ``reclaim_idle_ms`` the handled ones
        # are acknowledged and the waiting ones claimed again (``_keep``).
        refresh = self.options.reclaim_idle_ms / 2000
        touched = loop.time()
        waiting = deque(entries)
        while waiting and not self._stopping:
            if loop.time() - touched > refresh:
                await self._acknowledge()
                waiting = await self._keep(waiting, loop.time() - touched)
                touched = loop.time()
                continue
            stream, entry_id, fields, delivered = waiting.popleft()
            if await self._handle_entry(stream, entry_id, fields, delivered):
                self._unacked.setdefault(stream, []).append(entry_id)
        await self._acknowledge()

    async def _keep(self, waiting: deque[_Entry], held_for: float) -> deque[_Entry]:
        """Claim the batch's waiting entries again, dropping those another consumer took.

        Claimed again, an entry's idle time starts over. One still held has been idle
        ``held_for`` seconds; one taken over, at most ``held_for - reclaim_idle_ms``.
        Claiming only entries idle for more than halfway between keeps ours and never
        takes one back. ``JUSTID`` leaves delivery counts alone.
        """
        min_idle = max(int(held_for * 1000 - self.options.reclaim_idle_ms / 2), 0)
        by_stream: dict[bytes, list[Any]] = {}
        for stream, entry_id, _, _ in waiting:
            by_stream.setdefault(stream, []).append(entry_id)
        kept: set[tuple[bytes, bytes]] = set()
        for stream, ids in by_stream.items():
            claimed: Any = await self.client.xclaim(
                stream,
                self.subscription.group,
                self.consumer_name,
                min_idle,
                ids,
                justid=True,
            )
            kept.update((stream, entry_id) for entry_id in claimed)
        return deque(entry for entry in waiting if (entry[0], entry[1]) in kept)

    async def _acknowledge(self) -> None:
        """Acknowledge the handled entries (and delete those of owned streams)."""
        if not self._unacked:
            return
        group = self.subscription.group
        async with self.client.pipeline(transaction=False) as pipe:
            for stream, ids in self._unacked.items():
                pipe.xack(stream, group, *ids)
                if stream.decode() in self.subscription.owned:
                    pipe.xdel(stream, *ids)
            await pipe.execute()
        self._unacked = {}

    async def _handle_entry(
        self,
        stream: bytes,
        entry_id: bytes,
        fields: Mapping[bytes, bytes],
        delivered: int | None,
    ) -> bool:
        """Handle one entry; return whether it is to be acknowledged with the batch."""
        entry = _Delivery(stream, entry_id, fields)
        if entry.body is None:
            await self._dead_letter(entry, entry.attempt - 1, "entry has no 'body' field")
            return False
        try:
            routed = self.route(entry.body, entry.replay)
        except Exception as exc:  # a body no retry can fix: keep it aside at once
            await self._dead_letter(entry, entry.attempt - 1, describe_error(exc))
            return False
        if routed is None:
            return True  # not for this listener: acknowledged without calling anyone
        handler, message = routed
        if delivered is not None and delivered > self.options.max_deliveries + 1:
            # This takeover is not handled. The deliveries before it ended with their
            # consumer stopping before an acknowledgement: each takeover right after its
            # handler started, the first maybe before (it came in a batch). The failed
            # attempts before this one count too.
            earlier = delivered - 1
            takeovers = f"{earlier - 1} takeover{'s' if earlier > 2 else ''}"
            await self._dead_letter(
                entry,
                entry.attempt - 1 + earlier,
                f"delivered {earlier} times to consumers that stopped before acknowledging it"
                f" (a first delivery and {takeovers}; max_deliveries is"
                f" {self.options.max_deliveries})",
            )
            return False
        policy = self.retry_policy
        context = MessageContext(
            attempt=entry.attempt,
            retry_attempts_left=max(policy.retry_attempts - entry.attempt + 1, 0),
            replay=entry.replay,
        )
        try:
            await run_handler(handler, message, context)
        except Exception as exc:
            if entry.attempt <= policy.retry_attempts:
                await self._retry_later(entry, exc)
            else:
                await self._dead_letter(entry, entry.attempt, describe_error(exc), exc)
            return False
        return True

    async def _retry_later(self, entry: _Delivery, error: Exception) -> None:
        delay_ms = round(self.retry_policy.delay_for(entry.attempt) * 1000)
        stream = entry.stream.decode()
        # The member names where it came from, so a failure recorded twice (two consumers
        # handling the same entry) schedules one retry; the script parses the other parts.
        origin = self.subscription.streams.index(stream)
        member = b"%d %d %d:%s %s" % (
            entry.attempt + 1,
            entry.replay,
            origin,
            entry.entry_id,
            entry.body or b"",
        )
        owned = stream in self.subscription.owned
        await self._schedule_retry(
            keys=[self.subscription.delayed, stream],
            args=[self.subscription.group, entry.entry_id, delay_ms, member, int(owned)],
        )
        self._next_promote = min(
            self._next_promote, asyncio.get_running_loop().time() + delay_ms / 1000
        )
        logger.info(
            "Redis consumer %s: attempt %d failed (%s); retrying in %d ms",
            self.consumer_name,
            entry.attempt,
            describe_error(error),
            delay_ms,
        )

    async def _dead_letter(
        self,
        entry: _Delivery,
        attempts: int,
        text: str,
        error: BaseException | None = None,
    ) -> None:
        body = entry.body or b""
        letter: dict[Any, Any] = {
            b"body": body,
            b"replay": b"1" if entry.replay else b"0",
            b"attempts": attempts,
            b"error": text,
        }
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.subscription.dead, letter)
            pipe.xack(entry.stream, self.subscription.group, entry.entry_id)
            if entry.stream.decode() in self.subscription.owned:
                pipe.xdel(entry.stream, entry.entry_id)
            await pipe.execute()
        listener = self.subscription.listener_id
        logger.error(
            "Redis consumer %s gave up on a message after %d attempt(s)%s: %s; it is in "
            "dead-letter stream %s; message: %s",
            self.consumer_name,
            attempts,
            f" in listener {listener}" if listener else "",
            text,
            self.subscription.dead,
            body.decode(errors="replace"),
            exc_info=error,
        )


class _Delivery:
    """One stream entry being handled, with its fields decoded."""

    __slots__ = ("attempt", "body", "entry_id", "replay", "stream")

    def __init__(self, stream: bytes, entry_id: bytes, fields: Mapping[bytes, bytes]) -> None:
        self.stream = stream
        self.entry_id = entry_id
        self.body = fields.get(b"body")
        self.replay = fields.get(b"replay") == b"1"
        self.attempt = _attempt(fields.get(b"attempt"))


def _stream_id(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id (``b"<ms>-<seq>"``) as numbers, to compare."""
    milliseconds, _, sequence = entry_id.partition(b"-")
    return int(milliseconds), int(sequence or 0)


def _attempt(raw: bytes | None) -> int:
    """The attempt an entry carries: 1 when absent or malformed (another client wrote it).

    A field that does not parse must not stop the consumer: the entry is handled as a first
    attempt, and the retry policy takes it from there.
    """
    if raw is None:
        return 1
    try:
        attempt = int(raw)
    except ValueError:
        return 1
    return max(attempt, 1)
