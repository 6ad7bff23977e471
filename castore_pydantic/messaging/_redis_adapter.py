"""The part of the Redis Streams adapters that queues and buses share.

Connection handling, publishing (one atomic Lua call per batch), starting and stopping
consumers, dead letters and clean-up. ``castore_pydantic.messaging.redis`` builds the public
queue and bus adapters on it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from castore_pydantic.errors import MessageBrokerUnavailableError, MessagingError
from castore_pydantic.messaging._channels import MessageChannel
from castore_pydantic.messaging._event_loops import LoopBinding
from castore_pydantic.messaging._messages import (
    DeadLetter,
    DeliveryGuarantee,
    Message,
    RetryPolicy,
)
from castore_pydantic.messaging._redis_consumer import StreamConsumer
from castore_pydantic.messaging._redis_subscription import (
    ConsumerOptions,
    Route,
    Subscription,
    ensure_group,
)
from castore_pydantic.messaging._redis_wire import (
    APPEND_MESSAGES,
    MOVE_DEAD_LETTERS,
    PURGE_KEYS,
    positive,
    redact,
)

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = ["RedisStreamsAdapter"]

logger = logging.getLogger("castore_pydantic.messaging.redis")

_APPEND_CHUNK = 5000
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_READ_CHUNK = 500


class RedisStreamsAdapter:
    """What the Redis queue and bus adapters share: connection, publishing, consumers.

    Subclasses set ``_kind`` and say which consumer groups they read (``_subscriptions``)
    and which handler gets which message (``_router``).
    """

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
            prefetch_count=positive("prefetch_count", prefetch_count),
            block_ms=positive("block_ms", block_ms),
            reclaim_idle_ms=positive("reclaim_idle_ms", reclaim_idle_ms),
            max_deliveries=positive("max_deliveries", max_deliveries),
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
        # How many times stop_consuming was called: a start that sees it change before its
        # consumers exist starts none (the stop may have stopped waiting for it).
        self._stop_calls = 0
        self._start_afresh()
        # The event loop of the client, the consumers and the tasks above; and, for a client
        # passed in, the loop it was first used on (it cannot be replaced on another one).
        self._loop = LoopBinding()
        self._given_client_loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        channel = self.message_channel.message_channel_id if self.message_channel else None
        return f"{type(self).__name__}({self.url!r}, {self._kind}={channel!r})"

    @property
    def url(self) -> str:
        """Where Redis is, with the password masked (the client's repr for a given client)."""
        return redact(self._url) if self._url is not None else repr(self._client)

    @property
    def delivery_guarantee(self) -> DeliveryGuarantee:
        """``"at-least-once"``: a published message is handled, possibly more than once."""
        return "at-least-once"

    @property
    def stream_key(self) -> str:
        """The Redis key of the channel's stream (``castore:{queue:<id>}``).

        Raises:
            RuntimeError: The adapter is not attached to a channel.
            ValueError: The channel's id holds ``}``.
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
        _check_channel_id(self.message_channel)
        return self.message_channel

    def _attach(self, channel: MessageChannel[Any]) -> None:
        if channel.message_channel_type != self._kind:
            raise TypeError(
                f"{type(self).__name__} carries a message {self._kind}, not a "
                f"{channel.message_channel_type} ({channel!r})"
            )
        _check_channel_id(channel)
        channel.message_channel_adapter = self
        self.message_channel = channel

    # -- connection ------------------------------------------------------------------------

    def _enter_loop(self) -> None:
        """Work on the running event loop; start afresh there if the last one has closed.

        An adapter attached at import time may serve one event loop after another (one
        ``asyncio.run`` after another; pytest-asyncio's loop per test). Its client's
        connections, its consumers' tasks and its events belong to the loop they were made
        on: once that loop has closed they are dropped, without awaiting anything, and the
        adapter connects again on first use. Its connections were closed as the loop ended
        (``close_at_end``), if ``asyncio.run`` or an ``asyncio.Runner`` ended it.

        Raises:
            RuntimeError: The adapter is in use on another loop that is still open.
        """
        if not self._loop.enter(self):
            return
        # Those consumers' tasks were cancelled with their loop (or will never run again):
        # their entries stay pending and are taken over, as for a worker that died.
        self._start_afresh()
        if self._owns_client:
            self._client = None

    def _start_afresh(self) -> None:
        """Set up what belongs to one event loop, with nothing connected or running."""
        self._append: AsyncScript | None = None
        self._consumers: list[StreamConsumer] = []
        # Consumers asked to stop whose task has not ended yet (a handler still running), by
        # task: every stop, start and close waits for them before going on.
        self._retiring: dict[asyncio.Task[None], StreamConsumer] = {}
        # Tasks applying a grace period a handler asked for, and closing a client a handler
        # closed (once that handler's consumer has ended).
        self._background: set[asyncio.Task[None]] = set()
        self._consuming = False
        # Set while start_consuming connects, before its consumers exist.
        self._starting: asyncio.Event | None = None
        self._connected = False
        # Listeners registered on a connected adapter, whose consumer groups are being created.
        self._joining: set[asyncio.Task[None]] = set()

    def _redis(self) -> Redis:
        self._enter_loop()
        if not self._owns_client:
            assert self._client is not None
            loop = asyncio.get_running_loop()
            if self._given_client_loop is None:
                self._given_client_loop = loop
            elif self._given_client_loop is not loop:
                raise RuntimeError(
                    f"{self!r} was used on an event loop that has closed, with a Redis client "
                    "passed in: that client's connections belong to the closed loop. Create "
                    "the client and the adapter on the loop that uses them, or pass a "
                    "redis:// URL: the adapter then connects again on each new loop"
                )
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
            self._loop.close_at_end(self._close_at_loop_end)
        return self._client

    async def _close_at_loop_end(self) -> None:
        """Close the client as its event loop ends: its connections cannot outlive it."""
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aclose()
            except (RedisError, OSError) as exc:
                logger.warning("%r could not close its Redis client: %s", self, exc)

    def _broker_error(self, action: str, exc: RedisError) -> MessagingError:
        if self._url is not None:
            where = redact(self._url)
        else:
            settings = self._client.connection_pool.connection_kwargs if self._client else {}
            where = f"{settings.get('host', '?')}:{settings.get('port', '?')}"
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
            RuntimeError: The adapter is in use on another event loop that is still open.
        """
        client = self._redis()
        try:
            await client.ping()
            if self.message_channel is not None:
                for subscription in self._subscriptions():
                    await ensure_group(client, subscription)
        except RedisError as exc:
            raise self._broker_error("connect", exc) from exc
        self._connected = True

    async def aclose(self) -> None:
        """Stop consuming and close the connections this adapter opened; idempotent.

        Waits for the running handlers first, as ``stop_consuming()`` does. Called by a
        handler, it returns at once and the client is closed once that handler's consumer
        has finished (a later ``aclose()`` waits for that). On a new event loop, after the
        one the adapter was used on has closed, there is nothing left to close.

        Raises:
            RuntimeError: The adapter is in use on another event loop that is still open.
        """
        self._enter_loop()
        await self.stop_consuming()
        self._connected = False
        inside = asyncio.current_task() in self._retiring
        client, self._client = self._client, None
        if client is not None and not self._owns_client:
            self._client = client  # not ours to close
        elif client is not None and inside:
            # The handler's consumer acknowledges its entry with this client once the handler
            # returns: closing it now would have that reopen a connection nobody closes.
            self._in_background(self._close_after(client, list(self._retiring)))
        elif client is not None:
            await client.aclose()
        if not inside:
            await self._background_done()

    @staticmethod
    async def _close_after(client: Redis, tasks: list[asyncio.Task[None]]) -> None:
        try:
            await asyncio.wait(tasks)
        finally:
            await client.aclose()

    def _in_background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _background_done(self) -> None:
        """Wait for the grace periods and client closes handlers left running."""
        current = asyncio.current_task()
        tasks = [task for task in self._background if task is not current]
        if tasks:
            await asyncio.wait(tasks)

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

    def _connects_to_publish(self) -> bool:
        """Whether a first publish must connect first (a queue's never does)."""
        return False

    async def _joined(self) -> None:
        """Get ready to publish: connect on first use, then let late listeners join.

        A bus listener's group starts at the end of the stream: connecting creates the
        groups of the listeners registered so far, so that they get this message. (A
        queue's group starts at the beginning: a publisher that may only append needs no
        more rights than that.)
        """
        if not self._connected and self._connects_to_publish():
            await self.connect()
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
            RuntimeError: The adapter is not attached to a channel, or is in use on another
                event loop that is still open.
        """
        stream = self.stream_key
        fields = self._fields(message, replay)
        self._enter_loop()
        await self._joined()
        try:
            await self._redis().xadd(stream, fields, maxlen=self._max_length())
        except RedisError as exc:
            raise self._broker_error(f"publish to {stream}", exc) from exc

    async def publish_messages(self, messages: Sequence[Message], *, replay: bool = False) -> None:
        """Append several messages in order, with one Lua script call per 5,000 messages.

        Each script call runs atomically: readers see all of its messages or none. A larger
        batch takes several calls, so readers may see its first chunks before the rest.

        Raises:
            MessageBrokerUnavailableError: Redis cannot be reached (a call whose request
                never reached Redis appended nothing; the chunks before it stay appended).
            MessagingError: Redis refused a command (the chunks before it stay appended).
        """
        if not messages:
            return
        self._enter_loop()
        stream = self.stream_key
        bodies = [self._fields(message, replay)["body"] for message in messages]
        max_length = self._max_length()
        head = ["1" if replay else "0", "" if max_length is None else max_length]
        client = self._redis()
        if self._append is None or self._append.registered_client is not client:
            self._append = client.register_script(APPEND_MESSAGES)
        await self._joined()
        try:
            for first in range(0, len(bodies), _APPEND_CHUNK):
                await self._append(
                    keys=[stream], args=[*head, *bodies[first : first + _APPEND_CHUNK]]
                )
        except RedisError as exc:
            raise self._broker_error(f"publish to {stream}", exc) from exc

    # -- consuming -------------------------------------------------------------------------

    @property
    def is_consuming(self) -> bool:
        """Whether consumers are running (between ``start_consuming`` and ``stop_consuming``).

        ``False`` once the event loop they ran on has closed: they ended with it.
        """
        return self._consuming and not self._loop.closed

    @asynccontextmanager
    async def consuming(self, *, grace_period: float | None = None) -> AsyncIterator[Self]:
        """Run consumers inside the block; leaving it stops them cleanly.

        Args:
            grace_period: Passed to ``stop_consuming(grace_period=...)``.
        """
        await self.start_consuming()
        try:
            yield self
        finally:
            await self.stop_consuming(grace_period=grace_period)

    async def start_consuming(self) -> None:
        """Start one consumer per consumer group in background tasks (no-op if running).

        Raises:
            RuntimeError: Called by a handler whose consumer is stopping (it stopped its
                adapter): restart from another task, once that handler has returned. Or the
                adapter is in use on another event loop that is still open.
            MessageBrokerUnavailableError: Redis cannot be reached.
        """
        self._enter_loop()
        current = asyncio.current_task()
        if current in self._retiring:
            # The new consumer would run under the same name in the same groups and take
            # this handler's entry, still in flight, as its own: handled twice. Waiting
            # here for the handler's consumer to end would wait for ever.
            raise RuntimeError(
                f"{self!r}: a handler cannot start consuming after stopping its own "
                "adapter; restart from another task once the handler has returned"
            )
        stop_calls = self._stop_calls
        while self._starting is not None:  # another call is starting them: its outcome
            await self._starting.wait()
        if self._consuming:
            return
        starting = self._starting = asyncio.Event()
        try:
            # Consumers still finishing a handler after a stop run under the same name in
            # the same groups: a new one would take their entries in flight as its own.
            if retiring := [task for task in self._retiring if task is not current]:
                await asyncio.wait(retiring)
            if self._stop_calls == stop_calls:
                await self.connect()
            if self._stop_calls != stop_calls:
                # A stop was called since this call: no consumer may run after it, even if
                # it was cancelled or gave up waiting for this start.
                return
            self._consuming = True
            for subscription in self._subscriptions():
                self._start_consumer(subscription)
        finally:
            self._starting = None
            starting.set()

    def _start_consumer(self, subscription: Subscription) -> None:
        """Start the consumer of ``subscription``'s group unless this adapter runs one.

        A listener registered on a connected adapter reaches here twice when consuming starts
        while its group is being created (from ``start_consuming`` and from ``_join``). Two
        consumers with the same name in one group share one pending list: the second one's
        start-up recovery would hand the first one's in-flight entries to the handler again.
        """
        if any(c.subscription.group == subscription.group for c in self._consumers):
            return
        consumer = StreamConsumer(
            self._redis(),
            subscription,
            consumer_name=self.consumer_name,
            route=self._router(subscription),
            retry_policy=self.retry_policy,
            options=self._options,
        )
        self._consumers.append(consumer)
        consumer.start().add_done_callback(_report_crash)

    def _router(self, subscription: Subscription) -> Route:
        raise NotImplementedError

    async def stop_consuming(self, *, grace_period: float | None = None) -> None:
        """Stop the consumers: wait for the handlers in flight, acknowledge what they did.

        Entries already read but not started are handed back at once, so other consumers
        take them over without waiting for ``reclaim_idle_ms``. Safe to call when not
        consuming, and more than once: every call waits until the consumers have ended.
        A ``start_consuming`` in progress starts no consumer once this is called (also if
        this call is cancelled); this call waits for it to end, after applying its grace
        period to the handlers that start waits for.
        If this call is cancelled (``asyncio.timeout``), it does what the end of a grace
        period does before passing the cancellation on. Called by a handler, it returns at
        once; that handler's consumer stops once the handler returned.

        Args:
            grace_period: Seconds to wait for running handlers; then they are cancelled and
                their messages handed back, to be delivered again without counting an
                attempt. ``None`` waits as long as they run.

        Raises:
            RuntimeError: The adapter is in use on another event loop that is still open.
        """
        self._enter_loop()
        current = asyncio.current_task()
        # Counted before any await: a start in progress then starts nothing.
        self._stop_calls += 1
        self._consuming = False
        consumers, self._consumers = self._consumers, []
        for consumer in consumers:
            consumer.request_stop()
            task = consumer.task
            if task is not None and not task.done():
                self._retiring[task] = consumer
                task.add_done_callback(self._forget_retired)
        if current in self._retiring:
            # Called by a handler, on its consumer's task: waiting here for that consumer
            # would wait for ever. A grace period is applied by a task of its own.
            if grace_period is not None:
                self._in_background(self._wait_for_consumers(grace_period))
            return
        if self._joining:
            await asyncio.wait(list(self._joining))
        # Also the handlers a start in progress waits for: the grace period applies to them.
        await self._wait_for_consumers(grace_period)
        if self._starting is not None:  # (a handler of this adapter returned above)
            # It starts nothing now, but returning before it ended would let aclose() close
            # the client it may still be connecting with.
            await self._starting.wait()
        await self._background_done()

    def _forget_retired(self, task: asyncio.Task[None]) -> None:
        self._retiring.pop(task, None)

    async def _wait_for_consumers(self, grace_period: float | None) -> None:
        """Wait for the consumers asked to stop; cancel those still running after it."""
        current = asyncio.current_task()
        running = {
            task: consumer for task, consumer in self._retiring.items() if task is not current
        }
        if not running:
            return
        late = set(running)
        try:
            # asyncio.wait does not raise the tasks' errors (a killed worker's cancellation).
            _, late = await asyncio.wait(running, timeout=grace_period)
            if late:
                logger.warning(
                    "%r stopped with %d handler(s) still running after %ss; their messages "
                    "will be delivered again",
                    self,
                    len(late),
                    grace_period,
                )
        finally:
            # Past the grace period, or this call was cancelled: the consumers still running
            # cancel their handler and hand their entries back (for a bounded time), then
            # end. Cancelled again while they do, this stops the hand-back too.
            for task in late:
                running[task].cancel()
            if late:
                try:
                    await asyncio.wait(late)
                except asyncio.CancelledError:
                    for task in late:
                        running[task].cancel()
                        running[task].abort_release()
                    raise

    # -- dead letters and housekeeping -----------------------------------------------------

    async def _read_stream(self, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The entries of a stream up to its newest one when the call started."""
        client = self._redis()
        newest: Any = await client.xrevrange(key, count=1)
        if not newest:
            return []
        # Read up to that entry only: entries appended faster than they are read would
        # otherwise keep the call going.
        last = newest[0][0]
        entries: list[tuple[bytes, dict[bytes, bytes]]] = []
        start: Any = "-"
        while True:
            chunk: Any = await client.xrange(key, min=start, max=last, count=_READ_CHUNK)
            entries.extend(chunk)
            if len(chunk) < _READ_CHUNK:
                return entries
            start = b"(" + chunk[-1][0]

    async def dead_letters(self) -> list[DeadLetter]:
        """The messages whose handling failed on every attempt, oldest first per group.

        Each dead-letter stream is read up to its newest letter when its turn came: letters
        dead-lettered meanwhile are left for the next call. A dead letter whose body no
        longer validates (for example an event type the store dropped) is left in its
        stream and reported in the log instead.

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
        only. Each letter is moved by one atomic script, so it is never lost or doubled,
        also when two calls run at once. Letters dead-lettered again while the call runs
        are left for the next call.

        Returns:
            How many messages were republished.

        Raises:
            MessageBrokerUnavailableError: Redis cannot be reached.
        """
        client = self._redis()
        move = client.register_script(MOVE_DEAD_LETTERS)
        total = 0
        try:
            for subscription in self._subscriptions():
                newest: Any = await client.xrevrange(subscription.dead, count=1)
                if not newest:
                    continue
                last, start = newest[0][0], b"-"
                while True:
                    entries: Any = await client.xrange(
                        subscription.dead, min=start, max=last, count=_READ_CHUNK
                    )
                    if not entries:
                        break
                    args: list[Any] = []
                    for entry_id, fields in entries:
                        args += [entry_id, fields.get(b"body", b""), fields.get(b"replay", b"0")]
                    total += int(
                        await move(keys=[subscription.dead, subscription.retry_stream], args=args)
                    )
                    start = b"(" + entries[-1][0]
        except RedisError as exc:
            raise self._broker_error("republish dead letters", exc) from exc
        return total

    async def purge(self) -> None:
        """Delete every key of this channel: stream, groups, retries, dead letters.

        Meant for tests. Consumers may keep running: a message published once ``purge``
        returned is delivered as usual. This adapter's consumers keep their groups, created
        again on the empty streams in the same atomic step; they drop the entries they had
        read and not started, and the retry of a message whose handler was running. Other
        consumers of the channel (other adapters, other processes) handle the rest of the
        batch they had read, then find their group gone and create it again at the start of
        the new stream. No failure of a purged message is retried or dead-lettered. The
        keys are listed and deleted in one atomic step, which scans the whole database. A
        bus listener that is not consuming gets its group back, at the end of the stream,
        when its adapter next connects, publishes or starts consuming.

        Raises:
            MessageBrokerUnavailableError: Redis cannot be reached.
            RuntimeError: The adapter is in use on another event loop that is still open.
        """
        self._enter_loop()
        # A consumer still starting, or a listener still joining, would create its group
        # after the purge at the end of the stream, skipping what is published meanwhile.
        # (A start waits for the handlers of stopped consumers: not for their purge.)
        while self._starting is not None and asyncio.current_task() not in self._retiring:
            await self._starting.wait()
        if self._joining:
            await asyncio.wait(list(self._joining))
        client = self._redis()
        stream = self.stream_key
        # The channel's other keys are "<stream>:...": "<stream>*" would also match the keys
        # of a channel whose id starts with this one's and a "}" ("a}x" for "a").
        pattern = _GLOB_SPECIAL.sub(r"\\\1", stream) + ":*"
        consumers = list(self._consumers)
        streams: list[Any] = []
        groups: list[Any] = []
        for consumer in consumers:
            streams += consumer.subscription.streams
            groups += [consumer.subscription.group] * len(consumer.subscription.streams)
        try:
            await client.register_script(PURGE_KEYS)(
                keys=[stream, *streams], args=[pattern, *groups]
            )
        except RedisError as exc:
            raise self._broker_error("purge", exc) from exc
        for consumer in consumers:
            consumer.forget_held()
        # The groups of listeners not consuming are gone: a publish through this adapter
        # connects first, which creates them again before the message is appended.
        self._connected = False


def _report_crash(task: asyncio.Task[None]) -> None:
    """Log a consumer that ended on an unexpected error (its messages stay pending)."""
    if not task.cancelled() and task.exception() is not None:
        logger.error(
            "Redis consumer task %s stopped on an error; its pending messages will be "
            "taken over by other consumers",
            task.get_name(),
            exc_info=task.exception(),
        )


def _check_channel_id(channel: MessageChannel[Any]) -> None:
    """Refuse a channel id holding ``}``, which ends the hash tag of the channel's keys.

    With it, the keys of one channel could start like another's (channel ``a}:x``'s stream
    ``castore:{queue:a}:x}`` looks like a key of channel ``a``), and purging ``a`` would
    delete them.

    Raises:
        ValueError: The id holds ``}``.
    """
    if "}" in channel.message_channel_id:
        raise ValueError(
            f"Redis channel ids may not hold '}}': {channel.message_channel_id!r} would end the"
            " hash tag of its keys early, and its keys could be taken for another channel's"
        )
