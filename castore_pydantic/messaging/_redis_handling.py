"""Handling the entries a Redis Streams consumer holds: acknowledge, retry or dead-letter.

``ConsumerHandling`` is the part of ``StreamConsumer`` (``_redis_consumer``) that hands an
entry to its handler and settles it: acknowledged once handled, with its batch; or
scheduled for a retry and acknowledged in one Lua script; or, once the retry budget is
spent, dead-lettered and acknowledged in another. Both scripts write the retry or the dead
letter only if the entry was still pending in the group: not after a purge deleted it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from castore_pydantic.messaging._messages import (
    MessageContext,
    RetryPolicy,
    describe_error,
    run_handler,
)
from castore_pydantic.messaging._redis_subscription import ConsumerOptions, Route, Subscription

__all__ = ["ConsumerHandling", "Entry"]

logger = logging.getLogger("castore_pydantic.messaging.redis")

# An entry as read: (stream, entry id, fields, delivery count when known).
Entry = tuple[bytes, bytes, Mapping[bytes, bytes], int | None]


class ConsumerHandling:
    """Handles a consumer's entries; ``StreamConsumer`` sets the state declared here."""

    client: Redis
    subscription: Subscription
    consumer_name: str
    route: Route
    retry_policy: RetryPolicy
    options: ConsumerOptions
    _schedule_retry: AsyncScript
    _dead_letter_script: AsyncScript
    _stopping: bool
    _purges: int
    _unacked: dict[bytes, list[bytes]]
    _next_promote: float

    # -- handling ----------------------------------------------------------------------------

    async def _handle_batch(self, entries: Sequence[Entry], purges: int) -> None:
        """Handle entries in order; acknowledge the handled ones as the batch goes.

        A stop request lets the handler in flight finish; the entries not started yet stay
        pending and are released by ``run``. A cancellation (a killed worker) acknowledges
        nothing more: those entries are taken over by another consumer later. If the
        acknowledgement fails (a Redis error), the handled entries stay in ``_unacked`` and
        ``run`` acknowledges them before reading again: they are not handled twice. A purge
        by this adapter drops the entries not started yet: their stream is gone.
        ``purges`` is ``_purges`` from before the read: if a purge ran during the read, only
        the entries still pending in the group (read after it) are handled.
        """
        loop = asyncio.get_running_loop()
        # Redis counts an entry's idle time from its read: entries waiting in a long batch
        # would be taken over by others. Every half ``reclaim_idle_ms`` the handled ones
        # are acknowledged and the waiting ones claimed again (``_keep``).
        refresh = self.options.reclaim_idle_ms / 2000
        touched = loop.time()
        waiting = deque(entries)
        if self._purges != purges:
            # Read before the purge, an entry is gone with its stream and group; read after
            # it, it is pending in the group created again.
            waiting = await self._claim_again(waiting, 0)
            purges = self._purges
        while waiting and not self._stopping and self._purges == purges:
            if loop.time() - touched > refresh:
                await self._acknowledge()
                waiting = await self._keep(waiting, loop.time() - touched)
                touched = loop.time()
                continue
            stream, entry_id, fields, delivered = waiting.popleft()
            if await self._handle_entry(stream, entry_id, fields, delivered):
                self._unacked.setdefault(stream, []).append(entry_id)
        await self._acknowledge()

    async def _keep(self, waiting: deque[Entry], held_for: float) -> deque[Entry]:
        """Claim the batch's waiting entries again, dropping those another consumer took.

        Claimed again, an entry's idle time starts over. One still held has been idle
        ``held_for`` seconds; one taken over, at most ``held_for - reclaim_idle_ms``.
        Claiming only entries idle for more than halfway between keeps ours and never
        takes one back. ``JUSTID`` leaves delivery counts alone.
        """
        min_idle = max(int(held_for * 1000 - self.options.reclaim_idle_ms / 2), 0)
        return await self._claim_again(waiting, min_idle)

    async def _claim_again(self, waiting: deque[Entry], min_idle: int) -> deque[Entry]:
        """Claim entries again, keeping those pending in the group and idle ``min_idle`` ms."""
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
            await self._failed(entry, exc)
            return False
        return True

    async def _failed(self, entry: _Delivery, error: Exception) -> None:
        """Retry a failed entry later, or dead-letter it once its retries are spent."""
        if entry.attempt <= self.retry_policy.retry_attempts:
            await self._retry_later(entry, error)
        else:
            await self._dead_letter(entry, entry.attempt, describe_error(error), error)

    async def _retry_later(self, entry: _Delivery, error: Exception) -> None:
        delay_ms = round(self.retry_policy.delay_for(entry.attempt) * 1000)
        stream = entry.stream.decode()
        # The member names where it came from, so that two retries of one entry are one;
        # the script parses the other parts.
        origin = self.subscription.streams.index(stream)
        member = b"%d %d %d:%s %s" % (
            entry.attempt + 1,
            entry.replay,
            origin,
            entry.entry_id,
            entry.body or b"",
        )
        owned = stream in self.subscription.owned
        due = await self._schedule_retry(
            keys=[self.subscription.delayed, stream],
            args=[self.subscription.group, entry.entry_id, delay_ms, member, int(owned)],
        )
        if due is None:
            _not_pending(self.consumer_name, describe_error(error))
            return
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
        owned = entry.stream.decode() in self.subscription.owned
        added = await self._dead_letter_script(
            keys=[self.subscription.dead, entry.stream],
            args=[
                self.subscription.group,
                entry.entry_id,
                int(owned),
                *(part for pair in letter.items() for part in pair),
            ],
        )
        if not added:
            _not_pending(self.consumer_name, text)
            return
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


def _not_pending(consumer_name: str, reason: str) -> None:
    """Log a failed entry dropped because its group no longer held it as pending."""
    logger.info(
        "Redis consumer %s: a message failed (%s) but is no longer pending in its group "
        "(the channel was purged, or another consumer took it over and settled it); it is "
        "neither retried nor dead-lettered",
        consumer_name,
        reason,
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
