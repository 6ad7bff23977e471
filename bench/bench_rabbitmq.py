"""RabbitMQ adapter benchmark: the queue and bus adapters next to raw aio-pika.

Run ``python -m bench.bench_rabbitmq [--url amqp://guest:guest@127.0.0.1:5672/] [--messages
10000] [--rounds 3]``. Each workload moves the same notification messages end to end --
publish, route, deliver, acknowledge -- with the same reliability on both sides: durable
queues, persistent messages, publisher confirms (pipelined, 1,000 at a time), manual
acknowledgements and the same prefetch. Consumers start before publishing, so publishing and
consuming overlap; the clock stops when the last message was handled.

- library: ``channel.publish_messages(...)`` through the adapter (serialises each message),
  and a worker / bus listener called with the validated message (the adapter parses the body
  with the channel: event validated as one of the store's event types);
- raw: aio-pika publishing the already-serialised bytes with the same headers and routing
  keys, and a consumer that acknowledges each body without decoding it (the floor).

After a warm-up of 1,000 messages each, rounds alternate library and raw; the best round
of each counts. The ratio is library
throughput / raw throughput (target >= 0.8). Everything is declared under unique names in
the given vhost and deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika

from bench._pokemons import STORE, notifications
from castore_pydantic.messaging import (
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
)
from castore_pydantic.messaging.rabbitmq import (
    RabbitMQMessageBusAdapter,
    RabbitMQMessageQueueAdapter,
    routing_key,
)

PREFETCH = 100
CHUNK = 1000


# -- a finish line both sides cross -----------------------------------------------------------


class FinishLine:
    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.crossed = asyncio.Event()

    def tick(self) -> None:
        self.count += 1
        if self.count == self.total:
            self.crossed.set()


# -- library ----------------------------------------------------------------------------------


async def library_queue(url: str, prefix: str, messages: list[NotificationMessage]) -> float:
    queue = NotificationMessageQueue(message_queue_id="queue", source_event_stores=[STORE])
    finish = FinishLine(len(messages))

    async def worker(message: NotificationMessage, context: MessageContext) -> None:
        finish.tick()

    adapter = RabbitMQMessageQueueAdapter.attach_to(
        queue, url, worker=worker, prefetch_count=PREFETCH, name_prefix=prefix
    )
    async with adapter:
        await adapter.purge()
        await adapter.connect()
        async with adapter.consuming():
            started = time.perf_counter()
            for start in range(0, len(messages), CHUNK):
                await queue.publish_messages(messages[start : start + CHUNK])
            await finish.crossed.wait()
            elapsed = time.perf_counter() - started
        await adapter.purge()
    return elapsed


async def library_bus(url: str, prefix: str, messages: list[NotificationMessage]) -> float:
    bus = NotificationMessageBus(message_bus_id="bus", source_event_stores=[STORE])
    finish = FinishLine(len(messages))

    async def listener(message: NotificationMessage, context: MessageContext) -> None:
        finish.tick()

    adapter = RabbitMQMessageBusAdapter.attach_to(
        bus, url, prefetch_count=PREFETCH, name_prefix=prefix
    )
    adapter.on({"event_store_id": "POKEMONS"}, listener, listener_id="projection")
    async with adapter:
        await adapter.purge()
        await adapter.connect()
        async with adapter.consuming():
            started = time.perf_counter()
            for start in range(0, len(messages), CHUNK):
                await bus.publish_messages(messages[start : start + CHUNK])
            await finish.crossed.wait()
            elapsed = time.perf_counter() - started
        await adapter.purge()
    return elapsed


# -- raw aio-pika -----------------------------------------------------------------------------


async def raw_run(
    url: str,
    queue_name: str,
    exchange_name: str | None,
    bodies: list[tuple[bytes, str]],
) -> float:
    """Publish ``(body, routing key)`` pairs and consume them, as reliably as the adapters."""
    finish = FinishLine(len(bodies))
    publisher = await aio_pika.connect(url)
    consumer = await aio_pika.connect(url)
    try:
        publish_channel = await publisher.channel(publisher_confirms=True)
        consume_channel = await consumer.channel(publisher_confirms=True)
        await consume_channel.set_qos(prefetch_count=PREFETCH)
        queue = await consume_channel.declare_queue(queue_name, durable=True)
        if exchange_name is None:
            exchange = publish_channel.default_exchange
        else:
            exchange = await publish_channel.declare_exchange(
                exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
            )
            await queue.bind(exchange_name, "live.POKEMONS.*")

        async def on_message(incoming: aio_pika.abc.AbstractIncomingMessage) -> None:
            await incoming.ack()
            finish.tick()

        tag = await queue.consume(on_message)
        started = time.perf_counter()
        for start in range(0, len(bodies), CHUNK):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            body,
                            headers={"replay": False},
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        key,
                        mandatory=False,
                    )
                    for body, key in bodies[start : start + CHUNK]
                )
            )
        await finish.crossed.wait()
        elapsed = time.perf_counter() - started
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        if exchange_name is not None:
            await publish_channel.exchange_delete(exchange_name)
    finally:
        await publisher.close()
        await consumer.close()
    return elapsed


async def raw_queue(url: str, prefix: str, messages: list[NotificationMessage]) -> float:
    name = f"{prefix}raw-queue"
    bodies = [(message.model_dump_json().encode(), name) for message in messages]
    return await raw_run(url, name, None, bodies)


async def raw_bus(url: str, prefix: str, messages: list[NotificationMessage]) -> float:
    bodies = [(message.model_dump_json().encode(), routing_key(message)) for message in messages]
    return await raw_run(url, f"{prefix}raw-bus.projection", f"{prefix}raw-bus", bodies)


# -- driver -----------------------------------------------------------------------------------

Runner = Callable[[str, str, list[NotificationMessage]], Awaitable[float]]


async def compare(
    label: str,
    library: Runner,
    raw: Runner,
    *,
    url: str,
    messages: list[NotificationMessage],
    rounds: int,
) -> dict[str, Any]:
    prefix = f"castore-bench-{secrets.token_hex(4)}."
    # Warm up both paths (imports, validators, broker queues) before timing anything.
    await library(url, prefix, messages[:CHUNK])
    await raw(url, prefix, messages[:CHUNK])
    best_library = best_raw = float("inf")
    for _ in range(rounds):
        best_library = min(best_library, await library(url, prefix, messages))
        best_raw = min(best_raw, await raw(url, prefix, messages))
    library_rate = len(messages) / best_library
    raw_rate = len(messages) / best_raw
    return {
        "workload": label,
        "library_msgs_per_s": library_rate,
        "raw_msgs_per_s": raw_rate,
        "ratio": library_rate / raw_rate,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    messages = notifications(args.messages, metadata={"source": "bench"})
    results = [
        await compare(
            "queue", library_queue, raw_queue, url=args.url, messages=messages, rounds=args.rounds
        ),
        await compare(
            "bus", library_bus, raw_bus, url=args.url, messages=messages, rounds=args.rounds
        ),
    ]
    print(f"{args.messages} notification messages, publish + consume, best of {args.rounds}")
    print(f"{'workload':<10}{'library msg/s':>16}{'raw msg/s':>14}{'ratio':>9}")
    for result in results:
        print(
            f"{result['workload']:<10}{result['library_msgs_per_s']:>16,.0f}"
            f"{result['raw_msgs_per_s']:>14,.0f}{result['ratio']:>9.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
