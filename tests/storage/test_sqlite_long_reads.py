"""SQLite reads longer than one statement's slice: same answer, one snapshot, clean endings.

A read that may return more than a slice of events runs its statements in one read
transaction; the later slices are fetched on a worker thread while the task validates the
earlier ones. These tests hold that to the answer a plain list gives, under a concurrent
writer, and when the read is cancelled or meets a bad stored event half-way.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from castore_pydantic import Event, EventStore
from castore_pydantic.errors import StorageError, StoredEventValidationError
from castore_pydantic.storage import sqlite as sqlite_module
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
from tests.storage.gc_support import cancelled_midway, collector_watch
from tests.storage.sqlite_support import raw

# A slice is 1,000 events: these sizes need several statements.
VERSIONS = [*range(1, 1501), *range(1700, 2701)]  # 2,501 events, with a gap
STAMP = "2024-01-01T00:00:00.000Z"


class Line(BaseModel):
    text: str


class LineWritten(Event):
    type: Literal["LINE_WRITTEN"] = "LINE_WRITTEN"
    payload: Line


def book_store(adapter: SQLiteEventStorageAdapter) -> EventStore[Any, Any]:
    return EventStore(
        event_store_id="BOOKS",
        event_types=[LineWritten],
        reducer=lambda book, event: event,
        event_storage_adapter=adapter,
    )


def write_rows(path: Path, aggregate_id: str, versions: list[int], text: str = "line") -> None:
    with raw(path, timeout=10) as conn:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO event (aggregate_name, aggregate_id, version, type, data, timestamp)"
            " VALUES ('BOOKS', ?, ?, 'LINE_WRITTEN', ?, ?)",
            [(aggregate_id, v, json.dumps({"text": f"{text} {v}"}), STAMP) for v in versions],
        )
        conn.execute("COMMIT")


def no_open_read(path: Path) -> bool:
    """True when no connection holds a read snapshot: a TRUNCATE checkpoint then completes."""
    with raw(path, timeout=10) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return bool(busy == 0)


async def until_no_open_read(path: Path) -> None:
    deadline = time.monotonic() + 5
    while not no_open_read(path):
        assert time.monotonic() < deadline, "a read transaction was left open"
        await asyncio.sleep(0.01)


@contextmanager
def held_by_a_thread(adapter: SQLiteEventStorageAdapter) -> Iterator[threading.Event]:
    """The adapter's lock, held by another thread (outside SQLite, as a long read's worker
    between statements) until the block ends or the yielded event is set."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with adapter._lock:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    try:
        yield release
    finally:
        release.set()
        holder.join()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "books.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[EventStore[Any, Any]]:
    adapter = SQLiteEventStorageAdapter(db)
    store = book_store(adapter)
    await store.get_events("warm-up")  # creates the table
    write_rows(db, "book", VERSIONS)
    yield store
    # A read that never freed the adapter would make this wait forever.
    await asyncio.wait_for(adapter.aclose(), 10)


def expected(
    min_version: int | None, max_version: int | None, limit: int | None, reverse: bool
) -> list[int]:
    chosen = [
        v
        for v in VERSIONS
        if (min_version is None or v >= min_version) and (max_version is None or v <= max_version)
    ]
    if reverse:
        chosen.reverse()
    return chosen if limit is None else chosen[:limit]


BOUNDS = [None, 1, 999, 1000, 1001, 1501, 1700, 2001, 2700, 5000]
LIMITS = [None, 1, 999, 1000, 1001, 2000, 2501, 9000]
CASES = [
    (low, high, limit, reverse)
    for low in BOUNDS
    for high in BOUNDS
    for limit in LIMITS
    for reverse in (False, True)
]


class TestSameAnswerAsOneStatement:
    async def test_every_bound_combination_across_slice_edges(
        self, store: EventStore[Any, Any]
    ) -> None:
        """Bounds and limits around slice edges and the gap give exactly the expected versions."""
        rng = random.Random(20261126)
        for low, high, limit, reverse in rng.sample(CASES, 160):
            events = (
                await store.get_events(
                    "book", min_version=low, max_version=high, limit=limit, reverse=reverse
                )
            ).events
            want = expected(low, high, limit, reverse)
            assert [e.version for e in events] == want, (low, high, limit, reverse)
            assert all(e.payload.text == f"line {e.version}" for e in events)

    async def test_a_whole_long_aggregate_folds(self, store: EventStore[Any, Any]) -> None:
        """get_aggregate reads every slice: the last event folded is the last stored."""
        result = await store.get_aggregate("book")
        assert [e.version for e in result.events] == VERSIONS
        assert result.aggregate is not None
        assert result.aggregate.version == 2700


