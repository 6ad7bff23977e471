"""Taking over pending Redis Streams entries, and handing them back when a consumer stops.

``ConsumerTakeovers`` is the part of ``StreamConsumer`` (``_redis_consumer``) that claims
pending entries one at a time, each just before its handler starts: at start-up those
pending under its own name, then any consumer's once idle for ``reclaim_idle_ms``. On a stop
it hands back what it holds, for others to take at once.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from castore_pydantic.messaging._redis_handling import ConsumerHandling

__all__ = ["ConsumerTakeovers"]

logger = logging.getLogger("castore_pydantic.messaging.redis")


class ConsumerTakeovers(ConsumerHandling):
    """Takes over and hands back pending entries; ``StreamConsumer`` sets the state."""

    _claim_next: AsyncScript
    _cursors: dict[str, bytes | None]
    _start_up: dict[str, bytes | None]

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


def _stream_id(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id (``b"<ms>-<seq>"``) as numbers, to compare."""
    milliseconds, _, sequence = entry_id.partition(b"-")
    return int(milliseconds), int(sequence or 0)
