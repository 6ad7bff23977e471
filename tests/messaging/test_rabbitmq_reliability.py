"""RabbitMQ adapters under failure: killed consumers, poison messages, a broker that is down.

Every test runs against the real broker in a private vhost; connections are cut through a
local TCP proxy, which is what a crashed worker or a network failure looks like to RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import socket
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import pytest

from castore_pydantic.errors import MessageBrokerUnavailableError, MessagingError
from castore_pydantic.messaging import (
    ConnectedEventStore,
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
)
from castore_pydantic.messaging import _rabbitmq_adapter as rabbitmq_adapter
from castore_pydantic.messaging.rabbitmq import (
    RabbitMQMessageBusAdapter,
    RabbitMQMessageQueueAdapter,
)
from tests.messaging.rabbitmq_support import (
    T0,
    Appeared,
    DeadLetterWatch,
    LogWatch,
    PokemonAppeared,
    TcpProxy,
    consumer_count,
    event_key,
    notification,
    pokemon_store,
    private_vhost,
    queue_policy,
    stopped_consuming,
    vhost_url,
    within,
)

pytestmark = [pytest.mark.rabbitmq]

MESSAGES = 10_000
KILL_EVERY = 20  # 5 % of the messages are in a consumer's hands when it is killed
WORKERS = 2
#: A guard against a stall, not a speed requirement: each kill costs a reconnection, and on a
#: loaded 2-core machine (broker, proxy and test sharing the CPU) a run takes far longer than
#: the ~10 s it takes on a quiet one.
DONE_WITHIN = 180
#: Stopping the workers and deleting the queues takes well under a second; past this, a step
#: is stuck, and the test fails naming it instead of hanging the suite.
TEARDOWN_WITHIN = 60


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    with private_vhost() as name:
        yield name


@pytest.fixture
async def proxies() -> AsyncIterator[list[TcpProxy]]:
    started = [TcpProxy() for _ in range(WORKERS)]
    for proxy in started:
        await proxy.start()
    yield started
    for proxy in started:
        await proxy.close()


Key = tuple[str, str, int]


class KillingConsumer:
    """A deduplicating consumer whose process 'dies' holding 5 % of the messages.

    For every 20th message, on its first delivery, the effect is applied and then the
    consumer dies before acknowledging: half the time its handler task is cancelled, half
    the time its connection to the broker is cut. A redelivery must follow, and the
    deduplication on ``(event_store_id, aggregate_id, version)`` keeps one effect per event.
    """

    def __init__(self, messages: list[NotificationMessage]) -> None:
        self.expected = {event_key(message) for message in messages}
        self.doomed = {event_key(message) for message in messages[::KILL_EVERY]}
        self.killed: set[Key] = set()
        self.deliveries: Counter[Key] = Counter()
        self.effects: Counter[Key] = Counter()
        self.done = asyncio.Event()
        self._redelivered = 0
        self.cancelled = 0
        self.dropped = 0

    def _apply(self, key: Key) -> None:
        if key in self.effects:  # deduplication: the effect happened already
            return
        self.effects[key] += 1
        self._check_done()

    def _check_done(self) -> None:
        if len(self.effects) == len(self.expected) and self._redelivered == len(self.doomed):
            self.done.set()

    def handler_for(self, proxy: TcpProxy) -> Any:
        async def handle(message: NotificationMessage, context: MessageContext) -> None:
            key = event_key(message)
            self.deliveries[key] += 1
            if key in self.killed and self.deliveries[key] == 2:
                self._redelivered += 1
                self._check_done()
            if key in self.doomed and key not in self.killed:
                self.killed.add(key)
                self._apply(key)  # the effect lands, the acknowledgement never does
                if len(self.killed) % 2:
                    self.cancelled += 1
                    task = asyncio.current_task()
                    assert task is not None
                    task.cancel()
                    await asyncio.sleep(0)  # raises CancelledError
                else:
                    self.dropped += 1
                    proxy.drop()
                    await asyncio.Event().wait()  # until the dead connection cancels us
            self._apply(key)

        return handle

    def progress(self) -> str:
        """Where a run stands, for the failure message of a run that did not finish."""
        return (
            f"{len(self.effects)}/{len(self.expected)} messages applied, "
            f"{self._redelivered}/{len(self.doomed)} killed ones redelivered "
            f"({self.cancelled} cancelled, {self.dropped} dropped), "
            f"{sum(self.deliveries.values())} deliveries"
        )

    def check(self) -> None:
        assert set(self.deliveries) == self.expected  # 100 % delivered at least once
        assert self.killed == self.doomed
        assert all(self.deliveries[key] >= 2 for key in self.doomed)  # killed → redelivered
        assert sum(self.deliveries.values()) > len(self.expected)  # duplicates did happen
        assert self.effects == Counter(dict.fromkeys(self.expected, 1))  # one effect each
        assert self.cancelled == self.dropped == len(self.doomed) // 2


class TestKilledConsumers:
    """10,000 messages, consumers killed before acknowledging 5 % of them."""

    async def test_queue_delivers_every_message_at_least_once(
        self, vhost: str, proxies: list[TcpProxy]
    ) -> None:
        """Every message reaches a worker; killed ones come back; dedup leaves one effect."""
        queue = NotificationMessageQueue(
            message_queue_id="killed", source_event_stores=[pokemon_store()]
        )
        messages = [notification(index) for index in range(MESSAGES)]
        consumer = KillingConsumer(messages)
        workers = [
            RabbitMQMessageQueueAdapter.attach_to(
                queue,
                proxy.url(vhost),
                worker=consumer.handler_for(proxy),
                prefetch_count=50,
                reconnect_delay=0.01,
            )
            for proxy in proxies
        ]
        publisher = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost))
        await self._run(publisher, workers, messages, consumer)
        assert all(proxy.drops >= 1 for proxy in proxies)

    async def test_bus_delivers_every_message_at_least_once(
        self, vhost: str, proxies: list[TcpProxy]
    ) -> None:
        """Every message reaches the listener's consumers; killed ones come back; one effect."""
        bus = NotificationMessageBus(message_bus_id="killed", source_event_stores=[pokemon_store()])
        messages = [notification(index) for index in range(MESSAGES)]
        consumer = KillingConsumer(messages)
        workers = []
        for proxy in proxies:  # two processes sharing one durable listener
            worker = RabbitMQMessageBusAdapter.attach_to(
                bus, proxy.url(vhost), prefetch_count=50, reconnect_delay=0.01
            )
            worker.on({}, consumer.handler_for(proxy), listener_id="projection")
            workers.append(worker)
        publisher = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        await self._run(publisher, workers, messages, consumer)
        assert all(proxy.drops >= 1 for proxy in proxies)

    @staticmethod
    async def _run(
        publisher: RabbitMQMessageQueueAdapter | RabbitMQMessageBusAdapter,
        workers: list[Any],
        messages: list[NotificationMessage],
        consumer: KillingConsumer,
    ) -> None:
        channel = publisher.message_channel
        assert channel is not None
        async with publisher:
            try:
                for worker in workers:
                    await worker.start_consuming()
                for start in range(0, len(messages), 1000):
                    await channel.publish_messages(messages[start : start + 1000])
                try:
                    async with asyncio.timeout(DONE_WITHIN):
                        await consumer.done.wait()
                except TimeoutError:
                    pytest.fail(f"not done after {DONE_WITHIN}s: {consumer.progress()}")
            finally:
                for index, worker in enumerate(workers):
                    async with within(f"workers[{index}].aclose()", TEARDOWN_WITHIN):
                        await worker.aclose()
            async with within("workers[0].purge()", TEARDOWN_WITHIN):
                await workers[0].purge()
            async with within("publisher.purge()", TEARDOWN_WITHIN):
                await publisher.purge()
        consumer.check()


