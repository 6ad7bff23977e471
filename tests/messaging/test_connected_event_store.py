from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from typing import Any

import pytest

from castore_pydantic import Event, EventStore, EventStoreContext, PushEventResult
from castore_pydantic.errors import (
    EventAlreadyExistsError,
    MessageBrokerUnavailableError,
    MessageChannelEventStoreNotFoundError,
    UndefinedMessageChannelAdapterError,
)
from castore_pydantic.messaging import (
    AggregateExistsMessage,
    AggregateExistsMessageBus,
    AggregateExistsMessageQueue,
    ConnectedEventStore,
    Message,
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
    StateCarryingMessage,
    StateCarryingMessageBus,
    StateCarryingMessageQueue,
)
from castore_pydantic.messaging.memory import InMemoryMessageQueueAdapter
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from tests.domain import Pokemon, PokemonAppeared, PokemonCaught, appeared, make_store


class RecordingAdapter:
    """A channel adapter that records messages (and the order of events in ``log``)."""

    def __init__(self, log: list[str] | None = None) -> None:
        self.published: list[tuple[Message, bool]] = []
        self.log = log if log is not None else []

    async def publish_message(self, message: Message, *, replay: bool = False) -> None:
        self.log.append("publish")
        self.published.append((message, replay))

    async def publish_messages(self, messages: Sequence[Message], *, replay: bool = False) -> None:
        for message in messages:
            await self.publish_message(message, replay=replay)


class UnreachableBroker:
    """A channel adapter whose broker is down."""

    async def publish_message(self, message: Message, *, replay: bool = False) -> None:
        raise MessageBrokerUnavailableError("broker unreachable at amqp://localhost:5672")

    async def publish_messages(self, messages: Sequence[Message], *, replay: bool = False) -> None:
        raise MessageBrokerUnavailableError("broker unreachable at amqp://localhost:5672")


