"""RabbitMQ queue and bus adapters: the public contracts, topology, wire format, lifecycle.

Broker tests share one private vhost per module; each test uses its own channel id and purges
what it declared.
"""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from castore_pydantic.messaging import (
    AggregateExistsMessage,
    ConnectedEventStore,
    FilterPattern,
    MessageChannel,
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
    RetryPolicy,
)
from castore_pydantic.messaging import _rabbitmq_adapter as rabbitmq_adapter
from castore_pydantic.messaging.rabbitmq import (
    RabbitMQMessageBusAdapter,
    RabbitMQMessageQueueAdapter,
    binding_keys,
    routing_key,
)
from castore_pydantic.testing.contracts import (
    MessageAdapterFactory,
    MessageBusAdapterContract,
    MessageQueueAdapterContract,
)
from tests.domain import PokemonFled, fleeing_store
from tests.messaging.rabbitmq_support import (
    T0,
    Appeared,
    DeadLetterWatch,
    PokemonAppeared,
    PokemonCaught,
    consumer_count,
    event_key,
    message_count,
    notification,
    pokemon_store,
    private_vhost,
    vhost_url,
    within,
)


@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    with private_vhost() as name:
        yield name


def _factory(adapter_class: Any, vhost: str, made: list[Any]) -> MessageAdapterFactory:
    async def make(
        channel: MessageChannel[Any],
        *,
        retry_attempts: int,
        retry_delay_in_ms: float,
        retry_backoff_rate: float,
    ) -> Any:
        adapter = adapter_class.attach_to(
            channel,
            vhost_url(vhost),
            retry_attempts=retry_attempts,
            retry_delay_in_ms=retry_delay_in_ms,
            retry_backoff_rate=retry_backoff_rate,
        )
        made.append(adapter)
        await adapter.connect()
        return adapter

    return make


@pytest.mark.rabbitmq
class TestQueueContract(MessageQueueAdapterContract):
    """The queue adapter passes the public message queue adapter contract."""

    @pytest.fixture
    async def queue_adapter_factory(self, vhost: str) -> AsyncIterator[MessageAdapterFactory]:
        made: list[RabbitMQMessageQueueAdapter] = []
        yield _factory(RabbitMQMessageQueueAdapter, vhost, made)
        for adapter in made:
            await adapter.purge()
            await adapter.aclose()


@pytest.mark.rabbitmq
class TestBusContract(MessageBusAdapterContract):
    """The bus adapter passes the public message bus adapter contract."""

    @pytest.fixture
    async def bus_adapter_factory(self, vhost: str) -> AsyncIterator[MessageAdapterFactory]:
        made: list[RabbitMQMessageBusAdapter] = []
        yield _factory(RabbitMQMessageBusAdapter, vhost, made)
        for adapter in made:
            await adapter.purge()
            await adapter.aclose()


# -- routing keys and bindings (no broker) ---------------------------------------------------


def _message(event_store_id: str, event_type: str) -> NotificationMessage:
    event: Any
    if event_type == "POKEMON_CAUGHT":
        event = PokemonCaught(aggregate_id="a", version=2, timestamp=T0)
    else:
        event = PokemonAppeared(
            aggregate_id="a", version=1, timestamp=T0, payload=Appeared(name="x", level=1)
        )
    return NotificationMessage(event_store_id=event_store_id, event=event)


def _topic_matches(binding: str, key: str) -> bool:
    """RabbitMQ's topic matching (``*`` one word, ``#`` zero or more), for the unit tests."""

    def match(pattern: list[str], words: list[str]) -> bool:
        if not pattern:
            return not words
        head, rest = pattern[0], pattern[1:]
        if head == "#":
            return any(match(rest, words[i:]) for i in range(len(words) + 1))
        return bool(words) and head in ("*", words[0]) and match(rest, words[1:])

    return match(binding.split("."), key.split("."))


class TestRoutingKeys:
    """Routing keys carry the event store id and type, escaped so bindings match exactly."""

    def test_live_and_replay_prefixes(self) -> None:
        """A live message is routed under ``live.``, a replayed one under ``replay.``."""
        message = _message("POKEMONS", "POKEMON_CAUGHT")
        assert routing_key(message) == "live.POKEMONS.POKEMON_CAUGHT"
        assert routing_key(message, replay=True) == "replay.POKEMONS.POKEMON_CAUGHT"

    def test_dots_and_wildcards_in_ids_are_escaped(self) -> None:
        """Dots, ``*``, ``#`` and ``%`` in ids cannot split words or act as wildcards."""
        message = NotificationMessage.model_construct(
            event_store_id="a.b*#%", event=PokemonCaught(aggregate_id="a", version=2)
        )
        assert routing_key(message) == "live.a%2Eb%2A%23%25.POKEMON_CAUGHT"

    def test_aggregate_exists_messages_use_the_reserved_type(self) -> None:
        """Aggregate-exists messages carry no event; their type word is reserved."""
        message = AggregateExistsMessage(
            event_store_id="POKEMONS", aggregate_id="a", initial_event_timestamp=T0
        )
        assert routing_key(message) == "live.POKEMONS.__AGGREGATE_EXISTS__"

    def test_an_overlong_key_is_refused(self) -> None:
        """A key over AMQP's 255 bytes raises a clear ValueError before anything is sent."""
        with pytest.raises(ValueError, match="longer than 255 bytes"):
            routing_key(_message("P" * 300, "POKEMON_CAUGHT"))

    @pytest.mark.parametrize(
        ("pattern", "expected"),
        [
            ({}, ("live.#",)),
            ({"on_replay": True}, ("#",)),
            ({"event_type": "POKEMON_CAUGHT"}, ("live.#",)),
            ({"event_store_id": "POKEMONS"}, ("live.POKEMONS.*",)),
            (
                {"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT", "on_replay": True},
                ("*.POKEMONS.POKEMON_CAUGHT",),
            ),
        ],
    )
    def test_binding_keys(self, pattern: Any, expected: tuple[str, ...]) -> None:
        """Each filter pattern binds the keys Castore's matching rules call for."""
        assert binding_keys(pattern) == expected

    @pytest.mark.parametrize("replay", [False, True])
    def test_bindings_select_exactly_what_matches_says(self, replay: bool) -> None:
        """Over tricky ids, a binding routes a message iff Castore's ``matches`` accepts it."""
        from castore_pydantic.messaging import matches

        stores = ["POKEMONS", "POKEMONS.EXTRA", "*", "#", "", "a.b", "a"]
        types = ["POKEMON_APPEARED", "POKEMON_CAUGHT"]
        patterns: list[Any] = [{}, {"on_replay": True}]
        for store in stores:
            patterns += [
                {"event_store_id": store},
                {"event_store_id": store, "on_replay": True},
                *({"event_store_id": store, "event_type": t} for t in types),
            ]
        for store in stores:
            for event_type in types:
                message = NotificationMessage.model_construct(
                    event_store_id=store, event=_message("x", event_type).event
                )
                key = routing_key(message, replay=replay)
                for pattern in patterns:
                    routed = any(_topic_matches(b, key) for b in binding_keys(pattern))
                    assert routed == matches(pattern, message, replay), (pattern, key)


# -- construction (no broker) -----------------------------------------------------------------


