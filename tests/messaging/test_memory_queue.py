from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import json
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from unittest.mock import AsyncMock

import pytest
from pydantic import ValidationError, model_validator

from castore_pydantic import Aggregate, Event, EventStore
from castore_pydantic.errors import MessageChannelEventStoreNotFoundError
from castore_pydantic.messaging import (
    ConnectedEventStore,
    DeadLetter,
    Message,
    MessageChannel,
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
    StateCarryingMessage,
    StateCarryingMessageBus,
    StateCarryingMessageQueue,
)
from castore_pydantic.messaging.memory import InMemoryMessageBusAdapter, InMemoryMessageQueueAdapter
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from castore_pydantic.testing.contracts import MessageAdapterFactory, MessageQueueAdapterContract
from tests.domain import (
    Pokemon,
    PokemonAppeared,
    PokemonCaught,
    appeared,
    make_store,
    reduce_pokemon,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


class TestInMemoryQueueContract(MessageQueueAdapterContract):
    """The in-memory queue adapter honours the public message queue contract."""

    @pytest.fixture
    async def queue_adapter_factory(self) -> AsyncIterator[MessageAdapterFactory]:
        adapters: list[InMemoryMessageQueueAdapter] = []

        async def make(
            channel: MessageChannel[Any],
            *,
            retry_attempts: int,
            retry_delay_in_ms: float,
            retry_backoff_rate: float,
        ) -> InMemoryMessageQueueAdapter:
            adapter = InMemoryMessageQueueAdapter.attach_to(
                channel,
                retry_attempts=retry_attempts,
                retry_delay_in_ms=retry_delay_in_ms,
                retry_backoff_rate=retry_backoff_rate,
            )
            adapters.append(adapter)
            return adapter

        yield make
        for adapter in adapters:
            await adapter.aclose()


def caught(aggregate_id: str = "pikachu", version: int = 2) -> NotificationMessage:
    return NotificationMessage(
        event_store_id="POKEMONS",
        event=PokemonCaught(aggregate_id=aggregate_id, version=version, timestamp=T0),
    )


def make_queue() -> NotificationMessageQueue:
    return NotificationMessageQueue(message_queue_id="pokemons", source_event_stores=[make_store()])


class Worker:
    """Records calls; fails while ``failures`` remain; may wait for ``gate``."""

    def __init__(self, failures: int = 0, gate: asyncio.Event | None = None) -> None:
        self.calls: list[tuple[Message, MessageContext, float]] = []
        self.failures = failures
        self.gate = gate
        self.active = 0
        self.max_active = 0
        self.called = asyncio.Event()

    async def __call__(self, message: Message, context: MessageContext) -> None:
        self.calls.append((message, context, asyncio.get_running_loop().time()))
        self.called.set()
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            for _ in range(3):
                await asyncio.sleep(0)
            if self.failures > 0:
                self.failures -= 1
                raise RuntimeError(f"worker failed on attempt {context.attempt}")
        finally:
            self.active -= 1

    @property
    def messages(self) -> list[Message]:
        return [message for message, _, _ in self.calls]


class TestInMemoryQueue:
    async def test_without_worker_messages_are_dropped_with_a_warning(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """B99: no worker: publishing resolves, queue is None, the drop is logged."""
        queue = make_queue()
        adapter = InMemoryMessageQueueAdapter.attach_to(queue)
        assert adapter.queue is None
        with caplog.at_level(logging.WARNING, logger="castore_pydantic.messaging"):
            await queue.publish_message(caught())
        await adapter.join()
        assert "no worker: message dropped" in caplog.text
        assert '"aggregateId":"pikachu"' in caplog.text
        worker = Worker()
        adapter.worker = worker
        await adapter.join()
        assert worker.calls == []

    async def test_a_plain_function_is_a_worker(self) -> None:
        """A worker written without async (as Castore allows) had its None awaited: every
        attempt failed after doing the work, which ran three times and was dead-lettered."""
        queue = make_queue()
        effects: list[tuple[str, MessageContext]] = []

        def index(message: NotificationMessage, context: MessageContext) -> None:
            effects.append((message.event.aggregate_id, context))

        adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=index, retry_delay_in_ms=1)
        await queue.publish_message(caught())
        await adapter.join()
        assert effects == [("pikachu", MessageContext(1, 2, False))]
        assert await adapter.dead_letters() == []

    async def test_a_plain_function_that_raises_is_retried(self) -> None:
        """A plain worker that raises fails its attempt like an async one."""
        queue = make_queue()
        contexts: list[MessageContext] = []

        def fail(message: NotificationMessage, context: MessageContext) -> None:
            contexts.append(context)
            raise ValueError("boom")

        adapter = InMemoryMessageQueueAdapter.attach_to(
            queue, worker=fail, retry_attempts=1, retry_delay_in_ms=1
        )
        await queue.publish_message(caught())
        await adapter.join()
        assert [context.attempt for context in contexts] == [1, 2]
        assert [(letter.error, letter.attempts) for letter in await adapter.dead_letters()] == [
            ("ValueError: boom", 2)
        ]

    async def test_a_worker_returning_an_async_generator_fails(self) -> None:
        """An async def worker with a stray yield returns an async generator whose body
        never runs: that counted as success and the message was acknowledged, its work
        never done. It now fails with a TypeError and is dead-lettered."""
        queue = make_queue()
        done: list[str] = []

        async def index(message: NotificationMessage, context: MessageContext) -> Any:
            done.append(message.event.aggregate_id)
            yield

        adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=index, retry_attempts=0)
        await queue.publish_message(caught())
        await adapter.join()
        assert done == []
        [letter] = await adapter.dead_letters()
        assert letter.error.startswith("TypeError: handler ")
        assert "index returned async_generator: its body never ran" in letter.error

    async def test_a_plain_worker_may_return_a_value(self) -> None:
        """Castore ignores what its workers return: a plain worker returning True (or
        what dict.setdefault gives) failed every attempt after doing its work, and the
        message was dead-lettered after three runs."""
        queue = make_queue()
        done: list[str] = []

        def index(message: NotificationMessage, context: MessageContext) -> bool:
            done.append(message.event.aggregate_id)
            return True

        adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=index, retry_delay_in_ms=1)
        await queue.publish_message(caught())
        await adapter.join()
        assert done == ["pikachu"]
        assert await adapter.dead_letters() == []

    async def test_a_worker_returning_an_executor_future_has_it_awaited(self) -> None:
        """A plain worker returning executor.submit(...) had the thread's failure ignored
        and the message acknowledged. The future is now awaited: its failure fails the
        attempt."""
        queue = make_queue()

        def write(message: NotificationMessage) -> None:
            raise RuntimeError("the projection refused the write")

        with concurrent.futures.ThreadPoolExecutor(1) as pool:

            def index(message: NotificationMessage, context: MessageContext) -> Any:
                return pool.submit(write, message)

            adapter = InMemoryMessageQueueAdapter.attach_to(
                queue, worker=index, retry_attempts=1, retry_delay_in_ms=1
            )
            await queue.publish_message(caught())
            await adapter.join()
        [letter] = await adapter.dead_letters()
        assert letter.attempts == 2
        assert letter.error == "RuntimeError: the projection refused the write"

    async def test_default_context_and_replay(self) -> None:
        """B100: attempt 1, 2 retries left, replay False; replay=True is passed through."""
        queue = make_queue()
        worker = Worker()
        adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=worker)
        assert id(adapter.worker) == id(worker)
        await queue.publish_message(caught())
        assert len(worker.calls) == 1  # an idle worker has started when publishing returns
        await queue.publish_message(caught(), replay=True)
        await adapter.join()
        assert [context for _, context, _ in worker.calls] == [
            MessageContext(attempt=1, retry_attempts_left=2, replay=False),
            MessageContext(attempt=1, retry_attempts_left=2, replay=True),
        ]

    async def test_a_new_worker_gets_later_messages(self) -> None:
        """B101: after replacing the worker, new messages go to the new one; waiting ones stay."""
        queue = make_queue()
        gate = asyncio.Event()
        old = Worker(gate=gate)
        adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=old)
        one, two, three = caught("one"), caught("two"), caught("three")
        await queue.publish_messages([one, two])
        new = Worker()
        adapter.worker = new
        await queue.publish_message(three)
        gate.set()
        await adapter.join()
        assert old.messages == [one, two]
        assert new.messages == [three]

    async def test_one_message_at_a_time_in_order(self) -> None:
        """B102: the worker handles messages one at a time, first published first."""
        queue = make_queue()
        worker = Worker()
        adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=worker)
        messages = [caught(f"p{i}") for i in range(20)]
        await queue.publish_messages(messages[:3])
        for message in messages[3:]:
            await queue.publish_message(message)
        await adapter.join()
        assert worker.messages == messages
        assert worker.max_active == 1

    async def test_retry_timing_follows_the_backoff(self) -> None:
        """B103: 3 retries, 50 ms, rate 1.5: four runs spaced about 50, 75 and 112.5 ms."""
        queue = make_queue()
        worker = Worker(failures=3)
        adapter = InMemoryMessageQueueAdapter.attach_to(
            queue, worker=worker, retry_attempts=3, retry_delay_in_ms=50, retry_backoff_rate=1.5
        )
        await queue.publish_message(caught())
        await adapter.join()
        times = [at for _, _, at in worker.calls]
        gaps = [after - before for before, after in itertools.pairwise(times)]
        assert len(gaps) == 3
        for gap, due in zip(gaps, [0.050, 0.075, 0.1125], strict=True):
            assert due * 0.95 <= gap <= due + 0.5, (gaps, due)
        assert [(c.attempt, c.retry_attempts_left) for _, c, _ in worker.calls] == [
            (1, 3),
            (2, 2),
            (3, 1),
            (4, 0),
        ]
        assert await adapter.dead_letters() == []

    async def test_retries_go_to_the_tail(self) -> None:
        """A retried message is queued behind messages published meanwhile."""
        queue = make_queue()
        worker = Worker(failures=1)
        adapter = InMemoryMessageQueueAdapter.attach_to(
            queue, worker=worker, retry_attempts=1, retry_delay_in_ms=0
        )
        first, second = caught("first"), caught("second")
        await queue.publish_messages([first, second])
        await adapter.join()
        assert worker.messages == [first, second, first]

    async def test_exhausted_failure_is_logged_and_dead_lettered(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """When the last retry fails, the message and error are logged and dead-lettered."""
        queue = make_queue()
        worker = Worker(failures=10)
        adapter = InMemoryMessageQueueAdapter.attach_to(
            queue, worker=worker, retry_attempts=1, retry_delay_in_ms=1
        )
        message = caught()
        with caplog.at_level(logging.ERROR, logger="castore_pydantic.messaging"):
            await queue.publish_message(message, replay=True)
            await adapter.join()
        assert len(worker.calls) == 2
        (record,) = caplog.records
        assert record.name == "castore_pydantic.messaging"
        assert record.levelno == logging.ERROR
        assert "after 2 attempt(s)" in record.getMessage()
        assert "RuntimeError: worker failed on attempt 2" in record.getMessage()
        assert message.model_dump_json() in record.getMessage()
        assert record.exc_info is not None
        assert await adapter.dead_letters() == [
            DeadLetter(message, "RuntimeError: worker failed on attempt 2", 2, True, None)
        ]
        await adapter.purge()
        assert await adapter.dead_letters() == []

    async def test_republishing_without_a_worker_leaves_the_letters_alone(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Without a worker, republish_dead_letters() reported the letters republished, and
        each was dead again at once with its error replaced. It now republishes nothing."""
        queue = make_queue()
        adapter = InMemoryMessageQueueAdapter.attach_to(
            queue, worker=Worker(failures=1), retry_attempts=0
        )
        await queue.publish_message(caught())
        await adapter.join()
        letters = await adapter.dead_letters()
        assert [letter.error for letter in letters] == ["RuntimeError: worker failed on attempt 1"]
        adapter.worker = None
        with caplog.at_level(logging.WARNING, logger="castore_pydantic.messaging"):
            assert await adapter.republish_dead_letters() == 0
        assert "no worker: 1 dead letter(s) left as they are" in caplog.text
        await adapter.join()
        assert await adapter.dead_letters() == letters
        worker = Worker()
        adapter.worker = worker
        assert await adapter.republish_dead_letters() == 1
        await adapter.join()
        assert worker.messages == [caught()]
        assert await adapter.dead_letters() == []

    async def test_a_retry_due_without_a_worker_keeps_the_handlers_error(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A retry that came due after the worker was unset was dead-lettered with "no
        worker to retry the message" and an attempt that never ran: the handler's own
        error was lost. The letter now keeps it, counts the attempts that ran, and the
        missing worker is logged."""
        queue = make_queue()
        failed = asyncio.Event()

        async def fail(message: Message, context: MessageContext) -> None:
            failed.set()  # the retry is scheduled as this returns
            raise ValueError("the projection refused the write")

        adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=fail, retry_delay_in_ms=50)
        await queue.publish_message(caught())
        await failed.wait()
        adapter.worker = None
        with caplog.at_level(logging.WARNING, logger="castore_pydantic.messaging"):
            await adapter.join()
        assert "no worker to retry a message" in caplog.text
        [letter] = await adapter.dead_letters()
        assert (letter.error, letter.attempts) == (
            "ValueError: the projection refused the write",
            1,
        )

    async def test_purge_drops_waiting_messages_and_cancels_the_running_handler(self) -> None:
        """purge() said it forgot retries and dead letters; it also cancels the handler in
        flight and drops the messages waiting for the worker, as its docstring now says."""
        queue = make_queue()
        worker = Worker(gate=asyncio.Event())
        adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=worker)
        await queue.publish_messages([caught("a"), caught("b"), caught("c")])
        await worker.called.wait()
        await adapter.purge()
        await asyncio.wait_for(adapter.join(), 1)
        assert worker.active == 0  # cancelled, not finished: its gate never opened
        assert [m.event.aggregate_id for m in worker.messages] == ["a"]  # type: ignore[union-attr]
        assert await adapter.dead_letters() == []
        assert worker.gate is not None
        worker.gate.set()
        await queue.publish_message(caught("d"))  # still usable afterwards
        await adapter.join()
        assert [m.event.aggregate_id for m in worker.messages] == ["a", "d"]  # type: ignore[union-attr]

    async def test_aclose_cancels_pending_retries(self) -> None:
        """Closing drops waiting retries (at-most-once): join returns, the worker is not re-run."""
        queue = make_queue()
        worker = Worker(failures=1)
        async with InMemoryMessageQueueAdapter.attach_to(
            queue, worker=worker, retry_delay_in_ms=60_000
        ) as adapter:
            await queue.publish_message(caught())
            await worker.called.wait()
        await asyncio.wait_for(adapter.join(), 1)
        assert len(worker.calls) == 1
        assert adapter.delivery_guarantee == "at-most-once"

    async def test_aclose_drops_waiting_messages(self) -> None:
        """Messages still waiting for the worker are dropped by aclose."""
        queue = make_queue()
        worker = Worker(gate=asyncio.Event())
        adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=worker)
        await queue.publish_messages([caught("a"), caught("b"), caught("c")])
        await worker.called.wait()
        await adapter.aclose()
        await adapter.aclose()
        assert adapter.queue is not None
        assert len(adapter.queue) == 0
        assert [m.event.aggregate_id for m in worker.messages] == ["a"]  # type: ignore[union-attr]

    @pytest.mark.parametrize(
        ("options", "name"),
        [
            ({"retry_attempts": -1}, "retry_attempts"),
            ({"retry_delay_in_ms": "soon"}, "retry_delay_in_ms"),
            ({"retry_backoff_rate": -2}, "retry_backoff_rate"),
        ],
    )
    def test_invalid_retry_options_are_refused(self, options: dict[str, Any], name: str) -> None:
        """B103: invalid retry options raise ValueError naming the option, at construction."""
        with pytest.raises(ValueError, match=f"Invalid {name}"):
            InMemoryMessageQueueAdapter.attach_to(make_queue(), **options)

    def test_repr_names_the_queue(self) -> None:
        """The repr says which queue the adapter serves."""
        adapter = InMemoryMessageQueueAdapter.attach_to(make_queue())
        assert "pokemons" in repr(adapter)


