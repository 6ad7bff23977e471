from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from castore_pydantic.messaging import (
    DeadLetter,
    Message,
    MessageChannel,
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
)
from castore_pydantic.messaging.memory import InMemoryMessageBusAdapter
from castore_pydantic.testing.contracts import MessageAdapterFactory, MessageBusAdapterContract
from tests.domain import Appeared, PokemonAppeared, PokemonCaught, make_store

T0 = datetime(2024, 1, 1, tzinfo=UTC)


class TestInMemoryBusContract(MessageBusAdapterContract):
    """The in-memory bus adapter honours the public message bus contract."""

    @pytest.fixture
    async def bus_adapter_factory(self) -> AsyncIterator[MessageAdapterFactory]:
        adapters: list[InMemoryMessageBusAdapter] = []

        async def make(
            channel: MessageChannel[Any],
            *,
            retry_attempts: int,
            retry_delay_in_ms: float,
            retry_backoff_rate: float,
        ) -> InMemoryMessageBusAdapter:
            adapter = InMemoryMessageBusAdapter.attach_to(
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


def notification(
    event_type: str = "POKEMON_CAUGHT", aggregate_id: str = "pikachu"
) -> NotificationMessage:
    event = (
        PokemonCaught(aggregate_id=aggregate_id, version=2, timestamp=T0)
        if event_type == "POKEMON_CAUGHT"
        else PokemonAppeared(
            aggregate_id=aggregate_id,
            version=1,
            timestamp=T0,
            payload=Appeared(name="Pikachu", level=3),
        )
    )
    return NotificationMessage(event_store_id="POKEMONS", event=event)


def make_bus() -> NotificationMessageBus:
    return NotificationMessageBus(message_bus_id="pokemons", source_event_stores=[make_store()])


class Listener:
    """Records calls; fails while ``failures`` remain."""

    def __init__(self, failures: int = 0) -> None:
        self.calls: list[tuple[Message, MessageContext, float]] = []
        self.failures = failures
        self.called = asyncio.Event()

    async def __call__(self, message: Message, context: MessageContext) -> None:
        self.calls.append((message, context, asyncio.get_running_loop().time()))
        self.called.set()
        if self.failures > 0:
            self.failures -= 1
            raise ValueError(f"listener failed on attempt {context.attempt}")

    @property
    def messages(self) -> list[Message]:
        return [message for message, _, _ in self.calls]


class TestInMemoryBus:
    async def test_without_listeners_publishing_does_nothing(self) -> None:
        """B104: publishing to a bus without listeners resolves and leaves nothing pending."""
        bus = make_bus()
        adapter = InMemoryMessageBusAdapter.attach_to(bus)
        await bus.publish_message(notification())
        await asyncio.wait_for(adapter.join(), 1)
        assert await adapter.dead_letters() == []
        assert adapter.delivery_guarantee == "at-most-once"

    async def test_a_plain_function_is_a_listener(self) -> None:
        """A listener written without async (as Castore allows) had its None awaited: every
        attempt failed after doing the work, which ran three times and was dead-lettered."""
        bus = make_bus()
        adapter = InMemoryMessageBusAdapter.attach_to(bus, retry_delay_in_ms=1)
        effects: list[str] = []

        def project(message: NotificationMessage, context: MessageContext) -> None:
            effects.append(message.event.aggregate_id)

        adapter.on({"event_store_id": "POKEMONS"}, project)
        await bus.publish_message(notification())
        await adapter.join()
        assert effects == ["pikachu"]
        assert await adapter.dead_letters() == []

    async def test_store_and_type_pattern(self) -> None:
        """B104: {event_store_id, event_type} receives only that store's events of that type."""
        bus = make_bus()
        adapter = InMemoryMessageBusAdapter.attach_to(bus)
        listener = Listener()
        adapter.on({"event_store_id": "POKEMONS", "event_type": "POKEMON_APPEARED"}, listener)
        appeared, caught = notification("POKEMON_APPEARED"), notification("POKEMON_CAUGHT")
        await bus.publish_messages([appeared, caught])
        await adapter.join()
        assert listener.messages == [appeared]

    async def test_same_handler_twice_widens_its_filter(self) -> None:
        """B105: the same handler (no listener id) with two patterns runs once per message."""
        bus = make_bus()
        adapter = InMemoryMessageBusAdapter.attach_to(bus)
        listener = Listener()
        adapter.on({"event_store_id": "POKEMONS", "event_type": "POKEMON_APPEARED"}, listener)
        adapter.on({"event_store_id": "POKEMONS", "event_type": "POKEMON_CAUGHT"}, listener)
        adapter.on({"event_store_id": "POKEMONS"}, listener)
        messages = [notification("POKEMON_APPEARED"), notification("POKEMON_CAUGHT")]
        await bus.publish_messages(messages)
        await adapter.join()
        assert listener.messages == messages

    async def test_replay_context(self) -> None:
        """B106: {} ignores replays; an on_replay listener gets them with replay=True."""
        bus = make_bus()
        adapter = InMemoryMessageBusAdapter.attach_to(bus)
        live, replaying = Listener(), Listener()
        adapter.on({}, live, listener_id="live")
        adapter.on({"on_replay": True}, replaying, listener_id="replaying")
        message = notification()
        await bus.publish_message(message, replay=True)
        assert len(replaying.calls) == 1  # listeners have started when publishing returns
        await adapter.join()
        assert live.calls == []
        assert [context for _, context, _ in replaying.calls] == [MessageContext(1, 2, True)]

    async def test_failing_listener_retried_alone_with_backoff(self) -> None:
        """B107: only the failing listener re-runs, 4 times, 50/75/112.5 ms apart."""
        bus = make_bus()
        adapter = InMemoryMessageBusAdapter.attach_to(
            bus, retry_attempts=3, retry_delay_in_ms=50, retry_backoff_rate=1.5
        )
        healthy, failing = Listener(), Listener(failures=10)
        adapter.on({}, healthy, listener_id="healthy")
        adapter.on({}, failing, listener_id="failing")
        await bus.publish_message(notification())
        await adapter.join()
        assert len(healthy.calls) == 1
        assert len(failing.calls) == 4
        times = [at for _, _, at in failing.calls]
        for gap, due in zip(
            [b - a for a, b in itertools.pairwise(times)], [0.050, 0.075, 0.1125], strict=True
        ):
            assert due * 0.95 <= gap <= due + 0.5

    async def test_retried_replay_keeps_replay_true(self) -> None:
        """DESIGN §6.8 (B108 differs): a retried replay is still a replay."""
        bus = make_bus()
        adapter = InMemoryMessageBusAdapter.attach_to(bus, retry_attempts=1, retry_delay_in_ms=1)
        listener = Listener(failures=1)
        adapter.on({"on_replay": True}, listener)
        await bus.publish_message(notification(), replay=True)
        await adapter.join()
        assert [context.replay for _, context, _ in listener.calls] == [True, True]

    async def test_listeners_run_concurrently(self) -> None:
        """A slow listener does not hold back another: each delivery is its own task."""
        bus = make_bus()
        adapter = InMemoryMessageBusAdapter.attach_to(bus)
        released = asyncio.Event()

        async def waiting(_message: Message, _context: MessageContext) -> None:
            await released.wait()

        async def releasing(_message: Message, _context: MessageContext) -> None:
            released.set()

        adapter.on({}, waiting)
        adapter.on({}, releasing)
        await bus.publish_message(notification())
        await asyncio.wait_for(adapter.join(), 5)
        assert released.is_set()

    async def test_late_listener_misses_earlier_messages(self) -> None:
        """Listeners only receive messages published after they registered."""
        bus = make_bus()
        adapter = InMemoryMessageBusAdapter.attach_to(bus)
        early = notification("POKEMON_APPEARED")
        await bus.publish_message(early)
        listener = Listener()
        adapter.on({}, listener)
        late = notification()
        await bus.publish_message(late)
        await adapter.join()
        assert listener.messages == [late]

    async def test_exhausted_failure_is_logged_with_the_listener(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A listener failing every attempt is logged with listener, message and error."""
        bus = make_bus()
        adapter = InMemoryMessageBusAdapter.attach_to(bus, retry_attempts=0)
        adapter.on({}, Listener(failures=1), listener_id="projector")
        message = notification()
        with caplog.at_level(logging.ERROR, logger="castore_pydantic.messaging"):
            await bus.publish_message(message)
            await adapter.join()
        (record,) = caplog.records
        text = record.getMessage()
        assert "in listener projector" in text
        assert "ValueError: listener failed on attempt 1" in text
        assert message.model_dump_json() in text
        assert await adapter.dead_letters() == [
            DeadLetter(message, "ValueError: listener failed on attempt 1", 1, False, "projector")
        ]

    def test_a_listener_id_names_one_handler(self) -> None:
        """Reusing a listener id for another handler is refused."""
        adapter = InMemoryMessageBusAdapter.attach_to(make_bus())
        adapter.on({}, Listener(), listener_id="projector")
        with pytest.raises(ValueError, match="already used by another handler"):
            adapter.on({}, Listener(), listener_id="projector")

    def test_two_handlers_with_one_default_id_are_refused(self) -> None:
        """Two handlers made by one factory share a qualified name, their default id: the
        second is refused, as on the brokers (their dead letters and republishing would
        mix them up)."""

        def make_listener() -> Any:
            async def listener(message: Any, context: Any) -> None:
                return None

            return listener

        adapter = InMemoryMessageBusAdapter.attach_to(make_bus())
        first = make_listener()
        adapter.on({}, first)
        adapter.on({"event_type": "POKEMON_APPEARED"}, first)  # the same handler: more patterns
        with pytest.raises(ValueError, match="pass a distinct listener_id="):
            adapter.on({}, make_listener())
        adapter.on({}, make_listener(), listener_id="emails")

    @pytest.mark.parametrize(
        ("pattern", "error"),
        [({"eventType": "X"}, ValueError), ({"on_replay": 1}, TypeError)],
    )
    def test_bad_patterns_are_refused(
        self, pattern: dict[str, Any], error: type[Exception]
    ) -> None:
        """A misspelt key or a wrong value type in a pattern is an error, not a catch-all."""
        adapter = InMemoryMessageBusAdapter.attach_to(make_bus())
        with pytest.raises(error):
            adapter.on(pattern, Listener())

    @pytest.mark.parametrize("options", [{"retry_attempts": -1}, {"retry_backoff_rate": "x"}])
    def test_invalid_retry_options_are_refused(self, options: dict[str, Any]) -> None:
        """B103: the bus validates its retry options like the queue."""
        with pytest.raises(ValueError, match="Invalid retry_"):
            InMemoryMessageBusAdapter(**options)

    async def test_aclose_cancels_retries(self) -> None:
        """Closing the bus drops pending retries; repr names the bus."""
        bus = make_bus()
        listener = Listener(failures=1)
        async with InMemoryMessageBusAdapter.attach_to(bus, retry_delay_in_ms=60_000) as adapter:
            adapter.on({}, listener)
            await bus.publish_message(notification())
            assert "pokemons" in repr(adapter)
            async with adapter.consuming():
                pass
            await listener.called.wait()
        await asyncio.wait_for(adapter.join(), 1)
        assert len(listener.calls) == 1


async def test_closing_stops_consuming() -> None:
    """``aclose`` leaves the adapter not consuming, as the brokers' adapters do."""
    bus = NotificationMessageBus(message_bus_id="closing", source_event_stores=[])
    adapter = InMemoryMessageBusAdapter.attach_to(bus)
    await adapter.start_consuming()
    assert adapter.is_consuming
    await adapter.aclose()
    assert not adapter.is_consuming
