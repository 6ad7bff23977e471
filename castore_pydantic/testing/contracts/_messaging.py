"""The public contract suites for message queue adapters and message bus adapters.

Subclass :class:`MessageQueueAdapterContract` (or :class:`MessageBusAdapterContract`) in a test
module and override its factory fixture. The factory receives a channel and the retry options
of the test and returns a *connected* adapter attached to that channel; the fixture cleans up
what it made when the test ends::

    class TestMyQueueAdapter(MessageQueueAdapterContract):
        @pytest_asyncio.fixture
        async def queue_adapter_factory(self):
            adapters = []

            async def make(channel, *, retry_attempts, retry_delay_in_ms, retry_backoff_rate):
                adapter = MyQueueAdapter.attach_to(
                    channel, URL, retry_attempts=retry_attempts,
                    retry_delay_in_ms=retry_delay_in_ms, retry_backoff_rate=retry_backoff_rate,
                )
                await adapter.__aenter__()
                adapters.append(adapter)
                return adapter

            yield make
            for adapter in adapters:
                await adapter.purge()
                await adapter.aclose()

The suites use the adapter vocabulary every castore-pydantic messaging adapter shares:
``adapter.worker = handler`` (queues), ``adapter.on(pattern, handler, listener_id=...)``
(buses), ``async with adapter.consuming():``, ``delivery_guarantee``, ``await
adapter.dead_letters()`` and ``await adapter.republish_dead_letters()``. Handlers are registered
before consuming starts and messages are published inside the ``consuming()`` block. Every test
uses a fresh channel id, and retry delays of tens of milliseconds. The suites need
pytest-asyncio, in its strict mode (the default) or its auto mode; declare the factory with
``pytest_asyncio.fixture``, which both modes accept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, ClassVar, Protocol

import pytest
import pytest_asyncio

from castore_pydantic.messaging import (
    AggregateExistsMessage,
    AggregateExistsMessageBus,
    AggregateExistsMessageQueue,
    ConnectedEventStore,
    FilterPattern,
    Message,
    MessageChannel,
    MessageContext,
    NotificationMessageBus,
    NotificationMessageQueue,
    StateCarryingMessage,
    StateCarryingMessageBus,
    StateCarryingMessageQueue,
)
from castore_pydantic.testing.contracts._marks import async_tests
from castore_pydantic.testing.contracts._messaging_support import (
    T0,
    Call,
    Pokemon,
    PokemonCaught,
    Recorder,
    appeared,
    caught,
    notify,
    pokemon_store,
    trainer_created,
    trainer_store,
    unannotated_pokemon_store,
    wait_for_dead_letters,
)

__all__ = [
    "MessageAdapterFactory",
    "MessageBusAdapterContract",
    "MessageQueueAdapterContract",
]


async def _attached(
    factory: MessageAdapterFactory,
    channel: MessageChannel[Any],
    *,
    retry_attempts: int = 2,
    retry_delay_in_ms: float = 50,
    retry_backoff_rate: float = 1,
) -> Any:
    """An adapter from ``factory`` for ``channel``, retrying fast enough for a test."""
    return await factory(
        channel,
        retry_attempts=retry_attempts,
        retry_delay_in_ms=retry_delay_in_ms,
        retry_backoff_rate=retry_backoff_rate,
    )


class MessageAdapterFactory(Protocol):
    """Makes a connected adapter attached to ``channel`` with the given retry options."""

    def __call__(
        self,
        channel: MessageChannel[Any],
        *,
        retry_attempts: int,
        retry_delay_in_ms: float,
        retry_backoff_rate: float,
    ) -> Awaitable[Any]:
        """Return the adapter (already ``channel.message_channel_adapter``)."""
        ...


class _Base:
    #: How long to wait for a delivery before failing (brokers on a busy machine are slow).
    delivery_timeout: ClassVar[float] = 20.0
    #: How much later than its due time a retry may run, in seconds.
    retry_lateness: ClassVar[float] = 1.5

    def recorder(self, fail: Callable[[Any, MessageContext], bool] | None = None) -> Recorder:
        """A recording handler using this suite's timeout."""
        return Recorder(fail, timeout=self.delivery_timeout)

    async def check_consuming_vocabulary(
        self, adapter: Any, channel: Any, handler: Recorder
    ) -> None:
        """``consuming(grace_period=)``, ``is_consuming``, ``stop_consuming(grace_period=)``."""
        message = notify(appeared("vocabulary"))
        assert not adapter.is_consuming
        async with adapter.consuming(grace_period=5):
            assert adapter.is_consuming
            await channel.publish_message(message)
            await handler.wait_for(message)
        assert not adapter.is_consuming
        await adapter.start_consuming()
        assert adapter.is_consuming
        await adapter.stop_consuming(grace_period=5)
        assert not adapter.is_consuming

    def check_backoff(self, calls: Sequence[Call], delays_ms: Sequence[float]) -> None:
        """Each retry ran no earlier than its delay and not much later."""
        assert len(calls) == len(delays_ms) + 1
        for before, after, delay_ms in zip(calls, calls[1:], delays_ms, strict=False):
            gap = after.at - before.at
            due = delay_ms / 1000
            assert gap >= due * 0.95 - 0.005, f"retry after {gap:.3f}s, due after {due:.3f}s"
            assert gap <= due + self.retry_lateness, f"retry after {gap:.3f}s, due {due:.3f}s"