async def test_the_worker_cannot_be_removed_while_consuming() -> None:
    """As on the brokers' adapters: removing the worker while consuming is refused."""

    async def worker(message: Any, context: Any) -> None:
        return None

    queue = NotificationMessageQueue(message_queue_id="w", source_event_stores=[])
    adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=worker)
    async with adapter.consuming():
        with pytest.raises(RuntimeError, match="stop consuming"):
            adapter.worker = None
    adapter.worker = None
    assert adapter.worker is None


def reduce_order(pokemon, event):  # type: ignore[no-untyped-def]
    """A reducer written without annotations, as users often do."""
    return reduce_pokemon(pokemon, event)


@pytest.mark.redis
class TestSameAsRedis:
    async def test_a_worker_gets_what_a_redis_worker_gets(self) -> None:
        """One worker on both adapters receives the same types and values (unannotated reducer).

        A channel cannot tell the aggregate's class without a return annotation: on Redis the
        aggregate arrives as a mapping, and the in-memory queue now hands over the same.
        """
        from castore_pydantic.messaging.redis import RedisMessageQueueAdapter
        from tests.messaging.redis_support import REDIS_URL, private_prefix

        store = EventStore(
            event_store_id="POKEMONS",
            event_types=[PokemonAppeared, PokemonCaught],
            reducer=reduce_order,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        received: dict[str, list[tuple[object, ...]]] = {"memory": [], "redis": []}
        redis_received = asyncio.Event()

        def worker_for(name: str) -> Callable[[Any, MessageContext], None]:
            def worker(message: Any, context: MessageContext) -> None:
                received[name].append(
                    (type(message.event), type(message.aggregate), message.model_dump_json())
                )
                if name == "redis":
                    redis_received.set()

            return worker

        in_memory = StateCarryingMessageQueue(
            message_queue_id="parity", source_event_stores=[store]
        )
        on_redis = StateCarryingMessageQueue(message_queue_id="parity", source_event_stores=[store])
        memory_adapter = InMemoryMessageQueueAdapter.attach_to(
            in_memory, worker=worker_for("memory")
        )
        async with private_prefix() as prefix:
            redis_adapter = RedisMessageQueueAdapter.attach_to(
                on_redis, REDIS_URL, key_prefix=prefix, block_ms=100
            )
            redis_adapter.worker = worker_for("redis")
            async with redis_adapter, redis_adapter.consuming():
                for queue in (in_memory, on_redis):
                    connected = ConnectedEventStore(store, queue)
                    aggregate_id = "pikachu" if queue is in_memory else "pikachu-redis"
                    await connected.push_event(appeared(aggregate_id))
                await memory_adapter.join()
                await asyncio.wait_for(redis_received.wait(), 20)
        ((memory_event, memory_aggregate, memory_json),) = received["memory"]
        ((redis_event, redis_aggregate, redis_json),) = received["redis"]
        assert (memory_event, memory_aggregate) == (redis_event, redis_aggregate)
        assert (memory_event, memory_aggregate) == (PokemonAppeared, dict)
        assert memory_json == redis_json.replace("pikachu-redis", "pikachu").replace(
            # the two events were pushed a moment apart
            json.loads(redis_json)["event"]["timestamp"],
            json.loads(memory_json)["event"]["timestamp"],
        )


class TestWireForm:
    async def test_a_message_no_broker_worker_could_read_is_refused_when_published(self) -> None:
        """An aggregate that is not the reducer's model fails the publish, not a worker later.

        A broker consumer could not parse it back (its worker would never run); in memory
        the publisher hears of it at once, and the worker is not called.
        """
        queue = StateCarryingMessageQueue(message_queue_id="q", source_event_stores=[make_store()])
        calls: list[Any] = []
        adapter = InMemoryMessageQueueAdapter.attach_to(
            queue, worker=lambda message, context: calls.append(message)
        )
        event = PokemonCaught(aggregate_id="pikachu", version=2, timestamp=T0)
        message = StateCarryingMessage(
            event_store_id="POKEMONS", event=event, aggregate={"not": "a pokemon"}
        )
        with pytest.raises(ValidationError):
            await queue.publish_message(message)
        await adapter.join()
        assert calls == []

    async def test_an_adapter_handed_to_the_constructor_delivers_the_wire_form_too(
        self,
    ) -> None:
        """Castore's form hands the adapter to the channel's constructor. The adapter did not
        learn its channel there, so it passed on the published objects, unlike a broker."""
        calls: list[Any] = []
        adapter = InMemoryMessageQueueAdapter(worker=lambda message, context: calls.append(message))
        queue = StateCarryingMessageQueue(
            message_queue_id="q", source_event_stores=[make_store()], message_queue_adapter=adapter
        )
        assert adapter.message_channel is queue
        event = PokemonCaught(aggregate_id="pikachu", version=2, timestamp=T0)
        unreadable = StateCarryingMessage(
            event_store_id="POKEMONS", event=event, aggregate={"not": "a pokemon"}
        )
        with pytest.raises(ValidationError):
            await queue.publish_message(unreadable)
        pokemon = Pokemon(
            aggregate_id="pikachu", version=2, name="Pikachu", level=3, status="caught"
        )
        message = StateCarryingMessage(event_store_id="POKEMONS", event=event, aggregate=pokemon)
        await queue.publish_message(message)
        await adapter.join()
        assert calls == [message]
        assert calls[0] is not message


class Opened(Event):
    type: Literal["OPENED"] = "OPENED"


class Offer(Aggregate):
    """An aggregate whose validator answers differently as time passes."""

    expires_at: datetime

    @model_validator(mode="after")
    def not_expired(self) -> Offer:
        if self.expires_at <= CLOCK[0]:
            raise ValueError("offer expired")
        return self


CLOCK = [T0]


def reduce_offer(offer: Offer | None, event: Opened) -> Offer:
    lasts = timedelta(hours=1 if event.aggregate_id == "long" else 0, seconds=1)
    return Offer(
        aggregate_id=event.aggregate_id, version=event.version, expires_at=CLOCK[0] + lasts
    )


def offers() -> EventStore[Offer, Opened]:
    CLOCK[0] = T0
    return EventStore(
        event_store_id="OFFERS",
        event_types=[Opened],
        reducer=reduce_offer,
        event_storage_adapter=InMemoryEventStorageAdapter(),
    )


class TestWireFormFailures:
    """Each delivery after the first parses the body again, as a broker consumer does; a
    parse that fails there must be handled as a broker handles a body that does not
    validate, and dead letters must hold what was published."""

    async def test_a_body_that_no_longer_parses_is_dead_lettered_at_once(self) -> None:
        """The second listener's parse failed outside any handling: no call, no retry, no
        dead letter. A queue's retry failing so stopped its worker's FIFO, leaving the
        messages behind it waiting for ever."""
        store = offers()
        bus = StateCarryingMessageBus(message_bus_id="b", source_event_stores=[store])
        bus_adapter = InMemoryMessageBusAdapter.attach_to(bus, retry_attempts=1)
        heard: list[str] = []

        async def first(message: Any, context: MessageContext) -> None:
            heard.append("first")
            CLOCK[0] += timedelta(seconds=5)  # the offer expires while the first listener works

        bus_adapter.on({}, first, listener_id="first")
        bus_adapter.on({}, lambda message, context: heard.append("second"), listener_id="second")
        await ConnectedEventStore(store, bus).push_event(Opened(aggregate_id="o", version=1))
        await bus_adapter.join()
        assert heard == ["first"]
        (letter,) = await bus_adapter.dead_letters()
        assert (letter.listener_id, letter.attempts) == ("second", 0)
        assert "offer expired" in letter.error

        store = offers()
        queue = StateCarryingMessageQueue(message_queue_id="q", source_event_stores=[store])
        handled: list[tuple[str, int]] = []

        async def worker(message: Any, context: MessageContext) -> None:
            handled.append((message.aggregate.aggregate_id, context.attempt))
            if message.aggregate.aggregate_id == "a":
                CLOCK[0] += timedelta(seconds=5)  # its retry will not parse
                raise RuntimeError("transient")

        adapter = InMemoryMessageQueueAdapter.attach_to(
            queue, worker=worker, retry_attempts=2, retry_delay_in_ms=1
        )
        connected = ConnectedEventStore(store, queue)
        await connected.push_event(Opened(aggregate_id="a", version=1))
        await asyncio.sleep(0.05)  # the retry is in the FIFO now
        CLOCK[0] = T0
        await connected.push_event(Opened(aggregate_id="b", version=1))
        await adapter.join()
        assert handled == [("a", 1), ("b", 1)]
        assert [d.attempts for d in await adapter.dead_letters()] == [1]
        assert len(adapter.queue) == 0

    async def test_republishing_keeps_the_letters_that_no_longer_parse(self) -> None:
        """One letter that no longer parses made republishing raise, after every letter was
        forgotten: the others, valid, were lost."""
        store = offers()
        queue = StateCarryingMessageQueue(message_queue_id="q", source_event_stores=[store])

        async def down(message: Any, context: MessageContext) -> None:
            raise RuntimeError("down")

        adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=down, retry_attempts=0)
        connected = ConnectedEventStore(store, queue)
        for offer_id in ("short", "long"):
            await connected.push_event(Opened(aggregate_id=offer_id, version=1))
        await adapter.join()
        CLOCK[0] += timedelta(seconds=5)  # "short" has expired, "long" has not
        handled: list[str] = []
        adapter.worker = lambda message, context: handled.append(message.aggregate.aggregate_id)
        assert await adapter.republish_dead_letters() == 1
        await adapter.join()
        assert handled == ["long"]
        (kept,) = await adapter.dead_letters()
        assert kept.message.aggregate.aggregate_id == "short"
        assert "offer expired" in kept.error

    async def test_a_dead_letter_holds_the_message_as_published(self) -> None:
        """The letter kept the copy its failing handler had changed, and republishing
        delivered the change; brokers keep the body as published."""
        store = EventStore(
            event_store_id="POKEMONS",
            event_types=[PokemonAppeared, PokemonCaught],
            reducer=reduce_order,  # unannotated: the aggregate arrives as a dict
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        queue = StateCarryingMessageQueue(message_queue_id="q", source_event_stores=[store])
        levels: list[int] = []

        def meddle(message: Any, context: MessageContext) -> None:
            levels.append(message.aggregate["level"])
            message.aggregate["level"] += 100
            raise RuntimeError("boom")

        adapter = InMemoryMessageQueueAdapter.attach_to(
            queue, worker=meddle, retry_attempts=1, retry_delay_in_ms=1
        )
        await ConnectedEventStore(store, queue).push_event(appeared())
        await adapter.join()
        (letter,) = await adapter.dead_letters()
        assert letter.message.aggregate["level"] == 3
        await adapter.republish_dead_letters()
        await adapter.join()
        assert levels == [3, 3, 3, 3]

    async def test_setting_the_adapter_attribute_binds_it_as_the_constructor_does(self) -> None:
        """Castore's other form, queue.messageQueueAdapter = adapter, left the adapter
        without its channel: it handed on the published objects."""
        got: list[str] = []
        store = EventStore(
            event_store_id="POKEMONS",
            event_types=[PokemonAppeared],
            reducer=reduce_order,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        queue = StateCarryingMessageQueue(message_queue_id="q", source_event_stores=[store])
        adapter = InMemoryMessageQueueAdapter(
            worker=lambda message, context: got.append(type(message.aggregate).__name__)
        )
        queue.message_queue_adapter = adapter
        assert adapter.message_channel is queue
        await ConnectedEventStore(store, queue).push_event(appeared())
        await adapter.join()
        assert got == ["dict"]

    async def test_an_adapter_handed_to_several_channels_parses_each_ones_messages(
        self,
    ) -> None:
        """Bound to its first channel, an adapter shared by two refused the second's
        messages and patterns. Each message is now parsed by the newest channel carrying
        it: its store, its kind."""
        others = make_store(event_store_id="OTHERS")
        adapter = InMemoryMessageBusAdapter(retry_attempts=0)
        first = NotificationMessageBus(
            message_bus_id="b1", source_event_stores=[make_store()], message_bus_adapter=adapter
        )
        second = NotificationMessageBus(
            message_bus_id="b2", source_event_stores=[others], message_bus_adapter=adapter
        )
        got: list[Any] = []
        for store_id in ("POKEMONS", "OTHERS"):
            adapter.on(
                {"event_store_id": store_id},
                lambda message, context: got.append(message),
                listener_id=store_id,
            )
        message = NotificationMessage(
            event_store_id="OTHERS", event=PokemonAppeared.model_validate(appeared("x"))
        )
        await second.publish_message(message)
        # The first bus is older: its message is parsed by it, not by the newest bus.
        older = NotificationMessage(
            event_store_id="POKEMONS", event=PokemonAppeared.model_validate(appeared("y"))
        )
        await first.publish_message(older)
        await adapter.join()
        assert got == [message, older]
        assert got[0] is not message
        assert got[1] is not older

    async def test_a_channel_nothing_holds_is_forgotten(self) -> None:
        """The adapter keeps its newest channel; an older one that nothing else holds goes
        (a test's channel, say), and the adapter no longer parses or checks patterns by it."""
        adapter = InMemoryMessageBusAdapter(retry_attempts=0)
        gone = NotificationMessageBus(
            message_bus_id="gone", source_event_stores=[make_store()], message_bus_adapter=adapter
        )
        watch = weakref.ref(gone)
        NotificationMessageBus(
            message_bus_id="kept",
            source_event_stores=[make_store(event_store_id="OTHERS")],
            message_bus_adapter=adapter,
        )
        del gone
        gc.collect()
        assert watch() is None
        with pytest.raises(MessageChannelEventStoreNotFoundError):
            adapter.on({"event_store_id": "POKEMONS"}, lambda message, context: None)
        assert adapter.message_channel is not None
        assert adapter.message_channel.message_channel_id == "kept"

    async def test_a_module_adapter_serves_a_new_channel_in_every_test_alike(self) -> None:
        """One adapter kept by a module, a channel made per test (a fixture): from the second
        channel on it stopped parsing, so results depended on the order tests ran in."""
        adapter = InMemoryMessageQueueAdapter(retry_attempts=1, retry_delay_in_ms=1)
        store = EventStore(
            event_store_id="POKEMONS",
            event_types=[PokemonAppeared],
            reducer=reduce_order,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        for test in ("first", "second"):
            queue = StateCarryingMessageQueue(
                message_queue_id="q", source_event_stores=[store], message_queue_adapter=adapter
            )
            got: list[Any] = []

            def meddle(message: Any, context: MessageContext, got: list[Any] = got) -> None:
                got.append(message.aggregate)
                message.aggregate["level"] += 100
                raise RuntimeError("boom")

            adapter.worker = meddle
            await ConnectedEventStore(store, queue).push_event(appeared(test))
            await adapter.join()
            assert [type(aggregate) for aggregate in got] == [dict, dict], test
            assert got[0] is not got[1]
            assert (await adapter.dead_letters())[-1].message.aggregate["level"] == 3

    async def test_an_adapter_follows_the_channels_that_hold_it(self) -> None:
        """An adapter given to another channel, then back, parses for the channel that holds
        it; a mock set as a channel's adapter is left alone (it answered every attribute,
        and its made-up _bind_channel call left a coroutine never awaited)."""
        pokemons = make_store()
        first = StateCarryingMessageQueue(message_queue_id="q1", source_event_stores=[pokemons])
        second = StateCarryingMessageQueue(message_queue_id="q2", source_event_stores=[pokemons])
        a = InMemoryMessageQueueAdapter()
        b = InMemoryMessageQueueAdapter()
        first.message_queue_adapter = a
        first.message_queue_adapter = b
        second.message_queue_adapter = a
        assert (a.message_channel, b.message_channel) == (second, first)
        first.message_queue_adapter = None
        assert b.message_channel is None
        mock = AsyncMock()
        first.message_queue_adapter = mock
        assert mock.mock_calls == []
