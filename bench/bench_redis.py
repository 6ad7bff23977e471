"""Redis Streams adapter benchmark: the queue and bus adapters next to raw redis-py.

Run ``python -m bench.bench_redis [--url redis://127.0.0.1:6379/0] [--messages 10000]
[--rounds 3]``. Each workload moves the same notification messages end to end -- append,
read through a consumer group, acknowledge -- with the same batch sizes on both sides:
1,000 appends per round trip and ``XREADGROUP COUNT 100``. Consumers start before publishing,
so publishing and consuming overlap; the clock stops when the last message was handled.

- library: ``channel.publish_messages(...)`` through the adapter (serialises each message,
  appends them in one ``MULTI``), and a worker / bus listener called with the validated
  message (the adapter parses each body with the channel: the event is validated as one of
  the store's event types), acknowledged in batches;
- raw: redis-py appending the already-serialised bodies with the same fields in a pipeline,
  and a consumer that reads them with ``XREADGROUP`` and acknowledges each batch with
  ``XACK`` without decoding the bodies (the floor).

After a warm-up, rounds alternate library and raw; the best round of each counts. The ratio is
library throughput / raw throughput (target >= 0.8). Every key lives under a unique prefix
and is deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Literal

from redis.asyncio import Redis

from bench._pokemons import STORE, T0, Appeared, PokemonAppeared
from castore_pydantic.messaging import (
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
)
from castore_pydantic.messaging.redis import RedisMessageBusAdapter, RedisMessageQueueAdapter

PREFETCH = 100
CHUNK = 1000


def messages(count: int) -> list[NotificationMessage]:
    return [
        NotificationMessage(
            event_store_id="POKEMONS",
            event=PokemonAppeared(
                aggregate_id=f"pokemon-{index}",
                version=1,
                timestamp=T0 + timedelta(milliseconds=index),
                payload=Appeared(
                    name=f"Pokemon {index}", level=index % 100 + 1, moves=["tackle", "growl"]
                ),
            ),
        )
        for index in range(count)
    ]


# -- workloads --------------------------------------------------------------------------------


class Countdown:
    """A handler that counts messages and wakes the benchmark at the last one."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = 0
        self.done = asyncio.Event()

    async def __call__(self, message: Any, context: MessageContext) -> None:
        self.seen += 1
        if self.seen == self.expected:
            self.done.set()


async def library_round(
    kind: Literal["queue", "bus"], url: str, prefix: str, batch: list[NotificationMessage]
) -> float:
    """Seconds to publish and handle ``batch`` through the adapter."""
    countdown = Countdown(len(batch))
    channel: Any
    adapter: RedisMessageQueueAdapter | RedisMessageBusAdapter
    if kind == "queue":
        channel = NotificationMessageQueue(message_queue_id="bench", source_event_stores=[STORE])
        adapter = RedisMessageQueueAdapter.attach_to(
            channel, url, worker=countdown, key_prefix=prefix, prefetch_count=PREFETCH
        )
    else:
        channel = NotificationMessageBus(message_bus_id="bench", source_event_stores=[STORE])
        adapter = RedisMessageBusAdapter.attach_to(
            channel, url, key_prefix=prefix, prefetch_count=PREFETCH
        )
        adapter.on({}, countdown, listener_id="bench")
    async with adapter:
        async with adapter.consuming():
            start = time.perf_counter()
            for first in range(0, len(batch), CHUNK):
                await channel.publish_messages(batch[first : first + CHUNK])
            await countdown.done.wait()
            elapsed = time.perf_counter() - start
        await adapter.purge()
    return elapsed


async def raw_round(
    kind: Literal["queue", "bus"], url: str, prefix: str, batch: list[NotificationMessage]
) -> float:
    """Seconds for redis-py to move the same bodies: XADD, XREADGROUP, XACK."""
    bodies = [message.model_dump_json() for message in batch]
    stream = f"{prefix}raw-{kind}"
    client: Redis = Redis.from_url(url, decode_responses=False)
    await client.xgroup_create(stream, "bench", id="0", mkstream=True)
    expected = len(bodies)

    async def consume() -> None:
        seen = 0
        while seen < expected:
            reply: Any = await client.xreadgroup(
                "bench", "raw", {stream: ">"}, count=PREFETCH, block=1000
            )
            for _, entries in reply or ():
                ids = [entry_id for entry_id, _ in entries]
                await client.xack(stream, "bench", *ids)
                seen += len(ids)

    try:
        consumer = asyncio.create_task(consume())
        start = time.perf_counter()
        for first in range(0, expected, CHUNK):
            async with client.pipeline(transaction=False) as pipe:
                for body in bodies[first : first + CHUNK]:
                    pipe.xadd(stream, {"body": body, "replay": "0"})
                await pipe.execute()
        await consumer
        elapsed = time.perf_counter() - start
    finally:
        await client.delete(stream)
        await client.aclose()
    return elapsed


async def compare(
    kind: Literal["queue", "bus"], url: str, count: int, rounds: int
) -> dict[str, float]:
    prefix = f"castore-bench:{secrets.token_hex(4)}:"
    batch = messages(count)
    runs: dict[str, Callable[[], Awaitable[float]]] = {
        "library": lambda: library_round(kind, url, prefix, batch),
        "raw": lambda: raw_round(kind, url, prefix, batch),
    }
    warm = messages(1000)
    await library_round(kind, url, prefix, warm)
    await raw_round(kind, url, prefix, warm)
    best = {name: float("inf") for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            best[name] = min(best[name], await run())
    library_rate, raw_rate = count / best["library"], count / best["raw"]
    return {"library_msgs_per_s": library_rate, "raw_msgs_per_s": raw_rate}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.messages} notification messages, publish + consume, best of {args.rounds}")
    print(f"{'workload':<10}{'library msg/s':>16}{'raw msg/s':>14}{'ratio':>9}")
    for kind in ("queue", "bus"):
        result = await compare(kind, args.url, args.messages, args.rounds)
        ratio = result["library_msgs_per_s"] / result["raw_msgs_per_s"]
        print(
            f"{kind:<10}{result['library_msgs_per_s']:>16,.0f}"
            f"{result['raw_msgs_per_s']:>14,.0f}{ratio:>9.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
