"""dam benchmark: pour a large store chronologically and measure peak memory.

Run ``python -m bench.bench_dam [--aggregates 10000] [--versions 10]``. A SQLite file is
seeded with ``aggregates x versions`` events (100,000 by default) whose timestamps interleave
every aggregate across the whole history: the worst case for a chronological pour, since all
aggregates are "open" at once. Then, each in a fresh process so that peak RSS belongs to it
alone:

baseline  open the store and list one page (what every run pays before pouring)
pour      ``pour_event_store_events`` into a channel that counts and checks the order
naive     the floor that holds everything: read every aggregate's events, sort them all,
          then publish in order (what a pour without bounded memory amounts to)

It prints peak RSS above the baseline and time for both, and the pour/naive ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from castore_pydantic import Aggregate, Event, EventStore
from castore_pydantic.dam import pour_event_store_events
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter

BASE = datetime(2024, 1, 1, tzinfo=UTC)
GROUP_SIZE = 1_000


class Appeared(BaseModel):
    name: str
    level: int


class PokemonAppeared(Event):
    type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARED"
    payload: Appeared


class Trained(BaseModel):
    move: str
    levels: int


class PokemonTrained(Event):
    type: Literal["POKEMON_TRAINED"] = "POKEMON_TRAINED"
    payload: Trained
    metadata: dict[str, str] | None = None


class Pokemon(Aggregate):
    level: int


def reduce(pokemon: Pokemon | None, event: PokemonAppeared | PokemonTrained) -> Pokemon:
    if isinstance(event, PokemonAppeared):
        return Pokemon(aggregate_id=event.aggregate_id, version=1, level=event.payload.level)
    assert pokemon is not None
    level = pokemon.level + event.payload.levels
    return pokemon.model_copy(update={"version": event.version, "level": level})


def make_store(path: Path) -> EventStore[Pokemon, PokemonAppeared | PokemonTrained]:
    return EventStore(
        event_store_id="POKEMONS",
        event_types=[PokemonAppeared, PokemonTrained],
        reducer=reduce,
        event_storage_adapter=SQLiteEventStorageAdapter(path),
    )


def make_event(index: int, version: int, aggregates: int) -> PokemonAppeared | PokemonTrained:
    # Version v of every aggregate comes before version v + 1 of any: all stay open.
    ts = BASE + timedelta(milliseconds=version * aggregates + index)
    aggregate_id = f"pokemon-{index:06}"
    if version == 1:
        payload = Appeared(name=f"Pokemon number {index}", level=1 + index % 50)
        return PokemonAppeared(aggregate_id=aggregate_id, version=1, timestamp=ts, payload=payload)
    return PokemonTrained(
        aggregate_id=aggregate_id,
        version=version,
        timestamp=ts,
        payload=Trained(move=f"move-{version}-{index % 97}", levels=1),
        metadata={"trainer": f"trainer-{index % 13}", "region": "kanto"},
    )


async def seed(path: Path, aggregates: int, versions: int) -> None:
    store = make_store(path)
    adapter = store.get_event_storage_adapter()
    batch: list[Any] = []
    for version in range(1, versions + 1):
        for index in range(aggregates):
            batch.append(store.group_event(make_event(index, version, aggregates)))
            if len(batch) == GROUP_SIZE:
                await EventStore.push_event_group(*batch)
                batch = []
    if batch:
        await EventStore.push_event_group(*batch)
    await adapter.aclose()


class CountingChannel:
    """Counts messages and checks that timestamps never go backwards."""

    def __init__(self) -> None:
        self.count = 0
        self.last: datetime | None = None

    async def publish_message(self, message: Any, *, replay: bool = False) -> None:
        ts = message.event.timestamp
        if self.last is not None and ts < self.last:
            raise AssertionError(f"out of order: {ts} after {self.last}")
        self.last = ts
        self.count += 1


async def child(mode: str, path: Path) -> dict[str, Any]:
    store = make_store(path)
    channel = CountingChannel()
    start = time.perf_counter()
    if mode == "baseline":
        await store.list_aggregate_ids(limit=100)
    elif mode == "pour":
        await pour_event_store_events(event_store=store, message_channel=channel)
    elif mode == "naive":
        everything: list[Event] = []
        token = None
        while True:
            page = await store.list_aggregate_ids(limit=1_000, page_token=token)
            for entry in page.aggregate_ids:
                everything.extend((await store.get_events(entry.aggregate_id)).events)
            token = page.next_page_token
            if token is None:
                break
        everything.sort(key=lambda e: (e.timestamp, e.aggregate_id, e.version))
        for event in everything:
            await channel.publish_message(_Message(event))
    seconds = time.perf_counter() - start
    await store.get_event_storage_adapter().aclose()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"mode": mode, "seconds": seconds, "count": channel.count, "peak_kb": peak_kb}


class _Message:
    __slots__ = ("event",)

    def __init__(self, event: Event) -> None:
        self.event = event


def run_child(mode: str, path: Path) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.bench_dam", "--child", mode, "--db", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aggregates", type=int, default=10_000)
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--child", choices=("baseline", "pour", "naive"))
    parser.add_argument("--db", type=Path)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.child, args.db))))
        return

    total = args.aggregates * args.versions
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.db"
        started = time.perf_counter()
        asyncio.run(seed(path, args.aggregates, args.versions))
        print(
            f"seeded {total:,} events on {args.aggregates:,} aggregates "
            f"in {time.perf_counter() - started:.1f} s"
        )
        results = {mode: run_child(mode, path) for mode in ("baseline", "pour", "naive")}
    base_mb = results["baseline"]["peak_kb"] / 1024
    print(
        f"{'mode':<9} {'events':>9} {'seconds':>8} {'events/s':>10} {'peak RSS':>10} {'+ base':>9}"
    )
    for mode in ("baseline", "pour", "naive"):
        r = results[mode]
        rate = r["count"] / r["seconds"] if r["count"] else 0.0
        mb = r["peak_kb"] / 1024
        print(
            f"{mode:<9} {r['count']:>9,} {r['seconds']:>8.2f} {rate:>10,.0f} "
            f"{mb:>8.1f}MB {mb - base_mb:>7.1f}MB"
        )
    for mode in ("pour", "naive"):
        if results[mode]["count"] != total:
            raise SystemExit(f"{mode} poured {results[mode]['count']} events, expected {total}")
    pour_extra = results["pour"]["peak_kb"] / 1024 - base_mb
    naive_extra = results["naive"]["peak_kb"] / 1024 - base_mb
    # A small store may not lift the naive read's peak above the baseline at all.
    memory = f"{pour_extra / naive_extra:.2f}x" if naive_extra > 0 else "n/a (no growth)"
    print(
        f"pour/naive: memory above baseline {memory}, "
        f"time {results['pour']['seconds'] / results['naive']['seconds']:.2f}x"
    )


if __name__ == "__main__":
    main()
