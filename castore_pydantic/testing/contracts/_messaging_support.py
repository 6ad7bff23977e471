"""The domain and helpers the messaging contract suites publish and record with."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from castore_pydantic._aggregate import Aggregate
from castore_pydantic._event import Event
from castore_pydantic._event_store import EventStore
from castore_pydantic.messaging import DeadLetter, Message, MessageContext, NotificationMessage
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter

__all__ = [
    "T0",
    "Appearance",
    "Call",
    "Pokemon",
    "PokemonAppeared",
    "PokemonCaught",
    "Recorder",
    "Trainer",
    "TrainerCreated",
    "appeared",
    "caught",
    "notify",
    "pokemon_store",
    "trainer_created",
    "trainer_store",
    "unannotated_pokemon_store",
    "wait_for_dead_letters",
]


class Appearance(BaseModel):
    """Payload of ``POKEMON_APPEARED``."""

    name: str
    level: int = Field(ge=1, le=100)


class PokemonAppeared(Event):
    """A wild Pokémon appeared."""

    type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARED"
    payload: Appearance


class PokemonCaught(Event):
    """A Pokémon was caught."""

    type: Literal["POKEMON_CAUGHT"] = "POKEMON_CAUGHT"
    metadata: dict[str, Any] | None = None


class TrainerCreated(Event):
    """A trainer joined."""

    type: Literal["TRAINER_CREATED"] = "TRAINER_CREATED"
    payload: dict[str, str]


class Pokemon(Aggregate):
    """A Pokémon folded from its events."""

    name: str
    level: int
    status: Literal["wild", "caught"]


class Trainer(Aggregate):
    """A trainer folded from its events."""

    name: str


def reduce_pokemon(pokemon: Pokemon | None, event: PokemonAppeared | PokemonCaught) -> Pokemon:
    """Fold one Pokémon event."""
    if isinstance(event, PokemonAppeared):
        return Pokemon(
            aggregate_id=event.aggregate_id,
            version=event.version,
            name=event.payload.name,
            level=event.payload.level,
            status="wild",
        )
    assert pokemon is not None
    return pokemon.model_copy(update={"version": event.version, "status": "caught"})


def reduce_trainer(trainer: Trainer | None, event: TrainerCreated) -> Trainer:
    """Fold one trainer event."""
    return Trainer(
        aggregate_id=event.aggregate_id, version=event.version, name=event.payload["name"]
    )


T0 = datetime(2024, 1, 1, tzinfo=UTC)


def pokemon_store() -> EventStore[Pokemon, PokemonAppeared | PokemonCaught]:
    return EventStore(
        event_store_id="POKEMONS",
        event_types=[PokemonAppeared, PokemonCaught],
        reducer=reduce_pokemon,
        event_storage_adapter=InMemoryEventStorageAdapter(),
    )


def unannotated_pokemon_store() -> EventStore[Any, Any]:
    """The Pokémon store with a reducer that has no return annotation.

    A channel cannot tell which class its aggregates are, so a state-carrying message's
    aggregate is read back from JSON as a mapping.
    """
    return EventStore(
        event_store_id="POKEMONS",
        event_types=[PokemonAppeared, PokemonCaught],
        # The lambda is the point: it carries no annotations.
        reducer=lambda pokemon, event: reduce_pokemon(pokemon, event),  # noqa: PLW0108
        event_storage_adapter=InMemoryEventStorageAdapter(),
    )


def trainer_store() -> EventStore[Trainer, TrainerCreated]:
    return EventStore(
        event_store_id="TRAINERS",
        event_types=[TrainerCreated],
        reducer=reduce_trainer,
        event_storage_adapter=InMemoryEventStorageAdapter(),
    )


def appeared(aggregate_id: str, *, name: str = "Pikachu", level: int = 5) -> PokemonAppeared:
    """A version-1 ``POKEMON_APPEARED`` event."""
    return PokemonAppeared(
        aggregate_id=aggregate_id,
        version=1,
        timestamp=T0,
        payload=Appearance(name=name, level=level),
    )


def caught(aggregate_id: str, version: int = 2) -> PokemonCaught:
    """A ``POKEMON_CAUGHT`` event with metadata."""
    return PokemonCaught(
        aggregate_id=aggregate_id,
        version=version,
        timestamp=T0 + timedelta(minutes=version, milliseconds=123),
        metadata={"ball": "poké", "nested": {"list": [1, 2.5, None, "é"]}},
    )


def trainer_created(aggregate_id: str) -> TrainerCreated:
    """A ``TRAINER_CREATED`` event."""
    return TrainerCreated(
        aggregate_id=aggregate_id, version=1, timestamp=T0, payload={"name": "Ash"}
    )


def notify(event: Event) -> NotificationMessage:
    """The notification message of an event of the suite's stores."""
    store_id = "TRAINERS" if isinstance(event, TrainerCreated) else "POKEMONS"
    return NotificationMessage(event_store_id=store_id, event=event)


@dataclass(frozen=True)
class Call:
    """One call of a recording handler."""

    message: Any
    context: MessageContext
    at: float


class Recorder:
    """A handler that records its calls, can fail on purpose, and can be awaited.

    Args:
        fail: ``fail(message, context)`` tells whether this call raises ``RuntimeError``.
        timeout: How long ``wait_for`` waits before failing the test.
    """

    def __init__(
        self,
        fail: Callable[[Any, MessageContext], bool] | None = None,
        *,
        timeout: float,
    ) -> None:
        self.calls: list[Call] = []
        self._fail = fail
        self._timeout = timeout
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    async def __call__(self, message: Any, context: MessageContext) -> None:
        """Record the call, wake waiters, and raise if asked to."""
        self.calls.append(Call(message, context, asyncio.get_running_loop().time()))
        for condition, waiter in list(self._waiters):
            if not waiter.done() and condition():
                waiter.set_result(None)
        if self._fail is not None and self._fail(message, context):
            raise RuntimeError(f"contract failure on attempt {context.attempt}")

    @property
    def messages(self) -> list[Any]:
        """The messages received, in call order."""
        return [call.message for call in self.calls]

    def calls_for(self, message: Message) -> list[Call]:
        """The calls that received ``message``."""
        return [call for call in self.calls if call.message == message]

    async def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait until ``condition()`` holds after some call (or already holds)."""
        if condition():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append((condition, waiter))
        try:
            await asyncio.wait_for(waiter, self._timeout)
        except TimeoutError:
            pytest.fail(f"timed out after {self._timeout}s waiting for {what}; got {self.calls}")
        finally:
            self._waiters.remove((condition, waiter))

    async def wait_for(self, message: Message, count: int = 1) -> list[Call]:
        """Wait until ``message`` was received ``count`` times; return its calls."""
        await self.wait_until(
            lambda: len(self.calls_for(message)) >= count, f"{count} call(s) with {message!r}"
        )
        return self.calls_for(message)


async def wait_for_dead_letters(adapter: Any, count: int, within: float) -> list[DeadLetter]:
    """Poll ``adapter.dead_letters()`` until it holds ``count`` letters (a broker has no event)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        letters: list[DeadLetter] = await adapter.dead_letters()
        if len(letters) >= count or loop.time() > deadline:
            assert len(letters) == count, f"expected {count} dead letter(s), got {letters}"
            return letters
        await asyncio.sleep(0.02)
