"""RabbitMQ message queue and bus adapters (aio-pika), delivering at least once.

A **queue** is one durable queue, ``castore.queue.<channel id>``, fed through the default
exchange; competing workers share it. A **bus** is a durable topic exchange,
``castore.bus.<channel id>``; every listener gets its own durable queue,
``<exchange>.<listener id>``, bound with the routing keys of its filter patterns, so the
broker does the filtering. Routing keys are ``<live|replay>.<event store id>.<event type>``
with ``%``, ``.``, ``*`` and ``#`` percent-escaped in the ids, so a binding matches exactly.

Messages are published persistent, with publisher confirms; the body is exactly Castore's
JSON message and the replay flag travels in the ``replay`` header. A consumer acknowledges a
message only after its handler returned, or after it handed the message to a retry queue
(``<queue>.retry.<delay>ms``, whose TTL dead-letters it back to the consumed queue) or, once
the retry budget is spent, to the dead-letter queue ``<queue>.dead`` with the error text and
the attempt count in its headers.

Install the driver with ``pip install 'castore-pydantic[rabbitmq]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Self

try:
    import aio_pika
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "castore_pydantic.messaging.rabbitmq needs aio-pika: "
        "pip install 'castore-pydantic[rabbitmq]'"
    ) from exc
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from castore_pydantic.messaging._channels import MessageChannel
from castore_pydantic.messaging._messages import (
    FilterPattern,
    Message,
    MessageHandler,
    listener_name,
    same_handler,
)
from castore_pydantic.messaging._rabbitmq_adapter import RabbitMQAdapter
from castore_pydantic.messaging._rabbitmq_wire import (
    Subscription,
    binding_keys,
    check_name,
    name_part,
    routing_key,
)
from castore_pydantic.messaging._routing import listened_pattern

__all__ = [
    "RabbitMQMessageBusAdapter",
    "RabbitMQMessageQueueAdapter",
    "binding_keys",
    "routing_key",
]


class RabbitMQMessageQueueAdapter(RabbitMQAdapter):
    """A message queue on RabbitMQ: one durable queue, competing workers, at-least-once.

    Each message is handled by one worker. A message is acknowledged only after the worker
    returned, or after it was handed to a retry queue or the dead-letter queue; a worker that
    dies first gets it delivered again (to itself or another worker), so workers must be
    idempotent, e.g. deduplicate on ``(event_store_id, aggregate_id, version)``.

    Usually built with ``attach_to(queue, url, worker=...)``.

    It works on one event loop at a time: once the loop it was used on has closed (the next
    ``asyncio.run``, the next pytest-asyncio test), the next call connects anew on the
    running one. While that loop is still open (another thread's), calls from another loop
    raise ``RuntimeError``.

    Args:
        url: ``amqp://user:password@host:port/vhost``.
        worker: ``async def worker(message, context)``; may be set later.
        retry_attempts: Retries after the first failed attempt (``0``: dead-letter at once).
        retry_delay_in_ms: Delay before the first retry.
        retry_backoff_rate: Factor applied to the delay for each further retry.
        prefetch_count: Messages a consumer holds and handles concurrently (``1``: one at a
            time, in queue order).
        name: How this process shows in RabbitMQ's connection list (default: host and
            process id).
        name_prefix: Prefix of the queue names (default ``"castore."``).
        reconnect_delay: Seconds before consumers reconnect after losing their connection.
        connect_timeout: Seconds to wait for a connection.
        publish_timeout: Seconds a publish waits for the broker's confirmations (connecting
            included) before it raises ``MessageBrokerUnavailableError``.

    Raises:
        ValueError: An invalid option (the message names it).
    """

    _channel_type: ClassVar[str] = "queue"

    def __init__(
        self,
        url: str,
        *,
        worker: MessageHandler | None = None,
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
        super().__init__(
            url,
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
            prefetch_count=prefetch_count,
            name=name,
            name_prefix=name_prefix,
            reconnect_delay=reconnect_delay,
            connect_timeout=connect_timeout,
            publish_timeout=publish_timeout,
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
        """Build an adapter for ``queue`` and make it the queue's adapter.

        Args:
            queue: A message queue (``NotificationMessageQueue``, ...).
            url: The broker URL.
            worker: ``async def worker(message, context)``; may be set later.
            **options: The constructor's other options.

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
        """The function that handles each message; a new one takes over from the next.

        Removing it (``None``) while the adapter consumes, or starts or stops consuming,
        raises ``RuntimeError``: the messages delivered meanwhile would have no worker.
        """
        return self._worker

    @worker.setter
    def worker(self, worker: MessageHandler | None) -> None:
        if worker is None and self._consuming_or_starting():
            raise RuntimeError("stop consuming before removing the worker")
        self._worker = worker

    @property
    def queue_name(self) -> str:
        """The RabbitMQ queue: ``<name_prefix>queue.<channel id>``.

        Raises:
            RuntimeError: The adapter is not attached to a channel.
        """
        return self._base_name("queue")

    def _subscriptions(self, *, consuming: bool) -> list[Subscription]:
        if consuming and self._worker is None:
            raise RuntimeError("set adapter.worker = async_fn (or attach_to(..., worker=)) first")
        return [Subscription(queue=self.queue_name, handler=lambda: self._worker)]

    async def _declare_publishing(self, channel: AbstractChannel) -> None:
        await self._declare_subscription(channel, self._subscriptions(consuming=False)[0])

    async def _publish(
        self,
        channel: AbstractChannel,
        messages: Sequence[Message],
        *,
        replay: bool,
        progress: Callable[[], None],
    ) -> None:
        queue = self.queue_name
        bodies = [(message.model_dump_json().encode(), queue) for message in messages]
        await self._publish_all(channel, "", bodies, replay=replay, progress=progress)


