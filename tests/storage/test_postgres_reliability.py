"""The PostgreSQL adapter under cancellation, lost connections and racing writers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import resource
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from castore_pydantic import Event, EventStore
from castore_pydantic.errors import EventAlreadyExistsError, StorageUnavailableError
from castore_pydantic.storage.postgres import PostgresEventStorageAdapter
from castore_pydantic.testing.contracts._storage import NoteAdded, created
from tests.storage.postgres_support import (
    DSN,
    counter_store,
    fetch,
    make_table,
    pg_schema,
    unique_table,
    wait_for,
)

__all__ = ["pg_schema"]  # the fixture is used by name

pytestmark = pytest.mark.postgres


# -- cancellation at every await point ---------------------------------------------------------


class CancelAtSuspension:
    """Run a coroutine, throwing ``CancelledError`` into it at its ``k``-th suspension.

    This is what ``task.cancel()`` does (the awaited future is cancelled and the coroutine
    resumes with ``CancelledError``), placed exactly at each await point that really
    suspends, in turn; whatever cleanup the coroutine then runs proceeds normally.
    """

    def __init__(self, coro: Coroutine[Any, Any, Any], k: int) -> None:
        self._coro = coro
        self._k = k
        self.suspensions = 0
        self.cancelled = False

    def __await__(self) -> Generator[Any, Any, Any]:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is not None:
                    pending, error = error, None
                    yielded = self._coro.throw(pending)
                else:
                    yielded = self._coro.send(value)
            except StopIteration as stop:
                return stop.value
            self.suspensions += 1
            if self.suspensions == self._k:
                self.cancelled = True
                if isinstance(yielded, asyncio.Future):
                    yielded.cancel()
                error = asyncio.CancelledError()
                continue
            try:
                value = yield yielded
            except BaseException as exc:  # forwarded into the coroutine
                error, value = exc, None


@dataclass
class Watched:
    """An adapter whose connections can be found in ``pg_stat_activity``."""

    adapter: PostgresEventStorageAdapter
    application_name: str
    start_size: int
    #: What the pool warned about while the test ran (connections it had to roll back,
    #: close or discard).
    pool_warnings: list[str] = field(default_factory=list)

    @classmethod
    def on(cls, schema: str, table: str, size: int = 2) -> Watched:
        """A new adapter (not opened) with a fixed-size pool, tagged with a unique name."""
        name = f"castore-test-{uuid.uuid4().hex[:8]}"
        adapter = PostgresEventStorageAdapter(
            DSN,
            schema=schema,
            table_name=table,
            min_size=size,
            max_size=size,
            connect_kwargs={"application_name": name},
        )
        return cls(adapter, name, size)

    async def all_in_pool(self) -> bool:
        """Every connection idles in the pool (none kept by the adapter)."""
        stats = self.adapter.pool.get_stats()
        return self.adapter._conns.kept == 0 and stats.get("pool_available") == self.start_size

    async def states(self) -> list[str]:
        rows = await fetch(
            "SELECT coalesce(state, '') FROM pg_stat_activity WHERE application_name = %s",
            self.application_name,
        )
        return [state for (state,) in rows]

    async def settled(self) -> bool:
        stats = self.adapter.pool.get_stats()
        # Idle connections are in the pool or kept by the adapter for its next operation.
        idle = stats.get("pool_available", 0) + self.adapter._conns.kept
        return (
            stats.get("pool_size") == self.start_size
            and idle == self.start_size
            and await self.states() == ["idle"] * self.start_size
        )


@pytest.fixture
async def watched(pg_schema: str) -> AsyncIterator[Watched]:
    """An adapter with a fixed-size pool (2) on a fresh table, tagged for pg_stat_activity."""
    watched = Watched.on(pg_schema, await make_table(pg_schema))
    handler = _Collect(watched.pool_warnings)
    pool_logger = logging.getLogger("psycopg.pool")
    pool_logger.addHandler(handler)
    try:
        async with watched.adapter:
            await wait_for(watched.settled, what="the pool to fill")
            yield watched
    finally:
        pool_logger.removeHandler(handler)


class _Collect(logging.Handler):
    """Keeps the messages of warnings (and worse) in a list."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