class TestConstruction:
    """Options are validated, names derive from the channel, secrets stay hidden."""

    @pytest.mark.parametrize(
        ("option", "value", "match"),
        [
            ("retry_attempts", -1, "retry_attempts"),
            ("retry_delay_in_ms", "soon", "retry_delay_in_ms"),
            ("retry_backoff_rate", -2, "retry_backoff_rate"),
            ("prefetch_count", 0, "prefetch_count"),
            ("reconnect_delay", -1, "reconnect_delay"),
            ("publish_timeout", 0, "publish_timeout"),
            ("publish_timeout", -1, "publish_timeout"),
            ("publish_timeout", "30", "publish_timeout"),
            ("publish_timeout", True, "publish_timeout"),
            ("name_prefix", "amq.", "name"),
        ],
    )
    def test_bad_options_are_refused(self, option: str, value: Any, match: str) -> None:
        """A bad option raises a ValueError naming it."""
        with pytest.raises(ValueError, match=match):
            RabbitMQMessageQueueAdapter("amqp://localhost/", **{option: value})

    def test_a_non_amqp_url_is_refused(self) -> None:
        """Only amqp:// and amqps:// URLs are accepted."""
        with pytest.raises(ValueError, match="amqp://"):
            RabbitMQMessageBusAdapter("redis://localhost/")

    def test_retry_policy_and_delivery_guarantee(self) -> None:
        """Both adapters deliver at least once and keep the retry options given."""
        queue_adapter = RabbitMQMessageQueueAdapter(
            "amqp://localhost/", retry_attempts=4, retry_delay_in_ms=10, retry_backoff_rate=3
        )
        bus_adapter = RabbitMQMessageBusAdapter("amqp://localhost/")
        assert queue_adapter.delivery_guarantee == "at-least-once"
        assert bus_adapter.delivery_guarantee == "at-least-once"
        assert queue_adapter.retry_policy == RetryPolicy(4, 10, 3)
        assert bus_adapter.retry_policy == RetryPolicy()

    def test_names_derive_from_the_channel_and_listener(self) -> None:
        """Queue, exchange and listener queue names come from the ids, escaped for AMQP."""
        store = pokemon_store()
        queue = NotificationMessageQueue(message_queue_id="orders", source_event_stores=[store])
        bus = NotificationMessageBus(message_bus_id="pokédex", source_event_stores=[store])
        queue_adapter = RabbitMQMessageQueueAdapter.attach_to(queue, "amqp://localhost/")
        bus_adapter = RabbitMQMessageBusAdapter.attach_to(
            bus, "amqp://localhost/", name_prefix="app."
        )
        assert queue_adapter.queue_name == "castore.queue.orders"
        assert bus_adapter.exchange_name == "app.bus.pok+C3+A9dex"
        assert bus_adapter.listener_queue("a<b>") == "app.bus.pok+C3+A9dex.a+3Cb+3E"

    def test_attach_to_sets_the_channel_adapter_and_checks_its_kind(self) -> None:
        """attach_to makes the adapter the channel's; a queue adapter refuses a bus."""
        store = pokemon_store()
        queue = NotificationMessageQueue(message_queue_id="q", source_event_stores=[store])
        bus = NotificationMessageBus(message_bus_id="b", source_event_stores=[store])
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, "amqp://localhost/")
        assert queue.message_channel_adapter is adapter
        assert adapter.message_channel is queue
        with pytest.raises(TypeError, match="RabbitMQMessageBusAdapter"):
            RabbitMQMessageQueueAdapter.attach_to(bus, "amqp://localhost/")
        with pytest.raises(TypeError, match="RabbitMQMessageQueueAdapter"):
            RabbitMQMessageBusAdapter.attach_to(queue, "amqp://localhost/")

    def test_password_is_masked(self) -> None:
        """The password never shows in the URL property or the repr."""
        adapter = RabbitMQMessageQueueAdapter("amqp://user:s3cret-pw@host:5672/vh")
        assert adapter.url == "amqp://user:***@host:5672/vh"
        assert "s3cret-pw" not in repr(adapter)

    async def test_consuming_needs_a_channel_and_a_handler(self) -> None:
        """Starting without a channel, worker or listener says what to do, before connecting."""
        with pytest.raises(RuntimeError, match="attach_to"):
            await RabbitMQMessageQueueAdapter("amqp://localhost/").start_consuming()
        store = pokemon_store()
        queue = NotificationMessageQueue(message_queue_id="q", source_event_stores=[store])
        with pytest.raises(RuntimeError, match="worker"):
            await RabbitMQMessageQueueAdapter.attach_to(queue, "amqp://x/").start_consuming()
        bus = NotificationMessageBus(message_bus_id="b", source_event_stores=[store])
        with pytest.raises(RuntimeError, match="on\\(pattern, handler\\)"):
            await RabbitMQMessageBusAdapter.attach_to(bus, "amqp://x/").start_consuming()

    def test_listener_ids(self) -> None:
        """A listener id defaults to the handler's name and may not name two handlers."""
        store = pokemon_store()
        bus = NotificationMessageBus(message_bus_id="b", source_event_stores=[store])
        adapter = RabbitMQMessageBusAdapter.attach_to(bus, "amqp://localhost/")

        async def project(message: Any, context: MessageContext) -> None: ...

        async def other(message: Any, context: MessageContext) -> None: ...

        assert adapter.on({}, project) == project.__qualname__
        assert adapter.on({"event_store_id": "POKEMONS"}, project) == project.__qualname__
        with pytest.raises(ValueError, match="already used by another handler"):
            adapter.on({}, other, listener_id=project.__qualname__)
        with pytest.raises(ValueError, match="unknown filter pattern key"):
            adapter.on({"eventStoreId": "POKEMONS"}, other)
        assert adapter.listener_ids == (project.__qualname__,)

    def test_missing_driver_names_the_extra(self) -> None:
        """Without aio-pika, importing the module says which extra to install."""
        code = (
            "import sys; sys.modules['aio_pika'] = None\n"
            "try:\n"
            "    import castore_pydantic.messaging.rabbitmq\n"
            "except ImportError as error:\n"
            "    print(error)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        assert "pip install 'castore-pydantic[rabbitmq]'" in result.stdout


# -- against the broker ------------------------------------------------------------------------


class Inbox:
    """A handler that collects messages and lets a test await a number of them."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.contexts: list[MessageContext] = []
        self._changed = asyncio.Event()

    async def __call__(self, message: Any, context: MessageContext) -> None:
        self.messages.append(message)
        self.contexts.append(context)
        self._changed.set()

    async def wait_for(self, count: int) -> None:
        self._changed = asyncio.Event()  # of this event loop: a test may run several
        async with asyncio.timeout(20):
            while len(self.messages) < count:
                self._changed.clear()
                await self._changed.wait()


async def _publish_raw(vhost: str, exchange_name: str, bodies: dict[str, Any]) -> None:
    """Publish JSON bodies to a bus exchange as a foreign producer would, by routing key."""
    async with (
        await aio_pika.connect(vhost_url(vhost)) as connection,
        connection.channel() as channel,
    ):
        exchange = await channel.get_exchange(exchange_name)
        for key, body in bodies.items():
            await exchange.publish(aio_pika.Message(json.dumps(body).encode()), key)


EXPECTED_WIRE = {
    "eventStoreId": "POKEMONS",
    "event": {
        "aggregateId": "pokemon-0",
        "version": 1,
        "timestamp": "2024-01-01T00:00:00.000Z",
        "type": "POKEMON_APPEARED",
        "payload": {"name": "Pikachu 0", "level": 1},
    },
}


@pytest.mark.rabbitmq
class TestWireFormat:
    """What the adapters publish is Castore's JSON, readable by any AMQP client."""

    async def test_queue_body_is_castore_json(self, vhost: str) -> None:
        """A raw aio-pika consumer reads exactly Castore's message; replay is a header."""
        queue = NotificationMessageQueue(
            message_queue_id="wire", source_event_stores=[pokemon_store()]
        )
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost))
        async with adapter:
            await queue.publish_message(notification(0), replay=True)
            async with (
                await aio_pika.connect(vhost_url(vhost)) as connection,
                connection.channel() as channel,
            ):
                raw = await channel.declare_queue(adapter.queue_name, passive=True)
                incoming = await raw.get(no_ack=True)
            await adapter.purge()
        assert json.loads(incoming.body) == EXPECTED_WIRE
        assert incoming.body == json.dumps(EXPECTED_WIRE, separators=(",", ":")).encode()
        assert incoming.headers == {"replay": True}
        assert incoming.content_type == "application/json"
        assert incoming.delivery_mode == aio_pika.DeliveryMode.PERSISTENT

    async def test_bus_body_is_castore_json_and_routing_key_is_readable(self, vhost: str) -> None:
        """A raw queue bound to the bus exchange reads Castore's JSON and the routing key."""
        bus = NotificationMessageBus(message_bus_id="wire", source_event_stores=[pokemon_store()])
        adapter = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        async with (
            adapter,
            await aio_pika.connect(vhost_url(vhost)) as connection,
            connection.channel() as channel,
        ):
            raw = await channel.declare_queue(exclusive=True)
            await raw.bind(adapter.exchange_name, "#")
            await bus.publish_message(notification(0))
            async with asyncio.timeout(10), raw.iterator(no_ack=True) as deliveries:
                incoming = await anext(deliveries)
            await adapter.purge()
        assert json.loads(incoming.body) == EXPECTED_WIRE
        assert incoming.routing_key == "live.POKEMONS.POKEMON_APPEARED"
        assert incoming.headers == {"replay": False}


