"""The Pokémon example: its domain rules, and ``python -m examples.pokemon`` run twice."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from castore_pydantic import AggregateNotFoundError, Event, EventAlreadyExistsError, EventStore
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
from castore_pydantic.testing import mock_event_store
from examples.pokemon.commands import (
    MaxLevelReachedError,
    PokemonAlreadyCaughtError,
    catch_pokemon,
    create_trainer,
    level_up_pokemon,
    make_pokemon_appear,
)
from examples.pokemon.events import (
    CaughtPayload,
    PokemonAppeared,
    PokemonCaught,
    TrainerCaughtPokemon,
    TrainerCaughtPokemonPayload,
)
from examples.pokemon.stores import pokemons, trainers

REPO_ROOT = Path(__file__).resolve().parent.parent

Stores = tuple[EventStore[Any, Any], EventStore[Any, Any]]


def counter_ids(prefix: str) -> Callable[[], str]:
    """A deterministic id generator: ``prefix-1``, ``prefix-2``, ..."""
    numbers = itertools.count(1)
    return lambda: f"{prefix}-{next(numbers)}"


@pytest.fixture
def stores() -> Stores:
    """The example's two stores, copied onto fresh in-memory adapters."""
    return mock_event_store(pokemons), mock_event_store(trainers)


async def snapshot(stores: Stores) -> dict[str, list[Event]]:
    """Every event of both stores, keyed by ``STORE/aggregate``."""
    events: dict[str, list[Event]] = {}
    for store in stores:
        listed = await store.list_aggregate_ids()
        for entry in listed.aggregate_ids:
            key = f"{store.event_store_id}/{entry.aggregate_id}"
            events[key] = (await store.get_events(entry.aggregate_id)).events
    return events


async def appear(stores: Stores, name: str = "Pikachu", level: int = 5) -> str:
    """Make a wild Pokémon appear and return its id."""
    output = await make_pokemon_appear.handler({"name": name, "level": level}, stores)
    return output.pokemon_id


async def trainer(stores: Stores, name: str = "Ash") -> str:
    """Create a trainer and return their id."""
    return (await create_trainer.handler({"name": name}, stores)).trainer_id


