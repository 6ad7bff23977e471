"""The PostgreSQL adapter: the public contract, then what is specific to PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from hypothesis import settings
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from castore_pydantic import EventStore
from castore_pydantic.errors import (
    EventAlreadyExistsError,
    EventGroupError,
    EventLimitExceededError,
    StorageError,
    StorageUnavailableError,
    StoredEventValidationError,
)
from castore_pydantic.messaging import (
    ConnectedEventStore,
    MessageContext,
    StateCarryingMessage,
    StateCarryingMessageQueue,
)
from castore_pydantic.messaging.memory import InMemoryMessageQueueAdapter
from castore_pydantic.storage import _postgres_writes as postgres_writes
from castore_pydantic.storage import postgres as postgres_module
from castore_pydantic.storage.postgres import PostgresEventStorageAdapter
from castore_pydantic.testing.contracts import (
    AdapterFactory,
    EventStorageAdapterContract,
    make_adapter_state_machine,
)
from castore_pydantic.testing.contracts._storage import NoteAdded, created, incremented
from tests.services import POSTGRES_HOST, POSTGRES_PORT
from tests.storage.postgres_support import (
    DATABASE,
    DSN,
    OTHER_DSN,
    counter_store,
    fetch,
    make_table,
    pg_schema,
    unique_table,
    wait_for,
)

__all__ = ["pg_schema"]  # the fixture is used by name

pytestmark = pytest.mark.postgres


class TestPostgresContract(EventStorageAdapterContract):
    """The PostgreSQL adapter honours the public storage contract (one shared table)."""

    @pytest.fixture
    async def adapter_factory(self, pg_schema: str) -> AsyncIterator[AdapterFactory]:
        adapters: list[PostgresEventStorageAdapter] = []

        async def make() -> PostgresEventStorageAdapter:
            adapter = PostgresEventStorageAdapter(
                DSN, schema=pg_schema, table_name="contract_event", max_size=4
            )
            adapters.append(adapter)
            return adapter

        await (await make()).create_event_table()
        yield make
        for adapter in adapters:
            await adapter.aclose()


# The stateful machine makes a fresh adapter per example; they all share this one table, and
# each example uses fresh store ids. The schema is made on first use, dropped at module end.
_STATEFUL: dict[str, str] = {}


async def _stateful_adapter() -> PostgresEventStorageAdapter:
    adapter = PostgresEventStorageAdapter(
        DSN, schema=_STATEFUL["schema"], table_name="stateful_event", max_size=2
    )
    if not _STATEFUL.get("ready"):
        await adapter.create_event_table()
        _STATEFUL["ready"] = "yes"
    return adapter


PostgresStateMachine = make_adapter_state_machine(
    _stateful_adapter, peer_factory=_stateful_adapter, name="PostgresStateMachine"
)


class TestPostgresStateful(PostgresStateMachine.TestCase):  # type: ignore[name-defined,misc]
    """Random pushes, groups, reads and listings agree with the dict model on PostgreSQL."""

    settings = settings(max_examples=25, stateful_step_count=30, deadline=None)

    @pytest.fixture(autouse=True)
    def _schema(self, pg_schema: str) -> None:
        _STATEFUL["schema"] = pg_schema


class TestConstruction:
    """Constructor arguments, repr and the optional dependency."""

    def test_repr_names_the_server_and_table_but_not_the_password(self) -> None:
        """repr() shows host, database and table and hides the password."""
        adapter = PostgresEventStorageAdapter(
            "postgresql://app:S3cr3t-pw@db.example:6543/events", table_name="ev"
        )
        text = repr(adapter)
        assert "db.example" in text
        assert "events" in text
        assert "'ev'" in text
        assert "S3cr3t" not in text
        assert "S3cr3t" not in str(adapter)

    @pytest.mark.parametrize(
        ("table_name", "message"),
        [
            ("", "must not be empty"),
            ("a\x00b", "NUL"),
            ("x" * 64, "64 bytes"),
            ("é" * 32, "64 bytes"),
            ("\ud800", "not valid Unicode"),
        ],
    )
    def test_table_names_postgres_cannot_hold_are_refused(
        self, table_name: str, message: str
    ) -> None:
        """Empty, NUL, surrogate and over-63-byte names are a clear ValueError."""
        with pytest.raises(ValueError, match=message):
            PostgresEventStorageAdapter(DSN, table_name=table_name)
        with pytest.raises(ValueError, match=message):
            PostgresEventStorageAdapter(DSN, schema=table_name)

    def test_a_63_byte_name_is_accepted(self) -> None:
        """The longest identifier PostgreSQL keeps intact is accepted."""
        adapter = PostgresEventStorageAdapter(DSN, table_name="é" * 31 + "x")
        assert adapter.table_name == "é" * 31 + "x"

    def test_connection_string_and_pool_together_are_refused(self) -> None:
        """Giving both a connection string and a pool is ambiguous: ValueError."""
        pool = AsyncConnectionPool(DSN, open=False)
        with pytest.raises(ValueError, match="either"):
            PostgresEventStorageAdapter(DSN, pool=pool)

    def test_pool_of_another_type_is_refused(self) -> None:
        """pool= must be a psycopg_pool.AsyncConnectionPool."""
        with pytest.raises(TypeError, match="AsyncConnectionPool"):
            PostgresEventStorageAdapter(pool=object())  # type: ignore[arg-type]

    def test_malformed_connection_string_is_a_value_error(self) -> None:
        """A connection string libpq cannot parse raises ValueError."""
        with pytest.raises(ValueError, match="invalid PostgreSQL connection string"):
            PostgresEventStorageAdapter("host=x port")

    def test_missing_driver_names_the_extra_to_install(self) -> None:
        """Without psycopg, importing the module says which extra to install."""
        code = (
            "import sys; sys.modules['psycopg'] = None\n"
            "try:\n"
            "    import castore_pydantic.storage.postgres\n"
            "except ImportError as exc:\n"
            "    print(exc)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout
        assert "pip install 'castore-pydantic[postgres]'" in out
        assert (
            "castore_pydantic"
            in subprocess.run(
                [sys.executable, "-c", "import castore_pydantic, sys; print(*sys.modules)"],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
        )
        assert (
            "psycopg"
            not in subprocess.run(
                [sys.executable, "-c", "import castore_pydantic, sys; print(*sys.modules)"],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout.split()
        )

    async def test_closed_adapter_refuses_work(self, pg_schema: str) -> None:
        """After aclose(), operations raise StorageError; aclose() is idempotent."""
        adapter = PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=unique_table())
        async with adapter:
            await adapter.create_event_table()
        await adapter.aclose()
        with pytest.raises(StorageError, match="closed"):
            await counter_store(adapter).get_events("a1")

    async def test_borrowed_pool_stays_open_and_gets_its_connections_back_unchanged(
        self, pg_schema: str
    ) -> None:
        """With pool=, the adapter neither closes the pool nor leaves autocommit switched on."""
        async with AsyncConnectionPool(DSN, min_size=1, max_size=1, open=False) as pool:
            adapter = PostgresEventStorageAdapter(
                pool=pool, schema=pg_schema, table_name=unique_table()
            )
            async with adapter:
                await adapter.create_event_table()
                store = counter_store(adapter)
                await store.push_event(created("a1"))
                assert len((await store.get_events("a1")).events) == 1
            async with pool.connection() as conn:
                assert conn.autocommit is False
                assert (await (await conn.execute("SELECT 1")).fetchone()) == (1,)


class TestTable:
    """create_event_table / drop_event_table and the layout they give."""

    async def _columns(self, schema: str, table: str) -> dict[str, tuple[str, str | None]]:
        rows = await fetch(
            "SELECT column_name::text, data_type::text, collation_name::text"
            " FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            schema,
            table,
        )
        return {name: (kind, collation) for name, kind, collation in rows}

    async def _indexes(self, schema: str, table: str) -> dict[str, str]:
        rows = await fetch(
            "SELECT indexname::text, indexdef FROM pg_indexes"
            " WHERE schemaname = %s AND tablename = %s",
            schema,
            table,
        )
        return dict(rows)

    @pytest.mark.parametrize(("id_type", "column_type"), [("text", "text"), ("uuid", "uuid")])
    async def test_layout_is_castores_with_the_chosen_id_type(
        self, pg_schema: str, id_type: str, column_type: str
    ) -> None:
        """The table has Castore's columns; aggregate_id is text by default, uuid on request."""
        table = await make_table(pg_schema, aggregate_id_type=id_type)
        columns = await self._columns(pg_schema, table)
        assert {name: kind for name, (kind, _) in columns.items()} == {
            "id": "bigint",
            "aggregate_name": "text",
            "aggregate_id": column_type,
            "version": "bigint",
            "type": "text",
            "data": "jsonb",
            "metadata": "jsonb",
            "timestamp": "timestamp with time zone",
        }
        if id_type == "text":
            assert columns["aggregate_id"][1] == "C"  # code-point order, like Python's
        unique = await fetch(
            "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = to_regclass(%s) AND contype = 'u'",
            f"{pg_schema}.{table}",
        )
        assert unique == [
            (
                f"{table}_aggregate_name_aggregate_id_version_key",
                "UNIQUE (aggregate_name, aggregate_id, version)",
            )
        ]

    async def test_create_is_idempotent_and_every_table_gets_its_own_indexes(
        self, pg_schema: str
    ) -> None:
        """Two tables in one schema each get their listing index (Castore's names clash)."""
        first, second = unique_table(), unique_table()
        for table in (first, second):
            async with PostgresEventStorageAdapter(
                DSN, schema=pg_schema, table_name=table
            ) as adapter:
                await adapter.create_event_table()
                await adapter.create_event_table()
        for table in (first, second):
            indexes = await self._indexes(pg_schema, table)
            listing = indexes[f"{table}_initial_events_idx"]
            assert "WHERE (version = 1)" in listing
            assert "(aggregate_name, date_trunc('milliseconds'" in listing

    async def test_create_on_a_complete_table_waits_for_no_writer(self, pg_schema: str) -> None:
        """On a table that has everything, create_event_table() returns while another
        session holds a write transaction open on it, and queues no lock that would stop
        other writers: it used to wait for that transaction (its CREATE INDEX IF NOT EXISTS
        asks for a lock first), and every later write queued behind it."""
        table = await make_table(pg_schema)
        async with (
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as starting,
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as running,
            await psycopg.AsyncConnection.connect(DSN) as other,
        ):
            await other.execute(
                f'INSERT INTO "{pg_schema}"."{table}" (aggregate_name, aggregate_id, version,'
                " type) VALUES ('OTHER', 'x', 1, 'T')".encode()
            )  # and its transaction stays open
            try:
                async with asyncio.timeout(10):
                    await asyncio.gather(
                        starting.create_event_table(),
                        counter_store(running).push_event(created("a1")),
                    )
            finally:
                await other.rollback()

    async def test_an_application_role_may_call_it_on_a_complete_table(
        self, pg_schema: str
    ) -> None:
        """A role with USAGE on the schema and SELECT, INSERT, UPDATE on a complete table may
        call create_event_table() at start-up, with schema= or through its search_path; with
        CREATE on the schema it makes a table of its own. It used to need CREATE on the
        database (for CREATE SCHEMA IF NOT EXISTS) and to own the table (for CREATE INDEX IF
        NOT EXISTS), even when everything existed. What is missing still needs those."""
        table = await make_table(pg_schema)
        role = f"castore_app_{uuid.uuid4().hex[:8]}"
        await fetch(f'CREATE ROLE "{role}" LOGIN')
        try:
            await fetch(f'GRANT USAGE ON SCHEMA "{pg_schema}" TO "{role}"')
            await fetch(f'GRANT SELECT, INSERT, UPDATE ON "{pg_schema}"."{table}" TO "{role}"')
            dsn = f"postgresql://{role}@{POSTGRES_HOST}:{POSTGRES_PORT}/{DATABASE}"
            path = {"options": f"-c search_path={pg_schema}"}
            for adapter in (
                PostgresEventStorageAdapter(dsn, schema=pg_schema, table_name=table),
                PostgresEventStorageAdapter(dsn, table_name=table, connect_kwargs=path),
            ):
                async with adapter:
                    await adapter.create_event_table()
                    await counter_store(adapter).push_event(created("a1"))
            await fetch(f'DROP INDEX "{pg_schema}"."{table}_initial_events_idx"')
            async with PostgresEventStorageAdapter(
                dsn, schema=pg_schema, table_name=table
            ) as adapter:
                with pytest.raises(StorageError, match="must be owner"):
                    await adapter.create_event_table()
            await fetch(f'GRANT CREATE ON SCHEMA "{pg_schema}" TO "{role}"')
            async with PostgresEventStorageAdapter(
                dsn, schema=pg_schema, table_name=unique_table()
            ) as adapter:
                await adapter.create_event_table()
                await counter_store(adapter).push_event(created("a1"))
        finally:
            await fetch(f'DROP OWNED BY "{role}"')
            await fetch(f'DROP ROLE "{role}"')

    async def test_listing_uses_the_index(self, pg_schema: str) -> None:
        """Listing a store's aggregates is an index scan, not a sort of the table."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            await fetch(
                f'INSERT INTO "{pg_schema}"."{table}" (aggregate_name, aggregate_id, version,'
                " type, timestamp) SELECT 'S' || (g % 20), 'a' || g, 1 + (g % 3), 'T',"
                " now() - g * interval '1 second' FROM generate_series(1, 20000) g"
            )
            await fetch(f'ANALYZE "{pg_schema}"."{table}"')
            query = adapter._sql.list_aggregate_ids(
                after=False, before=True, cursor=True, reverse=False, limit=True
            )
            now = datetime.now(UTC).replace(tzinfo=None)
            rows = await fetch("EXPLAIN " + query, "S3", now, now, "a7", 11)
            plan = "\n".join(row[0] for row in rows)
        assert f"{table}_initial_events_idx" in plan
        assert "Sort" not in plan

    async def test_long_table_names_get_distinct_short_index_names(self, pg_schema: str) -> None:
        """Derived names fit 63 bytes and differ for two long names sharing a prefix."""
        names = ["t" * 62 + "1", "t" * 62 + "2"]
        derived = []
        for table in names:
            async with PostgresEventStorageAdapter(
                DSN, schema=pg_schema, table_name=table
            ) as adapter:
                await adapter.create_event_table()
                store = counter_store(adapter)
                await store.push_event(created("a1"))
                with pytest.raises(EventAlreadyExistsError):
                    await store.push_event(created("a1"))
            indexes = await self._indexes(pg_schema, table)
            derived.append(set(indexes))
            assert all(len(name.encode()) <= 63 for name in indexes)
        assert not derived[0] & derived[1]

    async def test_create_on_a_foreign_table_without_the_columns_fails_clearly(
        self, pg_schema: str
    ) -> None:
        """An existing table of another shape is reported, not silently used."""
        table = unique_table()
        await fetch(f'CREATE TABLE "{pg_schema}"."{table}" (id int)')
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            with pytest.raises(StorageError, match="lacks the columns aggregate_name"):
                await adapter.create_event_table()

    async def test_missing_table_says_to_create_it(self, pg_schema: str) -> None:
        """Using a table that does not exist raises StorageError naming the fix."""
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name=unique_table()
        ) as adapter:
            with pytest.raises(StorageError, match="create_event_table"):
                await counter_store(adapter).push_event(created("a1"))

    async def test_a_group_names_the_table_missing_among_its_members(self, pg_schema: str) -> None:
        """In a group, the missing table may be another member's: the error names it (it
        used to read as if the first adapter's own table were missing)."""
        present, missing = await make_table(pg_schema), unique_table()
        async with (
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=present) as head,
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=missing) as member,
        ):
            with pytest.raises(StorageError, match="create_event_table") as info:
                await EventStore.push_event_group(
                    counter_store(head).group_event(created("a1")),
                    counter_store(member).group_event(created("b1")),
                )
            assert missing in str(info.value)
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{present}"') == [(0,)]

    async def test_drop_removes_the_table_and_tolerates_absence(self, pg_schema: str) -> None:
        """drop_event_table drops the table; dropping again is fine; the schema stays."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            await adapter.drop_event_table()
            await adapter.drop_event_table()
        assert await fetch("SELECT to_regclass(%s)", f"{pg_schema}.{table}") == [(None,)]
        assert await fetch("SELECT 1 FROM pg_namespace WHERE nspname = %s", pg_schema) == [(1,)]

    async def test_create_makes_a_missing_schema(self, pg_schema: str) -> None:
        """A named schema that does not exist yet is created with the table."""
        schema = f"{pg_schema}_extra"
        try:
            async with PostgresEventStorageAdapter(DSN, schema=schema) as adapter:
                await adapter.create_event_table()
                await counter_store(adapter).push_event(created("a1"))
        finally:
            await fetch(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    @pytest.mark.parametrize("outcome", ["commit", "rollback"])
    async def test_tables_made_at_once_in_a_schema_another_session_is_making(
        self, pg_schema: str, outcome: str
    ) -> None:
        """Services starting together, each making its own table in one new schema, while
        another session makes that schema: every call succeeds. The calls for different
        tables do not wait for each other, and their CREATE SCHEMA IF NOT EXISTS waited
        for the other session's, then failed on the catalog's unique index."""
        schema, tag = f"{pg_schema}_new", f"castore-{uuid.uuid4().hex[:8]}"
        adapters = [
            PostgresEventStorageAdapter(
                DSN,
                schema=schema,
                table_name=unique_table(),
                connect_kwargs={"application_name": tag},
            )
            for _ in range(4)
        ]
        try:
            async with (
                contextlib.AsyncExitStack() as stack,
                await psycopg.AsyncConnection.connect(DSN) as other,
            ):
                for adapter in adapters:
                    await stack.enter_async_context(adapter)
                await other.execute(f'CREATE SCHEMA "{schema}"'.encode())  # not committed
                calls = asyncio.gather(
                    *[adapter.create_event_table() for adapter in adapters],
                    return_exceptions=True,
                )

                async def all_waiting() -> bool:
                    rows = await fetch(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                        " AND wait_event_type = 'Lock' AND query LIKE 'CREATE SCHEMA%%'",
                        tag,
                    )
                    return bool(rows[0][0] == len(adapters))

                await wait_for(all_waiting, what="every call waiting for the schema")
                await (other.commit() if outcome == "commit" else other.rollback())
                assert await calls == [None] * len(adapters)
                for adapter in adapters:
                    await counter_store(adapter).push_event(created("a1"))
        finally:
            await fetch(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    async def test_services_starting_together_make_their_tables_in_one_new_schema(
        self, pg_schema: str
    ) -> None:
        """Several adapters, each with its own pool and table, make them at once in a schema
        that does not exist yet: all of them succeed, over a few rounds."""
        for round_ in range(5):
            schema = f"{pg_schema}_r{round_}"
            adapters = [
                PostgresEventStorageAdapter(DSN, schema=schema, table_name=unique_table())
                for _ in range(4)
            ]
            try:
                async with contextlib.AsyncExitStack() as stack:
                    for adapter in adapters:
                        await stack.enter_async_context(adapter)
                        await adapter.pool.open(wait=True)
                    outcomes = await asyncio.gather(
                        *[adapter.create_event_table() for adapter in adapters],
                        return_exceptions=True,
                    )
                    assert outcomes == [None] * len(adapters)
            finally:
                await fetch(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    @pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
    @pytest.mark.parametrize("through", ["options", "borrowed pool"])
    async def test_calls_racing_on_one_table_under_another_isolation_level_succeed(
        self, pg_schema: str, isolation: str, through: str
    ) -> None:
        """With REPEATABLE READ or SERIALIZABLE as the connections' default (a role's or a
        database's setting, or a borrowed pool's isolation_level), the calls that waited
        for another one making the table looked again in a snapshot taken before it had,
        and reported the table it made as lacking every column."""
        level = psycopg.IsolationLevel.REPEATABLE_READ
        if isolation == "serializable":
            level = psycopg.IsolationLevel.SERIALIZABLE

        async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.set_isolation_level(level)

        for _ in range(5):
            table = unique_table()
            async with contextlib.AsyncExitStack() as stack:
                adapters = []
                for _ in range(3):
                    if through == "options":
                        setting = isolation.replace(" ", "\\ ")
                        options = {"options": f"-c default_transaction_isolation={setting}"}
                        adapter = PostgresEventStorageAdapter(
                            DSN, schema=pg_schema, table_name=table, connect_kwargs=options
                        )
                    else:
                        pool = AsyncConnectionPool(DSN, configure=configure, min_size=1, open=False)
                        await stack.enter_async_context(pool)
                        adapter = PostgresEventStorageAdapter(
                            pool=pool, schema=pg_schema, table_name=table
                        )
                    adapters.append(await stack.enter_async_context(adapter))
                    await adapter.pool.wait()
                outcomes = await asyncio.gather(
                    *[adapter.create_event_table() for adapter in adapters],
                    return_exceptions=True,
                )
                assert outcomes == [None] * len(adapters)
                await counter_store(adapters[0]).push_event(created("a1"))


class TestRows:
    """What the rows look like, and reading rows written by others."""

    async def test_rows_hold_castores_encoding(self, pg_schema: str) -> None:
        """aggregate_name is the store id; payload/metadata are JSONB or NULL; ms timestamps."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            ts = datetime(2024, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
            await store.push_event(created("a1", ts=ts))
            await store.push_event(incremented("a1", 2, by=3))
        rows = await fetch(
            f'SELECT aggregate_name, aggregate_id, version, type, data, metadata, "timestamp"'
            f' FROM "{pg_schema}"."{table}" ORDER BY version'
        )
        assert rows[0][:6] == (
            store.event_store_id,
            "a1",
            1,
            "COUNTER_CREATED",
            {"name": "counter a1"},
            None,
        )
        assert rows[0][6] == ts
        assert rows[1][4] == {"by": 3}
        assert rows[1][6].microsecond % 1000 == 0

    async def test_sub_millisecond_rows_are_read_and_listed_at_millisecond_precision(
        self, pg_schema: str
    ) -> None:
        """Rows another program wrote with µs read back truncated and page without repeats."""
        table = await make_table(pg_schema)
        await fetch(
            f'INSERT INTO "{pg_schema}"."{table}" (aggregate_name, aggregate_id, version, type,'
            ' data, "timestamp") VALUES'
            " ('S', 'b', 1, 'COUNTER_CREATED', '{\"name\": \"b\"}', '2024-01-01T00:00:00.123999Z'),"
            " ('S', 'a', 1, 'COUNTER_CREATED', '{\"name\": \"a\"}', '2024-01-01T00:00:00.123456Z'),"
            " ('S', 'c', 1, 'COUNTER_CREATED', '{\"name\": \"c\"}', '2024-01-01T00:00:00.123001Z')"
        )
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter, "S")
            (event,) = (await store.get_events("b")).events
            assert event.timestamp == datetime(2024, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
            seen, token = [], None
            for _ in range(4):
                page = await (
                    store.list_aggregate_ids(limit=1)
                    if token is None
                    else store.list_aggregate_ids(page_token=token)
                )
                seen += [e.aggregate_id for e in page.aggregate_ids]
                token = page.next_page_token
                if token is None:
                    break
        assert seen == ["a", "b", "c"]

    @pytest.mark.parametrize(
        ("column_type", "data"),
        [
            ("jsonb", '{"by": ' + "[" * 250 + "]" * 250 + "}"),
            ("json", '{"by": "\\ud800"}'),
        ],
        ids=["deeper-than-the-validator-parses", "lone-surrogate-in-a-json-column"],
    )
    async def test_stored_json_the_validator_cannot_parse_names_its_event(
        self, pg_schema: str, column_type: str, data: str
    ) -> None:
        """A row another program wrote that PostgreSQL holds as JSON but the validator cannot
        parse (too deep; a lone surrogate, which a ``json`` column keeps) names its aggregate
        and version, read in either order."""
        table = await make_table(pg_schema)
        name = f'"{pg_schema}"."{table}"'
        await fetch(f"ALTER TABLE {name} ALTER data TYPE {column_type}")
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            await store.push_event(created("a"))
            await store.push_event(incremented("a", 2))
            await store.push_event(incremented("a", 3))
            await fetch(f"UPDATE {name} SET data = %s WHERE version = 2", data)
            reads: list[Callable[[], Awaitable[object]]] = [
                lambda: store.get_events("a"),
                lambda: store.get_events("a", reverse=True),
                lambda: store.get_aggregate("a"),
            ]
            for read in reads:
                with pytest.raises(StoredEventValidationError) as info:
                    await read()
                error = info.value
                assert (error.aggregate_id, error.version) == ("a", 2)
                assert f"{store.event_store_id}, aggregate a, version 2 " in str(error)
            assert len((await store.get_events("a", min_version=3)).events) == 1

    async def test_explicit_offsets_are_stored_as_utc(self, pg_schema: str) -> None:
        """A timestamp given with another offset is stored as the same instant."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            pushed = await store.push_event(
                {
                    "aggregateId": "a1",
                    "version": 1,
                    "type": "COUNTER_CREATED",
                    "timestamp": "2024-01-01T02:00:00.500+02:00",
                    "payload": {"name": "x"},
                }
            )
            assert pushed.event.timestamp == datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)
            assert (await store.get_events("a1")).events == [pushed.event]


class TestConflicts:
    """Duplicates are EventAlreadyExistsError on every table and path; force upserts."""

    async def test_group_conflict_is_typed_on_a_non_default_table(self, pg_schema: str) -> None:
        """A group duplicate on any table name names the offending event (Castore's B44)."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            await store.push_event(created("taken"))
            with pytest.raises(EventAlreadyExistsError) as info:
                await EventStore.push_event_group(
                    store.group_event(created("free")), store.group_event(created("taken"))
                )
        assert (info.value.event_store_id, info.value.aggregate_id, info.value.version) == (
            store.event_store_id,
            "taken",
            1,
        )

    async def test_unique_index_of_any_name_is_recognised(self, pg_schema: str) -> None:
        """A table whose key index has another name still gives typed conflicts."""
        table = unique_table()
        await fetch(
            f'CREATE TABLE "{pg_schema}"."{table}" (id bigserial primary key,'
            " aggregate_name text NOT NULL, aggregate_id text NOT NULL, version bigint NOT NULL,"
            ' type text NOT NULL, data jsonb, metadata jsonb, "timestamp" timestamptz NOT NULL);'
            f' CREATE UNIQUE INDEX "odd name" ON "{pg_schema}"."{table}"'
            " (version, aggregate_id, aggregate_name)"
        )
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            await store.push_event(created("a1"))
            for _ in range(2):  # looked up once, then remembered
                with pytest.raises(EventAlreadyExistsError):
                    await store.push_event(created("a1"))
            with pytest.raises(EventAlreadyExistsError) as info:
                await EventStore.push_event_group(
                    store.group_event(created("a2")), store.group_event(created("a1"))
                )
            assert info.value.aggregate_id == "a1"
            assert (await store.get_events("a2")).events == []

    async def test_conflicts_in_a_partition_are_typed(self, pg_schema: str) -> None:
        """On a table partitioned by event store, with the key on the parent, a taken
        version is EventAlreadyExistsError, for pushes and groups: PostgreSQL names the
        partition and its own index in the error, which was taken for another table's
        (a StorageError). Another unique index of a partition is still no conflict."""
        table, part = unique_table(), unique_table()
        store_id = f"C{uuid.uuid4().hex[:10].upper()}"
        await fetch(
            f'CREATE TABLE "{pg_schema}"."{table}" (id bigint GENERATED BY DEFAULT AS IDENTITY,'
            ' aggregate_name text COLLATE "C" NOT NULL, aggregate_id text COLLATE "C" NOT NULL,'
            " version bigint NOT NULL, type text NOT NULL, data jsonb, metadata jsonb,"
            ' "timestamp" timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP(3),'
            " UNIQUE (aggregate_name, aggregate_id, version)) PARTITION BY LIST (aggregate_name);"
            f' CREATE TABLE "{pg_schema}"."{part}" PARTITION OF "{pg_schema}"."{table}"'
            f" FOR VALUES IN ('{store_id}') PARTITION BY RANGE (version);"
            f' CREATE TABLE "{pg_schema}"."{part}_low" PARTITION OF "{pg_schema}"."{part}"'
            " FOR VALUES FROM (MINVALUE) TO (100);"
            f' CREATE TABLE "{pg_schema}"."{part}_high" PARTITION OF "{pg_schema}"."{part}"'
            " FOR VALUES FROM (100) TO (MAXVALUE);"
            f' CREATE TABLE "{pg_schema}"."{table}_rest" PARTITION OF "{pg_schema}"."{table}"'
            " DEFAULT;"
            f' CREATE UNIQUE INDEX ON "{pg_schema}"."{part}_high" (type)'
        )
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            await adapter.create_event_table()
            store, other = counter_store(adapter, store_id), counter_store(adapter)
            for one in (store, other):
                await one.push_event(created("a1"))
                with pytest.raises(EventAlreadyExistsError) as info:
                    await one.push_event(created("a1"))
                assert (info.value.event_store_id, info.value.version) == (one.event_store_id, 1)
                with pytest.raises(EventAlreadyExistsError) as info:
                    await EventStore.push_event_group(
                        other.group_event(created("b2")), one.group_event(created("a1"))
                    )
                assert (info.value.event_store_id, info.value.aggregate_id) == (
                    one.event_store_id,
                    "a1",
                )
            assert (await other.get_events("b2")).events == []
            await store.push_event(incremented("a1", 100))
            with pytest.raises(StorageError, match="duplicate key") as unrelated:
                await store.push_event(incremented("a1", 101))
            assert not isinstance(unrelated.value, EventAlreadyExistsError)

    async def test_other_unique_violations_are_not_conflicts(self, pg_schema: str) -> None:
        """A unique index that is not the event key gives StorageError, not a conflict."""
        table = await make_table(pg_schema)
        await fetch(f'CREATE UNIQUE INDEX ON "{pg_schema}"."{table}" (type)')
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            await store.push_event(created("a1"))
            with pytest.raises(StorageError, match="duplicate key") as info:
                await store.push_event(created("a2"))
            assert not isinstance(info.value, EventAlreadyExistsError)
            assert isinstance(info.value.__cause__, psycopg.errors.UniqueViolation)

    async def test_columns_an_index_only_includes_are_not_its_key(self, pg_schema: str) -> None:
        """A unique index on (store, version) that INCLUDEs aggregate_id ("one event per
        store and version") was taken for the event key: pushing another aggregate raised
        EventAlreadyExistsError for an aggregate without events, and commands retried it.
        It is a StorageError; an index on the key that includes other columns is the key."""
        table = await make_table(pg_schema)
        await fetch(
            f'CREATE UNIQUE INDEX ON "{pg_schema}"."{table}" (aggregate_name, version)'
            " INCLUDE (aggregate_id)"
        )
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            await store.push_event(created("a1"))
            with pytest.raises(StorageError, match="duplicate key") as info:
                await store.push_event(created("b1"))
            assert not isinstance(info.value, EventAlreadyExistsError)
            with pytest.raises(StorageError, match="duplicate key") as info:
                await EventStore.push_event_group(store.group_event(created("b1")))
            assert not isinstance(info.value, EventAlreadyExistsError)
        keyed = unique_table()
        await fetch(
            f'CREATE TABLE "{pg_schema}"."{keyed}" (id bigserial primary key,'
            " aggregate_name text NOT NULL, aggregate_id text NOT NULL, version bigint NOT NULL,"
            ' type text NOT NULL, data jsonb, metadata jsonb, "timestamp" timestamptz NOT NULL);'
            f' CREATE UNIQUE INDEX ON "{pg_schema}"."{keyed}"'
            " (aggregate_name, aggregate_id, version) INCLUDE (type)"
        )
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=keyed) as adapter:
            store = counter_store(adapter)
            await store.push_event(created("a1"))
            with pytest.raises(EventAlreadyExistsError):
                await store.push_event(created("a1"))

    async def test_a_value_past_a_postgresql_limit_is_the_events_limit(
        self, pg_schema: str
    ) -> None:
        """An aggregate id too long for the key's index (8 kB a row) is refused as the
        event's EventLimitExceededError (psycopg files the server's error under
        OperationalError, which is no reason to call the server unavailable); nothing is
        written."""
        table = await make_table(pg_schema)
        too_long = secrets.token_urlsafe(24_000)  # incompressible: stays past 8 kB
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            with pytest.raises(EventLimitExceededError, match="cannot hold"):
                await store.push_event(created(too_long))
            with pytest.raises(EventLimitExceededError, match="cannot hold"):
                await EventStore.push_event_group(
                    store.group_event(created("fine")), store.group_event(created(too_long))
                )
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(0,)]
            await store.push_event(created("fine"))

    async def test_a_conflict_lookup_that_fails_is_the_librarys_error(
        self, pg_schema: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """When finding out whether a unique violation is a conflict fails as well (the
        connection lost meanwhile), the caller gets the library's error, not psycopg's."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            await store.push_event(created("a1"))

            async def lookup_fails(*args: Any) -> bool:
                raise psycopg.OperationalError("the connection was lost")

            monkeypatch.setattr(PostgresEventStorageAdapter, "_is_event_key", lookup_fails)
            with pytest.raises(StorageUnavailableError, match="connection was lost"):
                await store.push_event(created("a1"))
            with pytest.raises(StorageUnavailableError, match="connection was lost"):
                await EventStore.push_event_group(
                    store.group_event(created("a2")), store.group_event(created("a1"))
                )
            monkeypatch.undo()
            assert [e.version for e in (await store.get_events("a1")).events] == [1]
            assert (await store.get_events("a2")).events == []

    @pytest.mark.parametrize("conflict_at", [0, 1, 2, 3])
    async def test_group_across_tables_names_the_first_conflicting_event(
        self, pg_schema: str, conflict_at: int
    ) -> None:
        """Over two tables, the reported event is the conflicting one, and nothing is written."""
        tables = [await make_table(pg_schema), await make_table(pg_schema)]
        adapters = [
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=t) for t in tables
        ]
        try:
            stores = [counter_store(adapters[0]), counter_store(adapters[1])]
            await stores[1].push_event(created("taken"))
            await stores[0].push_event(created("taken"))
            grouped = [stores[i % 2].group_event(created(f"g{i}")) for i in range(4)]
            grouped[conflict_at] = stores[conflict_at % 2].group_event(created("taken"))
            with pytest.raises(EventAlreadyExistsError) as info:
                await EventStore.push_event_group(*grouped)
            assert info.value.event_store_id == stores[conflict_at % 2].event_store_id
            assert info.value.aggregate_id == "taken"
            for i in range(4):
                assert (await stores[i % 2].get_events(f"g{i}")).events == []
        finally:
            for adapter in adapters:
                await adapter.aclose()

    async def test_group_force_upserts_in_every_table(self, pg_schema: str) -> None:
        """force=True overwrites existing versions in each member's own table."""
        tables = [await make_table(pg_schema), await make_table(pg_schema)]
        adapters = [
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=t) for t in tables
        ]
        try:
            stores = [counter_store(a) for a in adapters]
            for store in stores:
                await store.push_event(created("a1"))
                await store.push_event(incremented("a1", 2, by=1))
            await EventStore.push_event_group(
                stores[0].group_event(incremented("a1", 2, by=5)),
                stores[1].group_event(incremented("a1", 2, by=7)),
                stores[1].group_event(incremented("a1", 2, by=9)),
                force=True,
            )
            values = [(await s.get_aggregate("a1")).aggregate for s in stores]
            assert [v.value for v in values if v is not None] == [5, 9]
        finally:
            for adapter in adapters:
                await adapter.aclose()