async def _check_after_cancellation(watched: Watched, harness: CancelAtSuspension, k: int) -> None:
    """No connection is left in a transaction, the pool gets back to its size, and it had
    nothing to mend: no connection returned in a transaction, closed or discarded."""
    states = await watched.states()
    assert not [s for s in states if s.startswith("idle in transaction")], (k, states)
    await wait_for(watched.settled, what=f"the pool to settle after cancelling at {k}")
    assert watched.pool_warnings == [], (k, watched.pool_warnings)


class TestCancellation:
    """Cancelling a write at any await point stores all or nothing and keeps the pool sound."""

    async def test_push_cancelled_at_each_suspension(self, watched: Watched) -> None:
        """Every suspension point of push_event: nothing or the event, clean pool, next works."""
        store = counter_store(watched.adapter)
        k = 0
        while True:
            k += 1
            harness = CancelAtSuspension(store.push_event(created(f"p{k}")), k)
            try:
                await harness
            except asyncio.CancelledError:
                assert harness.cancelled
            stored = (await store.get_events(f"p{k}")).events
            assert len(stored) in (0, 1)
            await _check_after_cancellation(watched, harness, k)
            if not harness.cancelled:
                assert len(stored) == 1
                break
            if not stored:
                await store.push_event(created(f"p{k}"))  # the next operation succeeds
        assert k > 1, "push_event never suspended: the harness tested nothing"

    @pytest.mark.parametrize("size", [1, 2, 5])
    async def test_group_cancelled_at_each_suspension(
        self, pg_schema: str, watched: Watched, size: int
    ) -> None:
        """Every suspension point of a group over two tables: all or none of its events."""
        other = PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name=await make_table(pg_schema)
        )
        stores = [counter_store(watched.adapter), counter_store(other)]
        k = 0
        try:
            while True:
                k += 1
                ids = [f"g{k}-{i}" for i in range(size)]
                group = EventStore.push_event_group(
                    *(stores[i % 2].group_event(created(ids[i])) for i in range(size))
                )
                harness = CancelAtSuspension(group, k)
                try:
                    await harness
                except asyncio.CancelledError:
                    assert harness.cancelled
                counts = [len((await stores[i % 2].get_events(ids[i])).events) for i in range(size)]
                assert counts in ([0] * size, [1] * size), (k, counts)
                await _check_after_cancellation(watched, harness, k)
                if not harness.cancelled:
                    assert counts == [1] * size
                    break
            await EventStore.push_event_group(
                *(stores[i % 2].group_event(created(f"after-{i}")) for i in range(size))
            )
        finally:
            await other.aclose()
        assert k > 1, "the group never suspended: the harness tested nothing"

    async def test_streamed_read_cancelled_at_each_suspension(self, watched: Watched) -> None:
        """Cancelling a long (streamed) read anywhere leaves no busy or lost connection, and
        ends its transaction itself: the pool never has to roll one back."""
        store = counter_store(watched.adapter)
        await EventStore.push_event_group(
            store.group_event(created("long")),
            *(store.group_event(note("long", v, 0, v)) for v in range(2, 3001)),
        )
        k = 0
        while True:
            k += 1
            harness = CancelAtSuspension(store.get_events("long"), k)
            try:
                result = await harness
            except asyncio.CancelledError:
                assert harness.cancelled
            await _check_after_cancellation(watched, harness, k)
            if not harness.cancelled:
                assert len(result.events) == 3000
                break
        assert k > 3, "the streamed read never suspended mid-way"

    async def test_harness_catches_a_write_split_over_two_statements(
        self, watched: Watched
    ) -> None:
        """Negative control: two autocommitted INSERTs for one group leave a partial group."""
        adapter = watched.adapter
        store = counter_store(adapter)

        async def split_group(first: Event, second: Event) -> None:
            await adapter.push_event(first, store.context)
            await asyncio.sleep(0)  # any await between two statements is a cancellation point
            await adapter.push_event(second, store.context)

        # Where each suspension falls may differ from one run to the next (taking a
        # connection suspends only now and then): sweep again until one cancels between
        # the two statements.
        partial = []
        for sweep in range(5):
            for k in range(1, 20):
                first, second = created(f"s{sweep}-{k}-a"), created(f"s{sweep}-{k}-b")
                harness = CancelAtSuspension(split_group(first, second), k)
                with contextlib.suppress(asyncio.CancelledError):
                    await harness
                stored = [(await store.get_events(e.aggregate_id)).events for e in (first, second)]
                partial.append([len(events) for events in stored] == [1, 0])
                if not harness.cancelled:
                    break
            if any(partial):
                break
        assert any(partial)