class CountingStorage(InMemoryEventStorageAdapter):
    """The in-memory adapter, counting reads (to see whether publishing reads back)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get_events(
        self, aggregate_id: str, context: EventStoreContext, **options: Any
    ) -> list[Event]:
        self.reads += 1
        return await super().get_events(aggregate_id, context, **options)


def caught(version: int = 2, aggregate_id: str = "pikachu") -> dict[str, object]:
    return {"aggregateId": aggregate_id, "version": version, "type": "POKEMON_CAUGHT"}


def connect(channel_cls: Any, store: EventStore[Any, Any] | None = None) -> Any:
    """A store connected to a fresh channel of ``channel_cls`` with a recording adapter."""
    store = store or make_store()
    adapter = RecordingAdapter()
    if channel_cls.message_channel_type == "queue":
        channel = channel_cls(
            message_queue_id="q", source_event_stores=[store], message_queue_adapter=adapter
        )
    else:
        channel = channel_cls(
            message_bus_id="b", source_event_stores=[store], message_bus_adapter=adapter
        )
    return ConnectedEventStore(store, channel), adapter


def logged_queue(log: list[str]) -> tuple[EventStore[Any, Any], ConnectedEventStore[Any, Any]]:
    """A store, and it connected to a notification queue that logs "publish" into ``log``."""
    store = make_store()
    queue = NotificationMessageQueue(
        message_queue_id="q",
        source_event_stores=[store],
        message_queue_adapter=RecordingAdapter(log),
    )
    return store, ConnectedEventStore(store, queue)


class TestDelegation:
    def test_exposes_the_wrapped_store(self) -> None:
        """B54: id, event types, reducer, side effect, context, store and channel."""
        store = make_store()
        connected, _ = connect(NotificationMessageQueue, store)
        assert connected.event_store is store
        assert connected.message_channel.message_channel_id == "q"
        assert connected.event_store_id == "POKEMONS"
        assert connected.event_types == store.event_types
        assert connected.reducer is store.reducer
        assert connected.simulate_side_effect is store.simulate_side_effect
        assert connected.context is store.context
        assert connected.get_event_storage_adapter() is store.event_storage_adapter
        assert "POKEMONS" in repr(connected)
        assert isinstance(connected, EventStore)

    def test_storage_adapter_is_proxied_both_ways(self) -> None:
        """B54: setting the adapter on either side changes it for both."""
        store = make_store()
        connected, _ = connect(NotificationMessageQueue, store)
        replacement = InMemoryEventStorageAdapter()
        connected.event_storage_adapter = replacement
        assert store.event_storage_adapter is replacement
        other = InMemoryEventStorageAdapter()
        store.event_storage_adapter = other
        assert connected.event_storage_adapter is other

    async def test_reads_are_the_wrapped_stores(self) -> None:
        """B54: events, aggregates, listings, builds and simulations come from the wrapped store."""
        store = make_store()
        await store.push_event(appeared())
        await store.push_event(caught())
        connected, adapter = connect(NotificationMessageQueue, store)
        events = (await connected.get_events("pikachu")).events
        assert events == (await store.get_events("pikachu")).events
        assert (await connected.get_events("pikachu", reverse=True, limit=1)).events == [events[1]]
        aggregate = (await connected.get_aggregate("pikachu", max_version=1)).aggregate
        assert aggregate is not None
        assert aggregate.status == "wild"
        existing = await connected.get_existing_aggregate("pikachu")
        assert existing.aggregate.status == "caught"
        listed = await connected.list_aggregate_ids(limit=5)
        assert [entry.aggregate_id for entry in listed.aggregate_ids] == ["pikachu"]
        assert connected.build_aggregate(events) == existing.aggregate
        assert connected.simulate_aggregate(events) == existing.aggregate
        assert adapter.published == []

    def test_every_public_event_store_member_is_delegated(self) -> None:
        """ConnectedEventStore defines every public EventStore member, so none reads its own
        (absent) state; push_event_group is the shared static method."""
        public = {name for name in dir(EventStore) if not name.startswith("_")}
        missing = {
            name
            for name in public - {"push_event_group"}
            if name not in ConnectedEventStore.__dict__
        }
        assert missing == set()
        assert inspect.isfunction(ConnectedEventStore.push_event_group)

    def test_store_must_be_a_source_of_the_channel(self) -> None:
        """Connecting a store to a channel that does not carry it fails at once."""
        channel = NotificationMessageBus(message_bus_id="b", source_event_stores=[])
        with pytest.raises(MessageChannelEventStoreNotFoundError):
            ConnectedEventStore(make_store(), channel)

    async def test_on_event_pushed_setter_writes_the_inner_hook(self) -> None:
        """B55: the wrapped hook runs before publishing; the setter replaces the wrapped hook."""
        log: list[str] = []
        store, connected = logged_queue(log)

        async def hook(result: PushEventResult[Any, Any]) -> None:
            log.append(f"hook v{result.event.version}")

        connected.on_event_pushed = hook
        assert store.on_event_pushed is hook
        assert connected.on_event_pushed is not None
        await connected.push_event(appeared())
        assert log == ["hook v1", "publish"]
        connected.on_event_pushed = None
        assert store.on_event_pushed is None
        await connected.push_event(caught())
        assert log == ["hook v1", "publish", "publish"]

    async def test_chaining_the_hook_works_as_on_any_store(self) -> None:
        """``c.on_event_pushed = chain(c.on_event_pushed)`` chains the hook; publishing is
        not part of it. (The getter used to return the publishing wrapper, so chaining
        made the hook call itself until RecursionError, and nothing was published.)"""
        log: list[str] = []
        _, connected = logged_queue(log)

        async def first(result: PushEventResult[Any, Any]) -> None:
            log.append("first")

        connected.on_event_pushed = first
        previous = connected.on_event_pushed
        assert previous is first

        async def chained(result: PushEventResult[Any, Any]) -> None:
            assert previous is not None
            await previous(result)
            log.append("second")

        connected.on_event_pushed = chained
        await connected.push_event(appeared())
        await EventStore.push_event_group(connected.group_event(caught()))
        assert log == ["first", "second", "publish"] * 2


class TestPublishingOnPush:
    async def test_notification_message_is_the_stored_event(self) -> None:
        """B56: {eventStoreId, event} with the event as stored (timestamp set), replay False."""
        connected, adapter = connect(NotificationMessageBus)
        result = await connected.push_event(appeared())
        assert result.event.timestamp is not None
        assert adapter.published == [
            (NotificationMessage(event_store_id="POKEMONS", event=result.event), False)
        ]

    async def test_state_carrying_reads_the_aggregate_when_needed(self) -> None:
        """B57: without next_aggregate the aggregate is read back up to the event's version."""
        storage = CountingStorage()
        connected, adapter = connect(StateCarryingMessageQueue, make_store(storage))
        await connected.push_event(appeared())
        reads_before = storage.reads
        result = await connected.push_event(caught())
        assert result.next_aggregate is None
        assert storage.reads == reads_before + 1
        message, replay = adapter.published[-1]
        assert replay is False
        assert message == StateCarryingMessage(
            event_store_id="POKEMONS",
            event=result.event,
            aggregate=Pokemon(
                aggregate_id="pikachu", version=2, name="Pikachu", level=3, status="caught"
            ),
        )

    async def test_state_carrying_uses_next_aggregate_without_a_read(self) -> None:
        """B58: with prev_aggregate (or at version 1) the computed aggregate is sent, no read."""
        storage = CountingStorage()
        connected, adapter = connect(StateCarryingMessageBus, make_store(storage))
        first = await connected.push_event(appeared())
        second = await connected.push_event(caught(), prev_aggregate=first.next_aggregate)
        assert storage.reads == 0
        assert [message.aggregate for message, _ in adapter.published] == [
            first.next_aggregate,
            second.next_aggregate,
        ]

    @pytest.mark.parametrize(
        "channel_cls", [AggregateExistsMessageQueue, AggregateExistsMessageBus]
    )
    async def test_aggregate_exists_for_first_events_only(self, channel_cls: Any) -> None:
        """DESIGN §6.7: a version-1 push announces the aggregate; later pushes publish nothing."""
        connected, adapter = connect(channel_cls)
        first = await connected.push_event(appeared())
        await connected.push_event(caught())
        assert adapter.published == [
            (
                AggregateExistsMessage(
                    event_store_id="POKEMONS",
                    aggregate_id="pikachu",
                    initial_event_timestamp=first.event.timestamp,
                ),
                False,
            )
        ]

    async def test_failed_push_publishes_nothing(self) -> None:
        """A refused event (duplicate version) publishes no message."""
        connected, adapter = connect(NotificationMessageQueue)
        await connected.push_event(appeared())
        with pytest.raises(EventAlreadyExistsError):
            await connected.push_event(appeared())
        assert len(adapter.published) == 1

    async def test_force_is_forwarded(self) -> None:
        """push_event(force=True) overwrites through the wrapped store and publishes again."""
        connected, adapter = connect(NotificationMessageQueue)
        await connected.push_event(appeared())
        await connected.push_event(appeared(payload={"name": "Raichu", "level": 9}), force=True)
        events = (await connected.get_events("pikachu")).events
        assert events[0].payload.name == "Raichu"
        assert len(adapter.published) == 2


