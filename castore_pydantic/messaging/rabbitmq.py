"""RabbitMQ message queue and bus adapters (aio-pika), delivering at least once.

A **queue** is one durable queue (``castore.queue.<channel id>``) fed through the default
exchange; competing workers share it. A **bus** is a durable topic exchange
(``castore.bus.<channel id>``); every listener gets its own durable queue
(``<exchange>.<listener id>``) bound with the routing keys of its filter patterns, so the
broker does the filtering. Routing keys are ``<live|replay>.<event store id>.<event type>``
with ``%``, ``.``, ``*`` and ``#`` percent-escaped in the ids, so a binding matches exactly.

Messages are published persistent, with publisher confirms; the body is exactly Castore's
JSON message and the replay flag travels in the ``replay`` header. A consumer acknowledges a
message only after its handler succeeded, or after the message was handed to a retry queue
(``<queue>.retry.<delay>ms``: a queue whose TTL dead-letters back to the consumed queue) or,
once the retry budget is spent, to the dead-letter queue ``<queue>.dead`` with the error text
and the attempt count in its headers.

Install the driver with ``pip install 'castore-pydantic[rabbitmq]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, Self

try:
    import aio_pika
    import aiormq
    from aio_pika.abc import (
        AbstractChannel,
        AbstractConnection,
        AbstractExchange,
        AbstractIncomingMessage,
        AbstractQueue,
    )
    from yarl import URL
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "castore_pydantic.messaging.rabbitmq needs aio-pika: "
        "pip install 'castore-pydantic[rabbitmq]'"
    ) from exc

from castore_pydantic.errors import MessageBrokerUnavailableError, MessagingError
from castore_pydantic.messaging._channels import MessageChannel
from castore_pydantic.messaging._messages import (
    AggregateExistsMessage,
    DeadLetter,
    DeliveryGuarantee,
    FilterPattern,
    Message,
    MessageContext,
    MessageHandler,
    RetryPolicy,
    check_filter_pattern,
    matches,
)

__all__ = [
    "RabbitMQMessageBusAdapter",
    "RabbitMQMessageQueueAdapter",
    "binding_keys",
    "routing_key",
]

logger = logging.getLogger("castore_pydantic.messaging")

#: Header carrying the replay flag beside the body.
REPLAY_HEADER = "replay"
#: Header carrying the attempt number of a retried delivery (absent on the first one).
ATTEMPT_HEADER = "x-attempt"
#: Dead letters: the last error, as text.
ERROR_HEADER = "x-error"
#: Dead letters: how many times the message was handled.
ATTEMPTS_HEADER = "x-attempts"

_AGGREGATE_EXISTS_WORD = "__AGGREGATE_EXISTS__"  # a reserved type: no event can carry it
_ESCAPES = str.maketrans({"%": "%25", ".": "%2E", "*": "%2A", "#": "%23"})
_MAX_ERROR_LENGTH = 4000  # headers must fit in one AMQP frame
_MAX_ROUTING_KEY_BYTES = 255  # AMQP short strings: queue, exchange and routing-key names
_PERSISTENT = aio_pika.DeliveryMode.PERSISTENT

# Errors that mean "the broker cannot be reached now": retriable.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and TimeoutError
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)
# Connection errors that retrying will not fix: wrong credentials, vhost or protocol.
_MISCONFIGURED: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.IncompatibleProtocolError,
    aiormq.exceptions.ConnectionNotAllowed,
)
_BROKER_ERRORS: tuple[type[BaseException], ...] = (*_UNAVAILABLE, aiormq.exceptions.AMQPError)


def _word(value: str) -> str:
    """One routing-key word: ``%``, ``.``, ``*`` and ``#`` escaped; ``""`` becomes ``%``."""
    return value.translate(_ESCAPES) if value else "%"


def routing_key(message: Message, *, replay: bool = False) -> str:
    """The routing key a bus message is published with.

    ``live.<event store id>.<event type>`` (``replay.`` for replays), each id escaped so that
    dots and wildcards in ids cannot widen a binding; aggregate-exists messages use the
    reserved type ``__AGGREGATE_EXISTS__``.

    Raises:
        ValueError: The key is longer than AMQP's 255 bytes.
    """
    event_type = (
        _AGGREGATE_EXISTS_WORD
        if isinstance(message, AggregateExistsMessage)
        else _word(message.event.type)
    )
    key = f"{'replay' if replay else 'live'}.{_word(message.event_store_id)}.{event_type}"
    if len(key.encode()) > _MAX_ROUTING_KEY_BYTES:
        raise ValueError(
            f"routing key for event store {message.event_store_id!r} is longer than "
            f"{_MAX_ROUTING_KEY_BYTES} bytes; use shorter event store ids and event types"
        )
    return key