class TestStopWhileReconnecting:
    """Stopping a worker whose consumers are reconnecting."""

    async def test_stop_returns_when_the_reconnection_outlives_its_cancellation(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A reconnection that completes although cancelled neither blocks stop nor lingers.

        On Python 3.11, ``asyncio.wait_for``, which aio-pika's ``connect`` runs in, returns
        the connection and drops the cancellation when both arrive together: a worker stopped
        at that moment carried on, registered a consumer, and ``stop_consuming`` waited for
        it forever. This ``connect`` makes that moment certain: it connects, waits to be
        cancelled, then returns the connection all the same.
        """
        real_connect = aio_pika.connect
        connected = asyncio.Event()

        async def connect_outliving_cancellation(*args: Any, **kwargs: Any) -> Any:
            connection = await real_connect(*args, **kwargs)
            connected.set()
            with contextlib.suppress(asyncio.CancelledError):  # what wait_for does on 3.11
                await asyncio.Event().wait()
            return connection

        proxy = TcpProxy()
        await proxy.start()
        queue = NotificationMessageQueue(
            message_queue_id="stop-reconnecting", source_event_stores=[pokemon_store()]
        )
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, proxy.url(vhost), worker=handler_noop, reconnect_delay=0
        )
        try:
            await adapter.start_consuming()
            monkeypatch.setattr(aio_pika, "connect", connect_outliving_cancellation)
            assert proxy.drop() == 1  # the consumer connection: the worker reconnects
            async with asyncio.timeout(10):
                await connected.wait()
            monkeypatch.undo()  # only the reconnection under way outlives its cancellation

            async with within("stop_consuming()", 10):
                await adapter.stop_consuming()
            assert not adapter.is_consuming
            async with (
                await aio_pika.connect(vhost_url(vhost)) as connection,
                connection.channel() as channel,
            ):
                declared = await channel.declare_queue(adapter.queue_name, passive=True)
            assert declared.declaration_result.consumer_count == 0  # the late one was closed
        finally:
            monkeypatch.undo()
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()
            await proxy.close()


POISON_TOTAL = 1000
POISON_EVERY = 20  # 50 of the 1,000 messages make the handler raise


class PoisonedHandler:
    """Raises on 50 chosen messages until ``fixed``; records every attempt's context."""

    def __init__(self, messages: list[NotificationMessage]) -> None:
        self.keys = {event_key(message) for message in messages}
        self.poison = {event_key(message) for message in messages[::POISON_EVERY]}
        self.fixed = False
        self.contexts: dict[Key, list[MessageContext]] = {}
        self.applied: set[Key] = set()
        self._changed = asyncio.Event()

    async def __call__(self, message: NotificationMessage, context: MessageContext) -> None:
        key = event_key(message)
        self.contexts.setdefault(key, []).append(context)
        if key in self.poison and not self.fixed:
            raise ValueError(f"cannot apply {key[1]} v{key[2]}")
        self.applied.add(key)
        self._changed.set()

    async def wait_applied(self, expected: set[Key]) -> None:
        while not expected <= self.applied:
            self._changed.clear()
            await self._changed.wait()


class TestClosedConsumerChannel:
    async def test_consumers_come_back_when_the_broker_closes_their_channel(
        self, vhost: str
    ) -> None:
        """The broker closes a consumer's channel and keeps the connection (consumer_timeout
        does: 406 PRECONDITION_FAILED). The consumers are opened again as after a lost
        connection; they used to stay gone while is_consuming said True."""
        queue = NotificationMessageQueue(
            message_queue_id="closed-channel", source_event_stores=[pokemon_store()]
        )
        received: list[NotificationMessage] = []
        first_in, all_in = asyncio.Event(), asyncio.Event()

        async def worker(message: NotificationMessage, context: MessageContext) -> None:
            received.append(message)
            first_in.set()
            if len(received) == 4:
                all_in.set()

        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=worker, reconnect_delay=0.05
        )
        async with adapter:
            try:
                async with adapter.consuming():
                    await queue.publish_message(notification(0))
                    async with asyncio.timeout(10):
                        await first_in.wait()
                    channel, _ = adapter._consumers[0]
                    closed = asyncio.Event()
                    channel.close_callbacks.add(lambda *_: closed.set())
                    underlay = await channel.get_underlay_channel()
                    # Acknowledging a delivery the broker never made: it closes the channel.
                    await underlay.basic_ack(999_999)
                    async with asyncio.timeout(10):
                        await closed.wait()
                    for index in (1, 2, 3):
                        await queue.publish_message(notification(index))
                    async with asyncio.timeout(20):
                        await all_in.wait()
                    assert adapter.is_consuming
            finally:
                await adapter.purge()
        assert received == [notification(i) for i in range(4)]