@pytest.mark.rabbitmq
class TestBrokerRouting:
    """The broker filters bus messages exactly, even with dots and wildcards in ids."""

    async def test_tricky_store_ids_route_exactly(self, vhost: str) -> None:
        """Each listener's queue receives exactly the messages its patterns match."""
        stores = [pokemon_store(store_id) for store_id in ("PO", "PO.KE", "*", "#")]
        bus = NotificationMessageBus(message_bus_id="tricky", source_event_stores=stores)
        adapter = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        inboxes: dict[str, tuple[FilterPattern, Inbox]] = {
            "po": ({"event_store_id": "PO"}, Inbox()),
            "star": ({"event_store_id": "*"}, Inbox()),
            "poke-caught": ({"event_store_id": "PO.KE", "event_type": "POKEMON_CAUGHT"}, Inbox()),
            "hash-replays": ({"event_store_id": "#", "on_replay": True}, Inbox()),
        }
        for listener_id, (pattern, inbox) in inboxes.items():
            adapter.on(pattern, inbox, listener_id=listener_id)
        messages = [
            notification(index, event_store_id=store.event_store_id)
            for store in stores
            for index in (0, 1)
        ]
        expected = {
            "po": [m for m in messages if m.event_store_id == "PO"],
            "star": [m for m in messages if m.event_store_id == "*"],
            "poke-caught": [messages[3]],
            "hash-replays": [m for m in messages if m.event_store_id == "#"] * 2,
        }
        async with adapter, adapter.consuming():
            await bus.publish_messages(messages)
            await bus.publish_messages(messages, replay=True)
            for listener_id, (_, inbox) in inboxes.items():
                await inbox.wait_for(len(expected[listener_id]))
        for listener_id, (_, inbox) in inboxes.items():
            assert sorted(inbox.messages, key=repr) == sorted(expected[listener_id], key=repr)
            # Everything routed to the listener was consumed: nothing else is waiting.
            depth = await message_count(vhost_url(vhost), adapter.listener_queue(listener_id))
            assert depth == 0
        assert [c.replay for c in inboxes["hash-replays"][1].contexts].count(True) == 2
        await adapter.purge()

    async def test_a_binding_left_from_an_earlier_run_delivers_nothing(self, vhost: str) -> None:
        """A listener whose patterns changed ignores what an old binding still routes to it."""
        stores = [pokemon_store("POKEMONS"), pokemon_store("OTHERS")]
        bus = NotificationMessageBus(message_bus_id="stale", source_event_stores=stores)
        before = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        before.on({"event_store_id": "OTHERS"}, Inbox(), listener_id="projection")
        async with before:  # declares the listener's queue, bound to OTHERS
            pass
        inbox = Inbox()
        after = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        after.on({"event_store_id": "POKEMONS"}, inbox, listener_id="projection")
        stale, wanted = notification(0, event_store_id="OTHERS"), notification(1)
        async with after, after.consuming():
            await bus.publish_messages([stale, wanted])
            await inbox.wait_for(1)
        assert inbox.messages == [wanted]
        assert await message_count(vhost_url(vhost), after.listener_queue("projection")) == 0
        await after.purge()

    async def test_what_an_old_binding_routes_is_skipped_without_validating_it(
        self, vhost: str
    ) -> None:
        """A message an old binding still routes, of an event type or store this service does
        not know, was dead-lettered with an ERROR log although the listener's patterns did
        not ask for it. The patterns are now checked before the body is validated."""
        bus = NotificationMessageBus(
            message_bus_id="stale-unknown", source_event_stores=[pokemon_store("POKEMONS")]
        )
        before = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        before.on({}, Inbox(), listener_id="catches")
        async with before:  # declares the listener's queue, bound to every live message
            pass
        inbox = Inbox()
        after = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        after.on(
            {"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"},
            inbox,
            listener_id="catches",
        )
        unknown = {
            "live.POKEMONS.POKEMON_EVOLVED": {
                "eventStoreId": "POKEMONS",
                "event": {"aggregateId": "eevee", "version": 2, "type": "POKEMON_EVOLVED"},
            },
            "live.TRAINERS.TRAINER_CREATED": {
                "eventStoreId": "TRAINERS",
                "event": {"aggregateId": "ash", "version": 1, "type": "TRAINER_CREATED"},
            },
        }
        with DeadLetterWatch.installed() as watch:
            async with after:
                async with (
                    await aio_pika.connect(vhost_url(vhost)) as connection,
                    connection.channel() as channel,
                ):
                    exchange = await channel.get_exchange(after.exchange_name)
                    for key, body in unknown.items():
                        await exchange.publish(aio_pika.Message(json.dumps(body).encode()), key)
                async with after.consuming():
                    await bus.publish_message(notification(1))
                    await inbox.wait_for(1)
                dead = f"{after.listener_queue('catches')}.dead"
                assert await message_count(vhost_url(vhost), dead) == 0
                assert await message_count(vhost_url(vhost), after.listener_queue("catches")) == 0
                await after.purge()
        assert inbox.messages == [notification(1)]
        assert watch.queues == []

    async def test_a_body_the_patterns_ask_for_that_does_not_validate_is_dead_lettered(
        self, vhost: str
    ) -> None:
        """A bus listener keeps a body its patterns ask for that does not validate as a dead
        letter at once (no retries), and goes on with the next message."""
        bus = NotificationMessageBus(
            message_bus_id="invalid-wanted", source_event_stores=[pokemon_store()]
        )
        inbox = Inbox()
        adapter = RabbitMQMessageBusAdapter.attach_to(
            bus, vhost_url(vhost), retry_attempts=3, retry_delay_in_ms=10
        )
        adapter.on({"event_store_id": "POKEMONS"}, inbox, listener_id="pokemons")
        evolved = {
            "eventStoreId": "POKEMONS",
            "event": {"aggregateId": "eevee", "version": 2, "type": "POKEMON_EVOLVED"},
        }
        with DeadLetterWatch.installed() as watch:
            async with adapter, adapter.consuming():
                await _publish_raw(
                    vhost, adapter.exchange_name, {"live.POKEMONS.POKEMON_EVOLVED": evolved}
                )
                await bus.publish_message(notification(0))
                await inbox.wait_for(1)
                async with asyncio.timeout(20):
                    await watch.wait_for(1)
                async with (
                    await aio_pika.connect(vhost_url(vhost)) as connection,
                    connection.channel() as channel,
                ):
                    dead = await channel.declare_queue(
                        f"{adapter.listener_queue('pokemons')}.dead", passive=True
                    )
                    letter = await dead.get(no_ack=True)
                await adapter.purge()
        assert inbox.messages == [notification(0)]
        assert json.loads(letter.body) == evolved
        assert letter.headers["x-attempts"] == 1
        assert "UnknownEventTypeError" in str(letter.headers["x-error"])

    async def test_an_event_without_a_type_goes_where_its_validated_type_does(
        self, vhost: str
    ) -> None:
        """An event without a type, of a store with one event class, reaches the listener
        asking for that class's type (its routing key says nothing of the type)."""
        bus = NotificationMessageBus(
            message_bus_id="typeless", source_event_stores=[pokemon_store(), fleeing_store()]
        )
        inbox = Inbox()
        adapter = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        adapter.on({"event_store_id": "FLEES", "event_type": "POKEMON_FLED"}, inbox)
        typeless = {"eventStoreId": "FLEES", "event": {"aggregateId": "abra", "version": 2}}
        with DeadLetterWatch.installed() as watch:
            async with adapter, adapter.consuming():
                await _publish_raw(
                    vhost, adapter.exchange_name, {"live.FLEES.POKEMON_FLED": typeless}
                )
                await inbox.wait_for(1)
                await adapter.purge()
        assert [message.event for message in inbox.messages] == [
            PokemonFled(aggregate_id="abra", version=2)
        ]
        assert watch.queues == []

    async def test_an_event_without_a_type_of_a_store_no_pattern_names_is_skipped(
        self, vhost: str
    ) -> None:
        """What an old binding routed, an event without a type of a store the listener's
        patterns do not name, was dead-lettered with an ERROR log: its type was left to
        validation, which fails for a store the bus does not carry. It is now skipped."""
        bus = NotificationMessageBus(
            message_bus_id="stale-typeless", source_event_stores=[pokemon_store()]
        )
        before = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        before.on({}, Inbox(), listener_id="catches")
        async with before:  # declares the listener's queue, bound to every live message
            pass
        inbox = Inbox()
        after = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        after.on(
            {"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"},
            inbox,
            listener_id="catches",
        )
        typeless = {"eventStoreId": "TRAINERS", "event": {"aggregateId": "ash", "version": 1}}
        with DeadLetterWatch.installed() as watch:
            async with after:
                await _publish_raw(vhost, after.exchange_name, {"live.TRAINERS.x": typeless})
                async with after.consuming():
                    await bus.publish_message(notification(1))
                    await inbox.wait_for(1)
                dead = f"{after.listener_queue('catches')}.dead"
                assert await message_count(vhost_url(vhost), dead) == 0
                assert await message_count(vhost_url(vhost), after.listener_queue("catches")) == 0
                await after.purge()
        assert inbox.messages == [notification(1)]
        assert watch.queues == []


