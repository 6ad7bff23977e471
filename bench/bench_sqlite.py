"""SQLite adapter benchmark: EventStore + SQLiteEventStorageAdapter next to raw ``sqlite3``.

Run ``python -m bench.bench_sqlite [--synchronous FULL] [--scale 0.2]``. Every workload runs
twice in the same process on fresh database files with the same durability setting: once
through the library (validation, EventStore, adapter) and once as raw ``sqlite3`` calls doing
the same SQL work by hand. The ratio is library throughput / raw throughput. The writes of W1
and W2 run in interleaved batches (library, raw, raw, library, ...), so that a machine whose
load drifts during the run slows both alike.

W1  5,000 new aggregates, then one more event each: 10,000 single appends, each its own
    committed transaction with the version check (the unique key).
W2  2,000 groups of two events on two aggregates, each one ``BEGIN IMMEDIATE`` transaction.
W3  Read: fold one aggregate of 10,000 events; load 1,000 aggregates of 10 events one by one.
    The raw floor fetches the rows without validation (tuples, JSON left as text), and a
    second floor also decodes the payloads with ``json.loads``. ``get_events`` is the fetch
    to hold against them; ``get_aggregate`` adds the benchmark's own reducer (a
    ``model_copy`` per event), which the floors do not run.
W4  8 writers (tasks, one connection each) race read-then-append-with-retry on one aggregate
    until 2,000 appends succeeded; each writer yields to the loop between read and append.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench._accounts import Account, AccountOpened, MoneyMoved, make_store, moved, opened
from castore_pydantic import EventAlreadyExistsError, EventStore
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter, Synchronous

# -- raw sqlite3 -------------------------------------------------------------------------------

RAW_INSERT = (
    "INSERT INTO event (aggregate_name, aggregate_id, version, type, data, metadata, timestamp)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
RAW_SELECT = (
    "SELECT aggregate_id, version, type, data, metadata, timestamp FROM event"
    " WHERE aggregate_name = ? AND aggregate_id = ? ORDER BY version"
)
RAW_LAST = (
    "SELECT version FROM event WHERE aggregate_name = ? AND aggregate_id = ?"
    " ORDER BY version DESC LIMIT 1"
)


def raw_now() -> str:
    now = datetime.now(UTC)
    return now.isoformat(timespec="milliseconds")[:-6] + "Z"


async def raw_connect(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    # The adapter creates the schema: the raw side uses exactly the same table and indexes.
    async with SQLiteEventStorageAdapter(path, synchronous=synchronous):
        pass
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    count: int
    seconds: float
    latencies_ns: list[int]

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def line(self) -> str:
        lat = sorted(self.latencies_ns)
        p50 = statistics.median(lat) / 1000 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000 if lat else float("nan")
        return (
            f"  {self.label:<34} {self.rate:>12,.0f} events/s   p50 {p50:>9.1f} us"
            f"   p99 {p99:>9.1f} us"
        )


def compare(ours: Result, *floors: Result) -> None:
    """Print the throughput ratio, and the ratio of median latencies beside it.

    Throughput sums every operation, so with few long ones (W3a) a single garbage collection
    pause on either side moves it; the median shows what a typical operation costs.
    """
    print(ours.line())
    for floor in floors:
        print(floor.line())
        typical = statistics.median(floor.latencies_ns) / statistics.median(ours.latencies_ns)
        print(
            f"  {'':<34} ratio ours/{floor.label}: {ours.rate / floor.rate:.2f}x"
            f" (at the median: {typical:.2f}x)"
        )


class Timer:
    def __init__(self) -> None:
        self.latencies: list[int] = []

    @contextmanager
    def op(self) -> Iterator[None]:
        start = time.perf_counter_ns()
        yield
        self.latencies.append(time.perf_counter_ns() - start)


BATCHES = 10


async def interleaved(
    contenders: dict[str, Callable[[range, Timer], Awaitable[None]]], n: int, per_item: int
) -> dict[str, Result]:
    """Run each contender's share of ``range(n)`` in ``BATCHES`` batches, taking turns.

    The contenders alternate batch by batch (the one going first rotates), so that a machine
    whose load or disk latency drifts during the run slows them alike.
    """
    results = {label: Result(label, n * per_item, 0.0, []) for label in contenders}
    timers = {label: Timer() for label in contenders}
    labels = list(contenders)
    size = max(1, n // BATCHES)
    for batch, start in enumerate(range(0, n, size)):
        items = range(start, min(n, start + size))
        shift = batch % len(labels)
        for label in labels[shift:] + labels[:shift]:
            began = time.perf_counter()
            await contenders[label](items, timers[label])
            results[label].seconds += time.perf_counter() - began
    for label, result in results.items():
        result.latencies_ns = timers[label].latencies
    return results


async def timed_async(label: str, count: int, body: Callable[[Timer], Awaitable[None]]) -> Result:
    timer = Timer()
    start = time.perf_counter()
    await body(timer)
    return Result(label, count, time.perf_counter() - start, timer.latencies)


# -- workloads ---------------------------------------------------------------------------------


async def w1(tmp: Path, synchronous: Synchronous, n: int) -> None:
    print(f"W1  {n:,} new aggregates then one more event each ({2 * n:,} single appends)")
    conn = await raw_connect(tmp / "w1-raw.db", synchronous)
    async with SQLiteEventStorageAdapter(tmp / "w1.db", synchronous=synchronous) as adapter:
        store = make_store(adapter)

        async def ours(items: range, timer: Timer) -> None:
            for i in items:
                event = opened(f"acc-{i}")
                with timer.op():
                    await store.push_event(event)
            for i in items:
                more = moved(f"acc-{i}", 2)
                with timer.op():
                    await store.push_event(more)

        async def raw(items: range, timer: Timer) -> None:
            for i in items:
                aggregate_id = f"acc-{i}"
                with timer.op():
                    conn.execute(
                        RAW_INSERT,
                        (
                            "ACCOUNTS",
                            aggregate_id,
                            1,
                            "ACCOUNT_OPENED",
                            json.dumps({"owner": f"owner {aggregate_id}", "currency": "EUR"}),
                            None,
                            raw_now(),
                        ),
                    )
            for i in items:
                with timer.op():
                    conn.execute(
                        RAW_INSERT,
                        (
                            "ACCOUNTS",
                            f"acc-{i}",
                            2,
                            "MONEY_MOVED",
                            json.dumps({"amount": 2, "reference": "ref-2"}),
                            None,
                            raw_now(),
                        ),
                    )

        results = await interleaved({"EventStore + adapter": ours, "raw sqlite3": raw}, n, 2)
    conn.close()
    compare(results["EventStore + adapter"], results["raw sqlite3"])


async def w2(tmp: Path, synchronous: Synchronous, n: int) -> None:
    print(f"W2  {n:,} two-aggregate groups ({2 * n:,} events)")
    conn = await raw_connect(tmp / "w2-raw.db", synchronous)
    async with SQLiteEventStorageAdapter(tmp / "w2.db", synchronous=synchronous) as adapter:
        accounts = make_store(adapter)
        ledgers = make_store(adapter, "LEDGERS")

        async def ours(items: range, timer: Timer) -> None:
            for i in items:
                first = accounts.group_event(opened(f"acc-{i}"))
                second = ledgers.group_event(opened(f"led-{i}"))
                with timer.op():
                    await EventStore.push_event_group(first, second)

        async def raw(items: range, timer: Timer) -> None:
            for i in items:
                with timer.op():
                    now = raw_now()
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        for store_id, aggregate_id in (
                            ("ACCOUNTS", f"acc-{i}"),
                            ("LEDGERS", f"led-{i}"),
                        ):
                            conn.execute(
                                RAW_INSERT,
                                (
                                    store_id,
                                    aggregate_id,
                                    1,
                                    "ACCOUNT_OPENED",
                                    json.dumps(
                                        {"owner": f"owner {aggregate_id}", "currency": "EUR"}
                                    ),
                                    None,
                                    now,
                                ),
                            )
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise

        results = await interleaved({"EventStore + adapter": ours, "raw sqlite3": raw}, n, 2)
    conn.close()
    compare(results["EventStore + adapter"], results["raw sqlite3"])


async def w3(tmp: Path, synchronous: Synchronous, big: int, many: int, rounds: int) -> None:
    path = tmp / "w3.db"
    async with SQLiteEventStorageAdapter(path, synchronous=synchronous) as adapter:
        store = make_store(adapter)
        groups = [store.group_event(opened("big"))]
        groups += [store.group_event(moved("big", v)) for v in range(2, big + 1)]
        await EventStore.push_event_group(*groups)
        for i in range(many):
            await EventStore.push_event_group(
                store.group_event(opened(f"acc-{i}")),
                *(store.group_event(moved(f"acc-{i}", v)) for v in range(2, 11)),
            )
        conn = sqlite3.connect(path, isolation_level=None)

        print(f"W3a fold one aggregate of {big:,} events ({rounds} rounds)")

        async def fold(items: range, timer: Timer) -> None:
            for _ in items:
                with timer.op():
                    result = await store.get_aggregate("big")
                assert result.aggregate is not None
                assert result.aggregate.version == big

        async def read(items: range, timer: Timer) -> None:
            for _ in items:
                with timer.op():
                    events = (await store.get_events("big")).events
                assert len(events) == big

        async def raw_rows(items: range, timer: Timer) -> None:
            for _ in items:
                with timer.op():
                    rows = conn.execute(RAW_SELECT, ("ACCOUNTS", "big")).fetchall()
                assert len(rows) == big

        async def raw_decoded(items: range, timer: Timer) -> None:
            for _ in items:
                with timer.op():
                    rows = [
                        (r[0], r[1], r[2], json.loads(r[3]), r[4] and json.loads(r[4]), r[5])
                        for r in conn.execute(RAW_SELECT, ("ACCOUNTS", "big"))
                    ]
                assert len(rows) == big

        async def rows_then_parse(items: range, timer: Timer) -> None:
            # The other read path the adapter could take: rows, then validate mappings.
            for _ in items:
                with timer.op():
                    events = store.context.parse_events(
                        {
                            "aggregateId": r[0],
                            "version": r[1],
                            "type": r[2],
                            "payload": None if r[3] is None else json.loads(r[3]),
                            "metadata": None if r[4] is None else json.loads(r[4]),
                            "timestamp": r[5],
                        }
                        for r in conn.execute(RAW_SELECT, ("ACCOUNTS", "big"))
                    )
                assert len(events) == big

        results = await interleaved(
            {
                "get_events (validated)": read,
                "get_aggregate (validated+fold)": fold,
                "raw rows": raw_rows,
                "raw rows + json.loads": raw_decoded,
                "rows + parse_events": rows_then_parse,
            },
            rounds,
            big,
        )
        floor_rows, floor_json = results["raw rows"], results["raw rows + json.loads"]
        compare(results["get_events (validated)"], floor_rows, floor_json)
        compare(results["get_events (validated)"], results["rows + parse_events"])
        compare(results["get_aggregate (validated+fold)"], floor_rows, floor_json)

        print(f"W3b load {many:,} aggregates of 10 events one by one")

        async def load(items: range, timer: Timer) -> None:
            for i in items:
                with timer.op():
                    result = await store.get_aggregate(f"acc-{i}")
                assert result.aggregate is not None

        async def load_events(items: range, timer: Timer) -> None:
            for i in items:
                with timer.op():
                    events = (await store.get_events(f"acc-{i}")).events
                assert len(events) == 10

        async def load_raw(items: range, timer: Timer) -> None:
            for i in items:
                with timer.op():
                    rows = conn.execute(RAW_SELECT, ("ACCOUNTS", f"acc-{i}")).fetchall()
                assert len(rows) == 10

        async def load_raw_json(items: range, timer: Timer) -> None:
            for i in items:
                with timer.op():
                    rows = [
                        (r[0], r[1], r[2], json.loads(r[3]), r[4] and json.loads(r[4]), r[5])
                        for r in conn.execute(RAW_SELECT, ("ACCOUNTS", f"acc-{i}"))
                    ]
                assert len(rows) == 10

        results = await interleaved(
            {
                "get_events (validated)": load_events,
                "get_aggregate (validated+fold)": load,
                "raw rows": load_raw,
                "raw rows + json.loads": load_raw_json,
            },
            many,
            10,
        )
        floor_rows, floor_json = results["raw rows"], results["raw rows + json.loads"]
        compare(results["get_events (validated)"], floor_rows, floor_json)
        compare(results["get_aggregate (validated+fold)"], floor_rows, floor_json)
        conn.close()


async def w4(tmp: Path, synchronous: Synchronous, target: int, writers: int = 8) -> None:
    print(f"W4  {writers} writers race read-then-append on one aggregate ({target:,} appends)")

    async def ours(timer: Timer) -> None:
        adapters = [
            SQLiteEventStorageAdapter(tmp / "w4.db", synchronous=synchronous)
            for _ in range(writers)
        ]
        stores = [make_store(a) for a in adapters]
        await stores[0].push_event(opened("hot"))
        done = 1
        conflicts = 0

        async def writer(store: EventStore[Account, AccountOpened | MoneyMoved]) -> None:
            nonlocal done, conflicts
            while done < target:
                with timer.op():
                    while True:
                        last = (await store.get_events("hot", reverse=True, limit=1)).events
                        await asyncio.sleep(0)
                        try:
                            await store.push_event(moved("hot", last[0].version + 1))
                            break
                        except EventAlreadyExistsError:
                            conflicts += 1
                done += 1

        await asyncio.gather(*(writer(s) for s in stores))
        for adapter in adapters:
            await adapter.aclose()
        print(f"  (library: {conflicts:,} conflicts retried)")

    await raw_connect(tmp / "w4-raw.db", synchronous)

    async def raw(timer: Timer) -> None:
        conns = [
            sqlite3.connect(tmp / "w4-raw.db", isolation_level=None, timeout=5)
            for _ in range(writers)
        ]
        for conn in conns:
            conn.execute(f"PRAGMA synchronous = {synchronous}")
        conns[0].execute(
            RAW_INSERT,
            (
                "ACCOUNTS",
                "hot",
                1,
                "ACCOUNT_OPENED",
                json.dumps({"owner": "o", "currency": "EUR"}),
                None,
                raw_now(),
            ),
        )
        done = 1
        conflicts = 0

        async def writer(conn: sqlite3.Connection) -> None:
            nonlocal done, conflicts
            while done < target:
                with timer.op():
                    while True:
                        (version,) = conn.execute(RAW_LAST, ("ACCOUNTS", "hot")).fetchone()
                        await asyncio.sleep(0)
                        try:
                            conn.execute(
                                RAW_INSERT,
                                (
                                    "ACCOUNTS",
                                    "hot",
                                    version + 1,
                                    "MONEY_MOVED",
                                    json.dumps({"amount": version + 1, "reference": "r"}),
                                    None,
                                    raw_now(),
                                ),
                            )
                            break
                        except sqlite3.IntegrityError:
                            conflicts += 1
                done += 1

        await asyncio.gather(*(writer(c) for c in conns))
        for conn in conns:
            conn.close()
        print(f"  (raw: {conflicts:,} conflicts retried)")

    result_raw = await timed_async("raw sqlite3", target, raw)
    result_ours = await timed_async("EventStore + adapter", target, ours)
    compare(result_ours, result_raw)


async def main(synchronous: Synchronous, scale: float) -> None:
    print(f"SQLite {sqlite3.sqlite_version}, synchronous={synchronous}, scale={scale}")
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        await w1(tmp, synchronous, int(5000 * scale))
        await w2(tmp, synchronous, int(2000 * scale))
        # Twenty rounds: with five, one collector pause in a floor swung its ratio by half.
        await w3(tmp, synchronous, int(10_000 * scale), int(1000 * scale), rounds=20)
        await w4(tmp, synchronous, int(2000 * scale))


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply workload sizes")
    args = parser.parse_args(argv)
    synchronous: Synchronous = "FULL" if args.synchronous == "FULL" else "NORMAL"
    asyncio.run(main(synchronous, args.scale))


if __name__ == "__main__":
    cli()
