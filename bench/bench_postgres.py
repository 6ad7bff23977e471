"""PostgreSQL adapter benchmark: EventStore + adapter next to raw psycopg and raw asyncpg.

Run ``python -m bench.bench_postgres [--dsn postgresql://...] [--scale 0.2]``. Each workload
runs in the same process, in a private schema, three ways: through the library (validation,
EventStore, PostgresEventStorageAdapter on its own pool), with raw psycopg (a pool of
autocommit connections, the library's exact SQL and parameters built by hand) and with raw
asyncpg (one held connection per writer, the same SQL). Ratios are library throughput / raw
throughput; the best raw driver is the bar.

W1  5,000 new aggregates, then one more event each: 10,000 single appends, each its own
    committed transaction with the version check (the unique key).
W2  2,000 groups of two events on two aggregates of two stores, each one transaction.
W3  Read: fold one aggregate of 10,000 events; load 1,000 aggregates of 10 events one by
    one. The library validates every event; the raw floors fetch the same JSON text and
    stop there (and, second floor, ``json.loads`` it).
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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from castore_pydantic import Aggregate, Event, EventAlreadyExistsError, EventStore
from castore_pydantic.storage.postgres import PostgresEventStorageAdapter

# -- domain -----------------------------------------------------------------------------------


class Opened(BaseModel):
    owner: str
    currency: str


class Moved(BaseModel):
    amount: int
    reference: str


class AccountOpened(Event):
    type: Literal["ACCOUNT_OPENED"] = "ACCOUNT_OPENED"
    payload: Opened


class MoneyMoved(Event):
    type: Literal["MONEY_MOVED"] = "MONEY_MOVED"
    payload: Moved


class Account(Aggregate):
    owner: str
    balance: int


AccountEvent = AccountOpened | MoneyMoved


def reduce_account(account: Account | None, event: AccountEvent) -> Account:
    if isinstance(event, AccountOpened):
        return Account(
            aggregate_id=event.aggregate_id,
            version=event.version,
            owner=event.payload.owner,
            balance=0,
        )
    assert account is not None
    return account.model_copy(
        update={"version": event.version, "balance": account.balance + event.payload.amount}
    )


def make_store(
    adapter: PostgresEventStorageAdapter, store_id: str = "ACCOUNTS"
) -> EventStore[Account, AccountEvent]:
    return EventStore(
        event_store_id=store_id,
        event_types=[AccountOpened, MoneyMoved],
        reducer=reduce_account,
        event_storage_adapter=adapter,
    )


def opened(aggregate_id: str) -> AccountOpened:
    return AccountOpened(
        aggregate_id=aggregate_id,
        version=1,
        payload=Opened(owner=f"owner {aggregate_id}", currency="EUR"),
    )


def moved(aggregate_id: str, version: int) -> MoneyMoved:
    return MoneyMoved(
        aggregate_id=aggregate_id,
        version=version,
        payload=Moved(amount=version, reference=f"ref-{version}"),
    )


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
    events: str
    since: str

    @classmethod
    def of(cls, adapter: PostgresEventStorageAdapter) -> Sql:
        statements = adapter._sql
        return cls(
            insert=statements.insert,
            group2=statements.write_group([(statements, 2)], force=False),
            events=statements.get_events(
                min_version=False, max_version=False, limit=False, reverse=False
            ),
            since=statements.get_events(
                min_version=True, max_version=False, limit=False, reverse=False
            ),
        )


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    count: int
    seconds: float
    cpu_seconds: float
    latencies_ns: list[int]

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def line(self) -> str:
        lat = sorted(self.latencies_ns)
        p50 = statistics.median(lat) / 1000 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000 if lat else float("nan")
        cpu = self.cpu_seconds / self.count * 1e6
        return (
            f"  {self.label:<32} {self.rate:>9,.0f} events/s  p50 {p50:>8.1f} us"
            f"  p99 {p99:>8.1f} us  client CPU {cpu:>6.1f} us/event"
        )


RATIOS: list[tuple[str, float]] = []


def compare(name: str, ours: Result, *floors: Result) -> None:
    print(ours.line())
    for floor in floors:
        print(floor.line())
        print(f"  {'':<32} ratio ours/{floor.label}: {ours.rate / floor.rate:.2f}x")
    best = max(floors, key=lambda r: r.rate)
    RATIOS.append((f"{name} vs best raw ({best.label})", ours.rate / best.rate))


class Timer:
    def __init__(self) -> None:
        self.latencies: list[int] = []

    @contextmanager
    def op(self) -> Iterator[None]:
        start = time.perf_counter_ns()
        yield
        self.latencies.append(time.perf_counter_ns() - start)


async def timed(label: str, count: int, body: Callable[[Timer], Awaitable[None]]) -> Result:
    timer = Timer()
    start, cpu = time.perf_counter(), time.process_time()
    await body(timer)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Result(label, count, elapsed, cpu, timer.latencies)


class Bench:
    """One schema per run; a fresh table per workload and per contender."""

    def __init__(self, dsn: str, scale: float) -> None:
        self.dsn = dsn
        self.scale = scale
        self.schema = f"castore_bench_{uuid.uuid4().hex[:8]}"

    @asynccontextmanager
    async def adapter(self, **options: Any) -> AsyncIterator[PostgresEventStorageAdapter]:
        table = f"ev_{uuid.uuid4().hex[:8]}"
        async with PostgresEventStorageAdapter(
            self.dsn, schema=self.schema, table_name=table, **options
        ) as adapter:
            await adapter.create_event_table()
            yield adapter

    @asynccontextmanager
    async def psycopg_pool(self, size: int = 1) -> AsyncIterator[AsyncConnectionPool[Any]]:
        async with AsyncConnectionPool(
            self.dsn, min_size=size, max_size=size, kwargs={"autocommit": True}, open=False
        ) as pool:
            await pool.wait()
            yield pool

    async def drop(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
            )

    # -- W1 ------------------------------------------------------------------------------------

    async def w1(self) -> None:
        n = int(5000 * self.scale)
        print(f"W1  {n:,} new aggregates then one more event each ({2 * n:,} single appends)")

        async def ours(timer: Timer) -> None:
            async with self.adapter() as adapter:
                store = make_store(adapter)
                for i in range(n):
                    event = opened(f"acc-{i}")
                    with timer.op():
                        await store.push_event(event)
                for i in range(n):
                    event2 = moved(f"acc-{i}", 2)
                    with timer.op():
                        await store.push_event(event2)

        async def raw_psycopg(timer: Timer) -> None:
            async with self.adapter() as adapter, self.psycopg_pool() as pool:
                insert = Sql.of(adapter).insert
                for i in range(n):
                    with timer.op():
                        params = raw_opened("ACCOUNTS", f"acc-{i}", raw_now())
                        async with pool.connection() as conn:
                            await conn.execute(insert, params)
                for i in range(n):
                    with timer.op():
                        params = raw_moved(f"acc-{i}", 2, raw_now())
                        async with pool.connection() as conn:
                            await conn.execute(insert, params)

        async def raw_asyncpg(timer: Timer) -> None:
            async with self.adapter() as adapter:
                insert = dollar(Sql.of(adapter).insert)
                conn = await asyncpg.connect(self.dsn)
                try:
                    for i in range(n):
                        with timer.op():
                            await conn.execute(
                                insert, *raw_opened("ACCOUNTS", f"acc-{i}", raw_now())
                            )
                    for i in range(n):
                        with timer.op():
                            await conn.execute(insert, *raw_moved(f"acc-{i}", 2, raw_now()))
                finally:
                    await conn.close()

        floors = [
            await timed("raw asyncpg", 2 * n, raw_asyncpg),
            await timed("raw psycopg", 2 * n, raw_psycopg),
        ]
        compare("W1", await timed("EventStore + adapter", 2 * n, ours), *floors)

    # -- W2 ------------------------------------------------------------------------------------

    async def w2(self) -> None:
        n = int(2000 * self.scale)
        print(f"W2  {n:,} two-aggregate groups over two stores ({2 * n:,} events)")

        async def ours(timer: Timer) -> None:
            async with self.adapter() as adapter:
                accounts, ledgers = make_store(adapter), make_store(adapter, "LEDGERS")
                for i in range(n):
                    first = accounts.group_event(opened(f"acc-{i}"))
                    second = ledgers.group_event(opened(f"led-{i}"))
                    with timer.op():
                        await EventStore.push_event_group(first, second)

        def group_params(i: int) -> list[Any]:
            now = raw_now()
            return [
                *raw_opened("ACCOUNTS", f"acc-{i}", now),
                *raw_opened("LEDGERS", f"led-{i}", now),
            ]

        async def raw_psycopg(timer: Timer) -> None:
            async with self.adapter() as adapter, self.psycopg_pool() as pool:
                group = Sql.of(adapter).group2
                for i in range(n):
                    with timer.op():
                        params = group_params(i)
                        async with pool.connection() as conn:
                            await conn.execute(group, params)

        async def raw_asyncpg(timer: Timer) -> None:
            async with self.adapter() as adapter:
                group = dollar(Sql.of(adapter).group2)
                conn = await asyncpg.connect(self.dsn)
                try:
                    for i in range(n):
                        with timer.op():
                            await conn.execute(group, *group_params(i))
                finally:
                    await conn.close()

        floors = [
            await timed("raw asyncpg", 2 * n, raw_asyncpg),
            await timed("raw psycopg", 2 * n, raw_psycopg),
        ]
        compare("W2", await timed("EventStore + adapter", 2 * n, ours), *floors)

    # -- W3 ------------------------------------------------------------------------------------

    async def w3(self, rounds: int = 5) -> None:
        big, many = int(10_000 * self.scale), int(1000 * self.scale)
        async with self.adapter() as adapter, self.psycopg_pool() as pool:
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
            events_sql = Sql.of(adapter).events
            apg = await asyncpg.connect(self.dsn)
            apg_sql = dollar(events_sql)

            print(f"W3a fold one aggregate of {big:,} events ({rounds} rounds)")

            async def fold(timer: Timer) -> None:
                for _ in range(rounds):
                    with timer.op():
                        result = await store.get_aggregate("big")
                    assert result.aggregate is not None
                    assert result.aggregate.version == big

            async def read(timer: Timer) -> None:
                for _ in range(rounds):
                    with timer.op():
                        events = (await store.get_events("big")).events
                    assert len(events) == big

            async def raw_text_psycopg(timer: Timer) -> None:
                for _ in range(rounds):
                    with timer.op():
                        async with pool.connection() as conn:
                            cursor = await conn.execute(events_sql, ("ACCOUNTS", "big"))
                            row = await cursor.fetchone()
                    assert row is not None
                    assert row[0] is not None

            async def raw_text_asyncpg(timer: Timer) -> None:
                for _ in range(rounds):
                    with timer.op():
                        text = await apg.fetchval(apg_sql, "ACCOUNTS", "big")
                    assert text is not None

            async def raw_json_asyncpg(timer: Timer) -> None:
                for _ in range(rounds):
                    with timer.op():
                        rows = json.loads(await apg.fetchval(apg_sql, "ACCOUNTS", "big"))
                    assert len(rows) == big

            floors = [
                await timed("raw asyncpg (text)", big * rounds, raw_text_asyncpg),
                await timed("raw psycopg (text)", big * rounds, raw_text_psycopg),
                await timed("raw asyncpg + json.loads", big * rounds, raw_json_asyncpg),
            ]
            ours_read = await timed("get_events (validated)", big * rounds, read)
            ours_fold = await timed("get_aggregate (validated+fold)", big * rounds, fold)
            compare("W3a get_events", ours_read, *floors)
            compare("W3a get_aggregate", ours_fold, *floors)
            target = 166_000
            verdict = "meets" if ours_fold.rate >= target else "MISSES"
            print(f"  target: fold >= {target:,} events/s: {verdict}")

            print(f"W3b load {many:,} aggregates of 10 events one by one")

            async def load(timer: Timer) -> None:
                for i in range(many):
                    with timer.op():
                        result = await store.get_aggregate(f"acc-{i}")
                    assert result.aggregate is not None

            async def load_psycopg(timer: Timer) -> None:
                for i in range(many):
                    with timer.op():
                        async with pool.connection() as conn:
                            cursor = await conn.execute(events_sql, ("ACCOUNTS", f"acc-{i}"))
                            row = await cursor.fetchone()
                    assert row is not None

            async def load_asyncpg(timer: Timer) -> None:
                for i in range(many):
                    with timer.op():
                        text = await apg.fetchval(apg_sql, "ACCOUNTS", f"acc-{i}")
                    assert text is not None

            floors = [
                await timed("raw asyncpg (text)", 10 * many, load_asyncpg),
                await timed("raw psycopg (text)", 10 * many, load_psycopg),
            ]
            compare("W3b", await timed("get_aggregate (validated+fold)", 10 * many, load), *floors)
            await apg.close()

    # -- W4 ------------------------------------------------------------------------------------

    async def w4(self, writers: int = 8) -> None:
        target = int(2000 * self.scale)
        print(f"W4  {writers} writers race read-then-append on one aggregate ({target:,} appends)")

        async def ours(timer: Timer) -> None:
            async with self.adapter(min_size=writers, max_size=writers) as adapter:
                stores = [make_store(adapter) for _ in range(writers)]
                await stores[0].push_event(opened("hot"))
                state = {"done": 1, "conflicts": 0}

                async def writer(store: EventStore[Account, AccountEvent]) -> None:
                    known = 0
                    while state["done"] < target:
                        with timer.op():
                            while True:
                                new = (await store.get_events("hot", min_version=known + 1)).events
                                known += len(new)
                                try:
                                    await store.push_event(moved("hot", known + 1))
                                except EventAlreadyExistsError:
                                    state["conflicts"] += 1
                                    continue
                                known += 1
                                break
                        state["done"] += 1

                await asyncio.gather(*(writer(s) for s in stores))
                print(f"  (library: {state['conflicts']:,} conflicts retried)")

        async def raw_psycopg(timer: Timer) -> None:
            async with self.adapter() as adapter, self.psycopg_pool(writers) as pool:
                statements = Sql.of(adapter)
                async with pool.connection() as conn:
                    await conn.execute(statements.insert, raw_opened("ACCOUNTS", "hot", raw_now()))
                state = {"done": 1, "conflicts": 0}

                async def writer() -> None:
                    known = 0
                    while state["done"] < target:
                        with timer.op():
                            while True:
                                async with pool.connection() as conn:
                                    cursor = await conn.execute(
                                        statements.since, ("ACCOUNTS", "hot", known + 1)
                                    )
                                    row = await cursor.fetchone()
                                if row is not None and row[0] is not None:
                                    known = json.loads(row[0])[-1]["version"]
                                try:
                                    async with pool.connection() as conn:
                                        await conn.execute(
                                            statements.insert,
                                            raw_moved("hot", known + 1, raw_now()),
                                        )
                                except psycopg.errors.UniqueViolation:
                                    state["conflicts"] += 1
                                    continue
                                known += 1
                                break
                        state["done"] += 1

                await asyncio.gather(*(writer() for _ in range(writers)))
                print(f"  (raw psycopg: {state['conflicts']:,} conflicts retried)")

        async def raw_asyncpg(timer: Timer) -> None:
            async with self.adapter() as adapter:
                statements = Sql.of(adapter)
                insert, since = dollar(statements.insert), dollar(statements.since)
                conns = [await asyncpg.connect(self.dsn) for _ in range(writers)]
                await conns[0].execute(insert, *raw_opened("ACCOUNTS", "hot", raw_now()))
                state = {"done": 1, "conflicts": 0}

                async def writer(conn: asyncpg.Connection) -> None:
                    known = 0
                    while state["done"] < target:
                        with timer.op():
                            while True:
                                text = await conn.fetchval(since, "ACCOUNTS", "hot", known + 1)
                                if text is not None:
                                    known = json.loads(text)[-1]["version"]
                                try:
                                    await conn.execute(
                                        insert, *raw_moved("hot", known + 1, raw_now())
                                    )
                                except asyncpg.UniqueViolationError:
                                    state["conflicts"] += 1
                                    continue
                                known += 1
                                break
                        state["done"] += 1

                try:
                    await asyncio.gather(*(writer(c) for c in conns))
                finally:
                    for conn in conns:
                        await conn.close()
                print(f"  (raw asyncpg: {state['conflicts']:,} conflicts retried)")

        floors = [
            await timed("raw asyncpg", target, raw_asyncpg),
            await timed("raw psycopg", target, raw_psycopg),
        ]
        compare("W4", await timed("EventStore + adapter", target, ours), *floors)


async def main(dsn: str, scale: float, workloads: list[str]) -> None:
    bench = Bench(dsn, scale)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute("SHOW server_version")
        row = await cursor.fetchone()
    print(
        f"PostgreSQL {row[0] if row else '?'}, psycopg {psycopg.__version__}, "
        f"asyncpg {asyncpg.__version__}, scale={scale}, schema {bench.schema}"
    )
    try:
        for name in workloads:
            await getattr(bench, name)()
    finally:
        await bench.drop()
    print("Summary (library / best raw async driver; targets W1, W2, W4 >= 0.90):")
    for label, ratio in RATIOS:
        print(f"  {label:<60} {ratio:.2f}x")


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--dsn",
        default=os.environ.get("CASTORE_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply workload sizes")
    parser.add_argument(
        "--only", nargs="*", choices=["w1", "w2", "w3", "w4"], default=["w1", "w2", "w3", "w4"]
    )
    args = parser.parse_args(argv)
    asyncio.run(main(args.dsn, args.scale, args.only))


if __name__ == "__main__":
    cli()
