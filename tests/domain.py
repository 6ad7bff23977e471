"""A small Pokémon domain shared by the core tests."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from castore_pydantic import Aggregate, Event, EventStore
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter


class Appeared(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=50)
    level: int = Field(ge=1, le=100)


class PokemonAppeared(Event):
    type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARED"
    payload: Appeared
    metadata: dict[str, str] | None = None


class PokemonCaught(Event):
    type: Literal["POKEMON_CAUGHT"] = "POKEMON_CAUGHT"


class LeveledUp(BaseModel):
    levels: int = Field(default=1, ge=1)


class PokemonLeveledUp(Event):
    type: Literal["POKEMON_LEVELED_UP"] = "POKEMON_LEVELED_UP"
    payload: LeveledUp = LeveledUp()


class Pokemon(Aggregate):
    name: str
    level: int
    status: Literal["wild", "caught"]


PokemonEvent = PokemonAppeared | PokemonCaught | PokemonLeveledUp


def reduce_pokemon(pokemon: Pokemon | None, event: PokemonEvent) -> Pokemon:
    match event:
        case PokemonAppeared(payload=p):
            return Pokemon(
                aggregate_id=event.aggregate_id,
                version=event.version,
                name=p.name,
                level=p.level,
                status="wild",
            )
        case PokemonCaught():
            assert pokemon is not None
            return pokemon.model_copy(update={"version": event.version, "status": "caught"})
        case PokemonLeveledUp(payload=p):
            assert pokemon is not None
            return pokemon.model_copy(
                update={"version": event.version, "level": pokemon.level + p.levels}
            )


def make_store(
    adapter: InMemoryEventStorageAdapter | None = None, event_store_id: str = "POKEMONS"
) -> EventStore[Pokemon, PokemonEvent]:
    """A Pokémon store on a fresh in-memory adapter unless one is given."""
    return EventStore(
        event_store_id=event_store_id,
        event_types=[PokemonAppeared, PokemonCaught, PokemonLeveledUp],
        reducer=reduce_pokemon,
        event_storage_adapter=adapter if adapter is not None else InMemoryEventStorageAdapter(),
    )


def appeared(aggregate_id: str = "pikachu", version: int = 1, **extra: object) -> dict[str, object]:
    """A valid POKEMON_APPEARED mapping in Castore's camelCase form."""
    return {
        "aggregateId": aggregate_id,
        "version": version,
        "type": "POKEMON_APPEARED",
        "payload": {"name": "Pikachu", "level": 3},
        **extra,
    }


class PokemonFled(Event):
    """A Pokémon fled: the only event class of ``fleeing_store``."""

    type: Literal["POKEMON_FLED"] = "POKEMON_FLED"


def _keep(pokemon: Pokemon | None, event: PokemonFled) -> Pokemon:
    assert pokemon is not None
    return pokemon


def fleeing_store() -> EventStore[Pokemon, PokemonFled]:
    """A store with one event class: an event without a type validates as that class."""
    return EventStore(
        event_store_id="FLEES",
        event_types=[PokemonFled],
        reducer=_keep,
        event_storage_adapter=InMemoryEventStorageAdapter(),
    )