class TestCommands:
    """The commands enforce the domain's rules and change both stores together."""

    async def test_catch_changes_both_stores(self, stores: Stores) -> None:
        """A catch makes the Pokémon caught and adds it to the trainer's team."""
        pokemon_id = await appear(stores)
        ash = await trainer(stores)
        output = await catch_pokemon.handler({"pokemon_id": pokemon_id, "trainer_id": ash}, stores)
        assert output.pokemon.status == "caught"
        assert output.pokemon.trainer_id == ash
        assert output.trainer.pokemon_ids == (pokemon_id,)
        pokemon_store, trainer_store = stores
        stored_pokemon = (await pokemon_store.get_existing_aggregate(pokemon_id)).aggregate
        stored_trainer = (await trainer_store.get_existing_aggregate(ash)).aggregate
        assert stored_pokemon == output.pokemon
        assert stored_trainer == output.trainer
        pokemon_event = (await pokemon_store.get_events(pokemon_id)).events[-1]
        trainer_event = (await trainer_store.get_events(ash)).events[-1]
        # One group: the two events share their timestamp.
        assert pokemon_event.timestamp == trainer_event.timestamp

    async def test_catching_a_caught_pokemon_writes_nothing(self, stores: Stores) -> None:
        """Catching an already caught Pokémon fails and leaves both stores unchanged."""
        pokemon_id = await appear(stores)
        ash, gary = await trainer(stores, "Ash"), await trainer(stores, "Gary")
        await catch_pokemon.handler({"pokemon_id": pokemon_id, "trainer_id": ash}, stores)
        before = await snapshot(stores)
        with pytest.raises(PokemonAlreadyCaughtError) as caught:
            await catch_pokemon.handler({"pokemon_id": pokemon_id, "trainer_id": gary}, stores)
        assert caught.value.trainer_id == ash
        assert await snapshot(stores) == before

    async def test_group_with_a_taken_version_writes_neither_event(self, stores: Stores) -> None:
        """When the Pokémon's next version is taken, the trainer's event is not written either."""
        pokemon_store, trainer_store = stores
        pokemon_id = await appear(stores)
        ash, gary = await trainer(stores, "Ash"), await trainer(stores, "Gary")
        await catch_pokemon.handler({"pokemon_id": pokemon_id, "trainer_id": ash}, stores)
        before = await snapshot(stores)
        # Gary's stale view: he read the Pokémon at version 1, before Ash caught it.
        with pytest.raises(EventAlreadyExistsError) as conflict:
            await EventStore.push_event_group(
                pokemon_store.group_event(
                    PokemonCaught(
                        aggregate_id=pokemon_id,
                        version=2,
                        payload=CaughtPayload(trainer_id=gary),
                    )
                ),
                trainer_store.group_event(
                    TrainerCaughtPokemon(
                        aggregate_id=gary,
                        version=2,
                        payload=TrainerCaughtPokemonPayload(pokemon_id=pokemon_id),
                    )
                ),
            )
        assert (conflict.value.event_store_id, conflict.value.version) == ("POKEMONS", 2)
        assert await snapshot(stores) == before

    async def test_unknown_trainer_writes_nothing(self, stores: Stores) -> None:
        """Catching with a trainer that does not exist fails before anything is written."""
        pokemon_id = await appear(stores)
        before = await snapshot(stores)
        with pytest.raises(AggregateNotFoundError) as missing:
            await catch_pokemon.handler({"pokemon_id": pokemon_id, "trainer_id": "nobody"}, stores)
        assert missing.value.event_store_id == "TRAINERS"
        assert await snapshot(stores) == before

    async def test_invalid_input_never_reaches_the_store(self, stores: Stores) -> None:
        """A level out of 1..100 or an unknown key is refused by the input schema."""
        for bad in ({"name": "Mew", "level": 101}, {"name": "Mew", "level": 5, "shiny": True}):
            with pytest.raises(ValidationError):
                await make_pokemon_appear.handler(bad, stores)
        assert await snapshot(stores) == {}

    async def test_level_up_stops_at_100(self, stores: Stores) -> None:
        """Leveling up adds one level and refuses to go past 100."""
        pokemon_id = await appear(stores, "Mewtwo", 99)
        output = await level_up_pokemon.handler({"pokemon_id": pokemon_id}, stores)
        assert (output.pokemon.level, output.pokemon.version) == (100, 2)
        before = await snapshot(stores)
        with pytest.raises(MaxLevelReachedError):
            await level_up_pokemon.handler({"pokemon_id": pokemon_id}, stores)
        assert await snapshot(stores) == before

    async def test_ids_come_from_the_context(self, stores: Stores) -> None:
        """The id generator is a context argument, so tests can choose ids."""
        output = await make_pokemon_appear.handler(
            {"name": "Eevee", "level": 3}, stores, counter_ids("pokemon")
        )
        assert output.pokemon_id == "pokemon-1"

    async def test_stored_events_use_castores_json(self, stores: Stores) -> None:
        """Payload keys are camelCase on the wire, like the rest of Castore's event JSON."""
        pokemon_id = await appear(stores)
        ash = await trainer(stores)
        await catch_pokemon.handler({"pokemon_id": pokemon_id, "trainer_id": ash}, stores)
        caught = (await stores[0].get_events(pokemon_id)).events[-1]
        assert caught.model_dump(mode="json")["payload"] == {"trainerId": ash}
        first = (await stores[0].get_events(pokemon_id)).events[0]
        assert isinstance(first, PokemonAppeared)
        assert first.model_dump(mode="json")["metadata"] == {"trigger": "random"}


def stores_on(adapter: SQLiteEventStorageAdapter) -> Stores:
    """Twins of the example's stores (same ids, types and reducers) on ``adapter``."""
    return tuple(  # type: ignore[return-value]
        EventStore(
            event_store_id=store.event_store_id,
            event_types=store.event_types,
            reducer=store.reducer,
            event_storage_adapter=adapter,
        )
        for store in (pokemons, trainers)
    )


