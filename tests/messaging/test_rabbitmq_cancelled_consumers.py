"""RabbitMQ consumers that the broker cancels: their queue is deleted while they consume.

RabbitMQ sends ``basic.cancel`` to the consumers of a queue that is deleted (by
``rabbitmqctl delete_queue``, the management UI or another client's ``queue.delete``) and
keeps their channel open. The consumers used to stay silently gone while ``is_consuming``
said True; they now declare the queue (and a bus listener's bindings) again and consume anew.
Every test deletes the queue from another connection, as an operator or another client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest

from castore_pydantic.messaging import (
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
)
from castore_pydantic.messaging.rabbitmq import (
    RabbitMQMessageBusAdapter,
    RabbitMQMessageQueueAdapter,
)
from tests.messaging.rabbitmq_support import (
    LogWatch,
    event_key,
    notification,
    pokemon_store,
    private_vhost,
    queue_state,
    vhost_url,
    within,
)

pytestmark = [pytest.mark.rabbitmq]


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    with private_vhost() as name:
        yield name


async def delete_queue(vhost: str, queue: str) -> None:
    """Delete ``queue`` from another connection, with the messages in it."""
    async with (
        await aio_pika.connect(vhost_url(vhost)) as connection,
        connection.channel() as channel,
    ):
        await channel.queue_delete(queue)


async def wait_until_consumed(vhost: str, queue: str) -> None:
    """Return once ``queue`` exists again and has a consumer.

    Polled: the broker announces neither to another client.
    """
    async with await aio_pika.connect(vhost_url(vhost)) as connection:
        while True:
            # A passive declaration of a missing queue closes its channel: one per look.
            async with connection.channel() as channel:
                with contextlib.suppress(aio_pika.exceptions.ChannelNotFoundEntity):
                    declared = await channel.declare_queue(queue, passive=True)
                    if declared.declaration_result.consumer_count:
                        return
            await asyncio.sleep(0.02)


class Inbox:
    """A handler that records what it handles and lets a test await a count."""

    def __init__(self) -> None:
        self.handled: list[NotificationMessage] = []
        self._changed = asyncio.Event()

    async def __call__(self, message: NotificationMessage, context: MessageContext) -> None:
        self.handled.append(message)
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        while len(self.handled) < count:
            self._changed.clear()
            await self._changed.wait()


async def assert_stopped(adapter: Any, vhost: str, *queues: str) -> None:
    """``aclose()`` returns, and no consumer, connection or task of the adapter is left."""
    async with within("aclose()"):
        await adapter.aclose()
    assert not adapter.is_consuming
    assert adapter._consumer_connection is None
    assert adapter._consumers == []
    for queue in queues:
        assert (await queue_state(vhost_url(vhost), queue))[
            1
        ] == 0  # no consumer left on the broker
    # What the consumers ran (the supervisor, handlers, channel readers) ends; the last
    # steps of closing a connection may still be under way, briefly.
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    if others:
        _, running = await asyncio.wait(others, timeout=5)
        assert running == set()


class TestDeletedQueue:
    async def test_a_queue_worker_declares_its_queue_again_and_handles_new_messages(
        self, vhost: str
    ) -> None:
        """The worker's queue is deleted while it consumes: the broker cancels its consumer.
        The worker says so, declares the queue again, consumes it, and handles what is
        published from then on; stopping still stops everything."""
        queue = NotificationMessageQueue(
            message_queue_id=f"deleted-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        inbox = Inbox()
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=inbox, reconnect_delay=0.05
        )
        name = adapter.queue_name
        with LogWatch.installed() as log:
            async with adapter:
                try:
                    await adapter.start_consuming()
                    await queue.publish_message(notification(0))
                    async with within("handling the first message"):
                        await inbox.wait_for(1)

                    await delete_queue(vhost, name)
                    async with within(f"{name} consumed again"):
                        await wait_until_consumed(vhost, name)
                    assert adapter.is_consuming
                    await queue.publish_messages([notification(i) for i in (1, 2, 3)])
                    async with within("handling the messages published after the deletion"):
                        await inbox.wait_for(4)
                    assert inbox.handled == [notification(i) for i in range(4)]
                    assert await queue_state(vhost_url(vhost), name) == (0, 1)

                    await assert_stopped(adapter, vhost, name)
                finally:
                    await adapter.purge()
        warnings = log.messages(logging.WARNING)
        assert [m for m in warnings if f"cancelled the consumer of {name}" in m] != []

    async def test_a_bus_listener_gets_its_queue_and_bindings_back(self, vhost: str) -> None:
        """One listener's queue is deleted: it is declared again with its bindings, so the
        listener gets the messages published from then on; the other listener, whose
        consumer the broker left alone, gets every message once."""
        bus = NotificationMessageBus(
            message_bus_id=f"deleted-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        projection, audit = Inbox(), Inbox()
        adapter = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost), reconnect_delay=0.05)
        adapter.on({"event_store_id": "POKEMONS"}, projection, listener_id="projection")
        adapter.on({}, audit, listener_id="audit")
        deleted = adapter.listener_queue("projection")
        kept = adapter.listener_queue("audit")
        with LogWatch.installed() as log:
            async with adapter:
                try:
                    await adapter.start_consuming()
                    await bus.publish_message(notification(0))
                    async with within("both listeners handling the first message"):
                        await projection.wait_for(1)
                        await audit.wait_for(1)

                    connection = adapter._consumer_connection
                    await delete_queue(vhost, deleted)
                    async with within(f"{deleted} consumed again"):
                        await wait_until_consumed(vhost, deleted)
                    await bus.publish_messages([notification(i) for i in (1, 2, 3)])
                    async with within("both listeners handling the new messages"):
                        await projection.wait_for(4)
                        await audit.wait_for(4)
                    expected = [notification(i) for i in range(4)]
                    assert sorted(projection.handled, key=expected.index) == expected
                    assert sorted(audit.handled, key=expected.index) == expected
                    # Only the cancelled consumer was opened again, on the same connection.
                    assert adapter._consumer_connection is connection
                    assert log.count(f"cancelled the consumer of {kept}") == 0
                    assert log.count(f"cancelled the consumer of {deleted}") == 1

                    await assert_stopped(adapter, vhost, deleted, kept)
                finally:
                    await adapter.purge()

    async def test_a_message_being_handled_when_its_queue_is_deleted_is_handled_once(
        self, vhost: str
    ) -> None:
        """The queue is deleted while a handler runs. The handler is not interrupted; its
        acknowledgement reaches no queue and is accepted all the same; the message is not
        delivered again (it was deleted with the queue); the worker goes on with the new
        messages, and a stop without grace period still finds no handler running."""
        queue = NotificationMessageQueue(
            message_queue_id=f"deleted-busy-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        started, release = asyncio.Event(), asyncio.Event()
        deliveries: Counter[tuple[str, str, int]] = Counter()
        finished: list[NotificationMessage] = []
        changed = asyncio.Event()

        async def worker(message: NotificationMessage, context: MessageContext) -> None:
            deliveries[event_key(message)] += 1
            if message == notification(0):
                started.set()
                await release.wait()
            finished.append(message)
            changed.set()

        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=worker, reconnect_delay=0.05
        )
        name = adapter.queue_name
        with LogWatch.installed() as log:
            async with adapter:
                try:
                    await adapter.start_consuming()
                    await queue.publish_message(notification(0))
                    async with within("the handler starting"):
                        await started.wait()

                    await delete_queue(vhost, name)
                    async with within(f"{name} consumed again"):
                        await wait_until_consumed(vhost, name)
                    await queue.publish_messages([notification(1), notification(2)])
                    release.set()
                    async with within("every handler finishing"):
                        while len(finished) < 3:
                            changed.clear()
                            await changed.wait()
                    expected = [notification(i) for i in range(3)]
                    assert sorted(finished, key=expected.index) == expected
                    # The new queue holds nothing unacknowledged that a stop would give back.
                    assert await queue_state(vhost_url(vhost), name) == (0, 1)
                    async with within("stop_consuming() with no handler running", 10):
                        await adapter.stop_consuming()
                    assert await queue_state(vhost_url(vhost), name) == (0, 0)
                    assert deliveries == Counter(dict.fromkeys(map(event_key, expected), 1))
                    await assert_stopped(adapter, vhost, name)
                finally:
                    release.set()  # a failed test must not leave the handler waiting
                    await adapter.purge()
        # Nothing was reported as failing to settle: the acknowledgement was accepted.
        assert log.count("could not settle") == 0
        assert log.count("could not pass a message on") == 0


class TestQueueCannotBeDeclaredAgain:
    async def test_the_worker_stops_with_the_error_and_starts_again_once_fixed(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Another client declared the deleted queue again with other arguments, so the
        worker's declaration is refused (and its channel closed). Retrying cannot help: the
        worker stops consuming with an error naming the queue (it used to retry for ever,
        as for an outage), and start_consuming() consumes again once the conflict is gone."""
        queue = NotificationMessageQueue(
            message_queue_id=f"deleted-conflict-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        inbox = Inbox()
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=inbox, reconnect_delay=0.05
        )
        name = adapter.queue_name
        # The worker declares the queue again only once the conflicting one exists: without
        # this, which of the two declarations comes first would be up to the scheduler.
        conflicting = asyncio.Event()
        declare = adapter._declare_subscription

        async def declare_after_the_conflict(*args: Any) -> Any:
            await conflicting.wait()
            return await declare(*args)

        with LogWatch.installed() as log:
            async with adapter:
                try:
                    await adapter.start_consuming()
                    monkeypatch.setattr(
                        adapter, "_declare_subscription", declare_after_the_conflict
                    )
                    async with await aio_pika.connect(vhost_url(vhost)) as connection:
                        channel = await connection.channel()
                        await channel.queue_delete(name)
                        await channel.declare_queue(
                            name, durable=True, arguments={"x-max-length": 7}
                        )
                        conflicting.set()
                        async with within("the refused declaration"):
                            await log.wait_for("stopped consuming", level=logging.ERROR)
                        assert not adapter.is_consuming
                        await channel.queue_delete(name)
                    monkeypatch.undo()
                    await adapter.start_consuming()
                    await queue.publish_message(notification(0))
                    async with within("handling a message"):
                        await inbox.wait_for(1)
                    assert inbox.handled == [notification(0)]
                    await assert_stopped(adapter, vhost, name)
                finally:
                    monkeypatch.undo()
                    await adapter.purge()
        [stopped] = [r for r in log.records if r.levelno >= logging.ERROR]
        assert stopped.exc_info is not None
        assert "PRECONDITION_FAILED" in str(stopped.exc_info[1])
        assert name in str(stopped.exc_info[1])
        assert log.count("could not reconnect") == 0

    async def test_no_handler_runs_in_an_attempt_that_fails(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bus listener's queue cannot be declared again, so the consumers reconnect and
        the attempt fails. Each attempt consumed the listeners declared before that queue:
        their messages were delivered, their handlers started and were cancelled. Every queue
        is now declared before any is consumed."""
        bus = NotificationMessageBus(
            message_bus_id=f"deleted-conflict-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        starts: list[NotificationMessage] = []
        finished: list[NotificationMessage] = []
        running, release = asyncio.Event(), asyncio.Event()

        async def projection(message: NotificationMessage, context: MessageContext) -> None:
            starts.append(message)
            running.set()
            await release.wait()
            finished.append(message)

        adapter = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost), reconnect_delay=0.05)
        adapter.on({}, projection, listener_id="projection")  # declared first
        adapter.on({}, Inbox(), listener_id="audit")
        conflicted = adapter.listener_queue("audit")
        conflicting = asyncio.Event()
        declare = adapter._declare_subscription

        async def declare_after_the_conflict(*args: Any) -> Any:
            await conflicting.wait()
            return await declare(*args)

        with LogWatch.installed() as log:
            async with adapter:
                try:
                    await adapter.start_consuming()
                    await bus.publish_message(notification(0))
                    async with within("the projection handling the message"):
                        await running.wait()
                    monkeypatch.setattr(
                        adapter, "_declare_subscription", declare_after_the_conflict
                    )
                    async with await aio_pika.connect(vhost_url(vhost)) as connection:
                        channel = await connection.channel()
                        await channel.queue_delete(conflicted)
                        await channel.declare_queue(
                            conflicted, durable=True, arguments={"x-max-length": 7}
                        )
                        conflicting.set()
                        async with within("the refused attempt"):
                            await log.wait_for("stopped consuming", level=logging.ERROR)
                        # The reconnection cancelled the running handler; the failed attempt
                        # started none.
                        assert starts == [notification(0)]
                        await channel.queue_delete(conflicted)
                    monkeypatch.undo()
                    async with within("consuming again once the conflicting queue is gone"):
                        await adapter.start_consuming()
                        await running.wait()
                        while len(starts) < 2:
                            running.clear()
                            await running.wait()
                    release.set()
                    await assert_stopped(adapter, vhost, adapter.listener_queue("projection"))
                    assert finished == [notification(0)]
                finally:
                    release.set()
                    monkeypatch.undo()
                    await adapter.purge()


class TestStopWhileConsumingAgain:
    async def test_a_stop_while_the_queue_is_declared_again_stops_everything(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """aclose() arrives while the worker is declaring its deleted queue again (held
        here): it returns, and no consumer, connection or task is left running."""
        queue = NotificationMessageQueue(
            message_queue_id=f"deleted-stop-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=Inbox(), reconnect_delay=0.05
        )
        name = adapter.queue_name
        declaring = asyncio.Event()

        async def declare_for_ever(*args: Any) -> Any:
            declaring.set()
            await asyncio.Event().wait()

        async with adapter:
            try:
                await adapter.start_consuming()
                monkeypatch.setattr(adapter, "_declare_subscription", declare_for_ever)
                await delete_queue(vhost, name)
                async with within("declaring the queue again"):
                    await declaring.wait()
                monkeypatch.undo()
                await assert_stopped(adapter, vhost)
            finally:
                monkeypatch.undo()
                await adapter.purge()

    async def test_a_consumer_opened_again_during_a_stop_takes_no_message(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The queue is declared again while a stop waits for a running handler: the new
        consumer ran until the stop ended, taking messages it never handled and keeping them
        from other workers. It is now cancelled at once, as the stop cancelled the others."""
        queue = NotificationMessageQueue(
            message_queue_id=f"deleted-stopping-{secrets.token_hex(3)}",
            source_event_stores=[pokemon_store()],
        )
        running, release = asyncio.Event(), asyncio.Event()

        async def slow(message: NotificationMessage, context: MessageContext) -> None:
            running.set()
            await release.wait()

        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=slow, reconnect_delay=0.05
        )
        name = adapter.queue_name
        declaring, declare_now = asyncio.Event(), asyncio.Event()
        declare = adapter._declare_subscription

        async def declare_when_told(*args: Any) -> Any:
            declaring.set()
            await declare_now.wait()
            return await declare(*args)

        async with adapter:
            try:
                await adapter.start_consuming()
                await queue.publish_message(notification(0))
                async with within("the handler starting"):
                    await running.wait()
                monkeypatch.setattr(adapter, "_declare_subscription", declare_when_told)
                await delete_queue(vhost, name)
                async with within("declaring the queue again"):
                    await declaring.wait()
                supervisor = adapter._supervisor
                assert supervisor is not None
                stopping = asyncio.create_task(adapter.stop_consuming())
                await asyncio.sleep(0)  # one step: the stop marks the adapter stopping at once
                assert adapter._stopping
                declare_now.set()
                async with within("the supervisor ending"):
                    await asyncio.wait([supervisor])
                assert not stopping.done()  # still waiting for the handler
                assert await queue_state(vhost_url(vhost), name) == (0, 0)
                await queue.publish_message(notification(1))
                assert await queue_state(vhost_url(vhost), name) == (
                    1,
                    0,
                )  # left for another worker
                release.set()
                async with within("the stop"):
                    await stopping
                await assert_stopped(adapter, vhost, name)
            finally:
                release.set()
                monkeypatch.undo()
                await adapter.purge()
