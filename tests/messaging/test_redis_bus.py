"""RedisMessageBusAdapter against a real Redis: one stream, one consumer group per listener."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from castore_pydantic.errors import MessageBrokerUnavailableError, UnknownEventTypeError
from castore_pydantic.messaging import (
    FilterPattern,
    MessageContext,
    NotificationMessageBus,
    NotificationMessageQueue,
)
from castore_pydantic.messaging._redis_subscription import Subscription, ensure_group
from castore_pydantic.messaging.redis import RedisMessageBusAdapter
from tests.domain import PokemonFled, fleeing_store, make_store
from tests.messaging.redis_support import (
    REDIS_URL,
    Recorder,
    caught,
    closed_port,
    notification,
    private_prefix,
    raw_client,
    watch_dead_letters,
)

pytestmark = [pytest.mark.redis]


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    async with private_prefix() as value:
        yield value


@pytest.fixture
async def raw() -> AsyncIterator[Redis]:
    client = raw_client()
    yield client
    await client.aclose()


def make_bus(bus_id: str = "pokemons") -> NotificationMessageBus:
    return NotificationMessageBus(message_bus_id=bus_id, source_event_stores=[make_store()])


def attach(bus: NotificationMessageBus, prefix: str, **options: Any) -> RedisMessageBusAdapter:
    """An adapter with test-sized delays: short retries, quick reclaiming, short blocks."""
    settings: dict[str, Any] = {
        "retry_delay_in_ms": 10,
        "reclaim_idle_ms": 300,
        "block_ms": 50,
        "key_prefix": prefix,
        **options,
    }
    return RedisMessageBusAdapter.attach_to(bus, REDIS_URL, **settings)


async def group_pending(raw: Redis, stream: str, group: str) -> int:
    """How many entries of ``stream`` the consumer group ``group`` has not acknowledged."""
    summary: Any = await raw.xpending(stream, group)
    return int(summary["pending"])


class TestRedisMessageBusAdapter:
    async def test_delivery_guarantee_is_at_least_once(self, prefix: str) -> None:
        """The adapter says it delivers at least once."""
        assert attach(make_bus(), prefix).delivery_guarantee == "at-least-once"

    async def test_stream_entry_body_is_castores_json_message(
        self, prefix: str, raw: Redis
    ) -> None:
        """The bus entry's body is Castore's camelCase JSON; the replay flag sits beside it."""
        bus = make_bus()
        async with attach(bus, prefix) as adapter:
            await bus.publish_message(caught(3))
            entries: Any = await raw.xrange(adapter.stream_key)
        [(_, fields)] = entries
        assert fields[b"replay"] == b"0"
        assert json.loads(fields[b"body"]) == {
            "eventStoreId": "POKEMONS",
            "event": {
                "aggregateId": "pokemon-3",
                "version": 2,
                "type": "POKEMON_CAUGHT",
                "timestamp": "2024-01-01T00:00:00.003Z",
            },
        }

    async def test_listener_ids_name_the_consumer_groups(self, prefix: str, raw: Redis) -> None:
        """Each listener has a consumer group named after its id (default: the handler's name)."""
        bus = make_bus()
        adapter = attach(bus, prefix)

        async def on_pokemon(message: Any, context: MessageContext) -> None:
            """A listener registered without an id."""

        adapter.on({}, on_pokemon)
        adapter.on({}, Recorder(), listener_id="projections")
        async with adapter:
            groups: Any = await raw.xinfo_groups(adapter.stream_key)
        assert adapter.listener_ids == (on_pokemon.__qualname__, "projections")
        assert sorted(group["name"].decode() for group in groups) == sorted(adapter.listener_ids)

    async def test_non_matching_entries_are_acknowledged_without_calling(
        self, prefix: str, raw: Redis
    ) -> None:
        """Entries a listener's patterns reject (and replays) are acknowledged, not handled."""
        bus = make_bus()
        adapter = attach(bus, prefix)
        listener = Recorder()
        adapter.on(
            {"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"},
            listener,
            listener_id="catches",
        )
        async with adapter:
            async with adapter.consuming():
                await bus.publish_messages([notification(1), notification(2)])
                await bus.publish_message(caught(2), replay=True)
                await bus.publish_message(caught(1))
                await listener.wait_for(1)
            assert await group_pending(raw, adapter.stream_key, "catches") == 0
        assert listener.messages == [caught(1)]

    async def test_messages_no_pattern_asks_for_are_skipped_without_validating_them(
        self, prefix: str, raw: Redis
    ) -> None:
        """A listener dead-lettered, with an ERROR log each, every message of an event type or
        store it does not know although its patterns did not ask for it (a producer one
        release ahead). Such messages are now skipped before being validated; a listener
        that asks for them still dead-letters what it cannot validate."""
        bus = make_bus()
        adapter = attach(bus, prefix)
        catches, everything = Recorder(), Recorder()
        adapter.on(
            {"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"},
            catches,
            listener_id="catches",
        )
        adapter.on({"event_store_id": "POKEMONS"}, everything, listener_id="everything")
        unknown_type = {
            "eventStoreId": "POKEMONS",
            "event": {"aggregateId": "eevee", "version": 2, "type": "POKEMON_EVOLVED"},
        }
        unknown_store = {
            "eventStoreId": "TRAINERS",
            "event": {"aggregateId": "ash", "version": 1, "type": "TRAINER_CREATED"},
        }
        with watch_dead_letters() as watch:
            async with adapter:
                for body in (unknown_type, unknown_store):
                    await raw.xadd(adapter.stream_key, {"body": json.dumps(body), "replay": "0"})
                async with adapter.consuming():
                    await bus.publish_message(caught(1))
                    await catches.wait_for(1)
                    await everything.wait_for(1)
                    await watch.wait_for(1)
                catches_dead = f"{adapter.stream_key}:listener:catches:dead-letters"
                everything_dead = f"{adapter.stream_key}:listener:everything:dead-letters"
                assert await raw.xlen(catches_dead) == 0
                assert await raw.xlen(everything_dead) == 1
                assert await group_pending(raw, adapter.stream_key, "catches") == 0
        assert catches.messages == everything.messages == [caught(1)]
        assert len(watch.records) == 1

    async def test_listener_gets_what_was_published_while_no_consumer_ran(
        self, prefix: str
    ) -> None:
        """Once a listener's group exists, messages published while nobody consumes wait for it."""
        bus = make_bus()
        adapter = attach(bus, prefix)
        listener = Recorder()
        adapter.on({}, listener, listener_id="late-starter")
        async with adapter:  # creates the listener's group
            await bus.publish_messages([notification(index) for index in range(5)])
            async with adapter.consuming():
                await listener.wait_for(5)
        assert listener.messages == [notification(index) for index in range(5)]

    async def test_publishing_before_connecting_keeps_registered_listeners_messages(
        self, prefix: str
    ) -> None:
        """Publishing connects on first use: a listener registered before the adapter's
        first publish gets it (its group used to be created later, after the message)."""
        bus = make_bus()
        adapter = attach(bus, prefix)
        listener = Recorder()
        adapter.on({}, listener, listener_id="registered-first")
        try:
            await bus.publish_message(notification(1))  # neither connected nor consuming
            async with adapter.consuming():
                await bus.publish_message(notification(2))
                await listener.wait_for(2)
        finally:
            await adapter.aclose()
        assert listener.messages == [notification(1), notification(2)]

    async def test_listener_registered_on_a_connected_adapter_exists_at_once(
        self, prefix: str
    ) -> None:
        """A listener registered after connecting gets what the adapter publishes next."""
        bus = make_bus()
        adapter = attach(bus, prefix)
        listener = Recorder()
        async with adapter:
            adapter.on({}, listener, listener_id="registered-late")
            await bus.publish_message(notification(1))  # before any consumer runs
            async with adapter.consuming():
                await listener.wait_for(1)
        assert listener.messages == [notification(1)]

    async def test_listener_joining_while_consuming_starts_gets_one_consumer(
        self, prefix: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A late listener whose group is still being created when consuming starts runs once."""
        gate = asyncio.Event()

        async def held(client: Redis, subscription: Subscription) -> None:
            await gate.wait()
            await ensure_group(client, subscription)

        # Only the late listener's own group creation waits; start_consuming's does not.
        monkeypatch.setattr("castore_pydantic.messaging.redis.ensure_group", held)
        bus = make_bus()
        adapter = attach(bus, prefix)
        listener = Recorder()
        async with adapter:
            adapter.on({}, listener, listener_id="joining")
            async with adapter.consuming():
                gate.set()
                await bus.publish_message(notification(1))  # waits for the listener to join
                await listener.wait_for(1)
                consumers = [
                    task
                    for task in asyncio.all_tasks()
                    if task.get_name() == "castore-redis-consumer:joining" and not task.done()
                ]
                assert len(consumers) == 1
        assert listener.messages == [notification(1)]

    async def test_new_listener_starts_with_messages_published_after_it(self, prefix: str) -> None:
        """A listener registered later does not receive the bus's earlier messages."""
        bus = make_bus()
        adapter = attach(bus, prefix)
        early, late = Recorder(), Recorder()
        adapter.on({}, early, listener_id="early")
        async with adapter, adapter.consuming():
            await bus.publish_message(notification(1))
            await early.wait_for(1)
            adapter.on({}, late, listener_id="late")  # starts at once, while consuming
            await bus.publish_message(notification(2))
            await late.wait_for(1)
            await early.wait_for(2)
        assert late.messages == [notification(2)]
        assert early.messages == [notification(1), notification(2)]

    async def test_adapters_with_one_listener_id_share_its_messages(self, prefix: str) -> None:
        """Two processes running listener "p" split its messages; listener "audit" gets all."""
        bus_a, bus_b = make_bus(), make_bus()
        adapter_a = attach(bus_a, prefix, prefetch_count=5)
        adapter_b = attach(bus_b, prefix, prefetch_count=5)
        handled: dict[str, list[Any]] = {"a": [], "b": []}
        audit = Recorder()
        b_started = asyncio.Event()
        done = asyncio.Event()
        messages = [notification(index) for index in range(100)]

        def projection(name: str) -> Any:
            async def project(message: Any, context: MessageContext) -> None:
                handled[name].append(message)
                if name == "b":
                    b_started.set()
                else:
                    await b_started.wait()  # hold A until B has work too
                if len(handled["a"]) + len(handled["b"]) == len(messages):
                    done.set()

            return project

        adapter_a.on({}, projection("a"), listener_id="p")
        adapter_b.on({}, projection("b"), listener_id="p")
        adapter_a.on({}, audit, listener_id="audit")
        async with adapter_a, adapter_b:
            await bus_a.publish_messages(messages)
            async with adapter_a.consuming(), adapter_b.consuming():
                await asyncio.wait_for(done.wait(), 20)
                await audit.wait_for(100)
        assert handled["a"]
        assert handled["b"]
        assert sorted(handled["a"] + handled["b"], key=repr) == sorted(messages, key=repr)
        assert audit.messages == messages

    async def test_same_listener_id_for_another_handler_is_refused(self, prefix: str) -> None:
        """A listener id names one handler; reusing it for another raises ValueError."""
        adapter = attach(make_bus(), prefix)
        adapter.on({}, Recorder(), listener_id="projection")
        with pytest.raises(ValueError, match="already used by another handler"):
            adapter.on({}, Recorder(), listener_id="projection")

    async def test_bad_pattern_is_refused(self, prefix: str) -> None:
        """A pattern with a camelCase key is refused before anything is registered."""
        adapter = attach(make_bus(), prefix)
        with pytest.raises(ValueError, match="unknown filter pattern key"):
            adapter.on({"eventStoreId": "POKEMONS"}, Recorder(), listener_id="x")
        assert adapter.listener_ids == ()

    async def test_max_length_trims_the_bus_stream(self, prefix: str, raw: Redis) -> None:
        """With max_length, publishing keeps the stream near that many entries."""
        bus = make_bus()
        async with attach(bus, prefix, max_length=10) as adapter:
            for start in range(0, 1000, 100):
                await bus.publish_messages(
                    [notification(index) for index in range(start, start + 100)]
                )
            length = await raw.xlen(adapter.stream_key)
        assert 10 <= length < 1000

    async def test_pending_entries_trimmed_away_are_acknowledged(
        self, prefix: str, raw: Redis
    ) -> None:
        """A restarted consumer drops its pending entries that were trimmed from the stream."""
        died = asyncio.Event()

        async def die(message: Any, context: MessageContext) -> None:
            died.set()
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # the worker dies holding the 10 entries it read
            await asyncio.sleep(0)

        bus = make_bus()
        adapter = attach(bus, prefix, name="keeper", prefetch_count=10, reclaim_idle_ms=60_000)
        adapter.on({}, die, listener_id="slow")
        async with adapter:
            async with adapter.consuming():
                await bus.publish_messages([notification(index) for index in range(10)])
                await died.wait()
            assert await group_pending(raw, adapter.stream_key, "slow") == 10
            await raw.xtrim(adapter.stream_key, maxlen=0, approximate=False)
            listener = Recorder()
            # The same consumer name first goes through what it still holds.
            restarted = attach(make_bus(), prefix, name="keeper", reclaim_idle_ms=60_000)
            restarted.on({}, listener, listener_id="slow")
            async with restarted, restarted.consuming():
                await bus.publish_message(notification(10))
                await listener.wait_for(1)
                assert await group_pending(raw, adapter.stream_key, "slow") == 0
        assert listener.messages == [notification(10)]

    async def test_publishing_to_a_redis_that_is_down_raises_broker_unavailable(self) -> None:
        """Publishing on a bus whose Redis is unreachable raises MessageBrokerUnavailableError."""
        bus = make_bus()
        adapter = RedisMessageBusAdapter.attach_to(
            bus, f"redis://user:hunter2@127.0.0.1:{closed_port()}/0"
        )
        with pytest.raises(MessageBrokerUnavailableError) as raised:
            await bus.publish_message(notification(1))
        await adapter.aclose()
        assert isinstance(raised.value.__cause__, RedisConnectionError)
        assert "hunter2" not in str(raised.value)
        assert "hunter2" not in repr(adapter)

    async def test_adapter_cannot_carry_a_queue(self) -> None:
        """Attaching a bus adapter to a queue is refused."""
        queue = NotificationMessageQueue(message_queue_id="q", source_event_stores=[make_store()])
        with pytest.raises(TypeError, match="carries a message bus"):
            RedisMessageBusAdapter.attach_to(queue, REDIS_URL)


def wire(data: object) -> dict[str, Any]:
    """The fields of a stream entry a foreign producer wrote, holding ``data`` as its body."""
    return {"body": data if isinstance(data, bytes) else json.dumps(data), "replay": "0"}


#: Bodies no source store validates, each with the listeners (see ``TestRawBodies``) that
#: asked for it and so keep it as a dead letter.
_INVALID_BODIES: list[tuple[object, set[str]]] = [
    (b"not json", {"everything", "by-store", "typed", "elsewhere"}),
    (
        {
            "eventStoreId": "POKEMONS",
            "event": {"aggregateId": "eevee", "version": 2, "type": "POKEMON_EVOLVED"},
        },
        {"everything", "by-store"},
    ),
    (
        {
            "eventStoreId": "TRAINERS",
            "event": {"aggregateId": "ash", "version": 1, "type": "TRAINER_CREATED"},
        },
        {"everything"},
    ),
    # Without a type: only validation could tell it, and it fails (the store has 3 classes).
    (
        {"eventStoreId": "POKEMONS", "event": {"aggregateId": "eevee", "version": 2}},
        {"everything", "by-store", "typed"},
    ),
]


class TestRawBodies:
    """What each listener does with bodies other producers wrote: skip, handle, dead-letter."""

    LISTENERS: ClassVar[dict[str, FilterPattern]] = {
        "everything": {},
        "by-store": {"event_store_id": "POKEMONS"},
        "typed": {"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"},
        "elsewhere": {"event_store_id": "RIVALS"},
    }

    async def _run(
        self, prefix: str, raw: Redis, entries: list[dict[str, Any]]
    ) -> tuple[dict[str, Recorder], dict[str, int]]:
        """Append ``entries``, then one message per store; return recorders and dead letters."""
        bus = NotificationMessageBus(
            message_bus_id="raw-bodies",
            source_event_stores=[make_store(), make_store(event_store_id="RIVALS")],
        )
        adapter = attach(bus, prefix)
        recorders = {name: Recorder() for name in self.LISTENERS}
        for name, pattern in self.LISTENERS.items():
            adapter.on(pattern, recorders[name], listener_id=name)
        rival = notification(2, event_store_id="RIVALS")
        async with adapter:
            for fields in entries:
                await raw.xadd(adapter.stream_key, fields)
            async with adapter.consuming():
                # A listener handles entries in order: its last one tells it is done.
                await bus.publish_messages([caught(1), rival])
                for name in ("by-store", "typed"):
                    await recorders[name].wait_for(1)
                await recorders["everything"].wait_for(2)
                await recorders["elsewhere"].wait_for(1)
            dead = {
                name: await raw.xlen(f"{adapter.stream_key}:listener:{name}:dead-letters")
                for name in self.LISTENERS
            }
            for name in self.LISTENERS:
                assert await group_pending(raw, adapter.stream_key, name) == 0
        assert recorders["everything"].messages == [caught(1), rival]
        assert recorders["elsewhere"].messages == [rival]
        return recorders, dead

    async def test_a_body_that_does_not_validate_is_kept_by_the_listeners_asking_for_it(
        self, prefix: str, raw: Redis
    ) -> None:
        """An invalid body is dead-lettered at once by each listener whose patterns may want
        it (all of them when its routing fields cannot be read); the others skip it."""
        with watch_dead_letters():
            _, dead = await self._run(prefix, raw, [wire(body) for body, _ in _INVALID_BODIES])
        assert dead == {
            name: sum(name in keeping for _, keeping in _INVALID_BODIES) for name in self.LISTENERS
        }

    async def test_a_replay_reaches_no_listener_without_on_replay(
        self, prefix: str, raw: Redis
    ) -> None:
        """Replayed bodies, valid or not, are skipped by listeners whose patterns take no
        replays: never handled, never dead-lettered."""
        entries = [{**wire(body), "replay": "1"} for body, _ in _INVALID_BODIES]
        entries.append({"body": caught(5).model_dump_json(), "replay": "1"})
        with watch_dead_letters() as watch:
            recorders, dead = await self._run(prefix, raw, entries)
        assert dead == dict.fromkeys(self.LISTENERS, 0)
        assert watch.records == []
        assert recorders["typed"].messages == [caught(1)]

    async def test_an_event_without_a_type_goes_where_its_validated_type_does(
        self, prefix: str, raw: Redis
    ) -> None:
        """A store with one event class accepts an event without a type: the listener asking
        for that class's type gets it; one asking for another store neither gets it nor
        dead-letters it. (A pattern for a type the store does not declare is refused.)"""
        bus = NotificationMessageBus(
            message_bus_id="typeless", source_event_stores=[make_store(), fleeing_store()]
        )
        adapter = attach(bus, prefix)
        fled, other = Recorder(), Recorder()
        adapter.on({"event_store_id": "FLEES", "event_type": "POKEMON_FLED"}, fled, listener_id="f")
        with pytest.raises(UnknownEventTypeError):
            adapter.on(
                {"event_store_id": "FLEES", "event_type": "POKEMON_GONE"}, other, listener_id="o"
            )
        adapter.on({"event_store_id": "POKEMONS"}, other, listener_id="o")
        typeless = {"eventStoreId": "FLEES", "event": {"aggregateId": "abra", "version": 2}}
        with watch_dead_letters() as watch:
            async with adapter:
                await raw.xadd(adapter.stream_key, wire(typeless))
                async with adapter.consuming():
                    await bus.publish_message(caught(1))
                    await fled.wait_for(1)
                    await other.wait_for(1)
                for listener_id in ("f", "o"):
                    assert await group_pending(raw, adapter.stream_key, listener_id) == 0
        assert [message.event for message in fled.messages] == [
            PokemonFled(aggregate_id="abra", version=2)
        ]
        assert other.messages == [caught(1)]
        assert watch.records == []

    async def test_an_event_without_a_type_of_a_store_no_pattern_names_is_skipped(
        self, prefix: str, raw: Redis
    ) -> None:
        """A listener asking for one type of one store dead-lettered (with an ERROR log) an
        event without a type of a store it never named, which no validation could make
        its business. It is now skipped, as that store's typed events are."""
        typeless = {"eventStoreId": "TRAINERS", "event": {"aggregateId": "ash", "version": 1}}
        with watch_dead_letters() as watch:
            recorders, dead = await self._run(prefix, raw, [wire(typeless)])
        assert dead == {"everything": 1, "by-store": 0, "typed": 0, "elsewhere": 0}
        assert len(watch.records) == 1
        assert recorders["typed"].messages == [caught(1)]

    async def test_an_abandoned_entry_the_listener_does_not_want_is_not_dead_lettered(
        self, prefix: str, raw: Redis
    ) -> None:
        """An entry whose patterns could only be checked once validated (an event without a
        type), taken over more than max_deliveries times, was dead-lettered by a listener
        whose patterns it does not match. It is acknowledged without a trace, as the
        entries it does not want always were. (Its pattern names a type the store does not
        declare: on() takes it only before the adapter is attached to its bus.)"""
        bus = NotificationMessageBus(
            message_bus_id="abandoned", source_event_stores=[make_store(), fleeing_store()]
        )
        adapter = RedisMessageBusAdapter(
            REDIS_URL, key_prefix=prefix, max_deliveries=1, reclaim_idle_ms=50, block_ms=50
        )
        listener = Recorder()
        adapter.on(
            {"event_store_id": "FLEES", "event_type": "POKEMON_GONE"}, listener, listener_id="l"
        )
        adapter.on({"event_store_id": "POKEMONS"}, listener, listener_id="l")
        bus.message_channel_adapter, adapter.message_channel = adapter, bus
        typeless = {"eventStoreId": "FLEES", "event": {"aggregateId": "abra", "version": 2}}
        with watch_dead_letters() as watch:
            async with adapter:
                [entry_id] = [await raw.xadd(adapter.stream_key, wire(typeless))]
                # Consumers that died holding it: it was delivered five times.
                await raw.xreadgroup("l", "ghost", {adapter.stream_key: ">"}, count=1)
                await raw.xclaim(
                    adapter.stream_key, "l", "ghost", 0, [entry_id], idle=10_000, retrycount=5
                )
                async with adapter.consuming():
                    await bus.publish_message(caught(1))
                    await listener.wait_for(1)
                dead = await raw.xlen(f"{adapter.stream_key}:listener:l:dead-letters")
                assert await group_pending(raw, adapter.stream_key, "l") == 0
        assert listener.messages == [caught(1)]
        assert (dead, watch.records) == (0, [])


class TestPurgeWhileConsuming:
    async def test_listeners_get_what_is_published_right_after_a_purge(self, prefix: str) -> None:
        """A purge while the adapter consumes loses nothing published after it returned, for
        every listener; a failing one retries it through its retry stream as before."""
        bus = make_bus()
        adapter = attach(bus, prefix)
        steady = Recorder()
        flaky = Recorder(fail=lambda message, context: context.attempt == 1)
        adapter.on({}, steady, listener_id="steady")
        adapter.on({}, flaky, listener_id="flaky")
        async with adapter, adapter.consuming():
            await bus.publish_message(notification(1))
            await steady.wait_for(1)
            await flaky.wait_for(2)
            await adapter.purge()
            await bus.publish_message(notification(2))
            await steady.wait_for(2, seconds=10)
            await flaky.wait_for(4, seconds=10)
        assert steady.messages == [notification(1), notification(2)]
        assert [(message, context.attempt) for message, context in flaky.calls] == [
            (notification(1), 1),
            (notification(1), 2),
            (notification(2), 1),
            (notification(2), 2),
        ]

    async def test_another_adapters_purge_loses_nothing_for_a_consuming_listener(
        self, prefix: str
    ) -> None:
        """A listener consuming in one adapter (another process, say) whose group another
        adapter purged creates it again at the start of the new stream: the message that
        adapter published right after its purge is delivered."""
        bus = make_bus()
        consumer = attach(bus, prefix)
        listener = Recorder()
        consumer.on({}, listener, listener_id="projection")
        purger = attach(make_bus(), prefix)  # another adapter of the same bus, no listener
        async with consumer, purger, consumer.consuming():
            await purger.publish_message(notification(1))
            await listener.wait_for(1)
            await purger.purge()
            await purger.publish_message(notification(2))
            await listener.wait_for(2, seconds=10)
        assert listener.messages == [notification(1), notification(2)]

    async def test_a_group_deleted_alone_starts_again_after_the_last_entry_read(
        self, prefix: str, raw: Redis
    ) -> None:
        """A listener's group deleted while its stream stays (XGROUP DESTROY) is created
        again after the last entry it delivered: what was published since arrives, what it
        had read is not handled again."""
        bus = make_bus()
        adapter = attach(bus, prefix)
        listener = Recorder()
        adapter.on({}, listener, listener_id="projection")
        async with adapter, adapter.consuming():
            await bus.publish_messages([notification(1), notification(2)])
            await listener.wait_for(2)
            await raw.xgroup_destroy(adapter.stream_key, "projection")
            await bus.publish_message(notification(3))
            await listener.wait_for(3, seconds=10)
            await bus.publish_message(notification(4))
            await listener.wait_for(4, seconds=10)
        assert listener.messages == [notification(index) for index in range(1, 5)]

    async def test_a_listener_not_consuming_keeps_what_is_published_after_a_purge(
        self, prefix: str
    ) -> None:
        """A purge deletes the groups of listeners that do not consume; publishing through
        the adapter creates them again first, so they still get that message later."""
        bus = make_bus()
        adapter = attach(bus, prefix)
        listener = Recorder()
        adapter.on({}, listener, listener_id="projection")
        async with adapter:
            await adapter.purge()
            await bus.publish_message(notification(1))
            async with adapter.consuming():
                await listener.wait_for(1, seconds=10)
        assert listener.messages == [notification(1)]


class TestEventLoops:
    def test_a_listener_registered_on_a_new_loop_joins_there(self, prefix: str) -> None:
        """A listener registered on a new loop, after the loop the adapter connected on has
        closed, gets its group on the new loop: both listeners get what is published there."""
        bus = make_bus()
        adapter = attach(bus, prefix)
        first, second = Recorder(), Recorder()
        adapter.on({}, first, listener_id="first")

        async def on_the_first_loop() -> None:
            await adapter.connect()

        async def on_the_second_loop() -> None:
            adapter.on({}, second, listener_id="second")
            await bus.publish_message(notification(1))
            async with adapter.consuming():
                await first.wait_for(1)
                await second.wait_for(1)
            await adapter.aclose()

        asyncio.run(on_the_first_loop())
        asyncio.run(on_the_second_loop())
        assert first.messages == second.messages == [notification(1)]
