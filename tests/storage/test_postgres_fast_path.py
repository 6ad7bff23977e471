"""The PostgreSQL adapter's fast path: kept connections and statements sent through libpq.

The adapter keeps idle connections of its own pool between operations, and sends its
frequent statements as prepared statements on the connection's ``PGconn``. These tests pin
what that must not change: other users of the pool get connections, prepared statements
survive their loss and never mistype a value, other client encodings read back exactly, and
closing the adapter closes everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any, Literal

import psycopg
import pytest
from pydantic import ConfigDict

from castore_pydantic import Event, EventStore
from castore_pydantic.errors import (
    EventLimitExceededError,
    StorageError,
    StorageUnavailableError,
    StoredEventValidationError,
)
from castore_pydantic.storage import _postgres_connection as connections
from castore_pydantic.storage import _postgres_direct as direct
from castore_pydantic.storage import _postgres_wait as wait
from castore_pydantic.storage import postgres as postgres_module
from castore_pydantic.storage.postgres import PostgresEventStorageAdapter
from castore_pydantic.testing.contracts._storage import NoteAdded, created
from tests.storage.gc_support import cancelled_midway, collector_watch
from tests.storage.postgres_support import (
    DSN,
    counter_store,
    fetch,
    make_table,
    pg_schema,
    wait_for,
)

__all__ = ["pg_schema"]

pytestmark = pytest.mark.postgres

direct_rows_supported = psycopg.capabilities.has_stream_chunked()


async def adapter_for(schema: str, **options: Any) -> PostgresEventStorageAdapter:
    return PostgresEventStorageAdapter(
        DSN, schema=schema, table_name=await make_table(schema), **options
    )


@pytest.fixture
async def small(pg_schema: str) -> AsyncIterator[PostgresEventStorageAdapter]:
    """An adapter whose pool holds one connection and gives up waiting after a second."""
    async with await adapter_for(pg_schema, min_size=1, max_size=1, timeout=1.0) as adapter:
        yield adapter


class TestKeptConnections:
    async def test_the_pool_gets_a_kept_connection_back_for_its_other_users(
        self, small: PostgresEventStorageAdapter
    ) -> None:
        """The adapter's only connection is kept after a push, yet ``pool.connection()`` works."""
        await counter_store(small).push_event(created("a1"))
        async with small.pool.connection(timeout=1.0) as conn:
            cursor = await conn.execute("SELECT 1")
            assert await cursor.fetchone() == (1,)

    async def test_more_operations_than_connections_all_complete(
        self, small: PostgresEventStorageAdapter
    ) -> None:
        """Forty concurrent pushes share one connection; none times out waiting for it."""
        store = counter_store(small)
        await asyncio.gather(*(store.push_event(created(f"c{i}")) for i in range(40)))
        for i in range(40):
            assert len((await store.get_events(f"c{i}")).events) == 1

    async def test_an_adapter_waits_for_a_connection_held_outside(
        self, small: PostgresEventStorageAdapter
    ) -> None:
        """While another user holds the only connection, the adapter times out cleanly."""
        store = counter_store(small)
        await store.push_event(created("a1"))
        async with small.pool.connection(timeout=1.0):
            with pytest.raises(StorageUnavailableError, match="no PostgreSQL connection") as info:
                await store.get_events("a1")
            assert not info.value.outcome_unknown  # nothing was sent
        assert len((await store.get_events("a1")).events) == 1

    async def test_closing_the_adapter_closes_kept_connections(self, pg_schema: str) -> None:
        name = f"castore-kept-{uuid.uuid4().hex[:8]}"
        adapter = await adapter_for(
            pg_schema, min_size=1, max_size=4, connect_kwargs={"application_name": name}
        )
        async with adapter:
            store = counter_store(adapter)
            await asyncio.gather(*(store.push_event(created(f"k{i}")) for i in range(12)))
            assert adapter._conns.kept >= 1

        async def none_left() -> bool:
            rows = await fetch(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", name
            )
            return bool(rows[0][0] == 0)

        await wait_for(none_left, what="the adapter's connections to close")


