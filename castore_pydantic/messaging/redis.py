"""Redis Streams message queue and bus adapters: durable, at-least-once delivery.

Install the driver with ``pip install 'castore-pydantic[redis]'`` (redis-py, asyncio API).
The server must be Redis 6.2 or later (``XPENDING ... IDLE``, exclusive stream ranges).

A queue is one stream read by one consumer group: each message is handled by one of the
competing workers. A bus is one stream with one consumer group per listener: every listener
gets every message and filters it with its patterns. Each stream entry holds Castore's JSON
message in its ``body`` field and the replay flag in ``replay`` (``"0"`` / ``"1"``); a retried
entry also has ``attempt``. Keys (``castore:`` is ``key_prefix``; the braces make every key of
a channel live in one Redis Cluster slot)::

    castore:{queue:<id>}                          the queue's stream, group "workers"
    castore:{queue:<id>}:delayed                  retries waiting for their delay (sorted set)
    castore:{queue:<id>}:dead-letters             messages that failed every attempt
    castore:{bus:<id>}                            the bus's stream, one group per listener
    castore:{bus:<id>}:listener:<listener>:retry  that listener's due retries (a stream)
    castore:{bus:<id>}:listener:<listener>:delayed / :dead-letters

An entry is acknowledged (``XACK``) only after its handler returned, or after its retry copy
or dead letter was written in the same atomic step. Entries a consumer took and never
acknowledged (its process died, its task was cancelled, its connection dropped) are taken over
by another consumer, one at a time, once idle for ``reclaim_idle_ms``: a message is handled at
least once, sometimes more, so handlers should be idempotent (for example keyed on
``(event_store_id, aggregate_id, version)``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

try:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "castore_pydantic.messaging.redis needs redis-py; install it with: "
        "pip install 'castore-pydantic[redis]'"
    ) from exc

from castore_pydantic.messaging._channels import MessageChannel
from castore_pydantic.messaging._messages import (
    FilterPattern,
    Message,
    MessageContext,
    MessageHandler,
    listener_name,
    same_handler,
)
from castore_pydantic.messaging._redis_adapter import RedisStreamsAdapter
from castore_pydantic.messaging._redis_subscription import Route, Subscription, ensure_group
from castore_pydantic.messaging._redis_wire import positive
from castore_pydantic.messaging._routing import ListenerFilter, listened_pattern

if TYPE_CHECKING:
    from typing import Self

__all__ = ["RedisMessageBusAdapter", "RedisMessageQueueAdapter"]

logger = logging.getLogger("castore_pydantic.messaging.redis")

#: The consumer group of a queue's workers.
QUEUE_GROUP = "workers"


async def _no_worker(message: Message, context: MessageContext) -> None:
    raise RuntimeError("the queue adapter has no worker: set adapter.worker")


class RedisMessageQueueAdapter(RedisStreamsAdapter):
    """Carries a message queue through a Redis stream to competing workers.

    Every process (or adapter) that consumes the queue joins its consumer group ``workers``;
    each message is handled by one of them. A worker handles its messages one at a time, in
    stream order. A failing message is retried after
    ``retry_delay_in_ms * retry_backoff_rate ** (attempt - 1)`` ms, at the end of the queue, up
    to ``retry_attempts`` times; then it goes to the dead-letter stream with the error text and
    the number of attempts. Handled entries are deleted, so the stream holds what is waiting.

    Args:
        url: A ``redis://`` URL, or a ``redis.asyncio.Redis`` client (not closed by
            ``aclose``; it must not decode responses).
        worker: ``async def worker(message, context)``; may be set later.
        retry_attempts: Retries after the first attempt.
        retry_delay_in_ms: Delay before the first retry.
        retry_backoff_rate: Factor applied to the delay for each further retry.
        prefetch_count: How many entries a consumer reads at once (``XREADGROUP COUNT``).
        name: This consumer's name in the group (default: host, process id and a random
            suffix). A stable name makes a restarted process finish its own pending entries
            first; never give two running consumers the same name.
        key_prefix: Prefix of every key (default ``"castore:"``).
        reclaim_idle_ms: How long an entry may stay unacknowledged before another consumer
            takes it over; set it above your slowest handler's run time.
        block_ms: The longest a read waits for new entries before checking for due retries
            and abandoned entries; keep it below the client's socket timeout, if it has one.
        max_deliveries: How many times an entry left unacknowledged (its consumers keep
            dying on it) is taken over and handled again; the next takeover dead-letters
            it. A message that kills every worker handling it runs ``max_deliveries + 1``
            times: the first delivery is not counted, as its consumer may have died on
            another entry of its batch (nor is a run that a stop cut short and handed back).

    Raises:
        ValueError: An option is out of range (the message names it).
    """

    _kind: ClassVar[Literal["queue", "bus"]] = "queue"

    def __init__(
        self,
        url: str | Redis,
        *,
        worker: MessageHandler | None = None,
        retry_attempts: int = 2,
        retry_delay_in_ms: float = 30000,
        retry_backoff_rate: float = 2,
        prefetch_count: int = 100,
        name: str | None = None,
        key_prefix: str = "castore:",
        reclaim_idle_ms: int = 60_000,
        block_ms: int = 1000,
        max_deliveries: int = 10,
    ) -> None:
        super().__init__(
            url,
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
            prefetch_count=prefetch_count,
            name=name,
            key_prefix=key_prefix,
            reclaim_idle_ms=reclaim_idle_ms,
            block_ms=block_ms,
            max_deliveries=max_deliveries,
        )
        self.worker: MessageHandler | None = worker

    @classmethod
    def attach_to(
        cls,
        message_queue: MessageChannel[Any],
        url: str | Redis,
        *,
        worker: MessageHandler | None = None,
        **options: Any,
    ) -> Self:
        """Build an adapter and make it the queue's ``message_channel_adapter``.

        Args:
            message_queue: The queue to carry.
            url: A ``redis://`` URL or a ``redis.asyncio.Redis`` client.
            worker: The worker (may be set later with ``adapter.worker = ...``).
            **options: The constructor's other keyword options.

        Raises:
            TypeError: ``message_queue`` is a bus.
        """
        adapter = cls(url, worker=worker, **options)
        adapter._attach(message_queue)
        return adapter

    def _subscriptions(self) -> list[Subscription]:
        stream = self.stream_key
        return [
            Subscription(
                group=QUEUE_GROUP,
                streams=(stream,),
                owned=frozenset({stream}),
                # A queue keeps what was published before its first worker started.
                start_ids=("0",),
                retry_stream=stream,
                delayed=f"{stream}:delayed",
                dead=f"{stream}:dead-letters",
            )
        ]

    def _router(self, subscription: Subscription) -> Route:
        parse = self._channel().parse_message
        # The worker is looked up per message, so a new worker takes over from the next
        # message; without one a message fails (and is retried), it is never acknowledged
        # unhandled.
        return lambda body, replay: (self.worker or _no_worker, parse(body))

    async def start_consuming(self) -> None:
        """Start this process's worker on the queue (no-op if running).

        Raises:
            RuntimeError: No worker is set, the adapter is not attached, or a handler
                that stopped its own adapter calls this (restart from another task).
            MessageBrokerUnavailableError: Redis cannot be reached.
        """
        if self.worker is None:
            raise RuntimeError(
                "RedisMessageQueueAdapter has no worker: set adapter.worker (or pass "
                "worker=) before consuming"
            )
        await super().start_consuming()


class _Listener:
    __slots__ = ("filter", "handler", "listener_id")

    def __init__(self, listener_id: str, handler: MessageHandler) -> None:
        self.listener_id = listener_id
        self.handler = handler
        self.filter = ListenerFilter(())


class RedisMessageBusAdapter(RedisStreamsAdapter):
    """Carries a message bus through one Redis stream to every listener.

    Each listener (``on(pattern, handler, listener_id=...)``) has its own consumer group, named
    after its id, created when the adapter connects (or when ``on`` registers it on a
    connected adapter): it receives what is published from then on, kept for it while no
    consumer runs. Entries that match none of the listener's
    patterns, and replays when no pattern has ``on_replay=True``, are acknowledged without
    calling it. Retries and dead letters are per listener: a failing listener is retried
    alone, through its own retry stream. Several processes registering the same listener id
    share its work.

    Args:
        url: A ``redis://`` URL, or a ``redis.asyncio.Redis`` client (not closed by
            ``aclose``; it must not decode responses).
        max_length: Trim the bus stream to about this many entries on every publish
            (``XADD MAXLEN ~``; entries not yet read by a listener may be trimmed too).
        retry_attempts: Retries after the first attempt, per listener.
        retry_delay_in_ms: Delay before the first retry.
        retry_backoff_rate: Factor applied to the delay for each further retry.
        prefetch_count: How many entries a consumer reads at once (``XREADGROUP COUNT``).
        name: This consumer's name in each group (see ``RedisMessageQueueAdapter``).
        key_prefix: Prefix of every key (default ``"castore:"``).
        reclaim_idle_ms: How long an entry may stay unacknowledged before another consumer
            of the same listener takes it over.
        block_ms: The longest a read waits for new entries (below any socket timeout).
        max_deliveries: How many times an entry left unacknowledged is taken over and
            handled again before the next takeover dead-letters it (see the queue).

    Raises:
        ValueError: An option is out of range (the message names it).
    """

    _kind: ClassVar[Literal["queue", "bus"]] = "bus"

    def __init__(
        self,
        url: str | Redis,
        *,
        max_length: int | None = None,
        retry_attempts: int = 2,
        retry_delay_in_ms: float = 30000,
        retry_backoff_rate: float = 2,
        prefetch_count: int = 100,
        name: str | None = None,
        key_prefix: str = "castore:",
        reclaim_idle_ms: int = 60_000,
        block_ms: int = 1000,
        max_deliveries: int = 10,
    ) -> None:
        super().__init__(
            url,
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
            prefetch_count=prefetch_count,
            name=name,
            key_prefix=key_prefix,
            reclaim_idle_ms=reclaim_idle_ms,
            block_ms=block_ms,
            max_deliveries=max_deliveries,
        )
        self.max_length = None if max_length is None else positive("max_length", max_length)
        self._listeners: dict[str, _Listener] = {}

    @classmethod
    def attach_to(cls, message_bus: MessageChannel[Any], url: str | Redis, **options: Any) -> Self:
        """Build an adapter and make it the bus's ``message_channel_adapter``.

        Args:
            message_bus: The bus to carry.
            url: A ``redis://`` URL or a ``redis.asyncio.Redis`` client.
            **options: The constructor's keyword options.

        Raises:
            TypeError: ``message_bus`` is a queue.
        """
        adapter = cls(url, **options)
        adapter._attach(message_bus)
        return adapter

    @property
    def listener_ids(self) -> tuple[str, ...]:
        """The ids of the registered listeners, in registration order."""
        return tuple(self._listeners)

    def on(
        self,
        pattern: FilterPattern | Mapping[str, Any],
        handler: MessageHandler,
        *,
        listener_id: str | None = None,
    ) -> str:
        """Register a listener for the messages matching ``pattern``.

        Registering the same listener id again with the same handler adds the pattern (a
        message matching several is still handled once). Registered on a connected or
        consuming adapter, the listener exists at once: it gets what this adapter publishes
        from then on (and, while consuming, its consumer starts).

        Args:
            pattern: ``{"event_store_id": ..., "event_type": ..., "on_replay": ...}``, every
                key optional; ``{}`` matches every message that is not a replay.
            handler: ``async def handler(message, context)``.
            listener_id: The listener's durable id, its consumer group's name (default: the
                handler's qualified name).

        Returns:
            The listener id (as on every bus adapter).

        Raises:
            ValueError: An unknown pattern key, an empty id, or an id already used by
                another handler.
            TypeError: A pattern value of the wrong type.
            MessageChannelEventStoreNotFoundError: The pattern names an event store the
                attached bus does not carry.
            UnknownEventTypeError: The pattern names an event type its store does not
                declare.
            RuntimeError: Called on an event loop while the adapter is in use on another
                one that is still open.
        """
        checked = listened_pattern(pattern, self.message_channel)
        name = listener_name(handler, listener_id)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # registered before any loop runs: its group is created on connecting
        else:
            self._enter_loop()  # joining on a loop that closed since would fail
        listener = self._listeners.get(name)
        if listener is None:
            listener = self._listeners[name] = _Listener(name, handler)
            if self._connected or self._consuming:
                self._join_soon(listener)
        elif not same_handler(listener.handler, handler):
            raise ValueError(
                f"listener id {name!r} is already used by another handler; pass a distinct "
                "listener_id="
            )
        listener.filter = ListenerFilter([*listener.filter.patterns, checked])
        return name

    def _join_soon(self, listener: _Listener) -> None:
        """Create a listener's group now (and start its consumer if consuming).

        Publishing through this adapter waits for it, so the listener gets every message
        the adapter publishes after ``on`` returned. Without a running event loop the group
        is created when the adapter next connects.
        """
        if self.message_channel is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._join(self._subscription(listener)))
        self._joining.add(task)
        task.add_done_callback(self._joining.discard)

    async def _join(self, subscription: Subscription) -> None:
        """Create a late listener's consumer group, then start its consumer."""
        try:
            await ensure_group(self._redis(), subscription)
        except RedisError as exc:  # its consumer keeps trying
            logger.warning("could not create consumer group %s yet: %s", subscription.group, exc)
        if self._consuming:
            self._start_consumer(subscription)

    def _subscription(self, listener: _Listener) -> Subscription:
        stream = self.stream_key
        base = f"{stream}:listener:{listener.listener_id}"
        return Subscription(
            group=listener.listener_id,
            streams=(stream, f"{base}:retry"),
            owned=frozenset({f"{base}:retry"}),
            # A listener gets what is published once it exists (and everything retried).
            start_ids=("$", "0"),
            retry_stream=f"{base}:retry",
            delayed=f"{base}:delayed",
            dead=f"{base}:dead-letters",
            listener_id=listener.listener_id,
        )

    def _subscriptions(self) -> list[Subscription]:
        return [self._subscription(listener) for listener in self._listeners.values()]

    def _connects_to_publish(self) -> bool:
        # Listeners' groups start at the end of the stream: they must exist before this
        # message is appended, or they would miss it.
        return bool(self._listeners)

    def _router(self, subscription: Subscription) -> Route:
        assert subscription.listener_id is not None
        listener = self._listeners[subscription.listener_id]
        channel = self._channel()

        def route(body: bytes, replay: bool) -> tuple[MessageHandler, Message] | None:
            # Its filter is read for each entry: ``on`` may add patterns while consuming.
            message = listener.filter.select(body, replay, channel)
            return None if message is None else (listener.handler, message)

        return route

    def _max_length(self) -> int | None:
        return self.max_length
