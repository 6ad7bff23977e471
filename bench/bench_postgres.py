"""PostgreSQL adapter benchmark: EventStore + adapter next to raw psycopg and raw asyncpg.

Run ``python -m bench.bench_postgres [--dsn postgresql://...] [--scale 0.2] [--batches 10]``.
Each workload runs in one process, in a private schema (dropped at the end), three ways:
through the library (validation, EventStore, PostgresEventStorageAdapter on its own pool),
with raw psycopg (a pool of autocommit connections, the library's exact SQL, parameters built
by hand) and with raw asyncpg (one held connection per writer, the same SQL). The contenders
run in interleaved batches so that a machine whose load changes during the run slows them
alike. Printed: events/s, p50/p99 latency per operation, client CPU per event, and the ratio
library / raw driver; the best raw driver is the bar. asyncpg comes with the ``bench`` extra;
without it, its contenders are left out (raw psycopg remains) and the run says so.

W1  5,000 new aggregates, then one more event each: 10,000 single appends, each its own
    committed transaction with the version check (the unique key).
W2  2,000 groups of two events on two aggregates of two stores, each one transaction.
W3  Read one aggregate of 10,000 events (get_events, and get_aggregate which also folds);
    load 1,000 aggregates of 10 events one by one. The library validates every event; the
    raw floors fetch the same JSON text and stop there (or ``json.loads`` it).
W4  8 writers (one connection each) race read-then-append-with-retry on one aggregate until
    2,000 appends succeeded; each writer only reads the events after the last one it knows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from bench._accounts import make_store, moved, opened
from castore_pydantic import EventAlreadyExistsError, EventStore
from castore_pydantic.storage.postgres import PostgresEventStorageAdapter

try:
    import asyncpg  # type: ignore[import-untyped]
except ImportError:  # not a test dependency: the suite runs this benchmark without it
    asyncpg = None

# -- raw rows (what the library sends, built by hand) ----------------------------------------


def raw_now() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond - now.microsecond % 1000)


def raw_opened(store_id: str, aggregate_id: str, now: datetime) -> tuple[Any, ...]:
    payload = json.dumps({"owner": f"owner {aggregate_id}", "currency": "EUR"})
    return (store_id, aggregate_id, 1, "ACCOUNT_OPENED", payload, None, now)


def raw_moved(aggregate_id: str, version: int, now: datetime) -> tuple[Any, ...]:
    payload = json.dumps({"amount": version, "reference": f"ref-{version}"})
    return ("ACCOUNTS", aggregate_id, version, "MONEY_MOVED", payload, None, now)


def dollar(query: str) -> str:
    """psycopg's ``%s`` placeholders as asyncpg's ``$n``."""
    counter = iter(range(1, 10_000))
    return re.sub(r"%s", lambda _: f"${next(counter)}", query)


@dataclass
class Sql:
    """The library's statements for the benchmark table, for the raw drivers."""

    insert: str
    group2: str
    whole: str  # one aggregate as one JSON array; parameters: store, id, limit (NULL)
    first: str  # what get_events sends first; parameters: store, id, limit (1000)
    since: str  # catch-up read; parameters: store, id, min version, limit (1000)

    @classmethod
    def of(cls, adapter: PostgresEventStorageAdapter) -> Sql:
        statements = adapter._sql
        return cls(
            insert=statements.insert,
            group2=statements.write_group([(statements, 2)], force=False),
            whole=statements.get_events(min_version=False, max_version=False, reverse=False),
            first=statements.first_events(min_version=False, max_version=False),
            since=statements.first_events(min_version=True, max_version=False),
        )


# -- measuring ---------------------------------------------------------------------------------
#
# The contenders of a workload run in interleaved batches (ours, raw asyncpg, raw psycopg,
# then again in another order, ...), so that a machine whose load or disk latency changes
# during the run slows all of them alike. Client CPU per event (``time.process_time``) is
# printed too: it is what the library adds, and it barely depends on the machine's load.

#: Runs one batch of a workload for one contender, timing each operation.
Batch = Callable[[int, "Timer"], Awaitable[None]]


class Timer:
    def __init__(self) -> None:
        self.latencies: list[int] = []

    @contextmanager
    def op(self) -> Iterator[None]:
        start = time.perf_counter_ns()
        yield
        self.latencies.append(time.perf_counter_ns() - start)


