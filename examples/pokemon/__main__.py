"""Run the Pokémon example: ``python -m examples.pokemon [--db PATH]``.

Every run continues the story of the previous one, because the events are kept in a SQLite
file (``pokemon.db`` in the current directory, or ``$POKEMON_DB``, or ``--db PATH``):

1. Ash (and his rival Gary) start their journey, or are welcomed back.
2. A wild Pokémon appears.
3. Ash catches the oldest wild Pokémon: one event group across the two stores.
4. Gary tries to catch the same Pokémon and is refused; nothing is written.
5. Every Pokémon in Ash's team levels up.
6. A Pokémon with an impossible level is refused by validation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from castore_pydantic import EventStore
from castore_pydantic.storage import EventStorageAdapter
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
from examples.pokemon.aggregates import Pokemon, Trainer
from examples.pokemon.commands import (
    MaxLevelReachedError,
    PokemonAlreadyCaughtError,
    catch_pokemon,
    create_trainer,
    level_up_pokemon,
    make_pokemon_appear,
)
from examples.pokemon.stores import pokemons, trainers

#: The environment variable that names the database file when ``--db`` is not given.
DB_ENV_VAR = "POKEMON_DB"
DEFAULT_DB = "pokemon.db"

#: The Pokémon that appear, in order, one per run (then the list starts again).
WILD_POKEMON = [
    ("Pikachu", 5),
    ("Bulbasaur", 4),
    ("Charmander", 6),
    ("Squirtle", 5),
    ("Eevee", 3),
    ("Snorlax", 12),
]

STORES = (pokemons, trainers)


def open_adapter(path: Path) -> EventStorageAdapter:
    """The one place that decides where the example's events live: a SQLite file.

    Both stores share it; every row is keyed by its store's id, so they never mix.
    """
    return SQLiteEventStorageAdapter(path)


async def all_aggregate_ids(store: EventStore[Any, Any]) -> AsyncIterator[str]:
    """Every aggregate id of a store, oldest first, a page at a time."""
    page_token = None
    while True:
        page = await store.list_aggregate_ids(limit=50, page_token=page_token)
        for entry in page.aggregate_ids:
            yield entry.aggregate_id
        page_token = page.next_page_token
        if page_token is None:
            return


async def find_or_create_trainer(name: str) -> tuple[Trainer, bool]:
    """Return the trainer called ``name`` and whether they already existed."""
    async for trainer_id in all_aggregate_ids(trainers):
        trainer = (await trainers.get_existing_aggregate(trainer_id)).aggregate
        if trainer.name == name:
            return trainer, True
    created = await create_trainer.handler({"name": name}, STORES)
    return (await trainers.get_existing_aggregate(created.trainer_id)).aggregate, False


async def oldest_wild_pokemon() -> Pokemon | None:
    """The Pokémon that has been wild the longest, if any."""
    async for pokemon_id in all_aggregate_ids(pokemons):
        pokemon = (await pokemons.get_existing_aggregate(pokemon_id)).aggregate
        if pokemon.status == "wild":
            return pokemon
    return None


async def count_pokemon() -> int:
    """How many Pokémon have ever appeared."""
    return len([pokemon_id async for pokemon_id in all_aggregate_ids(pokemons)])


async def team_of(trainer: Trainer) -> list[Pokemon]:
    """The trainer's Pokémon, in the order they were caught."""
    return [
        (await pokemons.get_existing_aggregate(pokemon_id)).aggregate
        for pokemon_id in trainer.pokemon_ids
    ]


def describe(team: Sequence[Pokemon]) -> str:
    """``Pikachu (level 6), Eevee (level 4)`` or ``no Pokémon yet``."""
    return ", ".join(f"{p.name} (level {p.level})" for p in team) or "no Pokémon yet"


async def play() -> None:
    """One run of the story, against whatever adapter the stores have."""
    # 1. Trainers are found by name, or created on the first run.
    ash, returning = await find_or_create_trainer("Ash")
    gary, _ = await find_or_create_trainer("Gary")
    if returning:
        print(f"Welcome back, Ash! Team: {describe(await team_of(ash))}.")
    else:
        print("Ash starts his journey.")

    # 2. A wild Pokémon appears: the next one on the list.
    name, level = WILD_POKEMON[await count_pokemon() % len(WILD_POKEMON)]
    await make_pokemon_appear.handler({"name": name, "level": level}, STORES)
    print(f"A wild {name} (level {level}) appeared!")

    # 3. Ash catches the oldest wild Pokémon. The command pushes POKEMON_CAUGHT and
    #    TRAINER_CAUGHT_POKEMON as one event group: both stores change, or neither does.
    wild = await oldest_wild_pokemon()
    assert wild is not None  # one appeared a moment ago
    caught = await catch_pokemon.handler(
        {"pokemon_id": wild.aggregate_id, "trainer_id": ash.aggregate_id}, STORES
    )
    ash = caught.trainer
    print(
        f"Ash caught {caught.pokemon.name}! (Pokémon version {caught.pokemon.version}, "
        f"trainer version {ash.version})"
    )

    # 4. Gary is too late: the command refuses before writing anything.
    gary_events_before = len((await trainers.get_events(gary.aggregate_id)).events)
    try:
        await catch_pokemon.handler(
            {"pokemon_id": wild.aggregate_id, "trainer_id": gary.aggregate_id}, STORES
        )
    except PokemonAlreadyCaughtError:
        gary_events_after = len((await trainers.get_events(gary.aggregate_id)).events)
        print(
            f"Gary tried to catch {wild.name} too, but it already belongs to Ash "
            f"(Gary's events: {gary_events_before} before, {gary_events_after} after)."
        )

    # 5. Every Pokémon in Ash's team levels up.
    for pokemon in await team_of(ash):
        try:
            leveled = await level_up_pokemon.handler({"pokemon_id": pokemon.aggregate_id}, STORES)
        except MaxLevelReachedError:
            print(f"{pokemon.name} is already at the highest level.")
        else:
            print(f"{leveled.pokemon.name} grew to level {leveled.pokemon.level}.")

    # 6. Input is validated before a command runs: a level-101 Mew never reaches the store.
    try:
        await make_pokemon_appear.handler({"name": "Mew", "level": 101}, STORES)
    except ValidationError as error:
        problem = error.errors()[0]
        print(f"A level-101 Mew was refused: {problem['loc'][0]}: {problem['msg']}.")

    print(f"Ash's team: {describe(await team_of(ash))}.")


async def main(db_path: Path) -> None:
    """Open the database, give both stores the adapter, and play one run."""
    adapter = open_adapter(db_path)
    async with adapter:
        pokemons.event_storage_adapter = adapter
        trainers.event_storage_adapter = adapter
        await play()
    print(f"The events are in {db_path}; run again to continue the story.")


def parse_args(argv: Sequence[str] | None = None) -> Path:
    """The database path from ``--db``, ``$POKEMON_DB`` or the default."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.pokemon",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--db",
        type=Path,
        default=Path(os.environ.get(DB_ENV_VAR) or DEFAULT_DB),
        help=f"SQLite file holding the events (default: ${DB_ENV_VAR} or {DEFAULT_DB})",
    )
    db: Path = parser.parse_args(argv).db
    return db


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