class TestDirectStatements:
    async def test_prepared_statements_dropped_by_someone_else_are_prepared_again(
        self, small: PostgresEventStorageAdapter
    ) -> None:
        store = counter_store(small)
        await store.push_event(created("a1"))
        await store.get_events("a1")
        conn = await small._conns.acquire("test")
        await conn.execute("DEALLOCATE ALL")
        await small._conns.release(conn)
        await store.push_event(created("a2"))
        assert len((await store.get_events("a2")).events) == 1

    async def test_statements_are_prepared_unless_the_connection_says_not_to(
        self, pg_schema: str
    ) -> None:
        """``prepare_threshold=None`` (behind PgBouncer) keeps the server free of them."""
        for threshold, expect_prepared in ((5, True), (None, False)):
            options = {"connect_kwargs": {"prepare_threshold": threshold}, "max_size": 1}
            async with await adapter_for(pg_schema, **options) as adapter:
                store = counter_store(adapter)
                await store.push_event(created("a1"))
                assert len((await store.get_events("a1")).events) == 1
                conn = await adapter._conns.acquire("test")
                cursor = await conn.execute(
                    "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'castore%%'"
                )
                row = await cursor.fetchone()
                await adapter._conns.release(conn)
            assert row is not None
            assert (row[0] > 0) is expect_prepared, (threshold, row)

    async def test_versions_of_every_integer_size_on_one_connection(
        self, small: PostgresEventStorageAdapter
    ) -> None:
        """psycopg types 1 as smallint and 2**40 as bigint: each gets a statement of its own."""
        store = counter_store(small)
        versions = [1, 40_000, 3_000_000_000, 2**40]
        for version in versions:
            await store.push_event(NoteAdded(aggregate_id="big", version=version, payload={}))
        stored = (await store.get_events("big", min_version=2**35)).events
        assert [event.version for event in stored] == [2**40]
        assert [e.version for e in (await store.get_events("big")).events] == versions

    async def test_another_client_encoding_reads_back_exactly(self, pg_schema: str) -> None:
        options = {"connect_kwargs": {"client_encoding": "LATIN1"}, "max_size": 1}
        async with await adapter_for(pg_schema, **options) as adapter:
            store = counter_store(adapter)
            await store.push_event(NoteAdded(aggregate_id="café", version=1, payload={"é": "ü"}))
            events = (await store.get_events("café")).events
            assert [(e.aggregate_id, e.payload) for e in events] == [("café", {"é": "ü"})]
            other = counter_store(adapter, store.event_store_id)
            await EventStore.push_event_group(
                other.group_event(NoteAdded(aggregate_id="naïve", version=1, payload={}))
            )
            assert len((await store.get_events("naïve")).events) == 1


async def long_aggregate(store: Any, aggregate_id: str, size: int, **payload: Any) -> None:
    """Store ``size`` notes on one aggregate (more than one streamed batch when large)."""
    await EventStore.push_event_group(
        *(
            store.group_event(NoteAdded(aggregate_id=aggregate_id, version=v, payload=payload))
            for v in range(1, size + 1)
        )
    )


#: Rows of one text column, failing on the server at row 2,500 of 3,000.
FAILS_AT_2500 = (
    "SELECT CASE WHEN g < 2500 THEN g::text ELSE (1 / (g - g))::text END"
    " FROM generate_series(1, 3000) AS g"
)