def binding_keys(pattern: FilterPattern) -> tuple[str, ...]:
    """The topic bindings that deliver exactly the messages a filter pattern matches.

    Follows Castore's rules: ``on_replay`` also binds ``replay.`` keys; a pattern with both
    ``event_store_id`` and ``event_type`` binds that store and type; ``event_store_id`` alone
    binds every type of the store; anything else (``{}``, or ``event_type`` alone) binds all.
    """
    prefix = "*" if pattern.get("on_replay", False) else "live"
    event_store_id = pattern.get("event_store_id")
    event_type = pattern.get("event_type")
    if event_store_id is not None and event_type is not None:
        return (f"{prefix}.{_word(event_store_id)}.{_word(event_type)}",)
    if event_store_id is not None:
        return (f"{prefix}.{_word(event_store_id)}.*",)
    return ("#",) if prefix == "*" else ("live.#",)


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:@#,/ ")
_MAX_NAME_LENGTH = {"queue": 255, "bus": 127}  # AMQP allows 255 chars, aio-pika 127 for exchanges


def _name_part(value: str) -> str:
    """Make an id usable in an AMQP name: other characters become ``+XX`` (UTF-8 bytes)."""
    if all(char in _NAME_CHARS for char in value):
        return value
    return "".join(
        char if char in _NAME_CHARS else "".join(f"+{byte:02X}" for byte in char.encode())
        for char in value
    )


def _check_name(kind: str, name: str) -> str:
    limit = _MAX_NAME_LENGTH.get(kind, 255)
    if (
        not name
        or len(name) > limit
        or name.startswith("amq.")
        or any(char not in _NAME_CHARS and char != "+" for char in name)
    ):
        raise ValueError(
            f"invalid RabbitMQ {'exchange' if kind == 'bus' else 'queue'} name {name!r}: use 1 "
            f"to {limit} letters, digits and -_.:@#,/+ (not starting with 'amq.')"
        )
    return name


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= _MAX_ERROR_LENGTH else text[: _MAX_ERROR_LENGTH - 3] + "..."


def _attempt_of(headers: Mapping[str, Any]) -> int:
    value = headers.get(ATTEMPT_HEADER, 1)
    return value if isinstance(value, int) and value >= 1 else 1


@dataclass(eq=False)
class _Subscription:
    """One consumed queue: the queue adapter's queue, or one bus listener's queue."""

    queue: str
    handler: Callable[[], MessageHandler | None]
    listener_id: str | None = None
    patterns: list[FilterPattern] = field(default_factory=list)

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dead"