# -- a borrowed pool's connections under cancellation ------------------------------------------


async def _lent_as_made(pool: AsyncConnectionPool[Any]) -> list[str]:
    """What is wrong with the pool's connections: each must be obtainable, idle and not in
    autocommit, as a default pool lends them (empty when all is well)."""
    problems, conns = [], []
    try:
        for _ in range(pool.max_size):
            try:
                conns.append(await pool.getconn(timeout=2))
            except PoolTimeout:
                problems.append("a connection never came back to the pool")
        for conn in conns:
            if conn.autocommit:
                problems.append("a connection came back in autocommit")
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                problems.append(f"a connection came back {conn.info.transaction_status.name}")
    finally:
        for conn in conns:
            await pool.putconn(conn)
    return problems


@pytest.fixture
async def borrowed(pg_schema: str) -> AsyncIterator[tuple[AsyncConnectionPool[Any], Any]]:
    """A pool of two connections made with psycopg's defaults (not autocommit), lent to an
    adapter whose store has a long aggregate ``long``: its read takes a connection, runs
    several statements in a transaction and gives the connection back."""
    async with AsyncConnectionPool(DSN, min_size=2, max_size=2, open=False, timeout=5) as pool:
        await pool.wait()
        adapter = PostgresEventStorageAdapter(
            pool=pool, schema=pg_schema, table_name=await make_table(pg_schema), timeout=5
        )
        async with adapter:
            store = counter_store(adapter)
            await EventStore.push_event_group(
                store.group_event(created("long")),
                *(store.group_event(note("long", v, 0, v)) for v in range(2, 3001)),
            )
            assert await _lent_as_made(pool) == []
            yield pool, store


class TestBorrowedPoolCancellation:
    """A cancelled call gives a borrowed pool's connection back as it was lent."""

    async def test_cancelled_at_each_suspension(
        self, borrowed: tuple[AsyncConnectionPool[Any], Any]
    ) -> None:
        """At every suspension of a read and of a push, the connection goes back to the
        pool, idle and out of autocommit. A cancellation where psycopg suspends after
        switching autocommit lost the connection (on the way back) or returned it in
        autocommit (on the way out)."""
        pool, store = borrowed

        def read(_: int) -> Coroutine[Any, Any, Any]:
            return store.get_events("long")

        def push(k: int) -> Coroutine[Any, Any, Any]:
            return store.push_event(created(f"p{k}"))

        for call in (read, push):
            k = 0
            while True:
                k += 1
                # psycopg yields to the loop (after switching autocommit) when it has not
                # done so for 5 ms: 10 ms of other work make its next call suspend there.
                await asyncio.sleep(0.01)
                harness = CancelAtSuspension(call(k), k)
                with contextlib.suppress(asyncio.CancelledError):
                    await harness
                assert await _lent_as_made(pool) == [], k
                if not harness.cancelled:
                    break
            assert k > 2, "the call never suspended: the harness tested nothing"

    async def test_reads_cut_short_by_timeouts(
        self, borrowed: tuple[AsyncConnectionPool[Any], Any]
    ) -> None:
        """Reads that time out anywhere (``asyncio.wait_for``) leave the pool whole, and the
        application's own connections out of autocommit."""
        pool, store = borrowed
        rnd = random.Random(20)
        timed_out = 0
        for _ in range(200):
            await asyncio.sleep(0.006)
            try:
                await asyncio.wait_for(store.get_events("long"), rnd.uniform(0, 0.03))
            except TimeoutError:
                timed_out += 1
        assert timed_out > 20, "the reads were never interrupted"
        assert await _lent_as_made(pool) == []
        assert len((await store.get_events("long")).events) == 3000