@pytest.mark.rabbitmq
class TestWorkers:
    """Consumers run concurrently up to prefetch_count and stop cleanly."""

    async def test_handlers_run_concurrently_up_to_prefetch_count(self, vhost: str) -> None:
        """With prefetch_count=3, three handlers run at once, never four."""
        queue = NotificationMessageQueue(
            message_queue_id="prefetch", source_event_stores=[pokemon_store()]
        )
        running, peak, done = 0, 0, 0
        three_running, all_done = asyncio.Event(), asyncio.Event()

        async def worker(message: Any, context: MessageContext) -> None:
            nonlocal running, peak, done
            running += 1
            peak = max(peak, running)
            if running == 3:
                three_running.set()
            await three_running.wait()
            running -= 1
            done += 1
            if done == 9:
                all_done.set()

        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=worker, prefetch_count=3
        )
        async with adapter, adapter.consuming():
            await queue.publish_messages([notification(index) for index in range(9)])
            async with asyncio.timeout(20):
                await all_done.wait()
            await adapter.purge()
        assert peak == 3

    async def test_stopping_waits_for_running_handlers(self, vhost: str) -> None:
        """stop_consuming returns only after the running handler finished and acknowledged."""
        queue = NotificationMessageQueue(
            message_queue_id="stop", source_event_stores=[pokemon_store()]
        )
        entered, release = asyncio.Event(), asyncio.Event()
        finished: list[Any] = []

        async def worker(message: Any, context: MessageContext) -> None:
            entered.set()
            await release.wait()
            finished.append(message)

        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=worker)
        async with adapter:
            await adapter.start_consuming()
            await queue.publish_message(notification(0))
            async with asyncio.timeout(20):
                await entered.wait()
            stopping = asyncio.create_task(adapter.stop_consuming())
            done, _ = await asyncio.wait({stopping}, timeout=0.3)
            assert not done  # still waiting for the handler
            release.set()
            async with asyncio.timeout(20):
                await stopping
            assert finished == [notification(0)]
            assert not adapter.is_consuming
            assert await message_count(vhost_url(vhost), adapter.queue_name) == 0
            await adapter.purge()

    async def test_grace_period_gives_unfinished_messages_back(self, vhost: str) -> None:
        """A handler still running after the grace period is cancelled; the message returns."""
        queue = NotificationMessageQueue(
            message_queue_id="grace", source_event_stores=[pokemon_store()]
        )
        entered = asyncio.Event()
        cancelled: list[bool] = []

        async def stuck(message: Any, context: MessageContext) -> None:
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=stuck)
        inbox = Inbox()
        async with adapter:
            async with adapter.consuming(grace_period=0.1):
                await queue.publish_message(notification(0))
                async with asyncio.timeout(20):
                    await entered.wait()
            assert cancelled == [True]
            adapter.worker = inbox
            async with adapter.consuming():
                await inbox.wait_for(1)
            await adapter.purge()
        assert inbox.messages == [notification(0)]
        assert inbox.contexts[0].attempt == 1  # not counted as a failed attempt

    async def test_a_plain_function_is_a_worker(self, vhost: str) -> None:
        """A worker written without async is called once; nothing is retried or dead."""
        queue = NotificationMessageQueue(
            message_queue_id="plain", source_event_stores=[pokemon_store()]
        )
        handled = asyncio.Event()
        effects: list[MessageContext] = []

        def index(message: Any, context: MessageContext) -> None:
            effects.append(context)
            handled.set()

        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=index, retry_delay_in_ms=10
        )
        async with adapter:
            try:
                async with adapter.consuming():
                    await queue.publish_message(notification(0))
                    async with asyncio.timeout(20):
                        await handled.wait()
                assert effects == [MessageContext(attempt=1, retry_attempts_left=2, replay=False)]
                assert await adapter.dead_letters() == []
                assert await message_count(vhost_url(vhost), adapter.queue_name) == 0
            finally:
                await adapter.purge()

    async def test_a_new_worker_takes_over(self, vhost: str) -> None:
        """Setting adapter.worker while consuming hands the next messages to the new worker."""
        queue = NotificationMessageQueue(
            message_queue_id="swap", source_event_stores=[pokemon_store()]
        )
        first, second = Inbox(), Inbox()
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=first)
        async with adapter, adapter.consuming():
            await queue.publish_message(notification(0))
            await first.wait_for(1)
            adapter.worker = second
            await queue.publish_message(notification(1))
            await second.wait_for(1)
            with pytest.raises(RuntimeError, match="stop consuming"):
                adapter.worker = None
            await adapter.purge()
        assert (first.messages, second.messages) == ([notification(0)], [notification(1)])

    async def test_an_invalid_body_is_dead_lettered_at_once(self, vhost: str) -> None:
        """A body that does not validate skips retries and lands in the dead-letter queue."""
        queue = NotificationMessageQueue(
            message_queue_id="invalid", source_event_stores=[pokemon_store()]
        )
        inbox = Inbox()
        adapter = RabbitMQMessageQueueAdapter.attach_to(
            queue, vhost_url(vhost), worker=inbox, retry_attempts=3, retry_delay_in_ms=10
        )
        with DeadLetterWatch.installed() as watch:
            async with adapter, adapter.consuming():
                async with (
                    await aio_pika.connect(vhost_url(vhost)) as connection,
                    connection.channel() as channel,
                ):
                    await channel.default_exchange.publish(
                        aio_pika.Message(b'{"eventStoreId": "NOPE", "event": {}}'),
                        adapter.queue_name,
                    )
                await queue.publish_message(notification(0))
                await inbox.wait_for(1)
                async with asyncio.timeout(20):
                    await watch.wait_for(1)
                assert await adapter.dead_letters() == []  # it cannot be parsed, so not listed
                async with (
                    await aio_pika.connect(vhost_url(vhost)) as connection,
                    connection.channel() as channel,
                ):
                    dead = await channel.declare_queue(f"{adapter.queue_name}.dead", passive=True)
                    letter = await dead.get(no_ack=True)
                await adapter.purge()
        assert inbox.messages == [notification(0)]
        assert letter.headers["x-attempts"] == 1
        assert "MessageChannelEventStoreNotFoundError" in str(letter.headers["x-error"])

    async def test_connected_event_store_publishes_to_bus_listeners(self, vhost: str) -> None:
        """An event pushed to a ConnectedEventStore reaches a bus listener as stored."""
        store = pokemon_store()
        bus = NotificationMessageBus(message_bus_id="connected", source_event_stores=[store])
        adapter = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
        inbox = Inbox()
        adapter.on({"event_store_id": "POKEMONS", "event_type": "POKEMON_APPEARED"}, inbox)
        connected = ConnectedEventStore(store, bus)
        async with adapter, adapter.consuming():
            pushed = await connected.push_event(notification(0).event)
            await inbox.wait_for(1)
            await adapter.purge()
        assert inbox.messages == [
            NotificationMessage(event_store_id="POKEMONS", event=pushed.event)
        ]


