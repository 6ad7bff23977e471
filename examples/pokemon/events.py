"""The event types of the example: what can happen to a Pokémon and to a trainer.

An event type is a Pydantic model: a subclass of ``Event`` with a ``Literal`` ``type``. Its
``payload`` (and ``metadata``) are ordinary models too, so every pushed event is checked
against their constraints before anything is written.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from castore_pydantic import Event

__all__ = [
    "AppearanceMetadata",
    "CaughtPayload",
    "PokemonAppeared",
    "PokemonAppearedPayload",
    "PokemonCaught",
    "PokemonEvent",
    "PokemonLeveledUp",
    "TrainerCaughtPokemon",
    "TrainerCaughtPokemonPayload",
    "TrainerCreated",
    "TrainerCreatedPayload",
    "TrainerEvent",
]

#: Pokémon levels go from 1 to 100, as in the games.
MIN_LEVEL = 1
MAX_LEVEL = 100

# Payloads refuse unknown keys, so a typo in a field name is an error rather than lost data.
# Their JSON keys are camelCase (``trainerId``) like the rest of Castore's wire form, so a
# TypeScript Castore service could read the same store; Python code uses snake_case.
_STRICT = ConfigDict(
    extra="forbid",
    frozen=True,
    alias_generator=to_camel,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
)


# -- Pokémon ---------------------------------------------------------------------------------


class PokemonAppearedPayload(BaseModel):
    """What we know about a wild Pokémon when it appears."""

    model_config = _STRICT

    name: str = Field(min_length=1, max_length=40)
    level: int = Field(ge=MIN_LEVEL, le=MAX_LEVEL)


class AppearanceMetadata(BaseModel):
    """How the appearance came about (data *about* the event, not part of the story)."""

    model_config = _STRICT

    trigger: Literal["random", "scripted"] = "random"


class PokemonAppeared(Event):
    """A wild Pokémon appeared: the first event (version 1) of every Pokémon."""

    type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARED"
    payload: PokemonAppearedPayload
    metadata: AppearanceMetadata | None = None


class CaughtPayload(BaseModel):
    """Who caught the Pokémon."""

    model_config = _STRICT

    trainer_id: str = Field(min_length=1)


class PokemonCaught(Event):
    """A trainer caught the Pokémon (pushed in one group with ``TrainerCaughtPokemon``)."""

    type: Literal["POKEMON_CAUGHT"] = "POKEMON_CAUGHT"
    payload: CaughtPayload


class PokemonLeveledUp(Event):
    """The Pokémon gained one level. It carries no payload: the reducer knows what to do."""

    type: Literal["POKEMON_LEVELED_UP"] = "POKEMON_LEVELED_UP"


#: Every event of the ``POKEMONS`` store; the reducer matches on it.
PokemonEvent = PokemonAppeared | PokemonCaught | PokemonLeveledUp


# -- Trainers --------------------------------------------------------------------------------


class TrainerCreatedPayload(BaseModel):
    """A new trainer's name."""

    model_config = _STRICT

    name: str = Field(min_length=1, max_length=40)


class TrainerCreated(Event):
    """A trainer started their journey: the first event of every trainer."""

    type: Literal["TRAINER_CREATED"] = "TRAINER_CREATED"
    payload: TrainerCreatedPayload


class TrainerCaughtPokemonPayload(BaseModel):
    """Which Pokémon joined the trainer's team."""

    model_config = _STRICT

    pokemon_id: str = Field(min_length=1)


class TrainerCaughtPokemon(Event):
    """The trainer's side of a catch (pushed in one group with ``PokemonCaught``)."""

    type: Literal["TRAINER_CAUGHT_POKEMON"] = "TRAINER_CAUGHT_POKEMON"
    payload: TrainerCaughtPokemonPayload


#: Every event of the ``TRAINERS`` store.
TrainerEvent = TrainerCreated | TrainerCaughtPokemon