# -- a connection lost between INSERT and COMMIT -------------------------------------------------

_LOCK_KEY = 7_340_117


@pytest.fixture
async def blocking_table(pg_schema: str) -> str:
    """A table whose INSERT of an aggregate named ``block*`` waits on an advisory lock.

    The trigger runs after the row is inserted and before the statement (and so the
    transaction) commits: the window in which the test kills the backend.
    """
    table = await make_table(pg_schema)
    function = f'"{pg_schema}"."{table}_wait"'
    await fetch(
        f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NEW.aggregate_id LIKE 'block%' THEN"
        f" PERFORM pg_advisory_xact_lock_shared({_LOCK_KEY}); END IF; RETURN NEW; END $$;"
        f' CREATE TRIGGER wait_after_insert AFTER INSERT ON "{pg_schema}"."{table}"'
        f" FOR EACH ROW EXECUTE FUNCTION {function}()"
    )
    return table


class TestConnectionLoss:
    """A backend killed mid-write gives a retriable error; nothing partial is stored."""

    async def test_killed_backend_mid_write(self, pg_schema: str, blocking_table: str) -> None:
        """Single pushes and groups: StorageUnavailableError, no rows, the pool recovers."""
        watched = Watched.on(pg_schema, blocking_table)
        adapter = watched.adapter
        async with adapter, await psycopg.AsyncConnection.connect(DSN, autocommit=True) as side:
            store = counter_store(adapter)
            for attempt in range(12):
                await side.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
                write: Coroutine[Any, Any, object]
                if attempt % 2:
                    write = store.push_event(created(f"block-{attempt}"))
                else:
                    write = EventStore.push_event_group(
                        store.group_event(created(f"first-{attempt}")),
                        store.group_event(created(f"block-{attempt}")),
                    )
                task = asyncio.ensure_future(write)

                async def blocked() -> list[tuple[Any, ...]]:
                    return await fetch(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                        " AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                        watched.application_name,
                    )

                await wait_for(blocked, what="the insert to wait on the lock")
                ((pid,),) = await blocked()
                await side.execute("SELECT pg_terminate_backend(%s)", (pid,))
                await side.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
                with pytest.raises(StorageUnavailableError) as info:
                    await task
                assert isinstance(info.value, ConnectionError)
                assert not isinstance(info.value, EventAlreadyExistsError)
                assert "unavailable" in str(info.value)
                assert "outcome is unknown" in str(info.value)  # it was sent, then lost
                assert info.value.outcome_unknown
                for aggregate_id in (f"first-{attempt}", f"block-{attempt}"):
                    assert (await store.get_events(aggregate_id)).events == []
                await wait_for(watched.settled, what="the pool to replace the lost connection")
                await store.push_event(created(f"after-{attempt}"))