class RabbitMQMessageBusAdapter(RabbitMQAdapter):
    """A message bus on RabbitMQ: a topic exchange, one durable queue per listener.

    ``on(pattern, handler)`` registers a listener. The broker routes each message to the
    queue of every listener whose patterns match, so each listener gets each message at
    least once; a failing listener is retried alone. Processes registering the same
    ``listener_id`` share its queue (competing consumers). A listener's queue exists from the
    first time an adapter with that listener connects: messages published before that are
    not kept for it.

    Usually built with ``attach_to(bus, url)``.

    It works on one event loop at a time: once the loop it was used on has closed (the next
    ``asyncio.run``, the next pytest-asyncio test), the next call connects anew on the
    running one. While that loop is still open (another thread's), calls from another loop
    raise ``RuntimeError``.

    Args:
        url: ``amqp://user:password@host:port/vhost``.
        retry_attempts: Retries after the first failed attempt (``0``: dead-letter at once).
        retry_delay_in_ms: Delay before the first retry.
        retry_backoff_rate: Factor applied to the delay for each further retry.
        prefetch_count: Messages a listener's consumer holds and handles concurrently.
        name: How this process shows in RabbitMQ's connection list (default: host and
            process id).
        name_prefix: Prefix of the exchange and queue names (default ``"castore."``).
        reconnect_delay: Seconds before consumers reconnect after losing their connection.
        connect_timeout: Seconds to wait for a connection.
        publish_timeout: Seconds a publish waits for the broker's confirmations (connecting
            included) before it raises ``MessageBrokerUnavailableError``.

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
        name_prefix: str = "castore.",
        reconnect_delay: float = 1.0,
        connect_timeout: float = 10.0,
        publish_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            url,
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
            prefetch_count=prefetch_count,
            name=name,
            name_prefix=name_prefix,
            reconnect_delay=reconnect_delay,
            connect_timeout=connect_timeout,
            publish_timeout=publish_timeout,
        )
        self._listeners: dict[str, tuple[MessageHandler, list[FilterPattern]]] = {}

    @classmethod
    def attach_to(cls, bus: MessageChannel[Any], url: str, **options: Any) -> Self:
        """Build an adapter for ``bus`` and make it the bus's adapter.

        Args:
            bus: A message bus (``NotificationMessageBus``, ...).
            url: The broker URL.
            **options: The constructor's options.

        Returns:
            The adapter.

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
        """The topic exchange: ``<name_prefix>bus.<channel id>``.

        Raises:
            RuntimeError: The adapter is not attached to a channel.
        """
        return self._base_name("exchange")

    @property
    def listener_ids(self) -> tuple[str, ...]:
        """The registered listeners' ids."""
        return tuple(self._listeners)

    def listener_queue(self, listener_id: str) -> str:
        """A listener's queue: ``<exchange>.<listener id>``."""
        return check_name("queue", f"{self.exchange_name}.{name_part(listener_id)}")

    def on(
        self,
        pattern: FilterPattern | Mapping[str, Any],
        handler: MessageHandler,
        *,
        listener_id: str | None = None,
    ) -> str:
        """Register a listener: ``handler`` receives the messages ``pattern`` matches.

        Registering the same listener again adds a pattern; a message matching several of
        its patterns is still delivered once.

        Args:
            pattern: ``{"event_store_id": ..., "event_type": ..., "on_replay": ...}``, every
                key optional (``{}``: everything but replays).
            handler: ``async def handler(message, context)``.
            listener_id: Names the listener's durable queue; default: the handler's qualified
                name (its class's, for a callable object). Keep it stable across restarts.

        Returns:
            The listener id (as on every bus adapter).

        Raises:
            ValueError: A bad pattern, or a listener id already used by another handler.
            MessageChannelEventStoreNotFoundError: The pattern names an event store the
                attached bus does not carry.
            UnknownEventTypeError: The pattern names an event type its store does not
                declare.
            RuntimeError: Called while the adapter consumes, or starts or stops consuming:
                its consumers are set when consuming starts, so the listener would not be
                consumed. Stop consuming first, or register listeners before starting.
        """
        checked = listened_pattern(pattern, self.message_channel)
        if self._consuming_or_starting():
            raise RuntimeError(
                "stop consuming before registering a listener: one registered while the "
                "adapter consumes (or starts to) would not be consumed"
            )
        listener_id = listener_name(handler, listener_id)
        registered, patterns = self._listeners.setdefault(listener_id, (handler, []))
        if not same_handler(registered, handler):
            raise ValueError(
                f"listener id {listener_id!r} is already used by another handler; "
                "pass a distinct listener_id="
            )
        if checked not in patterns:
            patterns.append(checked)
        return listener_id

    def _subscriptions(self, *, consuming: bool) -> list[Subscription]:
        if consuming and not self._listeners:
            raise RuntimeError("register a listener with adapter.on(pattern, handler) first")
        return [
            Subscription(
                queue=self.listener_queue(listener_id),
                handler=lambda handler=handler: handler,  # type: ignore[misc]
                listener_id=listener_id,
                patterns=patterns,
            )
            for listener_id, (handler, patterns) in self._listeners.items()
        ]

    async def _declare_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def _declare_publishing(self, channel: AbstractChannel) -> None:
        await self._declare_exchange(channel)
        for subscription in self._subscriptions(consuming=False):
            await self._declare_subscription(channel, subscription)

    async def _declare_subscription(
        self, channel: AbstractChannel, subscription: Subscription
    ) -> AbstractQueue:
        exchange = await self._declare_exchange(channel)
        queue = await super()._declare_subscription(channel, subscription)
        keys = {key for pattern in subscription.patterns for key in binding_keys(pattern)}
        for key in sorted(keys):
            await queue.bind(exchange, key)
        return queue

    async def _delete_exchanges(self, channel: AbstractChannel) -> None:
        await channel.exchange_delete(self.exchange_name)

    async def _publish(
        self,
        channel: AbstractChannel,
        messages: Sequence[Message],
        *,
        replay: bool,
        progress: Callable[[], None],
    ) -> None:
        bodies = [
            (message.model_dump_json().encode(), routing_key(message, replay=replay))
            for message in messages
        ]
        await self._publish_all(
            channel, self.exchange_name, bodies, replay=replay, progress=progress
        )