@pytest.mark.rabbitmq
class TestStartAndStop:
    async def test_two_starts_at_once_open_one_consumer(self, vhost: str) -> None:
        """Two start_consuming calls at once both opened consumers; the stop closed one, and
        the other kept taking messages it never handled. The second call now waits for the
        first and starts nothing more, as on the other adapters (it raised meanwhile)."""
        queue = NotificationMessageQueue(
            message_queue_id="double-start", source_event_stores=[pokemon_store()]
        )
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=Inbox())
        async with adapter:
            try:
                await asyncio.gather(adapter.start_consuming(), adapter.start_consuming())
                assert await consumer_count(vhost_url(vhost), adapter.queue_name) == 1
                await adapter.start_consuming()  # and once consuming, nothing either
                assert adapter.is_consuming
                assert await consumer_count(vhost_url(vhost), adapter.queue_name) == 1
                await adapter.aclose()
                assert await consumer_count(vhost_url(vhost), adapter.queue_name) == 0
            finally:
                await adapter.purge()

    async def test_a_start_during_a_stop_waits_for_it_then_starts(self, vhost: str) -> None:
        """A start while a stop waits for a handler raised (on Redis it waits): it now
        waits for that stop to end, then starts consumers that handle what comes next."""
        queue = NotificationMessageQueue(
            message_queue_id="start-while-stopping", source_event_stores=[pokemon_store()]
        )
        running, release = asyncio.Event(), asyncio.Event()
        inbox = Inbox()

        async def slow(message: Any, context: MessageContext) -> None:
            if not running.is_set():
                running.set()
                await release.wait()
            await inbox(message, context)

        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=slow)
        async with adapter:
            try:
                await adapter.start_consuming()
                await queue.publish_message(notification(0))
                await asyncio.wait_for(running.wait(), 20)
                stopping = asyncio.create_task(adapter.stop_consuming())
                await asyncio.sleep(0)  # one step: the stop marks the adapter stopping
                starting = asyncio.create_task(adapter.start_consuming())
                done, _ = await asyncio.wait({starting}, timeout=0.3)
                assert not done  # waiting for the stop, which waits for the handler
                release.set()
                await asyncio.wait_for(starting, 20)
                assert stopping.done()
                assert adapter.is_consuming
                assert await consumer_count(vhost_url(vhost), adapter.queue_name) == 1
                await queue.publish_message(notification(1))
                await inbox.wait_for(2)
                assert inbox.messages == [notification(0), notification(1)]
            finally:
                release.set()
                await adapter.purge()

    async def test_a_start_after_two_stops_at_once_keeps_its_consumers(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two stops at once end one stop, and a start waiting for it goes on as soon as
        one of them has: the other, still closing the old consumers, leaves the new ones
        running and counted as consuming."""
        queue = NotificationMessageQueue(
            message_queue_id="start-after-two-stops", source_event_stores=[pokemon_store()]
        )
        running, release = asyncio.Event(), asyncio.Event()
        inbox = Inbox()

        async def slow(message: Any, context: MessageContext) -> None:
            if not running.is_set():
                running.set()
                await release.wait()
            await inbox(message, context)

        closing, close_now = asyncio.Event(), asyncio.Event()
        close_quietly = rabbitmq_adapter._close_quietly

        async def held_close(connection: Any, *channels: Any) -> None:
            closing.set()
            await close_now.wait()
            await close_quietly(connection, *channels)

        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=slow)
        url = vhost_url(vhost)
        async with adapter:
            try:
                await adapter.start_consuming()
                await queue.publish_message(notification(0))
                await asyncio.wait_for(running.wait(), 20)
                monkeypatch.setattr(rabbitmq_adapter, "_close_quietly", held_close)
                stops = [asyncio.create_task(adapter.stop_consuming()) for _ in range(2)]
                await asyncio.sleep(0)  # one step: the stops mark the adapter stopping
                starting = asyncio.create_task(adapter.start_consuming())
                release.set()
                await asyncio.wait_for(closing.wait(), 20)  # one stop closes, held here
                monkeypatch.undo()
                await asyncio.wait_for(starting, 20)
                close_now.set()
                await asyncio.wait_for(asyncio.gather(*stops), 20)
                assert adapter.is_consuming
                assert await consumer_count(url, adapter.queue_name) == 1
                await queue.publish_message(notification(1))
                await inbox.wait_for(2)
                await adapter.stop_consuming()
                assert await consumer_count(url, adapter.queue_name) == 0
            finally:
                release.set()
                close_now.set()
                monkeypatch.undo()
                await adapter.purge()
        assert inbox.messages == [notification(0), notification(1)]

    async def test_a_handler_starting_its_adapter_during_a_stop_is_refused(
        self, vhost: str
    ) -> None:
        """A handler that starts its adapter while a stop waits for that handler would wait
        for the stop, which waits for the handler: the start raises instead."""
        queue = NotificationMessageQueue(
            message_queue_id="handler-starts-while-stopping",
            source_event_stores=[pokemon_store()],
        )
        running, stop_called = asyncio.Event(), asyncio.Event()
        refused: list[RuntimeError] = []

        async def restarting(message: Any, context: MessageContext) -> None:
            running.set()
            await stop_called.wait()
            try:
                async with asyncio.timeout(10):  # (wait_for would call it from another task)
                    await adapter.start_consuming()
            except RuntimeError as error:
                refused.append(error)

        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=restarting)
        async with adapter:
            try:
                await adapter.start_consuming()
                await queue.publish_message(notification(0))
                await asyncio.wait_for(running.wait(), 20)
                stopping = asyncio.create_task(adapter.stop_consuming())
                await asyncio.sleep(0)  # one step: the stop marks the adapter stopping
                stop_called.set()
                await asyncio.wait_for(stopping, 20)
                assert len(refused) == 1
                assert "is stopping" in str(refused[0])
                assert not adapter.is_consuming
                assert await message_count(vhost_url(vhost), adapter.queue_name) == 0
            finally:
                stop_called.set()
                await adapter.purge()

    async def test_a_listener_registered_during_the_start_is_refused(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """on() while a start was opening the consumers returned, and that listener was
        never consumed; it now raises, as while consuming, and works once stopped."""
        projection, late = Inbox(), Inbox()
        adapter, consume_audit = _held_start("on-while-starting", vhost, projection)
        async with adapter:
            try:
                monkeypatch.setattr(adapter, "_consume", consume_audit)
                starting = asyncio.create_task(adapter.start_consuming())
                async with asyncio.timeout(20):
                    await consume_audit.holding.wait()
                with pytest.raises(RuntimeError, match="stop consuming before registering"):
                    adapter.on({}, late, listener_id="late")
                with pytest.raises(RuntimeError, match="stop consuming before registering"):
                    adapter.on({"on_replay": True}, projection, listener_id="projection")
                consume_audit.release.set()
                await asyncio.wait_for(starting, 20)
                assert adapter.listener_ids == ("projection", "audit")
                await adapter.stop_consuming()
                adapter.on({}, late, listener_id="late")
                async with adapter.consuming():
                    assert adapter.message_channel is not None
                    await adapter.message_channel.publish_message(notification(0))
                    await late.wait_for(1)
                assert late.messages == [notification(0)]
            finally:
                consume_audit.release.set()
                monkeypatch.undo()
                await adapter.purge()

    async def test_removing_the_worker_during_the_start_is_refused(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """worker = None while a start was opening the consumer was accepted: messages then
        came to a consumer without a worker and stayed unacknowledged. It now raises."""
        queue = NotificationMessageQueue(
            message_queue_id="unset-worker-while-starting", source_event_stores=[pokemon_store()]
        )
        inbox = Inbox()
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=inbox)
        consume = _HeldConsume(adapter._consume, hold=None)
        async with adapter:
            try:
                monkeypatch.setattr(adapter, "_consume", consume)
                starting = asyncio.create_task(adapter.start_consuming())
                async with asyncio.timeout(20):
                    await consume.holding.wait()
                with pytest.raises(RuntimeError, match="stop consuming before removing"):
                    adapter.worker = None
                consume.release.set()
                await asyncio.wait_for(starting, 20)
                await queue.publish_message(notification(0))
                await inbox.wait_for(1)
                await adapter.stop_consuming()
                assert inbox.messages == [notification(0)]
                assert await message_count(vhost_url(vhost), adapter.queue_name) == 0
                adapter.worker = None  # once stopped, it may go
            finally:
                consume.release.set()
                monkeypatch.undo()
                await adapter.purge()

    async def test_a_stop_during_the_start_stops_what_it_started(self, vhost: str) -> None:
        """aclose() while start_consuming was still connecting returned at once, and the
        consumers it opened afterwards ran on. The stop now waits for the start, then stops."""
        queue = NotificationMessageQueue(
            message_queue_id="stop-while-starting", source_event_stores=[pokemon_store()]
        )
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=Inbox())
        async with adapter:
            try:
                starting = asyncio.create_task(adapter.start_consuming())
                await asyncio.sleep(0)  # the start is connecting
                await adapter.aclose()
                await starting
                assert not adapter.is_consuming
                assert await consumer_count(vhost_url(vhost), adapter.queue_name) == 0
            finally:
                await adapter.purge()

    async def test_a_stop_cancelled_during_the_start_still_stops(self, vhost: str) -> None:
        """A stop cancelled (a shutdown deadline) while it waited for a start in progress
        recorded nothing: the consumers that start opened ran on."""
        queue = NotificationMessageQueue(
            message_queue_id="cancelled-stop-while-starting",
            source_event_stores=[pokemon_store()],
        )
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=Inbox())
        async with adapter:
            try:
                starting = asyncio.create_task(adapter.start_consuming())
                await asyncio.sleep(0)  # the start is connecting
                stopping = asyncio.create_task(adapter.stop_consuming())
                await asyncio.sleep(0)  # the stop waits for the start
                assert not stopping.done()
                stopping.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await stopping
                await asyncio.wait_for(starting, 10)
                assert not adapter.is_consuming
                assert await consumer_count(vhost_url(vhost), adapter.queue_name) == 0
            finally:
                await adapter.purge()

    async def test_a_handler_stopping_its_adapter_during_the_start_is_not_cancelled(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The start consumes its queues one by one, so a handler can run before it ends. A
        stop_consuming() from that handler waited for the start, which then closed the
        channels under the handler: cancelled there, its message was delivered again. The
        call now returns at once, and the start stops its consumers once the handler is done."""
        calling_stop = asyncio.Event()
        after_stop: list[Any] = []

        async def projection(message: Any, context: MessageContext) -> None:
            calling_stop.set()
            await adapter.stop_consuming()
            after_stop.append(message)

        adapter, consume_audit = _held_start("handler-stops-while-starting", vhost, projection)
        async with adapter:
            try:
                assert adapter.message_channel is not None
                await adapter.message_channel.publish_message(notification(0))
                monkeypatch.setattr(adapter, "_consume", consume_audit)
                starting = asyncio.create_task(adapter.start_consuming())
                async with asyncio.timeout(20):
                    await calling_stop.wait()
                consume_audit.release.set()
                async with asyncio.timeout(20):
                    await starting
                assert after_stop == [notification(0)]
                assert not adapter.is_consuming
                url, queue = vhost_url(vhost), adapter.listener_queue("projection")
                assert await consumer_count(url, queue) == 0
                assert await message_count(url, queue) == 0  # acknowledged, not given back
            finally:
                consume_audit.release.set()
                monkeypatch.undo()
                await adapter.purge()

    async def test_a_handler_starting_again_after_stopping_during_the_start_is_refused(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A handler that stopped its adapter during the start, then started it again,
        waited for that start, which waited for the handler to return: neither ended. The
        start raises, as it does for a handler that stopped its adapter while consuming."""
        refused: list[RuntimeError] = []
        done = asyncio.Event()

        async def projection(message: Any, context: MessageContext) -> None:
            try:
                await adapter.stop_consuming()
                consume_audit.release.set()
                try:
                    await adapter.start_consuming()
                except RuntimeError as error:
                    refused.append(error)
            finally:
                done.set()

        adapter, consume_audit = _held_start("handler-restarts-while-starting", vhost, projection)
        async with adapter:
            try:
                assert adapter.message_channel is not None
                await adapter.message_channel.publish_message(notification(0))
                monkeypatch.setattr(adapter, "_consume", consume_audit)
                starting = asyncio.create_task(adapter.start_consuming())
                async with asyncio.timeout(20):
                    await done.wait()
                    await starting
                assert len(refused) == 1
                assert "is stopping" in str(refused[0])
                assert not adapter.is_consuming
            finally:
                consume_audit.release.set()
                monkeypatch.undo()
                await adapter.purge()

    @pytest.mark.parametrize("stop_first", [False, True])
    async def test_a_handler_starting_its_adapter_during_a_start_a_stop_overtook_is_refused(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch, stop_first: bool
    ) -> None:
        """A handler's start_consuming() during a start that a stop overtook waited for that
        start, which waited for the handler to return, and the stop for both: none ended.
        It now raises, whether the stop came before the handler's call or after it."""
        running, go, calling = asyncio.Event(), asyncio.Event(), asyncio.Event()
        refused: list[RuntimeError] = []

        async def projection(message: Any, context: MessageContext) -> None:
            running.set()
            await go.wait()
            calling.set()
            try:
                await adapter.start_consuming()
            except RuntimeError as error:
                refused.append(error)

        adapter, consume_audit = _held_start("handler-starts-overtaken", vhost, projection)
        async with adapter:
            try:
                assert adapter.message_channel is not None
                await adapter.message_channel.publish_message(notification(0))
                monkeypatch.setattr(adapter, "_consume", consume_audit)
                starting = asyncio.create_task(adapter.start_consuming())
                async with asyncio.timeout(10):
                    await running.wait()
                if not stop_first:
                    go.set()
                    await calling.wait()
                    await asyncio.sleep(0)  # the handler waits for the start
                stopping = asyncio.create_task(adapter.stop_consuming())
                await asyncio.sleep(0)  # the stop overtakes the start
                go.set()
                consume_audit.release.set()
                async with asyncio.timeout(10):
                    await asyncio.gather(starting, stopping)
                assert len(refused) == 1
                assert "is stopping" in str(refused[0])
                assert not adapter.is_consuming
            finally:
                go.set()
                consume_audit.release.set()
                monkeypatch.undo()
                await adapter.purge()

    async def test_a_stop_during_the_start_waits_for_a_handler_started_meanwhile(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A stop during the start had it close its consumers at once, cancelling a handler
        that had started already (its message delivered again), whatever the grace period.
        The start now stops them as a stop does: that handler finishes first."""
        running, release, cancelled = asyncio.Event(), asyncio.Event(), asyncio.Event()
        finished: list[Any] = []

        async def projection(message: Any, context: MessageContext) -> None:
            running.set()
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            finished.append(message)

        adapter, consume_audit = _held_start("stop-while-starting-busy", vhost, projection)
        url, queue = vhost_url(vhost), adapter.listener_queue("projection")

        async def until_not_consumed() -> None:
            while True:
                if not await consumer_count(url, queue):
                    return
                await asyncio.sleep(0.02)  # polled: the broker tells no other client

        async with adapter:
            try:
                assert adapter.message_channel is not None
                await adapter.message_channel.publish_message(notification(0))
                monkeypatch.setattr(adapter, "_consume", consume_audit)
                starting = asyncio.create_task(adapter.start_consuming())
                async with asyncio.timeout(20):
                    await running.wait()
                stopping = asyncio.create_task(adapter.stop_consuming())
                consume_audit.release.set()
                # The consumers are stopped (or closed): no message goes to them any more.
                watchers = [
                    asyncio.create_task(cancelled.wait()),
                    asyncio.create_task(until_not_consumed()),
                ]
                _, pending = await asyncio.wait(
                    watchers, timeout=20, return_when=asyncio.FIRST_COMPLETED
                )
                for watcher in pending:
                    watcher.cancel()
                assert not cancelled.is_set()
                assert not stopping.done()  # waiting for the handler
                release.set()
                async with asyncio.timeout(20):
                    await asyncio.gather(starting, stopping)
                assert finished == [notification(0)]
                assert not adapter.is_consuming
                assert await consumer_count(url, queue) == 0
                assert await message_count(url, queue) == 0  # acknowledged, not given back
            finally:
                release.set()
                consume_audit.release.set()
                monkeypatch.undo()
                await adapter.purge()

    async def test_a_stop_during_the_start_keeps_to_its_grace_period(
        self, vhost: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The start that stops its consumers for a stop waits for the handlers no longer
        than that stop's grace period: then the handler is cancelled, its message kept."""
        running, cancelled = asyncio.Event(), asyncio.Event()

        async def projection(message: Any, context: MessageContext) -> None:
            running.set()
            try:
                await asyncio.Event().wait()  # never returns by itself
            except asyncio.CancelledError:
                cancelled.set()
                raise

        adapter, consume_audit = _held_start("stop-while-starting-grace", vhost, projection)
        async with adapter:
            try:
                assert adapter.message_channel is not None
                await adapter.message_channel.publish_message(notification(0))
                monkeypatch.setattr(adapter, "_consume", consume_audit)
                starting = asyncio.create_task(adapter.start_consuming())
                async with asyncio.timeout(20):
                    await running.wait()
                stopping = asyncio.create_task(adapter.stop_consuming(grace_period=0.1))
                consume_audit.release.set()
                async with asyncio.timeout(20):
                    await asyncio.gather(starting, stopping)
                assert cancelled.is_set()
                url, queue = vhost_url(vhost), adapter.listener_queue("projection")
                assert await message_count(url, queue) == 1  # delivered again
            finally:
                consume_audit.release.set()
                monkeypatch.undo()
                await adapter.purge()


class _HeldConsume:
    """Stands for an adapter's ``_consume``: holds one listener's until released.

    ``hold`` names that listener (``None``: a queue's worker).
    """

    def __init__(self, consume: Any, *, hold: str | None = "audit") -> None:
        self._consume = consume
        self._hold = hold
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, channel: Any, subscription: Any) -> str:
        if subscription.listener_id == self._hold:
            self.holding.set()
            await self.release.wait()
        result: str = await self._consume(channel, subscription)
        return result


def _held_start(
    bus_id: str, vhost: str, projection: Any
) -> tuple[RabbitMQMessageBusAdapter, _HeldConsume]:
    """A bus adapter whose start consumes "projection", then holds before "audit"."""
    bus = NotificationMessageBus(message_bus_id=bus_id, source_event_stores=[pokemon_store()])
    adapter = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
    adapter.on({}, projection, listener_id="projection")  # consumed first
    adapter.on({}, Inbox(), listener_id="audit")
    return adapter, _HeldConsume(adapter._consume)


@pytest.mark.rabbitmq
class TestTeardown:
    def test_purging_a_closed_adapter_leaves_no_connection_open(self, vhost: str) -> None:
        """``purge()`` after ``aclose()`` (as in a teardown) closes what it had to open.

        A connection left open keeps its reader task running until the event loop ends,
        and its close callbacks then outlive the loop.
        """
        queue = NotificationMessageQueue(
            message_queue_id="teardown", source_event_stores=[pokemon_store()]
        )
        adapter = RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost))

        async def scenario() -> list[str]:
            async with adapter:
                await queue.publish_messages([notification(0)])
            await adapter.purge()
            await asyncio.sleep(0.1)  # closing callbacks run
            current = asyncio.current_task()
            return [repr(task) for task in asyncio.all_tasks() if task is not current]

        assert asyncio.run(scenario()) == []