class TestCatchRace:
    """Two writers, each with its own thread, loop and connection, race on one SQLite file."""

    ROUNDS = 25

    def test_each_pokemon_joins_exactly_one_team(self, tmp_path: Path) -> None:
        """Concurrent catches never give one Pokémon to two trainers, nor half a catch."""
        db = tmp_path / "race.db"
        names = ["Ash", "Gary"]

        async def setup() -> tuple[list[str], dict[str, str]]:
            async with SQLiteEventStorageAdapter(db) as adapter:
                setup_stores = stores_on(adapter)
                ids = {name: await trainer(setup_stores, name) for name in names}
                wild = [await appear(setup_stores, f"Wild {n}", 5) for n in range(self.ROUNDS)]
                return wild, ids

        wild, trainer_ids = asyncio.run(setup())
        barrier = threading.Barrier(len(names))
        outcomes: dict[str, list[str]] = {name: [] for name in names}
        failures: list[BaseException] = []

        async def contend(name: str) -> None:
            # Each thread has its own event loop and its own connection to the same file.
            async with SQLiteEventStorageAdapter(db) as adapter:
                racing = stores_on(adapter)
                for pokemon_id in wild:
                    await asyncio.to_thread(barrier.wait)
                    try:
                        await catch_pokemon.handler(
                            {"pokemon_id": pokemon_id, "trainer_id": trainer_ids[name]}, racing
                        )
                    except PokemonAlreadyCaughtError:
                        continue
                    outcomes[name].append(pokemon_id)

        def run(name: str) -> None:
            try:
                asyncio.run(contend(name))
            except BaseException as error:  # reported below, in the test's thread
                failures.append(error)
                barrier.abort()

        threads = [threading.Thread(target=run, args=(name,)) for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert failures == []

        async def check() -> None:
            async with SQLiteEventStorageAdapter(db) as adapter:
                pokemon_store, trainer_store = stores_on(adapter)
                won = sorted(outcomes["Ash"] + outcomes["Gary"])
                assert won == sorted(wild), "every Pokémon is caught exactly once"
                for name in names:
                    team = (await trainer_store.get_existing_aggregate(trainer_ids[name])).aggregate
                    assert sorted(team.pokemon_ids) == sorted(outcomes[name])
                for pokemon_id in wild:
                    events = (await pokemon_store.get_events(pokemon_id)).events
                    assert [e.type for e in events] == ["POKEMON_APPEARED", "POKEMON_CAUGHT"]
                    owner = events[1].payload.trainer_id
                    assert pokemon_id in outcomes[next(n for n in names if trainer_ids[n] == owner)]

        asyncio.run(check())


def run_example(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``python -m examples.pokemon`` in ``cwd``; return its output, asserting success."""
    base = {k: v for k, v in os.environ.items() if k != "POKEMON_DB"}
    completed = subprocess.run(
        [sys.executable, "-m", "examples.pokemon", *args],
        cwd=cwd,
        env={**base, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    return completed.stdout


class TestMain:
    """``python -m examples.pokemon`` keeps its story in a SQLite file across runs."""

    def test_second_run_continues_the_first(self, tmp_path: Path) -> None:
        """The second run welcomes Ash back, catches the next Pokémon and levels his team."""
        db = tmp_path / "story.db"
        first = run_example(tmp_path, "--db", str(db))
        assert "Ash starts his journey." in first
        assert "Ash caught Pikachu!" in first
        assert "Gary's events: 1 before, 1 after" in first
        assert "Ash's team: Pikachu (level 6)." in first
        assert db.exists()
        second = run_example(tmp_path, "--db", str(db))
        assert "Welcome back, Ash! Team: Pikachu (level 6)." in second
        assert "A wild Bulbasaur (level 4) appeared!" in second
        assert "Ash caught Bulbasaur!" in second
        assert "Ash's team: Pikachu (level 7), Bulbasaur (level 5)." in second

    def test_database_path_from_the_environment(self, tmp_path: Path) -> None:
        """``POKEMON_DB`` names the file when ``--db`` is not given."""
        db = tmp_path / "from-env.db"
        run_example(tmp_path, env={"POKEMON_DB": str(db)})
        assert db.exists()
        second = run_example(tmp_path, env={"POKEMON_DB": str(db)})
        assert "Welcome back, Ash!" in second

    def test_default_database_in_the_current_directory(self, tmp_path: Path) -> None:
        """Without ``--db`` or ``POKEMON_DB`` the events go to ``pokemon.db`` in the cwd."""
        run_example(tmp_path)
        assert (tmp_path / "pokemon.db").exists()
