"""The commands of the example: the only way the application changes its state.

A command validates its input (a Pydantic model) before its handler runs, reads the
aggregates it needs, decides, and pushes events with the next versions. If another writer
took one of those versions in the meantime, the push raises ``EventAlreadyExistsError`` and
the command runs its handler again on fresh data (twice by default).

Handlers receive the event stores as their second argument and impure helpers (here, the id
generator) as extra context arguments, so tests can pass in-memory stores and fixed ids.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from castore_pydantic import Command, EventStore
from examples.pokemon.aggregates import Pokemon, Trainer
from examples.pokemon.events import (
    MAX_LEVEL,
    AppearanceMetadata,
    CaughtPayload,
    PokemonAppeared,
    PokemonAppearedPayload,
    PokemonCaught,
    PokemonEvent,
    PokemonLeveledUp,
    TrainerCaughtPokemon,
    TrainerCaughtPokemonPayload,
    TrainerCreated,
    TrainerCreatedPayload,
    TrainerEvent,
)
from examples.pokemon.stores import pokemons as pokemons_store
from examples.pokemon.stores import trainers as trainers_store

__all__ = [
    "AppearInput",
    "AppearOutput",
    "CatchPokemonInput",
    "CatchPokemonOutput",
    "CreateTrainerInput",
    "CreateTrainerOutput",
    "LevelUpInput",
    "LevelUpOutput",
    "MaxLevelReachedError",
    "PokemonAlreadyCaughtError",
    "catch_pokemon",
    "create_trainer",
    "level_up_pokemon",
    "make_pokemon_appear",
    "new_id",
]

PokemonStore = EventStore[Pokemon, PokemonEvent]
TrainerStore = EventStore[Trainer, TrainerEvent]
#: What every command of the example receives as its second argument.
Stores = tuple[PokemonStore, TrainerStore]


def new_id() -> str:
    """A fresh aggregate id (the default id generator)."""
    return str(uuid.uuid4())


# -- domain errors ----------------------------------------------------------------------------


class PokemonAlreadyCaughtError(ValueError):
    """The Pokémon already belongs to a trainer, so it cannot be caught again."""

    def __init__(self, pokemon: Pokemon) -> None:
        self.pokemon_id = pokemon.aggregate_id
        self.trainer_id = pokemon.trainer_id
        super().__init__(f"{pokemon.name} ({pokemon.aggregate_id}) already belongs to a trainer")


class MaxLevelReachedError(ValueError):
    """The Pokémon is already at the highest level."""

    def __init__(self, pokemon: Pokemon) -> None:
        self.pokemon_id = pokemon.aggregate_id
        super().__init__(f"{pokemon.name} is already level {MAX_LEVEL}")


# -- schemas ----------------------------------------------------------------------------------

_INPUT = ConfigDict(extra="forbid", frozen=True)


class CreateTrainerInput(BaseModel):
    """Start a trainer's journey."""

    model_config = _INPUT

    name: str = Field(min_length=1, max_length=40)


class CreateTrainerOutput(BaseModel):
    """The new trainer's id."""

    trainer_id: str


class AppearInput(BaseModel):
    """Make a wild Pokémon appear."""

    model_config = _INPUT

    name: str = Field(min_length=1, max_length=40)
    level: int = Field(ge=1, le=MAX_LEVEL)
    trigger: Literal["random", "scripted"] = "random"


class AppearOutput(BaseModel):
    """The id of the Pokémon that appeared."""

    pokemon_id: str


class CatchPokemonInput(BaseModel):
    """A trainer tries to catch a wild Pokémon."""

    model_config = _INPUT

    pokemon_id: str = Field(min_length=1)
    trainer_id: str = Field(min_length=1)


class CatchPokemonOutput(BaseModel):
    """Both aggregates after the catch."""

    pokemon: Pokemon
    trainer: Trainer


class LevelUpInput(BaseModel):
    """Level a Pokémon up by one."""

    model_config = _INPUT

    pokemon_id: str = Field(min_length=1)


class LevelUpOutput(BaseModel):
    """The Pokémon after leveling up."""

    pokemon: Pokemon


# -- handlers ---------------------------------------------------------------------------------