class _HoldingInbox(Inbox):
    """An inbox whose handler, while ``holding`` is true, keeps the message, then waits
    until cancelled."""

    holding = False

    async def __call__(self, message: Any, context: MessageContext) -> None:
        await super().__call__(message, context)
        if self.holding:
            await asyncio.get_running_loop().create_future()


def _adapter_of(kind: str, channel_id: str, vhost: str, inbox: Inbox) -> Any:
    """A queue or bus adapter delivering to ``inbox``, attached outside any event loop."""
    store = pokemon_store()
    if kind == "queue":
        queue = NotificationMessageQueue(message_queue_id=channel_id, source_event_stores=[store])
        return RabbitMQMessageQueueAdapter.attach_to(queue, vhost_url(vhost), worker=inbox)
    bus = NotificationMessageBus(message_bus_id=channel_id, source_event_stores=[store])
    adapter = RabbitMQMessageBusAdapter.attach_to(bus, vhost_url(vhost))
    adapter.on({}, inbox, listener_id="inbox")
    return adapter


@pytest.mark.rabbitmq
@pytest.mark.parametrize("kind", ["queue", "bus"])
class TestEventLoops:
    """An adapter made at import time serves one event loop after another."""

    def test_publishing_in_the_next_event_loop_connects_anew(self, vhost: str, kind: str) -> None:
        """Connected in one asyncio.run, the adapter publishes and consumes in the next."""
        inbox = Inbox()
        adapter = _adapter_of(kind, f"loops-publish-{kind}", vhost, inbox)

        async def first() -> None:
            async with within("publishing in the first event loop"):
                await adapter.publish_message(notification(0))

        async def second() -> None:
            try:
                async with within("publishing in the second event loop"):
                    await adapter.publish_message(notification(1))
                async with adapter.consuming():
                    await inbox.wait_for(2)
            finally:
                async with within("purging in the second event loop"):
                    await adapter.purge()
                    await adapter.aclose()

        asyncio.run(first())
        gc.collect()  # what the ended loop left pending goes now, failing nothing
        asyncio.run(second())
        assert inbox.messages == [notification(0), notification(1)]

    def test_every_call_works_in_the_next_event_loop_after_consuming(
        self, vhost: str, kind: str
    ) -> None:
        """Left consuming when its asyncio.run ended, the adapter has stopped; in the next
        loop every call works, and consuming starts again."""
        inbox = Inbox()
        adapter = _adapter_of(kind, f"loops-calls-{kind}", vhost, inbox)

        async def first() -> None:
            async with within("consuming in the first event loop"):
                await adapter.start_consuming()
                await adapter.publish_message(notification(0))
                await inbox.wait_for(1)

        async def second() -> None:
            steps: list[tuple[str, Callable[[], Coroutine[Any, Any, Any]]]] = [
                ("connect()", adapter.connect),
                ("dead_letters()", adapter.dead_letters),
                ("republish_dead_letters()", adapter.republish_dead_letters),
                ("stop_consuming()", adapter.stop_consuming),
                ("start_consuming()", adapter.start_consuming),
                ("publish_messages()", lambda: adapter.publish_messages([notification(1)])),
                ("handling the message", lambda: inbox.wait_for(2)),
                ("stop_consuming()", adapter.stop_consuming),
                ("purge()", adapter.purge),
                ("aclose()", adapter.aclose),
            ]
            results = []
            try:
                for name, step in steps:
                    async with within(f"{name} in the second event loop"):
                        results.append(await step())
            finally:
                await adapter.purge()
                await adapter.aclose()
            assert results[1:3] == [[], 0]

        asyncio.run(first())
        assert not adapter.is_consuming  # its consumers ended with the loop
        asyncio.run(second())
        assert inbox.messages == [notification(0), notification(1)]

    def test_a_closed_adapter_waits_in_the_next_event_loop_as_in_the_first(
        self, vhost: str, kind: str
    ) -> None:
        """Its lock and events waited on in one asyncio.run, then closed, the adapter waits
        on them again in the next: two publishes connecting at once, a stop that waits for a
        running handler."""
        inbox = _HoldingInbox()
        adapter = _adapter_of(kind, f"loops-waits-{kind}", vhost, inbox)

        async def publish_then_stop_a_running_handler(first: int) -> None:
            inbox.holding = True
            handled = len(inbox.messages)
            try:
                async with within("two publishes connecting at once"):
                    await asyncio.gather(
                        adapter.publish_message(notification(first)),
                        adapter.publish_message(notification(first + 1)),
                    )
                async with within("a handler starting"):
                    await adapter.start_consuming()
                    await inbox.wait_for(handled + 1)
                async with within("a stop that waits for the handler"):
                    await adapter.stop_consuming(grace_period=0.05)  # gives its message back
            finally:
                inbox.holding = False
                await adapter.stop_consuming(grace_period=0.05)
                await adapter.aclose()

        async def consume_what_was_given_back() -> None:
            given_back = {event_key(notification(index)) for index in range(4)}
            before = len(inbox.messages)
            try:
                async with within("handling every message"), adapter.consuming():
                    while {event_key(m) for m in inbox.messages[before:]} != given_back:
                        await inbox.wait_for(len(inbox.messages) + 1)
            finally:
                await adapter.purge()
                await adapter.aclose()

        asyncio.run(publish_then_stop_a_running_handler(0))
        asyncio.run(publish_then_stop_a_running_handler(2))
        asyncio.run(consume_what_was_given_back())

    def test_a_loop_running_in_another_thread_keeps_the_adapter(
        self, vhost: str, kind: str
    ) -> None:
        """While the loop the adapter consumes on runs in another thread, every call from
        another loop raises RuntimeError naming the adapter; once that loop has closed, the
        adapter moves."""
        adapter = _adapter_of(kind, f"loops-thread-{kind}", vhost, Inbox())
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(adapter.start_consuming(), loop).result(timeout=20)
            calls: list[Callable[[], Coroutine[Any, Any, Any]]] = [
                adapter.connect,
                lambda: adapter.publish_message(notification(0)),
                lambda: adapter.publish_messages([notification(0)]),
                adapter.start_consuming,
                adapter.stop_consuming,
                adapter.dead_letters,
                adapter.republish_dead_letters,
                adapter.purge,
                adapter.aclose,
            ]

            async def from_here() -> list[str]:
                errors = []
                for call in calls:
                    async with within("a call from another event loop"):
                        with pytest.raises(RuntimeError) as raised:
                            await call()
                    errors.append(str(raised.value))
                return errors

            for error in asyncio.run(from_here()):
                assert error.startswith(repr(adapter))
                assert "another event loop, which is still open" in error
            assert adapter.is_consuming  # still, on its own loop
            for ending in (adapter.aclose(), loop.shutdown_asyncgens()):
                asyncio.run_coroutine_threadsafe(ending, loop).result(timeout=20)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=20)
            assert not thread.is_alive()
            loop.close()

        async def once_that_loop_closed() -> None:
            async with within("publishing once the other loop closed"):
                await adapter.publish_message(notification(0))
                await adapter.purge()
                await adapter.aclose()

        asyncio.run(once_that_loop_closed())

    def test_a_stopped_loop_keeps_the_adapter_until_it_closes(self, vhost: str, kind: str) -> None:
        """Consuming on a loop that stopped but is not closed (it may run again), the
        adapter refuses calls from another loop; once that loop has closed, it moves."""
        inbox = Inbox()
        adapter = _adapter_of(kind, f"loops-stopped-{kind}", vhost, inbox)
        loop = asyncio.new_event_loop()
        try:

            async def consume_there() -> None:
                async with within("consuming on the first loop"):
                    await adapter.start_consuming()
                    await adapter.publish_message(notification(0))
                    await inbox.wait_for(1)

            loop.run_until_complete(consume_there())

            async def publish_here() -> None:
                async with within("publishing from another loop"):
                    await adapter.publish_message(notification(1))

            with pytest.raises(RuntimeError, match="which is still open") as raised:
                asyncio.run(publish_here())
            assert str(raised.value).startswith(repr(adapter))
            assert adapter.is_consuming  # on the first loop, untouched
            loop.run_until_complete(adapter.aclose())
        finally:
            loop.close()

        async def publish_and_consume_here() -> None:
            try:
                async with within("publishing and consuming once that loop closed"):
                    await adapter.publish_message(notification(1))
                    async with adapter.consuming():
                        await inbox.wait_for(2)
            finally:
                await adapter.purge()
                await adapter.aclose()

        asyncio.run(publish_and_consume_here())
        assert inbox.messages == [notification(0), notification(1)]