def _context(attempt: int, retry_attempts_left: int, *, replay: bool) -> MessageContext:
    return MessageContext(attempt=attempt, retry_attempts_left=retry_attempts_left, replay=replay)


def _fails_for(*messages: Message) -> Callable[[Any, MessageContext], bool]:
    return lambda message, _context: message in messages


def _unannotated_state() -> StateCarryingMessage:
    """A state-carrying message of a store whose reducer has no return annotation.

    Its event's metadata holds a tuple, which JSON gives back as a list.
    """
    event = caught("wire").model_copy(update={"metadata": {"ball": "poké", "pair": (1, 2)}})
    aggregate = Pokemon(aggregate_id="wire", version=2, name="Pikachu", level=5, status="caught")
    return StateCarryingMessage(event_store_id="POKEMONS", event=event, aggregate=aggregate)


#: ``_unannotated_state()``'s aggregate as its JSON form parses back: a mapping.
_WIRE_AGGREGATE = {
    "aggregateId": "wire",
    "version": 2,
    "name": "Pikachu",
    "level": 5,
    "status": "caught",
}


def _note_then_change(seen: list[tuple[Any, ...]]) -> Callable[[Any, MessageContext], bool]:
    """A failure rule that notes what a handler received, then changes it in place."""

    def note_then_change(message: Any, context: MessageContext) -> bool:
        seen.append(
            (
                type(message.event),
                type(message.aggregate),
                dict(message.aggregate),
                message.event.metadata["pair"],
            )
        )
        message.aggregate["status"] = "changed"
        message.event.metadata["pair"] = "changed"
        return context.attempt == 1

    return note_then_change


#: What every handler notes with ``_note_then_change`` from ``_unannotated_state()``.
_SEEN_ON_THE_WIRE = (PokemonCaught, dict, _WIRE_AGGREGATE, [1, 2])


