"""RedisMessageQueueAdapter against a real Redis: one stream, one consumer group of workers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import json
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from castore_pydantic.errors import MessageBrokerUnavailableError
from castore_pydantic.messaging import (
    ConnectedEventStore,
    DeadLetter,
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
)
from castore_pydantic.messaging import _redis_adapter as redis_adapter
from castore_pydantic.messaging import _redis_consumer as redis_consumer
from castore_pydantic.messaging import _redis_handling as redis_handling
from castore_pydantic.messaging import _redis_wire as redis_wire
from castore_pydantic.messaging.redis import RedisMessageBusAdapter, RedisMessageQueueAdapter
from tests.domain import appeared, make_store
from tests.messaging.redis_support import (
    REDIS_URL,
    Recorder,
    StallingProxy,
    closed_port,
    connections_named,
    notification,
    private_prefix,
    raw_client,
    watch_dead_letters,
)

pytestmark = [pytest.mark.redis]


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with private_prefix() as value:
        yield value


@pytest.fixture
async def raw() -> AsyncIterator[Redis]:
    client = raw_client()
    yield client
    await client.aclose()


async def no_connections_left(raw: Redis, name: str) -> None:
    """Wait until the server lists no connection called ``name`` (closing is asynchronous)."""
    for _ in range(250):
        if not await connections_named(raw, name):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"a connection named {name} is still open")


def make_queue(queue_id: str = "pokemons") -> NotificationMessageQueue:
    return NotificationMessageQueue(message_queue_id=queue_id, source_event_stores=[make_store()])


def attach(
    queue: NotificationMessageQueue, prefix: str, **options: Any
) -> RedisMessageQueueAdapter:
    """An adapter with test-sized delays: short retries, quick reclaiming, short blocks."""
    settings: dict[str, Any] = {
        "retry_delay_in_ms": 10,
        "reclaim_idle_ms": 300,
        "block_ms": 50,
        "key_prefix": prefix,
        **options,
    }
    return RedisMessageQueueAdapter.attach_to(queue, REDIS_URL, **settings)


class TestRedisMessageQueueAdapter:
    async def test_delivery_guarantee_is_at_least_once(self, prefix: str) -> None:
        """The adapter says it delivers at least once."""
        adapter = attach(make_queue(), prefix)
        assert adapter.delivery_guarantee == "at-least-once"

    async def test_worker_receives_messages_with_their_context(self, prefix: str) -> None:
        """The worker gets each message with attempt 1, the retry budget and its replay flag."""
        queue = make_queue()
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder)
        async with adapter, adapter.consuming():
            await queue.publish_message(notification(1))
            await queue.publish_message(notification(2), replay=True)
            await recorder.wait_for(2)
        assert recorder.messages == [notification(1), notification(2)]
        assert [context for _, context in recorder.calls] == [
            MessageContext(attempt=1, retry_attempts_left=2, replay=False),
            MessageContext(attempt=1, retry_attempts_left=2, replay=True),
        ]

    async def test_a_large_batch_is_appended_in_whole_chunks(self, prefix: str, raw: Redis) -> None:
        """A reader sees a batch of 12,000 grow by whole chunks of 5,000, never in between
        (the docs said no reader ever saw part of a batch, which holds per chunk only)."""
        queue = make_queue()
        adapter = attach(queue, prefix)
        messages = [notification(index) for index in range(12_000)]
        async with adapter:
            publishing = asyncio.create_task(queue.publish_messages(messages))
            seen = set()
            while not publishing.done():
                seen.add(await raw.xlen(adapter.stream_key))
            await publishing
            seen.add(await raw.xlen(adapter.stream_key))
        assert seen <= {0, 5000, 10_000, 12_000}
        assert 12_000 in seen

    async def test_a_plain_function_is_a_worker(self, prefix: str, raw: Redis) -> None:
        """A worker written without async is called once and its entry acknowledged."""
        queue = make_queue()
        handled = asyncio.Event()
        effects: list[MessageContext] = []

        def index(message: Any, context: MessageContext) -> None:
            effects.append(context)
            handled.set()

        # Without retries, a failed attempt is dead-lettered before the stop returns.
        adapter = attach(queue, prefix, worker=index, retry_attempts=0)
        async with adapter:
            async with adapter.consuming():
                await queue.publish_message(notification(1))
                await asyncio.wait_for(handled.wait(), 10)
            assert await adapter.dead_letters() == []
        assert effects == [MessageContext(attempt=1, retry_attempts_left=0, replay=False)]
        pending: Any = await raw.xpending(adapter.stream_key, "workers")
        assert pending["pending"] == 0

    async def test_a_worker_returning_an_executor_future_has_it_awaited(
        self, prefix: str, raw: Redis
    ) -> None:
        """A plain worker returning executor.submit(...) had its entry acknowledged and
        deleted while the thread's work failed unseen. The future is now awaited, and the
        entry dead-lettered with the thread's error."""
        queue = make_queue()

        def write(message: Any) -> None:
            raise RuntimeError("the projection refused the write")

        with concurrent.futures.ThreadPoolExecutor(1) as pool, watch_dead_letters() as watch:

            def index(message: Any, context: MessageContext) -> Any:
                return pool.submit(write, message)

            adapter = attach(queue, prefix, worker=index, retry_attempts=0)
            async with adapter, adapter.consuming():
                await queue.publish_message(notification(1))
                await watch.wait_for(1)
                [letter] = await adapter.dead_letters()
        assert letter.message == notification(1)
        assert letter.error == "RuntimeError: the projection refused the write"
        assert await raw.xlen(adapter.stream_key) == 0

    async def test_stream_entry_body_is_castores_json_message(
        self, prefix: str, raw: Redis
    ) -> None:
        """The entry's body is Castore's camelCase JSON; the replay flag sits beside it."""
        queue = make_queue()
        async with attach(queue, prefix) as adapter:
            await queue.publish_message(notification(7), replay=True)
            entries: Any = await raw.xrange(adapter.stream_key)
        [(_, fields)] = entries
        assert set(fields) == {b"body", b"replay"}
        assert fields[b"replay"] == b"1"
        assert json.loads(fields[b"body"]) == {
            "eventStoreId": "POKEMONS",
            "event": {
                "aggregateId": "pokemon-7",
                "version": 1,
                "type": "POKEMON_APPEARED",
                "timestamp": "2024-01-01T00:00:00.007Z",
                "payload": {"name": "Pokemon 7", "level": 8},
            },
        }

    async def test_one_worker_handles_messages_in_publish_order(self, prefix: str) -> None:
        """A single worker receives the messages in the order they were published."""
        queue = make_queue()
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder, prefetch_count=7)
        messages = [notification(index) for index in range(200)]
        async with adapter:
            await queue.publish_messages(messages[:100])
            async with adapter.consuming():
                await queue.publish_messages(messages[100:])
                await recorder.wait_for(200)
        assert recorder.messages == messages

    async def test_messages_published_before_any_worker_are_kept(self, prefix: str) -> None:
        """Messages published before the queue ever had a worker are handled once one starts."""
        publisher_queue = make_queue()
        publisher = attach(publisher_queue, prefix)  # never connected explicitly
        await publisher_queue.publish_messages([notification(index) for index in range(3)])
        await publisher.aclose()
        queue = make_queue()
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder)
        async with adapter, adapter.consuming():
            await recorder.wait_for(3)
        assert recorder.messages == [notification(index) for index in range(3)]

    async def test_competing_workers_share_the_messages(self, prefix: str) -> None:
        """Two workers on one queue split the messages; each message is handled by one of them."""
        queue_a, queue_b = make_queue(), make_queue()
        b_started = asyncio.Event()
        handled: dict[str, list[Any]] = {"a": [], "b": []}

        async def worker_a(message: Any, context: MessageContext) -> None:
            handled["a"].append(message)
            await b_started.wait()  # hold A's first message until B works too

        async def worker_b(message: Any, context: MessageContext) -> None:
            handled["b"].append(message)
            b_started.set()

        done = asyncio.Event()
        messages = [notification(index) for index in range(300)]

        async def counting(worker: Any) -> Any:
            async def handle(message: Any, context: MessageContext) -> None:
                await worker(message, context)
                if len(handled["a"]) + len(handled["b"]) == len(messages):
                    done.set()

            return handle

        adapter_a = attach(queue_a, prefix, worker=await counting(worker_a), prefetch_count=10)
        adapter_b = attach(queue_b, prefix, worker=await counting(worker_b), prefetch_count=10)
        async with adapter_a, adapter_b:
            await queue_a.publish_messages(messages)
            async with adapter_a.consuming(), adapter_b.consuming():
                await asyncio.wait_for(done.wait(), 20)
        assert handled["a"]
        assert handled["b"]
        assert sorted(handled["a"] + handled["b"], key=lambda m: m.event.aggregate_id) == sorted(
            messages, key=lambda m: m.event.aggregate_id
        )

    async def test_handled_entries_are_acknowledged_and_deleted(
        self, prefix: str, raw: Redis
    ) -> None:
        """Once handled, entries leave the pending list and the stream."""
        queue = make_queue()
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder)
        async with adapter:
            async with adapter.consuming():
                await queue.publish_messages([notification(index) for index in range(50)])
                await recorder.wait_for(50)
            pending: Any = await raw.xpending(adapter.stream_key, "workers")
            assert pending["pending"] == 0
            assert await raw.xlen(adapter.stream_key) == 0

    async def test_stop_waits_for_the_handler_in_flight(self, prefix: str, raw: Redis) -> None:
        """Stopping lets the running handler finish, then acknowledges its message."""
        queue = make_queue()
        started, release = asyncio.Event(), asyncio.Event()

        async def worker(message: Any, context: MessageContext) -> None:
            started.set()
            await release.wait()

        adapter = attach(queue, prefix, worker=worker)
        async with adapter:
            await adapter.start_consuming()
            await queue.publish_message(notification(1))
            await asyncio.wait_for(started.wait(), 10)
            stopping = asyncio.create_task(adapter.stop_consuming())
            finished, _ = await asyncio.wait({stopping}, timeout=0.2)
            assert not finished  # still waiting for the handler
            release.set()
            await stopping
            pending: Any = await raw.xpending(adapter.stream_key, "workers")
            assert pending["pending"] == 0

    async def test_a_handler_may_stop_its_own_adapter(self, prefix: str, raw: Redis) -> None:
        """A handler calling stop_consuming waited for its own consumer, for ever: its
        message was never acknowledged. The call now returns, the handler finishes and its
        message is acknowledged."""
        queue = make_queue()
        stopped = asyncio.Event()

        async def worker(message: Any, context: MessageContext) -> None:
            await adapter.stop_consuming()
            stopped.set()

        adapter = attach(queue, prefix, worker=worker)
        async with adapter:
            await adapter.start_consuming()
            await queue.publish_message(notification(1))
            await asyncio.wait_for(stopped.wait(), 10)
            assert not adapter.is_consuming
            for _ in range(200):  # the consumer acknowledges once the handler returned
                pending: Any = await raw.xpending(adapter.stream_key, "workers")
                if not pending["pending"]:
                    break
                await asyncio.sleep(0.05)
            assert pending["pending"] == 0

    @pytest.mark.parametrize("action", ["stop_consuming", "aclose"])
    async def test_aclose_after_a_handler_stopped_or_closed_its_adapter_waits_for_it(
        self, prefix: str, raw: Redis, action: str
    ) -> None:
        """Once a handler had asked for the stop, aclose() returned at once and closed the
        client under the running handler: at the end of the program it was cancelled
        halfway and its entry stayed pending. A handler calling aclose() itself had the
        client closed under it, and acknowledging its entry then reopened a connection
        nobody closed. The client now closes once the handler's consumer has finished, and
        a later aclose() waits for that."""
        queue = make_queue()
        asked, release = asyncio.Event(), asyncio.Event()
        log: list[str] = []

        async def worker(message: Any, context: MessageContext) -> None:
            await getattr(adapter, action)()
            asked.set()
            await release.wait()
            log.append("handler finished")

        adapter = attach(queue, prefix, worker=worker, name=f"self-{action}-{prefix[13:25]}")
        await adapter.start_consuming()
        await queue.publish_message(notification(1))
        await asyncio.wait_for(asked.wait(), 10)
        closing = asyncio.create_task(adapter.aclose())
        finished, _ = await asyncio.wait({closing}, timeout=0.2)
        assert not finished  # still waiting for the handler
        release.set()
        await asyncio.wait_for(closing, 10)
        log.append("aclose returned")
        assert log == ["handler finished", "aclose returned"]
        pending: Any = await raw.xpending(adapter.stream_key, "workers")
        assert pending["pending"] == 0
        assert await raw.xlen(adapter.stream_key) == 0
        await no_connections_left(raw, f"castore:{adapter.consumer_name}")

    async def test_a_cancelled_stop_cancels_the_handler_and_hands_its_message_back(
        self, prefix: str, raw: Redis
    ) -> None:
        """A stop_consuming() cut short by a timeout forgot the running consumer: aclose()
        then returned while the handler ran on and closed the client under it. A cancelled
        stop now ends as a grace period does: handler cancelled, message handed back."""
        queue = make_queue()
        started = asyncio.Event()
        log: list[str] = []

        async def worker(message: Any, context: MessageContext) -> None:
            started.set()
            try:
                await asyncio.Event().wait()  # never returns
            except asyncio.CancelledError:
                log.append("handler cancelled")
                raise

        adapter = attach(queue, prefix, worker=worker, name=f"timed-out-{prefix[13:25]}")
        await adapter.start_consuming()
        await queue.publish_message(notification(1))
        await asyncio.wait_for(started.wait(), 10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(adapter.stop_consuming(), 0.2)
        assert log == ["handler cancelled"]
        # Handed back: idle "for ever", its delivery not counted.
        [entry] = await raw.xpending_range(adapter.stream_key, "workers", "-", "+", 10)
        assert entry["times_delivered"] == 0
        await adapter.aclose()
        await no_connections_left(raw, f"castore:{adapter.consumer_name}")

    async def test_a_grace_period_a_handler_asks_for_applies_to_it(
        self, prefix: str, raw: Redis
    ) -> None:
        """A handler stopping its adapter with a grace period, then running on, is cancelled
        once the period is over and its message handed back, as on a stop from outside."""
        queue = make_queue()
        log: list[str] = []
        asked = asyncio.Event()

        async def worker(message: Any, context: MessageContext) -> None:
            await adapter.stop_consuming(grace_period=0.1)
            asked.set()
            try:
                await asyncio.Event().wait()  # never returns
            except asyncio.CancelledError:
                log.append("handler cancelled")
                raise

        adapter = attach(queue, prefix, worker=worker, name=f"grace-{prefix[13:25]}")
        await adapter.start_consuming()
        await queue.publish_message(notification(1))
        await asyncio.wait_for(asked.wait(), 10)
        await asyncio.wait_for(adapter.aclose(), 10)
        assert log == ["handler cancelled"]
        [entry] = await raw.xpending_range(adapter.stream_key, "workers", "-", "+", 10)
        assert entry["times_delivered"] == 0
        await no_connections_left(raw, f"castore:{adapter.consumer_name}")

    async def test_a_stop_during_the_start_stops_what_it_started(
        self, prefix: str, raw: Redis
    ) -> None:
        """aclose() while start_consuming was still connecting returned at once, and the
        consumers started afterwards ran on. The stop now waits for the start, then stops."""
        queue = make_queue()
        adapter = attach(queue, prefix, worker=Recorder(), name=f"starting-{prefix[13:25]}")
        starting = asyncio.create_task(adapter.start_consuming())
        await asyncio.sleep(0)  # the start is connecting
        await adapter.aclose()
        await starting
        assert not adapter.is_consuming
        await no_connections_left(raw, f"castore:{adapter.consumer_name}")

    async def test_a_stop_cancelled_during_the_start_still_stops(
        self, prefix: str, raw: Redis
    ) -> None:
        """A stop cancelled (a shutdown deadline) while it waited for a start in progress
        recorded nothing: the start then started its consumers, which ran on."""
        queue = make_queue()
        adapter = attach(queue, prefix, worker=Recorder(), name=f"cancelled-{prefix[13:25]}")
        starting = asyncio.create_task(adapter.start_consuming())
        await asyncio.sleep(0)  # the start is connecting
        stopping = asyncio.create_task(adapter.stop_consuming())
        await asyncio.sleep(0)  # the stop waits for the start
        assert not stopping.done()
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        await asyncio.wait_for(starting, 10)
        assert not adapter.is_consuming
        assert not [task for task in asyncio.all_tasks() if "castore-redis" in task.get_name()]
        await adapter.aclose()
        await no_connections_left(raw, f"castore:{adapter.consumer_name}")

    async def test_a_restart_waits_for_the_handler_the_stop_left_running(self, prefix: str) -> None:
        """Started again while a handler that stopped its adapter still ran, a new consumer
        under the same name took that handler's entry as its own and handled it again."""
        queue = make_queue()
        asked, release = asyncio.Event(), asyncio.Event()
        recorder = Recorder()

        async def worker(message: Any, context: MessageContext) -> None:
            await recorder(message, context)
            if len(recorder.calls) == 1:
                await adapter.stop_consuming()
                asked.set()
                await release.wait()

        adapter = attach(queue, prefix, worker=worker, reclaim_idle_ms=60_000)
        async with adapter:
            await adapter.start_consuming()
            await queue.publish_message(notification(1))
            await asyncio.wait_for(asked.wait(), 10)
            restarting = asyncio.create_task(adapter.start_consuming())
            # A consumer taking over the entry in flight would hand it to the worker by then.
            with contextlib.suppress(TimeoutError):
                await recorder.wait_for(2, seconds=0.5)
            assert recorder.messages == [notification(1)]
            assert not restarting.done()  # it waits for the handler still running
            release.set()
            await asyncio.wait_for(restarting, 10)
            await queue.publish_message(notification(2))
            await recorder.wait_for(2)
            await adapter.stop_consuming()
        assert recorder.messages == [notification(1), notification(2)]

    async def test_a_stop_applies_its_grace_period_to_the_handler_a_restart_waits_for(
        self, prefix: str, raw: Redis
    ) -> None:
        """A stop arriving while a restart waited for a handler that had stopped its own
        adapter waited for that handler however long it ran, ignoring its grace period,
        and the restart then left the adapter consuming after the stop."""
        queue = make_queue()
        asked = asyncio.Event()
        log: list[str] = []

        async def worker(message: Any, context: MessageContext) -> None:
            await adapter.stop_consuming()
            asked.set()
            try:
                await asyncio.sleep(3)  # long work
            except asyncio.CancelledError:
                log.append("handler cancelled")
                raise

        adapter = attach(queue, prefix, worker=worker, reclaim_idle_ms=60_000)
        async with adapter:
            await adapter.start_consuming()
            await queue.publish_message(notification(1))
            await asyncio.wait_for(asked.wait(), 10)
            restarting = asyncio.create_task(adapter.start_consuming())
            await asyncio.sleep(0.05)
            assert not restarting.done()  # it waits for the handler
            await asyncio.wait_for(adapter.stop_consuming(grace_period=0.1), 5)
            assert log == ["handler cancelled"]
            await asyncio.wait_for(restarting, 5)
            assert not adapter.is_consuming
        # Handed back: idle "for ever", its delivery not counted.
        [entry] = await raw.xpending_range(adapter.stream_key, "workers", "-", "+", 10)
        assert entry["times_delivered"] == 0

    async def test_a_handler_cannot_restart_its_own_adapter(self, prefix: str) -> None:
        """A handler that stopped, then started its own adapter had its message, still in
        its hands, taken by the new consumer under the same name and handled again. The
        restart is now refused there, as on RabbitMQ; from another task it works."""
        queue = make_queue()
        recorder = Recorder()
        refused: list[str] = []
        restarted = asyncio.Event()

        async def worker(message: Any, context: MessageContext) -> None:
            await recorder(message, context)
            if len(recorder.calls) == 1:
                await adapter.stop_consuming()
                try:
                    await adapter.start_consuming()
                except RuntimeError as exc:
                    refused.append(str(exc))
                    restart = asyncio.create_task(adapter.start_consuming())
                    restart.add_done_callback(lambda _: restarted.set())
                await asyncio.sleep(0.3)  # a new consumer would take this entry by then

        adapter = attach(queue, prefix, worker=worker, reclaim_idle_ms=60_000)
        async with adapter:
            await adapter.start_consuming()
            await queue.publish_message(notification(1))
            await asyncio.wait_for(restarted.wait(), 10)
            assert adapter.is_consuming
            await queue.publish_message(notification(2))
            await recorder.wait_for(2)
            await adapter.stop_consuming()
        assert recorder.messages == [notification(1), notification(2)]
        assert len(refused) == 1
        assert "cannot start consuming after stopping its own adapter" in refused[0]

    async def test_stop_releases_entries_read_but_not_started(
        self, prefix: str, raw: Redis
    ) -> None:
        """Entries a stopped worker had read are taken over at once, as fresh deliveries."""
        queue_a, queue_b = make_queue(), make_queue()
        started, release = asyncio.Event(), asyncio.Event()
        first = Recorder()

        async def worker_a(message: Any, context: MessageContext) -> None:
            await first(message, context)
            started.set()
            await release.wait()

        adapter_a = attach(queue_a, prefix, worker=worker_a, prefetch_count=10)
        messages = [notification(index) for index in range(10)]
        async with adapter_a:
            await queue_a.publish_messages(messages)
            await adapter_a.start_consuming()
            await asyncio.wait_for(started.wait(), 10)
            stopping = asyncio.create_task(adapter_a.stop_consuming())
            release.set()
            await stopping
        assert first.messages == messages[:1]
        # A hand-over is no failed delivery: it does not count towards max_deliveries.
        pending: Any = await raw.xpending_range(adapter_a.stream_key, "workers", "-", "+", 10)
        assert [entry["times_delivered"] for entry in pending] == [0] * 9
        second = Recorder()
        # A minute of idle time: only the release makes the 9 entries available now.
        adapter_b = attach(queue_b, prefix, worker=second, reclaim_idle_ms=60_000, max_deliveries=1)
        async with adapter_b, adapter_b.consuming():
            await second.wait_for(9)
        assert second.messages == messages[1:]

    async def test_a_stop_during_the_start_up_takeover_leaves_an_earlier_workers_counts(
        self, prefix: str, raw: Redis
    ) -> None:
        """A worker restarted under a stable name and stopped before its start-up takeover
        reached the entry its predecessor died on hands that entry back with its count: it
        never had it. (The hand-back took a delivery off every entry under its name, so
        each such restart let a message that kills its workers run once more.)"""
        started, release = asyncio.Event(), asyncio.Event()

        async def worker(message: Any, context: MessageContext) -> None:
            started.set()
            await release.wait()

        queue = make_queue()
        name = f"pod-{prefix[13:25]}"
        adapter = attach(queue, prefix, worker=worker, name=name, reclaim_idle_ms=60_000)
        async with adapter:
            await queue.publish_messages([notification(1), notification(2)])
            # The earlier worker under this name read both; the second killed it, and the
            # worker after it, before either acknowledged anything.
            reply: Any = await raw.xreadgroup("workers", name, {adapter.stream_key: ">"}, 10)
            fatal = reply[0][1][1][0]
            await raw.xclaim(
                adapter.stream_key, "workers", name, 0, [fatal], retrycount=2, justid=True
            )
            await adapter.start_consuming()
            await asyncio.wait_for(started.wait(), 10)  # on the first entry
            stopping = asyncio.create_task(adapter.stop_consuming())
            release.set()
            await stopping
        [entry] = await raw.xpending_range(adapter.stream_key, "workers", "-", "+", 10)
        assert entry["message_id"] == fatal
        assert entry["times_delivered"] == 2

    async def test_a_redis_error_during_the_start_up_takeover_still_counts_deliveries(
        self, prefix: str, raw: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A worker restarted under a stable name counts a delivery for each entry its
        predecessor left, also after a Redis error interrupted that start-up: the entry
        that killed the earlier workers is dead-lettered, not handled once more. (After
        the error the rest used to be taken over as a live consumer's own, uncounted.)"""
        failures = 1
        schedule = redis_consumer.StreamConsumer._retry_later

        async def out_of_memory_once(self: Any, entry: Any, error: Exception) -> None:
            nonlocal failures
            if failures:
                failures -= 1
                raise ResponseError("OOM command not allowed when used memory > 'maxmemory'")
            await schedule(self, entry, error)

        monkeypatch.setattr(redis_consumer.StreamConsumer, "_retry_later", out_of_memory_once)
        recorder = Recorder(fail=lambda message, context: len(recorder.calls) == 1)
        queue = make_queue()
        name = f"pod-{prefix[13:25]}"
        adapter = attach(
            queue, prefix, worker=recorder, name=name, reclaim_idle_ms=60_000, max_deliveries=2
        )
        with watch_dead_letters() as watch:
            async with adapter:
                await queue.publish_messages([notification(1), notification(2)])
                # The earlier worker under this name read both; the second killed it and
                # then the workers of its first two takeovers.
                reply: Any = await raw.xreadgroup("workers", name, {adapter.stream_key: ">"}, 10)
                fatal = reply[0][1][1][0]
                await raw.xclaim(
                    adapter.stream_key, "workers", name, 0, [fatal], retrycount=3, justid=True
                )
                async with adapter.consuming():
                    # The first entry fails, and scheduling its retry fails (a Redis error).
                    await watch.wait_for(1, seconds=10)
                letters = await adapter.dead_letters()
        assert failures == 0
        assert [letter.message for letter in letters] == [notification(2)]
        assert letters[0].error == (
            "delivered 3 times to consumers that stopped before acknowledging it"
            " (a first delivery and 2 takeovers; max_deliveries is 2)"
        )
        assert notification(2) not in recorder.messages

    async def test_grace_period_cancels_a_stuck_handler_and_hands_its_message_back(
        self, prefix: str, raw: Redis
    ) -> None:
        """After the grace period a stuck handler is cancelled; its message goes to others."""
        queue_a, queue_b = make_queue(), make_queue()
        started = asyncio.Event()

        async def stuck(message: Any, context: MessageContext) -> None:
            started.set()
            await asyncio.Event().wait()  # never returns

        adapter_a = attach(queue_a, prefix, worker=stuck)
        async with adapter_a:
            async with adapter_a.consuming(grace_period=0.1):
                assert adapter_a.is_consuming
                await queue_a.publish_message(notification(1))
                await started.wait()
            assert not adapter_a.is_consuming
        # The hand-back does not count the interrupted delivery towards max_deliveries.
        [entry] = await raw.xpending_range(adapter_a.stream_key, "workers", "-", "+", 10)
        assert entry["times_delivered"] == 0
        recorder = Recorder()
        # A minute of idle time: only the hand-back lets B handle it now.
        adapter_b = attach(
            queue_b, prefix, worker=recorder, reclaim_idle_ms=60_000, max_deliveries=1
        )
        async with adapter_b, adapter_b.consuming():
            await recorder.wait_for(1)
        assert recorder.calls == [
            (notification(1), MessageContext(attempt=1, retry_attempts_left=2, replay=False))
        ]

    @pytest.mark.parametrize("how", ["grace period", "timeout"])
    async def test_a_stop_ends_when_redis_stalls(self, prefix: str, how: str) -> None:
        """With the network to Redis cut, a stop whose grace period ran out, or that was
        itself cancelled, waited for ever for the consumer handing its entries back. The
        hand-back now gives up: the stop ends, and the entry is taken over later."""
        queue = make_queue()
        started = asyncio.Event()
        log: list[str] = []

        async def stuck(message: Any, context: MessageContext) -> None:
            started.set()
            try:
                await asyncio.Event().wait()  # never returns
            except asyncio.CancelledError:
                log.append("handler cancelled")
                raise

        async def stop(adapter: RedisMessageQueueAdapter) -> None:
            if how == "grace period":
                await adapter.stop_consuming(grace_period=0.1)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await adapter.stop_consuming()

        async with StallingProxy() as proxy:
            adapter = RedisMessageQueueAdapter.attach_to(
                queue, proxy.url, worker=stuck, key_prefix=prefix, block_ms=50
            )
            await adapter.start_consuming()
            await queue.publish_message(notification(1))
            await asyncio.wait_for(started.wait(), 10)
            proxy.stall()
            loop = asyncio.get_running_loop()
            began = loop.time()
            stopping = asyncio.create_task(stop(adapter))
            done, _ = await asyncio.wait({stopping}, timeout=5)
            assert done, "the stop did not end"
            await stopping
            assert loop.time() - began < 0.1 + redis_consumer.RELEASE_TIMEOUT + 1
            assert log == ["handler cancelled"]
            assert not adapter.is_consuming
        await asyncio.wait_for(adapter.aclose(), 10)
        # Not handed back: another worker takes the entry over once it is idle long enough.
        recorder = Recorder()
        other = attach(make_queue(), prefix, worker=recorder)
        async with other, other.consuming():
            await recorder.wait_for(1)
        assert recorder.messages == [notification(1)]

    async def test_failed_message_is_retried_with_backoff(self, prefix: str) -> None:
        """A failing message is retried after delay * rate ** (attempt - 1), then succeeds."""
        queue = make_queue()
        recorder = Recorder(fail=lambda message, context: context.attempt < 3)
        adapter = attach(queue, prefix, worker=recorder, retry_delay_in_ms=60, retry_backoff_rate=2)
        with watch_dead_letters() as watch:
            async with adapter:
                async with adapter.consuming():
                    await queue.publish_message(notification(1))
                    await recorder.wait_for(3)
                assert await adapter.dead_letters() == []
        assert not watch.records
        assert [context for _, context in recorder.calls] == [
            MessageContext(attempt=1, retry_attempts_left=2, replay=False),
            MessageContext(attempt=2, retry_attempts_left=1, replay=False),
            MessageContext(attempt=3, retry_attempts_left=0, replay=False),
        ]
        first_gap = recorder.times[1] - recorder.times[0]
        second_gap = recorder.times[2] - recorder.times[1]
        assert first_gap >= 0.055
        assert second_gap >= 0.115

    async def test_retries_of_a_replay_keep_replay_true(self, prefix: str) -> None:
        """A retried delivery of a replayed message is still marked as a replay."""
        queue = make_queue()
        recorder = Recorder(fail=lambda message, context: context.attempt == 1)
        async with attach(queue, prefix, worker=recorder) as adapter, adapter.consuming():
            await queue.publish_message(notification(1), replay=True)
            await recorder.wait_for(2)
        assert [context.replay for _, context in recorder.calls] == [True, True]

    async def test_message_failing_every_attempt_is_dead_lettered(
        self, prefix: str, raw: Redis
    ) -> None:
        """After its last retry a message goes to the dead-letter stream with error and attempts."""
        queue = make_queue()
        recorder = Recorder(fail=lambda message, context: True)
        adapter = attach(queue, prefix, worker=recorder, retry_attempts=1)
        with watch_dead_letters() as watch:
            async with adapter:
                async with adapter.consuming():
                    await queue.publish_message(notification(1))
                    await watch.wait_for(1)
                letters = await adapter.dead_letters()
            pending: Any = await raw.xpending(adapter.stream_key, "workers")
        assert letters == [
            DeadLetter(
                message=notification(1),
                error="ValueError: cannot handle pokemon-1 (attempt 2)",
                attempts=2,
                replay=False,
                listener_id=None,
            )
        ]
        assert len(recorder.calls) == 2
        assert pending["pending"] == 0
        assert "pokemon-1" in watch.records[0].getMessage()

    async def test_republished_dead_letters_are_handled_again(self, prefix: str) -> None:
        """Republishing puts dead letters back from attempt 1 and empties the dead-letter stream."""
        queue = make_queue()
        broken = True
        recorder = Recorder(fail=lambda message, context: broken)
        adapter = attach(queue, prefix, worker=recorder, retry_attempts=0)
        with watch_dead_letters() as watch:
            async with adapter:
                async with adapter.consuming():
                    await queue.publish_message(notification(1), replay=True)
                    await watch.wait_for(1)
                broken = False
                assert await adapter.republish_dead_letters() == 1
                assert await adapter.dead_letters() == []
                async with adapter.consuming():
                    await recorder.wait_for(2)
        assert recorder.calls[1] == (
            notification(1),
            MessageContext(attempt=1, retry_attempts_left=0, replay=True),
        )

    async def test_redis_errors_of_a_live_consumer_count_no_deliveries(
        self, prefix: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A consumer that recovers from Redis errors reads its pending entries again, which
        Redis counts as deliveries; only a consumer starting up counts them towards
        max_deliveries. Here four errors (Redis out of memory, say) with max_deliveries=3:
        the message is retried and handled, not dead-lettered."""
        failures = 4
        schedule = redis_consumer.StreamConsumer._retry_later

        async def out_of_memory_first(self: Any, entry: Any, error: Exception) -> None:
            nonlocal failures
            if failures:
                failures -= 1
                raise ResponseError("OOM command not allowed when used memory > 'maxmemory'")
            await schedule(self, entry, error)

        monkeypatch.setattr(redis_consumer.StreamConsumer, "_retry_later", out_of_memory_first)
        attempts: list[int] = []
        handled = asyncio.Event()

        async def worker(message: Any, context: MessageContext) -> None:
            attempts.append(context.attempt)
            if context.attempt == 1:
                raise ValueError("the first attempt fails; the second succeeds")
            handled.set()

        queue = make_queue()
        adapter = attach(queue, prefix, worker=worker, reclaim_idle_ms=60_000, max_deliveries=3)
        async with adapter:
            async with adapter.consuming():
                await queue.publish_message(notification(1))
                await asyncio.wait_for(handled.wait(), 15)
            assert await adapter.dead_letters() == []
        assert failures == 0
        assert attempts[-1] == 2

    async def test_a_lost_connection_counts_no_delivery_either(
        self, prefix: str, raw: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A consumer that loses Redis while it holds an entry handles it again as soon as
        it is back, without counting a delivery: an entry it had taken over once, with
        max_deliveries=1, is retried, not dead-lettered. (What it held used to wait for
        reclaim_idle_ms, and the takeover counted a delivery as if a worker had died.)"""
        failures = 1
        schedule = redis_consumer.StreamConsumer._retry_later

        async def connection_lost_once(self: Any, entry: Any, error: Exception) -> None:
            nonlocal failures
            if failures:
                failures -= 1
                raise RedisConnectionError("Connection reset by peer")
            await schedule(self, entry, error)

        monkeypatch.setattr(redis_consumer.StreamConsumer, "_retry_later", connection_lost_once)
        recorder = Recorder(fail=lambda message, context: context.attempt == 1)
        queue = make_queue()
        adapter = attach(queue, prefix, worker=recorder, reclaim_idle_ms=100, max_deliveries=1)
        async with adapter:
            await queue.publish_message(notification(1))
            # A consumer that read it and died: this one takes it over, a second delivery.
            await raw.xreadgroup("workers", "dead", {adapter.stream_key: ">"}, count=10)
            async with adapter.consuming():
                await recorder.wait_for(3, seconds=10)
            assert await adapter.dead_letters() == []
        assert failures == 0
        assert [context.attempt for _, context in recorder.calls] == [1, 1, 2]

    async def test_a_batch_longer_than_reclaim_idle_ms_is_not_taken_over(self, prefix: str) -> None:
        """Handlers of 0.1 s, reclaim_idle_ms 300 ms, batches of 10 entries: the waiting
        entries of a batch are kept fresh, so the second consumer takes none of them (it
        used to handle the whole batch a second time, and count deliveries towards
        max_deliveries)."""
        handled: list[tuple[str, str]] = []
        started, all_ten = asyncio.Event(), asyncio.Event()

        def worker_of(name: str) -> Any:
            async def worker(message: Any, context: MessageContext) -> None:
                handled.append((message.event.aggregate_id, name))
                started.set()
                if len(handled) >= 10:
                    all_ten.set()
                await asyncio.sleep(0.1)

            return worker

        options: dict[str, Any] = {"prefetch_count": 10, "max_deliveries": 1}
        first, second = make_queue(), make_queue()
        a = attach(first, prefix, worker=worker_of("a"), name=f"a-{prefix[13:25]}", **options)
        b = attach(second, prefix, worker=worker_of("b"), name=f"b-{prefix[13:25]}", **options)
        async with a, b:
            await first.publish_messages([notification(i) for i in range(10)])
            async with a.consuming():
                await asyncio.wait_for(started.wait(), 10)  # a read all ten as one batch
                async with b.consuming():
                    await asyncio.wait_for(all_ten.wait(), 10)
                    await asyncio.sleep(0.5)  # room for a takeover to show
            assert await a.dead_letters() == []
        ids = [aggregate_id for aggregate_id, _ in handled]
        assert sorted(ids) == sorted({f"pokemon-{i}" for i in range(10)})
        assert {name for _, name in handled} == {"a"}

    async def test_entries_taken_over_are_not_claimed_back(self, prefix: str) -> None:
        """A handler longer than reclaim_idle_ms lets another consumer take the batch's other
        entries; when it ends, its consumer keeps none of those for itself. Only entries taken
        over while their handler ran run twice (as documented for slow handlers)."""
        handled: list[tuple[str, str]] = []
        started, all_six = asyncio.Event(), asyncio.Event()

        def worker_of(name: str, seconds: float) -> Any:
            async def worker(message: Any, context: MessageContext) -> None:
                handled.append((message.event.aggregate_id, name))
                started.set()
                if len({aggregate_id for aggregate_id, _ in handled}) == 6:
                    all_six.set()
                await asyncio.sleep(seconds)

            return worker

        options: dict[str, Any] = {"prefetch_count": 6, "max_deliveries": 5}
        first, second = make_queue(), make_queue()
        slow = attach(first, prefix, worker=worker_of("slow", 1.0), name="slow", **options)
        fast = attach(second, prefix, worker=worker_of("fast", 0.2), name="fast", **options)
        async with slow, fast:
            await first.publish_messages([notification(i) for i in range(6)])
            async with slow.consuming():
                await asyncio.wait_for(started.wait(), 10)
                async with fast.consuming():
                    await asyncio.wait_for(all_six.wait(), 10)
                    await asyncio.sleep(1.5)  # the slow handler ends: room to claim back
        runs: dict[str, list[str]] = {}
        for aggregate_id, name in handled:
            runs.setdefault(aggregate_id, []).append(name)
        assert set(runs) == {f"pokemon-{i}" for i in range(6)}
        # An entry the fast consumer took never runs on the slow one afterwards.
        assert all(names in (["slow"], ["fast"], ["slow", "fast"]) for names in runs.values())

    async def test_a_large_takeover_goes_on_without_pauses(self, prefix: str, raw: Redis) -> None:
        """2,000 entries of a dead consumer are taken over 10 per pass, and the passes follow
        each other at once: each used to be followed by a read that Redis holds until its
        next timer tick (100 ms at its default hz of 10), however short its BLOCK, so the
        takeover crawled at 100 entries a second (20 s here)."""
        count = 2000
        recorder = Recorder()
        queue = make_queue()
        adapter = attach(queue, prefix, worker=recorder, prefetch_count=10, reclaim_idle_ms=100)
        async with adapter:
            await queue.publish_messages([notification(index) for index in range(count)])
            # A consumer that read everything, then died.
            while await raw.xreadgroup("workers", "dead", {adapter.stream_key: ">"}, count=1000):
                pass
            async with adapter.consuming():
                await recorder.wait_for(count, seconds=12)
        assert len(recorder.messages) == count

    async def test_concurrent_republishing_moves_each_letter_once(
        self, prefix: str, raw: Redis
    ) -> None:
        """Two calls at once move each dead letter once between them (they used to both
        read every letter and both republish it)."""
        queue = make_queue()
        adapter = attach(queue, prefix, worker=Recorder(fail=lambda m, c: True), retry_attempts=0)
        with watch_dead_letters() as watch:
            async with adapter:
                async with adapter.consuming():
                    await queue.publish_messages([notification(i) for i in range(30)])
                    await watch.wait_for(30)
                other = attach(make_queue(), prefix)
                async with other:
                    counts = await asyncio.gather(
                        adapter.republish_dead_letters(), other.republish_dead_letters()
                    )
                assert sum(counts) == 30
                assert await adapter.dead_letters() == []
                retry_stream = next(iter(adapter._subscriptions())).retry_stream
                assert await raw.xlen(retry_stream) == 30

    async def test_dead_letters_lists_what_was_there_while_letters_keep_coming(
        self, prefix: str, raw: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """dead_letters() read until a read came back short: with letters dead-lettered as
        fast as it read them, it never returned. It now reads up to the newest letter there
        was when it started."""
        letter = {
            "body": notification(1).model_dump_json(),
            "replay": "0",
            "attempts": "3",
            "error": "ValueError: boom",
        }

        class DeadLetteringMeanwhile(Redis):
            """A client under which other workers dead-letter two messages per read."""

            async def xrange(self, name: Any, *args: Any, **kwargs: Any) -> Any:
                if str(name).endswith(":dead-letters"):
                    await raw.xadd(name, letter)
                    await raw.xadd(name, letter)
                return await super().xrange(name, *args, **kwargs)

        monkeypatch.setattr(redis_adapter, "_READ_CHUNK", 2)  # reads of two letters
        client = DeadLetteringMeanwhile.from_url(REDIS_URL)
        adapter = RedisMessageQueueAdapter.attach_to(make_queue(), client, key_prefix=prefix)
        try:
            dead = f"{adapter.stream_key}:dead-letters"
            for _ in range(3):
                await raw.xadd(dead, letter)
            letters = await asyncio.wait_for(adapter.dead_letters(), 5)
        finally:
            await client.aclose()
        assert [(item.error, item.attempts) for item in letters] == [("ValueError: boom", 3)] * 3

    async def test_unreadable_entries_are_dead_lettered_without_calling_the_worker(
        self, prefix: str, raw: Redis
    ) -> None:
        """Entries that are not a valid message of the queue are set aside at once; others flow."""
        queue = make_queue()
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder)
        foreign = json.loads(notification(2).model_dump_json())
        foreign["eventStoreId"] = "TRAINERS"
        with watch_dead_letters() as watch:
            async with adapter:
                await raw.xadd(adapter.stream_key, {"body": b"not json"})
                await raw.xadd(adapter.stream_key, {"body": json.dumps(foreign)})
                await raw.xadd(adapter.stream_key, {"replay": b"0"})
                await queue.publish_message(notification(3))
                async with adapter.consuming():
                    await recorder.wait_for(1)
                    await watch.wait_for(3)
                letters: Any = await raw.xrange(f"{adapter.stream_key}:dead-letters")
                assert await adapter.dead_letters() == []  # unreadable: reported, not returned
        assert recorder.messages == [notification(3)]
        assert [fields[b"attempts"] for _, fields in letters] == [b"0", b"0", b"0"]
        errors = [fields[b"error"].decode() for _, fields in letters]
        assert errors[0].startswith("JSONDecodeError")
        assert "TRAINERS" in errors[1]
        assert errors[2] == "entry has no 'body' field"

    async def test_a_malformed_attempt_field_is_a_first_attempt(
        self, prefix: str, raw: Redis
    ) -> None:
        """An attempt field another client wrote badly ('1.0', '', '-3', digits past what
        int() reads) is taken as attempt 1. It used to raise in the consumer before any
        handling, again at every restart, so the entry and its batch were never handled."""
        queue = make_queue()
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder)
        attempts = [b"1.0", b"", b"-3", b"9" * 5000, b"2"]
        async with adapter:
            for index, attempt in enumerate(attempts):
                body = notification(index).model_dump_json()
                await raw.xadd(adapter.stream_key, {"body": body, "attempt": attempt})
            async with adapter.consuming():
                await recorder.wait_for(len(attempts))
        assert recorder.messages == [notification(i) for i in range(len(attempts))]
        assert [context.attempt for _, context in recorder.calls] == [1, 1, 1, 1, 2]

    @pytest.mark.parametrize(
        ("stable_name", "failed_before"),
        [(False, False), (True, False), (False, True)],
        ids=["new-names", "stable-name", "after-a-failed-attempt"],
    )
    async def test_entry_whose_consumers_keep_dying_is_dead_lettered(
        self, prefix: str, stable_name: bool, failed_before: bool
    ) -> None:
        """An entry taken over more than max_deliveries times is dead-lettered, not handled
        (its handler ran on its first delivery and on max_deliveries takeovers); also when
        the worker restarts under one name and finds it among its own entries, and when it
        is the retry of an attempt that failed."""
        name = {"name": f"pod-{prefix[13:25]}"} if stable_name else {}
        kills = 0

        async def fatal(message: Any, context: MessageContext) -> None:
            nonlocal kills
            if failed_before and context.attempt == 1:
                raise ValueError("first attempt fails")
            kills += 1
            killed.set()
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)  # the worker's task dies here, before acknowledging

        with watch_dead_letters() as watch:
            publisher = make_queue()
            async with attach(publisher, prefix):
                await publisher.publish_message(notification(1))
            while not watch.records:
                killed = asyncio.Event()
                queue = make_queue()
                adapter = attach(
                    queue, prefix, worker=fatal, max_deliveries=2, reclaim_idle_ms=50, **name
                )
                async with adapter:
                    async with adapter.consuming():
                        waits = {
                            asyncio.ensure_future(watch.wait_for(1)),
                            asyncio.ensure_future(killed.wait()),
                        }
                        await asyncio.wait(waits, timeout=10, return_when=asyncio.FIRST_COMPLETED)
                        for wait in waits:
                            wait.cancel()
                    assert kills <= 3
                    letters = await adapter.dead_letters()
        assert kills == 3
        assert [letter.message for letter in letters] == [notification(1)]
        # The dead letter counts the times the worker ran, as every other dead letter does
        # (it once said 1 for a worker that had run several times).
        assert letters[0].attempts == kills + failed_before
        assert letters[0].error == (
            "delivered 3 times to consumers that stopped before acknowledging it"
            " (a first delivery and 2 takeovers; max_deliveries is 2)"
        )

    async def test_the_dead_letter_of_one_takeover_says_takeover(
        self, prefix: str, raw: Redis
    ) -> None:
        """With max_deliveries=1 the dead letter's error reads "1 takeover", not "1 takeovers"."""
        queue = make_queue()
        adapter = attach(queue, prefix, worker=Recorder(), reclaim_idle_ms=50, max_deliveries=1)
        with watch_dead_letters() as watch:
            async with adapter:
                await queue.publish_message(notification(1))
                # Read by a worker that died on it, then by one that took it over and died.
                reply: Any = await raw.xreadgroup("workers", "dead", {adapter.stream_key: ">"}, 1)
                entry_id = reply[0][1][0][0]
                await raw.xclaim(
                    adapter.stream_key, "workers", "dead", 0, [entry_id], retrycount=2, justid=True
                )
                async with adapter.consuming():
                    await watch.wait_for(1)
                letters = await adapter.dead_letters()
        assert [letter.error for letter in letters] == [
            "delivered 2 times to consumers that stopped before acknowledging it"
            " (a first delivery and 1 takeover; max_deliveries is 1)"
        ]

    async def test_consumer_survives_a_dropped_connection(self, prefix: str, raw: Redis) -> None:
        """When Redis drops the worker's connections, it reconnects and keeps consuming."""
        queue = make_queue()
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder, name=f"survivor-{prefix[13:25]}")
        async with adapter, adapter.consuming():
            await queue.publish_message(notification(1))
            await recorder.wait_for(1)
            ids = await connections_named(raw, f"castore:{adapter.consumer_name}")
            assert ids
            for client_id in ids:
                await raw.client_kill_filter(_id=str(client_id))
            await queue.publish_messages([notification(2), notification(3)])
            await recorder.wait_for(3)
        assert recorder.messages == [notification(1), notification(2), notification(3)]

    async def test_publishing_to_a_redis_that_is_down_raises_broker_unavailable(self) -> None:
        """Publishing to an unreachable Redis raises MessageBrokerUnavailableError, no password."""
        queue = make_queue()
        adapter = RedisMessageQueueAdapter.attach_to(
            queue, f"redis://:s3cret@127.0.0.1:{closed_port()}/0"
        )
        with pytest.raises(MessageBrokerUnavailableError) as single:
            await queue.publish_message(notification(1))
        with pytest.raises(MessageBrokerUnavailableError) as batch:
            await queue.publish_messages([notification(1), notification(2)])
        with pytest.raises(MessageBrokerUnavailableError):
            await adapter.connect()
        await adapter.aclose()
        assert isinstance(single.value.__cause__, RedisConnectionError)
        assert isinstance(batch.value.__cause__, RedisConnectionError)
        for text in (str(single.value), str(batch.value), repr(adapter)):
            assert "s3cret" not in text
        assert "***" in repr(adapter)

    async def test_connected_store_keeps_the_event_when_redis_is_down(self) -> None:
        """With Redis down, a pushed event is stored and the broker error reaches the caller."""
        store = make_store()
        queue = NotificationMessageQueue(message_queue_id="pokemons", source_event_stores=[store])
        RedisMessageQueueAdapter.attach_to(queue, f"redis://127.0.0.1:{closed_port()}/0")
        connected = ConnectedEventStore(store, queue)
        with pytest.raises(MessageBrokerUnavailableError):
            await connected.push_event(appeared("pikachu"))
        stored = (await store.get_events("pikachu")).events
        assert [(event.aggregate_id, event.version) for event in stored] == [("pikachu", 1)]

    async def test_connected_store_publishes_pushed_events(self, prefix: str) -> None:
        """Events pushed through a connected store reach the worker as notifications."""
        store = make_store()
        queue = NotificationMessageQueue(message_queue_id="pokemons", source_event_stores=[store])
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder)
        connected = ConnectedEventStore(store, queue)
        async with adapter, adapter.consuming():
            pushed = await connected.push_event(appeared("pikachu"))
            await recorder.wait_for(1)
        assert recorder.messages == [
            NotificationMessage(event_store_id="POKEMONS", event=pushed.event)
        ]

    async def test_a_given_client_is_used_and_left_open(self, prefix: str, raw: Redis) -> None:
        """An adapter built on a redis-py client uses it and does not close it."""
        queue = make_queue()
        recorder = Recorder()
        adapter = RedisMessageQueueAdapter.attach_to(
            queue, raw, worker=recorder, key_prefix=prefix, block_ms=50
        )
        async with adapter, adapter.consuming():
            await queue.publish_message(notification(1))
            await recorder.wait_for(1)
        assert await raw.ping()
        assert "127.0.0.1" in str(adapter.url) or "localhost" in str(adapter.url)
        with pytest.raises(ValueError, match="decode_responses=False"):
            RedisMessageQueueAdapter(Redis.from_url(REDIS_URL, decode_responses=True))

    async def test_consuming_without_a_worker_is_refused(self, prefix: str) -> None:
        """Starting to consume a queue without a worker raises a clear error."""
        adapter = attach(make_queue(), prefix)
        with pytest.raises(RuntimeError, match="no worker"):
            await adapter.start_consuming()
        await adapter.aclose()

    async def test_adapter_cannot_carry_a_bus(self) -> None:
        """Attaching a queue adapter to a bus is refused."""
        bus = NotificationMessageBus(message_bus_id="pokemons", source_event_stores=[make_store()])
        with pytest.raises(TypeError, match="carries a message queue"):
            RedisMessageQueueAdapter.attach_to(bus, REDIS_URL)

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("prefetch_count", 0),
            ("reclaim_idle_ms", -1),
            ("max_deliveries", 0),
            ("retry_attempts", -1),
            ("retry_delay_in_ms", "soon"),
        ],
    )
    def test_bad_options_are_refused(self, option: str, value: Any) -> None:
        """Out-of-range options raise ValueError naming the option."""
        with pytest.raises(ValueError, match=option):
            RedisMessageQueueAdapter(REDIS_URL, **{option: value})

    async def test_unattached_adapter_says_how_to_attach(self) -> None:
        """Publishing through an adapter that knows no queue explains attach_to."""
        adapter = RedisMessageQueueAdapter(REDIS_URL)
        with pytest.raises(RuntimeError, match="attach_to"):
            await adapter.publish_message(notification(1))

    async def test_purge_deletes_every_key_of_the_queue(self, prefix: str, raw: Redis) -> None:
        """purge removes the stream, retries and dead letters of the queue, nothing else."""
        queue = make_queue()
        recorder = Recorder(fail=lambda message, context: True)
        adapter = attach(queue, prefix, worker=recorder, retry_attempts=0)
        await raw.set(f"{prefix}unrelated", b"1")
        with watch_dead_letters() as watch:
            async with adapter:
                async with adapter.consuming():
                    await queue.publish_message(notification(1))
                    await watch.wait_for(1)
                await queue.publish_message(notification(2))
                await adapter.purge()
        keys = sorted([key async for key in raw.scan_iter(match=f"{prefix}*")])
        assert keys == [f"{prefix}unrelated".encode()]

    async def test_a_channel_id_holding_a_closing_brace_is_refused(
        self, prefix: str, raw: Redis
    ) -> None:
        """Queue "a}:x"'s stream, castore:{queue:a}:x}, looks like a key of queue "a", and
        purging "a" deleted it: ids holding "}" are refused, whichever way the adapter got
        its channel. Ids that merely extend another ("a:x", "ab") keep their keys."""
        with pytest.raises(ValueError, match="may not hold '}'"):
            attach(make_queue("a}:x"), prefix)
        bus = NotificationMessageBus(message_bus_id="b}", source_event_stores=[make_store()])
        with pytest.raises(ValueError, match="may not hold '}'"):
            RedisMessageBusAdapter.attach_to(bus, REDIS_URL, key_prefix=prefix)
        unattached = RedisMessageQueueAdapter(REDIS_URL, key_prefix=prefix)
        unattached.message_channel = make_queue("a}:x")
        with pytest.raises(ValueError, match="may not hold '}'"):
            await unattached.publish_message(notification(1))
        assert [key async for key in raw.scan_iter(match=f"{prefix}*")] == []
        adapter = attach(make_queue("a"), prefix)
        others = [attach(make_queue(queue_id), prefix) for queue_id in ("a:x", "ab")]
        async with adapter, others[0], others[1]:
            for other in others:
                await other.publish_message(notification(1))
            await adapter.purge()
            assert [await raw.xlen(other.stream_key) for other in others] == [1, 1]