class _RabbitMQAdapter:
    """What the queue and bus adapters share: connections, publishing, consuming, retries."""

    _channel_type: ClassVar[str]

    def __init__(
        self,
        url: str,
        *,
        retry_attempts: int = 2,
        retry_delay_in_ms: float = 30000,
        retry_backoff_rate: float = 2,
        prefetch_count: int = 32,
        name: str | None = None,
        reconnect_delay: float = 1.0,
        connect_timeout: float = 10.0,
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
        self._url = URL(url)
        if self._url.scheme not in ("amqp", "amqps"):
            raise ValueError(f"a RabbitMQ URL starts with amqp:// or amqps://, got {self.url!r}")
        self._name = None if name is None else _check_name(self._channel_type, name)
        self.prefetch_count = prefetch_count
        self.reconnect_delay = float(reconnect_delay)
        self.connect_timeout = float(connect_timeout)
        self.message_channel: MessageChannel[Any] | None = None
        self._publish_lock = asyncio.Lock()
        self._publisher: tuple[AbstractConnection, AbstractChannel] | None = None
        # Consuming state.
        self._supervisor: asyncio.Task[None] | None = None
        self._consumer_connection: AbstractConnection | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._connection_lost = asyncio.Event()
        self._stopping = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, name={self._base_name_or_none()!r})"

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
        """Whether consumers are running (between ``start_consuming`` and ``stop_consuming``)."""
        return self._supervisor is not None

    def _base_name_or_none(self) -> str | None:
        if self._name is not None:
            return self._name
        if self.message_channel is None:
            return None
        return _check_name(
            self._channel_type,
            f"castore.{self._channel_type}.{_name_part(self.message_channel.message_channel_id)}",
        )

    @property
    def name(self) -> str:
        """The queue (queue adapter) or exchange (bus adapter) name.

        ``name=`` if given, else ``castore.queue.<channel id>`` / ``castore.bus.<channel id>``.

        Raises:
            RuntimeError: Neither ``name=`` was given nor a channel attached.
        """
        name = self._base_name_or_none()
        if name is None:
            raise RuntimeError(
                f"{type(self).__name__} has no name: attach it to a channel with "
                f"{type(self).__name__}.attach_to(channel, url) or pass name="
            )
        return name

    def _retry_delays_ms(self) -> list[int]:
        policy = self._retry_policy
        return [
            round(policy.delay_for(attempt) * 1000)
            for attempt in range(1, policy.retry_attempts + 1)
        ]

    def _retry_target(self, subscription: _Subscription, attempt: int) -> str:
        """The queue a message whose ``attempt`` failed goes to; it comes back after the delay."""
        delay = round(self._retry_policy.delay_for(attempt) * 1000)
        return f"{subscription.queue}.retry.{delay}ms" if delay > 0 else subscription.queue

    # -- to be provided by the queue and bus adapters --------------------------------------

    def _subscriptions(self) -> list[_Subscription]:
        raise NotImplementedError

    async def _declare_publishing(self, channel: AbstractChannel) -> None:
        raise NotImplementedError

    async def _publish(
        self, channel: AbstractChannel, messages: Sequence[Message], *, replay: bool
    ) -> None:
        raise NotImplementedError

    # -- connections -----------------------------------------------------------------------

    def _unavailable(self, error: BaseException) -> NoReturn:
        if isinstance(error, _MISCONFIGURED):
            raise MessagingError(
                f"RabbitMQ at {self.url} refused the connection ({type(error).__name__}): "
                "check the user, password and vhost in the URL"
            ) from error
        if isinstance(error, _UNAVAILABLE):
            raise MessageBrokerUnavailableError(
                f"RabbitMQ at {self.url} is unavailable ({type(error).__name__}); "
                "retry when the broker is back"
            ) from error
        raise MessagingError(f"RabbitMQ at {self.url} failed: {_describe(error)}") from error

    async def _connect(self, role: str) -> AbstractConnection:
        try:
            return await aio_pika.connect(
                self._url,
                timeout=self.connect_timeout,
                client_properties={"connection_name": f"castore {role} {self.name}"},
            )
        except _BROKER_ERRORS as error:
            self._unavailable(error)

    async def connect(self) -> None:
        """Connect for publishing and declare this adapter's exchanges and queues.

        Publishing connects on first use too; connecting first surfaces a bad URL early and
        makes sure the queues exist before anything is published.

        Raises:
            MessageBrokerUnavailableError: The broker cannot be reached.
            MessagingError: The broker refused the credentials or a declaration.
        """
        await self._publishing_channel()

    async def _publishing_channel(self) -> AbstractChannel:
        publisher = self._publisher
        if publisher is not None and not publisher[1].is_closed:
            return publisher[1]
        async with self._publish_lock:
            publisher = self._publisher
            if publisher is not None and not publisher[1].is_closed:
                return publisher[1]
            await self._close_publisher()
            connection = await self._connect("publisher")
            try:
                channel = await connection.channel(publisher_confirms=True)
                await self._declare_publishing(channel)
            except _BROKER_ERRORS as error:
                await _close_quietly(connection)
                self._unavailable(error)
            except BaseException:
                await _close_quietly(connection)
                raise
            self._publisher = (connection, channel)
            return channel

    async def _close_publisher(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await _close_quietly(publisher[0])

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
            MessageBrokerUnavailableError: The broker cannot be reached or the connection
                dropped before the confirmation (the message may or may not be stored).
            MessagingError: The broker refused the message.
        """
        await self.publish_messages([message], replay=replay)

    async def publish_messages(self, messages: Sequence[Message], *, replay: bool = False) -> None:
        """Publish messages in order, pipelined, and wait until the broker confirmed them all.

        Raises:
            MessageBrokerUnavailableError: The broker cannot be reached or the connection
                dropped before every confirmation arrived (some may be stored).
            MessagingError: The broker refused a message.
        """
        if not messages:
            return
        channel = await self._publishing_channel()
        try:
            await self._publish(channel, messages, replay=replay)
        except _BROKER_ERRORS as error:
            self._unavailable(error)

    @staticmethod
    def _amqp_message(body: bytes, headers: dict[str, Any]) -> aio_pika.Message:
        return aio_pika.Message(
            body, headers=headers, content_type="application/json", delivery_mode=_PERSISTENT
        )

    @staticmethod
    async def _publish_all(
        exchange: AbstractExchange,
        bodies: Sequence[tuple[bytes, str]],
        headers: dict[str, Any],
    ) -> None:
        """Publish ``(body, routing key)`` pairs pipelined; raise the first failure."""
        if len(bodies) == 1:
            body, key = bodies[0]
            await exchange.publish(
                _RabbitMQAdapter._amqp_message(body, headers), key, mandatory=False
            )
            return
        results = await asyncio.gather(
            *(
                exchange.publish(
                    _RabbitMQAdapter._amqp_message(body, headers), key, mandatory=False
                )
                for body, key in bodies
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- consuming -------------------------------------------------------------------------

    async def start_consuming(self) -> None:
        """Start consumers in the background; return once they are registered.

        Handlers run concurrently, up to ``prefetch_count`` at a time. If the connection
        drops, consumers reconnect by themselves (unacknowledged messages are delivered again).

        Raises:
            RuntimeError: Already consuming, no handler, or no channel attached.
            MessageBrokerUnavailableError: The broker cannot be reached.
        """
        if self._supervisor is not None:
            raise RuntimeError(f"{self!r} is already consuming")
        if self.message_channel is None:
            raise RuntimeError(
                f"attach {type(self).__name__} to a channel with attach_to(...) before "
                "consuming: it validates messages with the channel"
            )
        subscriptions = self._subscriptions()
        self._stopping = False
        await self._open_consumers(subscriptions)
        self._supervisor = asyncio.create_task(self._supervise(subscriptions))

    async def _open_consumers(self, subscriptions: list[_Subscription]) -> None:
        connection = await self._connect("consumer")
        consumers: list[tuple[AbstractQueue, str]] = []
        lost = asyncio.Event()
        try:
            for subscription in subscriptions:
                channel = await connection.channel(publisher_confirms=True)
                await channel.set_qos(prefetch_count=self.prefetch_count)
                queue = await self._declare_subscription(channel, subscription)

                async def on_message(
                    incoming: AbstractIncomingMessage,
                    subscription: _Subscription = subscription,
                    channel: AbstractChannel = channel,
                ) -> None:
                    await self._on_message(subscription, channel, incoming)

                consumers.append((queue, await queue.consume(on_message)))
        except _BROKER_ERRORS as error:
            await _close_quietly(connection)
            self._unavailable(error)
        except BaseException:
            await _close_quietly(connection)
            raise
        connection.close_callbacks.add(lambda *_: lost.set())
        self._connection_lost = lost
        self._consumer_connection = connection
        self._consumers = consumers

    async def _supervise(self, subscriptions: list[_Subscription]) -> None:
        """Reconnect consumers whenever their connection drops, until stopped."""
        while True:
            await self._connection_lost.wait()
            if self._stopping:
                return
            logger.warning("%r lost its RabbitMQ connection; reconnecting", self)
            delay = self.reconnect_delay
            while not self._stopping:
                await asyncio.sleep(delay)  # back off between reconnection attempts
                try:
                    await self._open_consumers(subscriptions)
                except MessagingError as error:
                    logger.warning("%r could not reconnect: %s", self, error)
                    delay = min(max(delay, 0.05) * 2, 30.0)
                else:
                    logger.info("%r reconnected to RabbitMQ", self)
                    break

    async def stop_consuming(self, *, grace_period: float | None = None) -> None:
        """Stop consumers cleanly: no new deliveries, wait for running handlers, then close.

        Messages received but not handled yet are left unacknowledged, so the broker hands
        them to another consumer. Safe to call when not consuming.

        Args:
            grace_period: Seconds to wait for running handlers; then their channels close,
                cancelling them, and their messages are delivered again. ``None`` waits.
        """
        supervisor = self._supervisor
        if supervisor is None:
            return
        self._stopping = True
        try:
            for queue, consumer_tag in self._consumers:
                with contextlib.suppress(*_BROKER_ERRORS):
                    await queue.cancel(consumer_tag)
            try:
                await asyncio.wait_for(self._idle.wait(), grace_period)
            except TimeoutError:
                logger.warning(
                    "%r stopped with %d handler(s) still running; their messages will be "
                    "delivered again",
                    self,
                    self._in_flight,
                )
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
            connection, self._consumer_connection = self._consumer_connection, None
            if connection is not None:
                await _close_quietly(connection)
            self._consumers = []
            self._supervisor = None

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
        subscription: _Subscription,
        channel: AbstractChannel,
        incoming: AbstractIncomingMessage,
    ) -> None:
        if self._stopping:
            return  # left unacknowledged: the broker redelivers it once the channel closes
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._handle(subscription, channel, incoming)
        except asyncio.CancelledError:
            # Our handler task was cancelled (a closing channel, or someone else): give the
            # message back now rather than holding it until the channel closes.
            if not channel.is_closed:
                with contextlib.suppress(*_BROKER_ERRORS):
                    await asyncio.shield(incoming.nack(requeue=True))
            raise
        except _BROKER_ERRORS as error:
            # The link died while handling: the broker redelivers what was not acknowledged.
            logger.info("%r could not settle a message (%s); it will be redelivered", self, error)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _handle(
        self,
        subscription: _Subscription,
        channel: AbstractChannel,
        incoming: AbstractIncomingMessage,
    ) -> None:
        headers = incoming.headers or {}
        replay = headers.get(REPLAY_HEADER) is True
        attempt = _attempt_of(headers)
        assert self.message_channel is not None  # checked by start_consuming
        try:
            message = self.message_channel.parse_message(incoming.body)
        except Exception as error:
            # Retrying cannot fix a body that does not validate.
            await self._dead_letter(
                subscription, channel, incoming.body, replay=replay, attempt=attempt, error=error
            )
            await incoming.ack()
            return
        if subscription.patterns and not any(
            matches(pattern, message, replay) for pattern in subscription.patterns
        ):
            # Only a binding left over from an earlier run can route it here.
            await incoming.ack()
            return
        handler = subscription.handler()
        if handler is None:  # pragma: no cover - start_consuming checks it
            raise RuntimeError("no handler")
        retries_left = max(self._retry_policy.retry_attempts - attempt + 1, 0)
        context = MessageContext(attempt=attempt, retry_attempts_left=retries_left, replay=replay)
        try:
            await handler(message, context)
        except Exception as error:
            if retries_left > 0:
                await self._retry(
                    subscription,
                    channel,
                    incoming.body,
                    replay=replay,
                    attempt=attempt,
                    error=error,
                )
            else:
                await self._dead_letter(
                    subscription,
                    channel,
                    incoming.body,
                    replay=replay,
                    attempt=attempt,
                    error=error,
                )
        await incoming.ack()

    async def _retry(
        self,
        subscription: _Subscription,
        channel: AbstractChannel,
        body: bytes,
        *,
        replay: bool,
        attempt: int,
        error: Exception,
    ) -> None:
        target = self._retry_target(subscription, attempt)
        logger.warning(
            "%r: handler failed on attempt %d (%s); retrying in %.3f s",
            self,
            attempt,
            _describe(error),
            self._retry_policy.delay_for(attempt),
        )
        headers = {REPLAY_HEADER: replay, ATTEMPT_HEADER: attempt + 1}
        await channel.default_exchange.publish(
            self._amqp_message(body, headers), target, mandatory=False
        )

    async def _dead_letter(
        self,
        subscription: _Subscription,
        channel: AbstractChannel,
        body: bytes,
        *,
        replay: bool,
        attempt: int,
        error: Exception,
    ) -> None:
        description = _describe(error)
        headers = {REPLAY_HEADER: replay, ERROR_HEADER: description, ATTEMPTS_HEADER: attempt}
        await channel.default_exchange.publish(
            self._amqp_message(body, headers), subscription.dead_letter_queue, mandatory=False
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
        self, channel: AbstractChannel, subscription: _Subscription
    ) -> AbstractQueue:
        """Declare a consumed queue, its retry queues and its dead-letter queue."""
        queue = await channel.declare_queue(subscription.queue, durable=True)
        await channel.declare_queue(subscription.dead_letter_queue, durable=True)
        for delay in sorted(set(self._retry_delays_ms())):
            if delay > 0:
                await channel.declare_queue(
                    f"{subscription.queue}.retry.{delay}ms",
                    durable=True,
                    arguments={
                        "x-message-ttl": delay,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": subscription.queue,
                    },
                )
        return queue

    def _owned_queues(self, subscription: _Subscription) -> list[str]:
        retry = [
            f"{subscription.queue}.retry.{delay}ms"
            for delay in sorted(set(self._retry_delays_ms()))
            if delay > 0
        ]
        return [subscription.queue, subscription.dead_letter_queue, *retry]

    @contextlib.asynccontextmanager
    async def _admin_channel(self) -> AsyncIterator[AbstractChannel]:
        """A short-lived channel on the publishing connection, for dead letters and purge."""
        await self._publishing_channel()
        assert self._publisher is not None
        try:
            channel = await self._publisher[0].channel(publisher_confirms=True)
        except _BROKER_ERRORS as error:
            self._unavailable(error)
        try:
            yield channel
        except _BROKER_ERRORS as error:
            self._unavailable(error)
        finally:
            with contextlib.suppress(*_BROKER_ERRORS):
                await channel.close()

    # -- dead letters ----------------------------------------------------------------------

    async def dead_letters(self) -> list[DeadLetter]:
        """The messages kept in the dead-letter queue(s), oldest first; they stay there.

        A body that no longer validates is left out (and logged); inspect it with any AMQP
        tool in ``<queue>.dead``.

        Raises:
            MessageBrokerUnavailableError: The broker cannot be reached.
        """
        message_channel = self._require_channel()
        letters: list[DeadLetter] = []
        for subscription in self._subscriptions_for_admin():
            # Read without acknowledging; closing the channel puts them all back, in order.
            async with self._admin_channel() as channel:
                queue = await channel.declare_queue(subscription.dead_letter_queue, durable=True)
                while (incoming := await queue.get(no_ack=False, fail=False)) is not None:
                    headers = incoming.headers or {}
                    try:
                        message = message_channel.parse_message(incoming.body)
                    except Exception as error:
                        logger.warning(
                            "%r: dead letter in %s does not validate: %s",
                            self,
                            subscription.dead_letter_queue,
                            _describe(error),
                        )
                        continue
                    attempts = headers.get(ATTEMPTS_HEADER, 1)
                    letters.append(
                        DeadLetter(
                            message=message,
                            error=str(headers.get(ERROR_HEADER, "")),
                            attempts=attempts if isinstance(attempts, int) else 1,
                            replay=headers.get(REPLAY_HEADER) is True,
                            listener_id=subscription.listener_id,
                        )
                    )
        return letters

    async def republish_dead_letters(self) -> int:
        """Send every dead letter back for processing (attempt 1) and remove it.

        Bus dead letters go back to the listener that failed only. Letters dead-lettered
        again while this runs stay for the next call.

        Returns:
            How many messages were sent back.

        Raises:
            MessageBrokerUnavailableError: The broker cannot be reached (letters not yet
                sent back stay in the dead-letter queue).
        """
        count = 0
        for subscription in self._subscriptions_for_admin():
            async with self._admin_channel() as channel:
                queue = await channel.declare_queue(subscription.dead_letter_queue, durable=True)
                await channel.declare_queue(subscription.queue, durable=True)
                pending = queue.declaration_result.message_count or 0
                for _ in range(pending):
                    incoming = await queue.get(no_ack=False, fail=False)
                    if incoming is None:
                        break
                    replay = (incoming.headers or {}).get(REPLAY_HEADER) is True
                    await channel.default_exchange.publish(
                        self._amqp_message(incoming.body, {REPLAY_HEADER: replay}),
                        subscription.queue,
                        mandatory=False,
                    )
                    await incoming.ack()
                    count += 1
        return count

    async def purge(self) -> None:
        """Delete every queue and exchange this adapter declares, with their messages.

        Meant for tests and teardown; stops consuming first.

        Raises:
            MessageBrokerUnavailableError: The broker cannot be reached.
        """
        await self.stop_consuming()
        async with self._admin_channel() as channel:
            for subscription in self._subscriptions_for_admin():
                for queue in self._owned_queues(subscription):
                    await channel.queue_delete(queue, if_unused=False, if_empty=False)
            await self._delete_exchanges(channel)

    async def _delete_exchanges(self, channel: AbstractChannel) -> None:
        """Delete the adapter's exchanges (the bus has one)."""

    def _subscriptions_for_admin(self) -> list[_Subscription]:
        return self._subscriptions()

    def _require_channel(self) -> MessageChannel[Any]:
        if self.message_channel is None:
            raise RuntimeError(
                f"attach {type(self).__name__} to a channel with attach_to(...) first: "
                "it validates messages with the channel"
            )
        return self.message_channel


async def _close_quietly(connection: AbstractConnection) -> None:
    with contextlib.suppress(*_BROKER_ERRORS):
        await connection.close()


class RabbitMQMessageQueueAdapter(_RabbitMQAdapter):
    """A message queue on RabbitMQ: one durable queue, competing workers, at-least-once.

    Each message is handled by one worker. A message is acknowledged only after the worker
    returned, or after it was handed to a retry queue or the dead-letter queue; a worker that
    dies first gets it delivered again (to itself or another worker), so workers must be
    idempotent (e.g. deduplicate on ``(event_store_id, aggregate_id, version)``).

    Args:
        url: ``amqp://user:password@host:port/vhost``.
        retry_attempts: Retries after the first failed attempt (``0``: dead-letter at once).
        retry_delay_in_ms: Delay before the first retry.
        retry_backoff_rate: Factor applied to the delay for each further retry.
        prefetch_count: Messages a consumer holds and handles concurrently (``1`` handles
            them one at a time, in order).
        name: The queue name; default ``castore.queue.<channel id>``.
        reconnect_delay: Seconds before a consumer reconnects after losing its connection.
        connect_timeout: Seconds to wait for a connection.

    Raises:
        ValueError: An invalid option (the message names it).
    """

    _channel_type: ClassVar[str] = "queue"

    def __init__(
        self,
        url: str,
        *,
        retry_attempts: int = 2,
        retry_delay_in_ms: float = 30000,
        retry_backoff_rate: float = 2,
        prefetch_count: int = 32,
        name: str | None = None,
        reconnect_delay: float = 1.0,
        connect_timeout: float = 10.0,
        worker: MessageHandler | None = None,
    ) -> None:
        super().__init__(
            url,
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
            prefetch_count=prefetch_count,
            name=name,
            reconnect_delay=reconnect_delay,
            connect_timeout=connect_timeout,
        )
        self._worker = worker

    @classmethod
    def attach_to(
        cls,
        queue: MessageChannel[Any],
        url: str,
        *,
        worker: MessageHandler | None = None,
        **options: Any,
    ) -> Self:
        """Build an adapter for ``queue`` and set it as the queue's adapter.

        Args:
            queue: A message queue (``NotificationMessageQueue``, ...).
            url: The broker URL.
            worker: ``async def worker(message, context)``; settable later.
            **options: The constructor's options.

        Returns:
            The adapter.

        Raises:
            TypeError: ``queue`` is a bus.
        """
        if queue.message_channel_type != "queue":
            raise TypeError(f"{cls.__name__} carries queues; use RabbitMQMessageBusAdapter")
        adapter = cls(url, worker=worker, **options)
        adapter.message_channel = queue
        queue.message_channel_adapter = adapter
        return adapter

    @property
    def worker(self) -> MessageHandler | None:
        """The function that handles each message; setting a new one takes over at once."""
        return self._worker

    @worker.setter
    def worker(self, worker: MessageHandler | None) -> None:
        if worker is None and self.is_consuming:
            raise RuntimeError("stop consuming before removing the worker")
        self._worker = worker

    @property
    def queue_name(self) -> str:
        """The name of the RabbitMQ queue."""
        return self.name

    def _subscriptions(self) -> list[_Subscription]:
        if self._worker is None:
            raise RuntimeError("set adapter.worker = async_fn (or attach_to(..., worker=)) first")
        return self._subscriptions_for_admin()

    def _subscriptions_for_admin(self) -> list[_Subscription]:
        return [_Subscription(queue=self.name, handler=lambda: self._worker)]

    async def _declare_publishing(self, channel: AbstractChannel) -> None:
        await self._declare_subscription(channel, self._subscriptions_for_admin()[0])

    async def _publish(
        self, channel: AbstractChannel, messages: Sequence[Message], *, replay: bool
    ) -> None:
        queue = self.name
        bodies = [(message.model_dump_json().encode(), queue) for message in messages]
        await self._publish_all(channel.default_exchange, bodies, {REPLAY_HEADER: replay})


class RabbitMQMessageBusAdapter(_RabbitMQAdapter):
    """A message bus on RabbitMQ: a topic exchange, one durable queue per listener.

    ``on(pattern, handler)`` registers a listener. The broker routes each message to the
    queue of every listener whose patterns match, so each listener sees each message at
    least once; a failing listener is retried alone. Several processes registering the same
    ``listener_id`` share its queue (competing consumers).

    Args:
        url: ``amqp://user:password@host:port/vhost``.
        retry_attempts: Retries after the first failed attempt (``0``: dead-letter at once).
        retry_delay_in_ms: Delay before the first retry.
        retry_backoff_rate: Factor applied to the delay for each further retry.
        prefetch_count: Messages a listener's consumer holds and handles concurrently.
        name: The exchange name; default ``castore.bus.<channel id>``.
        reconnect_delay: Seconds before consumers reconnect after losing their connection.
        connect_timeout: Seconds to wait for a connection.

    Raises:
        ValueError: An invalid option (the message names it).
    """

    _channel_type: ClassVar[str] = "bus"

    def __init__(
        self,
        url: str,
        *,
        retry_attempts: int = 2,
        retry_delay_in_ms: float = 30000,
        retry_backoff_rate: float = 2,
        prefetch_count: int = 32,
        name: str | None = None,
        reconnect_delay: float = 1.0,
        connect_timeout: float = 10.0,
    ) -> None:
        super().__init__(
            url,
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
            prefetch_count=prefetch_count,
            name=name,
            reconnect_delay=reconnect_delay,
            connect_timeout=connect_timeout,
        )
        self._listeners: dict[str, tuple[MessageHandler, list[FilterPattern]]] = {}
        self._exchange: tuple[AbstractChannel, AbstractExchange] | None = None

    @classmethod
    def attach_to(cls, bus: MessageChannel[Any], url: str, **options: Any) -> Self:
        """Build an adapter for ``bus`` and set it as the bus's adapter.

        Raises:
            TypeError: ``bus`` is a queue.
        """
        if bus.message_channel_type != "bus":
            raise TypeError(f"{cls.__name__} carries buses; use RabbitMQMessageQueueAdapter")
        adapter = cls(url, **options)
        adapter.message_channel = bus
        bus.message_channel_adapter = adapter
        return adapter

    @property
    def exchange_name(self) -> str:
        """The name of the topic exchange."""
        return self.name

    @property
    def listener_ids(self) -> tuple[str, ...]:
        """The registered listeners' ids."""
        return tuple(self._listeners)

    def listener_queue(self, listener_id: str) -> str:
        """The name of a listener's queue: ``<exchange>.<listener id>``."""
        return _check_name("queue", f"{self.name}.{_name_part(listener_id)}")

    def on(
        self,
        pattern: FilterPattern | Mapping[str, Any],
        handler: MessageHandler,
        *,
        listener_id: str | None = None,
    ) -> str:
        """Register a listener: ``handler`` receives the messages ``pattern`` matches.

        Registering the same handler (or listener id) again adds a pattern; a message
        matching several of its patterns is still delivered once.

        Args:
            pattern: ``{"event_store_id": ..., "event_type": ..., "on_replay": ...}``, every
                key optional (``{}``: everything but replays).
            handler: ``async def handler(message, context)``.
            listener_id: Names the listener's durable queue; default
                ``handler.__qualname__``. Keep it stable across restarts.

        Returns:
            The listener id.

        Raises:
            ValueError: A bad pattern, or a listener id already used by another handler.
            RuntimeError: Called while consuming.
        """
        checked = check_filter_pattern(pattern)
        if self.is_consuming:
            raise RuntimeError("register listeners before start_consuming()")
        if listener_id is None:
            listener_id = getattr(handler, "__qualname__", None)
            if not isinstance(listener_id, str):
                raise ValueError("pass listener_id=: the handler has no __qualname__")
        registered, patterns = self._listeners.setdefault(listener_id, (handler, []))
        if registered is not handler:
            raise ValueError(
                f"listener id {listener_id!r} is already used by another handler; "
                "pass a distinct listener_id="
            )
        if checked not in patterns:
            patterns.append(checked)
        return listener_id

    def _subscriptions(self) -> list[_Subscription]:
        if not self._listeners:
            raise RuntimeError("register a listener with adapter.on(pattern, handler) first")
        return self._subscriptions_for_admin()

    def _subscriptions_for_admin(self) -> list[_Subscription]:
        return [
            _Subscription(
                queue=self.listener_queue(listener_id),
                handler=lambda handler=handler: handler,  # type: ignore[misc]
                listener_id=listener_id,
                patterns=patterns,
            )
            for listener_id, (handler, patterns) in self._listeners.items()
        ]

    async def _declare_publishing(self, channel: AbstractChannel) -> None:
        await channel.declare_exchange(self.name, aio_pika.ExchangeType.TOPIC, durable=True)
        for listener in self._subscriptions_for_admin():
            await self._declare_subscription(channel, listener)

    async def _declare_subscription(
        self, channel: AbstractChannel, subscription: _Subscription
    ) -> AbstractQueue:
        exchange = await channel.declare_exchange(
            self.name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await super()._declare_subscription(channel, subscription)
        keys = {key for pattern in subscription.patterns for key in binding_keys(pattern)}
        for key in sorted(keys):
            await queue.bind(exchange, key)
        return queue

    async def _delete_exchanges(self, channel: AbstractChannel) -> None:
        await channel.exchange_delete(self.name)

    async def _publish(
        self, channel: AbstractChannel, messages: Sequence[Message], *, replay: bool
    ) -> None:
        if self._exchange is None or self._exchange[0] is not channel:
            self._exchange = (channel, await channel.get_exchange(self.name, ensure=False))
        exchange = self._exchange[1]
        bodies = [
            (message.model_dump_json().encode(), routing_key(message, replay=replay))
            for message in messages
        ]
        await self._publish_all(exchange, bodies, {REPLAY_HEADER: replay})