class TestEventGroups:
    async def test_each_grouped_event_goes_to_its_own_channel(self) -> None:
        """B60: two connected stores in one group: each channel gets only its own event."""
        storage = InMemoryEventStorageAdapter()
        pokemons = make_store(storage)
        rivals = make_store(storage, event_store_id="RIVALS")
        connected_pokemons, notifications = connect(NotificationMessageQueue, pokemons)
        connected_rivals, states = connect(StateCarryingMessageBus, rivals)
        plain_extra = make_store(storage, event_store_id="OTHERS")
        result = await EventStore.push_event_group(
            connected_pokemons.group_event(appeared("a")),
            connected_rivals.group_event(appeared("b")),
            plain_extra.group_event(appeared("c")),
        )
        event_a, event_b, _ = (item.event for item in result.event_group)
        assert notifications.published == [
            (NotificationMessage(event_store_id="POKEMONS", event=event_a), False)
        ]
        assert states.published == [
            (
                StateCarryingMessage(
                    event_store_id="RIVALS",
                    event=event_b,
                    aggregate=result.event_group[1].next_aggregate,
                ),
                False,
            )
        ]
        assert result.event_group[1].next_aggregate is not None

    async def test_grouped_event_keeps_the_inner_hook(self) -> None:
        """A grouped event runs the wrapped store's hook, then publishes."""
        log: list[str] = []
        store = make_store()
        adapter = RecordingAdapter(log)
        queue = NotificationMessageQueue(
            message_queue_id="q", source_event_stores=[store], message_queue_adapter=adapter
        )

        async def hook(_result: PushEventResult[Any, Any]) -> None:
            log.append("hook")

        store.on_event_pushed = hook
        connected = ConnectedEventStore(store, queue)
        grouped = connected.group_event(appeared(), prev_aggregate=None)
        assert grouped.event_store is connected
        await EventStore.push_event_group(grouped)
        assert log == ["hook", "publish"]