class TestHandBackAtTheGraceBoundary:
    async def test_a_hand_back_running_when_the_grace_period_ends_completes(
        self, prefix: str, raw: Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A handler that ended within the grace period starts its consumer's hand-back;
        the end of the grace period cancelled that hand-back too, so the entries read but
        not started waited for reclaim_idle_ms. Only a cancelled stop interrupts it now.
        (The hand-back is slowed by 50 ms, as on a busy Redis, to meet the boundary.)"""
        release = redis_consumer.StreamConsumer.release_pending

        async def slow_release(self: Any) -> None:
            await asyncio.sleep(0.05)
            await release(self)

        monkeypatch.setattr(redis_consumer.StreamConsumer, "release_pending", slow_release)
        queue = make_queue()
        started = asyncio.Event()

        async def worker(message: Any, context: MessageContext) -> None:
            started.set()
            await asyncio.sleep(0.1)

        adapter = attach(queue, prefix, worker=worker, reclaim_idle_ms=60_000, prefetch_count=10)
        async with adapter:
            await queue.publish_messages([notification(i) for i in range(10)])
            await adapter.start_consuming()
            await started.wait()
            await adapter.stop_consuming(grace_period=0.12)
            rows: Any = await raw.xpending_range(adapter.stream_key, "workers", "-", "+", 100)
        assert len(rows) == 9  # read, not started
        handed_back = [row for row in rows if row["time_since_delivered"] > 10**8]
        assert len(handed_back) == 9


class TestPurgeWhileConsuming:
    async def test_the_consumer_goes_on_undisturbed_through_a_purge(
        self, prefix: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A purge while the adapter consumes keeps its worker reading: the message
        published right after it is delivered, and the worker logs no error."""
        caplog.set_level(logging.WARNING, logger="castore_pydantic.messaging.redis")
        queue = make_queue()
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder)
        async with adapter, adapter.consuming():
            await queue.publish_message(notification(1))
            await recorder.wait_for(1)
            await adapter.purge()
            await queue.publish_message(notification(2))
            await recorder.wait_for(2, seconds=10)
        assert recorder.messages == [notification(1), notification(2)]
        assert [record.getMessage() for record in caplog.records] == []

    async def test_a_purge_drops_what_the_worker_read_and_had_not_started(
        self, prefix: str
    ) -> None:
        """Entries read in a batch before the purge and not started yet are not handled
        after it: their stream is gone. The handler running through it finishes."""
        queue = make_queue()
        running, go_on = asyncio.Event(), asyncio.Event()
        recorder = Recorder()

        async def worker(message: Any, context: MessageContext) -> None:
            await recorder(message, context)
            if message == notification(1):
                running.set()
                await go_on.wait()

        adapter = attach(queue, prefix, worker=worker, prefetch_count=10)
        async with adapter:
            await queue.publish_messages([notification(index) for index in range(1, 6)])
            async with adapter.consuming():
                await running.wait()
                await adapter.purge()
                go_on.set()
                await queue.publish_message(notification(9))
                await recorder.wait_for(2, seconds=10)
        assert recorder.messages == [notification(1), notification(9)]

    async def test_a_message_failing_after_a_purge_is_not_retried(
        self, prefix: str, raw: Redis
    ) -> None:
        """A handler that fails once the channel was purged under it leaves no retry and no
        dead letter behind: they would bring a purged message back."""
        queue = make_queue()
        running, go_on = asyncio.Event(), asyncio.Event()
        recorder = Recorder()

        async def worker(message: Any, context: MessageContext) -> None:
            await recorder(message, context)
            if message == notification(1):
                running.set()
                await go_on.wait()
                raise ValueError("the read model went away with the purge")

        adapter = attach(queue, prefix, worker=worker, retry_delay_in_ms=60_000)
        async with adapter, adapter.consuming():
            await queue.publish_message(notification(1))
            await running.wait()
            await adapter.purge()
            go_on.set()
            # One worker handles one message at a time: once the next one is handled, the
            # failure was settled.
            await queue.publish_message(notification(2))
            await recorder.wait_for(2, seconds=10)
            assert await raw.zcard(f"{adapter.stream_key}:delayed") == 0
            assert await adapter.dead_letters() == []
        assert recorder.messages == [notification(1), notification(2)]

    @pytest.mark.parametrize("moment", ["before", "after"])
    @pytest.mark.parametrize("retry_attempts", [1, 0], ids=["retry", "dead-letter"])
    async def test_a_failure_settled_during_a_purge_leaves_nothing_behind(
        self,
        prefix: str,
        raw: Redis,
        monkeypatch: pytest.MonkeyPatch,
        moment: str,
        retry_attempts: int,
    ) -> None:
        """A handler failing while purge() runs, its failure settled just before or just
        after the purge deletes the keys, leaves no retry and no dead letter behind."""
        fail, settled = asyncio.Event(), asyncio.Event()
        failed = redis_handling.ConsumerHandling._failed
        call = AsyncScript.__call__

        async def failed_then_tell(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                await failed(self, *args, **kwargs)
            finally:
                settled.set()

        async def settle() -> None:
            fail.set()
            await asyncio.wait_for(settled.wait(), 5)

        async def purge_meeting_the_failure(self: AsyncScript, *args: Any, **kwargs: Any) -> Any:
            if self.script != redis_wire.PURGE_KEYS:
                return await call(self, *args, **kwargs)
            if moment == "before":
                await settle()
            result = await call(self, *args, **kwargs)
            if moment == "after":
                await settle()
            return result

        monkeypatch.setattr(redis_handling.ConsumerHandling, "_failed", failed_then_tell)
        monkeypatch.setattr(AsyncScript, "__call__", purge_meeting_the_failure)
        queue = make_queue()
        running = asyncio.Event()
        recorder = Recorder()

        async def worker(message: Any, context: MessageContext) -> None:
            await recorder(message, context)
            if message == notification(1):
                running.set()
                await fail.wait()
                raise ValueError("fails while the queue is purged")

        adapter = attach(
            queue, prefix, worker=worker, retry_attempts=retry_attempts, retry_delay_in_ms=60_000
        )
        async with adapter, adapter.consuming():
            await queue.publish_message(notification(1))
            await running.wait()
            await adapter.purge()
            assert await raw.exists(f"{adapter.stream_key}:delayed") == 0
            assert await adapter.dead_letters() == []
            await queue.publish_message(notification(2))
            await recorder.wait_for(2, seconds=10)
        assert recorder.messages == [notification(1), notification(2)]

    async def test_a_batch_read_before_a_purge_is_dropped_after_it(
        self, prefix: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A batch read before the purge whose reply the worker gets only after purge()
        returned is not handled; what is published after the purge is."""
        got, purged = asyncio.Event(), asyncio.Event()
        read = Redis.xreadgroup

        async def read_then_wait(self: Redis, *args: Any, **kwargs: Any) -> Any:
            reply = await read(self, *args, **kwargs)
            if reply and not got.is_set():
                got.set()
                await purged.wait()
            return reply

        monkeypatch.setattr(Redis, "xreadgroup", read_then_wait)
        queue = make_queue()
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder, prefetch_count=10)
        async with adapter, adapter.consuming():
            await queue.publish_messages([notification(index) for index in range(1, 6)])
            await got.wait()
            await adapter.purge()
            purged.set()
            await queue.publish_message(notification(9))
            await recorder.wait_for(1, seconds=10)
        assert recorder.messages == [notification(9)]

    async def test_a_read_under_way_through_a_purge_gets_what_is_published_after_it(
        self, prefix: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A read the worker started before the purge, which reaches Redis after it,
        delivers the message published after the purge."""
        entered, purged = asyncio.Event(), asyncio.Event()
        hold = False
        read = Redis.xreadgroup

        async def wait_then_read(self: Redis, *args: Any, **kwargs: Any) -> Any:
            if hold and not entered.is_set():
                entered.set()
                await purged.wait()
            return await read(self, *args, **kwargs)

        monkeypatch.setattr(Redis, "xreadgroup", wait_then_read)
        queue = make_queue()
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder, reclaim_idle_ms=60_000)
        async with adapter, adapter.consuming():
            hold = True
            await entered.wait()
            await adapter.purge()
            await queue.publish_message(notification(9))
            purged.set()
            await recorder.wait_for(1, seconds=10)
        assert recorder.messages == [notification(9)]


class TestEventLoops:
    """An adapter attached at import time, used by one event loop after another."""

    def test_an_adapter_serves_one_event_loop_after_another(self, prefix: str) -> None:
        """Used on one asyncio.run (left consuming), then on another, the adapter starts
        afresh on the new loop: publishing, consuming, dead letters, purge and aclose
        work there, and no connection or transport of the first loop is left open."""
        queue = make_queue()
        adapter = attach(queue, prefix)
        first, second = Recorder(), Recorder()

        async def on_the_first_loop() -> None:
            adapter.worker = first
            await adapter.start_consuming()
            await queue.publish_message(notification(1))
            await first.wait_for(1)
            # Left consuming: asyncio.run cancels the consumer as the loop ends.

        async def on_the_second_loop() -> None:
            assert not adapter.is_consuming
            adapter.worker = second
            await queue.publish_message(notification(2))
            async with adapter.consuming():
                await second.wait_for(1)
            assert await adapter.dead_letters() == []
            assert await adapter.republish_dead_letters() == 0
            await adapter.purge()
            await adapter.aclose()

        async def connections_left() -> list[int]:
            raw = raw_client()
            try:
                return await connections_named(raw, f"castore:{adapter.consumer_name}")
            finally:
                await raw.aclose()

        asyncio.run(on_the_first_loop())
        assert asyncio.run(connections_left()) == []  # closed as its loop ended
        asyncio.run(on_the_second_loop())
        gc.collect()  # a transport left open would warn here (an error under -W error)
        assert first.messages == [notification(1)]
        assert second.messages == [notification(2)]
        assert asyncio.run(connections_left()) == []

    def test_asyncio_run_ends_while_the_adapter_consumes(self, prefix: str) -> None:
        """asyncio.run returns when its coroutine ends while the adapter consumes, just after
        a handler returned: the consumer's cancellation, arriving as it acknowledges (a
        redis-py command under asyncio.wait_for), used to be swallowed, and the run hung."""
        queue = make_queue()
        recorder = Recorder()
        adapter = attach(queue, prefix, worker=recorder)

        async def consume_and_leave() -> None:
            await adapter.start_consuming()
            await queue.publish_message(notification(1))
            await recorder.wait_for(1)

        # In a thread of its own: a run that hangs must not hang the test session.
        thread = threading.Thread(target=asyncio.run, args=(consume_and_leave(),), daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive()
        assert recorder.messages == [notification(1)]

    def test_aclose_on_a_new_loop_connects_nothing(self, prefix: str) -> None:
        """aclose() on a new loop, after the loop the adapter connected on has closed,
        returns without connecting again."""
        queue = make_queue()
        adapter = attach(queue, prefix)

        async def connect() -> None:
            await adapter.connect()
            await queue.publish_message(notification(1))

        async def close() -> None:
            await adapter.aclose()
            assert adapter._client is None

        asyncio.run(connect())
        asyncio.run(close())

    def test_an_adapter_in_use_on_a_live_loop_refuses_another(self, prefix: str) -> None:
        """While the loop an adapter is used on is still open (another thread's), every
        entry point called from another loop raises an error naming the adapter."""
        queue = make_queue()
        adapter = attach(queue, prefix, worker=Recorder())
        home = asyncio.new_event_loop()
        thread = threading.Thread(target=home.run_forever)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(adapter.start_consuming(), home).result(10)
            calls = {
                "publish_message": lambda: queue.publish_message(notification(1)),
                "publish_messages": lambda: queue.publish_messages([notification(1)]),
                "connect": adapter.connect,
                "start_consuming": adapter.start_consuming,
                "stop_consuming": adapter.stop_consuming,
                "dead_letters": adapter.dead_letters,
                "republish_dead_letters": adapter.republish_dead_letters,
                "purge": adapter.purge,
                "aclose": adapter.aclose,
            }
            for name, call in calls.items():

                async def elsewhere(call: Any = call) -> None:
                    await call()

                with pytest.raises(RuntimeError, match="another event loop") as raised:
                    asyncio.run(elsewhere())
                assert "RedisMessageQueueAdapter(" in str(raised.value), name
            assert adapter.is_consuming  # still, on its own loop
        finally:
            asyncio.run_coroutine_threadsafe(adapter.aclose(), home).result(10)
            home.call_soon_threadsafe(home.stop)
            thread.join()
            home.close()

    def test_a_client_passed_in_is_not_carried_to_a_new_loop(self, prefix: str) -> None:
        """A client passed in cannot be replaced by the adapter: used on a new loop after
        its own has closed, the adapter says so instead of failing inside redis-py."""
        client = raw_client()
        queue = make_queue()
        adapter = RedisMessageQueueAdapter.attach_to(queue, client, key_prefix=prefix)

        async def publish() -> None:
            await queue.publish_message(notification(1))

        async def publish_and_close() -> None:
            await publish()
            await client.aclose()  # the caller's to close

        async def close() -> None:
            await adapter.aclose()

        asyncio.run(publish_and_close())
        with pytest.raises(RuntimeError, match="client passed in"):
            asyncio.run(publish())
        asyncio.run(close())