class TestGroups:
    """Groups write each event to its own adapter's table, atomically, on one database."""

    async def test_each_event_goes_to_its_own_adapters_table(self, pg_schema: str) -> None:
        """Unlike Castore (B45), a member of another adapter lands in that adapter's table."""
        tables = [await make_table(pg_schema), await make_table(pg_schema)]
        adapters = [
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=t) for t in tables
        ]
        try:
            first, second = counter_store(adapters[0]), counter_store(adapters[1])
            await EventStore.push_event_group(
                first.group_event(created("a1")), second.group_event(created("b1"))
            )
            for table, expected in zip(tables, ["a1", "b1"], strict=True):
                rows = await fetch(f'SELECT aggregate_id FROM "{pg_schema}"."{table}"')
                assert rows == [(expected,)]
        finally:
            for adapter in adapters:
                await adapter.aclose()

    async def test_a_member_on_another_database_is_refused_before_writing(
        self, pg_schema: str
    ) -> None:
        """A group cannot span databases: EventGroupError, nothing written."""
        table = await make_table(pg_schema)
        here = PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table)
        elsewhere = PostgresEventStorageAdapter(OTHER_DSN, schema=pg_schema, table_name=table)
        try:
            first, second = counter_store(here), counter_store(elsewhere)
            with pytest.raises(EventGroupError, match="another database"):
                await EventStore.push_event_group(
                    first.group_event(created("a1")), second.group_event(created("b1"))
                )
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(0,)]
        finally:
            await here.aclose()
            await elsewhere.aclose()

    async def test_services_naming_other_databases_are_told_apart(
        self, pg_schema: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two adapters connecting by service name (pg_service.conf) may reach two databases
        through equal-looking conninfos: their group was written into the first one's
        database. Different services are refused; one service is one database."""
        services = tmp_path / "pg_service.conf"
        services.write_text(
            f"[castore_here]\nhost={POSTGRES_HOST}\nport={POSTGRES_PORT}\ndbname={DATABASE}\n"
            f"user=postgres\n\n[castore_there]\nhost={POSTGRES_HOST}\nport={POSTGRES_PORT}\n"
            "dbname=postgres\nuser=postgres\n"
        )
        monkeypatch.setenv("PGSERVICEFILE", str(services))
        table = await make_table(pg_schema)
        here = PostgresEventStorageAdapter(
            "service=castore_here", schema=pg_schema, table_name=table
        )
        again = PostgresEventStorageAdapter(
            "service=castore_here", schema=pg_schema, table_name=table
        )
        there = PostgresEventStorageAdapter(
            "service=castore_there", schema=pg_schema, table_name=table
        )
        try:
            first, second, third = counter_store(here), counter_store(again), counter_store(there)
            with pytest.raises(EventGroupError, match="service=castore_there") as info:
                await EventStore.push_event_group(
                    first.group_event(created("a1")), third.group_event(created("b1"))
                )
            assert "another database" in str(info.value)
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(0,)]
            await EventStore.push_event_group(
                first.group_event(created("a1")), second.group_event(created("b1"))
            )
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(2,)]
            # With a service, what the string leaves out comes from the service's file, not
            # from PGDATABASE: these two reach two databases.
            monkeypatch.setenv("PGDATABASE", "postgres")
            other = PostgresEventStorageAdapter(
                "service=castore_here dbname=postgres", schema=pg_schema, table_name=table
            )
            with pytest.raises(EventGroupError, match="another database"):
                await EventStore.push_event_group(
                    counter_store(PostgresEventStorageAdapter(
                        "service=castore_here", schema=pg_schema, table_name=table
                    )).group_event(created("g1")),
                    counter_store(other).group_event(created("h1")),
                )  # fmt: skip
            monkeypatch.delenv("PGDATABASE")

            # One address given as host= and as hostaddr= is one server.
            def at(where: str) -> PostgresEventStorageAdapter:
                return PostgresEventStorageAdapter(
                    f"{where} port={POSTGRES_PORT} dbname={DATABASE} user=postgres",
                    schema=pg_schema,
                    table_name=table,
                )

            by_address, by_host = at(f"hostaddr={POSTGRES_HOST}"), at(f"host={POSTGRES_HOST}")
            async with by_address, by_host:
                await EventStore.push_event_group(
                    counter_store(by_host).group_event(created("c1")),
                    counter_store(by_address).group_event(created("d1")),
                )
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(4,)]
            # One host name, two addresses: two servers (nothing listens on the second).
            elsewhere = at("host=localhost hostaddr=127.0.0.2")
            named = at(f"host=localhost hostaddr={POSTGRES_HOST}")
            with pytest.raises(EventGroupError, match="another database"):
                await EventStore.push_event_group(
                    counter_store(named).group_event(created("e1")),
                    counter_store(elsewhere).group_event(created("f1")),
                )
            await named.aclose()
            await elsewhere.aclose()
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(4,)]
        finally:
            for adapter in (here, again, there):
                await adapter.aclose()

    async def test_what_a_conninfo_leaves_out_comes_from_the_environment(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """libpq takes a missing port or database from PGPORT or PGDATABASE: with PGPORT set,
        an adapter without a port and one with port 5432 reach two servers. They were taken
        for one (the port defaulted to 5432), and a group wrote into the wrong server."""
        monkeypatch.setenv("PGPORT", "5433")
        named = PostgresEventStorageAdapter(f"host={POSTGRES_HOST} port=5432 dbname=test")
        defaulted = PostgresEventStorageAdapter(f"host={POSTGRES_HOST} dbname=test")
        with pytest.raises(EventGroupError, match="another database"):
            await EventStore.push_event_group(
                counter_store(named).group_event(created("a1")),
                counter_store(defaulted).group_event(created("b1")),
            )
        monkeypatch.setenv("PGPORT", "5432")
        alike = PostgresEventStorageAdapter(f"host={POSTGRES_HOST} dbname=test")
        assert named._unlike(alike) is None

    async def test_members_without_a_schema_must_resolve_their_tables_alike(
        self, pg_schema: str
    ) -> None:
        """A member naming its table without a schema, whose connections use another
        search_path, is refused (its events would land in the head's schema); with the same
        connection settings, or a schema, the group is written where each adapter reads."""
        other_schema = f"{pg_schema}_other"
        await fetch(f'CREATE SCHEMA "{other_schema}"')

        def unqualified(schema: str) -> PostgresEventStorageAdapter:
            options = {"options": f"-c search_path={schema}"}
            return PostgresEventStorageAdapter(DSN, table_name="events", connect_kwargs=options)

        try:
            here, there = unqualified(pg_schema), unqualified(other_schema)
            qualified = PostgresEventStorageAdapter(DSN, schema=other_schema, table_name="events")
            beside = unqualified(pg_schema)
            async with here, there, qualified, beside:
                await here.create_event_table()
                await there.create_event_table()
                first, second = counter_store(here), counter_store(there)
                with pytest.raises(EventGroupError, match="without a schema"):
                    await EventStore.push_event_group(
                        first.group_event(created("a1")), second.group_event(created("b1"))
                    )
                for schema in (pg_schema, other_schema):
                    assert await fetch(f'SELECT count(*) FROM "{schema}".events') == [(0,)]
                # The same settings resolve alike; a schema resolves anywhere.
                same = counter_store(beside)
                await EventStore.push_event_group(
                    first.group_event(created("a1")), same.group_event(created("a2"))
                )
                await EventStore.push_event_group(
                    first.group_event(created("a3")),
                    counter_store(qualified, second.event_store_id).group_event(created("b1")),
                )
                assert [e.version for e in (await second.get_events("b1")).events] == [1]
                rows = await fetch(f'SELECT aggregate_id FROM "{pg_schema}".events ORDER BY 1')
                assert rows == [("a1",), ("a2",), ("a3",)]
        finally:
            await fetch(f'DROP SCHEMA "{other_schema}" CASCADE')

    async def test_pools_with_computed_conninfo_group_only_with_themselves(
        self, pg_schema: str
    ) -> None:
        """A borrowed pool whose conninfo is a callable says nothing of its database: only
        adapters on that same pool may group with it."""
        table = await make_table(pg_schema)
        other = await make_table(pg_schema)
        async with (
            AsyncConnectionPool(lambda: DSN, min_size=1, max_size=2, open=False) as pool,
            AsyncConnectionPool(lambda: OTHER_DSN, min_size=1, max_size=2, open=False) as far,
        ):
            here = counter_store(
                PostgresEventStorageAdapter(pool=pool, schema=pg_schema, table_name=table)
            )
            beside = counter_store(
                PostgresEventStorageAdapter(pool=pool, schema=pg_schema, table_name=other)
            )
            elsewhere = counter_store(
                PostgresEventStorageAdapter(pool=far, schema=pg_schema, table_name=table)
            )
            with pytest.raises(EventGroupError, match="computed"):
                await EventStore.push_event_group(
                    here.group_event(created("a1")), elsewhere.group_event(created("b1"))
                )
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(0,)]
            await EventStore.push_event_group(
                here.group_event(created("a1")), beside.group_event(created("b1"))
            )
            assert len((await beside.get_events("b1")).events) == 1

    async def test_adapters_sharing_a_pool_may_group(self, pg_schema: str) -> None:
        """Adapters built on one borrowed pool are on the same database."""
        tables = [await make_table(pg_schema), await make_table(pg_schema)]
        async with AsyncConnectionPool(DSN, min_size=1, max_size=2, open=False) as pool:
            stores = [
                counter_store(
                    PostgresEventStorageAdapter(pool=pool, schema=pg_schema, table_name=t)
                )
                for t in tables
            ]
            result = await EventStore.push_event_group(
                stores[0].group_event(created("a1")), stores[1].group_event(created("b1"))
            )
            assert len(result.event_group) == 2
            assert len((await stores[1].get_events("b1")).events) == 1

    async def test_a_large_group_is_one_statement(self, pg_schema: str) -> None:
        """500 events over two tables are stored together."""
        tables = [await make_table(pg_schema), await make_table(pg_schema)]
        adapters = [
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=t) for t in tables
        ]
        try:
            stores = [counter_store(a) for a in adapters]
            grouped = [stores[i % 2].group_event(created(f"a{i}")) for i in range(500)]
            await EventStore.push_event_group(*grouped)
            listed = [len((await s.list_aggregate_ids()).aggregate_ids) for s in stores]
            assert listed == [250, 250]
        finally:
            for adapter in adapters:
                await adapter.aclose()


class TestUuidTable:
    """A table with uuid aggregate ids, as Castore creates by default."""

    async def test_uuid_ids_round_trip_in_canonical_form(self, pg_schema: str) -> None:
        """UUID ids are stored; an upper-case id reads back lower-case, like Castore (B83)."""
        table = await make_table(pg_schema, aggregate_id_type="uuid")
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            upper = str(uuid.uuid4()).upper()
            await store.push_event(created(upper))
            await store.push_event(incremented(upper.lower(), 2))
            events = (await store.get_events(upper)).events
            assert [e.aggregate_id for e in events] == [upper.lower()] * 2
            with pytest.raises(EventAlreadyExistsError):
                await store.push_event(created(upper.lower()))
            listed = (await store.list_aggregate_ids()).aggregate_ids
            assert [e.aggregate_id for e in listed] == [upper.lower()]

    async def test_a_push_returns_the_id_as_the_table_holds_it(self, pg_schema: str) -> None:
        """An upper-case UUID pushed through a connected store comes back lower-case in the
        result, the next aggregate and every message, as Castore returns its RETURNING row:
        the first message kept the caller's spelling while the second, whose aggregate is
        read from the table, carried the lower-case one, so one message's event and
        aggregate disagreed."""
        table = await make_table(pg_schema, aggregate_id_type="uuid")
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            queue = StateCarryingMessageQueue(message_queue_id="q", source_event_stores=[store])
            received: list[StateCarryingMessage] = []

            async def worker(message: StateCarryingMessage, context: MessageContext) -> None:
                received.append(message)

            queue_adapter = InMemoryMessageQueueAdapter.attach_to(queue, worker=worker)
            connected = ConnectedEventStore(store, queue)
            lower = str(uuid.uuid4())
            first = await connected.push_event(created(lower.upper()))
            second = await connected.push_event(incremented(lower.upper(), 2))
            await queue_adapter.join()
            assert first.event.aggregate_id == second.event.aggregate_id == lower
            assert first.next_aggregate is not None
            assert first.next_aggregate.aggregate_id == lower
            assert [(m.event.aggregate_id, m.aggregate.aggregate_id) for m in received] == [
                (lower, lower),
                (lower, lower),
            ]

    async def test_a_returned_aggregate_chains_under_the_callers_spelling(
        self, pg_schema: str
    ) -> None:
        """The next aggregate carries the table's lower-case id; passing it as prev_aggregate
        with the caller's own spelling of the same UUID (upper case, braces, no hyphens),
        in a push or a group, was refused as another aggregate's."""
        table = await make_table(pg_schema, aggregate_id_type="uuid")
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            lower = str(uuid.uuid4())
            upper = lower.upper()
            first = await store.push_event(created(upper))
            second = await store.push_event(
                incremented(upper, 2), prev_aggregate=first.next_aggregate
            )
            assert second.next_aggregate is not None
            assert second.next_aggregate.version == 2
            grouped = await EventStore.push_event_group(
                store.group_event(
                    incremented(f"{{{upper}}}", 3), prev_aggregate=second.next_aggregate
                )
            )
            third = grouped.event_group[0].next_aggregate
            assert third is not None
            await store.push_event(incremented(lower.replace("-", ""), 4), prev_aggregate=third)
            assert len((await store.get_events(lower)).events) == 4
            other = str(uuid.uuid4()).upper()
            with pytest.raises(ValueError, match="is aggregate"):
                await store.push_event(created(other, 5), prev_aggregate=third)

    @pytest.mark.parametrize("force", [False, True])
    async def test_a_row_a_trigger_skipped_keeps_the_id_as_given(
        self, pg_schema: str, force: bool
    ) -> None:
        """A BEFORE INSERT trigger returning NULL writes no row, so none comes back to say
        how the table holds the id: push_event and push_event_group return the id as
        given. (push_event failed an assertion on a non-canonical UUID.)"""
        table = await make_table(pg_schema, aggregate_id_type="uuid")
        qualified = f'"{pg_schema}"."{table}"'
        await fetch(
            f'CREATE OR REPLACE FUNCTION "{pg_schema}".skip_row() RETURNS trigger '
            "LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$"
        )
        await fetch(
            f"CREATE TRIGGER skip_row BEFORE INSERT ON {qualified} "
            f'FOR EACH ROW EXECUTE FUNCTION "{pg_schema}".skip_row()'
        )
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            upper = str(uuid.uuid4()).upper()
            pushed = await store.push_event(created(upper), force=force)
            assert pushed.event.aggregate_id == upper
            braced = f"{{{uuid.uuid4()}}}"
            grouped = await EventStore.push_event_group(
                store.group_event(created(braced)), force=force
            )
            assert grouped.event_group[0].event.aggregate_id == braced
            assert await fetch(f"SELECT count(*) FROM {qualified}") == [(0,)]

    @pytest.mark.parametrize("force", [False, True])
    async def test_every_spelling_of_a_uuid_comes_back_canonical(
        self, pg_schema: str, force: bool
    ) -> None:
        """Braces, no hyphens and upper case are stored, and returned by push_event and
        push_event_group, in lower-case canonical form; the same spellings pushed to a text
        table in the same group come back as given."""
        uuid_table = await make_table(pg_schema, aggregate_id_type="uuid")
        text_table = await make_table(pg_schema)
        async with (
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=uuid_table) as uuids,
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=text_table) as texts,
        ):
            uuid_store, text_store = counter_store(uuids), counter_store(texts)
            for spell in (str.upper, lambda i: f"{{{i}}}", lambda i: i.replace("-", "")):
                lower = str(uuid.uuid4())
                pushed = await uuid_store.push_event(created(spell(lower)), force=force)
                assert pushed.event.aggregate_id == lower
                assert pushed.next_aggregate is not None
                assert pushed.next_aggregate.aggregate_id == lower
                other, text_id = str(uuid.uuid4()), spell(str(uuid.uuid4()))
                result = await EventStore.push_event_group(
                    uuid_store.group_event(incremented(spell(lower), 2)),
                    text_store.group_event(created(text_id)),
                    uuid_store.group_event(created(spell(other))),
                    uuid_store.group_event(created(str(uuid.uuid4()).upper(), 3)),
                    force=force,
                )
                ids = [item.event.aggregate_id for item in result.event_group]
                assert ids[:3] == [lower, text_id, other]
                assert ids[3] == ids[3].lower()
                (alone,) = (
                    await EventStore.push_event_group(
                        uuid_store.group_event(incremented(spell(other), 2)), force=force
                    )
                ).event_group
                assert alone.event.aggregate_id == other
            rows = await fetch(f'SELECT count(*) FROM "{pg_schema}"."{uuid_table}"')
            assert rows == [(15,)]

    async def test_non_uuid_ids_are_refused_on_write_and_absent_on_read(
        self, pg_schema: str
    ) -> None:
        """A non-UUID id cannot be pushed (clear error, nothing written) and reads as absent."""
        table = await make_table(pg_schema, aggregate_id_type="uuid")
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            with pytest.raises(EventLimitExceededError, match="uuid"):
                await store.push_event(created("not-a-uuid"))
            with pytest.raises(EventLimitExceededError, match="uuid"):
                await EventStore.push_event_group(
                    store.group_event(created(str(uuid.uuid4()))),
                    store.group_event(created("not-a-uuid")),
                )
            # Also when the group repeats a key (then looked up before anything is written).
            with pytest.raises(EventLimitExceededError, match="uuid"):
                await EventStore.push_event_group(
                    store.group_event(created("not-a-uuid")),
                    store.group_event(created("not-a-uuid")),
                )
            assert (await store.get_events("not-a-uuid")).events == []
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(0,)]

    async def test_a_group_of_several_statements_returns_canonical_ids(
        self, pg_schema: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A group too large for one statement (here: more than two rows per statement)
        also returns the ids as its tables hold them, and names an id that is no UUID."""
        monkeypatch.setattr(postgres_writes, "ROWS_PER_STATEMENT", 2)
        uuid_table = await make_table(pg_schema, aggregate_id_type="uuid")
        text_table = await make_table(pg_schema)
        async with (
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=uuid_table) as uuids,
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=text_table) as texts,
        ):
            uuid_store, text_store = counter_store(uuids), counter_store(texts)
            lower, text_id = str(uuid.uuid4()), str(uuid.uuid4()).upper()
            grouped = [uuid_store.group_event(created(lower.upper()))]
            grouped += [uuid_store.group_event(incremented(lower.upper(), v)) for v in (2, 3)]
            grouped += [text_store.group_event(created(text_id))]
            with pytest.raises(EventLimitExceededError, match="'order-1' is not a UUID"):
                await EventStore.push_event_group(
                    *grouped, uuid_store.group_event(created("order-1"))
                )
            result = await EventStore.push_event_group(*grouped)
            ids = [item.event.aggregate_id for item in result.event_group]
            assert ids == [lower, lower, lower, text_id]
        assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{uuid_table}"') == [(3,)]

    async def test_a_non_uuid_id_is_named_with_the_column_type(self, pg_schema: str) -> None:
        """An id that is no UUID, pushed alone or in a group (also one that repeats a key,
        or that mixes text and uuid tables), is refused naming the id, its event store and
        the table's uuid column; nothing is written. It was an error "at event" saying only
        that PostgreSQL refused a value, naming the group's first store."""
        uuid_table = await make_table(pg_schema, aggregate_id_type="uuid")
        text_table = await make_table(pg_schema)
        async with (
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=uuid_table) as uuids,
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=text_table) as texts,
        ):
            uuid_store, text_store = counter_store(uuids), counter_store(texts)
            attempts = [
                lambda: uuid_store.push_event(created("order-1")),
                lambda: uuid_store.push_event(created("order-1"), force=True),
                lambda: EventStore.push_event_group(
                    text_store.group_event(created("order-1")),
                    uuid_store.group_event(created(str(uuid.uuid4()))),
                    uuid_store.group_event(created("order-1")),
                ),
                lambda: EventStore.push_event_group(
                    text_store.group_event(created("order-2")),
                    uuid_store.group_event(created("order-1")),
                    uuid_store.group_event(created("order-1")),
                ),
            ]
            for attempt in attempts:
                with pytest.raises(EventLimitExceededError) as info:
                    await attempt()
                error = info.value
                assert (error.event_store_id, error.path) == (
                    uuid_store.event_store_id,
                    ("aggregateId",),
                )
                assert "'order-1' is not a UUID" in str(error)
                assert f'aggregate_id column of "{pg_schema}"."{uuid_table}" is uuid' in str(error)
        for table in (uuid_table, text_table):
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(0,)]

    async def test_one_uuid_in_two_spellings_in_a_forced_group_lets_the_later_win(
        self, pg_schema: str
    ) -> None:
        """With force, a group naming one aggregate as a lower-case and an upper-case UUID
        writes one row, the later member's, as it does for a key repeated exactly (without
        force it is a conflict)."""
        table = await make_table(pg_schema, aggregate_id_type="uuid")
        lower = str(uuid.uuid4())
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            with pytest.raises(EventAlreadyExistsError):
                await EventStore.push_event_group(
                    store.group_event(created(lower)), store.group_event(created(lower.upper()))
                )
            result = await EventStore.push_event_group(
                store.group_event(created(lower)),
                store.group_event(created(lower.upper())),
                store.group_event(created(str(uuid.uuid4()))),
                force=True,
            )
            assert len(result.event_group) == 3
            (stored,) = (await store.get_events(lower)).events
            assert stored.payload.name == f"counter {lower.upper()}"
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(2,)]

    async def test_a_forced_group_folds_uuid_spellings_only_on_uuid_tables(
        self, pg_schema: str
    ) -> None:
        """With force, one UUID in two spellings is one aggregate on a uuid table but two on
        a text table of the same group: both text-table members are stored. Folding applied
        to every table of the group, and silently dropped one acknowledged text event."""
        uuid_table = await make_table(pg_schema, aggregate_id_type="uuid")
        text_table = await make_table(pg_schema)
        lower = str(uuid.uuid4())
        async with (
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=uuid_table) as uuids,
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=text_table) as texts,
        ):
            uuid_store, text_store = counter_store(uuids), counter_store(texts)
            result = await EventStore.push_event_group(
                uuid_store.group_event(created(lower.upper())),
                uuid_store.group_event(created(lower)),
                text_store.group_event(created(lower.upper())),
                text_store.group_event(created(lower)),
                force=True,
            )
            assert len(result.event_group) == 4
            (stored,) = (await uuid_store.get_events(lower)).events
            assert stored.payload.name == f"counter {lower}"
            for spelling in (lower.upper(), lower):
                (text_event,) = (await text_store.get_events(spelling)).events
                assert text_event.aggregate_id == spelling
        assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{uuid_table}"') == [(1,)]
        assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{text_table}"') == [(2,)]

    @pytest.mark.parametrize("depth", [1, 2])
    async def test_a_forced_group_folds_uuid_spellings_on_a_domain_over_uuid(
        self, pg_schema: str, depth: int
    ) -> None:
        """An aggregate_id typed as a domain over uuid (or over such a domain) stores UUIDs
        as uuid does: with force, the later of two spellings wins. Only a column typed
        uuid itself was recognised, and the group failed with a StorageError."""
        table = await make_table(pg_schema, aggregate_id_type="uuid")
        base = "uuid"
        for _ in range(depth):
            domain = f'"{pg_schema}"."{unique_table()}"'
            await fetch(f"CREATE DOMAIN {domain} AS {base} NOT NULL")
            base = domain
        await fetch(f'ALTER TABLE "{pg_schema}"."{table}" ALTER COLUMN aggregate_id TYPE {base}')
        lower = str(uuid.uuid4())
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            result = await EventStore.push_event_group(
                store.group_event(created(lower.upper())),
                store.group_event(created(lower)),
                force=True,
            )
            assert len(result.event_group) == 2
            (stored,) = (await store.get_events(lower)).events
            assert stored.payload.name == f"counter {lower}"
        assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(1,)]

    async def test_one_uuid_in_two_spellings_names_the_later_spelling(self, pg_schema: str) -> None:
        """A group naming one UUID twice (plain, then in braces, upper case or without
        hyphens) is a conflict naming the second spelling. Only upper and lower case were
        recognised: braces made the error name the group's first member, an unrelated
        aggregate."""
        table = await make_table(pg_schema, aggregate_id_type="uuid")
        unrelated, same = str(uuid.uuid4()), uuid.uuid4()
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            for spelling in (f"{{{same}}}", str(same).upper(), same.hex):
                with pytest.raises(EventAlreadyExistsError) as info:
                    await EventStore.push_event_group(
                        store.group_event(created(unrelated)),
                        store.group_event(created(str(same))),
                        store.group_event(created(spelling)),
                    )
                assert (info.value.aggregate_id, info.value.version) == (spelling, 1)
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(0,)]

    async def test_paging_over_uuid_ids_with_equal_timestamps(self, pg_schema: str) -> None:
        """Paging orders uuid ids like their text and visits each aggregate once."""
        table = await make_table(pg_schema, aggregate_id_type="uuid")
        ts = datetime(2024, 1, 1, tzinfo=UTC)
        ids = sorted(str(uuid.uuid4()) for _ in range(7))
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            await EventStore.push_event_group(*(store.group_event(created(i, ts=ts)) for i in ids))
            seen, token = [], None
            while True:
                page = await (
                    store.list_aggregate_ids(limit=3)
                    if token is None
                    else store.list_aggregate_ids(page_token=token)
                )
                seen += [e.aggregate_id for e in page.aggregate_ids]
                if (token := page.next_page_token) is None:
                    break
        assert seen == ids