@pytest.mark.skipif(not direct_rows_supported, reason="libpq older than 17: no chunked rows")
class TestStreamedRows:
    """``direct.stream``, which long reads use: batches as they come, failures mid-way."""

    async def test_a_long_read_in_another_client_encoding_reads_back_exactly(
        self, pg_schema: str
    ) -> None:
        options = {"connect_kwargs": {"client_encoding": "LATIN1"}, "max_size": 1}
        async with await adapter_for(pg_schema, **options) as adapter:
            store = counter_store(adapter)
            await long_aggregate(store, "café", 2500, é="ü")
            events = (await store.get_events("café")).events
        assert [e.version for e in events] == list(range(1, 2501))
        assert {(e.aggregate_id, e.payload["é"]) for e in events} == {("café", "ü")}

    async def test_batches_before_a_server_error_arrive_and_the_connection_stays_usable(
        self, small: PostgresEventStorageAdapter
    ) -> None:
        batches: list[list[bytes | None]] = []
        conn = await small._conns.acquire("test")
        try:
            with pytest.raises(psycopg.errors.DivisionByZero):
                await direct.stream(conn, FAILS_AT_2500, (), 1000, batches.append)
            # Two full batches came before the error; the 499 rows after them did not.
            assert [len(batch) for batch in batches] == [1000, 1000]
            assert batches[1][-1] == b"2000"
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert (await direct.execute(conn, "SELECT 1", ())).get_value(0, 0) == b"1"
        finally:
            await small._conns.release(conn)

    async def test_a_failing_taker_gets_nothing_more_and_the_connection_is_idle(
        self, small: PostgresEventStorageAdapter
    ) -> None:
        sizes: list[int] = []

        def take(rows: list[bytes | None]) -> None:
            sizes.append(len(rows))
            if len(sizes) == 2:
                raise ValueError("the second batch is refused")

        conn = await small._conns.acquire("test")
        try:
            query = "SELECT g::text FROM generate_series(1, %s) AS g"
            with pytest.raises(ValueError, match="second batch"):
                await direct.stream(conn, query, (5500,), 1000, take)
            assert sizes == [1000, 1000]
            assert conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE
            result = await direct.execute(conn, query, (3,))
            assert [result.get_value(i, 0) for i in range(result.ntuples)] == [b"1", b"2", b"3"]
        finally:
            await small._conns.release(conn)

    async def test_a_null_row_in_a_long_read_is_a_stored_event_error(
        self, small: PostgresEventStorageAdapter, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No statement of ours streams a NULL row, but one would fail as JSON null."""
        store = counter_store(small)
        await long_aggregate(store, "long", 1500)
        rows_after = small._sql.event_rows_after

        def with_a_null(*, max_version: bool) -> str:
            query = rows_after(max_version=max_version)
            return query.replace(
                "SELECT row_to_json(e)::text",
                "SELECT NULLIF(row_to_json(e)::text, row_to_json(e)::text)",
                1,
            )

        monkeypatch.setattr(type(small._sql), "event_rows_after", lambda _, **kw: with_a_null(**kw))
        with pytest.raises(StoredEventValidationError):
            await store.get_events("long")
        monkeypatch.undo()
        assert len((await store.get_events("long")).events) == 1500


class TestCollectorDuringLongReads:
    @pytest.mark.parametrize("rows", [True, False], ids=["row-batches", "server-chunks"])
    async def test_no_other_task_finds_the_collector_paused(
        self, pg_schema: str, rows: bool, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Paused only inside one validation call, never across a wait: overlapping long
        reads and reads cancelled at several points leave other tasks a running collector."""
        if rows and not direct_rows_supported:
            pytest.skip("libpq older than 17: no row batches")
        monkeypatch.setattr(postgres_module, "_CHUNKED_ROWS", rows)
        async with await adapter_for(pg_schema, max_size=2) as adapter:
            store = counter_store(adapter)
            await long_aggregate(store, "long", 3000)
            async with collector_watch() as watch:
                reads = await asyncio.gather(*(store.get_events("long") for _ in range(2)))
                assert [len(read.events) for read in reads] == [3000, 3000]
                for turns in (3, 6, 10, 20):  # in the first statement, then streaming
                    await cancelled_midway(store.get_events("long"), turns=turns)
            watch.assert_never_paused()


class TestStatementsFollowTheirConnection:
    async def test_a_table_made_again_with_other_types_is_written_and_read(
        self, pg_schema: str
    ) -> None:
        """Statements prepared for a text id are prepared again for a uuid id."""
        async with await adapter_for(pg_schema, max_size=1) as adapter:
            store = counter_store(adapter)
            await store.push_event(created("a1"))
            assert len((await store.get_events("a1")).events) == 1
            await adapter.drop_event_table()
            await adapter.create_event_table(aggregate_id_type="uuid")
            aggregate_id = str(uuid.uuid4())
            await store.push_event(created(aggregate_id))
            assert len((await store.get_events(aggregate_id)).events) == 1

    @pytest.mark.parametrize("pushes", [1, 7])
    async def test_a_uuid_table_made_again_as_text_keeps_ids_as_given(
        self, pg_schema: str, pushes: int
    ) -> None:
        """The other way round, a statement prepared for uuid raises nothing on a text
        table: it quietly wrote upper-case UUIDs in lower case (which reads by the given id
        then missed) and refused other ids. Every connection now prepares afresh after the
        adapter made or dropped a table, also after psycopg prepared statements of its own
        (``pushes`` = 7, with listings)."""
        async with await adapter_for(pg_schema, max_size=1) as adapter:
            await adapter.drop_event_table()
            await adapter.create_event_table(aggregate_id_type="uuid")
            store = counter_store(adapter)
            for _ in range(pushes):
                await store.push_event(created(str(uuid.uuid4())))
                await store.list_aggregate_ids(limit=1)
            await adapter.drop_event_table()
            await adapter.create_event_table(aggregate_id_type="text")
            upper = str(uuid.uuid4()).upper()
            await store.push_event(created(upper))
            await store.push_event(created("pikachu"))
            assert [e.aggregate_id for e in (await store.get_events(upper)).events] == [upper]
            listed = (await store.list_aggregate_ids()).aggregate_ids
            assert sorted(entry.aggregate_id for entry in listed) == sorted([upper, "pikachu"])
            rows = await fetch(
                f'SELECT aggregate_id FROM "{pg_schema}".{adapter.table_name} ORDER BY 1'
            )
            assert rows == sorted([(upper,), ("pikachu",)])

    async def test_create_event_table_refreshes_statements_after_another_process(
        self, pg_schema: str
    ) -> None:
        """Another process dropped the uuid table and made it again with text ids: this
        process's connections still held statements prepared for uuid. Its start-up
        create_event_table refreshes them, although it makes nothing (a change that kept
        them when nothing was made stored upper-case UUIDs lower-cased again)."""
        async with await adapter_for(pg_schema, max_size=1) as adapter:
            await adapter.drop_event_table()
            await adapter.create_event_table(aggregate_id_type="uuid")
            store = counter_store(adapter)
            for _ in range(3):
                await store.push_event(created(str(uuid.uuid4())))
            script = (
                "import asyncio\n"
                "from castore_pydantic.storage.postgres import PostgresEventStorageAdapter\n"
                "async def main():\n"
                f"    async with PostgresEventStorageAdapter({DSN!r}, schema={pg_schema!r},"
                f" table_name={adapter.table_name!r}) as other:\n"
                "        await other.drop_event_table()\n"
                "        await other.create_event_table(aggregate_id_type='text')\n"
                "asyncio.run(main())\n"
            )
            process = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
            assert await process.wait() == 0
            await adapter.create_event_table(aggregate_id_type="text")  # makes nothing
            upper = str(uuid.uuid4()).upper()
            await store.push_event(created(upper))
            await store.push_event(created("pikachu"))
            assert [e.aggregate_id for e in (await store.get_events(upper)).events] == [upper]

    async def test_only_connections_with_statements_from_before_a_change_forget_them(
        self, pg_schema: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A new connection has nothing prepared: it does not send DEALLOCATE ALL (every
        new connection of every adapter did, once any table had changed in the process). A
        failure of that statement is the adapter's error, not a raw driver error."""
        forgotten: list[object] = []
        forget = connections.Connections.forget_prepared

        async def counting(self: connections.Connections, conn: Any) -> None:
            forgotten.append(conn)
            await forget(self, conn)

        monkeypatch.setattr(connections.Connections, "forget_prepared", counting)
        connections.tables_changed()
        async with await adapter_for(pg_schema, max_size=1) as adapter:
            store = counter_store(adapter)
            for index in range(3):
                await store.push_event(created(f"a{index}"))
            assert forgotten == []
            await adapter.create_event_table()  # IF NOT EXISTS: still counts as a change
            await store.push_event(created("b"))
            assert len(forgotten) == 1

            async def broken(self: connections.Connections, conn: Any) -> None:
                raise psycopg.OperationalError("the server went away")

            monkeypatch.setattr(connections.Connections, "forget_prepared", broken)
            connections.tables_changed()
            with pytest.raises(StorageUnavailableError, match="went away"):
                await store.push_event(created("c"))

    async def test_a_listing_survives_its_table_made_again_elsewhere(self, pg_schema: str) -> None:
        """Made again by another process with other column types, the table fails psycopg's
        prepared listing ("cached plan must not change result type") until the connection
        prepares it again: the listing does so once, instead of failing until the pool
        replaced the connection."""
        async with await adapter_for(pg_schema, max_size=1) as adapter:
            table = f'"{pg_schema}".{adapter.table_name}'
            store = counter_store(adapter)
            await store.push_event(created("a1"))
            for _ in range(7):  # psycopg prepares a statement on its fifth run
                await store.list_aggregate_ids(limit=1)
            aggregate_id = str(uuid.uuid4())
            async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as other:
                # Another process: this one's adapters are not told.
                await other.execute(f"DROP TABLE {table}".encode())
                await other.execute(adapter._sql.create_table("uuid").encode())
                await other.execute(
                    f"INSERT INTO {table} (aggregate_name, aggregate_id, version, type,"
                    " data, timestamp) VALUES (%s, %s, 1, 'COUNTER_CREATED', '{}',"
                    " now())".encode(),
                    (store.event_store_id, aggregate_id),
                )
            listed = (await store.list_aggregate_ids(limit=10)).aggregate_ids  # same statement
            assert [str(entry.aggregate_id) for entry in listed] == [aggregate_id]

    async def test_a_long_aggregate_is_read_after_its_table_was_made_again(
        self, pg_schema: str
    ) -> None:
        """A long read runs inside a transaction: no statement of it may go stale there."""
        async with await adapter_for(pg_schema, max_size=1) as adapter:
            store = counter_store(adapter)
            await long_aggregate(store, "long", 1500)
            for _ in range(2):  # the second read knows the aggregate is long
                assert len((await store.get_events("long")).events) == 1500
            await adapter.drop_event_table()
            await adapter.create_event_table(aggregate_id_type="uuid")
            aggregate_id = str(uuid.uuid4())
            await long_aggregate(store, aggregate_id, 1500)
            for _ in range(2):
                assert len((await store.get_events(aggregate_id)).events) == 1500

    async def test_a_value_the_client_encoding_cannot_carry_is_a_clear_error(
        self, pg_schema: str
    ) -> None:
        """On a LATIN1 connection, a character LATIN1 lacks raised a bare UnicodeEncodeError
        from pushes, groups, reads and listings; writes now refuse the event
        (EventLimitExceededError), reads and listings raise StorageError, nothing is stored."""
        options = {"connect_kwargs": {"client_encoding": "LATIN1"}}
        async with await adapter_for(pg_schema, **options) as adapter:
            store = counter_store(adapter)
            snowman = NoteAdded(aggregate_id="n1", version=1, payload={"text": "\u2603"})
            with pytest.raises(EventLimitExceededError, match="client encoding"):
                await store.push_event(snowman)
            with pytest.raises(EventLimitExceededError, match="client encoding"):
                await EventStore.push_event_group(
                    store.group_event(created("a1")), store.group_event(created("\u2603"))
                )
            with pytest.raises(EventLimitExceededError, match="client encoding"):
                await EventStore.push_event_group(  # a repeated key is looked up first
                    store.group_event(created("\u2603")), store.group_event(created("\u2603"))
                )
            with pytest.raises(StorageError, match="client encoding"):
                await store.get_events("\u2603")
            await store.push_event(created("caf\u00e9"))  # LATIN1 has it
            assert [e.aggregate_id for e in (await store.get_events("caf\u00e9")).events] == [
                "caf\u00e9"
            ]
            rows = await fetch(f'SELECT aggregate_id FROM "{pg_schema}".{adapter.table_name}')
            assert rows == [("caf\u00e9",)]

    async def test_a_table_name_the_client_encoding_cannot_carry_is_a_clear_error(
        self, pg_schema: str
    ) -> None:
        """A table named with a character LATIN1 lacks, used on a LATIN1 connection: pushes,
        groups and reads raised a bare UnicodeEncodeError (a group repeating a key did still).
        Every call now raises StorageError naming the client encoding, never
        EventLimitExceededError (no event is at fault)."""
        table = f"snow\u2603_{uuid.uuid4().hex[:6]}"
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as utf8:
            await utf8.create_event_table()
            await counter_store(utf8, "SNOW").push_event(created("a1"))
        options = {"connect_kwargs": {"client_encoding": "LATIN1"}}
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name=table, **options
        ) as adapter:
            store = counter_store(adapter, "SNOW")
            calls = {
                "create": adapter.create_event_table,
                "push": lambda: store.push_event(created("a2")),
                "group": lambda: EventStore.push_event_group(store.group_event(created("a2"))),
                # looked up before anything is written, through a cursor of psycopg's
                "group repeating a key": lambda: EventStore.push_event_group(
                    store.group_event(created("a2")), store.group_event(created("a2"))
                ),
                "large group": lambda: EventStore.push_event_group(
                    *(store.group_event(created(f"g{i}")) for i in range(5_001))
                ),
                "read": lambda: store.get_events("a1"),
                "read with a limit": lambda: store.get_events("a1", limit=1),
                "list": store.list_aggregate_ids,
                "drop": adapter.drop_event_table,
            }
            for name, call in calls.items():
                with pytest.raises(StorageError, match="client encoding") as info:
                    await call()
                assert not isinstance(info.value, EventLimitExceededError), name
                assert "table or schema name" in str(info.value), name
        assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(1,)]

    async def test_a_sql_ascii_database_reads_back_text_as_text(self) -> None:
        """A SQL_ASCII database gives its clients SQL_ASCII by default, and psycopg then
        hands text over as bytes: stored non-ASCII text failed to read back and listings
        returned bytes ids. The adapter's connections use UTF8 unless told otherwise, and
        an explicit SQL_ASCII is refused up front."""
        name = f"castore_test_ascii_{uuid.uuid4().hex[:8]}"
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as admin:
            await admin.execute(
                f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' TEMPLATE template0"
                " LC_COLLATE 'C' LC_CTYPE 'C'".encode()
            )
        dsn = DSN.rsplit("/", 1)[0] + f"/{name}"
        try:
            async with PostgresEventStorageAdapter(dsn) as adapter:
                await adapter.create_event_table()
                store = counter_store(adapter)
                note = NoteAdded(aggregate_id="caf\u00e9", version=1, payload={"k": "\u2603"})
                await store.push_event(note)
                (event,) = (await store.get_events("caf\u00e9")).events
                assert event.payload == {"k": "\u2603"}
                page = await store.list_aggregate_ids(limit=1)
                assert [entry.aggregate_id for entry in page.aggregate_ids] == ["caf\u00e9"]
            with pytest.raises(ValueError, match="SQL_ASCII"):
                PostgresEventStorageAdapter(dsn, connect_kwargs={"client_encoding": "sql_ascii"})
        finally:
            async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as admin:
                await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())

    async def test_a_table_named_beyond_ascii_is_made_in_the_client_encoding(
        self, pg_schema: str
    ) -> None:
        """The table's DDL was sent as UTF-8 whatever the client encoding: on LATIN1, a table
        named "\u00e9v\u00e9nement" was made under a garbled name, and nothing could use it."""
        table = f"\u00e9v\u00e9nement_{uuid.uuid4().hex[:6]}"
        options = {"connect_kwargs": {"client_encoding": "LATIN1"}}
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name=table, **options
        ) as adapter:
            await adapter.create_event_table()
            store = counter_store(adapter)
            await store.push_event(created("a1"))
            assert len((await store.get_events("a1")).events) == 1
            found = await fetch(
                "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = %s",
                pg_schema,
                table,
            )
            assert found == [(1,)]
            await adapter.drop_event_table()

    async def test_a_changed_client_encoding_is_followed(
        self, small: PostgresEventStorageAdapter
    ) -> None:
        """After SET client_encoding on a kept connection, text is still stored exactly."""
        store = counter_store(small)
        await store.push_event(created("a1"))
        conn = await small._conns.acquire("test")
        await conn.execute("SET client_encoding TO 'LATIN1'")
        await small._conns.release(conn)
        await store.push_event(NoteAdded(aggregate_id="café", version=1, payload={"k": "é"}))
        rows = await fetch(
            f'SELECT data::text FROM "{small.schema}".{small.table_name} WHERE aggregate_id = %s',
            "café",
        )
        assert rows == [('{"k": "é"}',)]
        events = (await store.get_events("café")).events
        assert [e.payload for e in events] == [{"k": "é"}]


