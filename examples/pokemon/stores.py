"""The two event stores of the example.

They are defined without a storage adapter: the application decides where events live
(``__main__`` uses a SQLite file, the tests an in-memory adapter or a temporary file) and sets
``event_storage_adapter`` before using them. The ``castore`` command-line tool can load them by
import string, e.g. ``castore events --store examples.pokemon.stores:pokemons ...``.
"""

from __future__ import annotations

from castore_pydantic import EventStore
from examples.pokemon.aggregates import reduce_pokemon, reduce_trainer
from examples.pokemon.events import (
    PokemonAppeared,
    PokemonCaught,
    PokemonLeveledUp,
    TrainerCaughtPokemon,
    TrainerCreated,
)

__all__ = ["pokemons", "trainers"]

#: Every Pokémon, wild or caught. The aggregate and event types are inferred from the reducer.
pokemons = EventStore(
    event_store_id="POKEMONS",
    event_types=[PokemonAppeared, PokemonCaught, PokemonLeveledUp],
    reducer=reduce_pokemon,
)

#: Every trainer and their team.
trainers = EventStore(
    event_store_id="TRAINERS",
    event_types=[TrainerCreated, TrainerCaughtPokemon],
    reducer=reduce_trainer,
)
