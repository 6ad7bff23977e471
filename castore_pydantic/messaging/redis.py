"""Redis Streams message queue and bus adapters: durable, at-least-once delivery.

Install the driver with ``pip install 'castore-pydantic[redis]'`` (redis-py, asyncio API).

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
by another consumer with ``XAUTOCLAIM`` once idle for ``reclaim_idle_ms``: a message is
handled at least once, sometimes more, so handlers should be idempotent (for example keyed on
``(event_store_id, aggregate_id, version)``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

try:
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "castore_pydantic.messaging.redis needs redis-py; install it with: "
        "pip install 'castore-pydantic[redis]'"
    ) from exc

from pydantic import BaseModel

from castore_pydantic.errors import MessageBrokerUnavailableError, MessagingError
from castore_pydantic.messaging._channels import MessageChannel
from castore_pydantic.messaging._messages import (
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
from castore_pydantic.messaging._redis_consumer import (
    ConsumerOptions,
    StreamConsumer,
    Subscription,
    ensure_group,
)

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = ["RedisMessageBusAdapter", "RedisMessageQueueAdapter"]

logger = logging.getLogger("castore_pydantic.messaging.redis")

#: The consumer group of a queue's workers.
QUEUE_GROUP = "workers"
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_READ_CHUNK = 500


def _redact(url: str) -> str:
    """The URL with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class _RedisStreamsAdapter:
    """What the Redis queue and bus adapters share: connection, publishing, consumers."""

    _kind: ClassVar[Literal["queue", "bus"]]

    def __init__(
        self,
        url: str | Redis,
        *,
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
        self.retry_policy = RetryPolicy(retry_attempts, retry_delay_in_ms, retry_backoff_rate)
        self._options = ConsumerOptions(
            prefetch_count=_positive("prefetch_count", prefetch_count),
            block_ms=_positive("block_ms", block_ms),
            reclaim_idle_ms=_positive("reclaim_idle_ms", reclaim_idle_ms),
            max_deliveries=_positive("max_deliveries", max_deliveries),
        )
        if not isinstance(key_prefix, str):
            raise TypeError(f"key_prefix must be a string, got {key_prefix!r}")
        self.key_prefix = key_prefix
        if isinstance(url, str):
            self._url: str | None = url
            self._client: Redis | None = None
            self._owns_client = True
        elif isinstance(url, Redis):
            if url.connection_pool.connection_kwargs.get("decode_responses"):
                raise ValueError("pass a Redis client with decode_responses=False")
            self._url = None
            self._client = url
            self._owns_client = False
        else:
            raise TypeError(f"url must be a redis:// URL or a redis.asyncio.Redis, got {url!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError("name must be a non-empty string")
        self.consumer_name = name or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.message_channel: MessageChannel[Any] | None = None
        self._consumers: list[StreamConsumer] = []
        self._consuming = False
        # Listeners registered while consuming, whose consumer groups are being created.
        self._joining: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        where = _redact(self._url) if self._url is not None else repr(self._client)
        channel = self.message_channel.message_channel_id if self.message_channel else None
        return f"{type(self).__name__}({where!r}, {self._kind}={channel!r})"

    @property
    def delivery_guarantee(self) -> DeliveryGuarantee:
        """``"at-least-once"``: a published message is handled, possibly more than once."""
        return "at-least-once"

    @property
    def stream_key(self) -> str:
        """The Redis key of the channel's stream (``castore:{queue:<id>}``).

        Raises:
            RuntimeError: The adapter is not attached to a channel.
        """
        channel = self._channel()
        return f"{self.key_prefix}{{{self._kind}:{channel.message_channel_id}}}"

    def _channel(self) -> MessageChannel[Any]:
        if self.message_channel is None:
            name = type(self).__name__
            raise RuntimeError(
                f"{name} is not attached to a message {self._kind}: create it with "
                f"{name}.attach_to({self._kind}, url)"
            )
        return self.message_channel

    def _attach(self, channel: MessageChannel[Any]) -> None:
        if channel.message_channel_type != self._kind:
            raise TypeError(
                f"{type(self).__name__} carries a message {self._kind}, not a "
                f"{channel.message_channel_type} ({channel!r})"
            )
        channel.message_channel_adapter = self
        self.message_channel = channel

    # -- connection ------------------------------------------------------------------------

    def _redis(self) -> Redis:
        if self._client is None:
            assert self._url is not None
            client_name = re.sub(r"[^!-~]", "_", f"castore:{self.consumer_name}")
            self._client = Redis.from_url(
                self._url,
                decode_responses=False,
                client_name=client_name,
                # A pooled connection the server closed (restart, idle timeout, CLIENT KILL)
                # fails on its next use: retry on a fresh one before reporting an outage.
                retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.5), retries=3),
            )
        return self._client

    def _broker_error(self, action: str, exc: RedisError) -> MessagingError:
        where = _redact(self._url) if self._url is not None else "Redis"
        text = str(exc)
        password = urlsplit(self._url).password if self._url is not None else None
        if password:
            text = text.replace(password, "***")
        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            return MessageBrokerUnavailableError(
                f"Redis at {where} is unavailable, could not {action}: {text}"
            )
        return MessagingError(f"Redis at {where} failed to {action}: {text}")

    def _subscriptions(self) -> list[Subscription]:
        raise NotImplementedError

    async def connect(self) -> None:
        """Check that Redis answers and create the consumer groups this adapter reads.

        ``async with adapter:`` calls it; publishing and consuming also connect on first use.

        Raises:
            MessageBrokerUnavailableError: Redis cannot be reached.
            MessagingError: Redis refused a command.
        """
        client = self._redis()
        try:
            await client.ping()
            if self.message_channel is not None:
                for subscription in self._subscriptions():
                    await ensure_group(client, subscription)
        except RedisError as exc:
            raise self._broker_error("connect", exc) from exc

    async def aclose(self) -> None:
        """Stop consuming and close the connections this adapter opened; idempotent."""
        await self.stop_consuming()
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            await client.aclose()
        elif client is not None:
            self._client = client  # not ours to close

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- publishing ------------------------------------------------------------------------

    def _fields(self, message: Message | Mapping[str, Any], replay: bool) -> dict[Any, Any]:
        model: BaseModel = (
            message if isinstance(message, BaseModel) else self._channel().parse_message(message)
        )
        return {"body": model.model_dump_json(), "replay": "1" if replay else "0"}

    def _max_length(self) -> int | None:
        return None

    async def _joined(self) -> None:
        """Let listeners registered while consuming finish joining before publishing more."""
        if self._joining:
            await asyncio.wait(list(self._joining))

    async def publish_message(self, message: Message, *, replay: bool = False) -> None:
        """Append one message to the channel's stream.

        Args:
            message: The message (its JSON form is the entry's ``body``).
            replay: Mark it as a replay (the entry's ``replay`` field).

        Raises:
            MessageBrokerUnavailableError: Redis cannot be reached (retriable).
            MessagingError: Redis refused the command.
            RuntimeError: The adapter is not attached to a channel.
        """
        stream = self.stream_key
        fields = self._fields(message, replay)
        await self._joined()
        try:
            await self._redis().xadd(stream, fields, maxlen=self._max_length())
        except RedisError as exc:
            raise self._broker_error(f"publish to {stream}", exc) from exc

    async def publish_messages(self, messages: Sequence[Message], *, replay: bool = False) -> None:
        """Append several messages in order, in one ``MULTI``: all of them or none.

        Raises:
            MessageBrokerUnavailableError: Redis cannot be reached (nothing was appended).
            MessagingError: Redis refused a command.
        """
        if not messages:
            return
        stream = self.stream_key
        batch = [self._fields(message, replay) for message in messages]
        max_length = self._max_length()
        await self._joined()
        try:
            async with self._redis().pipeline(transaction=True) as pipe:
                for fields in batch:
                    pipe.xadd(stream, fields, maxlen=max_length)
                await pipe.execute()
        except RedisError as exc:
            raise self._broker_error(f"publish to {stream}", exc) from exc

    # -- consuming -------------------------------------------------------------------------

    @property
    def consuming_now(self) -> bool:
        """Whether consumers are running (between ``start_consuming`` and ``stop_consuming``)."""
        return self._consuming

    @asynccontextmanager
    async def consuming(self) -> AsyncIterator[Self]:
        """Run consumers inside the block; leaving it stops them cleanly (``stop_consuming``)."""
        await self.start_consuming()
        try:
            yield self
        finally:
            await self.stop_consuming()

    async def start_consuming(self) -> None:
        """Start one consumer per consumer group in background tasks (no-op if running).

        Raises:
            MessageBrokerUnavailableError: Redis cannot be reached.
        """
        if self._consuming:
            return
        await self.connect()
        self._consuming = True
        for subscription in self._subscriptions():
            self._start_consumer(subscription)

    def _start_consumer(self, subscription: Subscription) -> None:
        consumer = StreamConsumer(
            self._redis(),
            subscription,
            consumer_name=self.consumer_name,
            parse=self._channel().parse_message,
            route=self._router(subscription),
            retry_policy=self.retry_policy,
            options=self._options,
        )
        self._consumers.append(consumer)
        consumer.start().add_done_callback(_report_crash)

    def _router(self, subscription: Subscription) -> Any:
        raise NotImplementedError

    async def stop_consuming(self) -> None:
        """Stop the consumers: wait for the handlers in flight, acknowledge what they did.

        Entries already read but not started stay pending and are released at once, so
        other consumers take them over without waiting for ``reclaim_idle_ms``.
        """
        self._consuming = False
        if self._joining:
            await asyncio.wait(list(self._joining))
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            consumer.request_stop()
        tasks = [consumer.task for consumer in consumers if consumer.task is not None]
        if tasks:
            # asyncio.wait does not raise the tasks' errors (a killed worker's cancellation).
            await asyncio.wait(tasks)

    # -- dead letters and housekeeping -----------------------------------------------------

    async def _read_stream(self, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        client = self._redis()
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        start: Any = "-"
        while True:
            chunk: Any = await client.xrange(key, min=start, count=_READ_CHUNK)
            entries.extend(chunk)
            if len(chunk) < _READ_CHUNK:
                return entries
            start = b"(" + chunk[-1][0]

    async def dead_letters(self) -> list[DeadLetter]:
        """The messages whose handling failed on every attempt, oldest first per group.

        A dead letter whose body no longer validates (for example an event type the store
        dropped) is left in its stream and reported in the log instead.

        Raises:
            MessageBrokerUnavailableError: Redis cannot be reached.
        """
        channel = self._channel()
        letters: list[DeadLetter] = []
        try:
            for subscription in self._subscriptions():
                for entry_id, fields in await self._read_stream(subscription.dead):
                    try:
                        message = channel.parse_message(fields.get(b"body", b""))
                    except Exception as exc:
                        logger.warning(
                            "dead letter %s in %s does not validate: %s",
                            entry_id.decode(),
                            subscription.dead,
                            exc,
                        )
                        continue
                    letters.append(
                        DeadLetter(
                            message,
                            fields.get(b"error", b"").decode(errors="replace"),
                            int(fields.get(b"attempts", b"0")),
                            fields.get(b"replay") == b"1",
                            subscription.listener_id,
                        )
                    )
        except RedisError as exc:
            raise self._broker_error("read dead letters", exc) from exc
        return letters

    async def republish_dead_letters(self) -> int:
        """Put every dead letter back for handling, from attempt 1, and remove it.

        A queue's dead letters go back to the queue; a bus listener's go to that listener
        only. Each batch is moved in one ``MULTI``, so a letter is never lost or doubled.

        Returns:
            How many messages were republished.

        Raises:
            MessageBrokerUnavailableError: Redis cannot be reached.
        """
        client = self._redis()
        total = 0
        try:
            for subscription in self._subscriptions():
                while True:
                    entries: Any = await client.xrange(subscription.dead, count=_READ_CHUNK)
                    if not entries:
                        break
                    async with client.pipeline(transaction=True) as pipe:
                        for _, fields in entries:
                            pipe.xadd(
                                subscription.retry_stream,
                                {
                                    b"body": fields.get(b"body", b""),
                                    b"replay": fields.get(b"replay", b"0"),
                                    b"attempt": b"1",
                                },
                            )
                        pipe.xdel(subscription.dead, *(entry_id for entry_id, _ in entries))
                        await pipe.execute()
                    total += len(entries)
        except RedisError as exc:
            raise self._broker_error("republish dead letters", exc) from exc
        return total

    async def purge(self) -> None:
        """Delete every key of this channel: stream, groups, retries, dead letters.

        Meant for tests; consumers should be stopped first.

        Raises:
            MessageBrokerUnavailableError: Redis cannot be reached.
        """
        client = self._redis()
        pattern = _GLOB_SPECIAL.sub(r"\\\1", self.stream_key) + "*"
        try:
            keys = [key async for key in client.scan_iter(match=pattern, count=1000)]
            if keys:
                await client.unlink(*keys)
        except RedisError as exc:
            raise self._broker_error("purge", exc) from exc


def _report_crash(task: asyncio.Task[None]) -> None:
    """Log a consumer that ended on an unexpected error (its messages stay pending)."""
    if not task.cancelled() and task.exception() is not None:
        logger.error(
            "Redis consumer task %s stopped on an error; its pending messages will be "
            "taken over by other consumers",
            task.get_name(),
            exc_info=task.exception(),
        )


async def _no_worker(message: Message, context: MessageContext) -> None:
    raise RuntimeError("the queue adapter has no worker: set adapter.worker")


class RedisMessageQueueAdapter(_RedisStreamsAdapter):
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
            and abandoned entries.
        max_deliveries: An entry taken over more often than this (its consumers keep dying
            on it) is dead-lettered instead of handled again.

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

    def _router(self, subscription: Subscription) -> Any:
        # Looked up per message, so a new worker takes over from the next message; without
        # one a message fails (and is retried), it is never acknowledged unhandled.
        return lambda message, replay: self.worker or _no_worker

    async def start_consuming(self) -> None:
        """Start this process's worker on the queue (no-op if running).

        Raises:
            RuntimeError: No worker is set, or the adapter is not attached.
            MessageBrokerUnavailableError: Redis cannot be reached.
        """
        if self.worker is None:
            raise RuntimeError(
                "RedisMessageQueueAdapter has no worker: set adapter.worker (or pass "
                "worker=) before consuming"
            )
        await super().start_consuming()


class _Listener:
    __slots__ = ("handler", "listener_id", "patterns")

    def __init__(self, listener_id: str, handler: MessageHandler) -> None:
        self.listener_id = listener_id
        self.handler = handler
        self.patterns: list[FilterPattern] = []

    def route(self, message: Message, replay: bool) -> MessageHandler | None:
        if any(matches(pattern, message, replay) for pattern in self.patterns):
            return self.handler
        return None


class RedisMessageBusAdapter(_RedisStreamsAdapter):
    """Carries a message bus through one Redis stream to every listener.

    Each listener (``on(pattern, handler, listener_id=...)``) has its own consumer group, named
    after its id, created when the adapter connects: it receives what is published from then
    on, kept for it while no consumer runs. Entries that match none of the listener's
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
        block_ms: The longest a read waits for new entries.
        max_deliveries: An entry taken over more often than this is dead-lettered.

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
        self.max_length = None if max_length is None else _positive("max_length", max_length)
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
    ) -> None:
        """Register a listener for the messages matching ``pattern``.

        Registering the same listener id again with the same handler adds the pattern (a
        message matching several is still handled once). Registered while consuming, the
        listener starts at once: it receives what this adapter publishes from then on.

        Args:
            pattern: ``{"event_store_id": ..., "event_type": ..., "on_replay": ...}``, every
                key optional; ``{}`` matches every message that is not a replay.
            handler: ``async def handler(message, context)``.
            listener_id: The listener's durable id, its consumer group's name (default: the
                handler's qualified name).

        Raises:
            ValueError: An unknown pattern key, an empty id, or an id already used by
                another handler.
            TypeError: A pattern value of the wrong type.
        """
        checked = check_filter_pattern(pattern)
        name = handler.__qualname__ if listener_id is None else listener_id
        if not isinstance(name, str) or not name:
            raise ValueError("listener_id must be a non-empty string")
        listener = self._listeners.get(name)
        if listener is None:
            listener = self._listeners[name] = _Listener(name, handler)
            if self._consuming:
                task = asyncio.get_running_loop().create_task(
                    self._join(self._subscription(listener))
                )
                self._joining.add(task)
                task.add_done_callback(self._joining.discard)
        elif listener.handler is not handler:
            raise ValueError(
                f"listener id {name!r} is already used by another handler; pass a distinct "
                "listener_id="
            )
        listener.patterns.append(checked)

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

    def _router(self, subscription: Subscription) -> Any:
        assert subscription.listener_id is not None
        return self._listeners[subscription.listener_id].route

    def _max_length(self) -> int | None:
        return self.max_length
