"""The small Pokémon domain the broker benchmarks publish."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel

from castore_pydantic import Aggregate, Event, EventStore
from castore_pydantic.messaging import NotificationMessage
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter

T0 = datetime(2024, 1, 1, tzinfo=UTC)


class Appeared(BaseModel):
    name: str
    level: int
    moves: list[str]


class PokemonAppeared(Event):
    type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARED"
    payload: Appeared


class PokemonCaught(Event):
    type: Literal["POKEMON_CAUGHT"] = "POKEMON_CAUGHT"


class Pokemon(Aggregate):
    name: str


def reduce_pokemon(pokemon: Pokemon | None, event: PokemonAppeared | PokemonCaught) -> Pokemon:
    if isinstance(event, PokemonAppeared):
        return Pokemon(aggregate_id=event.aggregate_id, version=1, name=event.payload.name)
    assert pokemon is not None
    return pokemon.model_copy(update={"version": event.version})


STORE = EventStore(
    event_store_id="POKEMONS",
    event_types=[PokemonAppeared, PokemonCaught],
    reducer=reduce_pokemon,
    event_storage_adapter=InMemoryEventStorageAdapter(),
)


def notifications(
    count: int, *, metadata: dict[str, str] | None = None
) -> list[NotificationMessage]:
    """``count`` notification messages of ``STORE``: an appearance, then a capture, and so on."""
    given = {} if metadata is None else {"metadata": metadata}
    messages = []
    for index in range(count):
        event: Event
        if index % 2 == 0:
            event = PokemonAppeared(
                aggregate_id=f"pokemon-{index // 2:08d}",
                version=1,
                timestamp=T0 + timedelta(milliseconds=index),
                payload=Appeared(name="Pikachu", level=index % 100 + 1, moves=["thunder", "tail"]),
                **given,
            )
        else:
            event = PokemonCaught(
                aggregate_id=f"pokemon-{index // 2:08d}",
                version=2,
                timestamp=T0 + timedelta(milliseconds=index),
            )
        messages.append(NotificationMessage(event_store_id="POKEMONS", event=event))
    return messages