@async_tests
class MessageQueueAdapterContract(_Base):
    """What every message queue adapter does; override ``queue_adapter_factory``.

    Covers: one worker gets each message once, in publishing order; ``publish_messages``; the
    worker's context (``attempt``, ``retry_attempts_left``, ``replay``); retries with back-off
    up to the budget, then a dead letter; replayed messages stay replays when retried; the
    three message kinds arrive equal to what was published (event and aggregate classes
    included), and as their JSON form parses back, a fresh copy per attempt; and a
    ``ConnectedEventStore`` publishing through the adapter.
    """

    @pytest_asyncio.fixture
    async def queue_adapter_factory(self) -> AsyncIterator[MessageAdapterFactory]:
        """Override: yield a factory of connected adapters; clean them up afterwards."""
        pytest.fail("override the queue_adapter_factory fixture")
        yield  # a generator fixture, like the overrides

    @staticmethod
    def _queue(kind: type[MessageChannel[Any]] = NotificationMessageQueue) -> Any:
        return kind(  # type: ignore[call-arg]
            message_queue_id=f"contract-queue-{uuid.uuid4().hex[:12]}",
            source_event_stores=[pokemon_store(), trainer_store()],
        )

    async def test_declares_its_delivery_guarantee(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """The adapter says whether it delivers at least or at most once."""
        queue = self._queue()
        adapter = await _attached(queue_adapter_factory, queue)
        assert queue.message_channel_adapter is adapter
        assert adapter.delivery_guarantee in ("at-least-once", "at-most-once")

    async def test_consuming_vocabulary(self, queue_adapter_factory: MessageAdapterFactory) -> None:
        """The consuming vocabulary every adapter of the library shares.

        ``consuming(grace_period=...)``, ``is_consuming``, ``stop_consuming(grace_period=...)``.
        """
        queue = self._queue()
        adapter = await _attached(queue_adapter_factory, queue)
        worker = self.recorder()
        adapter.worker = worker
        await self.check_consuming_vocabulary(adapter, queue, worker)

    async def test_consuming_needs_a_worker(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """Starting to consume without a worker is a ``RuntimeError``.

        Not a queue that drops or holds every message unseen.
        """
        queue = self._queue()
        adapter = await _attached(queue_adapter_factory, queue)
        with pytest.raises(RuntimeError, match="worker"):
            await adapter.start_consuming()
        assert not adapter.is_consuming

    async def test_each_message_reaches_the_worker_once_in_order(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """Messages published one by one reach the worker once each, first published first."""
        queue = self._queue()
        adapter = await _attached(queue_adapter_factory, queue)
        worker = self.recorder()
        adapter.worker = worker
        messages = [notify(appeared(f"p{i}", level=i + 1)) for i in range(10)]
        sentinel = notify(appeared("last"))
        async with adapter.consuming():
            for message in messages:
                await queue.publish_message(message)
            await worker.wait_for(messages[-1])
            await queue.publish_message(sentinel)
            await worker.wait_for(sentinel)
        assert worker.messages == [*messages, sentinel]

    async def test_publish_messages_delivers_all_in_order(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """``publish_messages`` hands every message to the worker, in order."""
        queue = self._queue()
        adapter = await _attached(queue_adapter_factory, queue)
        worker = self.recorder()
        adapter.worker = worker
        messages = [notify(appeared("a")), notify(caught("a")), notify(trainer_created("t"))]
        async with adapter.consuming():
            await queue.publish_messages(messages)
            await worker.wait_for(messages[-1])
        assert worker.messages == messages
        assert all(call.context == _context(1, 2, replay=False) for call in worker.calls)

    async def test_worker_context_of_a_first_delivery(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """A first delivery has attempt 1, the whole retry budget left, and the replay flag."""
        queue = self._queue()
        adapter = await _attached(queue_adapter_factory, queue, retry_attempts=3)
        worker = self.recorder()
        adapter.worker = worker
        live, replayed = notify(appeared("live")), notify(appeared("old"))
        async with adapter.consuming():
            await queue.publish_message(live)
            await queue.publish_message(replayed, replay=True)
            await worker.wait_for(replayed)
        assert [call.context for call in worker.calls] == [
            MessageContext(attempt=1, retry_attempts_left=3, replay=False),
            MessageContext(attempt=1, retry_attempts_left=3, replay=True),
        ]

    async def test_failing_message_is_retried_then_dead_lettered(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """A message that always fails runs 1 + retry_attempts times, then becomes a dead letter."""
        queue = self._queue()
        adapter = await _attached(queue_adapter_factory, queue)
        poison, healthy = notify(appeared("poison")), notify(appeared("healthy"))
        worker = self.recorder(_fails_for(poison))
        adapter.worker = worker
        async with adapter.consuming():
            await queue.publish_message(poison)
            await queue.publish_message(healthy)
            await worker.wait_for(poison, 3)
            letters = await wait_for_dead_letters(adapter, 1, self.delivery_timeout)
            sentinel = notify(appeared("sentinel"))
            await queue.publish_message(sentinel)
            await worker.wait_for(sentinel)
        assert [call.context for call in worker.calls_for(poison)] == [
            _context(1, 2, replay=False),
            _context(2, 1, replay=False),
            _context(3, 0, replay=False),
        ]
        assert len(worker.calls_for(healthy)) == 1
        (letter,) = letters
        assert letter.message == poison
        assert letter.attempts == 3
        assert letter.replay is False
        assert "contract failure on attempt 3" in letter.error

    async def test_a_long_error_is_cut_in_the_dead_letter(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """The dead letter of a huge error message keeps its start, at most 4,000 characters."""
        queue = self._queue()
        adapter = await _attached(queue_adapter_factory, queue, retry_attempts=0)
        message = notify(appeared("verbose"))

        async def worker(_message: Any, _context: MessageContext) -> None:
            raise ValueError("x" * 100_000)

        adapter.worker = worker
        async with adapter.consuming():
            await queue.publish_message(message)
            (letter,) = await wait_for_dead_letters(adapter, 1, self.delivery_timeout)
        assert letter.error.startswith("ValueError: xxx")
        assert len(letter.error) <= 4000

    async def test_a_worker_raising_cancelled_error_fails_like_any_worker(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """A worker raising ``CancelledError`` that nobody sent it fails like any worker.

        It awaited something another task cancelled: its message is retried, then
        dead-lettered, and the next message is still handled.
        """
        queue = self._queue()
        adapter = await _attached(queue_adapter_factory, queue, retry_attempts=1)
        doomed, healthy = notify(appeared("doomed")), notify(appeared("healthy"))
        seen: list[tuple[Any, int]] = []
        healthy_seen = asyncio.Event()

        async def worker(message: Any, context: MessageContext) -> None:
            seen.append((message, context.attempt))
            if message == healthy:
                healthy_seen.set()
            if message == doomed:
                cancelled = asyncio.get_running_loop().create_future()
                cancelled.cancel()
                await cancelled

        adapter.worker = worker
        async with adapter.consuming():
            await queue.publish_message(doomed)
            await queue.publish_message(healthy)
            (letter,) = await wait_for_dead_letters(adapter, 1, self.delivery_timeout)
            await asyncio.wait_for(healthy_seen.wait(), self.delivery_timeout)
        assert [attempt for message, attempt in seen if message == doomed] == [1, 2]
        assert letter.message == doomed
        assert "raised CancelledError" in letter.error

    async def test_a_failing_message_does_not_block_the_next(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """While a failed message waits for its retry, the next message is handled."""
        queue = self._queue()
        adapter = await _attached(
            queue_adapter_factory, queue, retry_attempts=1, retry_delay_in_ms=1000
        )
        first, second = notify(appeared("first")), notify(appeared("second"))
        worker = self.recorder(lambda message, context: message == first and context.attempt == 1)
        adapter.worker = worker
        async with adapter.consuming():
            await queue.publish_messages([first, second])
            await worker.wait_for(first, 2)
        assert worker.messages == [first, second, first]

    async def test_retries_follow_the_backoff(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """Retries wait retry_delay_in_ms * retry_backoff_rate ** (attempt - 1) ms."""
        queue = self._queue()
        adapter = await _attached(
            queue_adapter_factory, queue, retry_attempts=3, retry_backoff_rate=1.5
        )
        message = notify(appeared("flaky"))
        worker = self.recorder(lambda _message, context: context.attempt <= 3)
        adapter.worker = worker
        async with adapter.consuming():
            await queue.publish_message(message)
            calls = await worker.wait_for(message, 4)
        self.check_backoff(calls, [50, 75, 112.5])
        assert [call.context.retry_attempts_left for call in calls] == [3, 2, 1, 0]
        assert await adapter.dead_letters() == []

    async def test_retried_replay_stays_a_replay(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """A replayed message that fails is retried with replay=True."""
        queue = self._queue()
        adapter = await _attached(queue_adapter_factory, queue, retry_attempts=1)
        message = notify(appeared("old"))
        worker = self.recorder(lambda _message, context: context.attempt == 1)
        adapter.worker = worker
        async with adapter.consuming():
            await queue.publish_message(message, replay=True)
            calls = await worker.wait_for(message, 2)
        assert [call.context for call in calls] == [
            _context(1, 1, replay=True),
            _context(2, 0, replay=True),
        ]

    async def test_dead_letters_can_be_republished(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """Republished dead letters reach the worker again from attempt 1 and leave the DLQ."""
        queue = self._queue()
        adapter = await _attached(queue_adapter_factory, queue, retry_attempts=0)
        message = notify(caught("p"))
        broken = True
        worker = self.recorder(lambda _message, _context: broken)
        adapter.worker = worker
        async with adapter.consuming():
            await queue.publish_message(message, replay=True)
            await worker.wait_for(message)
            await wait_for_dead_letters(adapter, 1, self.delivery_timeout)
            broken = False
            assert await adapter.republish_dead_letters() == 1
            calls = await worker.wait_for(message, 2)
            assert await adapter.dead_letters() == []
        assert calls[1].context == _context(1, 0, replay=True)

    @pytest.mark.parametrize(
        ("kind", "message"),
        [
            (NotificationMessageQueue, notify(caught("p", 7))),
            (
                StateCarryingMessageQueue,
                StateCarryingMessage(
                    event_store_id="POKEMONS",
                    event=caught("p"),
                    aggregate=Pokemon(
                        aggregate_id="p", version=2, name="Mew", level=3, status="caught"
                    ),
                ),
            ),
            (
                AggregateExistsMessageQueue,
                AggregateExistsMessage(
                    event_store_id="TRAINERS",
                    aggregate_id="t",
                    initial_event_timestamp=T0 + timedelta(milliseconds=7),
                ),
            ),
        ],
    )
    async def test_messages_arrive_as_published(
        self,
        queue_adapter_factory: MessageAdapterFactory,
        kind: type[MessageChannel[Any]],
        message: Message,
    ) -> None:
        """Every message kind reaches the worker equal to what was published, with its classes."""
        queue = self._queue(kind)
        adapter = await _attached(queue_adapter_factory, queue, retry_attempts=0)
        worker = self.recorder()
        adapter.worker = worker
        async with adapter.consuming():
            await queue.publish_message(message)
            (call,) = await worker.wait_for(message)
        received = call.message
        if not isinstance(message, AggregateExistsMessage):
            assert type(received.event) is type(message.event)
        if isinstance(message, StateCarryingMessage):
            assert type(received.aggregate) is Pokemon
        assert type(received) is type(message)
        assert received.model_dump_json() == message.model_dump_json()

    async def test_messages_arrive_in_their_wire_form(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """The worker gets what the JSON form parses back to, a fresh copy on each attempt.

        Over a store whose reducer has no return annotation, a state-carrying message's
        aggregate is its JSON object (camelCase keys), a tuple in the event is a list, and
        what a failed attempt changed in its message is not seen by the retry.
        """
        queue = StateCarryingMessageQueue(
            message_queue_id=f"contract-queue-{uuid.uuid4().hex[:12]}",
            source_event_stores=[unannotated_pokemon_store()],
        )
        adapter = await _attached(queue_adapter_factory, queue, retry_attempts=1)
        seen: list[tuple[Any, ...]] = []
        worker = self.recorder(_note_then_change(seen))
        adapter.worker = worker
        async with adapter.consuming():
            await queue.publish_message(_unannotated_state())
            await worker.wait_until(lambda: len(worker.calls) >= 2, "a first attempt and a retry")
        assert seen == [_SEEN_ON_THE_WIRE, _SEEN_ON_THE_WIRE]

    async def test_connected_event_store_publishes_through_the_adapter(
        self, queue_adapter_factory: MessageAdapterFactory
    ) -> None:
        """Events pushed to a ConnectedEventStore reach the worker as stored."""
        queue = self._queue(StateCarryingMessageQueue)
        adapter = await _attached(queue_adapter_factory, queue, retry_attempts=0)
        worker = self.recorder()
        adapter.worker = worker
        pokemons = ConnectedEventStore(queue.get_event_store("POKEMONS"), queue)
        async with adapter.consuming():
            first = await pokemons.push_event(appeared("pika"))
            second = await pokemons.push_event(caught("pika"))
            await worker.wait_until(lambda: len(worker.calls) >= 2, "two messages")
        assert worker.messages == [
            StateCarryingMessage(
                event_store_id="POKEMONS", event=first.event, aggregate=first.next_aggregate
            ),
            StateCarryingMessage(
                event_store_id="POKEMONS",
                event=second.event,
                aggregate=(await pokemons.get_aggregate("pika")).aggregate,
            ),
        ]


@async_tests
class MessageBusAdapterContract(_Base):
    """What every message bus adapter does; override ``bus_adapter_factory``.

    Covers: every listener gets each matching message once; filter patterns (event store,
    event type, ``on_replay``) with Castore's rules; a listener registered twice gets a message
    once; per-listener retries with back-off, then a dead letter naming the listener; replays
    stay replays when retried; ``publish_messages``; the three message kinds arrive equal to
    what was published.
    """

    @pytest_asyncio.fixture
    async def bus_adapter_factory(self) -> AsyncIterator[MessageAdapterFactory]:
        """Override: yield a factory of connected adapters; clean them up afterwards."""
        pytest.fail("override the bus_adapter_factory fixture")
        yield  # a generator fixture, like the overrides

    @staticmethod
    def _bus(kind: type[MessageChannel[Any]] = NotificationMessageBus) -> Any:
        return kind(  # type: ignore[call-arg]
            message_bus_id=f"contract-bus-{uuid.uuid4().hex[:12]}",
            source_event_stores=[pokemon_store(), trainer_store()],
        )

    async def test_declares_its_delivery_guarantee(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """The adapter says whether it delivers at least or at most once."""
        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus)
        assert bus.message_channel_adapter is adapter
        assert adapter.delivery_guarantee in ("at-least-once", "at-most-once")

    async def test_consuming_vocabulary(self, bus_adapter_factory: MessageAdapterFactory) -> None:
        """The consuming vocabulary every adapter of the library shares.

        ``consuming(grace_period=...)``, ``is_consuming``, ``stop_consuming(grace_period=...)``.
        """
        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus)
        listener = self.recorder()
        adapter.on({}, listener, listener_id="vocabulary")
        await self.check_consuming_vocabulary(adapter, bus, listener)

    async def test_every_listener_gets_each_message_once(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """Two listeners each receive every message exactly once, with a first-delivery context."""
        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus)
        first, second = self.recorder(), self.recorder()
        adapter.on({}, first, listener_id="first")
        adapter.on({}, second, listener_id="second")
        messages = [notify(appeared(f"p{i}")) for i in range(5)]
        sentinel = notify(trainer_created("sentinel"))
        async with adapter.consuming():
            for message in messages:
                await bus.publish_message(message)
            await bus.publish_message(sentinel)
            await first.wait_for(sentinel)
            await second.wait_for(sentinel)
        for listener in (first, second):
            assert sorted(listener.messages, key=repr) == sorted([*messages, sentinel], key=repr)
            assert {call.context for call in listener.calls} == {_context(1, 2, replay=False)}

    async def test_a_handler_object_without_listener_id_is_named_by_its_class(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """A callable object registered without ``listener_id`` listens like any handler."""
        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus)
        listener = self.recorder()
        adapter.on({}, listener)
        message = notify(appeared("named"))
        async with adapter.consuming():
            await bus.publish_message(message)
            await listener.wait_for(message)
        assert listener.messages == [message]

    async def test_publish_messages_reaches_listeners(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """``publish_messages`` delivers every message to a matching listener."""
        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus)
        listener = self.recorder()
        adapter.on({}, listener, listener_id="all")
        messages = [notify(appeared("a")), notify(caught("a")), notify(trainer_created("t"))]
        async with adapter.consuming():
            await bus.publish_messages(messages)
            for message in messages:
                await listener.wait_for(message)
        assert sorted(listener.messages, key=repr) == sorted(messages, key=repr)

    async def test_filter_patterns(self, bus_adapter_factory: MessageAdapterFactory) -> None:
        """Store+type, store-only, empty and type-only patterns select as Castore's rules say."""
        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus, retry_attempts=0)
        typed, by_store, everything, type_only = (self.recorder() for _ in range(4))
        adapter.on(
            {"event_store_id": "POKEMONS", "event_type": "POKEMON_APPEARED"},
            typed,
            listener_id="typed",
        )
        adapter.on({"event_store_id": "TRAINERS"}, by_store, listener_id="by-store")
        adapter.on({}, everything, listener_id="everything")
        # Castore's rule: an event type without an event store id filters nothing.
        adapter.on({"event_type": "POKEMON_CAUGHT"}, type_only, listener_id="type-only")
        one, two, three = notify(appeared("a")), notify(caught("a")), notify(trainer_created("t"))
        last_pokemon, last_trainer = notify(appeared("z")), notify(trainer_created("z"))
        async with adapter.consuming():
            for message in (one, two, three, last_pokemon, last_trainer):
                await bus.publish_message(message)
            await typed.wait_for(last_pokemon)
            await by_store.wait_for(last_trainer)
            await everything.wait_for(last_pokemon)
            await everything.wait_for(last_trainer)
            await type_only.wait_for(last_pokemon)
            await type_only.wait_for(last_trainer)
        assert sorted(typed.messages, key=repr) == sorted([one, last_pokemon], key=repr)
        assert sorted(by_store.messages, key=repr) == sorted([three, last_trainer], key=repr)
        every = sorted([one, two, three, last_pokemon, last_trainer], key=repr)
        assert sorted(everything.messages, key=repr) == every
        assert sorted(type_only.messages, key=repr) == every

    async def test_aggregate_exists_messages_never_match_a_typed_pattern(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """Aggregate-exists messages match store-only patterns, never typed ones (no event type)."""
        bus = self._bus(AggregateExistsMessageBus)
        adapter = await _attached(bus_adapter_factory, bus, retry_attempts=0)
        typed, by_store = self.recorder(), self.recorder()
        adapter.on(
            {"event_store_id": "POKEMONS", "event_type": "POKEMON_APPEARED"},
            typed,
            listener_id="typed",
        )
        adapter.on({"event_store_id": "POKEMONS"}, by_store, listener_id="by-store")
        # A second pattern gives ``typed`` a message it must get after the one it must not.
        adapter.on({"event_store_id": "TRAINERS"}, typed, listener_id="typed")
        pokemon = AggregateExistsMessage(
            event_store_id="POKEMONS", aggregate_id="a", initial_event_timestamp=T0
        )
        trainer = AggregateExistsMessage(
            event_store_id="TRAINERS", aggregate_id="t", initial_event_timestamp=T0
        )
        async with adapter.consuming():
            await bus.publish_message(pokemon)
            await bus.publish_message(trainer)
            await by_store.wait_for(pokemon)
            await typed.wait_for(trainer)
        assert typed.messages == [trainer]
        assert by_store.messages == [pokemon]

    async def test_a_listener_registered_twice_gets_a_message_once(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """A second pattern widens a listener; a message matching both is delivered once."""
        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus, retry_attempts=0)
        listener, witness = self.recorder(), self.recorder()
        adapter.on({"event_store_id": "POKEMONS"}, listener, listener_id="twice")
        adapter.on(
            {"event_store_id": "POKEMONS", "event_type": "POKEMON_APPEARED"},
            listener,
            listener_id="twice",
        )
        adapter.on({"event_store_id": "TRAINERS"}, listener, listener_id="twice")
        adapter.on({}, witness, listener_id="witness")
        both, trainer = notify(appeared("a")), notify(trainer_created("t"))
        sentinel = notify(caught("a"))
        async with adapter.consuming():
            await bus.publish_messages([both, trainer, sentinel])
            await witness.wait_for(sentinel)
            await listener.wait_for(sentinel)
        assert sorted(listener.messages, key=repr) == sorted([both, trainer, sentinel], key=repr)

    async def test_a_bound_method_registered_twice_is_one_listener(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """``projection.handle`` twice is one handler; another object's ``handle`` is not.

        Python makes a new bound method on each access; two objects that compare equal are
        still two handlers.
        """
        recorder = self.recorder()

        class Projection:
            async def handle(self, message: Any, context: MessageContext) -> None:
                await recorder(message, context)

        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus, retry_attempts=0)
        projection = Projection()
        adapter.on({"event_store_id": "POKEMONS"}, projection.handle)
        adapter.on({"event_store_id": "TRAINERS"}, projection.handle)
        with pytest.raises(ValueError, match="already used by another handler"):
            adapter.on({}, Projection().handle)

        @dataclasses.dataclass
        class Projector:  # two instances compare equal, yet are two handlers
            name: str

            async def __call__(self, message: Any, context: MessageContext) -> None:
                return None

        adapter.on({}, Projector("pokedex"))
        with pytest.raises(ValueError, match="already used by another handler"):
            adapter.on({}, Projector("pokedex"))
        both, trainer = notify(appeared("a")), notify(trainer_created("t"))
        async with adapter.consuming():
            await bus.publish_messages([both, trainer])
            await recorder.wait_for(trainer)
            await recorder.wait_for(both)
        assert sorted(recorder.messages, key=repr) == sorted([both, trainer], key=repr)

    async def test_replays_reach_only_on_replay_listeners(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """A replayed message reaches listeners with on_replay=True only, flagged as a replay."""
        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus, retry_attempts=0)
        live, replaying = self.recorder(), self.recorder()
        adapter.on({}, live, listener_id="live")
        adapter.on({"event_store_id": "POKEMONS", "on_replay": True}, replaying, listener_id="rp")
        old, new = notify(appeared("old")), notify(appeared("new"))
        async with adapter.consuming():
            await bus.publish_message(old, replay=True)
            await replaying.wait_for(old)
            await bus.publish_message(new)
            await live.wait_for(new)
            await replaying.wait_for(new)
        assert live.messages == [new]
        assert [(c.message, c.context.replay) for c in replaying.calls] == [
            (old, True),
            (new, False),
        ]

    async def test_failing_listener_is_retried_alone_then_dead_lettered(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """Only the failing listener is retried, up to the budget; then a dead letter names it."""
        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus)
        message = notify(appeared("a"))
        healthy, failing = self.recorder(), self.recorder(_fails_for(message))
        adapter.on({}, healthy, listener_id="healthy")
        adapter.on({}, failing, listener_id="failing")
        sentinel = notify(trainer_created("sentinel"))
        async with adapter.consuming():
            await bus.publish_message(message)
            calls = await failing.wait_for(message, 3)
            (letter,) = await wait_for_dead_letters(adapter, 1, self.delivery_timeout)
            await bus.publish_message(sentinel)
            await healthy.wait_for(sentinel)
            await failing.wait_for(sentinel)
        assert [call.context for call in calls] == [
            _context(1, 2, replay=False),
            _context(2, 1, replay=False),
            _context(3, 0, replay=False),
        ]
        assert len(failing.calls_for(message)) == 3
        assert healthy.messages == [message, sentinel]
        assert letter.message == message
        assert letter.attempts == 3
        assert letter.listener_id == "failing"
        assert "contract failure on attempt 3" in letter.error

    async def test_retries_follow_the_backoff(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """Retries wait retry_delay_in_ms * retry_backoff_rate ** (attempt - 1) ms."""
        bus = self._bus()
        adapter = await _attached(
            bus_adapter_factory, bus, retry_attempts=3, retry_backoff_rate=1.5
        )
        message = notify(appeared("flaky"))
        listener = self.recorder(lambda _message, context: context.attempt <= 3)
        adapter.on({}, listener, listener_id="flaky")
        async with adapter.consuming():
            await bus.publish_message(message)
            calls = await listener.wait_for(message, 4)
        self.check_backoff(calls, [50, 75, 112.5])
        assert await adapter.dead_letters() == []

    async def test_retried_replay_stays_a_replay(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """A replayed message that fails is retried with replay=True (Castore says False)."""
        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus, retry_attempts=1)
        message = notify(appeared("old"))
        listener = self.recorder(lambda _message, context: context.attempt == 1)
        adapter.on({"on_replay": True}, listener, listener_id="replayer")
        async with adapter.consuming():
            await bus.publish_message(message, replay=True)
            calls = await listener.wait_for(message, 2)
        assert [call.context for call in calls] == [
            _context(1, 1, replay=True),
            _context(2, 0, replay=True),
        ]

    async def test_messages_arrive_in_their_wire_form(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """Each listener gets what the JSON form parses back to, its own copy on each attempt.

        Over a store whose reducer has no return annotation, a state-carrying message's
        aggregate is its JSON object (camelCase keys), a tuple in the event is a list, and
        what one listener (or a failed attempt) changed in its message no other call sees.
        """
        bus = StateCarryingMessageBus(
            message_bus_id=f"contract-bus-{uuid.uuid4().hex[:12]}",
            source_event_stores=[unannotated_pokemon_store()],
        )
        adapter = await _attached(bus_adapter_factory, bus, retry_attempts=1)
        seen: list[tuple[Any, ...]] = []
        first = self.recorder(_note_then_change(seen))
        second = self.recorder(_note_then_change(seen))
        adapter.on({}, first, listener_id="first")
        adapter.on({}, second, listener_id="second")
        async with adapter.consuming():
            await bus.publish_message(_unannotated_state())
            for listener in (first, second):
                await listener.wait_until(lambda: len(listener.calls) >= 2, "a retry")  # noqa: B023
        assert seen == [_SEEN_ON_THE_WIRE] * 4

    async def test_dead_letters_go_back_to_their_listener(
        self, bus_adapter_factory: MessageAdapterFactory
    ) -> None:
        """Republishing a dead letter delivers it to the listener that failed, not the others."""
        bus = self._bus()
        adapter = await _attached(bus_adapter_factory, bus, retry_attempts=0)
        message = notify(appeared("a"))
        broken = True
        healthy, failing = self.recorder(), self.recorder(lambda _m, _c: broken)
        adapter.on({}, healthy, listener_id="healthy")
        adapter.on({}, failing, listener_id="failing")
        async with adapter.consuming():
            await bus.publish_message(message)
            await healthy.wait_for(message)
            await wait_for_dead_letters(adapter, 1, self.delivery_timeout)
            broken = False
            assert await adapter.republish_dead_letters() == 1
            calls = await failing.wait_for(message, 2)
            assert await adapter.dead_letters() == []
            sentinel = notify(caught("a"))
            await bus.publish_message(sentinel)
            await healthy.wait_for(sentinel)
        assert calls[1].context == _context(1, 0, replay=False)
        assert healthy.messages == [message, sentinel]

    @pytest.mark.parametrize(
        ("kind", "message"),
        [
            (NotificationMessageBus, notify(caught("p", 7))),
            (
                StateCarryingMessageBus,
                StateCarryingMessage(
                    event_store_id="POKEMONS",
                    event=appeared("p", name="Évoli", level=100),
                    aggregate=Pokemon(
                        aggregate_id="p", version=1, name="Évoli", level=100, status="wild"
                    ),
                ),
            ),
            (
                AggregateExistsMessageBus,
                AggregateExistsMessage(
                    event_store_id="TRAINERS",
                    aggregate_id="t",
                    initial_event_timestamp=T0 + timedelta(milliseconds=7),
                ),
            ),
        ],
    )
    async def test_messages_arrive_as_published(
        self,
        bus_adapter_factory: MessageAdapterFactory,
        kind: type[MessageChannel[Any]],
        message: Message,
    ) -> None:
        """Every message kind reaches a listener equal to what was published, with its classes."""
        bus = self._bus(kind)
        adapter = await _attached(bus_adapter_factory, bus, retry_attempts=0)
        listener = self.recorder()
        pattern: FilterPattern = {"event_store_id": message.event_store_id}
        adapter.on(pattern, listener, listener_id="round-trip")
        async with adapter.consuming():
            await bus.publish_message(message)
            (call,) = await listener.wait_for(message)
        received = call.message
        if not isinstance(message, AggregateExistsMessage):
            assert type(received.event) is type(message.event)
        if isinstance(message, StateCarryingMessage):
            assert type(received.aggregate) is Pokemon
        assert type(received) is type(message)
        assert received.model_dump_json() == message.model_dump_json()