class TestServerEndedIdleConnections:
    """Connections the server ended while they idled (a restart) are replaced, not used."""

    async def test_the_first_operations_after_a_restart_succeed(self, watched: Watched) -> None:
        """Every pooled connection is terminated while idle, as a restart does; the next
        push, group and read each succeed at once, on new connections."""
        store = counter_store(watched.adapter)
        await store.push_event(created("before"))
        # Wait until both connections idle in the pool (kept ones go back after 50 ms).
        await wait_for(watched.all_in_pool, what="the connections to go back to the pool")
        old = {pid for (pid,) in await _backends(watched)}
        assert len(old) == 2
        await fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            watched.application_name,
        )

        async def gone() -> bool:
            return not old & {pid for (pid,) in await _backends(watched)}

        await wait_for(gone, what="the server to end the connections")
        await store.push_event(created("after"))
        await EventStore.push_event_group(
            store.group_event(created("first")), store.group_event(created("second"))
        )
        for aggregate_id in ("before", "after", "first", "second"):
            assert [e.version for e in (await store.get_events(aggregate_id)).events] == [1]
        assert not old & {pid for (pid,) in await _backends(watched)}


class TestHighDescriptors:
    """The idle check works for sockets numbered past select()'s limit of 1023."""

    async def test_a_healthy_connection_on_a_high_descriptor_is_kept(self, pg_schema: str) -> None:
        """With 1,100 files open, the pool's connection gets a descriptor above 1023; taking
        it from the pool again and again keeps the same server process (not replaced)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 2048
        if soft < wanted:
            if hard != resource.RLIM_INFINITY and hard < wanted:
                pytest.skip(f"the open-files limit ({hard}) cannot reach {wanted}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        try:
            watched = Watched.on(pg_schema, await make_table(pg_schema), size=1)
            adapter = watched.adapter
            async with adapter:
                store = counter_store(adapter)
                await store.push_event(created("first"))
                await wait_for(watched.all_in_pool, what="the connection to idle")
                conn = await adapter.pool.getconn()
                assert conn.pgconn.socket > 1023
                await adapter.pool.putconn(conn)
                pids = []
                for index in range(3):
                    await store.push_event(created(f"again-{index}"))
                    await wait_for(watched.all_in_pool, what="the connection to idle")
                    pids.append(await _backends(watched))
                assert pids[0] == pids[1] == pids[2]
                assert len(pids[0]) == 1
        finally:
            for fd in opened:
                os.close(fd)
            if soft < wanted:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _backends(watched: Watched) -> list[tuple[Any, ...]]:
    return await fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", watched.application_name
    )


class TestCancellationWhileTheServerWorks:
    """Cancelling the task while PostgreSQL executes the write cancels the statement."""

    async def test_cancel_during_execution_stores_nothing(
        self, pg_schema: str, blocking_table: str
    ) -> None:
        """The statement is cancelled server-side; no row, no open transaction, pool intact."""
        watched = Watched.on(pg_schema, blocking_table)
        adapter = watched.adapter
        async with adapter, await psycopg.AsyncConnection.connect(DSN, autocommit=True) as side:
            store = counter_store(adapter)
            for attempt in range(6):
                await side.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
                task = asyncio.ensure_future(
                    EventStore.push_event_group(
                        store.group_event(created(f"first-{attempt}")),
                        store.group_event(created(f"block-{attempt}")),
                    )
                )

                async def blocked() -> bool:
                    rows = await fetch(
                        "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                        " AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                        watched.application_name,
                    )
                    return bool(rows)

                await wait_for(blocked, what="the insert to wait on the lock")
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await side.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
                for aggregate_id in (f"first-{attempt}", f"block-{attempt}"):
                    assert (await store.get_events(aggregate_id)).events == []
                states = await watched.states()
                assert not [s for s in states if s.startswith("idle in transaction")], states
                await wait_for(watched.settled, what="the pool to settle")
                await store.push_event(created(f"after-{attempt}"))


# -- racing writers ----------------------------------------------------------------------------


@dataclass
class RaceLog:
    """What racing writers saw: their acknowledged appends and every error."""

    acknowledged: dict[int, tuple[int, int]] = field(default_factory=dict)
    duplicates_acknowledged: list[int] = field(default_factory=list)
    conflicts: int = 0
    other_errors: list[BaseException] = field(default_factory=list)


def note(aggregate_id: str, version: int, writer: int, n: int) -> NoteAdded:
    """An append that says who made it."""
    return NoteAdded(aggregate_id=aggregate_id, version=version, payload={"w": writer, "n": n})


async def race(
    stores: list[EventStore[Any, Any]],
    appends: int,
    *,
    before_write: Callable[[], Coroutine[Any, Any, Any]] | None = None,
) -> RaceLog:
    """Writers read (catching up from what they know), append the next version, retry."""
    log = RaceLog()

    async def writer(w: int) -> None:
        store, known, done = stores[w], 0, 0
        while done < appends:
            known += len((await store.get_events("race", min_version=known + 1)).events)
            if before_write is not None:
                await before_write()
            try:
                await store.push_event(note("race", known + 1, w, done))
            except EventAlreadyExistsError:
                log.conflicts += 1
                continue
            except Exception as exc:
                log.other_errors.append(exc)
                raise
            if known + 1 in log.acknowledged:
                log.duplicates_acknowledged.append(known + 1)
            log.acknowledged[known + 1] = (w, done)
            known, done = known + 1, done + 1

    await asyncio.gather(*(writer(w) for w in range(len(stores))))
    return log


async def race_problems(store: EventStore[Any, Any], log: RaceLog, total: int) -> list[str]:
    """Everything that is wrong after a race (empty when the store kept its promises)."""
    problems = []
    events = (await store.get_events("race")).events
    versions = [e.version for e in events]
    if versions != list(range(1, total + 1)):
        problems.append(f"stored versions are not exactly 1..{total}")
    if log.duplicates_acknowledged:
        problems.append(f"versions acknowledged twice: {log.duplicates_acknowledged[:5]}")
    if len(log.acknowledged) != total:
        problems.append(f"{len(log.acknowledged)} distinct versions acknowledged, not {total}")
    by_version = {e.version: e.payload for e in events}
    lost = [v for v, (w, n) in log.acknowledged.items() if by_version.get(v) != {"w": w, "n": n}]
    if lost:
        problems.append(f"acknowledged appends lost or overwritten at versions {lost[:5]}")
    if log.other_errors:
        problems.append(f"errors other than conflicts: {log.other_errors[:3]}")
    return problems


class TestRacingWriters:
    """Optimistic concurrency is enforced by the database's unique key."""

    @pytest.mark.slow
    async def test_sixteen_writers_append_exactly_once_each(self, pg_schema: str) -> None:
        """16 writers x 100 appends on one aggregate: versions 1..1600, nothing lost."""
        table = await make_table(pg_schema)
        adapters = [
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table, max_size=1)
            for _ in range(16)
        ]
        try:
            stores = [counter_store(a, "RACE") for a in adapters]
            log = await race(stores, 100)
            assert await race_problems(stores[0], log, 1600) == []
            assert log.conflicts > 0, "the writers never raced"
        finally:
            for adapter in adapters:
                await adapter.aclose()

    async def test_checks_catch_a_table_without_the_unique_key(self, pg_schema: str) -> None:
        """Negative control: without the key, lock-stepped writers duplicate versions."""
        table = unique_table()
        await fetch(
            f'CREATE TABLE "{pg_schema}"."{table}" (id bigserial PRIMARY KEY,'
            " aggregate_name text NOT NULL, aggregate_id text NOT NULL, version bigint NOT NULL,"
            ' type text NOT NULL, data jsonb, metadata jsonb, "timestamp" timestamptz NOT NULL)'
        )
        adapters = [
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table, max_size=1)
            for _ in range(4)
        ]
        barrier = asyncio.Barrier(4)
        try:
            stores = [counter_store(a, "RACE") for a in adapters]
            log = await race(stores, 5, before_write=barrier.wait)
            assert await race_problems(stores[0], log, 20) != []
        finally:
            for adapter in adapters:
                await adapter.aclose()
