"""In-memory message queue and bus adapters: for tests and single-process applications.

Messages are handled in the publishing process, by asyncio tasks: nothing survives the
process, so delivery is **at-most-once** (a message still waiting, or waiting for a retry,
when the process stops is lost). A failure that exhausts the retry budget is logged through the
``castore_pydantic.messaging`` logger with the message and the error, and kept in
``dead_letters()``.

Each published message travels in Castore's JSON wire form, as on the brokers: it is dumped
to JSON when published and every delivery (each listener, each retry) gets its own message
parsed back by the attached channel, exactly as a broker consumer parses a body. A worker
therefore receives what a RabbitMQ or Redis worker receives (e.g. a mapping as a
state-carrying message's ``aggregate`` when the reducer has no return annotation), and a
message no broker could carry is refused when it is published.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from castore_pydantic.errors import MessageChannelEventStoreNotFoundError, UnknownEventTypeError
from castore_pydantic.messaging._channels import MessageChannel
from castore_pydantic.messaging._messages import (
    DeadLetter,
    DeliveryGuarantee,
    FilterPattern,
    Message,
    MessageContext,
    MessageHandler,
    RetryPolicy,
    describe_error,
    listener_name,
    run_handler,
    same_handler,
)
from castore_pydantic.messaging._routing import ListenerFilter, listened_pattern

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = ["InMemoryMessageBusAdapter", "InMemoryMessageQueueAdapter"]

logger = logging.getLogger("castore_pydantic.messaging")

#: How many dead letters an in-memory adapter keeps (the oldest are dropped first).
MAX_DEAD_LETTERS = 10_000


async def _let_handlers_start() -> None:
    """Yield once, so that handlers just scheduled have started when a publish returns.

    As in Castore, an idle worker has been called by the time ``publish_message`` resolves;
    the publish still does not wait for handlers to finish.
    """
    await asyncio.sleep(0)


class _Carried:
    """One published message in wire form, handed out as a broker consumer would parse it.

    The message parsed when it was published (to refuse it then if it does not parse back)
    goes to the first delivery; every further one (another listener, a retry) parses the
    body again, so that no two handlers share an object, as on the brokers.
    """

    __slots__ = ("_fresh", "_parse", "body", "published")

    def __init__(
        self,
        body: str,
        published: Message,
        fresh: Message | None,
        parse: Callable[[str], Message] | None,
    ) -> None:
        self.body = body
        #: The message as it was published: a dead letter's when the body no longer parses.
        self.published = published
        self._fresh = fresh
        self._parse = parse

    def take(self) -> Message:
        """The message for one delivery: parsed from the body, nobody else's.

        Raises:
            Exception: Parsing the body again failed (a validator that now refuses it).
        """
        if self._parse is None:
            return self.published  # without a channel the message is handed as it is
        fresh = self._fresh
        if fresh is not None:
            self._fresh = None
            return fresh
        return self._parse(self.body)

    def letter(self) -> Message:
        """The message for a dead letter: as published, untouched by the handlers."""
        if self._parse is None:
            return self.published
        try:
            return self._parse(self.body)
        except Exception:  # it no longer parses: the letter keeps what was published
            return self.published


@dataclasses.dataclass(frozen=True, slots=True)
class _Delivery:
    carried: _Carried
    attempt: int
    retry_attempts_left: int
    replay: bool
    #: How the attempt before this one failed (``None`` for a first attempt).
    error: str | None = None

    @property
    def context(self) -> MessageContext:
        return MessageContext(self.attempt, self.retry_attempts_left, self.replay)

    def retried(self, error: str) -> _Delivery:
        return dataclasses.replace(
            self,
            attempt=self.attempt + 1,
            retry_attempts_left=self.retry_attempts_left - 1,
            error=error,
        )


class _InMemoryAdapter:
    """What the in-memory queue and bus share: retries, dead letters, quiescence."""

    def __init__(
        self,
        *,
        retry_attempts: int = 2,
        retry_delay_in_ms: float = 30000,
        retry_backoff_rate: float = 2,
    ) -> None:
        self.retry_policy = RetryPolicy(retry_attempts, retry_delay_in_ms, retry_backoff_rate)
        self.message_channel: MessageChannel[Any] | None = None
        #: Channels handed this adapter before ``message_channel``, newest last (weakly: a
        #: test's channel may go while a module's adapter stays).
        self._earlier: list[weakref.ref[MessageChannel[Any]]] = []
        # Every piece of pending work (a delivery, a FIFO draining, a retry waiting for its
        # delay) is a task in this set; a failing attempt schedules its retry before it ends.
        self._tasks: set[asyncio.Task[None]] = set()
        self._dead_letters: deque[DeadLetter] = deque(maxlen=MAX_DEAD_LETTERS)
        self._consuming = False
        self._dead_lettered = 0  # messages given up on since the adapter was made

    @property
    def delivery_guarantee(self) -> DeliveryGuarantee:
        """``"at-most-once"``: messages live in this process only."""
        return "at-most-once"

    # -- bookkeeping ------------------------------------------------------------------------

    def _carry(self, message: Message) -> _Carried:
        """Put a message in wire form and parse it back, as a broker adapter and consumer do.

        The channel that parses is the newest of those handed this adapter that carries
        the message (its kind and its store). An adapter without a channel (neither made by
        ``attach_to`` nor handed to a channel, and ``message_channel`` not set) cannot
        parse: it checks that the message dumps to JSON and hands it on as it is.

        Raises:
            pydantic.ValidationError: The attached channel cannot parse the message back
                (its workers on a broker could not read it).
            pydantic_core.PydanticSerializationError: The message has no JSON form.
            MessageChannelEventStoreNotFoundError: No channel of the adapter carries its
                store.
        """
        body = message.model_dump_json()
        channels = self._channels()
        if not channels:
            return _Carried(body, message, None, None)
        channel = next((c for c in channels if c._carries(message)), channels[0])
        parse = channel.parse_message
        return _Carried(body, message, parse(body), parse)

    def _channels(self) -> list[MessageChannel[Any]]:
        """The channels handed this adapter and still alive, newest first."""
        earlier = [c for c in (ref() for ref in reversed(self._earlier)) if c is not None]
        if len(earlier) < len(self._earlier):
            self._earlier = [weakref.ref(c) for c in reversed(earlier)]
        current = [self.message_channel] if self.message_channel is not None else []
        return current + [c for c in earlier if c is not self.message_channel]

    def _carried_letters(self, letters: Sequence[DeadLetter]) -> list[tuple[DeadLetter, _Carried]]:
        """Put dead letters in wire form to be handled again; keep those that cannot be.

        A letter whose message no longer parses back stays a dead letter, its error
        replaced by why; the others are returned, and none is lost to another's failure.
        """
        carried = []
        kept = []
        for letter in letters:
            try:
                carried.append((letter, self._carry(letter.message)))
            except Exception as exc:
                kept.append(dataclasses.replace(letter, error=describe_error(exc)))
        self._dead_letters.clear()
        self._dead_letters.extend(kept)
        return carried

    def _bind_channel(self, channel: MessageChannel[Any]) -> None:
        """Learn a channel that was handed this adapter (Castore's forms).

        ``NotificationMessageQueue(..., message_queue_adapter=adapter)``, or setting the
        attribute, gives the channel its adapter; the adapter needs its channel too, to
        parse messages back as a broker's consumer does. It becomes ``message_channel``;
        channels handed the adapter before stay known, so that a message of one of them is
        still parsed by it (see ``_carry``).
        """
        if self.message_channel is channel:
            return
        self._unbind_channel(channel)
        if self.message_channel is not None:
            self._earlier.append(weakref.ref(self.message_channel))
        self.message_channel = channel

    def _unbind_channel(self, channel: MessageChannel[Any]) -> None:
        """Forget a channel that has taken another adapter."""
        self._earlier = [ref for ref in self._earlier if ref() not in (channel, None)]
        if self.message_channel is channel:
            self.message_channel = None
            newest = self._channels()
            if newest:
                self.message_channel = newest[0]
                self._earlier = [ref for ref in self._earlier if ref() is not newest[0]]

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run work in the background, counted as pending until it ends."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def join(self) -> None:
        """Wait until every published message is handled, retried or dead-lettered.

        Retries count as pending work, so with long retry delays this waits for them.
        """
        while self._tasks:
            # asyncio.wait, unlike gather, leaves the tasks running if join is cancelled.
            await asyncio.wait(list(self._tasks))

    async def _attempt(
        self,
        handler: MessageHandler,
        delivery: _Delivery,
        *,
        retry: Callable[[_Delivery], None],
        listener_id: str | None = None,
    ) -> None:
        """Handle one delivery; on failure, schedule a retry or dead-letter it.

        A body that no longer parses (a validator whose answer changed since it was
        published) is dead-lettered at once, as a broker's consumer does with a body that
        does not validate: no retry would read it either.
        """
        try:
            message = delivery.carried.take()
        except Exception as exc:
            self._dead_letter(delivery, exc, listener_id, attempts=delivery.attempt - 1)
            return
        try:
            await run_handler(handler, message, delivery.context)
        except Exception as exc:
            if delivery.retry_attempts_left > 0:
                delay = self.retry_policy.delay_for(delivery.attempt)
                retried = delivery.retried(describe_error(exc))
                self._spawn(self._retry_after(delay, retried, retry))
            else:
                self._dead_letter(delivery, exc, listener_id)

    async def _retry_after(
        self, delay: float, delivery: _Delivery, retry: Callable[[_Delivery], None]
    ) -> None:
        await asyncio.sleep(delay)
        retry(delivery)

    def _dead_letter(
        self,
        delivery: _Delivery,
        error: BaseException | str,
        listener_id: str | None,
        *,
        attempts: int | None = None,
    ) -> None:
        text = error if isinstance(error, str) else describe_error(error)
        attempts = delivery.attempt if attempts is None else attempts
        message = delivery.carried.letter()  # not the copy a handler may have changed
        self._dead_lettered += 1  # counted apart: the list keeps the newest ones only
        self._dead_letters.append(DeadLetter(message, text, attempts, delivery.replay, listener_id))
        logger.error(
            "%s gave up on a message after %d attempt(s)%s: %s; message: %s",
            type(self).__name__,
            attempts,
            f" in listener {listener_id}" if listener_id else "",
            text,
            delivery.carried.body,
            exc_info=error if isinstance(error, BaseException) else None,
        )

    # -- dead letters ----------------------------------------------------------------------

    async def dead_letters(self) -> list[DeadLetter]:
        """The messages whose handling failed on every attempt, oldest first."""
        return list(self._dead_letters)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def is_consuming(self) -> bool:
        """Whether ``start_consuming`` was called and ``stop_consuming`` not since."""
        return self._consuming

    @asynccontextmanager
    async def consuming(self, *, grace_period: float | None = None) -> AsyncIterator[Self]:
        """Consume within the block (in memory, messages are always handled on publish).

        It exists, with the brokers' ``grace_period``, so that code written for broker
        adapters runs unchanged in memory.
        """
        await self.start_consuming()
        try:
            yield self
        finally:
            await self.stop_consuming(grace_period=grace_period)

    async def start_consuming(self) -> None:
        """Nothing to start in memory: messages are handled as they are published."""
        self._consuming = True

    async def stop_consuming(self, *, grace_period: float | None = None) -> None:
        """Nothing to stop in memory: handling goes on (``aclose`` cancels pending work).

        Args:
            grace_period: Accepted as the brokers' adapters accept it; nothing is waited
                for or cancelled in memory.
        """
        self._consuming = False

    async def purge(self) -> None:
        """Drop everything pending and the dead letters (a test helper).

        Messages waiting for a worker and scheduled retries are dropped, handlers running
        now are cancelled, and the dead letters are forgotten. The adapter stays usable:
        messages published afterwards are handled as usual.
        """
        await self._cancel_all()
        self._dead_letters.clear()

    async def aclose(self) -> None:
        """Cancel pending work at once, running handlers included; idempotent.

        Waiting messages and retries are dropped, with no grace period and no dead letter:
        ``join()`` first to let them finish.
        """
        self._consuming = False
        await self._cancel_all()

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._forget_waiting()

    def _forget_waiting(self) -> None:
        """Drop messages waiting in memory (overridden by the queue)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Fifo:
    """One worker's FIFO: handles one message at a time, in order."""

    def __init__(self, adapter: InMemoryMessageQueueAdapter, worker: MessageHandler) -> None:
        self.adapter = adapter
        self.worker = worker
        self.waiting: deque[_Delivery] = deque()
        self.running = False

    def __len__(self) -> int:
        return len(self.waiting)

    def push(self, delivery: _Delivery) -> None:
        self.waiting.append(delivery)
        if not self.running:
            self.running = True
            self.adapter._spawn(self._drain())

    async def _drain(self) -> None:
        try:
            while self.waiting:
                delivery = self.waiting.popleft()
                await self.adapter._attempt(
                    self.worker, delivery, retry=self.adapter._enqueue_retry
                )
        finally:
            self.running = False


class InMemoryMessageQueueAdapter(_InMemoryAdapter):
    """Carries a message queue's messages to one worker, in this process.

    The worker handles one message at a time, first published first handled. A failing
    message is retried after ``retry_delay_in_ms * retry_backoff_rate ** (attempt - 1)``
    milliseconds, at the end of the queue, up to ``retry_attempts`` times; then it is logged
    and kept in ``dead_letters()``. Without a worker, published messages are dropped (with a
    warning), as in Castore. Delivery is at-most-once.

    Args:
        worker: ``async def worker(message, context)``; may be set later.
        retry_attempts: Retries after the first attempt.
        retry_delay_in_ms: Delay before the first retry.
        retry_backoff_rate: Factor applied to the delay for each further retry.

    Raises:
        ValueError: A retry option is negative or not a number.
    """

    def __init__(
        self,
        *,
        worker: MessageHandler | None = None,
        retry_attempts: int = 2,
        retry_delay_in_ms: float = 30000,
        retry_backoff_rate: float = 2,
    ) -> None:
        super().__init__(
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
        )
        self._fifos: list[_Fifo] = []
        self._queue: _Fifo | None = None
        self.worker = worker

    @classmethod
    def attach_to(
        cls,
        message_queue: MessageChannel[Any],
        *,
        worker: MessageHandler | None = None,
        retry_attempts: int = 2,
        retry_delay_in_ms: float = 30000,
        retry_backoff_rate: float = 2,
    ) -> Self:
        """Build an adapter and make it the queue's ``message_channel_adapter``."""
        adapter = cls(
            worker=worker,
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
        )
        message_queue.message_channel_adapter = adapter
        adapter.message_channel = message_queue
        return adapter

    def __repr__(self) -> str:
        channel = self.message_channel.message_channel_id if self.message_channel else None
        return f"InMemoryMessageQueueAdapter(queue={channel!r}, worker={self._worker!r})"

    @property
    def worker(self) -> MessageHandler | None:
        """The worker; setting a new one sends it every message published from then on."""
        return self._worker

    @worker.setter
    def worker(self, worker: MessageHandler | None) -> None:
        if worker is None and self._consuming:
            raise RuntimeError("stop consuming before removing the worker")
        self._worker = worker
        # Messages already waiting stay with the worker they were published to.
        self._queue = None if worker is None else _Fifo(self, worker)
        if self._queue is not None:
            self._fifos.append(self._queue)

    @property
    def queue(self) -> _Fifo | None:
        """The current worker's FIFO (``None`` without a worker); its ``len`` is the backlog."""
        return self._queue

    async def start_consuming(self) -> None:
        """Mark the adapter consuming, as the brokers' adapters do.

        Raises:
            RuntimeError: No worker is set (as on the brokers' adapters).
        """
        if self._worker is None:
            raise RuntimeError(
                "InMemoryMessageQueueAdapter has no worker: set adapter.worker (or pass "
                "worker=) before consuming"
            )
        await super().start_consuming()

    async def publish_message(self, message: Message, *, replay: bool = False) -> None:
        """Hand a message to the worker (dropped, with a warning, when there is none).

        Raises:
            pydantic.ValidationError: The message does not parse back from its JSON form
                (see ``_carry``); the worker is not called.
            pydantic_core.PydanticSerializationError: The message has no JSON form.
            MessageChannelEventStoreNotFoundError: The channel does not carry its store.
        """
        carried = self._carry(message)
        self._push(_Delivery(carried, 1, self.retry_policy.retry_attempts, replay))
        await _let_handlers_start()

    async def publish_messages(self, messages: Sequence[Message], *, replay: bool = False) -> None:
        """Hand several messages to the worker, in order (none if one does not parse back)."""
        carried = [self._carry(message) for message in messages]
        for each in carried:
            self._push(_Delivery(each, 1, self.retry_policy.retry_attempts, replay))
        await _let_handlers_start()

    def _push(self, delivery: _Delivery) -> None:
        if self._queue is None:
            logger.warning(
                "InMemoryMessageQueueAdapter has no worker: message dropped: %s",
                delivery.carried.body,
            )
            return
        self._queue.push(delivery)

    def _enqueue_retry(self, delivery: _Delivery) -> None:
        # A retry goes to whichever worker is current when it is due.
        if self._queue is None:
            # The retry never runs: the letter keeps the failure that led to it and counts
            # the attempts that ran (as the brokers' dead letters do).
            logger.warning("InMemoryMessageQueueAdapter has no worker to retry a message")
            error = delivery.error or "no worker to retry the message"
            self._dead_letter(delivery, error, None, attempts=delivery.attempt - 1)
            return
        self._queue.push(delivery)

    async def republish_dead_letters(self) -> int:
        """Hand the dead letters to the worker again (from attempt 1) and forget them.

        Without a worker nothing is republished: the letters stay as they are (with their
        errors), to be republished once a worker is set, and a warning is logged.

        Returns:
            How many messages were republished.
        """
        if self._queue is None:
            # Handed on now, each would be dead again at once, its error replaced.
            if self._dead_letters:
                logger.warning(
                    "InMemoryMessageQueueAdapter has no worker: %d dead letter(s) left as "
                    "they are; set adapter.worker, then republish them",
                    len(self._dead_letters),
                )
            return 0
        carried = self._carried_letters(list(self._dead_letters))
        for letter, each in carried:
            self._enqueue_retry(_Delivery(each, 1, self.retry_policy.retry_attempts, letter.replay))
        return len(carried)

    def _forget_waiting(self) -> None:
        for fifo in self._fifos:
            fifo.waiting.clear()
            fifo.running = False
        self._fifos = [self._queue] if self._queue is not None else []


@dataclasses.dataclass(slots=True)
class _Listener:
    listener_id: str
    handler: MessageHandler
    filter: ListenerFilter


class InMemoryMessageBusAdapter(_InMemoryAdapter):
    """Carries a message bus's messages to every matching listener, in this process.

    Listeners are registered with ``on(pattern, handler)``. Each message is delivered once to
    each listener whose patterns match it (see ``castore_pydantic.messaging.matches``), in its
    own task: listeners run concurrently and the publish does not wait for them. A failing
    listener alone is retried with the retry policy (a retried replay keeps ``replay=True``),
    then the failure is logged and kept in ``dead_letters()``. Delivery is at-most-once.

    Args:
        retry_attempts: Retries after the first attempt, per listener.
        retry_delay_in_ms: Delay before the first retry.
        retry_backoff_rate: Factor applied to the delay for each further retry.

    Raises:
        ValueError: A retry option is negative or not a number.
    """

    def __init__(
        self,
        *,
        retry_attempts: int = 2,
        retry_delay_in_ms: float = 30000,
        retry_backoff_rate: float = 2,
    ) -> None:
        super().__init__(
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
        )
        self._listeners: dict[str, _Listener] = {}

    @classmethod
    def attach_to(
        cls,
        message_bus: MessageChannel[Any],
        *,
        retry_attempts: int = 2,
        retry_delay_in_ms: float = 30000,
        retry_backoff_rate: float = 2,
    ) -> Self:
        """Build an adapter and make it the bus's ``message_channel_adapter``."""
        adapter = cls(
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
        )
        message_bus.message_channel_adapter = adapter
        adapter.message_channel = message_bus
        return adapter

    def __repr__(self) -> str:
        channel = self.message_channel.message_channel_id if self.message_channel else None
        return f"InMemoryMessageBusAdapter(bus={channel!r}, listeners={len(self._listeners)})"

    def _listened(self, pattern: Mapping[str, Any]) -> FilterPattern:
        """The pattern, checked against the buses handed this adapter: one must carry it."""
        buses = self._channels()
        if not buses:
            return listened_pattern(pattern, None)
        refusals: list[Exception] = []
        for bus in buses:
            try:
                return listened_pattern(pattern, bus)
            except (MessageChannelEventStoreNotFoundError, UnknownEventTypeError) as exc:
                refusals.append(exc)
        raise refusals[0]

    def on(
        self,
        pattern: FilterPattern | Mapping[str, Any],
        handler: MessageHandler,
        *,
        listener_id: str | None = None,
    ) -> str:
        """Register a listener for the messages matching ``pattern``.

        Registering the same listener again (the same ``listener_id``, or the same handler
        without one) adds the pattern: a message matching several of its patterns is still
        delivered once. Listeners only receive messages published after they registered.

        Args:
            pattern: ``{"event_store_id": ..., "event_type": ..., "on_replay": ...}``, every
                key optional; ``{}`` matches every message that is not a replay.
            handler: ``async def handler(message, context)``.
            listener_id: Names the listener (default: the handler's qualified name).

        Returns:
            The listener id (as on every bus adapter).

        Raises:
            ValueError: An unknown pattern key, or ``listener_id`` already names another
                handler.
            TypeError: A pattern value of the wrong type.
            MessageChannelEventStoreNotFoundError: The pattern names an event store the
                attached bus does not carry.
            UnknownEventTypeError: The pattern names an event type its store does not
                declare.
        """
        checked = self._listened(pattern)
        # Keyed by id, as on the brokers: dead letters and republishing go by it, so two
        # handlers with one (default) id could not be told apart.
        name = listener_name(handler, listener_id)
        listener = self._listeners.get(name)
        if listener is None:
            self._listeners[name] = _Listener(name, handler, ListenerFilter([checked]))
        elif not same_handler(listener.handler, handler):
            raise ValueError(
                f"listener id {name!r} is already used by another handler; pass a distinct "
                "listener_id="
            )
        else:
            listener.filter = ListenerFilter([*listener.filter.patterns, checked])
        return name

    async def publish_message(self, message: Message, *, replay: bool = False) -> None:
        """Start delivering a message to every matching listener (without waiting for them).

        Raises:
            pydantic.ValidationError: The message does not parse back from its JSON form
                (see ``_carry``); no listener is called.
            pydantic_core.PydanticSerializationError: The message has no JSON form.
            MessageChannelEventStoreNotFoundError: The channel does not carry its store.
        """
        self._publish(message, self._carry(message), replay)
        await _let_handlers_start()

    async def publish_messages(self, messages: Sequence[Message], *, replay: bool = False) -> None:
        """Start delivering several messages, in order (none if one does not parse back)."""
        carried = [self._carry(message) for message in messages]
        for message, each in zip(messages, carried, strict=True):
            self._publish(message, each, replay)
        await _let_handlers_start()

    def _publish(self, message: Message, carried: _Carried, replay: bool) -> None:
        for listener in list(self._listeners.values()):
            if listener.filter.matches(message, replay):
                self._deliver(
                    listener, _Delivery(carried, 1, self.retry_policy.retry_attempts, replay)
                )

    def _deliver(self, listener: _Listener, delivery: _Delivery) -> None:
        # Retries go to this listener only, without checking the patterns again.
        self._spawn(
            self._attempt(
                listener.handler,
                delivery,
                retry=lambda again: self._deliver(listener, again),
                listener_id=listener.listener_id,
            )
        )

    async def republish_dead_letters(self) -> int:
        """Deliver the dead letters again (from attempt 1) to the listener that failed.

        A dead letter whose listener is no longer registered stays dead.

        Returns:
            How many messages were republished.
        """
        by_id = {listener.listener_id: listener for listener in self._listeners.values()}
        heard: list[DeadLetter] = []
        orphans: list[DeadLetter] = []
        for letter in self._dead_letters:
            (heard if (letter.listener_id or "") in by_id else orphans).append(letter)
        carried = self._carried_letters(heard)
        self._dead_letters.extend(orphans)
        for letter, each in carried:
            listener = by_id[letter.listener_id or ""]
            self._deliver(
                listener, _Delivery(each, 1, self.retry_policy.retry_attempts, letter.replay)
            )
        return len(carried)