@dataclass
class Result:
    label: str
    count: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    timer: Timer = field(default_factory=Timer)

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def line(self) -> str:
        lat = sorted(self.timer.latencies)
        p50 = statistics.median(lat) / 1000 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000 if lat else float("nan")
        cpu = self.cpu_seconds / self.count * 1e6
        return (
            f"  {self.label:<30} {self.rate:>9,.0f} events/s  p50 {p50:>8.1f} us"
            f"  p99 {p99:>8.1f} us  client CPU {cpu:>6.1f} us/event"
        )


async def interleave(
    contenders: dict[str, Batch], batches: int, events_per_batch: int
) -> dict[str, Result]:
    """Run every contender's batches in turn, rotating who goes first."""
    if asyncpg is None:
        contenders = {k: v for k, v in contenders.items() if "asyncpg" not in k}
    results = {label: Result(label, batches * events_per_batch) for label in contenders}
    labels = list(contenders)
    for batch in range(batches):
        shift = batch % len(labels)
        for label in labels[shift:] + labels[:shift]:
            result = results[label]
            start, cpu = time.perf_counter(), time.process_time()
            await contenders[label](batch, result.timer)
            result.seconds += time.perf_counter() - start
            result.cpu_seconds += time.process_time() - cpu
    return results


RATIOS: list[tuple[str, float, float]] = []
OURS = "EventStore + adapter"


def report(name: str, results: dict[str, Result], ours: str = OURS) -> None:
    mine = results[ours]
    print(mine.line())
    floors = [r for label, r in results.items() if label != ours]
    for floor in floors:
        print(floor.line())
        print(f"  {'':<30} ratio ours/{floor.label}: {mine.rate / floor.rate:.2f}x")
    drivers = [r for r in floors if "json.loads" not in r.label] or floors
    best = max(drivers, key=lambda r: r.rate)
    cpu = (mine.cpu_seconds - best.cpu_seconds) / mine.count * 1e6
    RATIOS.append((f"{name} vs best raw ({best.label})", mine.rate / best.rate, cpu))


# -- workloads ---------------------------------------------------------------------------------