def limit_text(store: EventStore[Any, Any], length: int) -> None:
    """Lower SQLite's longest string on the adapter's connection (1 GB by default)."""
    conn = store.get_event_storage_adapter()._conn
    assert conn is not None
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, length)


class TestVeryLongEvents:
    """A slice's JSON text longer than SQLite's longest string (a thousand events of a
    megabyte, at the default 1 GB) is read in smaller slices, in the same snapshot."""

    async def test_same_answers_in_smaller_slices(self, store: EventStore[Any, Any]) -> None:
        limit_text(store, 30_000)  # a slice of 1,000 events here takes about 110 kB
        rng = random.Random(20261127)
        for low, high, limit, reverse in [(None, None, None, False), *rng.sample(CASES, 60)]:
            events = (
                await store.get_events(
                    "book", min_version=low, max_version=high, limit=limit, reverse=reverse
                )
            ).events
            assert [e.version for e in events] == expected(low, high, limit, reverse)
        assert (await store.get_aggregate("book")).events[-1].version == 2700

    async def test_a_busy_retry_after_smaller_slices_stays_in_its_transaction(
        self, store: EventStore[Any, Any], db: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A read of at most one slice that had to take smaller ones, and then found the
        database busy once, is retried as a read of several slices: in one transaction,
        holding the adapter's lock (it used to go on outside both)."""
        limit_text(store, 30_000)
        adapter = store.get_event_storage_adapter()
        query = adapter._query_sync
        outside: list[str] = []

        def busy_once(sql: str, params: Any, **options: Any) -> Any:
            busy_once.calls += 1  # type: ignore[attr-defined]
            conn = adapter._conn
            if conn is None or not conn.in_transaction or not adapter._lock.locked():
                outside.append(sql)
            if busy_once.calls == 2:  # type: ignore[attr-defined]
                raise sqlite_module._BusyError  # the first statement in the transaction
            return query(sql, params, **options)

        busy_once.calls = 0  # type: ignore[attr-defined]
        monkeypatch.setattr(adapter, "_query_sync", busy_once)
        events = (await store.get_events("book", limit=999)).events
        assert [e.version for e in events] == expected(None, None, 999, False)
        assert outside[:1] == [adapter._sql.get[False, False, False]]  # the one-statement try
        assert len(outside) == 1, "a statement of the read ran outside its transaction"
        assert not adapter._lock.locked()
        await until_no_open_read(db)

    async def test_a_listing_longer_than_sqlite_allows_is_a_storage_error(
        self, store: EventStore[Any, Any], db: Path
    ) -> None:
        write_rows(db, "x" * 40_000, [1])  # an aggregate id longer than the limit
        limit_text(store, 30_000)
        with pytest.raises(StorageError, match="too big"):
            await store.list_aggregate_ids()

    async def test_one_event_longer_than_sqlite_allows_is_a_clear_error(
        self, store: EventStore[Any, Any], db: Path
    ) -> None:
        write_rows(db, "huge", [1, 2, 3])
        write_rows(db, "huge", [4], text="x" * 40_000)
        limit_text(store, 30_000)
        for options in ({}, {"limit": 10}, {"min_version": 2}):
            with pytest.raises(StorageError, match="longer than SQLite's longest string"):
                await store.get_events("huge", **options)
        await until_no_open_read(db)
        events = (await store.get_events("huge", max_version=3)).events
        assert [e.version for e in events] == [1, 2, 3]


class TestOneSnapshot:
    async def test_a_concurrent_rewrite_is_seen_whole_or_not_at_all(
        self, store: EventStore[Any, Any], db: Path
    ) -> None:
        """A writer rewrites every event in one transaction, again and again; reads in
        slices never see some events before a rewrite and others after it."""
        with raw(db, timeout=10) as conn:
            conn.execute("UPDATE event SET data = json_object('text', 'round 0')")
        stop = threading.Event()
        rounds = 0

        def rewrite() -> None:
            nonlocal rounds
            with raw(db, timeout=10) as conn:
                while not stop.is_set():
                    rounds += 1
                    conn.execute(
                        "UPDATE event SET data = json_object('text', ?)"
                        " WHERE aggregate_id = 'book'",
                        (f"round {rounds}",),
                    )

        writer = threading.Thread(target=rewrite)
        writer.start()
        mixed: list[set[str]] = []
        try:
            deadline = time.monotonic() + 2
            reads = 0
            while time.monotonic() < deadline or reads < 20:
                events = (await store.get_events("book")).events
                reads += 1
                assert len(events) == len(VERSIONS)
                texts = {e.payload.text for e in events}
                if len(texts) != 1:
                    mixed.append(texts)
        finally:
            stop.set()
            await asyncio.to_thread(writer.join)
        assert rounds > 5, "the writer did not get to run while reads went on"
        assert mixed == []


class TestEndings:
    @pytest.mark.parametrize("steps", [0, 1, 2, 3, 5, 8])
    async def test_a_cancelled_long_read_ends_its_transaction_and_frees_the_adapter(
        self, store: EventStore[Any, Any], db: Path, steps: int
    ) -> None:
        """Cancelled after some loop steps, the read ends; the snapshot is released and the
        next push and read on the same adapter work.

        After one step the task waits for the worker's first slice, so steps 0 and 1 always
        cancel a running read; later, the read may already have finished, and must then
        hold every event.
        """
        read = asyncio.ensure_future(store.get_events("book"))
        for _ in range(steps):
            await asyncio.sleep(0)
        finished = read.done()
        assert not (finished and steps <= 1)
        read.cancel()
        if finished:
            assert [e.version for e in (await read).events] == VERSIONS
        else:
            with pytest.raises(asyncio.CancelledError):
                await read
        await until_no_open_read(db)
        last = LineWritten(aggregate_id="book", version=2701, payload=Line(text="end"))
        await asyncio.wait_for(store.push_event(last), 5)
        events = (await asyncio.wait_for(store.get_events("book", min_version=2650), 5)).events
        assert [e.version for e in events] == list(range(2650, 2702))

    @pytest.mark.parametrize(
        ("bad_version", "data"),
        [(1800, '{"text": 5}'), (2600, "not json at all"), (1000, '{"no": "text"}')],
    )
    async def test_a_bad_event_in_a_later_slice_is_named_and_the_adapter_recovers(
        self, store: EventStore[Any, Any], db: Path, bad_version: int, data: str
    ) -> None:
        """A stored event that does not validate (or is not JSON) past the first slice gives
        StoredEventValidationError; nothing stays open and the adapter keeps working."""
        with raw(db, timeout=10) as conn:
            conn.execute(
                "UPDATE event SET data = ? WHERE aggregate_id = 'book' AND version = ?",
                (data, bad_version),
            )
        with pytest.raises(StoredEventValidationError) as info:
            await store.get_events("book")
        assert (info.value.aggregate_id, info.value.version) == ("book", bad_version)
        await until_no_open_read(db)
        events = (await store.get_events("book", max_version=bad_version - 1)).events
        assert len(events) == len(expected(None, bad_version - 1, None, False))

    async def test_closing_during_a_long_read_lets_it_finish(
        self, store: EventStore[Any, Any], db: Path
    ) -> None:
        """aclose() waits for a long read's statements; the read returns everything."""
        adapter = store.get_event_storage_adapter()
        assert isinstance(adapter, SQLiteEventStorageAdapter)
        read = asyncio.ensure_future(store.get_events("book"))
        await asyncio.sleep(0)
        await adapter.aclose()
        assert [e.version for e in (await read).events] == VERSIONS
        with pytest.raises(StorageError, match="closed"):
            await store.get_events("book")
        await until_no_open_read(db)

    async def test_concurrent_long_reads_share_one_adapter(
        self, store: EventStore[Any, Any], db: Path
    ) -> None:
        """Eight tasks reading long aggregates at once each get their own full answer."""
        write_rows(db, "other", list(range(1, 3001)), text="other")
        reads = await asyncio.gather(
            *(store.get_events("book" if i % 2 else "other", reverse=i % 3 == 0) for i in range(8))
        )
        for i, result in enumerate(reads):
            want = VERSIONS if i % 2 else list(range(1, 3001))
            got = [e.version for e in result.events]
            assert got == (want[::-1] if i % 3 == 0 else want)
        await until_no_open_read(db)


class TestCollector:
    async def test_no_other_task_finds_the_collector_paused(
        self, store: EventStore[Any, Any]
    ) -> None:
        """Paused only inside one validation call, never while the read waits for a slice:
        overlapping long reads, a failing and a cancelled one leave other tasks a running
        collector."""
        path = Path(store.get_event_storage_adapter().path)
        write_rows(path, "bad", list(range(1, 1501)))
        with raw(path, timeout=10) as conn:  # in the second slice
            conn.execute(
                "UPDATE event SET data = '{}' WHERE aggregate_id = 'bad' AND version = 1200"
            )
        async with collector_watch() as watch:
            reads = await asyncio.gather(*(store.get_events("book") for _ in range(2)))
            assert [len(read.events) for read in reads] == [len(VERSIONS)] * 2
            with pytest.raises(StoredEventValidationError):
                await store.get_events("bad")
            await cancelled_midway(store.get_events("book"), turns=1)
        watch.assert_never_paused()


class TestCallsDuringALongRead:
    async def test_waiting_for_the_adapters_own_lock_leaves_busy_timeout_whole(
        self, db: Path
    ) -> None:
        """After a busy answer, a wait for another call of the adapter is not counted."""
        async with SQLiteEventStorageAdapter(db, busy_timeout=0.1) as adapter:
            calls = 0

            def operation() -> str:
                nonlocal calls
                calls += 1
                if calls == 1:
                    # Busy; meanwhile the adapter's lock passes to another holder for 0.3 s,
                    # as it does to a long read's worker.
                    adapter._keep_lock = True
                    threading.Timer(0.3, adapter._lock.release).start()
                    raise sqlite_module._BusyError
                if calls == 2:
                    raise sqlite_module._BusyError  # busy again, once
                return "done"

            assert await adapter._run(operation) == "done"
            assert calls == 3

    @pytest.mark.parametrize("give_up", [False, True], ids=["all-wait", "first-cancelled"])
    async def test_a_release_wakes_the_waiting_calls(
        self, db: Path, monkeypatch: pytest.MonkeyPatch, give_up: bool
    ) -> None:
        """Waiting calls go on when the holder releases, not after their own pause (made
        seconds long here); a cancelled waiter passes its turn on."""
        monkeypatch.setattr(sqlite_module, "_FIRST_DELAY", 5.0)
        async with SQLiteEventStorageAdapter(db) as adapter:
            store = book_store(adapter)
            await store.get_events("warm-up")  # creates the table
            with held_by_a_thread(adapter) as release:
                pushes = [
                    asyncio.ensure_future(
                        store.push_event(
                            LineWritten(aggregate_id=f"w{i}", version=1, payload=Line(text="x"))
                        )
                    )
                    for i in range(3)
                ]
                await asyncio.sleep(0.05)  # all three wait now
                assert not any(push.done() for push in pushes)
                if give_up:
                    pushes[0].cancel()
                release.set()
            waiting = pushes[1:] if give_up else pushes
            done, _ = await asyncio.wait(waiting, timeout=2)
            assert done == set(waiting), "a waiting call slept through the release"
            if give_up:
                assert pushes[0].cancelled()

    async def test_a_call_waiting_for_a_long_read_is_not_timed_out(self, db: Path) -> None:
        """``busy_timeout`` bounds waits for other connections, not for the adapter's calls."""
        async with SQLiteEventStorageAdapter(db, busy_timeout=0.01) as adapter:
            store = book_store(adapter)
            await store.get_events("warm-up")  # creates the table
            write_rows(db, "big", list(range(1, 60_001)))
            read = asyncio.ensure_future(store.get_events("big"))
            await asyncio.sleep(0)  # the read's worker now holds the adapter for a while
            line = LineWritten(aggregate_id="note", version=1, payload=Line(text="meanwhile"))
            assert not read.done(), "the read ended before the push began"
            pushed = await store.push_event(line)
            assert len((await read).events) == 60_000
            assert (await store.get_events("note")).events == [pushed.event]
        await until_no_open_read(db)


def _fork_and_run(child: Callable[[], Awaitable[bool]], within: float) -> int | None:
    """Fork; the child runs ``child`` in a new event loop. The child's exit code (0: it
    returned true), or None if it did not finish ``within`` seconds (it is then killed).

    Called on a worker thread, so that the child starts with no event loop running.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child always leaves through os._exit
        code = 2
        try:
            code = 0 if asyncio.run(child()) else 1  # type: ignore[arg-type]
        finally:
            os._exit(code)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


class TestFork:
    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    async def test_a_forked_child_reads_long_aggregates(
        self, store: EventStore[Any, Any], db: Path
    ) -> None:
        """After the parent's long reads, a forked child's long read still gets a worker."""
        for _ in range(3):  # leave whatever the parent's reads leave behind
            assert len((await store.get_events("book")).events) == len(VERSIONS)

        async def read() -> bool:
            async with SQLiteEventStorageAdapter(db) as adapter:
                return len((await book_store(adapter).get_events("book")).events) == len(VERSIONS)

        assert await asyncio.to_thread(_fork_and_run, read, 30) == 0

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
    @pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
    async def test_a_child_forked_while_the_adapter_is_held_uses_it_afresh(self, db: Path) -> None:
        """Forked while another thread holds the adapter (as a long read's worker does,
        between statements), the child's copy starts afresh instead of waiting forever."""
        async with SQLiteEventStorageAdapter(db) as adapter:
            store = book_store(adapter)
            line = LineWritten(aggregate_id="note", version=1, payload=Line(text="before"))
            await store.push_event(line)

            async def child() -> bool:
                return len((await store.get_events("note")).events) == 1  # the inherited one

            with held_by_a_thread(adapter):
                code = await asyncio.to_thread(_fork_and_run, child, 30)
            assert code == 0
            assert len((await store.get_events("note")).events) == 1
