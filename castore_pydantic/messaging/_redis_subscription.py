"""The consumer groups of the Redis Streams adapters: their keys and how they are read.

A queue has one group (its workers), a bus one per listener. A ``StreamConsumer`` consumes a
``Subscription`` with ``ConsumerOptions``; its ``Route`` says which handler gets a message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from castore_pydantic.messaging._messages import Message, MessageHandler

__all__ = ["ConsumerOptions", "Route", "Subscription", "ensure_group"]

#: ``(body, replay) -> (handler, validated message)``, or ``None`` when the message is not
#: for this group (then it may not be validated at all); raises when the body does not
#: validate.
Route = Callable[[bytes, bool], tuple[MessageHandler, Message] | None]


@dataclasses.dataclass(frozen=True, slots=True)
class Subscription:
    """One consumer group and the keys it works with.

    Attributes:
        group: The consumer group's name.
        streams: The streams the group reads, the shared one first.
        owned: Streams only this group reads: their entries are deleted once acknowledged.
        start_ids: Where the group starts on each stream when it is created.
        retry_stream: Where due retries are added again.
        delayed: The sorted set of scheduled retries (score: due time in ms).
        dead: The dead-letter stream.
        listener_id: The bus listener (``None`` for a queue).
    """

    group: str
    streams: tuple[str, ...]
    owned: frozenset[str]
    start_ids: tuple[str, ...]
    retry_stream: str
    delayed: str
    dead: str
    listener_id: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ConsumerOptions:
    """How a consumer reads and when it takes over other consumers' entries."""

    prefetch_count: int
    block_ms: int
    reclaim_idle_ms: int
    max_deliveries: int


async def ensure_group(client: Redis, subscription: Subscription) -> None:
    """Create the subscription's consumer groups (and streams) unless they exist."""
    for stream, start_id in zip(subscription.streams, subscription.start_ids, strict=True):
        try:
            await client.xgroup_create(stream, subscription.group, id=start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
