"""RabbitMQ adapters that must not wait for ever: a lost cancellation, a lost confirmation,
a queue that will never declare again.

Every test runs against the real broker in a private vhost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import aio_pika
import aiormq
import pytest

from castore_pydantic.errors import MessageBrokerUnavailableError, MessagingError
from castore_pydantic.messaging import (
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
)
from castore_pydantic.messaging._rabbitmq_wire import declared_otherwise
from castore_pydantic.messaging.rabbitmq import (
    RabbitMQMessageBusAdapter,
    RabbitMQMessageQueueAdapter,
)
from tests.messaging.rabbitmq_support import (
    LogWatch,
    TcpProxy,
    consumer_count,
    message_count,
    notification,
    pokemon_store,
    private_vhost,
    stopped_consuming,
    vhost_url,
    within,
)
from tests.services import RABBITMQ_HOST, RABBITMQ_PORT

pytestmark = [pytest.mark.rabbitmq]

#: Setting up and tearing down take well under a second; past this a step is stuck.
TEARDOWN_WITHIN = 60


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    with private_vhost() as name:
        yield name


async def handler_noop(message: NotificationMessage, context: MessageContext) -> None:
    """A worker with nothing to do."""


async def cancel_supervisor(supervisor: asyncio.Task[None]) -> None:
    """Cancel the task keeping the consumers running, as a shutdown does: it must end so."""
    supervisor.cancel()
    done, _ = await asyncio.wait([supervisor], timeout=10)
    assert done, "the task keeping the consumers running did not end"
    assert supervisor.cancelled()


class ConnectOutlivingCancellation:
    """``aio_pika.connect`` as ``asyncio.wait_for`` runs it on Python 3.11, at its worst.

    The next connection it makes waits, once made, for its task to be cancelled, then returns
    all the same: what ``wait_for`` does when the cancellation and the connection arrive
    together. Later connections are made as usual.
    """

    def __init__(self) -> None:
        self.real = aio_pika.connect
        self.armed = True
        self.connected: asyncio.Event | None = None

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        connection = await self.real(*args, **kwargs)
        if self.armed:
            self.armed = False
            assert self.connected is not None
            self.connected.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
        return connection


def make_queue(prefix: str) -> NotificationMessageQueue:
    return NotificationMessageQueue(
        message_queue_id=f"{prefix}-{secrets.token_hex(3)}", source_event_stores=[pokemon_store()]
    )


class TestSwallowedCancellation:
    """A cancellation that aio-pika's connect swallows is raised again."""

    async def test_a_supervisor_cancelled_as_it_reconnects_ends(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The task keeping the consumers running, cancelled from outside (a shutdown) just
        as its new connection is made, ends and closes the consumers: it used to carry on
        consuming, unwatched by anything, and a shutdown waiting for it waited for ever."""
        queue = make_queue("cancelled-reconnecting")
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=handler_noop, reconnect_delay=0
        )
        connect = ConnectOutlivingCancellation()
        connect.connected = asyncio.Event()
        try:
            await adapter.start_consuming()
            supervisor = adapter._supervisor
            assert supervisor is not None
            monkeypatch.setattr(aio_pika, "connect", connect)
            connection = adapter._consumer_connection
            assert connection is not None
            await connection.close()  # the consumers reconnect
            async with within("the reconnection", 10):
                await connect.connected.wait()
            await cancel_supervisor(supervisor)
            await stopped_consuming(adapter, "closing the consumers", 10)
            assert await consumer_count(vhost_url(vhost), adapter.queue_name) == 0
        finally:
            monkeypatch.undo()
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()

    async def test_a_supervisor_cancelled_while_reconnections_fail_ends(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The task keeping the consumers running, cancelled from outside while the broker
        refuses its reconnections and a connection attempt swallows the cancellation, ends
        all the same: the reconnection loop looks for the swallowed cancellation before each
        attempt, or it would go on retrying for ever."""
        queue = make_queue("cancelled-refused")
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=handler_noop, reconnect_delay=0.05
        )
        attempting = asyncio.Event()
        attempts = 0

        async def connect_refused(*args: Any, **kwargs: Any) -> Any:
            # The broker is down; the first attempt outlives the cancellation that comes
            # while it waits, as asyncio.wait_for may on Python 3.11.
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                attempting.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
            raise ConnectionRefusedError("the broker is down")

        try:
            await adapter.start_consuming()
            supervisor = adapter._supervisor
            assert supervisor is not None
            monkeypatch.setattr(aio_pika, "connect", connect_refused)
            connection = adapter._consumer_connection
            assert connection is not None
            await connection.close()  # the consumers reconnect
            async with within("the reconnection", 10):
                await attempting.wait()
            await cancel_supervisor(supervisor)
            assert not adapter.is_consuming
        finally:
            monkeypatch.undo()
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()

    async def test_a_supervisor_cancelled_as_it_consumes_again_ends(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The task keeping the consumers running, cancelled from outside while it declares
        a queue the broker deleted, in a call that swallows the cancellation, ends and
        closes the consumers once it consumed again: it looks for a swallowed cancellation
        before waiting for the next loss, which would otherwise never come."""
        queue = make_queue("cancelled-consuming-again")
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=handler_noop, reconnect_delay=0.05
        )
        declaring = asyncio.Event()
        declare = adapter._declare_subscription

        async def declare_outliving_cancellation(*args: Any) -> Any:
            declaring.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
            return await declare(*args)

        try:
            await adapter.start_consuming()
            supervisor = adapter._supervisor
            assert supervisor is not None
            monkeypatch.setattr(adapter, "_declare_subscription", declare_outliving_cancellation)
            async with (
                await aio_pika.connect(vhost_url(vhost)) as connection,
                connection.channel() as channel,
            ):
                await channel.queue_delete(adapter.queue_name)  # the consumer is cancelled
            async with within("declaring the queue again", 10):
                await declaring.wait()
            await cancel_supervisor(supervisor)
            await stopped_consuming(adapter, "closing the consumers", 10)
            assert await consumer_count(vhost_url(vhost), adapter.queue_name) == 0
        finally:
            monkeypatch.undo()
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()

    async def test_a_start_cancelled_as_it_connects_leaves_no_consumer(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """start_consuming cancelled just as its connection is made raises CancelledError
        and closes the consumers: it used to return as if nothing happened, consuming."""
        queue = make_queue("start-cancelled")
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=handler_noop
        )
        connect = ConnectOutlivingCancellation()
        connect.connected = asyncio.Event()
        monkeypatch.setattr(aio_pika, "connect", connect)
        try:
            start = asyncio.create_task(adapter.start_consuming())
            async with within("the connection", 10):
                await connect.connected.wait()
            start.cancel()
            with pytest.raises(asyncio.CancelledError):
                await start
            assert not adapter.is_consuming
            assert await consumer_count(vhost_url(vhost), adapter.queue_name) == 0
        finally:
            monkeypatch.undo()
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()

    async def test_a_task_that_handled_a_cancellation_can_start_and_publish(
        self, vhost: str
    ) -> None:
        """A task that caught a CancelledError (cleaning up, say) and goes on may still
        start consuming and publish: only a cancellation arriving during the call counts."""
        queue = make_queue("handled-cancel")
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=handler_noop
        )
        started = asyncio.Event()

        async def clean_up_after_cancel() -> int:
            try:
                started.set()
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                current = asyncio.current_task()
                assert current is not None
                await adapter.start_consuming()
                await queue.publish_message(notification(0))
                return current.cancelling()
            return -1

        try:
            task = asyncio.create_task(clean_up_after_cancel())
            await started.wait()
            task.cancel()
            async with within("start_consuming() and publish_message()", 20):
                assert await task == 1
            assert adapter.is_consuming
        finally:
            await adapter.stop_consuming()
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()


class TestPublishTimeout:
    """A publish the broker never confirms raises once ``publish_timeout`` has passed."""

    async def test_an_unconfirmed_publish_raises_and_the_next_one_connects_anew(
        self, vhost: str
    ) -> None:
        """With the broker's answers lost on the way, publish_message raises a retriable
        MessageBrokerUnavailableError after publish_timeout: it used to wait for ever. The
        message was stored all the same, and the next publish works on a new connection."""
        proxy = TcpProxy()
        await proxy.start()
        queue = make_queue("unconfirmed")
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, proxy.url(vhost), publish_timeout=0.5
        )
        try:
            await adapter.connect()
            assert proxy.stall() == 1  # the publishing connection
            started = asyncio.get_running_loop().time()
            async with within("publish_message()", 20):
                with pytest.raises(MessageBrokerUnavailableError, match=r"within 0\.5s"):
                    await queue.publish_message(notification(0))
            # The deadline, then a bounded wait for the dead connection to close.
            assert asyncio.get_running_loop().time() - started < 10
            async with within("publishing again", 20):
                await queue.publish_message(notification(1))
            assert await message_count(vhost_url(vhost), adapter.queue_name) == 2
        finally:
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()
            await proxy.close()

    async def test_waits_beside_a_publish_that_gives_up_raise_a_retriable_error(
        self, vhost: str
    ) -> None:
        """A publish that gives up closes the publishing connection: the other publishes
        and the dead-letter read waiting on it raise MessageBrokerUnavailableError, which
        callers retry. They used to raise a bare CancelledError in tasks nobody cancelled,
        which retry code passes by and a TaskGroup takes for a cancellation."""
        proxy = TcpProxy()
        await proxy.start()
        queue = make_queue("closed-under")
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, proxy.url(vhost), publish_timeout=2)

        async def publish_late() -> int:
            await asyncio.sleep(1)
            await queue.publish_message(notification(1))
            return 0

        async def read_late() -> int:
            await asyncio.sleep(1)
            return len(await adapter.dead_letters())

        try:
            await adapter.connect()
            assert proxy.stall() == 1
            first = asyncio.create_task(queue.publish_message(notification(0)))
            others = [asyncio.create_task(publish_late()), asyncio.create_task(read_late())]
            async with within("the publishes to end", 20):
                await asyncio.wait([first, *others])
            with pytest.raises(MessageBrokerUnavailableError, match=r"within 2s"):
                first.result()
            for task in others:
                assert not task.cancelled()
                assert isinstance(task.exception(), MessageBrokerUnavailableError)
            async with within("publishing again", 20):
                await queue.publish_message(notification(2))
        finally:
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()
            await proxy.close()

    async def test_a_batch_longer_than_publish_timeout_succeeds_while_confirmed(
        self, vhost: str
    ) -> None:
        """publish_timeout bounds each wait for a confirmation, not the whole batch: a
        batch that takes longer on a healthy broker is published, once. It used to raise
        after publish_timeout with part of the batch stored, and a retry stored it again."""
        queue = make_queue("long-batch")
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), publish_timeout=0.5
        )
        messages = [notification(index) for index in range(5000)]
        try:
            await adapter.connect()
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with within("publish_messages()", 60):
                await queue.publish_messages(messages)
            assert loop.time() - started > 0.5  # or the test proves nothing
            assert await message_count(vhost_url(vhost), adapter.queue_name) == len(messages)
        finally:
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()

    async def test_a_deadline_that_connect_swallowed_still_ends_the_publish(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """On Python 3.11 aio-pika's connect can swallow the cancellation of the publish
        deadline as the connection is made: the publish still raises once publish_timeout
        has passed. It used to carry on without a deadline, waiting for ever on a link
        that then died silently."""
        proxy = TcpProxy()
        await proxy.start()
        queue = make_queue("publish-swallowed")
        RabbitMQMessageQueueAdapter.attach_to(queue, proxy.url(vhost), publish_timeout=1)
        connect = ConnectOutlivingCancellation()
        connect.connected = asyncio.Event()
        monkeypatch.setattr(aio_pika, "connect", connect)
        try:
            publish = asyncio.create_task(queue.publish_message(notification(0)))
            async with within("the connection", 10):
                await connect.connected.wait()
            proxy.stall()  # the link dies silently once connected
            async with within("publish_message() to give up", 15):
                await asyncio.wait([publish])
            assert isinstance(publish.exception(), MessageBrokerUnavailableError)
        finally:
            monkeypatch.undo()
            await proxy.close()  # nothing was declared: there is nothing to purge


class TestQueueMadeAnewWithOtherArguments:
    """A consumed queue that exists with other arguments ends consuming, loudly."""

    async def test_consuming_stops_with_an_error_naming_the_queue_and_argument(
        self, vhost: str
    ) -> None:
        """When the consumers cannot declare their queues again because someone made one
        anew with other arguments, they stop with an error naming it, and is_consuming says
        false: they used to retry for ever, logging warnings as for an outage. A start then
        raises the same error."""
        queue = make_queue("made-anew")
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue,
            vhost_url(vhost),
            worker=handler_noop,
            retry_delay_in_ms=1000,
            retry_attempts=1,
            reconnect_delay=0.05,
        )
        retry_queue = f"{adapter.queue_name}.retry.1000ms"
        try:
            with LogWatch.installed() as logs:
                await adapter.start_consuming()
                async with (
                    await aio_pika.connect(vhost_url(vhost)) as connection,
                    connection.channel() as channel,
                ):
                    # Someone makes the retry queue anew with another delay...
                    await channel.queue_delete(retry_queue)
                    await channel.declare_queue(
                        retry_queue, durable=True, arguments={"x-message-ttl": 5000}
                    )
                    # ... and deletes the consumed queue: the consumers declare it all again.
                    await channel.queue_delete(adapter.queue_name)
                await stopped_consuming(adapter, "consuming to stop", 20)
                errors = logs.messages(logging.ERROR)
                assert len(errors) == 1
                assert "stopped consuming" in errors[0]
                [record] = [r for r in logs.records if r.levelno >= logging.ERROR]
                assert record.exc_info is not None
                error = record.exc_info[1]
                assert isinstance(error, MessagingError)
                assert retry_queue in str(error)
                assert "x-message-ttl" in str(error)
                with pytest.raises(MessagingError, match="x-message-ttl") as raised:
                    await adapter.start_consuming()
                assert adapter.queue_name in str(raised.value)
                assert not adapter.is_consuming
        finally:
            await adapter.stop_consuming()
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()  # deletes the retry queue made anew too

    async def test_purge_deletes_queues_that_exist_with_other_arguments(self, vhost: str) -> None:
        """purge() resets what an adapter uses even when its queues were made with other
        arguments: it used to declare them first, and the broker's refusal stopped it."""
        queue = make_queue("purge-made-anew")
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), retry_delay_in_ms=1000, retry_attempts=1
        )
        names = [
            adapter.queue_name,
            f"{adapter.queue_name}.dead",
            f"{adapter.queue_name}.retry.1000ms",
        ]
        async with (
            await aio_pika.connect(vhost_url(vhost)) as connection,
            connection.channel() as channel,
        ):
            for name in names:
                await channel.declare_queue(name, durable=True, arguments={"x-max-length": 7})
        async with within("purge()", TEARDOWN_WITHIN):
            await adapter.purge()
        assert adapter._publisher is None  # its connection was its own, and is closed
        async with await aio_pika.connect(vhost_url(vhost)) as connection:
            for name in names:
                channel = await connection.channel()
                with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                    await channel.declare_queue(name, passive=True)

    async def test_a_publish_after_a_purge_is_kept(self, vhost: str) -> None:
        """purge() deleted the queues on the publishing connection and kept its channel,
        which had declared them: the next publish went to a queue no longer there, and the
        broker confirmed and dropped it (on a bus, the exchange was gone: an error)."""
        queue = make_queue("purge-then-publish")
        queue_adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost))
        bus = NotificationMessageBus(
            message_bus_id="purge-then-publish", source_event_stores=[pokemon_store()]
        )
        bus_adapter = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        bus_adapter.on({}, handler_noop, listener_id="kept")
        try:
            for adapter in (queue_adapter, bus_adapter):
                async with within("purge()", TEARDOWN_WITHIN):
                    await adapter.connect()
                    await adapter.purge()
            async with within("publishing", TEARDOWN_WITHIN):
                await queue.publish_message(notification(0))
                await bus_adapter.connect()  # declares the listener's queue again
                await bus.publish_message(notification(1))
            assert await message_count(vhost_url(vhost), queue_adapter.queue_name) == 1
            listener_queue = bus_adapter.listener_queue("kept")
            assert await message_count(vhost_url(vhost), listener_queue) == 1
        finally:
            for adapter in (queue_adapter, bus_adapter):
                async with within("cleaning up", TEARDOWN_WITHIN):
                    await adapter.purge()
                    await adapter.aclose()

    def test_only_the_reply_s_start_tells_a_lasting_refusal(self) -> None:
        """A passing refusal quotes the queue's name, which may hold "inequivalent arg": it
        was taken for a lasting one, and consuming stopped for good."""
        lasting = aiormq.exceptions.ChannelPreconditionFailed(
            "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost"
            " 'v': received the value '1000' of type 'long' but current is none"
        )
        passing = aiormq.exceptions.ChannelPreconditionFailed(
            "PRECONDITION_FAILED - cannot declare queue 'castore.queue.inequivalent arg':"
            " queue limit in vhost 'v' (3) is reached"
        )
        assert declared_otherwise(lasting)
        assert not declared_otherwise(passing)
        assert not declared_otherwise(aiormq.exceptions.ChannelPreconditionFailed())

    async def test_a_passing_refusal_is_retried_until_it_passes(self) -> None:
        """RabbitMQ refuses a declaration with PRECONDITION_FAILED for a vhost whose queue
        limit is reached, too: the consumers retry, and consume again once the limit no
        longer stops them. They used to stop for good, as for a queue declared otherwise."""
        with private_vhost() as own:
            queue = make_queue("queue-limit")
            adapter = RabbitMQMessageQueueAdapter.attach_to(
                queue, vhost_url(own), worker=handler_noop, reconnect_delay=0.05
            )

            def rabbitmqctl(*args: str) -> str:
                return subprocess.run(
                    ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60
                ).stdout

            try:
                with LogWatch.installed() as logs:
                    await adapter.start_consuming()
                    listed = rabbitmqctl("list_queues", "-p", own, "-q", "--no-table-headers")
                    declared = len([line for line in listed.splitlines() if line.strip()])
                    limit = f'{{"max-queues": {declared - 1}}}'
                    rabbitmqctl("set_vhost_limits", "-p", own, limit)
                    async with (
                        await aio_pika.connect(vhost_url(own)) as connection,
                        connection.channel() as channel,
                    ):
                        await channel.queue_delete(adapter.queue_name)
                    async with within("two refused reconnections", 20):
                        await logs.wait_for("could not reconnect", count=2)
                    assert adapter.is_consuming
                    rabbitmqctl("clear_vhost_limits", "-p", own)
                    async with within("consuming again", 20):
                        await logs.wait_for("reconnected to RabbitMQ")
                    assert adapter.is_consuming
                    assert await consumer_count(vhost_url(own), adapter.queue_name) == 1
            finally:
                async with within("stop_consuming()", TEARDOWN_WITHIN):
                    await adapter.stop_consuming()