@pytest.fixture(params=[True, False], ids=["row-batches", "server-chunks"])
def long_read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long reads stream row batches with libpq 17+, server-built chunks before: test both."""
    monkeypatch.setattr(postgres_module, "_CHUNKED_ROWS", request.param)


class TestLongAggregates:
    """Aggregates and groups beyond one chunk or one statement."""

    @pytest.mark.usefixtures("long_read_path")
    async def test_long_aggregate_reads_every_event_with_any_options(self, pg_schema: str) -> None:
        """2,500 events (read in streamed chunks) come back complete for every option mix."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            await EventStore.push_event_group(
                store.group_event(created("long")),
                *(store.group_event(incremented("long", v)) for v in range(2, 2501)),
            )

            async def versions(**options: Any) -> list[int]:
                return [e.version for e in (await store.get_events("long", **options)).events]

            assert await versions() == list(range(1, 2501))
            assert await versions(min_version=999, max_version=2001) == list(range(999, 2002))
            assert await versions(min_version=1001) == list(range(1001, 2501))
            assert await versions(max_version=1000) == list(range(1, 1001))
            assert await versions(max_version=1001) == list(range(1, 1002))
            assert await versions(reverse=True, limit=3) == [2500, 2499, 2498]
            assert await versions(limit=1500) == list(range(1, 1501))
            aggregate = (await store.get_aggregate("long")).aggregate
            assert aggregate is not None
            assert (aggregate.value, aggregate.version) == (2499, 2500)

    @pytest.mark.usefixtures("long_read_path")
    @pytest.mark.parametrize(
        "data",
        ['{"by": "nope"}', '{"by": ' + "[" * 250 + "]" * 250 + "}"],
        ids=["does-not-validate", "does-not-parse"],
    )
    async def test_bad_event_deep_in_a_long_aggregate_is_named(
        self, pg_schema: str, data: str
    ) -> None:
        """A stored event in a later chunk that fails validation, or that the validator
        cannot parse as JSON, names its version."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name=table, min_size=1, max_size=1
        ) as adapter:
            store = counter_store(adapter)
            await EventStore.push_event_group(
                store.group_event(created("long")),
                *(store.group_event(incremented("long", v)) for v in range(2, 3001)),
            )
            await fetch(f'UPDATE "{pg_schema}"."{table}" SET data = %s WHERE version = 2200', data)
            with pytest.raises(StoredEventValidationError) as info:
                await store.get_events("long")
            assert (info.value.aggregate_id, info.value.version) == ("long", 2200)
            # The interrupted stream left the only connection usable.
            assert len((await store.get_events("long", max_version=10)).events) == 10

    @pytest.mark.usefixtures("long_read_path")
    async def test_a_long_read_sees_one_snapshot_during_a_concurrent_rewrite(
        self, pg_schema: str
    ) -> None:
        """Another connection rewrites every event in one statement, again and again; a long
        read (full or bounded) never returns some events from before a rewrite and others
        from after it."""
        table = await make_table(pg_schema)
        async with (
            PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter,
            await psycopg.AsyncConnection.connect(DSN, autocommit=True) as writer,
        ):
            store = counter_store(adapter)
            await EventStore.push_event_group(
                *(
                    store.group_event(NoteAdded(aggregate_id="long", version=v, payload={"n": 0}))
                    for v in range(1, 2501)
                )
            )
            rewrites = 0

            async def rewrite() -> None:
                nonlocal rewrites
                while True:
                    rewrites += 1
                    await writer.execute(
                        f'UPDATE "{pg_schema}"."{table}"'
                        " SET data = jsonb_build_object('n', %s::int)"
                        " WHERE aggregate_id = 'long'",
                        (rewrites,),
                    )

            rewriting = asyncio.ensure_future(rewrite())
            mixed: list[set[int]] = []
            try:
                deadline = asyncio.get_running_loop().time() + 2
                reads = 0
                while asyncio.get_running_loop().time() < deadline or reads < 20:
                    # Half the reads begin with their first statement before the snapshot
                    # (the adapter forgets it found the aggregate long); the others read in
                    # the snapshot straight away.
                    bounds = {"min_version": 1} if reads % 2 else {}
                    if reads % 4 < 2:
                        adapter._long.clear()
                    events = (await store.get_events("long", **bounds)).events
                    reads += 1
                    assert [e.version for e in events] == list(range(1, 2501))
                    seen = {e.payload["n"] for e in events}
                    if len(seen) != 1:
                        mixed.append(seen)
            finally:
                rewriting.cancel()
                with contextlib.suppress(asyncio.CancelledError, psycopg.Error):
                    await rewriting
            assert rewrites > 5, "the writer did not get to run while reads went on"
            assert mixed == []

    async def test_an_aggregate_found_long_is_read_at_once_in_a_snapshot_next_time(
        self, pg_schema: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The first read of a long aggregate reads its first events twice; later reads whose
        bounds hold 1,000 of the versions seen do not, and return the same events; reads
        with narrower bounds, and reads after the aggregate came back short, begin with
        their first statement again."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            for name in ("long", "other"):
                await EventStore.push_event_group(
                    store.group_event(created(name)),
                    *(store.group_event(incremented(name, v)) for v in range(2, 1201)),
                )
            statements: list[str] = []
            execute = postgres_module.direct.execute

            async def spy(conn: Any, query: str, params: Any) -> Any:
                statements.append(query)
                return await execute(conn, query, params)

            async def read(name: str, **bounds: int) -> tuple[list[int], bool, bool]:
                """Versions read, whether a first statement ran, whether a snapshot did."""
                statements.clear()
                events = (await store.get_events(name, **bounds)).events
                first = {
                    adapter._sql.first_events(min_version=lo, max_version=hi)
                    for lo in (False, True)
                    for hi in (False, True)
                }
                return (
                    [e.version for e in events],
                    bool(first.intersection(statements)),
                    postgres_module._SNAPSHOT in statements,
                )

            monkeypatch.setattr(postgres_module.direct, "execute", spy)
            everything = list(range(1, 1201))
            assert await read("long") == (everything, True, True)
            first = (await store.get_events("long")).events
            assert await read("long") == (everything, False, True)
            assert (await store.get_events("long")).events == first
            await store.push_event(incremented("long", 1201))
            assert await read("long") == ([*everything, 1201], False, True)
            # Bounds holding 1,000 of the versions seen: straight in the snapshot.
            assert await read("long", min_version=2) == (list(range(2, 1202)), False, True)
            assert await read("long", max_version=1000) == (list(range(1, 1001)), False, True)
            # Narrower bounds: the first statement holds the whole read.
            assert await read("long", min_version=300) == (list(range(300, 1202)), True, False)
            assert await read("long", max_version=999) == (list(range(1, 1000)), True, False)
            # A bounded read that finds an aggregate long makes later full reads skip ahead.
            assert await read("other", min_version=1) == (everything, True, True)
            assert await read("other") == (everything, False, True)
            # The aggregate came back short: the read in the snapshot finds it so, and the
            # next read begins with its first statement again.
            await fetch(
                f'DELETE FROM "{pg_schema}"."{table}"'
                " WHERE aggregate_id = 'other' AND version > 10"
            )
            # (A bounded read: one without bounds would also remember the new last version.)
            short = list(range(1, 11))
            assert await read("other", min_version=1) == (short, False, True)
            assert await read("other", min_version=1) == (short, True, False)
            assert await read("other") == (short, True, False)

    async def test_a_read_longer_than_one_postgresql_value_is_streamed(
        self, pg_schema: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A statement whose JSON array would pass PostgreSQL's 1 GB for one value fails with
        program_limit_exceeded (injected here: a real one takes a gigabyte of events; tried
        by hand with 1,100 events of a megabyte). A forward read then streams the rows one
        by one; a read that cannot is a StorageError saying a retry cannot help."""
        assert postgres_module._CHUNKED_ROWS, "psycopg's libpq has no chunked rows mode"
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            await EventStore.push_event_group(
                store.group_event(created("a")),
                *(store.group_event(incremented("a", v)) for v in range(2, 6)),
            )
            execute = postgres_module.direct.execute

            async def arrays_too_long(conn: Any, query: str, params: Any) -> Any:
                if "json_agg" in query:  # the statements that build one JSON array
                    raise psycopg.errors.ProgramLimitExceeded("out of memory")
                return await execute(conn, query, params)

            monkeypatch.setattr(postgres_module.direct, "execute", arrays_too_long)
            for bounds in ({}, {"min_version": 2}, {"max_version": 4}):
                events = (await store.get_events("a", **bounds)).events
                low, high = bounds.get("min_version", 1), bounds.get("max_version", 5)
                assert [e.version for e in events] == list(range(low, high + 1))
            for options in ({"reverse": True}, {"limit": 3}):
                with pytest.raises(StorageError, match="retrying cannot help") as info:
                    await store.get_events("a", **options)
                assert not isinstance(info.value, StorageUnavailableError)

    async def test_group_larger_than_one_statement_is_still_atomic(self, pg_schema: str) -> None:
        """A group beyond one statement's 65,535 values is one transaction: all or nothing."""
        table = await make_table(pg_schema)
        async with PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table) as adapter:
            store = counter_store(adapter)
            await store.push_event(created("taken"))
            grouped = [store.group_event(created(f"g{i}")) for i in range(5_200)]
            with pytest.raises(EventAlreadyExistsError) as info:
                await EventStore.push_event_group(*grouped, store.group_event(created("taken")))
            assert info.value.aggregate_id == "taken"
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(1,)]
            await EventStore.push_event_group(*grouped)
            assert await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"') == [(5_201,)]


