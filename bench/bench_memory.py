"""In-memory adapter benchmark: W1, W3 and W5 next to the floor measured in the same run.

Run with ``python -m bench.bench_memory``. The floors are a plain dict/list store doing the
same appends without validation, and a bare ``TypeAdapter`` of the same event union.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, TypeAdapter

from castore_pydantic import Aggregate, Event, EventStore
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter

N_AGGREGATES = 5_000
LONG = 10_000
SHORT_AGGREGATES = 1_000
SHORT_LENGTH = 10
W5_COUNT = 200_000


class Appeared(BaseModel):
    name: str
    level: int = Field(ge=1, le=100)


class PokemonAppeared(Event):
    type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARED"
    payload: Appeared


class LevelUp(BaseModel):
    levels: int = Field(ge=1)


class PokemonLeveledUp(Event):
    type: Literal["POKEMON_LEVELED_UP"] = "POKEMON_LEVELED_UP"
    payload: LevelUp


class PokemonCaught(Event):
    type: Literal["POKEMON_CAUGHT"] = "POKEMON_CAUGHT"
    metadata: dict[str, str] | None = None


class Renamed(BaseModel):
    name: str = Field(min_length=1)


class PokemonRenamed(Event):
    type: Literal["POKEMON_RENAMED"] = "POKEMON_RENAMED"
    payload: Renamed


class PokemonReleased(Event):
    type: Literal["POKEMON_RELEASED"] = "POKEMON_RELEASED"


EVENT_TYPES = [PokemonAppeared, PokemonLeveledUp, PokemonCaught, PokemonRenamed, PokemonReleased]
AnyEvent = PokemonAppeared | PokemonLeveledUp | PokemonCaught | PokemonRenamed | PokemonReleased


class Pokemon(Aggregate):
    name: str
    level: int


def reduce_pokemon(pokemon: Pokemon | None, event: AnyEvent) -> Pokemon:
    if isinstance(event, PokemonAppeared):
        return Pokemon(
            aggregate_id=event.aggregate_id,
            version=event.version,
            name=event.payload.name,
            level=event.payload.level,
        )
    assert pokemon is not None
    if isinstance(event, PokemonLeveledUp):
        return pokemon.model_copy(
            update={"version": event.version, "level": pokemon.level + event.payload.levels}
        )
    return pokemon.model_copy(update={"version": event.version})


def appeared(aggregate_id: str) -> dict[str, Any]:
    return {
        "aggregateId": aggregate_id,
        "version": 1,
        "type": "POKEMON_APPEARED",
        "payload": {"name": "Pikachu", "level": 3},
    }


def leveled(aggregate_id: str, version: int) -> dict[str, Any]:
    return {
        "aggregateId": aggregate_id,
        "version": version,
        "type": "POKEMON_LEVELED_UP",
        "payload": {"levels": 1},
    }


def make_store() -> EventStore[Pokemon, AnyEvent]:
    return EventStore(
        event_store_id="POKEMONS",
        event_types=EVENT_TYPES,
        reducer=reduce_pokemon,
        event_storage_adapter=InMemoryEventStorageAdapter(),
    )


UNION: Any = Annotated[Union[tuple(EVENT_TYPES)], Field(discriminator="type")]  # noqa: UP007
BARE = TypeAdapter(UNION)
BARE_LIST = TypeAdapter(list[UNION])


def best_of(runs: int, fn: Callable[[], float]) -> float:
    """The fastest of several runs (seconds), to resist a busy machine."""
    results = []
    for _ in range(runs):
        gc.collect()
        results.append(fn())
    return min(results)


def w1_inputs() -> list[dict[str, Any]]:
    first = [appeared(f"p{i}") for i in range(N_AGGREGATES)]
    second = [leveled(f"p{i}", 2) for i in range(N_AGGREGATES)]
    return first + second


def w1_ours() -> tuple[float, list[float]]:
    inputs = w1_inputs()
    store = make_store()
    latencies: list[float] = []

    async def run() -> float:
        push = store.push_event
        clock = time.perf_counter
        start = clock()
        for data in inputs:
            t0 = clock()
            await push(data)
            latencies.append(clock() - t0)
        return clock() - start

    return asyncio.run(run()), latencies


def w1_floor() -> float:
    """A plain dict of lists with a version check, no validation."""
    inputs = w1_inputs()
    storage: dict[str, list[dict[str, Any]]] = {}

    async def push(data: dict[str, Any]) -> dict[str, Any]:
        events = storage.setdefault(data["aggregateId"], [])
        if events and events[-1]["version"] >= data["version"]:
            raise ValueError("conflict")
        events.append(data)
        return data

    async def run() -> float:
        start = time.perf_counter()
        for data in inputs:
            await push(data)
        return time.perf_counter() - start

    return asyncio.run(run())


def bare_validate(inputs: list[dict[str, Any]]) -> float:
    validate = BARE.validate_python
    start = time.perf_counter()
    for data in inputs:
        validate(data)
    return time.perf_counter() - start


def bare_validate_kept(inputs: list[dict[str, Any]]) -> float:
    """The read-path floor: validate each row and keep the events, as a read must."""
    validate = BARE.validate_python
    start = time.perf_counter()
    events = [validate(data) for data in inputs]
    elapsed = time.perf_counter() - start
    assert len(events) == len(inputs)
    return elapsed


def w3_prepare() -> tuple[EventStore[Pokemon, AnyEvent], list[dict[str, Any]]]:
    store = make_store()
    long_events = [appeared("long")] + [leveled("long", v) for v in range(2, LONG + 1)]

    async def seed() -> None:
        for data in long_events:
            await store.push_event(data)
        for a in range(SHORT_AGGREGATES):
            await store.push_event(appeared(f"s{a}"))
            for v in range(2, SHORT_LENGTH + 1):
                await store.push_event(leveled(f"s{a}", v))

    asyncio.run(seed())
    return store, long_events


def w3_long(store: EventStore[Pokemon, AnyEvent]) -> float:
    async def run() -> float:
        start = time.perf_counter()
        result = await store.get_aggregate("long")
        assert result.aggregate is not None
        assert result.aggregate.version == LONG
        return time.perf_counter() - start

    return asyncio.run(run())


def w3_short(store: EventStore[Pokemon, AnyEvent]) -> float:
    async def run() -> float:
        start = time.perf_counter()
        for a in range(SHORT_AGGREGATES):
            result = await store.get_aggregate(f"s{a}")
            assert result.aggregate is not None
        return time.perf_counter() - start

    return asyncio.run(run())


def w3_floor_long(events: list[dict[str, Any]]) -> float:
    """Fold the same events without validation or storage (reducer over plain objects)."""
    parsed = [BARE.validate_python(e) for e in events]
    start = time.perf_counter()
    aggregate = None
    for event in parsed:
        aggregate = reduce_pokemon(aggregate, event)
    return time.perf_counter() - start


def w5_inputs() -> list[dict[str, Any]]:
    kinds = [
        lambda i: appeared(f"p{i}"),
        lambda i: leveled(f"p{i}", 2),
        lambda i: {"aggregateId": f"p{i}", "version": 3, "type": "POKEMON_CAUGHT",
                   "metadata": {"by": "ash"}},
        lambda i: {"aggregateId": f"p{i}", "version": 4, "type": "POKEMON_RENAMED",
                   "payload": {"name": "Sparky"}},
        lambda i: {"aggregateId": f"p{i}", "version": 5, "type": "POKEMON_RELEASED",
                   "timestamp": "2024-01-01T00:00:00.000Z"},
    ]  # fmt: skip
    return [kinds[i % 5](i) for i in range(W5_COUNT)]


def w5_ours(inputs: list[dict[str, Any]], *, stamp: bool = True) -> float:
    """Our boundary: validation, limit checks and (with ``stamp``) the push timestamp."""
    validate = make_store().context.validate_input
    start = time.perf_counter()
    for data in inputs:
        validate(data, timestamp=stamp)
    return time.perf_counter() - start


def read_json_ours(text: str) -> float:
    parse = make_store().context.parse_events_json
    start = time.perf_counter()
    parse(text)
    return time.perf_counter() - start


def read_dicts_ours(rows: list[dict[str, Any]]) -> float:
    parse = make_store().context.parse_events
    start = time.perf_counter()
    parse(rows)
    return time.perf_counter() - start


def read_json_floor(text: str) -> float:
    start = time.perf_counter()
    BARE_LIST.validate_json(text)
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1e6


def main() -> None:
    """Run every workload and print throughput next to its floor."""
    print("castore-pydantic in-memory benchmark (best of several runs)")
    w1_runs = [w1_ours() for _ in range(3)]
    w1_time, w1_latencies = min(w1_runs, key=lambda r: r[0])
    w1_floor_time = best_of(3, w1_floor)
    w1_bare = best_of(3, lambda: bare_validate(w1_inputs()))
    n = len(w1_inputs())
    print(
        f"W1 push_event (dict input, validated):  {n / w1_time:>10,.0f} events/s   "
        f"p50 {pct(w1_latencies, 50):.1f} us  p99 {pct(w1_latencies, 99):.1f} us"
    )
    print(f"   floor: plain dict store, no validation {n / w1_floor_time:>10,.0f} events/s")
    print(f"   floor: bare TypeAdapter.validate_python {n / w1_bare:>9,.0f} events/s")
    print(f"   target >= 73,000 events/s: {'met' if n / w1_time >= 73_000 else 'NOT met'}")
    w1_validate = best_of(3, lambda: w5_ours(w1_inputs()))
    print(
        f"   push-path validation (EventStoreContext.validate_input, limits and timestamp "
        f"included): {w1_validate / n * 1e6:.2f} us/event = {w1_validate / w1_bare:.2f}x the "
        f"bare TypeAdapter floor ({w1_bare / n * 1e6:.2f} us); target <= 1.5x"
    )

    store, long_events = w3_prepare()
    long_time = best_of(5, lambda: w3_long(store))
    long_floor = best_of(5, lambda: w3_floor_long(long_events))
    short_time = best_of(3, lambda: w3_short(store))
    print(
        f"W3 fold one aggregate of {LONG:,} events:  {LONG / long_time:>10,.0f} events/s "
        f"(floor: bare reducer fold {LONG / long_floor:,.0f}/s, ratio {long_floor / long_time:.2f})"
    )
    print(
        f"W3 load {SHORT_AGGREGATES:,} aggregates of {SHORT_LENGTH} events:"
        f" {SHORT_AGGREGATES / short_time:>8,.0f} aggregates/s"
        f" ({SHORT_AGGREGATES * SHORT_LENGTH / short_time:,.0f} events/s)"
    )
    text = (
        "["
        + ",".join(
            PokemonLeveledUp.model_validate(
                e | {"timestamp": "2024-01-01T00:00:00.000Z"}
            ).model_dump_json()
            for e in long_events[1:]
        )
        + "]"
    )
    ours_json = best_of(5, lambda: read_json_ours(text))
    floor_json = best_of(5, lambda: read_json_floor(text))
    print(
        f"   read-path validation (a stored JSON array, one validate_json): "
        f"{(LONG - 1) / ours_json:,.0f} events/s, {ours_json / floor_json:.2f}x the bare "
        f"TypeAdapter floor; target <= 1.5x"
    )
    dicts = [json.loads(e) for e in text[1:-1].replace("},{", "}\n{").splitlines()]
    ours_dicts = best_of(5, lambda: read_dicts_ours(dicts))
    floor_dicts = best_of(5, lambda: bare_validate_kept(dicts))
    print(
        f"   read-path validation (stored rows as dicts): {len(dicts) / ours_dicts:,.0f} "
        f"events/s, {ours_dicts / floor_dicts:.2f}x the bare TypeAdapter floor; target <= 1.5x"
    )

    inputs = w5_inputs()
    ours = best_of(3, lambda: w5_ours(inputs, stamp=False))
    bare = best_of(3, lambda: bare_validate(inputs))
    print(
        f"W5 validate {W5_COUNT:,} event dicts (5 types, limits checked, no timestamp "
        f"stamping): {W5_COUNT / ours:>10,.0f} events/s vs bare TypeAdapter "
        f"{W5_COUNT / bare:,.0f}/s -> cost {ours / bare:.2f}x the floor; target <= 1.5x"
    )
    stamped = best_of(3, lambda: w5_ours(inputs))
    print(
        f"   with the push timestamp stamped as well: {W5_COUNT / stamped:,.0f} events/s, "
        f"{stamped / bare:.2f}x the floor"
    )


if __name__ == "__main__":
    main()