class TestStopWhileReopening:
    async def test_a_stop_while_the_rest_of_the_consumers_closes_closes_them_all(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A broker-closed consumer channel makes the adapter close what is left of its
        consumers and open them again. A stop_consuming arriving during that close (made
        slow here) used to leave the old connection and its other channels open for good."""
        closing_started = asyncio.Event()
        close_quietly = rabbitmq_adapter._close_quietly

        async def slow_close(connection: Any, *channels: Any) -> None:
            closing_started.set()
            await asyncio.sleep(0.5)
            await close_quietly(connection, *channels)

        monkeypatch.setattr(rabbitmq_adapter, "_close_quietly", slow_close)
        bus = NotificationMessageBus(
            message_bus_id=f"reopen-{secrets.token_hex(3)}", source_event_stores=[pokemon_store()]
        )
        adapter = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost), reconnect_delay=5)
        for index in range(3):
            adapter.on({}, handler_noop, listener_id=f"listener-{index}")
        async with adapter:
            try:
                await adapter.start_consuming()
                connection = adapter._consumer_connection
                assert connection is not None
                channels = [channel for channel, _ in adapter._consumers]
                underlay = await channels[0].get_underlay_channel()
                await underlay.basic_ack(999_999)  # the broker closes this channel only
                async with asyncio.timeout(10):
                    await closing_started.wait()  # the adapter closes what is left, slowly
                await adapter.stop_consuming()
                assert connection.is_closed
                assert all(channel.is_closed for channel in channels)
            finally:
                await adapter.purge()


class Received:
    """A worker that records what it handles and lets a test await a count."""

    def __init__(self) -> None:
        self.messages: list[NotificationMessage] = []
        self._changed = asyncio.Event()

    async def __call__(self, message: NotificationMessage, context: MessageContext) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()


class TestUnexpectedErrorWhileRecovering:
    """The task that keeps the consumers running meets an error nobody foresaw."""

    @pytest.mark.parametrize(
        "step",
        [
            "consuming the cancelled consumers again",
            "closing what is left of the consumers",
            "putting the new consumers to use",
        ],
    )
    async def test_consumers_come_back_after_an_unexpected_error(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch, step: str
    ) -> None:
        """An unexpected error while recovering from a dropped connection ended the task
        that keeps the consumers running: the worker consumed no more, with no sign, and
        is_consuming said true. It is now logged with its traceback, and they reconnect;
        a channel whose close fails no longer leaves its connection's other consumers on."""
        proxy = TcpProxy()
        await proxy.start()
        bus = NotificationMessageBus(
            message_bus_id=f"supervisor-error-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        received = {listener_id: Received() for listener_id in ("first", "second")}
        adapter = RabbitMQMessageBusAdapter.attach_to(bus, proxy.url(vhost), reconnect_delay=0.05)
        for listener_id, handler in received.items():
            adapter.on({}, handler, listener_id=listener_id)
        bug = RuntimeError("a bug nobody foresaw")
        failed = False

        def fail_once(real: Any) -> Any:
            def fail(*args: Any) -> Any:
                nonlocal failed
                if not failed:
                    failed = True
                    raise bug
                return real(*args)

            return fail

        try:
            with LogWatch.installed() as logs:
                await adapter.start_consuming()
                first_channel = adapter._consumers[0][0]
                target: Any = {
                    "consuming the cancelled consumers again": (adapter, "_consume_again"),
                    # The first listener's channel fails to close; the second one's, on the
                    # same connection, still consumes, and must go with that connection.
                    "closing what is left of the consumers": (first_channel, "close"),
                    "putting the new consumers to use": (adapter, "_use_consumers"),
                }[step]
                monkeypatch.setattr(*target, fail_once(getattr(*target)))
                if step == "closing what is left of the consumers":
                    underlay = await first_channel.get_underlay_channel()
                    await underlay.basic_ack(999_999)  # the broker closes this channel only
                else:
                    assert proxy.drop() == 1  # the consumer connection: the worker recovers
                async with within("reconnecting", 10):
                    await logs.wait_for("reconnected to RabbitMQ")
                assert failed
                await bus.publish_message(notification(0))
                for handler in received.values():
                    await handler.wait_for(1)
                assert adapter.is_consuming
                for listener_id in received:
                    queue = adapter.listener_queue(listener_id)
                    assert await consumer_count(vhost_url(vhost), queue) == 1
                errors = [record for record in logs.records if record.levelno >= logging.ERROR]
                assert [record.exc_info[1] for record in errors if record.exc_info] == [bug]
        finally:
            monkeypatch.undo()
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()
            await proxy.close()
        for handler in received.values():
            assert handler.messages == [notification(0)]

    @pytest.mark.parametrize("before_first_step", [False, True])
    @pytest.mark.parametrize("stop_first", [False, True])
    async def test_a_cancelled_supervisor_stops_consuming_and_starts_again(
        self, vhost: str, stop_first: bool, before_first_step: bool
    ) -> None:
        """Cancelled from outside (a shutdown that cancels every task), the task keeping the
        consumers running left them taking messages unwatched, is_consuming true and
        start_consuming() doing nothing; cancelled before its first step, it left them on
        with is_consuming false. They now close, is_consuming says false once they have,
        the end is logged, and start_consuming() starts again (also after a stop)."""
        queue = NotificationMessageQueue(
            message_queue_id=f"supervisor-cancelled-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        received = Received()
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=received)
        async with adapter:
            try:
                with LogWatch.installed() as logs:
                    await adapter.start_consuming()
                    supervisor = adapter._supervisor
                    assert supervisor is not None
                    if not before_first_step:
                        await asyncio.sleep(0)  # one step: the supervisor watches them
                    supervisor.cancel()
                    await asyncio.wait([supervisor])
                    # is_consuming stays true until the consumers are closed.
                    await stopped_consuming(adapter, "closing the consumers", 10)
                    assert await consumer_count(vhost_url(vhost), adapter.queue_name) == 0
                    assert logs.count("stopped consuming", logging.WARNING) == 1
                    if stop_first:
                        await adapter.stop_consuming()
                        assert not adapter.is_consuming
                    await adapter.start_consuming()
                    assert adapter.is_consuming
                    assert await consumer_count(vhost_url(vhost), adapter.queue_name) == 1
                    await queue.publish_message(notification(0))
                    await received.wait_for(1)
                    await adapter.stop_consuming()
                    assert logs.count("stopped consuming", logging.WARNING) == 1
            finally:
                await adapter.purge()
        assert received.messages == [notification(0)]


class TestStopFromAHandler:
    async def test_a_handler_may_stop_its_own_adapter(self, vhost: str) -> None:
        """stop_consuming waits for the handlers in flight: called by one, it waited for
        itself for ever. It now returns at once; the handler finishes, its message is
        acknowledged, no other is handled, and the consumers close afterwards."""
        queue = NotificationMessageQueue(
            message_queue_id=f"self-stop-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        handled: list[NotificationMessage] = []
        returned = asyncio.Event()

        async def worker(message: NotificationMessage, context: MessageContext) -> None:
            handled.append(message)
            await adapter.stop_consuming()
            returned.set()

        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=worker, prefetch_count=1
        )
        async with adapter:
            try:
                await adapter.start_consuming()
                await queue.publish_message(notification(1))
                await queue.publish_message(notification(2))
                async with asyncio.timeout(10):
                    await returned.wait()
                async with within("the stop a handler asked for", 10):
                    await adapter.stop_consuming()  # waits for that stop to complete
                assert not adapter.is_consuming
                assert handled == [notification(1)]
                # The first message was acknowledged, the second is still there.
                connection = await aio_pika.connect(vhost_url(vhost))
                try:
                    channel = await connection.channel()
                    declared = await channel.declare_queue(adapter.queue_name, passive=True)
                    assert declared.declaration_result.message_count == 1
                finally:
                    await connection.close()
            finally:
                await adapter.purge()


class TestRefusedHandOver:
    async def test_a_message_the_dead_letter_queue_refuses_goes_behind_the_others(
        self, vhost: str
    ) -> None:
        """An operator's length limit (overflow reject-publish) on the dead-letter queue
        makes the broker refuse a failed message there while the channel lives on. It was
        left unsettled for good, holding a prefetch slot: with prefetch_count=1 the worker
        received nothing more. It now goes behind the others in its queue."""
        queue = NotificationMessageQueue(
            message_queue_id=f"refused-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        handled: list[NotificationMessage] = []
        good_in = asyncio.Event()

        async def worker(message: NotificationMessage, context: MessageContext) -> None:
            handled.append(message)
            if message == notification(0):
                raise ValueError("poison")
            if notification(3) in handled:
                good_in.set()

        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue,
            vhost_url(vhost),
            worker=worker,
            prefetch_count=1,
            retry_attempts=0,
            reconnect_delay=0.05,
        )
        dead = adapter.queue_name + ".dead"
        async with adapter:
            try:
                with queue_policy(
                    vhost, f"^{re.escape(dead)}$", '{"max-length":0,"overflow":"reject-publish"}'
                ):
                    async with adapter.consuming():
                        for index in range(4):
                            await queue.publish_message(notification(index))
                        async with asyncio.timeout(20):
                            await good_in.wait()
            finally:
                await adapter.purge()
        assert handled[0] == notification(0)
        others = [message for message in handled if message != notification(0)]
        assert others == [notification(i) for i in (1, 2, 3)]


class TestPoisonMessages:
    """A handler that raises on 50 of 1,000 messages: retries, dead letters, republishing."""

    @pytest.mark.parametrize("kind", ["queue", "bus"])
    async def test_retried_to_budget_then_dead_lettered_then_republished(
        self, vhost: str, kind: str
    ) -> None:
        """The 50 get 3 attempts then a dead letter with the error; 950 flow; a fix applies all."""
        store = pokemon_store()
        messages = [notification(index) for index in range(POISON_TOTAL)]
        handler = PoisonedHandler(messages)
        healthy = PoisonedHandler(messages)
        healthy.fixed = True  # a second bus listener that never fails
        options: dict[str, Any] = {
            "retry_attempts": 2,
            "retry_delay_in_ms": 20,
            "retry_backoff_rate": 2,
            "prefetch_count": 100,
        }
        adapter: RabbitMQMessageQueueAdapter | RabbitMQMessageBusAdapter
        if kind == "queue":
            channel: Any = NotificationMessageQueue(
                message_queue_id="poison", source_event_stores=[store]
            )
            adapter = RabbitMQMessageQueueAdapter.attach_to(
                channel, vhost_url(vhost), worker=handler, **options
            )
        else:
            channel = NotificationMessageBus(message_bus_id="poison", source_event_stores=[store])
            adapter = RabbitMQMessageBusAdapter.attach_to(channel, vhost_url(vhost), **options)
            adapter.on({}, handler, listener_id="fragile")
            adapter.on({}, healthy, listener_id="sturdy")
        with DeadLetterWatch.installed() as watch:
            async with adapter, adapter.consuming():
                await channel.publish_messages(messages)
                async with asyncio.timeout(30):
                    await watch.wait_for(len(handler.poison))
                    await handler.wait_applied(handler.keys - handler.poison)
                    if kind == "bus":
                        await healthy.wait_applied(healthy.keys)
                letters = await adapter.dead_letters()

                assert {event_key(letter.message) for letter in letters} == handler.poison
                assert len(letters) == len(handler.poison)
                for letter in letters:
                    _, aggregate_id, version = event_key(letter.message)
                    assert letter.error == f"ValueError: cannot apply {aggregate_id} v{version}"
                    assert letter.attempts == 3
                    assert letter.replay is False
                    assert letter.listener_id == (None if kind == "queue" else "fragile")
                for key in handler.poison:
                    assert [(c.attempt, c.retry_attempts_left) for c in handler.contexts[key]] == [
                        (1, 2),
                        (2, 1),
                        (3, 0),
                    ]
                assert handler.applied == handler.keys - handler.poison
                if kind == "bus":  # the failing listener was retried alone
                    assert all(len(calls) == 1 for calls in healthy.contexts.values())
                    assert healthy.applied == healthy.keys

                handler.fixed = True
                assert await adapter.republish_dead_letters() == len(handler.poison)
                async with asyncio.timeout(30):
                    await handler.wait_applied(handler.keys)
                assert await adapter.dead_letters() == []
                for key in handler.poison:  # sent back as a fresh first attempt
                    assert handler.contexts[key][-1].attempt == 1
                if kind == "bus":  # republished to the failing listener only
                    assert all(len(calls) == 1 for calls in healthy.contexts.values())
            await adapter.purge()
        assert len(watch.queues) == len(handler.poison)


class TestDeadLettersWhileTheyArrive:
    async def test_dead_letters_lists_what_was_there_and_returns(self, vhost: str) -> None:
        """dead_letters() read until the dead-letter queue was empty: while a broken handler
        kept dead-lettering, it never returned and held every letter read unacknowledged.
        It now reads as many letters as the queue held when it started."""
        queue = NotificationMessageQueue(
            message_queue_id=f"dead-feed-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost))
        body = notification(0).model_dump_json().encode()
        headers: dict[str, Any] = {"x-error": "ValueError: boom", "x-attempts": 3}
        stop = asyncio.Event()
        async with adapter:
            try:
                dead = f"{adapter.queue_name}.dead"
                async with await aio_pika.connect(vhost_url(vhost)) as connection:
                    confirmed = await connection.channel()
                    for _ in range(100):
                        await confirmed.default_exchange.publish(
                            aio_pika.Message(body, headers=headers), dead
                        )
                    unconfirmed = await connection.channel(publisher_confirms=False)

                    async def feed() -> None:  # consumers dead-lettering a broken handler's work
                        while not stop.is_set():
                            for _ in range(200):
                                await unconfirmed.default_exchange.publish(
                                    aio_pika.Message(body, headers=headers), dead
                                )
                            await asyncio.sleep(0)

                    feeder = asyncio.create_task(feed())
                    try:
                        async with within("dead_letters()", 10):
                            letters = await adapter.dead_letters()
                    finally:
                        stop.set()
                        await feeder
                assert len(letters) >= 100
                assert {(letter.error, letter.attempts) for letter in letters} == {
                    ("ValueError: boom", 3)
                }
            finally:
                await adapter.purge()


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


CANARY = "CANARY-7f3a"


def message() -> NotificationMessage:
    return notification(0)


class TestBrokerDown:
    """Publishing when the broker cannot be reached raises ``MessageBrokerUnavailableError``."""

    @pytest.mark.parametrize(
        "adapter_class", [RabbitMQMessageQueueAdapter, RabbitMQMessageBusAdapter]
    )
    async def test_closed_port(self, adapter_class: Any) -> None:
        """A refused connection is a retriable error naming the broker, never the password."""
        store = pokemon_store()
        channel: Any
        if adapter_class is RabbitMQMessageQueueAdapter:
            channel = NotificationMessageQueue(message_queue_id="down", source_event_stores=[store])
        else:
            channel = NotificationMessageBus(message_bus_id="down", source_event_stores=[store])
        port = closed_port()
        adapter = adapter_class.attach_to(
            channel, f"amqp://guest:{CANARY}@127.0.0.1:{port}/vh", connect_timeout=5
        )
        with pytest.raises(MessageBrokerUnavailableError) as raised:
            await channel.publish_message(message())
        assert isinstance(raised.value, ConnectionError)  # retriable
        assert isinstance(raised.value.__cause__, ConnectionError)
        assert f"amqp://guest:***@127.0.0.1:{port}/vh" in str(raised.value)
        # The driver's reason is in the message (it used to give only the error's class).
        assert str(raised.value.__cause__)
        assert str(raised.value.__cause__) in str(raised.value)
        assert CANARY not in "".join(traceback.format_exception(raised.value))
        assert CANARY not in repr(adapter)
        with pytest.raises(MessageBrokerUnavailableError):
            await adapter.connect()
        await adapter.aclose()

    async def test_a_missing_vhost_or_a_wrong_password_says_to_check_the_url(self) -> None:
        """Not retriable, and the message says what to check. (A missing vhost used to be
        an 'InvalidFrameError' about frames.)"""
        for url in (
            vhost_url(f"castore-missing-{secrets.token_hex(4)}"),
            vhost_url("").replace("guest:guest", "guest:wrong"),
        ):
            queue = NotificationMessageQueue(
                message_queue_id="refused", source_event_stores=[pokemon_store()]
            )
            adapter = RabbitMQMessageQueueAdapter.attach_to(queue, url, connect_timeout=5)
            refused = "check the user, password and vhost"
            with pytest.raises(MessagingError, match=refused) as raised:
                await queue.publish_message(message())
            assert not isinstance(raised.value, MessageBrokerUnavailableError)
            await adapter.aclose()

    async def test_start_consuming_with_broker_down(self) -> None:
        """Starting a worker against a closed port raises instead of retrying silently."""
        queue = NotificationMessageQueue(
            message_queue_id="down", source_event_stores=[pokemon_store()]
        )
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, f"amqp://guest:guest@127.0.0.1:{closed_port()}/vh", worker=handler_noop
        )
        with pytest.raises(MessageBrokerUnavailableError):
            await adapter.start_consuming()
        assert not adapter.is_consuming

    async def test_dropped_connection_then_broker_back(self, vhost: str) -> None:
        """A live adapter whose broker vanishes raises; once it is back, publishing works again."""
        proxy = TcpProxy()
        await proxy.start()
        queue = NotificationMessageQueue(
            message_queue_id="drop", source_event_stores=[pokemon_store()]
        )
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, proxy.url(vhost), connect_timeout=5)
        try:
            async with adapter:
                await queue.publish_message(notification(0))
                await proxy.refuse()  # cuts the live connection and refuses new ones
                with pytest.raises(MessageBrokerUnavailableError) as raised:
                    await queue.publish_message(notification(1))
                assert raised.value.__cause__ is not None
                await proxy.start()
                await queue.publish_message(notification(2))

                received: list[NotificationMessage] = []
                both = asyncio.Event()

                async def worker(message: NotificationMessage, context: MessageContext) -> None:
                    received.append(message)
                    if len(received) == 2:
                        both.set()

                adapter.worker = worker
                async with adapter.consuming():
                    async with asyncio.timeout(10):
                        await both.wait()
                assert received == [notification(0), notification(2)]
                await adapter.purge()
        finally:
            await proxy.close()

    async def test_connected_event_store_keeps_the_event_and_raises(self) -> None:
        """The event is stored, and the broker error reaches the caller of push_event."""
        store = pokemon_store()
        queue = NotificationMessageQueue(message_queue_id="down", source_event_stores=[store])
        RabbitMQMessageQueueAdapter.attach_to(
            queue, f"amqp://guest:guest@127.0.0.1:{closed_port()}/x", connect_timeout=5
        )
        connected = ConnectedEventStore(store, queue)
        event = PokemonAppeared(
            aggregate_id="pikachu",
            version=1,
            timestamp=T0,
            payload=Appeared(name="Pikachu", level=5),
        )
        with pytest.raises(MessageBrokerUnavailableError):
            await connected.push_event(event)
        assert (await store.get_events("pikachu")).events == [event]


async def handler_noop(message: NotificationMessage, context: MessageContext) -> None:
    """A worker that does nothing."""