#: Runs in a subprocess: an event loop closed with tasks still pending leaves noise on
#: stderr (its tasks are destroyed pending) that must not reach the other tests.
_CLOSED_WITH_TASKS_PENDING = """
import asyncio, gc, sys
from tests.messaging.test_rabbitmq import _HoldingInbox, _adapter_of
from tests.messaging.rabbitmq_support import notification

inbox = _HoldingInbox()
adapter = _adapter_of(sys.argv[1], "loops-closed-" + sys.argv[1], sys.argv[2], inbox)

async def first():
    inbox.holding = True
    await asyncio.wait_for(adapter.start_consuming(), 20)
    await asyncio.wait_for(adapter.publish_message(notification(0)), 20)
    await inbox.wait_for(1)

loop = asyncio.new_event_loop()
loop.run_until_complete(first())
loop.close()  # the handler, the supervisor, the connections' tasks are still pending
assert not adapter.is_consuming
# Nothing consumes any more: the worker and the listeners may change again.
if sys.argv[1] == "queue":
    adapter.worker = None
    adapter.worker = inbox
else:
    adapter.on({}, inbox, listener_id="inbox")
inbox.holding = False

async def second():
    # Deleting the queue takes it from the consumer left open by the closed loop.
    await asyncio.wait_for(adapter.purge(), 20)
    gc.collect()  # the closed loop's handler ends now, in this loop's time
    await asyncio.wait_for(adapter.start_consuming(), 20)
    await asyncio.wait_for(adapter.publish_message(notification(1)), 20)
    await inbox.wait_for(2)
    await asyncio.wait_for(adapter.stop_consuming(), 20)  # waits for no handler
    await asyncio.wait_for(adapter.purge(), 20)
    await asyncio.wait_for(adapter.aclose(), 20)

asyncio.run(second())
print("carried on")
"""


@pytest.mark.rabbitmq
@pytest.mark.parametrize("kind", ["queue", "bus"])
def test_a_loop_closed_with_tasks_pending_is_left_behind(vhost: str, kind: str) -> None:
    """A loop closed without ending its tasks (no asyncio.run), a handler still running, is
    left behind too: the next loop's calls neither hang nor fail, consuming starts again,
    and a stop there waits for its own handlers only."""
    result = subprocess.run(
        [sys.executable, "-c", _CLOSED_WITH_TASKS_PENDING, kind, vhost],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert result.stdout.strip() == "carried on", result.stderr[-3000:]
