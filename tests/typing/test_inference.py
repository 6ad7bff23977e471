"""Static checks (run by mypy in CI): EventStore infers its types from the reducer."""

from __future__ import annotations

from typing import assert_type

from castore_pydantic import Command, EventStore
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from tests.domain import (
    Pokemon,
    PokemonAppeared,
    PokemonCaught,
    PokemonLeveledUp,
    reduce_pokemon,
)

PokemonEvent = PokemonAppeared | PokemonCaught | PokemonLeveledUp

store = EventStore(
    event_store_id="POKEMONS",
    event_types=[PokemonAppeared, PokemonCaught, PokemonLeveledUp],
    reducer=reduce_pokemon,
    event_storage_adapter=InMemoryEventStorageAdapter(),
)


async def inferred_types() -> None:
    """The aggregate and event types flow from the reducer to every result."""
    aggregate = await store.get_aggregate("p1")
    assert_type(aggregate.aggregate, Pokemon | None)
    assert_type(aggregate.last_event, PokemonEvent | None)
    existing = await store.get_existing_aggregate("p1")
    assert_type(existing.aggregate, Pokemon)
    events = await store.get_events("p1")
    assert_type(events.events, list[PokemonEvent])
    pushed = await store.push_event(PokemonCaught(aggregate_id="p1", version=2))
    assert_type(pushed.event, PokemonEvent)
    assert_type(pushed.next_aggregate, Pokemon | None)
    assert_type(store.build_aggregate(events.events), Pokemon | None)


async def handler(data: int, stores: object) -> str:
    return str(data)


command = Command(command_id="C", handler=handler, input_schema=int, output_schema=str)


async def command_types() -> None:
    """A command's output type follows its schema."""
    assert_type(await command.handler(1), str)


def test_typing_module_imports() -> None:
    """The typing checks also import cleanly at run time."""
    assert store.event_store_id == "POKEMONS"
