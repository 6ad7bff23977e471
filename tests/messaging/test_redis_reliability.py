"""Redis adapters under failure: workers killed before acknowledging, poison messages.

Everything runs against the real server under a private key prefix. A "kill" is what a
crashed process looks like to Redis: the worker's task is cancelled in the middle of a handler
(half the time after its connections were cut with ``CLIENT KILL``), so the entries it held
are never acknowledged and must be taken over by another consumer, one entry at a time.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from redis.asyncio import Redis

from castore_pydantic.messaging import (
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
)
from castore_pydantic.messaging.redis import RedisMessageBusAdapter, RedisMessageQueueAdapter
from tests.domain import make_store
from tests.messaging.redis_support import (
    REDIS_URL,
    Key,
    connections_named,
    event_key,
    notification,
    private_prefix,
    raw_client,
    watch_dead_letters,
)

pytestmark = [pytest.mark.redis]

MESSAGES = 10_000
KILL_EVERY = 20  # 5 % of the messages are in a worker's hands when it dies
WORKERS = 2
#: A guard against a stall, not a speed requirement: quiet, a kill test takes about 20 s (the
#: entries each killed worker held are taken over one at a time, a round trip each); on a
#: loaded 2-core machine (Redis and the workers sharing the CPU with other work) several times
#: that.
DONE_WITHIN = 180
FLAKY = 50  # messages a broken handler refuses, out of 1,000
OPTIONS: dict[str, Any] = {
    "prefetch_count": 50,
    "reclaim_idle_ms": 250,
    "block_ms": 50,
    "retry_delay_in_ms": 20,
}


#: Kills the worker whose handler calls it.
Die = Callable[[], Awaitable[None]]
#: Builds a worker's adapter: ``make(consumer_name, die)``.
MakeAdapter = Callable[[str, Die], Any]


async def never() -> None:
    raise AssertionError("the publisher's adapter does not consume")


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with private_prefix() as value:
        yield value


@pytest.fixture
async def raw() -> AsyncIterator[Redis]:
    client = raw_client()
    yield client
    await client.aclose()


async def pending_count(raw: Redis, stream: str, group: str) -> int:
    summary: Any = await raw.xpending(stream, group)
    return int(summary["pending"])


async def until_acknowledged(raw: Redis, stream: str, groups: Sequence[str]) -> None:
    """Wait (polling, 15 s at most) until no group holds an unacknowledged entry."""
    async with asyncio.timeout(15):
        while True:
            counts = [await pending_count(raw, stream, group) for group in groups]
            if not any(counts):
                return
            await asyncio.sleep(0.05)  # Redis has no event for "pending list is empty"


class KillingConsumer:
    """A deduplicating consumer whose worker dies holding 5 % of the messages.

    For each doomed message, on its first delivery, the effect is applied and then the worker
    dies before acknowledging. The message must come back, and the deduplication on
    ``(event_store_id, aggregate_id, version)`` keeps one effect per event.
    """

    def __init__(self, messages: Sequence[NotificationMessage], offset: int = 0) -> None:
        self.expected = {event_key(message) for message in messages}
        self.doomed = {event_key(message) for message in messages[offset::KILL_EVERY]}
        self.killed: set[Key] = set()
        self.deliveries: Counter[Key] = Counter()
        self.effects: Counter[Key] = Counter()
        self.redelivered = 0
        self.done = asyncio.Event()

    def _apply(self, key: Key) -> None:
        if key not in self.effects:  # deduplication: the effect happened already
            self.effects[key] += 1
        self._check_done()

    def _check_done(self) -> None:
        if len(self.effects) == len(self.expected) and self.redelivered == len(self.doomed):
            self.done.set()

    def handler(self, die: Callable[[], Awaitable[None]]) -> Any:
        async def handle(message: NotificationMessage, context: MessageContext) -> None:
            key = event_key(message)
            self.deliveries[key] += 1
            if key in self.killed and self.deliveries[key] == 2:
                self.redelivered += 1
            if key in self.doomed and key not in self.killed:
                self.killed.add(key)
                self._apply(key)  # the effect lands, the acknowledgement never does
                await die()
            self._apply(key)

        return handle

    def progress(self) -> str:
        """Where a run stands, for the failure message of a run that did not finish."""
        return (
            f"{len(self.effects)}/{len(self.expected)} messages applied, "
            f"{self.redelivered}/{len(self.doomed)} killed ones redelivered, "
            f"{sum(self.deliveries.values())} deliveries"
        )

    def check(self) -> None:
        """Every event delivered at least once, applied exactly once; redeliveries happened."""
        assert self.killed == self.doomed
        assert set(self.deliveries) == self.expected
        assert set(self.effects) == self.expected
        assert set(self.effects.values()) == {1}
        assert all(self.deliveries[key] >= 2 for key in self.killed)
        assert sum(self.deliveries.values()) > len(self.expected)


class Worker:
    """One worker process: runs an adapter until it is killed, then starts a fresh one."""

    def __init__(self, slot: str, raw: Redis, make: MakeAdapter) -> None:
        self.slot = slot
        self.raw = raw
        self.make = make
        self.kills = Counter[str]()

    async def die(self, name: str, died: asyncio.Event) -> None:
        """Kill this worker from inside a handler: cut its connections (every other time)."""
        if sum(self.kills.values()) % 2:
            for client_id in await connections_named(self.raw, f"castore:{name}"):
                await self.raw.client_kill_filter(_id=str(client_id))
            self.kills["connection"] += 1
        else:
            self.kills["cancel"] += 1
        died.set()
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)  # the consumer task dies here, holding its unacknowledged entries

    async def run(self, finished: asyncio.Event) -> None:
        for generation in itertools.count():
            if finished.is_set():
                return
            died = asyncio.Event()
            name = f"worker-{self.slot}-{generation}"

            async def die(name: str = name, died: asyncio.Event = died) -> None:
                await self.die(name, died)

            adapter = self.make(name, die)
            async with adapter, adapter.consuming():
                waits = {asyncio.ensure_future(died.wait()), asyncio.ensure_future(finished.wait())}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for wait in waits:
                    wait.cancel()


async def run_workers(
    raw: Redis,
    makers: Sequence[MakeAdapter],
    finished: asyncio.Event,
    consumers: Sequence[KillingConsumer],
) -> list[Worker]:
    """Run ``WORKERS`` competing workers per adapter maker until ``finished``."""
    workers = [
        Worker(f"{kind}{slot}", raw, make)
        for kind, make in enumerate(makers)
        for slot in range(WORKERS)
    ]
    try:
        async with asyncio.timeout(DONE_WITHIN):
            await asyncio.gather(*(worker.run(finished) for worker in workers))
    except TimeoutError:
        progress = "; ".join(consumer.progress() for consumer in consumers)
        pytest.fail(f"not done after {DONE_WITHIN}s: {progress}")
    return workers


class TestKilledWorkers:
    @pytest.mark.slow
    async def test_queue_delivers_every_message_when_workers_die(
        self, prefix: str, raw: Redis
    ) -> None:
        """10,000 messages, workers killed holding 5 %: all delivered, one effect per event."""
        store = make_store()
        messages = [notification(index) for index in range(MESSAGES)]
        consumer = KillingConsumer(messages)

        def make(name: str, die: Die) -> RedisMessageQueueAdapter:
            queue = NotificationMessageQueue(message_queue_id="orders", source_event_stores=[store])
            return RedisMessageQueueAdapter.attach_to(
                queue,
                REDIS_URL,
                key_prefix=prefix,
                name=name,
                worker=consumer.handler(die),
                **OPTIONS,
            )

        publisher_queue = NotificationMessageQueue(
            message_queue_id="orders", source_event_stores=[store]
        )
        async with RedisMessageQueueAdapter.attach_to(
            publisher_queue, REDIS_URL, key_prefix=prefix
        ) as publisher:
            for start in range(0, MESSAGES, 1000):
                await publisher_queue.publish_messages(messages[start : start + 1000])
            workers = await run_workers(raw, [make], consumer.done, [consumer])
            await until_acknowledged(raw, publisher.stream_key, ["workers"])
            assert await raw.xlen(publisher.stream_key) == 0
        consumer.check()
        kills = sum((worker.kills for worker in workers), Counter[str]())
        assert kills["cancel"] > 0
        assert kills["connection"] > 0

    @pytest.mark.slow
    async def test_bus_delivers_every_message_to_every_listener_when_workers_die(
        self, prefix: str, raw: Redis
    ) -> None:
        """10,000 messages, two listeners, their workers killed holding 5 % of the messages."""
        store = make_store()
        messages = [notification(index) for index in range(MESSAGES)]
        projection = KillingConsumer(messages)
        audit = KillingConsumer(messages, offset=KILL_EVERY // 2)
        finished = asyncio.Event()

        async def watch_both() -> None:
            await projection.done.wait()
            await audit.done.wait()
            finished.set()

        def maker(listener_id: str, consumer: KillingConsumer) -> MakeAdapter:
            """Workers running one listener each, as separate processes would."""

            def make(name: str, die: Die) -> RedisMessageBusAdapter:
                bus = NotificationMessageBus(message_bus_id="events", source_event_stores=[store])
                adapter = RedisMessageBusAdapter.attach_to(
                    bus, REDIS_URL, key_prefix=prefix, name=name, **OPTIONS
                )
                adapter.on({}, consumer.handler(die), listener_id=listener_id)
                return adapter

            return make

        watcher = asyncio.create_task(watch_both())
        bus = NotificationMessageBus(message_bus_id="events", source_event_stores=[store])
        publisher = RedisMessageBusAdapter.attach_to(bus, REDIS_URL, key_prefix=prefix)
        publisher.on({}, projection.handler(never), listener_id="projection")
        publisher.on({}, audit.handler(never), listener_id="audit")
        async with publisher:  # creates both listeners' consumer groups; never consumes
            for start in range(0, MESSAGES, 1000):
                await bus.publish_messages(messages[start : start + 1000])
            await run_workers(
                raw,
                [maker("projection", projection), maker("audit", audit)],
                finished,
                [projection, audit],
            )
            await until_acknowledged(raw, publisher.stream_key, ["projection", "audit"])
        await watcher
        projection.check()
        audit.check()


class Flaky:
    """A handler that refuses some messages while ``broken``, recording every call."""

    def __init__(self, refused: set[Key]) -> None:
        self.refused = refused
        self.broken = True
        self.contexts: dict[Key, list[MessageContext]] = {}
        self.effects: Counter[Key] = Counter()
        self.changed = asyncio.Event()

    async def __call__(self, message: NotificationMessage, context: MessageContext) -> None:
        key = event_key(message)
        self.contexts.setdefault(key, []).append(context)
        self.changed.set()
        if self.broken and key in self.refused:
            raise ValueError(f"cannot handle {key[1]} yet")
        self.effects[key] += 1

    async def wait_for_effects(self, count: int) -> None:
        async with asyncio.timeout(30):
            while sum(self.effects.values()) < count:
                self.changed.clear()
                await self.changed.wait()


class TestPoisonMessages:
    async def test_queue_dead_letters_failing_messages_and_republishes_them(
        self, prefix: str, raw: Redis
    ) -> None:
        """50 of 1,000 fail: retried to the budget, dead-lettered; republished after a fix."""
        store = make_store()
        queue = NotificationMessageQueue(message_queue_id="orders", source_event_stores=[store])
        messages = [notification(index) for index in range(1000)]
        refused = {event_key(message) for message in messages[::20]}
        worker = Flaky(refused)
        adapter = RedisMessageQueueAdapter.attach_to(
            queue, REDIS_URL, key_prefix=prefix, worker=worker, **OPTIONS
        )
        with watch_dead_letters() as watch:
            async with adapter:
                async with adapter.consuming():
                    await queue.publish_messages(messages)
                    await worker.wait_for_effects(950)
                    await watch.wait_for(FLAKY)
                letters = await adapter.dead_letters()
                worker.broken = False
                assert await adapter.republish_dead_letters() == FLAKY
                async with adapter.consuming():
                    await worker.wait_for_effects(1000)
                assert await adapter.dead_letters() == []
                assert await pending_count(raw, adapter.stream_key, "workers") == 0
        assert {event_key(letter.message) for letter in letters} == refused
        assert {letter.attempts for letter in letters} == {3}
        assert all(
            letter.error == f"ValueError: cannot handle {event_key(letter.message)[1]} yet"
            for letter in letters
        )
        assert set(worker.effects) == {event_key(message) for message in messages}
        assert set(worker.effects.values()) == {1}
        for key in refused:
            assert [(c.attempt, c.retry_attempts_left) for c in worker.contexts[key]] == [
                (1, 2),
                (2, 1),
                (3, 0),
                (1, 2),  # republished: a fresh budget
            ]
        assert all(len(worker.contexts[key]) == 1 for key in worker.effects if key not in refused)

    async def test_bus_dead_letters_one_listeners_failures_and_republishes_them(
        self, prefix: str
    ) -> None:
        """One listener fails 50 of 1,000; the other handles all once; republish fixes the 50."""
        store = make_store()
        bus = NotificationMessageBus(message_bus_id="events", source_event_stores=[store])
        messages = [notification(index) for index in range(1000)]
        refused = {event_key(message) for message in messages[::20]}
        projection, audit = Flaky(refused), Flaky(set())
        adapter = RedisMessageBusAdapter.attach_to(bus, REDIS_URL, key_prefix=prefix, **OPTIONS)
        adapter.on({}, projection, listener_id="projection")
        adapter.on({}, audit, listener_id="audit")
        with watch_dead_letters() as watch:
            async with adapter:
                async with adapter.consuming():
                    await bus.publish_messages(messages)
                    await projection.wait_for_effects(950)
                    await audit.wait_for_effects(1000)
                    await watch.wait_for(FLAKY)
                letters = await adapter.dead_letters()
                projection.broken = False
                assert await adapter.republish_dead_letters() == FLAKY
                async with adapter.consuming():
                    await projection.wait_for_effects(1000)
                assert await adapter.dead_letters() == []
        assert {letter.listener_id for letter in letters} == {"projection"}
        assert {event_key(letter.message) for letter in letters} == refused
        assert {letter.attempts for letter in letters} == {3}
        assert set(projection.effects.values()) == {1}
        assert len(projection.effects) == 1000
        # The healthy listener saw each message once: no retries, no republished copies.
        assert all(len(contexts) == 1 for contexts in audit.contexts.values())
        assert len(audit.contexts) == 1000


#: A batch read at once, with the message that kills every worker handling it in the middle.
BATCH = 10
POISON = 4
KILLER_OPTIONS: dict[str, Any] = {
    "prefetch_count": BATCH,
    "reclaim_idle_ms": 100,
    "block_ms": 50,
    "max_deliveries": 2,
}


class WorkerKiller:
    """A handler that kills its worker (cancels its task before acknowledging) on one message.

    It records how often each other message was handled and how often the killer's handler
    started; each worker generation gets a fresh ``died`` event.
    """

    def __init__(self, killer: Key) -> None:
        self.killer = killer
        self.handled: Counter[Key] = Counter()
        self.killer_starts = 0
        self.died = asyncio.Event()

    async def __call__(self, message: NotificationMessage, context: MessageContext) -> None:
        key = event_key(message)
        if key != self.killer:
            self.handled[key] += 1
            return
        self.killer_starts += 1
        self.died.set()
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)  # the worker's task dies here, holding what it read


async def group_settled(raw: Redis, stream: str, group: str) -> bool:
    """Whether the group read the whole stream and holds no unacknowledged entry."""
    newest: Any = await raw.xrevrange(stream, count=1)
    groups: Any = await raw.xinfo_groups(stream)
    (info,) = [info for info in groups if info["name"] == group.encode()]
    read_all = not newest or info["last-delivered-id"] == newest[0][0]
    return read_all and int(info["pending"]) == 0


class TestMessagesThatKillTheirWorkers:
    @pytest.mark.parametrize("kind", ["queue", "bus"])
    @pytest.mark.parametrize("stable_name", [False, True], ids=["new-names", "stable-name"])
    async def test_only_the_message_that_kills_its_workers_is_dead_lettered(
        self, prefix: str, raw: Redis, kind: str, stable_name: bool
    ) -> None:
        """Ten messages read as one batch, the fifth killing every worker that handles it:
        it is dead-lettered after its first delivery and max_deliveries takeovers, each of
        which started its handler; the nine others are handled and never dead-lettered
        (they used to be taken over with it, batch by batch, and dead-lettered with it)."""
        store = make_store()
        messages = [notification(index) for index in range(BATCH)]
        handler = WorkerKiller(event_key(messages[POISON]))

        def make(name: str) -> RedisMessageQueueAdapter | RedisMessageBusAdapter:
            if kind == "queue":
                queue = NotificationMessageQueue(
                    message_queue_id="orders", source_event_stores=[store]
                )
                return RedisMessageQueueAdapter.attach_to(
                    queue, REDIS_URL, key_prefix=prefix, name=name, worker=handler, **KILLER_OPTIONS
                )
            bus = NotificationMessageBus(message_bus_id="events", source_event_stores=[store])
            adapter = RedisMessageBusAdapter.attach_to(
                bus, REDIS_URL, key_prefix=prefix, name=name, **KILLER_OPTIONS
            )
            adapter.on({}, handler, listener_id="projection")
            return adapter

        group = "workers" if kind == "queue" else "projection"
        publisher = make("publisher")  # creates the group; never consumes
        with watch_dead_letters() as watch:
            async with publisher:
                await publisher.publish_messages(messages)
                # Each generation is a worker process started after the previous one died.
                for generation in range(8):
                    handler.died = asyncio.Event()
                    name = "pod" if stable_name else f"pod-{generation}"
                    async with make(name) as adapter, adapter.consuming():
                        async with asyncio.timeout(15):
                            while not handler.died.is_set():
                                if await group_settled(raw, publisher.stream_key, group):
                                    break
                                await asyncio.sleep(0.05)  # no event for "all acknowledged"
                    if not handler.died.is_set():
                        break
                letters = await publisher.dead_letters()
        innocent = [event_key(message) for index, message in enumerate(messages) if index != POISON]
        assert [event_key(letter.message) for letter in letters] == [handler.killer]
        assert len(watch.records) == 1
        max_deliveries = KILLER_OPTIONS["max_deliveries"]
        assert handler.killer_starts == max_deliveries + 1
        assert letters[0].attempts == max_deliveries + 1
        assert letters[0].error == (
            "delivered 3 times to consumers that stopped before acknowledging it"
            " (a first delivery and 2 takeovers; max_deliveries is 2)"
        )
        assert set(handler.handled) == set(innocent)
        # Those behind it in the batch never ran before: once. Those before it ran, but the
        # worker died before acknowledging them: handled again, once more at most.
        assert all(handler.handled[key] == 1 for key in innocent[POISON:])
        assert all(handler.handled[key] in (1, 2) for key in innocent[:POISON])
