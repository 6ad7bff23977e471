"""What the RabbitMQ queue and bus adapters share: connections, publishing, consumers, retries.

Imported only through ``castore_pydantic.messaging.rabbitmq``, which checks that aio-pika is
installed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, NoReturn, Self, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue
from yarl import URL

from castore_pydantic.errors import MessageBrokerUnavailableError, MessagingError
from castore_pydantic.messaging._cancellation import cancellations, raise_swallowed_cancellation
from castore_pydantic.messaging._channels import MessageChannel
from castore_pydantic.messaging._event_loops import LoopBinding
from castore_pydantic.messaging._messages import (
    DeadLetter,
    DeliveryGuarantee,
    Message,
    MessageContext,
    RetryPolicy,
    describe_error,
    run_handler,
)
from castore_pydantic.messaging._rabbitmq_wire import (
    ATTEMPT_HEADER,
    ATTEMPTS_HEADER,
    BROKER_ERRORS,
    ERROR_HEADER,
    PERMISSION_ADVICE,
    REPLAY_HEADER,
    Subscription,
    access_refused,
    amqp_properties,
    attempt_of,
    check_name,
    declared_otherwise,
    name_part,
    raise_broker_error,
)

__all__ = ["RabbitMQAdapter"]

logger = logging.getLogger("castore_pydantic.messaging")

#: How many messages of a batch are published at once, pipelined.
_PUBLISH_CHUNK = 1000
#: Seconds to wait for the broker to confirm that channels closed, all of them together,
#: before their connection is closed anyway (which aiormq bounds to a few seconds).
_CHANNEL_CLOSE_TIMEOUT = 5.0

_T = TypeVar("_T")


@dataclass(eq=False)
class _BrokerWait:
    """What an operation bounded by ``publish_timeout`` tells its deadline.

    Attributes:
        progress: Called at each answer of the broker: the wait starts again.
        connection: The publishing connection it waits on, once known: the one to close
            when the deadline runs out.
    """

    progress: Callable[[], None]
    connection: AbstractConnection | None = None


class RabbitMQAdapter:
    """Base of ``RabbitMQMessageQueueAdapter`` and ``RabbitMQMessageBusAdapter``.

    Publishing uses its own connection, opened on first use and again after it dropped.
    Consumers use another connection, watched by a task that reconnects them when it drops.
    Both, and the tasks, locks and events that go with them, belong to one event loop; the
    adapter moves to the loop it is called on once that one has closed.
    """

    _channel_type: ClassVar[str]  # "queue" or "bus"

    def __init__(
        self,
        url: str,
        *,
        retry_attempts: int = 2,
        retry_delay_in_ms: float = 30000,
        retry_backoff_rate: float = 2,
        prefetch_count: int = 32,
        name: str | None = None,
        name_prefix: str = "castore.",
        reconnect_delay: float = 1.0,
        connect_timeout: float = 10.0,
        publish_timeout: float = 30.0,
    ) -> None:
        self._retry_policy = RetryPolicy(
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
        )
        if isinstance(prefetch_count, bool) or not isinstance(prefetch_count, int):
            raise TypeError(f"prefetch_count must be an int, got {prefetch_count!r}")
        if not 1 <= prefetch_count <= 65535:
            raise ValueError(f"Invalid prefetch_count, choose 1 to 65535 (got {prefetch_count})")
        for option, value in (
            ("reconnect_delay", reconnect_delay),
            ("connect_timeout", connect_timeout),
        ):
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Invalid {option}, please select a positive number.")
        if (
            not isinstance(publish_timeout, int | float)
            or isinstance(publish_timeout, bool)
            or not publish_timeout > 0
        ):
            raise ValueError("Invalid publish_timeout, please select a number of seconds above 0.")
        self._url = URL(url)
        if self._url.scheme not in ("amqp", "amqps"):
            raise ValueError(f"a RabbitMQ URL starts with amqp:// or amqps://, got {self.url!r}")
        if name_prefix:
            check_name("queue", name_prefix)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.name_prefix = name_prefix
        self.prefetch_count = prefetch_count
        self.reconnect_delay = float(reconnect_delay)
        self.connect_timeout = float(connect_timeout)
        self.publish_timeout = float(publish_timeout)
        self.message_channel: MessageChannel[Any] | None = None
        #: How many times ``stop_consuming`` was called: a start that sees it change while
        #: it opens the consumers stops them again (the stop may have stopped waiting).
        self._stop_calls = 0
        #: The event loop the connections, tasks, locks and events below belong to.
        self._loop = LoopBinding()
        self._start_afresh()

    def _start_afresh(self) -> None:
        """Set up what belongs to one event loop, with no connection and nothing running."""
        self._publish_lock = asyncio.Lock()
        self._publisher: tuple[AbstractConnection, AbstractChannel] | None = None
        #: Watches the consumers and reconnects them; it ends only for a stop (or when
        #: cancelled from outside: ``is_consuming`` then says false).
        self._supervisor: asyncio.Task[None] | None = None
        #: Set while ``start_consuming`` opens the consumers (before ``_supervisor`` exists).
        self._starting: asyncio.Event | None = None
        #: Set once that start ended or a stop overtook it: what a handler waits for, since
        #: the start, once overtaken, waits for the handlers.
        self._start_overtaken: asyncio.Event | None = None
        #: The shortest grace period of the stops called while a start runs (``None``: none
        #: gave one), for the start that stops its consumers because of them.
        self._start_grace: float | None = None
        self._consumer_connection: AbstractConnection | None = None
        self._consumers: list[tuple[AbstractChannel, str]] = []
        #: Closes the consumers a supervisor left open when it ended without a stop (it was
        #: cancelled before its first step): they consume until it is done.
        self._closing_consumers: asyncio.Task[None] | None = None
        #: Tags of the consumers the broker cancelled; ``_connection_lost`` is set for them.
        self._cancelled: set[str] = set()
        self._connection_lost = asyncio.Event()
        self._stopping = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: The tasks running a handler now, and a stop a handler asked for (it completes
        #: once that handler has returned).
        self._handling: set[asyncio.Task[Any]] = set()
        self._stopper: asyncio.Task[None] | None = None
        #: Set once the stop of the running consumers has ended (``None``: no stop runs), for
        #: a ``start_consuming`` that waits for it.
        self._stop_ended: asyncio.Event | None = None

    def __repr__(self) -> str:
        channel = self.message_channel
        target = "unattached" if channel is None else repr(channel)
        return f"{type(self).__name__}({self.url!r}, {target})"

    # -- configuration ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The broker URL, with the password masked."""
        url = self._url.with_password("***") if self._url.password else self._url
        return str(url)

    @property
    def delivery_guarantee(self) -> DeliveryGuarantee:
        """``"at-least-once"``: a published message is never lost, but may be handled twice."""
        return "at-least-once"

    @property
    def retry_policy(self) -> RetryPolicy:
        """How failed messages are retried before they are dead-lettered."""
        return self._retry_policy

    @property
    def is_consuming(self) -> bool:
        """Whether consumers are running (between ``start_consuming`` and ``stop_consuming``).

        False again if the task that keeps the consumers running ended without a stop (it
        was cancelled from outside, or its event loop ended), once its consumers are closed:
        ``start_consuming()`` then starts them anew.
        """
        if self._supervisor is None or self._loop.closed:
            return False
        return not self._supervisor_ended() or self._consumers_left()

    def _supervised(self) -> bool:
        """Whether a supervisor watches the consumers: a start has nothing more to do."""
        return (
            self._supervisor is not None and not self._supervisor_ended() and not self._loop.closed
        )

    def _supervisor_ended(self) -> bool:
        """Whether the supervisor ended by itself, not for a stop: nothing watches consumers."""
        supervisor = self._supervisor
        return supervisor is not None and supervisor.done() and not self._stopping

    def _consumers_left(self) -> bool:
        """Whether consumers are open or closing although their supervisor ended."""
        closing = self._closing_consumers
        return self._consumer_connection is not None or (closing is not None and not closing.done())

    def _consuming_or_starting(self) -> bool:
        """Whether consumers run, start, or stop: what they consume is fixed until stopped."""
        return self._starting is not None or self.is_consuming

    def _require_channel(self) -> MessageChannel[Any]:
        if self.message_channel is None:
            raise RuntimeError(
                f"attach {type(self).__name__} to a channel with "
                f"{type(self).__name__}.attach_to(channel, url) first: it names the broker's "
                "queues after the channel and validates messages with it"
            )
        return self.message_channel

    def _base_name(self, kind: str) -> str:
        """``<prefix><queue|bus>.<channel id>``: the queue or exchange of the channel."""
        channel_id = name_part(self._require_channel().message_channel_id)
        return check_name(kind, f"{self.name_prefix}{self._channel_type}.{channel_id}")

    def _retry_delays_ms(self) -> list[int]:
        """The distinct retry delays, in ms (0 means: straight back to the queue)."""
        policy = self._retry_policy
        return sorted(
            {
                round(policy.delay_for(attempt) * 1000)
                for attempt in range(1, policy.retry_attempts + 1)
            }
        )

    # -- provided by the queue and bus adapters --------------------------------------------

    def _subscriptions(self, *, consuming: bool) -> list[Subscription]:
        """What is consumed; with ``consuming``, raise if a handler is missing."""
        raise NotImplementedError

    async def _declare_publishing(self, channel: AbstractChannel) -> None:
        """Declare what publishing needs."""
        raise NotImplementedError

    async def _publish(
        self,
        channel: AbstractChannel,
        messages: Sequence[Message],
        *,
        replay: bool,
        progress: Callable[[], None],
    ) -> None:
        """Publish messages on the publishing channel; call ``progress`` per confirmation."""
        raise NotImplementedError

    async def _delete_exchanges(self, channel: AbstractChannel) -> None:
        """Delete the adapter's exchanges (the bus has one)."""

    # -- event loops -----------------------------------------------------------------------

    def _enter_loop(self) -> None:
        """Work on the running event loop; start afresh there if the last one has closed.

        An adapter attached at import time may serve one event loop after another (one
        ``asyncio.run`` after another; pytest-asyncio's loop per test). Its connections, its
        consumers' tasks, its lock and its events belong to the loop they were made on: once
        that loop has closed they are dropped, without awaiting anything, and the adapter
        connects again on first use. Its connections were closed as the loop ended
        (``close_at_end``), if ``asyncio.run`` or an ``asyncio.Runner`` ended it.

        Raises:
            RuntimeError: The adapter is in use on another loop that is still open.
        """
        if self._loop.enter(self):
            self._start_afresh()

    async def _close_at_loop_end(self) -> None:
        """Close the connections as their event loop ends: they cannot outlive it.

        The consumers' task was cancelled first, and closed theirs already (unless it had
        not run yet).
        """
        await self._close_publisher()
        await self._close_consumers()

    # -- connections -----------------------------------------------------------------------

    def _fail(self, error: BaseException) -> NoReturn:
        raise_broker_error(self.url, error)

    async def _connect(self, role: str) -> AbstractConnection:
        self._loop.close_at_end(self._close_at_loop_end)
        try:
            return await aio_pika.connect(
                self._url,
                timeout=self.connect_timeout,
                client_properties={"connection_name": f"castore {role} {self.name}"},
            )
        except BROKER_ERRORS as error:
            self._fail(error)

    async def connect(self) -> None:
        """Connect for publishing and declare the exchanges and queues publishing needs.

        Publishing connects on first use too; connecting first surfaces a bad URL early and
        makes sure the queue exists before anything is published.

        Raises:
            MessageBrokerUnavailableError: The broker cannot be reached.
            MessagingError: The broker refused the credentials or a declaration.
            RuntimeError: The adapter is not attached to a channel.
        """
        await self._publishing_channel()

    async def _publishing_channel(self) -> AbstractChannel:
        before = cancellations()
        self._enter_loop()
        publisher = self._publisher
        if publisher is not None and not publisher[1].is_closed:
            return publisher[1]
        self._require_channel()
        async with self._publish_lock:
            publisher = self._publisher
            if publisher is not None and not publisher[1].is_closed:
                return publisher[1]
            await self._close_publisher()
            connection = await self._connect("publisher")
            try:
                # aio-pika's connect may have swallowed the cancellation of a publish's
                # deadline: the publish would then wait without one.
                raise_swallowed_cancellation(before)
                channel = await connection.channel(publisher_confirms=True)
                await self._declare_publishing(channel)
            except BROKER_ERRORS as error:
                await _close_quietly(connection)
                self._fail(error)
            except BaseException:
                await _close_quietly(connection)
                raise
            self._publisher = (connection, channel)
            return channel

    async def _close_publisher(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await _close_quietly(publisher[0], publisher[1])

    async def aclose(self) -> None:
        """Stop consuming (waiting for running handlers) and close every connection.

        Safe to call more than once; publishing afterwards connects again.
        """
        await self.stop_consuming()
        await self._close_publisher()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- publishing ------------------------------------------------------------------------

    async def publish_message(self, message: Message, *, replay: bool = False) -> None:
        """Publish one message and wait for the broker's confirmation.

        Args:
            message: The message (channels validate it before calling the adapter).
            replay: Mark it as a replay of history (sent in the ``replay`` header).

        Raises:
            MessageBrokerUnavailableError: The broker cannot be reached, the connection
                dropped before the confirmation, or no confirmation came within
                ``publish_timeout`` (the message may or may not be stored).
            MessagingError: The broker refused the message.
        """
        await self.publish_messages([message], replay=replay)

    async def publish_messages(self, messages: Sequence[Message], *, replay: bool = False) -> None:
        """Publish messages in order, pipelined, and wait until the broker confirmed them all.

        ``publish_timeout`` bounds every wait for the broker: connecting (with the
        declarations publishing needs) takes that long at most, and then the next
        confirmation must come within ``publish_timeout`` of the previous one (of the start
        of publishing, for the first). A batch may take longer in all, as long as the broker
        keeps confirming. A broker that stops answering (it blocks publishers for a memory
        or disk alarm, or the link died silently) would otherwise keep the caller waiting
        for ever: the publishing connection is then closed, and the next publish connects
        anew. Closing it waits a few seconds at most, so the error may come that much later
        than ``publish_timeout``.

        Raises:
            MessageBrokerUnavailableError: The broker cannot be reached, the connection
                dropped or was closed before every confirmation arrived (another publish
                gave up on it, or ``aclose`` closed it), or no confirmation came within
                ``publish_timeout`` (some messages may be stored all the same).
            MessagingError: The broker refused a message.
        """
        if not messages:
            return

        async def publish(wait: _BrokerWait) -> None:
            channel = await self._publishing_channel()
            wait.connection = self._publisher_connection(channel)
            wait.progress()
            try:
                await self._publish(channel, messages, replay=replay, progress=wait.progress)
            except BROKER_ERRORS as error:
                self._fail(error)

        await self._within_publish_timeout(
            publish,
            f"publishing {len(messages)} message(s)",
            "(is it blocking publishers for a memory or disk alarm, or was the link lost?); "
            "they may be stored all the same: retry, and let consumers deduplicate",
        )

    def _publisher_connection(self, channel: AbstractChannel) -> AbstractConnection | None:
        """The publishing connection ``channel`` is on (``None``: it was replaced)."""
        publisher = self._publisher
        return publisher[0] if publisher is not None and publisher[1] is channel else None

    async def _within_publish_timeout(
        self, operation: Callable[[_BrokerWait], Awaitable[_T]], what: str, advice: str
    ) -> _T:
        """Run ``operation`` on the publishing connection, each wait for the broker bounded.

        The broker must answer within ``publish_timeout`` of the start, then of its previous
        answer (``operation`` calls ``progress`` at each). Otherwise the connection it waits
        on is closed, and the next call connects anew.

        Raises:
            MessageBrokerUnavailableError: The deadline ran out (the message says ``what``
                was done, then ``advice``), or the connection was closed under the wait.
        """
        before = cancellations()
        deadline = asyncio.timeout(self.publish_timeout)
        loop = asyncio.get_running_loop()

        def progress() -> None:
            # The broker answered: it is alive, so the wait starts again.
            if not deadline.expired():
                deadline.reschedule(loop.time() + self.publish_timeout)

        wait = _BrokerWait(progress)
        try:
            async with deadline:
                return await operation(wait)
        except asyncio.CancelledError as error:
            if not deadline.expired():
                # Nobody cancelled this task unless it counts more cancellations: the
                # driver cancels what waits for the broker when the connection is closed
                # under it.
                self._raise_connection_closed(before, error)
            if cancellations() > before:
                raise
            # Before Python 3.12, a deadline that expires in a task that caught a
            # cancellation earlier (and did not uncancel it) raises CancelledError.
            await self._give_up(wait, what, advice, error)
        except TimeoutError as error:
            if not deadline.expired():
                raise
            await self._give_up(wait, what, advice, error)

    async def _give_up(
        self, wait: _BrokerWait, what: str, advice: str, error: BaseException
    ) -> NoReturn:
        """Close the publishing connection the deadline ran out on, and say so."""
        await self._drop_publisher(wait.connection)
        raise MessageBrokerUnavailableError(
            f"RabbitMQ at {self.url} did not answer within {self.publish_timeout:g}s while "
            f"{what} {advice}"
        ) from error

    def _raise_connection_closed(self, before: int, error: asyncio.CancelledError) -> NoReturn:
        """Raise the ``CancelledError`` of a cancelled task, or ours for a closed connection.

        Closing a connection cancels what waits for the broker on it, in tasks nobody
        cancelled: a publish that gave up closes the publishing connection under the other
        publishes, dead-letter reads and purges that wait on it; ``aclose`` does too.

        Args:
            before: What ``cancellations()`` said before waiting.
            error: The ``CancelledError`` caught.

        Raises:
            asyncio.CancelledError: The running task was cancelled (more cancellations are
                pending than ``before``).
            MessageBrokerUnavailableError: Otherwise: the connection closed meanwhile.
        """
        if cancellations() > before:
            raise error
        raise MessageBrokerUnavailableError(
            f"RabbitMQ at {self.url}: the publishing connection was closed before the broker "
            "answered (another publish gave up on it after publish_timeout, or the adapter "
            "was closed); retry"
        ) from error

    async def _drop_publisher(self, connection: AbstractConnection | None) -> None:
        """Close the publishing connection a wait gave up on, unless it was replaced.

        Its channel is not closed first: a broker that answers nothing would never confirm
        that either. Closing the connection waits a few seconds at most for the broker.
        """
        publisher = self._publisher
        if publisher is None or connection is None or publisher[0] is not connection:
            return
        self._publisher = None
        await _close_quietly(publisher[0])

    @staticmethod
    async def _publish_all(
        channel: AbstractChannel,
        exchange: str,
        bodies: Sequence[tuple[bytes, str]],
        *,
        replay: bool,
        progress: Callable[[], None],
    ) -> None:
        """Publish ``(body, routing key)`` pairs pipelined; raise the first failure.

        Goes through the channel's aiormq layer: building aio-pika ``Message`` objects would
        cost more than validating the messages does. Calls ``progress`` at each confirmation.
        A chunk of messages at a time: the tasks of a whole large batch would keep the event
        loop from reading confirmations for a while.
        """
        underlay = await channel.get_underlay_channel()
        headers = {REPLAY_HEADER: replay}

        async def publish(body: bytes, key: str) -> None:
            await underlay.basic_publish(
                body, exchange=exchange, routing_key=key, properties=amqp_properties(headers)
            )
            progress()

        if len(bodies) == 1:
            await publish(*bodies[0])
            return
        for start in range(0, len(bodies), _PUBLISH_CHUNK):
            results = await asyncio.gather(
                *(publish(body, key) for body, key in bodies[start : start + _PUBLISH_CHUNK]),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result

    # -- consuming -------------------------------------------------------------------------

    async def start_consuming(self) -> None:
        """Start consumers in the background; return once they are registered.

        Handlers run concurrently, up to ``prefetch_count`` at a time per queue. If the
        connection drops, consumers reconnect by themselves after ``reconnect_delay`` (with
        back-off); messages that were not acknowledged are delivered again. If the broker
        cancels a consumer (its queue was deleted), the queue is declared again and consumed
        anew, with a warning; if that fails, the consumers reconnect, with back-off. An
        unexpected error while doing so is logged with its traceback, and the consumers
        reconnect, with back-off. If the broker refuses to declare a consumed queue as the
        adapter declares it (someone made it anew with other arguments), or refuses the user
        a permission (ACCESS_REFUSED), retrying cannot help: the consumers close, the error
        is logged, and ``is_consuming`` says false.

        Calling it while the adapter consumes (or starts to) does nothing more: the call
        returns once that start has ended (and starts the consumers itself if that start
        failed). Called while a stop runs, it waits for that stop, then starts. A stop that
        arrives meanwhile wins.

        Raises:
            RuntimeError: No handler, no channel attached, or called by a handler of this
                adapter while a stop runs (the stop waits for that handler to return: start
                again from another task).
            MessageBrokerUnavailableError: The broker cannot be reached.
            MessagingError: The broker refused a declaration (for a queue that exists with
                other arguments, the message names it and the argument; for a permission
                the user lacks, it names the queue and the permission).
        """
        self._enter_loop()
        self._require_channel()
        self._subscriptions(consuming=True)  # no handler: say so before waiting
        stop_calls = self._stop_calls
        current = asyncio.current_task()
        while True:
            if self._stopping and current in self._handling:
                # A handler of this adapter during a stop: the stop, or the start it came
                # during, ends once this handler has returned, so waiting for it would
                # never end.
                raise RuntimeError(
                    f"{self!r} is stopping; a handler cannot start it again: start consuming "
                    "from another task once the stop has ended"
                )
            # Two calls at once would otherwise both open consumers, and the stop would
            # close only the last ones: the later call waits for the earlier one's outcome.
            if self._starting is not None:
                if current in self._handling:
                    # A handler waits only until a stop overtakes the start (and is then
                    # refused, above): the start then waits for the handlers.
                    assert self._start_overtaken is not None
                    await self._start_overtaken.wait()
                else:
                    await self._starting.wait()
            elif self._stop_ended is not None:
                await self._stop_ended.wait()  # the consumers being stopped go first
            else:
                break
        if self._stop_calls != stop_calls or self._supervised():
            return
        starting = self._starting = asyncio.Event()
        overtaken = self._start_overtaken = asyncio.Event()
        try:
            if self._supervisor is not None:
                await self._forget_ended_supervisor()
                if self._stop_calls != stop_calls:
                    return
            # Again: listeners registered while this call waited are consumed too.
            subscriptions = self._subscriptions(consuming=True)
            self._stopping = False
            self._start_grace = None
            consumers = await self._open_consumers(subscriptions)
            if self._stop_calls != stop_calls:
                # A stop came meanwhile: consumers must not run after it, even if it was
                # cancelled before this start finished.
                await self._stop_opened(consumers)
                return
            self._use_consumers(consumers)
            supervisor = asyncio.create_task(self._supervise(subscriptions))
            supervisor.add_done_callback(self._report_supervisor_end)
            self._supervisor = supervisor
        finally:
            self._starting = self._start_overtaken = None
            starting.set()
            overtaken.set()

    async def _open_consumers(self, subscriptions: list[Subscription]) -> _Consumers:
        """Connect and register a consumer per subscription; the caller puts them to use.

        Raises:
            asyncio.CancelledError: The calling task was cancelled meanwhile, also when the
                driver swallowed it (aio-pika's ``connect`` runs in ``asyncio.wait_for``):
                the consumers are closed rather than handed to a task that is ending.
        """
        before = cancellations()
        connection = await self._connect("consumer")
        # Watch for a drop from the start, so one during the set-up is not missed.
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        cancelled: set[str] = set()

        def on_cancel(frame: aiormq.spec.Basic.Cancel) -> None:
            # The broker cancels a consumer whose queue was deleted (or whose queue's node
            # went away) and keeps its channel open: nothing would be delivered again.
            # Called by the channel's frame reader, which must go on reading to answer a
            # new basic.consume: the supervisor consumes again.
            if frame.consumer_tag is not None:
                cancelled.add(frame.consumer_tag)
                lost.set()

        channels: list[AbstractChannel] = []
        try:
            for subscription in subscriptions:
                channel = await connection.channel(publisher_confirms=True)
                # The broker may close one channel and keep the connection (a consumer
                # past its consumer_timeout, a failed acknowledgement): its consumer is
                # gone too, and the consumers are opened again as after a lost connection.
                channel.close_callbacks.add(lambda *_: lost.set())
                await channel.set_qos(prefetch_count=self.prefetch_count)
                underlay = await channel.get_underlay_channel()
                underlay.on_consumer_cancel_callbacks.add(on_cancel)
                try:
                    await self._declare_subscription(channel, subscription)
                except aiormq.exceptions.ChannelPreconditionFailed as error:
                    if not declared_otherwise(error):
                        raise  # passing (a vhost's queue limit reached): retried
                    raise MessagingError(
                        f"RabbitMQ at {self.url} refused to declare what {subscription.queue} "
                        f"needs ({describe_error(error)}): a queue or exchange of that name "
                        "exists with other arguments or of another type (made by another "
                        "version, or by hand); delete it, or give every adapter using it the "
                        "same options"
                    ) from error
                except aiormq.exceptions.ChannelAccessRefused as error:
                    raise MessagingError(
                        f"RabbitMQ at {self.url} refused to declare what {subscription.queue} "
                        f"needs ({describe_error(error)}): {PERMISSION_ADVICE}"
                    ) from error
                channels.append(channel)
            # Consumed only once every queue is declared: a declaration the broker refuses
            # (a queue made anew with other arguments) fails the attempt before a handler
            # starts, rather than starting and cancelling handlers at every attempt.
            consumers = [
                (channel, await self._consume(channel, subscription))
                for channel, subscription in zip(channels, subscriptions, strict=True)
            ]
            raise_swallowed_cancellation(before)
        except BROKER_ERRORS as error:
            await _close_quietly(connection)
            self._fail(error)
        except BaseException:
            await _close_quietly(connection)
            raise
        return _Consumers(connection, lost, consumers, cancelled)

    async def _consume(self, channel: AbstractChannel, subscription: Subscription) -> str:
        """Consume a declared subscription's queue; return the consumer tag."""
        # Consume on the aiormq layer: no aio-pika message object and no extra task per
        # delivery.
        underlay = await channel.get_underlay_channel()

        async def on_message(delivered: aiormq.abc.DeliveredMessage) -> None:
            await self._on_message(subscription, underlay, delivered)

        consume_ok = await underlay.basic_consume(subscription.queue, on_message)
        assert consume_ok.consumer_tag is not None
        return consume_ok.consumer_tag

    async def _stop_opened(self, consumers: _Consumers) -> None:
        """Stop consumers opened by a start that a stop overtook, as that stop would have.

        The queues are consumed one by one, so handlers may have started already: closing
        at once would cancel them, their messages delivered again, whatever the grace period.
        """
        self._stopping = True
        try:
            await self._cancel_consumers(consumers.channels)
            await self._wait_for_handlers(self._start_grace)
        finally:
            channels = [channel for channel, _ in consumers.channels]
            await _close_quietly(consumers.connection, *channels)

    @staticmethod
    async def _cancel_consumers(consumers: list[tuple[AbstractChannel, str]]) -> None:
        """Ask the broker to deliver nothing more to these consumers."""
        for channel, consumer_tag in consumers:
            with contextlib.suppress(*BROKER_ERRORS):
                await (await channel.get_underlay_channel()).basic_cancel(consumer_tag)

    async def _wait_for_handlers(self, grace_period: float | None) -> None:
        """Wait until no handler runs, or ``grace_period`` seconds (``None``: no limit)."""
        try:
            await asyncio.wait_for(self._idle.wait(), grace_period)
        except TimeoutError:
            logger.warning(
                "%r stopped with %d handler(s) still running; their messages will be "
                "delivered again",
                self,
                self._in_flight,
            )

    def _use_consumers(self, consumers: _Consumers) -> None:
        self._connection_lost = consumers.lost
        self._consumer_connection = consumers.connection
        self._consumers = consumers.channels
        self._cancelled = consumers.cancelled

    async def _supervise(self, subscriptions: list[Subscription]) -> None:
        """Reconnect consumers whenever their connection drops, until stopped.

        A consumer the broker cancelled, on a channel that lives on, consumes again on that
        channel instead (``_consume_again``); reconnecting is what is left when that fails.
        An unexpected error is logged and the consumers reconnect, with back-off: a worker
        that silently stops consuming is the worst outcome. A queue the broker refuses to
        declare as the adapter declares it (PRECONDITION_FAILED: it exists with other
        arguments) is no outage that retrying would outlast: the task then ends with that
        ``MessagingError``, which ``_report_supervisor_end`` logs, and ``is_consuming`` says
        false.

        Ends by itself once ``stop_consuming`` started, not only when cancelled: a
        cancellation can be lost on the way. On Python 3.11, ``asyncio.wait_for`` (which
        aio-pika's ``connect`` uses) drops one that arrives just as the connection is made,
        so the reconnection completes; waiting for that new connection to drop would then
        keep ``stop_consuming`` waiting for this task forever. A cancellation from outside
        (``asyncio.run`` ending its loop) that is lost so is raised again once noticed, and
        the consumers are closed.
        """
        delay = self.reconnect_delay
        failed = False
        try:
            while not self._stopping:
                raise_swallowed_cancellation()
                try:
                    if failed:
                        failed = False
                    else:
                        await self._connection_lost.wait()
                        if self._stopping:
                            return
                        if await self._consume_again(subscriptions):
                            continue
                        logger.warning(
                            "%r lost a RabbitMQ consumer or its connection; reconnecting", self
                        )
                        delay = self.reconnect_delay
                    await self._reconnect(subscriptions, delay)
                except Exception as error:
                    if _declaration_refused(error) and not self._stopping:
                        # Lasting until someone deletes or fixes the queue: retrying would
                        # pass a misconfiguration off as an outage. The task ends, and
                        # _report_supervisor_end reports it and closes what is left.
                        raise
                    logger.exception(
                        "%r: keeping the consumers running failed; reconnecting them", self
                    )
                    failed = True
                    delay = _longer(delay)
        except asyncio.CancelledError:
            if not self._stopping:
                # Cancelled from outside, not by a stop: nothing would watch the consumers
                # any more, so they go too (their messages are delivered again), and
                # is_consuming says false.
                await self._close_consumers()
            raise

    async def _reconnect(self, subscriptions: list[Subscription], delay: float) -> None:
        """Close what is left of the consumers, then open them again, with back-off.

        Returns once they are open, or when a stop started.

        Raises:
            MessagingError: The broker refused to declare a consumed queue as the adapter
                declares it (retrying cannot help).
        """
        # What is left of the consumers (a connection whose channel alone closed) goes:
        # their unacknowledged messages are delivered again, to the new ones. It stays the
        # adapter's until closed, so that a stop_consuming meanwhile closes it too.
        previous = self._consumer_connection
        if previous is not None:
            channels = [channel for channel, _ in self._consumers]
            try:
                await _close_quietly(previous, *channels)
            except Exception:
                # Forgotten all the same: closing it at every attempt would fail again, and
                # the consumers would never come back. Not left open, though: its other
                # channels would go on consuming, unwatched.
                if self._consumer_connection is previous:
                    self._consumer_connection = None
                if not previous.is_closed:
                    with contextlib.suppress(*BROKER_ERRORS):
                        await previous.close()
                raise
            if self._consumer_connection is previous:
                self._consumer_connection = None
        while not self._stopping:
            raise_swallowed_cancellation()
            await asyncio.sleep(delay)  # back off between reconnection attempts
            try:
                consumers = await self._open_consumers(subscriptions)
            except MessagingError as error:
                if _declaration_refused(error):
                    raise
                logger.warning("%r could not reconnect: %s", self, error)
                delay = _longer(delay)
                continue
            except Exception:
                logger.exception("%r failed to reconnect", self)
                delay = _longer(delay)
                continue
            channels = [channel for channel, _ in consumers.channels]
            if self._stopping:
                # Reconnected although stop_consuming cancelled this task (the cancellation
                # was lost): close the new consumers again, here, as stop_consuming only
                # closes the ones in use.
                await _close_quietly(consumers.connection, *channels)
                return
            try:
                self._use_consumers(consumers)
            except BaseException:
                await _close_quietly(consumers.connection, *channels)
                raise
            logger.info("%r reconnected to RabbitMQ", self)
            return

    async def _close_consumers(self) -> None:
        """Close the consumers in use (cancelling their handlers) and forget them.

        Returns once the consumers an ended supervisor left open are closed too.
        """
        connection, self._consumer_connection = self._consumer_connection, None
        consumers, self._consumers = self._consumers, []
        if connection is not None:
            await _close_quietly(connection, *(channel for channel, _ in consumers))
        closing = self._closing_consumers
        if closing is not None:
            # Shielded: a caller cancelled meanwhile must not leave them half closed.
            await asyncio.shield(closing)
            if self._closing_consumers is closing:
                self._closing_consumers = None

    def _report_supervisor_end(self, supervisor: asyncio.Task[None]) -> None:
        """Log a supervisor that ended other than by a stop, and close what it left open.

        Cancelled before its first step, it closed nothing: its consumers would go on taking
        messages unwatched, while ``is_consuming`` said false.
        """
        if self._stopping:
            return
        if self._consumer_connection is not None:
            connection, self._consumer_connection = self._consumer_connection, None
            consumers, self._consumers = self._consumers, []
            channels = [channel for channel, _ in consumers]
            self._closing_consumers = supervisor.get_loop().create_task(
                _close_quietly(connection, *channels)
            )
        error = None if supervisor.cancelled() else supervisor.exception()
        logger.log(
            logging.WARNING if error is None else logging.ERROR,
            "%r stopped consuming: the task keeping its consumers running %s; "
            "start_consuming() starts them again",
            self,
            "was cancelled" if error is None else "failed",
            exc_info=error,
        )

    async def _forget_ended_supervisor(self) -> None:
        """Forget a supervisor that ended without a stop, closing what is left of it.

        Its consumers are closed already, or closing (``_report_supervisor_end``).
        """
        self._supervisor = None
        await self._close_consumers()

    async def _consume_again(self, subscriptions: list[Subscription]) -> bool:
        """Consume again where the broker cancelled consumers and kept their channels.

        Each queue is declared again first (with its bindings, on a bus), as when consuming
        started. Handlers running meanwhile go on undisturbed; the other consumers too.

        Returns:
            ``False`` when more than consumers is gone (a channel, the connection) or
            consuming again failed: the caller then reconnects them all, with back-off.
        """
        connection = self._consumer_connection
        if (
            not self._cancelled
            or connection is None
            or connection.is_closed
            or any(channel.is_closed for channel, _ in self._consumers)
        ):
            return False
        # Cleared before consuming again: a cancellation or a drop from now on wakes the
        # supervisor once more.
        self._connection_lost.clear()
        cancelled = set(self._cancelled)
        self._cancelled -= cancelled
        for index, (channel, tag) in enumerate(self._consumers):
            if self._stopping:
                break  # the supervisor ends, and stop_consuming closes the channels
            if tag not in cancelled:
                continue
            queue = subscriptions[index].queue
            logger.warning(
                "%r: the broker cancelled the consumer of %s (the queue was deleted, or its "
                "node went away); declaring it again and consuming anew",
                self,
                queue,
            )
            try:
                await self._declare_subscription(channel, subscriptions[index])
                new_tag = await self._consume(channel, subscriptions[index])
            except Exception as error:
                logger.warning(
                    "%r could not consume %s again (%s)", self, queue, describe_error(error)
                )
                return False
            self._consumers[index] = (channel, new_tag)
            if self._stopping:
                # The stop may have cancelled the consumers before this one existed: left
                # alone, it would take messages nobody handles, and keep them from other
                # workers, for as long as the stop waits for running handlers.
                with contextlib.suppress(*BROKER_ERRORS):
                    await (await channel.get_underlay_channel()).basic_cancel(new_tag)
                break
            logger.info("%r consumes %s again", self, queue)
        return True

    async def stop_consuming(self, *, grace_period: float | None = None) -> None:
        """Stop consumers cleanly: no new deliveries, wait for running handlers, then close.

        Messages received but not handled yet are left unacknowledged, so the broker hands
        them to another consumer. Safe to call when not consuming; called while
        ``start_consuming`` runs, it has that start stop the consumers it opens as this call
        would (within the shortest grace period of the stops meanwhile), and waits for it
        (if this call is cancelled, the start still stops them). Called by a handler, it
        returns at once: no new message is handled, and the consumers close once that
        handler has returned (``is_consuming`` is true until then).

        Args:
            grace_period: Seconds to wait for running handlers; then their channels close,
                cancelling them, and their messages are delivered again. ``None`` waits.
        """
        self._enter_loop()
        # Counted before any await: a start in progress then opens nothing that runs on.
        self._stop_calls += 1
        current = asyncio.current_task()
        inside = current is not None and current in self._handling
        if self._starting is not None:
            if grace_period is not None:
                grace = self._start_grace
                self._start_grace = grace_period if grace is None else min(grace, grace_period)
            # The start stops the consumers it opens once their handlers have returned: no
            # new delivery is handled from now on, and a handler waiting for the start to
            # start it again is refused rather than waited for.
            self._stopping = True
            assert self._start_overtaken is not None
            self._start_overtaken.set()
            if inside:
                # A handler of a consumer this start opened: waiting for the start here
                # would wait for itself.
                return
            # Returning before the start ended would let aclose() close the connection it
            # is still opening.
            await self._starting.wait()
        if self._stopper is not None:
            if not inside:  # a handler asked first: its stop is the one to wait for
                await asyncio.shield(self._stopper)
            return
        if inside and self._supervisor is not None:
            # A handler stops its own adapter: waiting here for the handlers in flight would
            # wait for itself. No new delivery is handled from now on; the rest of the stop
            # runs once this handler has returned and its message is acknowledged.
            self._begin_stop()
            self._stopper = asyncio.create_task(self._stop(grace_period))
            return
        await self._stop(grace_period)

    def _begin_stop(self) -> asyncio.Event:
        """Mark the consumers in use stopping; return what is set once they are stopped."""
        self._stopping = True
        if self._stop_ended is None:
            self._stop_ended = asyncio.Event()
        return self._stop_ended

    async def _stop(self, grace_period: float | None) -> None:
        """``stop_consuming``, outside any handler."""
        supervisor = self._supervisor
        if supervisor is None:
            return
        if self._supervisor_ended():
            await self._forget_ended_supervisor()  # nothing consumes: nothing to wait for
            return
        ended = self._begin_stop()
        try:
            await self._cancel_consumers(self._consumers)
            await self._wait_for_handlers(grace_period)
        finally:
            supervisor.cancel()
            try:
                # Returns once the supervisor ended, cancelled or not (it ends by itself when
                # a cancellation is lost); raises only if this call itself is cancelled, which
                # is passed on once the connection is closed.
                await asyncio.wait([supervisor])
                if not supervisor.cancelled() and (error := supervisor.exception()) is not None:
                    raise error
            finally:
                try:
                    await self._close_consumers()
                finally:
                    # Two stops at once both get here: the first ends the stop; the other
                    # must not clear what a start made after it.
                    if self._supervisor is supervisor:
                        self._supervisor = None
                        self._stopper = None
                        self._stop_ended = None
                        ended.set()

    @contextlib.asynccontextmanager
    async def consuming(self, *, grace_period: float | None = None) -> AsyncIterator[Self]:
        """Consume while the ``async with`` block runs; leaving it stops cleanly.

        Args:
            grace_period: Passed to ``stop_consuming(grace_period=...)``.
        """
        await self.start_consuming()
        try:
            yield self
        finally:
            await self.stop_consuming(grace_period=grace_period)

    async def _on_message(
        self,
        subscription: Subscription,
        channel: aiormq.abc.AbstractChannel,
        delivered: aiormq.abc.DeliveredMessage,
    ) -> None:
        if self._stopping:
            return  # left unacknowledged: the broker redelivers it once the channel closes
        delivery_tag = delivered.delivery_tag
        assert delivery_tag is not None  # a consumed delivery always has one
        # The handlers of this event loop, which may close with this one still pending:
        # garbage-collected later, it must leave the next loop's count alone.
        handling, idle = self._handling, self._idle
        self._in_flight += 1
        idle.clear()
        task = asyncio.current_task()
        if task is not None:
            handling.add(task)
        try:
            await self._handle(subscription, channel, delivered)
            await channel.basic_ack(delivery_tag)
        except asyncio.CancelledError:
            # The handler's task was cancelled (its channel is closing, or someone else did):
            # give the message back now rather than when the channel closes.
            if not channel.is_closed:
                with contextlib.suppress(*BROKER_ERRORS):
                    await asyncio.shield(channel.basic_nack(delivery_tag, requeue=True))
            raise
        except BROKER_ERRORS as error:
            if channel.is_closed:
                # The link died while handling: the broker redelivers what was not
                # acknowledged.
                logger.info(
                    "%r could not settle a message (%s); it will be redelivered", self, error
                )
            else:
                # The broker refused to take the message on (a retry or dead-letter queue at
                # an operator's length limit, say) and the channel lives on: left alone, the
                # message would hold a prefetch slot for good.
                logger.warning(
                    "%r could not pass a message on (%s); it goes back to its queue in %gs",
                    self,
                    error,
                    self.reconnect_delay,
                )
                await asyncio.sleep(self.reconnect_delay)
                await self._requeue_at_the_back(subscription, channel, delivered)
        finally:
            if task is not None:
                handling.discard(task)
            if self._handling is handling:
                self._in_flight -= 1
                if self._in_flight == 0:
                    idle.set()

    async def _requeue_at_the_back(
        self,
        subscription: Subscription,
        channel: aiormq.abc.AbstractChannel,
        delivered: aiormq.abc.DeliveredMessage,
    ) -> None:
        """Put a delivery behind the others in its queue, not straight back ahead of them.

        A copy is published, then the original acknowledged; if even that is refused, the
        broker takes the delivery back where it was.
        """
        delivery_tag = delivered.delivery_tag
        assert delivery_tag is not None
        try:
            await channel.basic_publish(
                delivered.body,
                routing_key=subscription.queue,
                properties=amqp_properties(dict(delivered.header.properties.headers or {})),
            )
            await channel.basic_ack(delivery_tag)
        except BROKER_ERRORS:
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.basic_nack(delivery_tag, requeue=True)

    async def _handle(
        self,
        subscription: Subscription,
        channel: aiormq.abc.AbstractChannel,
        delivered: aiormq.abc.DeliveredMessage,
    ) -> None:
        """Run the handler; on failure, hand the message on. The caller acknowledges it."""
        body = delivered.body
        headers = delivered.header.properties.headers or {}
        replay = headers.get(REPLAY_HEADER) is True
        attempt = attempt_of(headers)
        try:
            message = subscription.select(body, replay, self._require_channel())
        except Exception as error:
            # Retrying cannot fix a body that does not validate: dead-letter it at once.
            await self._dead_letter(subscription, channel, body, replay, attempt, error)
            return
        if message is None:
            return  # not for this listener (only a binding from an earlier run routes it here)
        handler = subscription.handler()
        if handler is None:
            raise RuntimeError(f"{self!r} has no handler")  # start_consuming checks it
        retries_left = max(self._retry_policy.retry_attempts - attempt + 1, 0)
        context = MessageContext(attempt=attempt, retry_attempts_left=retries_left, replay=replay)
        try:
            await run_handler(handler, message, context)
        except Exception as error:
            if retries_left > 0:
                await self._retry(subscription, channel, body, replay, attempt, error)
            else:
                await self._dead_letter(subscription, channel, body, replay, attempt, error)

    async def _retry(  # noqa: PLR0917 - one private call site
        self,
        subscription: Subscription,
        channel: aiormq.abc.AbstractChannel,
        body: bytes,
        replay: bool,
        attempt: int,
        error: Exception,
    ) -> None:
        """Hand a failed message to the retry queue of its delay (it comes back after it)."""
        delay_ms = round(self._retry_policy.delay_for(attempt) * 1000)
        target = subscription.retry_queue(delay_ms) if delay_ms > 0 else subscription.queue
        headers = {REPLAY_HEADER: replay, ATTEMPT_HEADER: attempt + 1}
        await channel.basic_publish(body, routing_key=target, properties=amqp_properties(headers))
        logger.warning(
            "%r: handler failed on attempt %d (%s); retrying in %d ms",
            self,
            attempt,
            describe_error(error),
            delay_ms,
        )

    async def _dead_letter(  # noqa: PLR0917 - one private call site
        self,
        subscription: Subscription,
        channel: aiormq.abc.AbstractChannel,
        body: bytes,
        replay: bool,
        attempt: int,
        error: Exception,
    ) -> None:
        """Keep a message whose retries are spent in the dead-letter queue, with its error."""
        description = describe_error(error)
        headers = {REPLAY_HEADER: replay, ERROR_HEADER: description, ATTEMPTS_HEADER: attempt}
        await channel.basic_publish(
            body, routing_key=subscription.dead_letter_queue, properties=amqp_properties(headers)
        )
        logger.error(
            "%r: message dead-lettered to %s after %d attempt(s): %s; body: %s",
            self,
            subscription.dead_letter_queue,
            attempt,
            description,
            body[:1000].decode(errors="replace"),
            extra={"castore_dead_letter_queue": subscription.dead_letter_queue},
        )

    # -- topology --------------------------------------------------------------------------

    async def _declare_subscription(
        self, channel: AbstractChannel, subscription: Subscription
    ) -> AbstractQueue:
        """Declare a consumed queue, its retry queues and its dead-letter queue."""
        queue = await channel.declare_queue(subscription.queue, durable=True)
        await channel.declare_queue(subscription.dead_letter_queue, durable=True)
        for delay_ms in self._retry_delays_ms():
            if delay_ms > 0:
                await channel.declare_queue(
                    subscription.retry_queue(delay_ms),
                    durable=True,
                    arguments={
                        "x-message-ttl": delay_ms,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": subscription.queue,
                    },
                )
        return queue

    @contextlib.asynccontextmanager
    async def _admin_channel(
        self, wait: _BrokerWait, connection: AbstractConnection | None = None
    ) -> AsyncIterator[AbstractChannel]:
        """A short-lived channel for dead letters and purge.

        On ``connection``, or else on the publishing connection (connecting, with what
        publishing declares, if need be). A publish that gives up closes that connection:
        what waits on this channel then raises ``MessageBrokerUnavailableError``, not the
        driver's ``CancelledError``.
        """
        before = cancellations()
        if connection is None:
            await self._publishing_channel()
            assert self._publisher is not None
            connection = self._publisher[0]
        wait.connection = connection
        try:
            channel = await connection.channel(publisher_confirms=True)
        except BROKER_ERRORS as error:
            self._fail(error)
        except asyncio.CancelledError as error:
            self._raise_connection_closed(before, error)
        wait.progress()
        try:
            yield channel
        except BROKER_ERRORS as error:
            self._fail(error)
        except asyncio.CancelledError as error:
            self._raise_connection_closed(before, error)
        finally:
            await _close_channels_quietly(channel)

    # -- dead letters ----------------------------------------------------------------------

    async def dead_letters(self) -> list[DeadLetter]:
        """The messages kept in the dead-letter queue(s), oldest first; they stay there.

        A queue adapter reads its queue's; a bus adapter those of its registered listeners.
        Each queue is read as it was when its turn came: letters dead-lettered meanwhile are
        left for the next call. A body that no longer validates is left out (and logged);
        inspect it with any AMQP tool in ``<queue>.dead``. The broker must answer within
        ``publish_timeout``, as for a publish.

        Raises:
            MessageBrokerUnavailableError: The broker cannot be reached, or did not answer
                within ``publish_timeout`` (the letters read stay in their queue).
        """
        message_channel = self._require_channel()
        subscriptions = self._subscriptions(consuming=False)

        async def read(wait: _BrokerWait) -> list[DeadLetter]:
            letters: list[DeadLetter] = []
            for subscription in subscriptions:
                # Read without acknowledging; closing the channel puts them all back, in order.
                async with (
                    self._admin_channel(wait) as channel,
                    contextlib.aclosing(_letters_in(channel, subscription, wait)) as letters_in,
                ):
                    async for incoming in letters_in:
                        letter = self._dead_letter_of(message_channel, subscription, incoming)
                        if letter is not None:
                            letters.append(letter)
            return letters

        return await self._within_publish_timeout(
            read, "reading the dead letters", "(was the link lost?); retry: they stay queued"
        )

    def _dead_letter_of(
        self,
        message_channel: MessageChannel[Any],
        subscription: Subscription,
        incoming: aio_pika.abc.AbstractIncomingMessage,
    ) -> DeadLetter | None:
        """The dead letter a message read holds, or ``None`` (logged) if it does not validate."""
        headers = incoming.headers or {}
        try:
            message = message_channel.parse_message(incoming.body)
        except Exception as error:  # reported, not raised: the others still count
            logger.warning(
                "%r: a dead letter in %s does not validate: %s",
                self,
                subscription.dead_letter_queue,
                describe_error(error),
            )
            return None
        attempts = headers.get(ATTEMPTS_HEADER, 1)
        return DeadLetter(
            message=message,
            error=str(headers.get(ERROR_HEADER, "")),
            attempts=attempts if isinstance(attempts, int) else 1,
            replay=headers.get(REPLAY_HEADER) is True,
            listener_id=subscription.listener_id,
        )

    async def republish_dead_letters(self) -> int:
        """Send every dead letter back for processing (from attempt 1) and remove it.

        Bus dead letters go back to the listener that failed, not to the others. Letters
        dead-lettered again while this runs stay for the next call. The broker must answer
        within ``publish_timeout``, as for a publish.

        Returns:
            How many messages were sent back.

        Raises:
            MessageBrokerUnavailableError: The broker cannot be reached, or did not answer
                within ``publish_timeout`` (letters not sent back yet stay in the
                dead-letter queue; the last one sent back may be sent again by a retry).
        """
        subscriptions = self._subscriptions(consuming=False)

        async def republish(wait: _BrokerWait) -> int:
            count = 0
            for subscription in subscriptions:
                async with self._admin_channel(wait) as channel:
                    await channel.declare_queue(subscription.queue, durable=True)
                    letters_in = _letters_in(channel, subscription, wait)
                    async with contextlib.aclosing(letters_in):
                        async for incoming in letters_in:
                            replay = (incoming.headers or {}).get(REPLAY_HEADER) is True
                            await channel.default_exchange.publish(
                                aio_pika.Message(
                                    incoming.body,
                                    headers={REPLAY_HEADER: replay},
                                    content_type="application/json",
                                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                ),
                                subscription.queue,
                                mandatory=False,
                            )
                            wait.progress()
                            await incoming.ack()  # only once the copy is confirmed
                            count += 1
            return count

        return await self._within_publish_timeout(
            republish,
            "sending the dead letters back",
            "(was the link lost?); retry: those not sent back yet stay queued",
        )

    async def purge(self) -> None:
        """Delete every queue and exchange this adapter declares, with their messages.

        Meant for tests and teardown; stops consuming first. Queues and exchanges are
        deleted by name, without being declared first: one that exists with other arguments
        or of another type goes too. Works on a connection of its own, then closes the
        publishing connection, so that the next publish declares what it needs again (a
        kept publishing channel would publish to the deleted queue, and the broker would
        drop the message). The broker must answer within ``publish_timeout``, as for a
        publish.

        Raises:
            MessageBrokerUnavailableError: The broker cannot be reached, or did not answer
                within ``publish_timeout`` (some queues may be left: purge again).
        """
        await self.stop_consuming()
        subscriptions = self._subscriptions(consuming=False)

        async def delete(wait: _BrokerWait) -> None:
            before = cancellations()
            # Not the publishing connection: that one declares what publishing needs, which
            # the broker refuses for a queue that exists otherwise.
            own = await self._connect("purge")
            connection = own
            try:
                # aio-pika's connect may have swallowed the deadline's cancellation.
                raise_swallowed_cancellation(before)
                async with self._admin_channel(wait, connection) as channel:
                    for subscription in subscriptions:
                        retry_queues = [
                            subscription.retry_queue(ms) for ms in self._retry_delays_ms() if ms > 0
                        ]
                        queues = (
                            subscription.queue,
                            subscription.dead_letter_queue,
                            *retry_queues,
                        )
                        for queue in queues:
                            await channel.queue_delete(queue, if_unused=False, if_empty=False)
                            wait.progress()
                    await self._delete_exchanges(channel)
            finally:
                await _close_quietly(own)

        try:
            await self._within_publish_timeout(
                delete, "deleting the queues", "(was the link lost?); purge again"
            )
        finally:
            await self._close_publisher()


async def _letters_in(
    channel: AbstractChannel, subscription: Subscription, wait: _BrokerWait
) -> AsyncGenerator[aio_pika.abc.AbstractIncomingMessage, None]:
    """The letters in a subscription's dead-letter queue as it is opened, unacknowledged.

    Only as many as were there: while letters keep arriving, reading until the queue is empty
    would not end, holding every letter read unacknowledged. Each answer of the broker tells
    ``wait`` that it is alive.
    """
    queue = await channel.declare_queue(subscription.dead_letter_queue, durable=True)
    wait.progress()
    for _ in range(queue.declaration_result.message_count or 0):
        incoming = await queue.get(no_ack=False, fail=False)
        wait.progress()
        if incoming is None:
            return
        yield incoming


class _Consumers(NamedTuple):
    """A consumer connection and what the supervisor watches on it.

    ``lost`` is set when the connection or a channel drops, and when the broker cancels a
    consumer; ``cancelled`` holds the tags of those consumers.
    """

    connection: AbstractConnection
    lost: asyncio.Event
    channels: list[tuple[AbstractChannel, str]]
    cancelled: set[str]


async def _close_quietly(connection: AbstractConnection, *channels: AbstractChannel) -> None:
    """Close channels, then their connection, ignoring a broker that is already gone.

    Closing the channels first lets aio-pika finish their close callbacks before the
    connection goes, so no callback task is left pending when the event loop ends. The
    connection is closed even if closing a channel raised something else (which is then
    passed on): callers forget it, and its other channels would go on consuming, their
    messages left unacknowledged once a stop has them ignored.
    """
    try:
        await _close_channels_quietly(*channels)
    finally:
        with contextlib.suppress(*BROKER_ERRORS):
            await connection.close()


async def _close_channels_quietly(*channels: AbstractChannel) -> None:
    """Close channels one by one, ignoring a broker that is gone, in a bounded time.

    A channel waits for the broker to confirm its close, which a link that died silently
    never does: past ``_CHANNEL_CLOSE_TIMEOUT`` the rest is given up (closing their
    connection closes them). A task, awaited with ``asyncio.wait``: ``asyncio.wait_for``
    can lose a cancellation of the caller before Python 3.12.
    """
    if not channels:
        return

    async def close_all() -> None:
        for channel in channels:
            with contextlib.suppress(*BROKER_ERRORS):
                await channel.close()

    closing = asyncio.ensure_future(close_all())
    done: set[asyncio.Future[None]] = set()
    try:
        done, _ = await asyncio.wait([closing], timeout=_CHANNEL_CLOSE_TIMEOUT)
    finally:
        if not done:  # timed out, or the caller was cancelled
            closing.cancel()
            # What it ends with is nobody's: the caller goes on (or was cancelled itself).
            closing.add_done_callback(lambda task: task.cancelled() or task.exception())
    if done:
        closing.result()  # what closing raised besides broker errors is passed on


def _declaration_refused(error: BaseException) -> bool:
    """Whether the broker refused the consumers in a way only an operator can change.

    A queue or exchange that exists with other arguments or of another type lasts until
    someone deletes or changes it; a permission the user lacks (ACCESS_REFUSED), until
    someone grants it. Other PRECONDITION_FAILED replies (a vhost's queue limit reached)
    pass, and the consumers retry.
    """
    cause = error.__cause__
    return (
        isinstance(error, MessagingError)
        and cause is not None
        and (declared_otherwise(cause) or access_refused(cause))
    )


def _longer(delay: float) -> float:
    """The next back-off delay: doubled, from at least 50 ms, up to 30 s."""
    return min(max(delay, 0.05) * 2, 30.0)