class Bench:
    """One schema per run; a fresh table per workload and contender."""

    def __init__(self, dsn: str, scale: float, batches: int) -> None:
        self.dsn = dsn
        self.scale = scale
        self.batches = batches
        self.schema = f"castore_bench_{uuid.uuid4().hex[:8]}"

    async def adapter(self, stack: AsyncExitStack, **options: Any) -> PostgresEventStorageAdapter:
        table = f"ev_{uuid.uuid4().hex[:8]}"
        adapter = await stack.enter_async_context(
            PostgresEventStorageAdapter(self.dsn, schema=self.schema, table_name=table, **options)
        )
        await adapter.create_event_table()
        return adapter

    async def psycopg_pool(self, stack: AsyncExitStack, size: int = 1) -> AsyncConnectionPool[Any]:
        pool: AsyncConnectionPool[Any] = await stack.enter_async_context(
            AsyncConnectionPool(
                self.dsn, min_size=size, max_size=size, kwargs={"autocommit": True}, open=False
            )
        )
        await pool.wait()
        return pool

    async def asyncpg_connection(self, stack: AsyncExitStack) -> Any:
        """A connection of raw asyncpg's contenders (``None`` without asyncpg: never used)."""
        if asyncpg is None:
            return None
        conn = await asyncpg.connect(self.dsn)
        stack.push_async_callback(conn.close)
        return conn

    async def drop(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
            )

    def sizes(self, total: int) -> tuple[int, int]:
        """Batches and items per batch for ``total`` items (scaled)."""
        per_batch = max(1, int(total * self.scale) // self.batches)
        return self.batches, per_batch

    # -- W1 ------------------------------------------------------------------------------------

    async def w1(self) -> None:
        batches, per = self.sizes(5000)
        n = batches * per
        print(f"W1  {n:,} new aggregates then one more event each ({2 * n:,} single appends)")
        async with AsyncExitStack() as stack:
            store = make_store(await self.adapter(stack))
            pool = await self.psycopg_pool(stack)
            psycopg_insert = Sql.of(await self.adapter(stack)).insert
            apg = await self.asyncpg_connection(stack)
            apg_insert = dollar(Sql.of(await self.adapter(stack)).insert)

            def ids(batch: int) -> range:
                return range(batch * per, (batch + 1) * per)

            async def ours(batch: int, timer: Timer) -> None:
                for i in ids(batch):
                    event = opened(f"acc-{i}")
                    with timer.op():
                        await store.push_event(event)

            async def ours_more(batch: int, timer: Timer) -> None:
                for i in ids(batch):
                    event = moved(f"acc-{i}", 2)
                    with timer.op():
                        await store.push_event(event)

            async def raw_psycopg(batch: int, timer: Timer) -> None:
                for i in ids(batch):
                    with timer.op():
                        params = raw_opened("ACCOUNTS", f"acc-{i}", raw_now())
                        async with pool.connection() as conn:
                            await conn.execute(psycopg_insert, params)

            async def raw_psycopg_more(batch: int, timer: Timer) -> None:
                for i in ids(batch):
                    with timer.op():
                        params = raw_moved(f"acc-{i}", 2, raw_now())
                        async with pool.connection() as conn:
                            await conn.execute(psycopg_insert, params)

            async def raw_asyncpg(batch: int, timer: Timer) -> None:
                for i in ids(batch):
                    with timer.op():
                        await apg.execute(
                            apg_insert, *raw_opened("ACCOUNTS", f"acc-{i}", raw_now())
                        )

            async def raw_asyncpg_more(batch: int, timer: Timer) -> None:
                for i in ids(batch):
                    with timer.op():
                        await apg.execute(apg_insert, *raw_moved(f"acc-{i}", 2, raw_now()))

            first = await interleave(
                {OURS: ours, "raw asyncpg": raw_asyncpg, "raw psycopg": raw_psycopg}, batches, per
            )
            second = await interleave(
                {OURS: ours_more, "raw asyncpg": raw_asyncpg_more, "raw psycopg": raw_psycopg_more},
                batches,
                per,
            )
            for label, result in first.items():
                result.count *= 2
                result.seconds += second[label].seconds
                result.cpu_seconds += second[label].cpu_seconds
                result.timer.latencies += second[label].timer.latencies
            report("W1", first)

    # -- W2 ------------------------------------------------------------------------------------

    async def w2(self) -> None:
        batches, per = self.sizes(2000)
        n = batches * per
        print(f"W2  {n:,} two-aggregate groups over two stores ({2 * n:,} events)")
        async with AsyncExitStack() as stack:
            adapter = await self.adapter(stack)
            accounts, ledgers = make_store(adapter), make_store(adapter, "LEDGERS")
            pool = await self.psycopg_pool(stack)
            psycopg_group = Sql.of(await self.adapter(stack)).group2
            apg = await self.asyncpg_connection(stack)
            apg_group = dollar(Sql.of(await self.adapter(stack)).group2)

            def params(i: int) -> list[Any]:
                now = raw_now()
                return [
                    *raw_opened("ACCOUNTS", f"acc-{i}", now),
                    *raw_opened("LEDGERS", f"led-{i}", now),
                ]

            async def ours(batch: int, timer: Timer) -> None:
                for i in range(batch * per, (batch + 1) * per):
                    first = accounts.group_event(opened(f"acc-{i}"))
                    second = ledgers.group_event(opened(f"led-{i}"))
                    with timer.op():
                        await EventStore.push_event_group(first, second)

            async def raw_psycopg(batch: int, timer: Timer) -> None:
                for i in range(batch * per, (batch + 1) * per):
                    with timer.op():
                        values = params(i)
                        async with pool.connection() as conn:
                            await conn.execute(psycopg_group, values)

            async def raw_asyncpg(batch: int, timer: Timer) -> None:
                for i in range(batch * per, (batch + 1) * per):
                    with timer.op():
                        await apg.execute(apg_group, *params(i))

            results = await interleave(
                {OURS: ours, "raw asyncpg": raw_asyncpg, "raw psycopg": raw_psycopg},
                batches,
                2 * per,
            )
            report("W2", results)

    # -- W3 ------------------------------------------------------------------------------------

    async def w3(self) -> None:
        big, many = int(10_000 * self.scale), int(1000 * self.scale)
        rounds = max(self.batches, 5)
        async with AsyncExitStack() as stack:
            adapter = await self.adapter(stack)
            store = make_store(adapter)
            await EventStore.push_event_group(
                store.group_event(opened("big")),
                *(store.group_event(moved("big", v)) for v in range(2, big + 1)),
            )
            for i in range(many):
                await EventStore.push_event_group(
                    store.group_event(opened(f"acc-{i}")),
                    *(store.group_event(moved(f"acc-{i}", v)) for v in range(2, 11)),
                )
            pool = await self.psycopg_pool(stack)
            statements = Sql.of(adapter)
            whole, first = statements.whole, statements.first
            apg = await self.asyncpg_connection(stack)
            apg_whole, apg_first = dollar(whole), dollar(first)

            print(f"W3a read one aggregate of {big:,} events ({rounds} rounds)")

            async def read(batch: int, timer: Timer) -> None:
                with timer.op():
                    events = (await store.get_events("big")).events
                assert len(events) == big

            async def fold(batch: int, timer: Timer) -> None:
                with timer.op():
                    result = await store.get_aggregate("big")
                assert result.aggregate is not None
                assert result.aggregate.version == big

            async def text_psycopg(batch: int, timer: Timer) -> None:
                with timer.op():
                    async with pool.connection() as conn:
                        cursor = await conn.execute(whole, ("ACCOUNTS", "big", None))
                        row = await cursor.fetchone()
                assert row is not None
                assert row[0] is not None

            async def text_asyncpg(batch: int, timer: Timer) -> None:
                with timer.op():
                    text = await apg.fetchval(apg_whole, "ACCOUNTS", "big", None)
                assert text is not None

            async def json_asyncpg(batch: int, timer: Timer) -> None:
                with timer.op():
                    rows = json.loads(await apg.fetchval(apg_whole, "ACCOUNTS", "big", None))
                assert len(rows) == big

            results = await interleave(
                {
                    OURS: read,
                    "get_aggregate (+ fold)": fold,
                    "raw asyncpg (JSON text)": text_asyncpg,
                    "raw psycopg (JSON text)": text_psycopg,
                    "raw asyncpg + json.loads": json_asyncpg,
                },
                rounds,
                big,
            )
            fold_result = results.pop("get_aggregate (+ fold)")
            report("W3a get_events", results)
            print(fold_result.line())
            # The target is Castore 2.4.2's unvalidated read as measured for the issue, when
            # raw asyncpg fetched the same JSON text at 289,000 events/s. Machines differ (a
            # slower CPU or a loaded host): the same share of this run's raw fetch is shown too.
            target, its_raw = 166_000, 289_000
            raw = results.get("raw asyncpg (JSON text)")
            for label, result in ((OURS, results[OURS]), ("get_aggregate", fold_result)):
                verdict = "meets" if result.rate >= target else "misses"
                print(f"  {label} {verdict} the {target:,} events/s target ({result.rate:,.0f})")
                if raw is None:
                    continue
                scaled = target * raw.rate / its_raw
                verdict = "meets" if result.rate >= scaled else "misses"
                print(
                    f"  {label} {verdict} it scaled to this run's raw asyncpg fetch"
                    f" ({target / its_raw:.2f}x of it: {scaled:,.0f})"
                )

            print(f"W3b load {many:,} aggregates of 10 events one by one")
            per = max(1, many // self.batches)

            async def load(batch: int, timer: Timer) -> None:
                for i in range(batch * per, (batch + 1) * per):
                    with timer.op():
                        result = await store.get_aggregate(f"acc-{i}")
                    assert result.aggregate is not None

            async def load_psycopg(batch: int, timer: Timer) -> None:
                for i in range(batch * per, (batch + 1) * per):
                    with timer.op():
                        async with pool.connection() as conn:
                            cursor = await conn.execute(first, ("ACCOUNTS", f"acc-{i}", 1000))
                            row = await cursor.fetchone()
                    assert row is not None

            async def load_asyncpg(batch: int, timer: Timer) -> None:
                for i in range(batch * per, (batch + 1) * per):
                    with timer.op():
                        text = await apg.fetchval(apg_first, "ACCOUNTS", f"acc-{i}", 1000)
                    assert text is not None

            results = await interleave(
                {
                    OURS: load,
                    "raw asyncpg (JSON text)": load_asyncpg,
                    "raw psycopg (JSON text)": load_psycopg,
                },
                self.batches,
                10 * per,
            )
            report("W3b", results)

    # -- W4 ------------------------------------------------------------------------------------

    async def w4(self, writers: int = 8) -> None:
        batches, per = self.sizes(2000)
        print(
            f"W4  {writers} writers race read-then-append on one aggregate"
            f" ({batches * per:,} appends, {per:,} per batch on a fresh aggregate)"
        )
        conflicts = {OURS: 0, "raw asyncpg": 0, "raw psycopg": 0}
        async with AsyncExitStack() as stack:
            adapter = await self.adapter(stack, min_size=writers, max_size=writers)
            stores = [make_store(adapter) for _ in range(writers)]
            pool = await self.psycopg_pool(stack, writers)
            statements = Sql.of(await self.adapter(stack))
            apg_conns = [await self.asyncpg_connection(stack) for _ in range(writers)]
            apg_sql = Sql.of(await self.adapter(stack))
            apg_insert, apg_since = dollar(apg_sql.insert), dollar(apg_sql.since)

            async def race(
                writer: Callable[[str, dict[str, int]], Awaitable[None]], hot: str
            ) -> None:
                state = {"done": 1}
                await asyncio.gather(*(writer(hot, state) for _ in range(writers)))

            async def ours(batch: int, timer: Timer) -> None:
                hot = f"hot-{batch}"
                await stores[0].push_event(opened(hot))
                pending = iter(stores)

                async def writer(hot: str, state: dict[str, int]) -> None:
                    store, known = next(pending), 0
                    while state["done"] < per:
                        with timer.op():
                            while True:
                                new = (await store.get_events(hot, min_version=known + 1)).events
                                known += len(new)
                                try:
                                    await store.push_event(moved(hot, known + 1))
                                except EventAlreadyExistsError:
                                    conflicts[OURS] += 1
                                    continue
                                known += 1
                                break
                        state["done"] += 1

                await race(writer, hot)

            async def raw_psycopg(batch: int, timer: Timer) -> None:
                hot = f"hot-{batch}"
                async with pool.connection() as conn:
                    await conn.execute(statements.insert, raw_opened("ACCOUNTS", hot, raw_now()))

                async def writer(hot: str, state: dict[str, int]) -> None:
                    known = 0
                    while state["done"] < per:
                        with timer.op():
                            while True:
                                async with pool.connection() as conn:
                                    cursor = await conn.execute(
                                        statements.since, ("ACCOUNTS", hot, known + 1, 1000)
                                    )
                                    row = await cursor.fetchone()
                                if row is not None and row[0] is not None:
                                    known = json.loads(row[0])[-1]["version"]
                                try:
                                    async with pool.connection() as conn:
                                        await conn.execute(
                                            statements.insert, raw_moved(hot, known + 1, raw_now())
                                        )
                                except psycopg.errors.UniqueViolation:
                                    conflicts["raw psycopg"] += 1
                                    continue
                                known += 1
                                break
                        state["done"] += 1

                await race(writer, hot)

            async def raw_asyncpg(batch: int, timer: Timer) -> None:
                hot = f"hot-{batch}"
                await apg_conns[0].execute(apg_insert, *raw_opened("ACCOUNTS", hot, raw_now()))
                pending = iter(apg_conns)

                async def writer(hot: str, state: dict[str, int]) -> None:
                    conn, known = next(pending), 0
                    while state["done"] < per:
                        with timer.op():
                            while True:
                                text = await conn.fetchval(
                                    apg_since, "ACCOUNTS", hot, known + 1, 1000
                                )
                                if text is not None:
                                    known = json.loads(text)[-1]["version"]
                                try:
                                    values = raw_moved(hot, known + 1, raw_now())
                                    await conn.execute(apg_insert, *values)
                                except asyncpg.UniqueViolationError:
                                    conflicts["raw asyncpg"] += 1
                                    continue
                                known += 1
                                break
                        state["done"] += 1

                await race(writer, hot)

            results = await interleave(
                {OURS: ours, "raw asyncpg": raw_asyncpg, "raw psycopg": raw_psycopg}, batches, per
            )
            counts = [f"{k} {conflicts[k]:,}" for k in results]
            print("  conflicts retried: " + ", ".join(counts))
            report("W4", results)


async def main(dsn: str, scale: float, batches: int, workloads: list[str]) -> None:
    bench = Bench(dsn, scale, batches)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute("SHOW server_version")
        row = await cursor.fetchone()
    print(
        f"PostgreSQL {row[0] if row else '?'}, psycopg {psycopg.__version__}, "
        f"asyncpg {asyncpg.__version__ if asyncpg else 'not installed (left out)'}, "
        f"scale={scale}, {batches} interleaved batches, "
        f"schema {bench.schema}"
    )
    try:
        for name in workloads:
            await getattr(bench, name)()
    finally:
        await bench.drop()
    print("Summary: library throughput / best raw driver (targets W1, W2, W4 >= 0.90),")
    print("and the client CPU the library adds per event:")
    for label, ratio, cpu in RATIOS:
        print(f"  {label:<52} {ratio:5.2f}x   {cpu:+7.1f} us/event")


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("CASTORE_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply workload sizes")
    parser.add_argument("--batches", type=int, default=10, help="interleaved batches per workload")
    parser.add_argument(
        "--only", nargs="*", choices=["w1", "w2", "w3", "w4"], default=["w1", "w2", "w3", "w4"]
    )
    args = parser.parse_args(argv)
    asyncio.run(main(args.dsn, args.scale, args.batches, args.only))


if __name__ == "__main__":
    cli()