class TestBorrowedPool:
    """A pool passed in stays the caller's to open and close."""

    @pytest.mark.parametrize(
        "connection",
        [{"row_factory": dict_row}, {"cursor_factory": psycopg.AsyncRawCursor}],
        ids=["dict_row", "raw-cursor"],
    )
    async def test_a_pool_with_its_own_row_or_cursor_factory_works(
        self, pg_schema: str, connection: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Connections with another row factory (dict_row) or cursor class (a raw cursor,
        with $1 placeholders) serve every statement the adapter runs through psycopg:
        creating the table, conflicts, listing, large groups and long reads. They failed
        with raw KeyError and TypeError, wrong "missing columns" errors or SQL errors."""
        table = unique_table()
        odd = unique_table()
        await fetch(
            f'CREATE TABLE "{pg_schema}"."{odd}" (id bigserial primary key,'
            " aggregate_name text NOT NULL, aggregate_id text NOT NULL, version bigint NOT NULL,"
            ' type text NOT NULL, data jsonb, metadata jsonb, "timestamp" timestamptz NOT NULL);'
            f' CREATE UNIQUE INDEX "{odd} odd name" ON "{pg_schema}"."{odd}"'
            " (version, aggregate_id, aggregate_name)"
        )
        async with AsyncConnectionPool(
            DSN, min_size=1, max_size=2, open=False, kwargs=connection
        ) as pool:
            adapter = PostgresEventStorageAdapter(pool=pool, schema=pg_schema, table_name=table)
            odd_adapter = PostgresEventStorageAdapter(pool=pool, schema=pg_schema, table_name=odd)
            for _ in range(2):
                await adapter.create_event_table()
            indexes = await fetch(
                "SELECT indexname::text FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
                pg_schema,
                table,
            )
            assert (f"{table}_initial_events_idx",) in indexes
            store, odd_store = counter_store(adapter), counter_store(odd_adapter)
            await store.push_event(created("a1"))
            await odd_store.push_event(created("a1"))
            for conflicting in (store, odd_store):
                with pytest.raises(EventAlreadyExistsError):
                    await conflicting.push_event(created("a1"))
                with pytest.raises(EventAlreadyExistsError) as info:
                    await EventStore.push_event_group(
                        conflicting.group_event(created("a2")),
                        conflicting.group_event(created("a1")),
                    )
                assert (info.value.aggregate_id, info.value.version) == ("a1", 1)
            listed = (await store.list_aggregate_ids(limit=5)).aggregate_ids
            assert [entry.aggregate_id for entry in listed] == ["a1"]
            # Beyond one statement: several statements in a transaction, through a cursor.
            grouped = [store.group_event(created("long"))]
            grouped += [store.group_event(incremented("long", v)) for v in range(2, 5_002)]
            with pytest.raises(EventAlreadyExistsError) as info:
                await EventStore.push_event_group(*grouped, store.group_event(created("a1")))
            assert info.value.aggregate_id == "a1"
            await EventStore.push_event_group(*grouped)
            monkeypatch.setattr(postgres_module, "_CHUNKED_ROWS", False)  # a cursor's stream
            assert len((await store.get_events("long")).events) == 5_001
            # One UUID in two spellings in a forced group: its uuid tables are looked up.
            uuids = PostgresEventStorageAdapter(pool=pool, schema=pg_schema, table_name=odd + "u")
            await uuids.create_event_table(aggregate_id_type="uuid")
            uuid_store, lower = counter_store(uuids), str(uuid.uuid4())
            await EventStore.push_event_group(
                uuid_store.group_event(created(lower.upper())),
                uuid_store.group_event(created(lower)),
                force=True,
            )
            assert len((await uuid_store.get_events(lower)).events) == 1
            await adapter.drop_event_table()
        assert await fetch("SELECT to_regclass(%s)::text", f'"{pg_schema}"."{table}"') == [(None,)]

    async def test_unopened_pool_is_a_clear_error(self, pg_schema: str) -> None:
        """A borrowed pool that was never opened gives StorageError saying so."""
        pool = AsyncConnectionPool(DSN, open=False)
        adapter = PostgresEventStorageAdapter(pool=pool, schema=pg_schema)
        with pytest.raises(StorageError, match="not open yet"):
            await counter_store(adapter).get_events("a1")
        await adapter.aclose()
        assert pool.closed
