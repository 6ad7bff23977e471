"""The SQLite adapter: the public contract, then what is specific to SQLite."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import sqlite3
import threading
import time
import weakref
import zoneinfo
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, field_serializer

from castore_pydantic import Aggregate, Event, EventAlreadyExistsError, EventLimits, EventStore
from castore_pydantic.errors import (
    EventGroupError,
    EventLimitExceededError,
    InvalidPageTokenError,
    StorageError,
    StorageUnavailableError,
    StoredEventValidationError,
)
from castore_pydantic.storage import EventStorageAdapter
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
from castore_pydantic.testing.contracts import AdapterFactory, EventStorageAdapterContract
from tests.storage.sqlite_support import raw


class TestSQLiteContract(EventStorageAdapterContract):
    """The SQLite adapter honours the public storage contract (file database, WAL)."""

    @pytest.fixture
    async def adapter_factory(self, tmp_path: Path) -> AsyncIterator[AdapterFactory]:
        adapters: list[SQLiteEventStorageAdapter] = []
        path = tmp_path / "events.db"

        async def make() -> SQLiteEventStorageAdapter:
            adapter = SQLiteEventStorageAdapter(path)
            adapters.append(adapter)
            return adapter

        yield make
        for adapter in adapters:
            await adapter.aclose()


class TestSQLiteInMemoryContract(EventStorageAdapterContract):
    """A ":memory:" database honours the contract too (one adapter: memory is private)."""

    @pytest.fixture
    async def adapter_factory(self) -> AsyncIterator[AdapterFactory]:
        shared = SQLiteEventStorageAdapter(":memory:")

        async def make() -> SQLiteEventStorageAdapter:
            return shared

        yield make
        await shared.aclose()


# -- SQLite specifics ---------------------------------------------------------------------------


class Note(BaseModel):
    text: str
    when: datetime | None = None


class NoteTaken(Event):
    type: Literal["NOTE_TAKEN"] = "NOTE_TAKEN"
    payload: Note
    metadata: dict[str, Any] | None = None


class Tagged(Event):
    type: Literal["TAGGED"] = "TAGGED"
    payload: Any = None


class Shouted(Event):
    """An event class with its own field serialiser: stored through the event's own dump."""

    type: Literal["SHOUTED"] = "SHOUTED"
    payload: str

    @field_serializer("payload")
    def _upper(self, value: str) -> str:
        return value.upper()


class Log(Aggregate):
    count: int


def reduce_log(log: Log | None, event: Event) -> Log:
    count = 0 if log is None else log.count
    return Log(aggregate_id=event.aggregate_id, version=event.version, count=count + 1)


def log_store(adapter: EventStorageAdapter, event_store_id: str = "LOGS") -> EventStore[Log, Any]:
    return EventStore(
        event_store_id=event_store_id,
        event_types=[NoteTaken, Tagged, Shouted],
        reducer=reduce_log,
        event_storage_adapter=adapter,
    )


def note(aggregate_id: str, version: int, text: str = "hi", **extra: Any) -> NoteTaken:
    return NoteTaken(aggregate_id=aggregate_id, version=version, payload=Note(text=text), **extra)