class TestSilentLinkOutsidePublishing:
    """Reading dead letters, sending them back, purging and closing end on a silent link."""

    @pytest.mark.parametrize(
        "operation", ["dead_letters", "republish_dead_letters", "purge"], ids=str
    )
    async def test_an_unanswered_admin_call_raises_after_publish_timeout(
        self, vhost: str, operation: str
    ) -> None:
        """With the broker's answers lost on the way, dead_letters(),
        republish_dead_letters() and purge() raise a retriable MessageBrokerUnavailableError
        after publish_timeout and close the stalled connection: they used to wait until
        something else closed it. The next call connects anew and works."""
        proxy = TcpProxy()
        await proxy.start()
        queue = make_queue(f"silent-{operation}")
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, proxy.url(vhost), publish_timeout=0.5
        )
        try:
            await adapter.connect()
            assert proxy.stall() == 1  # the publishing connection
            proxy.stall_new = True  # purge() works on a connection of its own
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with within(f"{operation}()", 30):
                with pytest.raises(MessageBrokerUnavailableError, match=r"within 0\.5s"):
                    await getattr(adapter, operation)()
            proxy.stall_new = False
            # The deadline, then bounded waits for the channel and the connection to close.
            assert loop.time() - started < 15
            assert adapter._publisher is None  # nothing left half-open
            async with within("the next call", 20):
                await getattr(adapter, operation)()
        finally:
            async with within("purge()", TEARDOWN_WITHIN):
                await adapter.purge()
            await proxy.close()

    async def test_closing_on_a_silent_link_ends(self, vhost: str) -> None:
        """aclose() on a publishing connection whose link died silently ends within a few
        seconds: closing its channel used to wait for the broker's reply for ever."""
        proxy = TcpProxy()
        await proxy.start()
        queue = make_queue("silent-close")
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, proxy.url(vhost))
        try:
            await adapter.connect()
            assert proxy.stall() == 1
            async with within("aclose()", 20):
                await adapter.aclose()
        finally:
            await proxy.close()
            async with within("purge()", TEARDOWN_WITHIN):
                await RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost)).purge()


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl; return what it printed."""
    return subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


@contextlib.contextmanager
def user_on(vhost: str) -> Iterator[tuple[str, str]]:
    """A user that may do anything on ``vhost`` (``(name, URL)``); deleted after."""
    name = f"castore_test_{secrets.token_hex(4)}"
    password = secrets.token_hex(8)
    rabbitmqctl("add_user", name, password)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
        yield name, f"amqp://{name}:{password}@{RABBITMQ_HOST}:{RABBITMQ_PORT}/{vhost}"
    finally:
        rabbitmqctl("delete_user", name)


class TestPermissionRefused:
    """A user that may not configure the queues is told so, and not retried for ever."""

    async def test_start_and_publish_raise_an_error_naming_the_permission(self, vhost: str) -> None:
        """start_consuming() and publishing by a user without configure permission raise a
        MessagingError naming the queue and the missing permission."""
        queue = make_queue("no-configure")
        with user_on(vhost) as (user, url):
            rabbitmqctl("set_permissions", "-p", vhost, user, "", ".*", ".*")
            adapter = RabbitMQMessageQueueAdapter.attach_to(queue, url, worker=handler_noop)
            with pytest.raises(MessagingError, match="lacks a permission on the vhost") as raised:
                await adapter.start_consuming()
            assert adapter.queue_name in str(raised.value)
            assert not isinstance(raised.value, MessageBrokerUnavailableError)
            assert not adapter.is_consuming
            with pytest.raises(MessagingError, match="configure") as raised:
                await queue.publish_message(notification(0))
            assert not isinstance(raised.value, MessageBrokerUnavailableError)
            await adapter.aclose()

    async def test_consuming_stops_when_the_permission_is_withdrawn(self, vhost: str) -> None:
        """Consumers that reconnect once the user lost its configure permission stop with
        an error naming the queue and the permission, and is_consuming says false: they
        used to retry for ever, as for an outage."""
        queue = make_queue("configure-withdrawn")
        proxy = TcpProxy()
        await proxy.start()
        with user_on(vhost) as (user, url):
            # The broker caches permissions per channel: only a new connection sees a change.
            proxied = url.replace(f"@{RABBITMQ_HOST}:{RABBITMQ_PORT}/", f"@127.0.0.1:{proxy.port}/")
            adapter = RabbitMQMessageQueueAdapter.attach_to(
                queue, proxied, worker=handler_noop, reconnect_delay=0.05
            )
            try:
                with LogWatch.installed() as logs:
                    await adapter.start_consuming()
                    rabbitmqctl("set_permissions", "-p", vhost, user, "", ".*", ".*")
                    assert proxy.drop() == 1  # the consumers reconnect, declaring anew
                    await stopped_consuming(adapter, "consuming to stop", 20)
                    [record] = [r for r in logs.records if r.levelno >= logging.ERROR]
                    assert "stopped consuming" in record.getMessage()
                    assert record.exc_info is not None
                    error = record.exc_info[1]
                    assert isinstance(error, MessagingError)
                    assert adapter.queue_name in str(error)
                    assert "lacks a permission on the vhost" in str(error)
                    assert "ACCESS_REFUSED" in str(error)
                    with pytest.raises(MessagingError, match="lacks a permission on the vhost"):
                        await adapter.start_consuming()
            finally:
                async with within("stop_consuming()", TEARDOWN_WITHIN):
                    await adapter.stop_consuming()
                await proxy.close()
        async with within("purge()", TEARDOWN_WITHIN):
            await RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost)).purge()
