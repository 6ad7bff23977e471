"""RabbitMQ queue and bus adapters: the public contracts, topology, wire format, lifecycle.

Broker tests share one private vhost per module; each test uses its own channel id and purges
what it declared.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from castore_pydantic.messaging import (
    AggregateExistsMessage,
    MessageChannel,
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
    NotificationMessageQueue,
    RetryPolicy,
)
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
from tests.messaging.rabbitmq_support import (
    T0,
    Appeared,
    PokemonAppeared,
    PokemonCaught,
    pokemon_store,
    private_vhost,
    vhost_url,
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
