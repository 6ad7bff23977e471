"""The aggregates of the example and the reducers that fold events into them.

An aggregate is what the data would look like in a CRUD application. It is never stored:
it is computed on the fly from the events, so changing it needs no data migration.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from castore_pydantic import Aggregate
from examples.pokemon.events import (
    PokemonAppeared,
    PokemonCaught,
    PokemonEvent,
    PokemonLeveledUp,
    TrainerCaughtPokemon,
    TrainerCreated,
    TrainerEvent,
)

__all__ = ["Pokemon", "Trainer", "reduce_pokemon", "reduce_trainer"]


class Pokemon(Aggregate):
    """A Pokémon at one point in time (``aggregate_id`` and ``version`` come from ``Aggregate``)."""

    name: str
    level: int = Field(ge=1, le=100)
    status: Literal["wild", "caught"]
    trainer_id: str | None = None


class Trainer(Aggregate):
    """A trainer and the ids of the Pokémon they caught, in the order they caught them."""

    name: str
    pokemon_ids: tuple[str, ...] = ()


def reduce_pokemon(pokemon: Pokemon | None, event: PokemonEvent) -> Pokemon:
    """Fold one Pokémon event into the Pokémon.

    Every arm returns a *new* aggregate whose ``version`` is the event's: aggregates are
    immutable, which makes reducers easy to test and safe to share.
    """
    match event:
        case PokemonAppeared(payload=appeared):
            return Pokemon(
                aggregate_id=event.aggregate_id,
                version=event.version,
                name=appeared.name,
                level=appeared.level,
                status="wild",
            )
        case PokemonCaught(payload=caught):
            assert pokemon is not None, "a Pokémon must appear before it is caught"
            return pokemon.model_copy(
                update={
                    "version": event.version,
                    "status": "caught",
                    "trainer_id": caught.trainer_id,
                }
            )
        case PokemonLeveledUp():
            assert pokemon is not None, "a Pokémon must appear before it levels up"
            return pokemon.model_copy(update={"version": event.version, "level": pokemon.level + 1})


def reduce_trainer(trainer: Trainer | None, event: TrainerEvent) -> Trainer:
    """Fold one trainer event into the trainer."""
    match event:
        case TrainerCreated(payload=created):
            return Trainer(
                aggregate_id=event.aggregate_id, version=event.version, name=created.name
            )
        case TrainerCaughtPokemon(payload=caught):
            assert trainer is not None, "a trainer must exist before catching anything"
            return trainer.model_copy(
                update={
                    "version": event.version,
                    "pokemon_ids": (*trainer.pokemon_ids, caught.pokemon_id),
                }
            )