async def _create_trainer(
    command: CreateTrainerInput, stores: Stores, generate_id: Callable[[], str] = new_id
) -> CreateTrainerOutput:
    _, trainers = stores
    trainer_id = generate_id()
    await trainers.push_event(
        TrainerCreated(
            aggregate_id=trainer_id,
            version=1,
            payload=TrainerCreatedPayload(name=command.name),
        )
    )
    return CreateTrainerOutput(trainer_id=trainer_id)


async def _make_pokemon_appear(
    command: AppearInput, stores: Stores, generate_id: Callable[[], str] = new_id
) -> AppearOutput:
    pokemons, _ = stores
    pokemon_id = generate_id()
    await pokemons.push_event(
        PokemonAppeared(
            aggregate_id=pokemon_id,
            version=1,
            payload=PokemonAppearedPayload(name=command.name, level=command.level),
            metadata=AppearanceMetadata(trigger=command.trigger),
        )
    )
    return AppearOutput(pokemon_id=pokemon_id)


async def _catch_pokemon(command: CatchPokemonInput, stores: Stores) -> CatchPokemonOutput:
    pokemons, trainers = stores
    # Both reads raise AggregateNotFoundError for an unknown id: nothing is written then.
    pokemon = (await pokemons.get_existing_aggregate(command.pokemon_id)).aggregate
    trainer = (await trainers.get_existing_aggregate(command.trainer_id)).aggregate
    if pokemon.status == "caught":
        raise PokemonAlreadyCaughtError(pokemon)
    # One catch changes two aggregates in two stores. Pushing them as one event group makes
    # it all or nothing: if another trainer caught this Pokémon since we read it, its next
    # version is taken, the whole group fails with EventAlreadyExistsError, the trainer's
    # event is not written either, and the command retries on fresh data (and then refuses).
    result = await EventStore.push_event_group(
        pokemons.group_event(
            PokemonCaught(
                aggregate_id=pokemon.aggregate_id,
                version=pokemon.version + 1,
                payload=CaughtPayload(trainer_id=trainer.aggregate_id),
            ),
            prev_aggregate=pokemon,
        ),
        trainers.group_event(
            TrainerCaughtPokemon(
                aggregate_id=trainer.aggregate_id,
                version=trainer.version + 1,
                payload=TrainerCaughtPokemonPayload(pokemon_id=pokemon.aggregate_id),
            ),
            prev_aggregate=trainer,
        ),
    )
    caught, joined = result.event_group
    return CatchPokemonOutput(pokemon=caught.next_aggregate, trainer=joined.next_aggregate)


async def _level_up_pokemon(command: LevelUpInput, stores: Stores) -> LevelUpOutput:
    pokemons, _ = stores
    pokemon = (await pokemons.get_existing_aggregate(command.pokemon_id)).aggregate
    if pokemon.level >= MAX_LEVEL:
        raise MaxLevelReachedError(pokemon)
    result = await pokemons.push_event(
        PokemonLeveledUp(aggregate_id=pokemon.aggregate_id, version=pokemon.version + 1),
        prev_aggregate=pokemon,
    )
    assert result.next_aggregate is not None  # given prev_aggregate, the store folds for us
    return LevelUpOutput(pokemon=result.next_aggregate)


# -- commands ---------------------------------------------------------------------------------

create_trainer = Command(
    command_id="CREATE_TRAINER",
    required_event_stores=(pokemons_store, trainers_store),
    handler=_create_trainer,
    input_schema=CreateTrainerInput,
    output_schema=CreateTrainerOutput,
)

make_pokemon_appear = Command(
    command_id="MAKE_POKEMON_APPEAR",
    required_event_stores=(pokemons_store, trainers_store),
    handler=_make_pokemon_appear,
    input_schema=AppearInput,
    output_schema=AppearOutput,
)

catch_pokemon = Command(
    command_id="CATCH_POKEMON",
    required_event_stores=(pokemons_store, trainers_store),
    handler=_catch_pokemon,
    input_schema=CatchPokemonInput,
    output_schema=CatchPokemonOutput,
)

level_up_pokemon = Command(
    command_id="LEVEL_UP_POKEMON",
    required_event_stores=(pokemons_store, trainers_store),
    handler=_level_up_pokemon,
    input_schema=LevelUpInput,
    output_schema=LevelUpOutput,
)