class TestNothingRetained:
    async def test_groups_of_every_size_leave_no_text_behind(
        self, small: PostgresEventStorageAdapter
    ) -> None:
        """Only statements small enough to be prepared are kept, in their libpq form."""
        store = counter_store(small)
        await EventStore.push_event_group(store.group_event(created("warm")))
        kept = (len(direct._numbered), len(direct._formats))
        for size in range(11, 60, 7):
            await EventStore.push_event_group(
                *(store.group_event(created(f"s{size}-{i}")) for i in range(size))
            )
        assert (len(direct._numbered), len(direct._formats)) == kept

    async def test_discarded_connections_are_freed(
        self, pg_schema: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Connections the pool replaced (their backend killed) do not stay in memory."""
        # The pool's warnings name each discarded connection; captured, they would keep it.
        caplog.set_level(logging.ERROR, logger="psycopg.pool")
        name = f"castore-freed-{uuid.uuid4().hex[:8]}"
        options = {"max_size": 1, "connect_kwargs": {"application_name": name}}
        async with await adapter_for(pg_schema, **options) as adapter:
            store = counter_store(adapter)
            for i in range(10):
                await store.push_event(created(f"a{i}"))
                await store.get_events(f"a{i}")
                await fetch(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = %s",
                    name,
                )
                with contextlib.suppress(StorageUnavailableError):
                    await store.push_event(created(f"b{i}"))
            gc.collect()
            alive = [o for o in gc.get_objects() if isinstance(o, psycopg.AsyncConnection)]
            assert len(alive) <= 2, f"{len(alive)} connections alive"

    async def test_a_group_split_over_statements_leaves_nothing_behind(
        self, small: PostgresEventStorageAdapter
    ) -> None:
        """A 10,000-event group (two full statements) leaves no statement or values alive."""
        store = counter_store(small)

        async def group(prefix: str, size: int) -> None:
            await EventStore.push_event_group(
                *(store.group_event(created(f"{prefix}{i}")) for i in range(size))
            )

        await group("warm", 2)
        await store.get_events("warm0")
        gc.collect()
        before = len(gc.get_objects())
        await group("big", 10_000)
        await store.get_events("big0")
        gc.collect()
        grown = len(gc.get_objects()) - before
        assert grown < 5000, f"{grown:,} more live objects after the group"


class Timed(Event):
    """An event type whose own settings change how its payload is written."""

    model_config = ConfigDict(ser_json_timedelta="float")
    type: Literal["TIMED"] = "TIMED"
    payload: dict[str, timedelta]


class TestStoredText:
    async def test_an_event_types_own_serialisation_settings_shape_the_stored_json(
        self, small: PostgresEventStorageAdapter
    ) -> None:
        """The stored payload is the event's JSON form, as the SQLite adapter stores it."""
        store = EventStore(
            event_store_id="TIMERS",
            event_types=[Timed],
            reducer=lambda aggregate, event: aggregate,
            event_storage_adapter=small,
        )
        event = Timed(aggregate_id="t1", version=1, payload={"d": timedelta(seconds=1.5)})
        await store.push_event(event)
        rows = await fetch(
            f'SELECT data::text FROM "{small.schema}".{small.table_name}'
            " WHERE aggregate_name = 'TIMERS'"
        )
        assert rows == [('{"d": 1.5}',)]
        assert (await store.get_events("t1")).events[0].payload == event.payload


class TestSocketRegistration:
    """The socket of a connection the adapter holds stays registered with the event loop.

    These tests pin what that must never cost: a statement that waits forever (its socket
    no longer watched), a loop that spins on a socket nobody reads, a descriptor number
    reused by another connection while the loop still lists the closed one.
    """

    async def test_one_registration_serves_statements_with_loop_turns_between(
        self, pg_schema: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The answer is read where it is heard: no extra wake drops the registration."""
        loop = asyncio.get_running_loop()
        added: list[int] = []
        add_reader = loop.add_reader

        def counting(fd: Any, callback: Any, *args: Any) -> None:
            added.append(fd)
            add_reader(fd, callback, *args)

        monkeypatch.setattr(loop, "add_reader", counting)
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
            added.clear()
            for i in range(20):
                await asyncio.sleep(0)  # other tasks run between statements, as they do
                result = await direct.execute(conn, "SELECT %s", (i,))
                assert result.get_value(0, 0) == str(i).encode()
                await asyncio.sleep(0)
            assert added == [conn.pgconn.socket]
            assert not wait.stirred(conn)
            wait.forget(conn)

    async def test_direct_statements_after_psycopgs_own_on_one_connection(
        self, pg_schema: str
    ) -> None:
        """psycopg's waits replace and remove the registration; the next statement notices."""
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
            for i in range(3):
                result = await asyncio.wait_for(direct.execute(conn, "SELECT %s", (i,)), 10)
                assert result.get_value(0, 0) == str(i).encode()
                cursor = await conn.execute("SELECT 1")
                assert await cursor.fetchone() == (1,)
                async with conn.transaction():
                    await conn.execute("SELECT 2")
            result = await asyncio.wait_for(direct.execute(conn, "SELECT 'last'", ()), 10)
            assert result.get_value(0, 0) == b"last"
            wait.forget(conn)

    async def test_every_loop_kind_waits_for_the_answer(
        self, small: PostgresEventStorageAdapter, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Loops without a readable selector (uvloop) register the socket around each wait."""
        monkeypatch.setattr(wait, "_selector", lambda loop: None)
        store = counter_store(small)
        await store.push_event(created("a1"))
        a2, a3 = store.group_event(created("a2")), store.group_event(created("a3"))
        await asyncio.wait_for(EventStore.push_event_group(a2, a3), 10)
        assert [len((await store.get_events(i)).events) for i in ("a1", "a2", "a3")] == [1] * 3

    @pytest.mark.parametrize("last_use", ["adapter statement", "psycopg statement"])
    async def test_a_kept_connection_the_server_ended_is_replaced_before_use(
        self, small: PostgresEventStorageAdapter, monkeypatch: pytest.MonkeyPatch, last_use: str
    ) -> None:
        """The server's goodbye to a kept connection is heard; no operation fails for it.

        The loop must also not spin on the unread goodbye while the connection waits.
        """
        monkeypatch.setattr(connections, "_IDLE_SECONDS", 60.0)  # kept, never swept
        name = f"castore-ended-{uuid.uuid4().hex[:8]}"
        store = counter_store(small)
        await store.push_event(created("a1"))
        conn = await small._conns.acquire("test")
        await conn.execute("SELECT set_config('application_name', %s, false)", (name,))
        await small._conns.release(conn)
        if last_use == "adapter statement":
            await store.get_events("a1")
        assert small._conns.kept == 1
        await fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            name,
        )

        async def heard() -> bool:
            return wait.stirred(conn)

        await wait_for(heard, what="the adapter to hear the server's goodbye")
        cpu = time.process_time()
        await asyncio.sleep(0.3)
        assert time.process_time() - cpu < 0.1, "the loop kept waking for the closed socket"
        await store.push_event(created("a2"))  # no StorageUnavailableError
        assert [len((await store.get_events(i)).events) for i in ("a1", "a2")] == [1, 1]

    async def test_a_lost_connections_descriptor_is_unregistered_before_reuse(self) -> None:
        """libpq closes a lost connection's socket; a new one with its number is watched."""
        lost = await psycopg.AsyncConnection.connect(DSN, autocommit=True)
        fd, pid = lost.pgconn.socket, lost.info.backend_pid
        running = asyncio.create_task(direct.execute(lost, "SELECT pg_sleep(30)", ()))
        await asyncio.sleep(0.2)
        await fetch("SELECT pg_terminate_backend(%s)", pid)
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(running, 10)
        assert lost.pgconn.status == psycopg.pq.ConnStatus.BAD
        opened: list[psycopg.AsyncConnection[Any]] = []
        try:
            # The lowest free descriptor is reused: one of a few new sockets gets ``fd``.
            while not opened or opened[-1].pgconn.socket != fd:
                assert len(opened) < 20, f"no new connection got descriptor {fd} again"
                opened.append(await psycopg.AsyncConnection.connect(DSN, autocommit=True))
            result = await asyncio.wait_for(direct.execute(opened[-1], "SELECT 1", ()), 10)
            assert result.get_value(0, 0) == b"1"
        finally:
            for conn in opened:
                wait.forget(conn)
                await conn.close()
            await lost.close()

    def test_a_connection_moved_to_another_loop_leaves_no_registration_behind(self) -> None:
        """Used on a second loop, the connection's registration with the first one ends."""
        first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
        try:
            conn = first.run_until_complete(psycopg.AsyncConnection.connect(DSN, autocommit=True))
            fd = conn.pgconn.socket
            first.run_until_complete(direct.execute(conn, "SELECT 1", ()))
            second.run_until_complete(direct.execute(conn, "SELECT 2", ()))

            async def close() -> None:
                wait.forget(conn)
                await conn.close()

            second.run_until_complete(close())

            async def reuse() -> bytes:
                # The lowest free descriptor is reused; a stale entry for it would make
                # psycopg's own wait fail (FileNotFoundError) or never wake.
                again = await psycopg.AsyncConnection.connect(DSN, autocommit=True)
                try:
                    assert again.pgconn.socket == fd
                    result = await asyncio.wait_for(direct.execute(again, "SELECT 3", ()), 10)
                    return bytes(result.get_value(0, 0) or b"")
                finally:
                    wait.forget(again)
                    await again.close()

            assert first.run_until_complete(reuse()) == b"3"
        finally:
            first.close()
            second.close()

    async def test_an_interrupted_close_leaves_no_kept_socket_registered(
        self, pg_schema: str
    ) -> None:
        adapter = await adapter_for(pg_schema, min_size=1, max_size=4)
        store = counter_store(adapter)
        # Three connections at once, each used by a push, then kept by the adapter (pushes
        # alone may all finish on one connection before the pool opens another).
        held = [await adapter._conns.acquire("test") for _ in range(3)]
        for conn in held:
            await direct.execute(conn, "SELECT 1", ())
            await adapter._conns.release(conn)
        await asyncio.gather(*(store.push_event(created(f"k{i}")) for i in range(12)))
        kept = [conn for conn, _ in adapter._conns._kept]
        assert len(kept) >= 2, "needs several kept connections"
        assert all(wait.stirred(conn) is False and "_castore_watch" in vars(conn) for conn in kept)
        entered = asyncio.Event()
        putconn = adapter.pool.putconn

        async def stuck(conn: Any) -> None:
            entered.set()
            await asyncio.sleep(3600)

        adapter.pool.putconn = stuck  # type: ignore[method-assign]
        closing = asyncio.create_task(adapter.aclose())
        await entered.wait()
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        assert [conn for conn in kept if "_castore_watch" in vars(conn)] == []
        adapter.pool.putconn = putconn  # type: ignore[method-assign]
        for conn in kept:
            await putconn(conn)
        await adapter.pool.close()