class TestGroupHooks:
    """A stored group's hooks (and so a connected store's publishing) run one at a time."""

    async def test_hooks_run_in_group_order(self) -> None:
        """Messages of one aggregate go out in version order: each hook finishes before the
        next starts (they used to run at once, and a broker received them in any order)."""
        store = make_store()
        started: list[int] = []
        finished: list[int] = []

        async def slow_first(result: PushEventResult[Any, Any]) -> None:
            started.append(result.event.version)
            await asyncio.sleep(0.001 * (5 - result.event.version))
            finished.append(result.event.version)

        store.on_event_pushed = slow_first
        events = [appeared()] + [caught(v) for v in (2, 3, 4)]
        await EventStore.push_event_group(*(store.group_event(e) for e in events))
        assert started == finished == [1, 2, 3, 4]

    async def test_a_failing_hook_lets_the_others_run_first(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Every event of the group is stored: each hook runs even after another failed.
        The first failure is raised once all ran; the later ones are logged (they used to
        run on in the background after the error, or be lost)."""
        store = make_store()
        ran: list[int] = []

        async def hook(result: PushEventResult[Any, Any]) -> None:
            version = result.event.version
            await asyncio.sleep(0.005)
            ran.append(version)
            if version in (1, 3):
                raise RuntimeError(f"hook failed for v{version}")

        store.on_event_pushed = hook
        events = [appeared()] + [caught(v) for v in (2, 3)]
        with pytest.raises(RuntimeError, match="v1"):
            await EventStore.push_event_group(*(store.group_event(e) for e in events))
        assert ran == [1, 2, 3]
        assert "hook failed for v3" in caplog.text
        assert len((await store.get_events("pikachu")).events) == 3

    async def test_a_cancelled_hook_still_logs_earlier_failures(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A cancellation in a later hook goes on, but an earlier hook's failure is logged
        rather than lost."""
        store = make_store()

        async def hook(result: PushEventResult[Any, Any]) -> None:
            if result.event.version == 1:
                raise RuntimeError("hook failed for v1")
            raise asyncio.CancelledError

        store.on_event_pushed = hook
        with pytest.raises(asyncio.CancelledError):
            await EventStore.push_event_group(
                store.group_event(appeared()), store.group_event(caught())
            )
        assert "hook failed for v1" in caplog.text

    async def test_a_cancelled_hook_still_logs_later_reducer_failures(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Events after the cancelled hook are stored too: a reducer that failed on one of
        them is logged, not lost with the cancellation."""
        store = make_store()

        async def hook(result: PushEventResult[Any, Any]) -> None:
            raise asyncio.CancelledError

        store.on_event_pushed = hook
        with pytest.raises(asyncio.CancelledError):
            await EventStore.push_event_group(
                store.group_event(appeared()),
                # A catch before any appearance: the test domain's reducer refuses it.
                store.group_event(caught(version=1, aggregate_id="eevee")),
            )
        assert "the reducer failed for aggregate eevee version 1" in caplog.text
        assert len((await store.get_events("eevee")).events) == 1

    async def test_nested_connected_stores_both_publish_a_group(self) -> None:
        """A connected store wrapping a connected store publishes to both channels, for a
        group as for a push (a group used to reach the outer channel only)."""
        inner_log: list[str] = []
        outer_log: list[str] = []
        _, inner = logged_queue(inner_log)
        outer_queue = NotificationMessageQueue(
            message_queue_id="outer",
            source_event_stores=[inner],
            message_queue_adapter=RecordingAdapter(outer_log),
        )
        outer = ConnectedEventStore(inner, outer_queue)
        await outer.push_event(appeared())
        await EventStore.push_event_group(outer.group_event(caught()))
        assert inner_log == outer_log == ["publish", "publish"]


class TestReducerFailsAfterTheWrite:
    """A reducer that raises on a stored event does not keep its message from going out."""

    async def test_push_publishes_then_raises_the_reducers_error(self) -> None:
        """The event is stored and published; the reducer's error follows (nothing was
        published before)."""
        connected, adapter = connect(NotificationMessageQueue)
        with pytest.raises(AssertionError):
            # reduce_pokemon asserts that a catch follows an appearance.
            await connected.push_event(caught(version=1))
        (stored,) = (await connected.get_events("pikachu")).events
        assert [message.event for message, _ in adapter.published] == [stored]

    async def test_group_publishes_every_event_then_raises(self) -> None:
        """One store's reducer failing in a group stops neither its own message nor the
        other store's (none of the group was published before)."""
        storage = InMemoryEventStorageAdapter()
        good, bad = make_store(storage, "GOOD"), make_store(storage, "BAD")
        log: list[str] = []
        queue = NotificationMessageQueue(
            message_queue_id="q",
            source_event_stores=[good, bad],
            message_queue_adapter=RecordingAdapter(log),
        )
        connected_good, connected_bad = (
            ConnectedEventStore(good, queue),
            ConnectedEventStore(bad, queue),
        )
        with pytest.raises(AssertionError) as raised:
            await EventStore.push_event_group(
                connected_bad.group_event(caught(version=1)),
                connected_good.group_event(appeared()),
            )
        assert any("(BAD) is stored" in note for note in raised.value.__notes__)
        assert log == ["publish", "publish"]
        assert [len((await s.get_events("pikachu")).events) for s in (good, bad)] == [1, 1]

    async def test_state_carrying_reads_back_and_raises_the_first_error(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Without a next aggregate a state-carrying channel reads the aggregate back; the
        reducer fails there too: the first error is raised, the second logged."""
        connected, adapter = connect(StateCarryingMessageQueue)
        with pytest.raises(AssertionError) as raised:
            await connected.push_event(caught(version=1))
        assert any("is stored" in note for note in raised.value.__notes__)
        assert adapter.published == []
        assert "on_event_pushed (or publishing) failed for aggregate pikachu version 1" in (
            caplog.text
        )
        assert len((await connected.get_events("pikachu")).events) == 1


class TestWrappedStoreOverridingPushEvent:
    async def test_its_push_event_is_called_when_connected(self) -> None:
        """A subclass overriding push_event (to audit, say) is pushed through, also inside
        two connected stores (a shorter way skipped it), and the message is published."""
        audited: list[int] = []

        class AuditedStore(EventStore[Any, Any]):
            async def push_event(self, event: Any, **options: Any) -> Any:
                result = await super().push_event(event, **options)
                audited.append(result.event.version)
                return result

        plain = make_store()
        store = AuditedStore(
            event_store_id="POKEMONS",
            event_types=plain.event_types,
            reducer=plain.reducer,
            event_storage_adapter=InMemoryEventStorageAdapter(),
        )
        connected, adapter = connect(NotificationMessageQueue, store)
        outer_log: list[str] = []
        outer = ConnectedEventStore(
            connected,
            NotificationMessageQueue(
                message_queue_id="outer",
                source_event_stores=[connected],
                message_queue_adapter=RecordingAdapter(outer_log),
            ),
        )
        await connected.push_event(appeared())
        await outer.push_event(caught())
        assert audited == [1, 2]
        assert len(adapter.published) == 2
        assert outer_log == ["publish"]


class TestBrokerDown:
    async def test_push_stores_the_event_and_raises(self) -> None:
        """B61: publishing to a broker that is down raises, and the event stays stored."""
        store = make_store()
        queue = NotificationMessageQueue(
            message_queue_id="q",
            source_event_stores=[store],
            message_queue_adapter=UnreachableBroker(),
        )
        connected = ConnectedEventStore(store, queue)
        with pytest.raises(MessageBrokerUnavailableError):
            await connected.push_event(appeared())
        (stored,) = (await store.get_events("pikachu")).events
        assert isinstance(stored, PokemonAppeared)

    async def test_group_is_stored_and_the_error_raised(self) -> None:
        """B61: a group whose publishing fails is stored whole; the error reaches the caller."""
        storage = InMemoryEventStorageAdapter()
        store = make_store(storage)
        queue = NotificationMessageQueue(
            message_queue_id="q",
            source_event_stores=[store],
            message_queue_adapter=UnreachableBroker(),
        )
        connected = ConnectedEventStore(store, queue)
        with pytest.raises(MessageBrokerUnavailableError):
            await EventStore.push_event_group(
                connected.group_event(appeared("a")), connected.group_event(appeared("b"))
            )
        assert len((await store.get_events("a")).events) == 1
        assert len((await store.get_events("b")).events) == 1

    async def test_missing_channel_adapter_raises_after_storing(self) -> None:
        """B61: a channel without adapter raises after the write; the event is stored."""
        store = make_store()
        queue = NotificationMessageQueue(message_queue_id="q", source_event_stores=[store])
        connected = ConnectedEventStore(store, queue)
        with pytest.raises(UndefinedMessageChannelAdapterError):
            await connected.push_event(appeared())
        assert len((await store.get_events("pikachu")).events) == 1


class TestWithInMemoryQueue:
    async def test_worker_receives_pushed_events(self) -> None:
        """End to end: pushes through a connected store reach an in-memory worker, in order."""
        store = make_store()
        queue = NotificationMessageQueue(message_queue_id="q", source_event_stores=[store])
        received: list[tuple[Any, MessageContext]] = []

        async def worker(message: Any, context: MessageContext) -> None:
            received.append((message, context))

        adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=worker)
        connected = ConnectedEventStore(store, queue)
        first = await connected.push_event(appeared())
        second = await connected.push_event(caught())
        await adapter.join()
        assert [message.event for message, _ in received] == [first.event, second.event]
        assert isinstance(received[1][0].event, PokemonCaught)
        assert received[0][1] == MessageContext(attempt=1, retry_attempts_left=2, replay=False)