def ts(ms: int) -> datetime:
    return datetime(2024, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "events.db"


@pytest.fixture
async def adapter(db: Path) -> AsyncIterator[SQLiteEventStorageAdapter]:
    async with SQLiteEventStorageAdapter(db) as adapter:
        yield adapter


async def yield_until_blocked(task: asyncio.Task[Any]) -> None:
    """Let ``task`` run until it waits on the loop (it is then retrying a locked database)."""
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done()


class TestFileAndLifecycle:
    async def test_events_persist_across_adapter_instances(self, db: Path) -> None:
        """Events written by one adapter are read by a new adapter on the same file later."""
        async with SQLiteEventStorageAdapter(db) as first:
            pushed = await log_store(first).push_event(note("a", 1, metadata={"k": [1, 2]}))
        async with SQLiteEventStorageAdapter(db) as second:
            assert (await log_store(second).get_events("a")).events == [pushed.event]

    async def test_schema_is_created_on_first_use_without_async_with(self, db: Path) -> None:
        """A fresh file gets its table on the first call, even without ``async with``."""
        adapter = SQLiteEventStorageAdapter(db)
        try:
            assert (await log_store(adapter).get_events("a")).events == []
            with raw(db) as conn:
                tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            assert {"event", "event_initial_events"} <= tables
        finally:
            await adapter.aclose()

    async def test_file_is_in_wal_mode_with_the_castore_layout(
        self, adapter: Any, db: Path
    ) -> None:
        """The file is in WAL mode; columns mirror Castore's PostgreSQL table; text timestamps."""
        await log_store(adapter).push_event(note("a", 1, timestamp=ts(123)))
        await log_store(adapter).push_event(Tagged(aggregate_id="a", version=2, timestamp=ts(5)))
        with raw(db) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            columns = [r[1] for r in conn.execute("PRAGMA table_info(event)")]
            rows = conn.execute(
                "SELECT aggregate_name, aggregate_id, version, type, data, metadata, timestamp"
                " FROM event ORDER BY version"
            ).fetchall()
            unique = [
                [c[2] for c in conn.execute(f"PRAGMA index_info({index[1]!r})")]
                for index in conn.execute("PRAGMA index_list(event)")
                if index[2]
            ]
        assert columns == [
            "id",
            "aggregate_name",
            "aggregate_id",
            "version",
            "type",
            "data",
            "metadata",
            "timestamp",
        ]
        assert rows == [
            ("LOGS", "a", 1, "NOTE_TAKEN", '{"text":"hi","when":null}', None,
             "2024-01-01T00:00:00.123Z"),
            ("LOGS", "a", 2, "TAGGED", None, None, "2024-01-01T00:00:00.005Z"),
        ]  # fmt: skip
        assert unique == [["aggregate_name", "aggregate_id", "version"]]

    async def test_listing_uses_the_initial_events_index(self, adapter: Any, db: Path) -> None:
        """Listing by (store, version 1, timestamp, id) is an index scan with no sort step."""
        await log_store(adapter).push_event(note("a", 1))
        with raw(db) as conn:
            plan = " ".join(
                str(row[3])
                for row in conn.execute(
                    "EXPLAIN QUERY PLAN SELECT aggregate_id, timestamp FROM event"
                    " WHERE aggregate_name = ? AND version = 1 AND timestamp >= ?"
                    " AND (timestamp, aggregate_id) > (?, ?) ORDER BY timestamp, aggregate_id",
                    ("LOGS", "2024", "2024", "a"),
                )
            )
        assert "COVERING INDEX event_initial_events" in plan
        assert "TEMP B-TREE" not in plan

    async def test_memory_databases_are_private_to_their_adapter(self) -> None:
        """Two ":memory:" adapters never share events."""
        async with (
            SQLiteEventStorageAdapter(":memory:") as first,
            SQLiteEventStorageAdapter(":memory:") as second,
        ):
            await log_store(first).push_event(note("a", 1))
            assert (await log_store(second).get_events("a")).events == []
            assert len((await log_store(first).get_events("a")).events) == 1

    async def test_aclose_is_idempotent_and_the_adapter_refuses_use_afterwards(
        self, db: Path
    ) -> None:
        """aclose twice is fine; a closed adapter raises StorageError instead of reopening."""
        adapter = SQLiteEventStorageAdapter(db)
        await log_store(adapter).push_event(note("a", 1))
        await adapter.aclose()
        await adapter.aclose()
        with pytest.raises(StorageError, match="closed"):
            await log_store(adapter).get_events("a")

    @pytest.mark.parametrize(("given", "pragma"), [("NORMAL", 1), ("FULL", 2), ("full", 2)])
    async def test_durability_setting_reaches_the_connection(
        self, db: Path, given: Any, pragma: int
    ) -> None:
        """synchronous= sets SQLite's synchronous pragma on the adapter's connection."""
        async with SQLiteEventStorageAdapter(db, synchronous=given) as adapter:
            await log_store(adapter).push_event(note("a", 1))
            # The setting is per connection and has no other observable effect short of
            # pulling the power, so look at the connection itself.
            assert adapter._conn is not None
            assert adapter._conn.execute("PRAGMA synchronous").fetchone()[0] == pragma

    @pytest.mark.parametrize(
        "options",
        [
            {"synchronous": "OFF"},
            {"synchronous": "EXTRA"},
            {"busy_timeout": -1},
            {"busy_timeout": float("nan")},
        ],
    )
    def test_bad_options_are_refused(self, db: Path, options: dict[str, Any]) -> None:
        """Unknown durability settings and negative timeouts are a ValueError."""
        with pytest.raises(ValueError, match=next(iter(options))):
            SQLiteEventStorageAdapter(db, **options)

    @pytest.mark.parametrize(
        "name",
        ["", "1event", "event; DROP TABLE event", 'ev"ent', "évent", "a" * 64, "sqlite_events",
         "event-log", " event"],
    )  # fmt: skip
    def test_table_name_must_be_a_plain_identifier(self, db: Path, name: str) -> None:
        """Anything but a plain SQL identifier is refused before any SQL runs."""
        with pytest.raises(ValueError, match="table"):
            SQLiteEventStorageAdapter(db, table_name=name)
        assert not db.exists()

    async def test_tables_in_one_file_are_independent(self, db: Path) -> None:
        """Adapters with different table names on one file keep separate events."""
        async with (
            SQLiteEventStorageAdapter(db, table_name="event_a") as first,
            SQLiteEventStorageAdapter(db, table_name="event_b") as second,
        ):
            await log_store(first).push_event(note("x", 1, "first"))
            await log_store(second).push_event(note("x", 1, "second"))
            (a,) = (await log_store(first).get_events("x")).events
            (b,) = (await log_store(second).get_events("x")).events
            assert (a.payload.text, b.payload.text) == ("first", "second")


class TestStoredForm:
    @pytest.mark.parametrize(
        "event",
        [
            NoteTaken(
                aggregate_id="a",
                version=1,
                payload=Note(text="é ⚡", when=datetime(2024, 2, 3, 4, 5, 6, 7000, tzinfo=UTC)),
                metadata={"n": 10**30, "f": 0.1, "nested": [{"x": None}]},
            ),
            Tagged(aggregate_id="a", version=1, payload=[1, "two", {"3": 3.5}]),
            Tagged(aggregate_id="a", version=1, payload=0),
            Tagged(aggregate_id="a", version=1, payload=""),
            Tagged(aggregate_id="a", version=1, payload={"when": datetime(2024, 1, 1, tzinfo=UTC)}),
            Shouted(aggregate_id="a", version=1, payload="quiet"),
        ],
    )
    async def test_data_and_metadata_columns_hold_the_events_own_json(
        self, adapter: Any, db: Path, event: Event
    ) -> None:
        """The columns hold exactly the payload/metadata of the event's JSON form."""
        stored = (await log_store(adapter).push_event(event)).event
        with raw(db) as conn:
            data, metadata = conn.execute("SELECT data, metadata FROM event").fetchone()
        expected = json.loads(stored.model_dump_json())
        assert (None if data is None else json.loads(data)) == expected.get("payload")
        assert (None if metadata is None else json.loads(metadata)) == expected.get("metadata")
        (read,) = (await log_store(adapter).get_events("a")).events
        assert read.model_dump_json() == stored.model_dump_json()

    async def test_version_beyond_sqlite_integers_is_refused_clearly(self, adapter: Any) -> None:
        """A version past 2**63-1 raises EventLimitExceededError and stores nothing."""
        store = log_store(adapter)
        with pytest.raises(EventLimitExceededError, match="version"):
            await store.push_event(note("a", 2**63))
        assert (await store.list_aggregate_ids()).aggregate_ids == []

    async def test_read_bounds_beyond_sqlite_integers_work(self, adapter: Any) -> None:
        """Huge min/max versions and limits read like the in-memory adapter does."""
        store = log_store(adapter)
        await store.push_event(note("a", 1))
        assert (await store.get_events("a", min_version=2**70)).events == []
        assert len((await store.get_events("a", max_version=2**70, limit=2**70)).events) == 1

    @pytest.mark.parametrize("column", ["data", "metadata"])
    @pytest.mark.parametrize(
        "text",
        ["{not json", "[" * 250 + "]" * 250],
        ids=["not-json-to-sqlite", "deeper-than-the-validator-parses"],
    )
    async def test_stored_text_that_does_not_parse_names_its_event(
        self, adapter: Any, db: Path, column: str, text: str
    ) -> None:
        """A row whose data or metadata another program made unreadable as JSON (to SQLite,
        or only to the validator) names its aggregate and version, read in either order."""
        store = log_store(adapter)
        for version in (1, 2, 3):
            await store.push_event(note("a", version, metadata={"n": version}))
        with raw(db) as conn:
            conn.execute(f"UPDATE event SET {column} = ? WHERE version = 2", (text,))
        reads: list[Callable[[], Awaitable[object]]] = [
            lambda: store.get_events("a"),
            lambda: store.get_events("a", reverse=True),
            lambda: store.get_aggregate("a"),
        ]
        for read in reads:
            with pytest.raises(StoredEventValidationError) as info:
                await read()
            error = info.value
            assert (error.event_store_id, error.aggregate_id, error.version) == ("LOGS", "a", 2)
            assert "event store LOGS, aggregate a, version 2 " in str(error)
        assert len((await store.get_events("a", min_version=3)).events) == 1

    async def test_long_aggregates_read_in_version_order_both_ways(self, adapter: Any) -> None:
        """Thousands of events pushed out of order read back sorted, also reversed and sliced."""
        store = log_store(adapter)
        versions = list(range(1, 3001))
        random.Random(7).shuffle(versions)
        await EventStore.push_event_group(*(store.group_event(note("a", v)) for v in versions))
        events = (await store.get_events("a")).events
        assert [e.version for e in events] == list(range(1, 3001))
        back = (await store.get_events("a", reverse=True, min_version=10, limit=5)).events
        assert [e.version for e in back] == [3000, 2999, 2998, 2997, 2996]

    async def test_timestamps_an_hour_apart_at_a_clock_change_stay_apart(
        self, adapter: Any
    ) -> None:
        """01:30 before and after New York's clocks go back are 05:30Z and 06:30Z, although
        Python compares them equal: each event keeps its own (given to the adapter directly,
        not normalised by an event store)."""
        new_york = zoneinfo.ZoneInfo("America/New_York")
        first = datetime(2024, 11, 3, 1, 30, tzinfo=new_york)
        second = first.replace(fold=1)
        context = log_store(adapter).context
        await adapter.push_event(note("first", 1, timestamp=first), context)
        await adapter.push_event(note("second", 1, timestamp=second), context)
        (one,) = await adapter.get_events("first", context)
        (two,) = await adapter.get_events("second", context)
        assert (one.timestamp, two.timestamp) == (first.astimezone(UTC), second.astimezone(UTC))
        assert two.timestamp - one.timestamp == timedelta(hours=1)


class TestListingPrecision:
    async def test_sub_millisecond_bounds_and_cursors_match_the_in_memory_adapter(
        self, adapter: Any
    ) -> None:
        """Inclusive bounds and cursors finer than a millisecond select what memory selects."""
        memory = InMemoryEventStorageAdapter()
        stores = [log_store(adapter), log_store(memory)]
        for store in stores:
            for i, ms in enumerate([0, 1, 1, 2, 3, 3, 4]):
                await store.push_event(note(f"a{i}", 1, timestamp=ts(ms)))
        half = timedelta(microseconds=500)
        cases: list[dict[str, Any]] = [
            {"initial_event_after": ts(1) - half},
            {"initial_event_after": ts(1) + half},
            {"initial_event_before": ts(3) - half},
            {"initial_event_before": ts(3) + half, "reverse": True},
            {"initial_event_after": (ts(2) + half).astimezone(timezone(timedelta(hours=5)))},
            {"initial_event_after": datetime.max.replace(tzinfo=UTC)},
            {"initial_event_before": datetime.min.replace(tzinfo=UTC)},
        ]
        for token_ts in (ts(1) + half, ts(3) - half, ts(3)):
            for reverse in (False, True):
                token = json.dumps(
                    {
                        "reverse": reverse,
                        "lastEvaluatedKey": {
                            "aggregateId": "a2",
                            "initialEventTimestamp": token_ts.isoformat(),
                        },
                    }
                )
                cases.append({"page_token": token})
        for options in cases:
            results = [await store.list_aggregate_ids(**options) for store in stores]
            assert results[0] == results[1], options


class TestErrors:
    @pytest.mark.parametrize(
        ("where", "reason"),
        [
            ("missing/events.db", "directory .*missing' does not exist"),
            (".", "it is a directory"),
            ("sqlite:///events.db", "it is a URL; give a file path"),
        ],
    )
    async def test_a_path_that_cannot_open_is_a_mistake_not_an_outage(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, reason: str
    ) -> None:
        """A missing directory, a directory or a URL given as the file raises StorageError
        naming the reason, from sqlite3's error: not StorageUnavailableError, which says
        that retrying may help (it did)."""
        monkeypatch.chdir(tmp_path)
        adapter = SQLiteEventStorageAdapter(where)
        with pytest.raises(StorageError, match=reason) as info:
            await log_store(adapter).get_events("a")
        assert not isinstance(info.value, StorageUnavailableError)
        assert isinstance(info.value.__cause__, sqlite3.Error)
        with pytest.raises(StorageError, match=reason):
            async with adapter:
                pass
        await adapter.aclose()
        assert os.listdir(tmp_path) == []

    async def test_a_file_that_is_not_a_database_is_a_storage_error(self, db: Path) -> None:
        """Garbage in the file is a StorageError (not retriable), caused by sqlite3's error."""
        await asyncio.to_thread(db.write_bytes, b"this is not a database file at all" * 200)
        adapter = SQLiteEventStorageAdapter(db)
        with pytest.raises(StorageError) as info:
            await log_store(adapter).push_event(note("a", 1))
        assert not isinstance(info.value, StorageUnavailableError)
        assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
        await adapter.aclose()

    async def test_lock_held_past_busy_timeout_is_storage_unavailable(self, db: Path) -> None:
        """A lock held past busy_timeout gives StorageUnavailableError, not 'database is locked'."""
        async with SQLiteEventStorageAdapter(db, busy_timeout=0.05) as adapter:
            store = log_store(adapter)
            with raw(db) as holder:
                holder.execute("BEGIN IMMEDIATE")
                with pytest.raises(StorageUnavailableError, match="busy_timeout") as info:
                    await store.push_event(note("a", 1))
                assert isinstance(info.value.__cause__, sqlite3.OperationalError)
                with pytest.raises(StorageUnavailableError):
                    await EventStore.push_event_group(store.group_event(note("b", 1)))
                holder.execute("ROLLBACK")
            assert (await store.list_aggregate_ids()).aggregate_ids == []

    async def test_a_write_waits_for_a_lock_released_within_busy_timeout(self, db: Path) -> None:
        """A push that finds the file locked retries without blocking the loop, then succeeds."""
        async with SQLiteEventStorageAdapter(db, busy_timeout=30) as adapter:
            store = log_store(adapter)
            with raw(db) as holder:
                holder.execute("BEGIN IMMEDIATE")
                holder.execute(
                    "INSERT INTO event (aggregate_name, aggregate_id, version, type, timestamp)"
                    " VALUES ('LOGS', 'a', 1, 'TAGGED', '2024-01-01T00:00:00.000Z')"
                )
                push = asyncio.ensure_future(store.push_event(note("a", 1)))
                group = asyncio.ensure_future(
                    EventStore.push_event_group(store.group_event(note("b", 1)))
                )
                await yield_until_blocked(push)
                await yield_until_blocked(group)
                # Readers are never blocked by the writer in WAL mode.
                assert (await store.get_events("a")).events == []
                holder.execute("COMMIT")
            with pytest.raises(EventAlreadyExistsError):
                await push
            await group
            assert [e.aggregate_id for e in (await store.list_aggregate_ids()).aggregate_ids] == [
                "a",
                "b",
            ]


class TestCancellationUnderContention:
    @pytest.mark.parametrize("size", [1, 2, 5])
    async def test_cancelling_a_blocked_push_or_group_at_any_point_writes_nothing(
        self, db: Path, size: int
    ) -> None:
        """Cancelled while retrying a locked file, nothing is written and no lock is kept."""
        async with SQLiteEventStorageAdapter(db, busy_timeout=30) as adapter:
            store = log_store(adapter)
            for steps in range(12):
                ids = [f"s{size}-{steps}-{i}" for i in range(size)]
                with raw(db) as holder:
                    holder.execute("BEGIN IMMEDIATE")
                    if size == 1:
                        task = asyncio.ensure_future(store.push_event(note(ids[0], 1)))
                    else:
                        task = asyncio.ensure_future(
                            EventStore.push_event_group(
                                *(store.group_event(note(i, 1)) for i in ids)
                            )
                        )
                    for _ in range(steps):
                        await asyncio.sleep(0)
                    task.cancel()
                    holder.execute("COMMIT")
                with pytest.raises(asyncio.CancelledError):
                    await task
                for aggregate_id in ids:
                    assert (await store.get_events(aggregate_id)).events == []
                # Nobody holds the write lock: the adapter left no transaction open.
                with raw(db) as probe:
                    probe.execute("BEGIN IMMEDIATE")
                    probe.execute("ROLLBACK")
            await store.push_event(note("after", 1))

    async def test_cancelling_at_random_points_amid_contention_is_all_or_nothing(
        self, db: Path
    ) -> None:
        """Random cancellations while another connection contends never split a group."""
        rng = random.Random(3)
        async with SQLiteEventStorageAdapter(db, busy_timeout=30) as adapter:
            store = log_store(adapter)
            with raw(db) as other:
                for round_ in range(60):
                    ids = [f"r{round_}-{i}" for i in range(rng.randint(1, 4))]
                    if rng.random() < 0.5:
                        other.execute("BEGIN IMMEDIATE")
                    task = asyncio.ensure_future(
                        EventStore.push_event_group(*(store.group_event(note(i, 1)) for i in ids))
                    )
                    for _ in range(rng.randint(0, 3)):
                        await asyncio.sleep(0)
                    if other.in_transaction:
                        other.execute("COMMIT")
                    for _ in range(rng.randint(0, 3)):
                        await asyncio.sleep(0)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    counts = {len((await store.get_events(i)).events) for i in ids}
                    assert counts in ({0}, {1}), (round_, counts)
                    assert task.cancelled() == (counts == {0})


async def turns_of_other_tasks(work: Callable[[], Awaitable[None]]) -> int:
    """How many times another task ran while ``work`` ran."""
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    started = ticks
    try:
        await work()
        return ticks - started
    finally:
        stop.set()
        await task


class TestEventLoop:
    async def test_a_long_burst_of_calls_lets_other_tasks_run(self, adapter: Any) -> None:
        """Back-to-back pushes that never wait still yield to the loop now and then."""
        store = log_store(adapter)
        count = 0

        async def burst() -> None:
            nonlocal count
            loop = asyncio.get_running_loop()
            begin = loop.time()
            while loop.time() - begin < 0.1:
                count += 1
                await store.push_event(note(f"burst-{count}", 1))

        during = await turns_of_other_tasks(burst)
        assert during >= 3, (during, count)

    async def test_a_burst_with_slow_steps_between_calls_still_yields(self, adapter: Any) -> None:
        """Time between two calls does not prove the loop had a turn: a caller that computes
        (here: sleeps without yielding) 2 ms between pushes still lets other tasks run."""
        store = log_store(adapter)

        async def slow_burst() -> None:
            for count in range(50):  # about 100 ms, never waiting
                time.sleep(0.002)  # noqa: ASYNC251 - the point: work that does not yield
                await store.push_event(note(f"slow-{count}", 1))

        assert await turns_of_other_tasks(slow_burst) >= 3

    def test_each_event_loop_keeps_its_own_burst_clock(self, db: Path) -> None:
        """A burst on one loop yields although another loop (in another thread) calls the
        same adapter between each two of its calls."""
        adapter = SQLiteEventStorageAdapter(db)
        store = log_store(adapter)
        go, done, stop = threading.Event(), threading.Event(), threading.Event()
        other_calls = 0

        async def other_loop() -> None:
            nonlocal other_calls
            while not stop.is_set():
                if go.is_set():
                    go.clear()
                    await store.get_events("other")
                    other_calls += 1
                    done.set()
                await asyncio.sleep(0.0002)

        async def burst() -> None:
            for count in range(50):
                # Work that does not yield, during which the other loop makes one call
                # (never at the same time as this loop's calls: no wait for the lock).
                go.set()
                assert done.wait(5), "the other loop did not call"
                done.clear()
                time.sleep(0.002)  # noqa: ASYNC251 - the point: work that does not yield
                await store.push_event(note(f"slow-{count}", 1))

        async def main() -> int:
            return await turns_of_other_tasks(burst)

        thread = threading.Thread(target=lambda: asyncio.run(other_loop()))
        thread.start()
        try:
            during = asyncio.run(main())
        finally:
            stop.set()
            thread.join()
        asyncio.run(adapter.aclose())
        assert other_calls == 50
        assert during >= 3, during

    def test_a_closed_event_loop_is_not_kept_alive(self, db: Path) -> None:
        """The adapter remembers the loop it last ran on without keeping it alive, and
        works on the next one."""
        adapter = SQLiteEventStorageAdapter(db)
        store = log_store(adapter)
        loop = asyncio.new_event_loop()
        loop.run_until_complete(store.push_event(note("first", 1)))
        loop.close()
        gone = weakref.ref(loop)
        del loop
        gc.collect()
        assert gone() is None
        asyncio.run(store.push_event(note("second", 1)))
        assert len(asyncio.run(store.get_events("second")).events) == 1
        asyncio.run(adapter.aclose())


class TestThreads:
    def test_adapters_in_several_threads_append_without_loss(self, db: Path) -> None:
        """Four threads, each with its own loop and adapter, race appends; none is lost."""
        per_thread = 60
        acknowledged: list[list[int]] = []

        async def append_many() -> list[int]:
            got: list[int] = []
            async with SQLiteEventStorageAdapter(db, busy_timeout=30) as adapter:
                store = log_store(adapter)
                while len(got) < per_thread:
                    last = (await store.get_events("hot", reverse=True, limit=1)).events
                    version = last[0].version + 1 if last else 1
                    try:
                        await store.push_event(note("hot", version))
                    except EventAlreadyExistsError:
                        continue
                    got.append(version)
            return got

        threads = [
            threading.Thread(target=lambda: acknowledged.append(asyncio.run(append_many())))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        every = sorted(v for got in acknowledged for v in got)
        assert every == list(range(1, 4 * per_thread + 1))

    async def test_one_adapter_shared_by_threads_serialises_its_connection(self, db: Path) -> None:
        """One adapter used from two threads' loops at once keeps working and loses nothing."""
        async with SQLiteEventStorageAdapter(db) as adapter:
            store = log_store(adapter)

            def run(prefix: str) -> None:
                async def go() -> None:
                    for i in range(150):
                        await store.push_event(note(f"{prefix}{i}", 1))
                        await store.get_events(f"{prefix}{i}")

                asyncio.run(go())

            await asyncio.gather(asyncio.to_thread(run, "x"), asyncio.to_thread(run, "y"))
            assert len((await store.list_aggregate_ids()).aggregate_ids) == 300


class TestGroups:
    async def test_group_spans_tables_of_one_file_in_one_transaction(self, db: Path) -> None:
        """Adapters on one file, different tables, share a group; each event goes to its table."""
        async with (
            SQLiteEventStorageAdapter(db, table_name="event_a") as first,
            SQLiteEventStorageAdapter(db, table_name="event_b") as second,
        ):
            a, b = log_store(first, "A"), log_store(second, "B")
            await b.push_event(note("taken", 1))
            with pytest.raises(EventAlreadyExistsError) as info:
                await EventStore.push_event_group(
                    a.group_event(note("x", 1)), b.group_event(note("taken", 1))
                )
            assert (info.value.event_store_id, info.value.aggregate_id) == ("B", "taken")
            assert (await a.get_events("x")).events == []
            await EventStore.push_event_group(
                a.group_event(note("x", 1)), b.group_event(note("y", 1))
            )
            with raw(db) as conn:
                assert conn.execute("SELECT aggregate_id FROM event_a").fetchall() == [("x",)]
                assert conn.execute("SELECT aggregate_id FROM event_b ORDER BY 1").fetchall() == [
                    ("taken",),
                    ("y",),
                ]

    async def test_group_creates_a_table_not_yet_used_and_rolls_it_back_on_failure(
        self, db: Path
    ) -> None:
        """A grouped event for a table never opened creates it inside the group's transaction."""
        async with SQLiteEventStorageAdapter(db) as head:
            fresh = SQLiteEventStorageAdapter(db, table_name="fresh")
            main, other = log_store(head), log_store(fresh, "F")
            await main.push_event(note("taken", 1))
            with pytest.raises(EventAlreadyExistsError):
                await EventStore.push_event_group(
                    main.group_event(note("m", 1)),
                    other.group_event(note("f", 1)),
                    main.group_event(note("taken", 1)),
                )
            with raw(db) as conn:
                names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            assert "fresh" not in names
            await EventStore.push_event_group(
                main.group_event(note("m", 1)), other.group_event(note("f", 1))
            )
            assert len((await other.get_events("f")).events) == 1
            await fresh.aclose()

    async def test_group_across_database_files_is_refused_before_writing(
        self, tmp_path: Path
    ) -> None:
        """Adapters on different files (or private memory) cannot share a group."""
        async with (
            SQLiteEventStorageAdapter(tmp_path / "one.db") as one,
            SQLiteEventStorageAdapter(tmp_path / "two.db") as two,
            SQLiteEventStorageAdapter(":memory:") as memory,
        ):
            stores = [log_store(one), log_store(two), log_store(memory)]
            for head, tail in [(0, 1), (1, 0), (0, 2), (2, 0)]:
                with pytest.raises(EventGroupError, match="another database"):
                    await EventStore.push_event_group(
                        stores[head].group_event(note("g", 1)),
                        stores[tail].group_event(note("g", 1)),
                    )
            for store in stores:
                assert (await store.get_events("g")).events == []

    async def test_group_through_a_symlinked_path_is_the_same_database(
        self, tmp_path: Path
    ) -> None:
        """Two paths naming one file (a symlink) count as the same database."""
        real = tmp_path / "real.db"
        link = tmp_path / "link.db"
        async with SQLiteEventStorageAdapter(real) as first:
            await log_store(first).get_events("warm-up")
            link.symlink_to(real)
            async with SQLiteEventStorageAdapter(link) as second:
                await EventStore.push_event_group(
                    log_store(first).group_event(note("a", 1)),
                    log_store(second, "OTHER").group_event(note("b", 1)),
                )
                assert len((await log_store(first, "OTHER").get_events("b")).events) == 1

    async def test_group_with_an_in_memory_adapter_is_refused(self, adapter: Any) -> None:
        """A grouped event on another kind of adapter is an EventGroupError."""
        sqlite, memory = log_store(adapter), log_store(InMemoryEventStorageAdapter())
        with pytest.raises(EventGroupError, match="SQLiteEventStorageAdapter"):
            await EventStore.push_event_group(
                sqlite.group_event(note("a", 1)), memory.group_event(note("b", 1))
            )
        assert (await sqlite.get_events("a")).events == []


class TestReviewedEdges:
    """Edges a review reproduced: each used to write elsewhere, leak an error or keep working."""

    async def test_a_relative_path_keeps_its_file_when_the_directory_changes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The file is the one the path named when the adapter was made: an adapter first
        used after a chdir used to open another file, while groups, which compare the files
        resolved at construction, wrote its events into the first one."""
        first_dir, second_dir = tmp_path / "one", tmp_path / "two"
        first_dir.mkdir()
        second_dir.mkdir()
        monkeypatch.chdir(first_dir)
        head = SQLiteEventStorageAdapter("events.db")
        other = SQLiteEventStorageAdapter("events.db", table_name="other")
        try:
            a, b = log_store(head, "A"), log_store(other, "B")
            await a.push_event(note("x", 1))
            monkeypatch.chdir(second_dir)
            await EventStore.push_event_group(
                a.group_event(note("x", 2)), b.group_event(note("y", 1))
            )
            await b.push_event(note("z", 1))
            assert [e.aggregate_id for e in (await b.get_events("y")).events] == ["y"]
            assert not (second_dir / "events.db").exists()
            with raw(first_dir / "events.db") as conn:
                ids = conn.execute("SELECT aggregate_id FROM other ORDER BY 1").fetchall()
            assert ids == [("y",), ("z",)]
        finally:
            await head.aclose()
            await other.aclose()

    async def test_lone_surrogates_are_refused_as_other_adapters_refuse_them(
        self, adapter: SQLiteEventStorageAdapter
    ) -> None:
        """No aggregate id holding a lone surrogate can be stored: reads find nothing, a
        page token naming one is invalid, and a write through the bare adapter (no event
        store to check it) is an EventLimitExceededError. They raised UnicodeEncodeError."""
        store = log_store(adapter)
        await store.push_event(note("ok", 1))
        assert (await store.get_events("\ud800")).events == []
        token = json.dumps(
            {
                "lastEvaluatedKey": {
                    "aggregateId": "\ud800",
                    "initialEventTimestamp": "2024-01-01T00:00:00.000Z",
                }
            }
        )
        with pytest.raises(InvalidPageTokenError, match="surrogate"):
            await store.list_aggregate_ids(page_token=token)
        bad = note("\ud800", 1).model_copy()
        with pytest.raises(EventLimitExceededError, match="surrogate"):
            await adapter.push_event(bad, store._context)
        with pytest.raises(EventLimitExceededError, match="surrogate"):
            await adapter.push_event_group(
                [store.group_event(note("ok2", 1)), adapter.group_event(bad, store._context)]
            )
        listed = (await store.list_aggregate_ids()).aggregate_ids
        assert [entry.aggregate_id for entry in listed] == ["ok"]

    async def test_a_file_uri_is_opened_as_given(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A "file:" name is a URI to SQLite: resolving it as a path (to keep relative paths
        to their directory) opened a file named like the URI instead."""
        monkeypatch.chdir(tmp_path)
        async with SQLiteEventStorageAdapter("file:shared.db?mode=rwc") as adapter:
            await log_store(adapter).push_event(note("x", 1))
        names = os.listdir(tmp_path)
        assert sorted(name for name in names if "shared" in name) == ["shared.db"]
        with raw(tmp_path / "shared.db") as conn:
            assert conn.execute("SELECT aggregate_id FROM event").fetchall() == [("x",)]

    async def test_a_group_gets_the_strictest_durability_of_its_adapters(self, db: Path) -> None:
        """A group whose first adapter is NORMAL but holds events of a FULL adapter commits
        with synchronous=FULL, then the connection goes back to NORMAL."""
        async with (
            SQLiteEventStorageAdapter(db) as head,
            SQLiteEventStorageAdapter(db, table_name="ledger", synchronous="FULL") as ledger,
        ):
            a, b = log_store(head, "A"), log_store(ledger, "B")
            conn = head._conn
            assert conn is not None
            statements: list[str] = []
            conn.set_trace_callback(statements.append)
            await EventStore.push_event_group(
                a.group_event(note("x", 1)), b.group_event(note("y", 1))
            )
            await EventStore.push_event_group(a.group_event(note("x", 2)))
            conn.set_trace_callback(None)
            begins = [i for i, s in enumerate(statements) if s == "BEGIN IMMEDIATE"]
            assert len(begins) == 2
            full = statements.index("PRAGMA synchronous = FULL")
            back = statements.index("PRAGMA synchronous = NORMAL")
            assert full < begins[0] < statements.index("COMMIT") < back < begins[1]
            assert statements.count("PRAGMA synchronous = FULL") == 1
            assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL

    async def test_a_cancelled_aclose_still_closes_the_adapter(self, db: Path) -> None:
        """aclose waits for running operations; cancelled while it waited, it used to leave
        the adapter working. Later calls now fail as on a closed adapter, and the connection
        is closed."""
        adapter = SQLiteEventStorageAdapter(db)
        store = log_store(adapter)
        await store.push_event(note("x", 1))
        assert adapter._lock.acquire(blocking=False)  # an operation holds the adapter
        closing = asyncio.create_task(adapter.aclose())
        await asyncio.sleep(0.01)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        adapter._lock.release()
        with pytest.raises(StorageError, match="closed"):
            await store.push_event(note("x", 2))
        assert adapter._conn is None
        await adapter.aclose()
        with raw(db) as conn:
            assert conn.execute("SELECT version FROM event").fetchall() == [(1,)]


class TestUris:
    """``file:`` names: always URIs, resolved like paths, private when in memory."""

    @pytest.mark.parametrize(
        "uri", ["file::memory:", "file:memdb1?mode=memory", "file:events?vfs=memdb"]
    )
    async def test_a_group_never_spans_two_private_uri_databases(self, uri: str) -> None:
        """Two adapters on one in-memory URI have a database each: a group across them was
        written on the first one's connection, so the second store's event went into the
        first adapter's database."""
        async with SQLiteEventStorageAdapter(uri) as a, SQLiteEventStorageAdapter(uri) as b:
            first, second = log_store(a, "A"), log_store(b, "B")
            with pytest.raises(EventGroupError, match="private to each adapter"):
                await EventStore.push_event_group(
                    first.group_event(note("x", 1)), second.group_event(note("y", 1))
                )
            assert (await first.get_events("x")).events == []
            assert (await log_store(a, "B").get_events("y")).events == []

    @pytest.mark.parametrize(
        "uri",
        [
            "file:shared1?mode=memory&cache=shared",
            "file::memory:?cache=shared",
            "file:/shared-events?vfs=memdb",
        ],
    )
    async def test_a_group_spans_adapters_sharing_one_in_memory_database(self, uri: str) -> None:
        """A shared-cache or memdb database is one database for all the process's
        connections to its name: groups across its adapters are one transaction (the
        first fix of the case above refused them)."""
        async with SQLiteEventStorageAdapter(uri) as a, SQLiteEventStorageAdapter(uri) as b:
            first, second = log_store(a, "A"), log_store(b, "B")
            await EventStore.push_event_group(
                first.group_event(note("x", 1)), second.group_event(note("y", 1))
            )
            assert [e.aggregate_id for e in (await second.get_events("y")).events] == ["y"]
            assert [e.aggregate_id for e in (await log_store(b, "A").get_events("x")).events] == [
                "x"
            ]
            other = SQLiteEventStorageAdapter("file:other?mode=memory&cache=shared")
            async with other:
                with pytest.raises(EventGroupError, match="another database"):
                    await EventStore.push_event_group(
                        first.group_event(note("x", 2)), log_store(other).group_event(note("z", 1))
                    )

    async def test_a_file_uri_and_a_path_to_one_file_group(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A relative ``file:`` URI names the file its path does, resolved when the adapter
        is made: a group across it and a plain path was refused, and after a change of
        directory the URI opened another file."""
        monkeypatch.chdir(tmp_path)
        uri = SQLiteEventStorageAdapter("file:events.db?mode=rwc")
        path = SQLiteEventStorageAdapter(tmp_path / "events.db", table_name="other")
        try:
            monkeypatch.chdir(tmp_path.parent)
            await EventStore.push_event_group(
                log_store(uri, "A").group_event(note("x", 1)),
                log_store(path, "B").group_event(note("y", 1)),
            )
        finally:
            await uri.aclose()
            await path.aclose()
        assert not (tmp_path.parent / "events.db").exists()
        with raw(tmp_path / "events.db") as conn:
            assert conn.execute("SELECT aggregate_id FROM event").fetchall() == [("x",)]
            assert conn.execute("SELECT aggregate_id FROM other").fetchall() == [("y",)]

    async def test_file_names_are_opened_as_uris_whatever_the_build(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without ``uri=True``, a SQLite built without SQLITE_USE_URI (the library's
        default) takes ``file:...`` for a file name: ``mode=ro`` protected nothing."""
        opened: list[tuple[str, bool]] = []
        connect = sqlite3.connect

        def recording(database: str, **kwargs: Any) -> sqlite3.Connection:
            opened.append((database, kwargs.get("uri", False)))
            return connect(database, **kwargs)

        monkeypatch.setattr(sqlite3, "connect", recording)
        async with SQLiteEventStorageAdapter(f"file:{tmp_path / 'a b.db'}?mode=rwc"):
            pass
        async with SQLiteEventStorageAdapter(tmp_path / "plain.db"):
            pass
        real = tmp_path.resolve()  # noqa: ASYNC240 - a test, no loop to keep free
        assert opened == [
            (f"{(real / 'a b.db').as_uri()}?mode=rwc", True),
            (str(real / "plain.db"), False),
        ]
        assert (tmp_path / "a b.db").exists()


class TestTimestampsWrittenByOthers:
    """Rows changed by other tools: listing reads their timestamps as events read them."""

    @pytest.mark.parametrize("text", ["yesterday", "2024-01-01 00:00:00"])
    async def test_a_timestamp_that_does_not_validate_fails_listing_as_reading(
        self, adapter: SQLiteEventStorageAdapter, db: Path, text: str
    ) -> None:
        """Listing raised a bare ValueError for text that is no timestamp, and listed a
        timestamp without a zone (SQL's ``datetime('now')`` form) that reading refuses."""
        store = log_store(adapter)
        await store.push_event(note("x", 1))
        with raw(db) as conn:
            conn.execute("UPDATE event SET timestamp = ?", (text,))
        with pytest.raises(StoredEventValidationError) as reading:
            await store.get_events("x")
        with pytest.raises(StoredEventValidationError) as listing:
            await store.list_aggregate_ids()
        assert (listing.value.aggregate_id, listing.value.version) == ("x", 1)
        assert reading.value.aggregate_id == listing.value.aggregate_id

    async def test_a_timestamp_in_another_zone_is_listed_in_utc(
        self, adapter: SQLiteEventStorageAdapter, db: Path
    ) -> None:
        store = log_store(adapter)
        await store.push_event(note("x", 1))
        with raw(db) as conn:
            conn.execute("UPDATE event SET timestamp = '2024-01-01T02:00:00.123456+02:00'")
        (entry,) = (await store.list_aggregate_ids()).aggregate_ids
        assert entry.initial_event_timestamp == datetime(2024, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
        assert entry.initial_event_timestamp.tzinfo is UTC


class TestEventsTooLongForSQLite:
    async def test_text_longer_than_sqlite_takes_is_a_limit_of_the_event(
        self, adapter: SQLiteEventStorageAdapter
    ) -> None:
        """A payload longer than SQLite's longest string (here lowered from its 1 GB) was a
        generic StorageError on a push and a group; nothing is written either way."""
        assert adapter._conn is not None
        adapter._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 5000)
        store = log_store(adapter)
        long = note("x", 1, text="p" * 6000)
        with pytest.raises(EventLimitExceededError, match="SQLITE_LIMIT_LENGTH"):
            await store.push_event(long)
        with pytest.raises(EventLimitExceededError, match="SQLITE_LIMIT_LENGTH"):
            await EventStore.push_event_group(
                store.group_event(note("y", 1)), store.group_event(long)
            )
        assert (await store.list_aggregate_ids()).aggregate_ids == []
        await store.push_event(note("x", 1))

    async def test_an_event_whose_json_would_not_read_back_is_refused(
        self, adapter: SQLiteEventStorageAdapter
    ) -> None:
        """A row within SQLite's longest string whose event JSON (as reads build it) is
        longer was stored and listed, and every read of its aggregate failed."""
        store = EventStore(
            event_store_id="LOGS", event_types=[NoteTaken], reducer=reduce_log,
            event_storage_adapter=adapter, limits=EventLimits(max_bytes=4 << 20),
        )  # fmt: skip
        long = store.context.validate_input(note("x", 1, text="p" * (1 << 20)))
        row = adapter._row(long, "LOGS")
        assert adapter._conn is not None
        adapter._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, len(row[4]) + 60)
        with pytest.raises(EventLimitExceededError, match="could not be read back"):
            await store.push_event(long)
        assert (await store.list_aggregate_ids()).aggregate_ids == []
        assert (await store.get_events("x")).events == []

    def test_an_overflow_blames_the_version_only_when_it_is_the_version(self) -> None:
        """Python's sqlite3 raises OverflowError for text of 2 GiB or more too: it was
        reported as a version that does not fit SQLite's integers. (Faked here: binding
        2 GiB takes that much memory.)"""

        class Refusing:
            def execute(self, sql: str, row: tuple[Any, ...]) -> None:
                raise OverflowError("string longer than INT_MAX bytes")

        execute = SQLiteEventStorageAdapter._execute_insert
        row = ("LOGS", "x", 1, "NOTE_TAKEN", '{"text":"hi"}', None, "2024-01-01T00:00:00.000Z")
        with pytest.raises(EventLimitExceededError, match="2 GiB") as info:
            execute(Refusing(), "INSERT", row, note("x", 1))  # type: ignore[arg-type]
        assert info.value.path == ()
        huge = note("x", 1).model_copy(update={"version": 2**63})
        with pytest.raises(EventLimitExceededError, match="64-bit") as info:
            execute(Refusing(), "INSERT", row, huge)  # type: ignore[arg-type]
        assert info.value.path == ("version",)
