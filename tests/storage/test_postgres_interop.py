"""Sharing a table with Castore: its exact DDL, its row shape, and the real npm package.

The first half needs only PostgreSQL: a table created with Castore's DDL (UUID ids,
VARCHAR(32)/(64), BIGSERIAL id, fixed index names) is read and written by our adapter, and
the rows we write have the shape Castore's reader expects (§10.3). The second half runs
``@castore/event-storage-adapter-postgres@2.4.2`` itself under Node 20: it reads what we
wrote and writes rows we then read. It installs the package into a cache directory
(``CASTORE_NODE_INTEROP_DIR``, default ``~/.cache/castore-pydantic/castore-2.4.2``) and skips
when Node, npm or the registry is unavailable; under ``CASTORE_REQUIRE_SERVICES=1`` it fails
instead, with the reason.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from castore_pydantic import EventStore
from castore_pydantic.errors import EventAlreadyExistsError, EventLimitExceededError
from castore_pydantic.storage.postgres import PostgresEventStorageAdapter
from castore_pydantic.testing.contracts._storage import NoteAdded, created, incremented
from tests.services import POSTGRES_HOST, POSTGRES_PORT, services_required
from tests.storage.postgres_support import DATABASE, DSN, counter_store, fetch, pg_schema

__all__ = ["pg_schema"]  # the fixture is used by name

pytestmark = pytest.mark.postgres

CASTORE_VERSION = "2.4.2"
SCRIPT = Path(__file__).with_name("castore_interop.cjs")


def castore_ddl(schema: str, table: str = "event") -> str:
    """The DDL ``PostgresEventStorageAdapter.createEventTable()`` runs, defaults (§10.1)."""
    qualified = f'"{schema}".{table}'
    return f"""
        CREATE TABLE IF NOT EXISTS {qualified} (
          id              BIGSERIAL PRIMARY KEY,
          aggregate_name  VARCHAR(32) NOT NULL,
          aggregate_id    UUID NOT NULL,
          version         BIGINT NOT NULL,
          type            VARCHAR(64) NOT NULL,
          data            JSONB,
          metadata        JSONB,
          timestamp       TIMESTAMPTZ NOT NULL DEFAULT (CURRENT_TIMESTAMP(3)),
          UNIQUE (aggregate_name, aggregate_id, version)
        );
        CREATE INDEX IF NOT EXISTS idx_event_aggregate_name ON {qualified}(aggregate_name);
        CREATE INDEX IF NOT EXISTS idx_event_version ON {qualified}(version);
        CREATE INDEX IF NOT EXISTS idx_event_aggregate_lookup
          ON {qualified}(aggregate_name, aggregate_id);
    """


@pytest.fixture(scope="module")
def castore_table(pg_schema: str) -> str:
    """Castore's default table, ``event``, created with Castore's exact DDL."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(castore_ddl(pg_schema).encode())
    return "event"


def _new_id() -> str:
    return str(uuid.uuid4())


class TestCastoreTable:
    """Our adapter on a table Castore created."""

    async def test_reads_rows_written_the_way_castore_writes_them(
        self, pg_schema: str, castore_table: str
    ) -> None:
        """Rows with defaulted timestamps, NULL data and JSON metadata read back as events."""
        aggregate_id = _new_id()
        await fetch(
            f'INSERT INTO "{pg_schema}".{castore_table}'
            " (aggregate_name, aggregate_id, version, type, data, metadata) VALUES"
            " ('NOTES', %s, 1, 'NOTE_ADDED', NULL, '{\"by\": \"ts\"}'),"
            " ('NOTES', %s, 2, 'NOTE_ADDED', '{\"n\": 2}', NULL)",
            aggregate_id,
            aggregate_id,
        )
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name=castore_table
        ) as adapter:
            store = counter_store(adapter, "NOTES")
            first, second = (await store.get_events(aggregate_id.upper())).events
        assert isinstance(first, NoteAdded)
        assert (first.payload, first.metadata) == (None, {"by": "ts"})
        assert (second.payload, second.metadata) == ({"n": 2}, None)
        assert first.timestamp is not None
        assert first.timestamp.microsecond % 1000 == 0
        assert first.model_dump(mode="json").keys() == {
            "aggregateId",
            "version",
            "type",
            "timestamp",
            "metadata",
        }

    async def test_writes_the_row_shape_castore_reads(
        self, pg_schema: str, castore_table: str
    ) -> None:
        """Our rows: store id in aggregate_name, SQL NULL for absent data, ms UTC timestamps."""
        aggregate_id = _new_id()
        ts = datetime(2024, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name=castore_table
        ) as adapter:
            store = counter_store(adapter, "COUNTERS")
            await store.push_event(created(aggregate_id, ts=ts))
            await store.push_event(NoteAdded(aggregate_id=aggregate_id, version=2))
        rows = await fetch(
            "SELECT aggregate_name, aggregate_id::text, version, type, data, metadata,"
            " data IS NULL, metadata IS NULL, to_char(timestamp AT TIME ZONE 'UTC',"
            ' \'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\')'
            f' FROM "{pg_schema}".{castore_table} WHERE aggregate_id = %s ORDER BY version',
            aggregate_id,
        )
        assert rows[0] == (
            "COUNTERS",
            aggregate_id,
            1,
            "COUNTER_CREATED",
            {"name": f"counter {aggregate_id}"},
            None,
            False,
            True,
            "2024-03-04T05:06:07.890000Z",
        )
        assert rows[1][4:8] == (None, None, True, True)  # SQL NULL, never JSON null

    async def test_conflicts_on_castores_constraint_are_typed(
        self, pg_schema: str, castore_table: str
    ) -> None:
        """Castore's auto-named unique constraint gives EventAlreadyExistsError everywhere."""
        aggregate_id = _new_id()
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name=castore_table
        ) as adapter:
            store = counter_store(adapter, "COUNTERS")
            await store.push_event(created(aggregate_id))
            with pytest.raises(EventAlreadyExistsError):
                await store.push_event(created(aggregate_id))
            fresh = _new_id()
            with pytest.raises(EventAlreadyExistsError) as info:
                await EventStore.push_event_group(
                    store.group_event(created(fresh)), store.group_event(created(aggregate_id))
                )
            assert info.value.aggregate_id == aggregate_id
            assert (await store.get_events(fresh)).events == []

    async def test_castores_column_limits_are_clear_errors(
        self, pg_schema: str, castore_table: str
    ) -> None:
        """A store id longer than VARCHAR(32) is refused with a clear error, nothing written."""
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name=castore_table
        ) as adapter:
            store = counter_store(adapter, "S" * 33)
            with pytest.raises(EventLimitExceededError, match="varying\\(32\\)"):
                await store.push_event(created(_new_id()))
            assert (await store.list_aggregate_ids()).aggregate_ids == []

    async def test_create_event_table_keeps_castores_table_and_adds_the_listing_index(
        self, pg_schema: str, castore_table: str
    ) -> None:
        """create_event_table() on Castore's table changes no column and adds one index."""
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name=castore_table
        ) as adapter:
            await adapter.create_event_table()
            store = counter_store(adapter, "LISTED")
            ids = sorted(_new_id() for _ in range(3))
            ts = datetime(2024, 1, 1, tzinfo=UTC)
            for aggregate_id in ids:
                await store.push_event(created(aggregate_id, ts=ts))
                await store.push_event(incremented(aggregate_id, 2))
            page = await store.list_aggregate_ids(limit=2)
            rest = await store.list_aggregate_ids(page_token=page.next_page_token)
        listed = [e.aggregate_id for e in page.aggregate_ids + rest.aggregate_ids]
        assert listed == ids
        types = await fetch(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = to_regclass(%s) AND attname = 'aggregate_id'",
            f"{pg_schema}.{castore_table}",
        )
        assert types == [("uuid",)]
        indexes = {
            name
            for (name,) in await fetch(
                "SELECT indexname::text FROM pg_indexes WHERE schemaname = %s AND tablename = %s",
                pg_schema,
                castore_table,
            )
        }
        assert {"idx_event_aggregate_lookup", "event_initial_events_idx"} <= indexes


# -- the real Castore under Node ---------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if services_required():
        pytest.fail(f"Castore interop: {reason} (CASTORE_REQUIRE_SERVICES is set)", pytrace=False)
    pytest.skip(f"Castore interop: {reason}")


@pytest.fixture(scope="module")
def castore_node() -> Path:
    """A directory whose node_modules holds Castore's npm packages (installed once, cached)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable("node and npm are not on PATH")
    assert node is not None
    assert npm is not None
    major = subprocess.run(
        [node, "-p", "process.versions.node.split('.')[0]"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout.strip()
    if not major.isdigit() or int(major) < 18:
        _unavailable(f"Node 18+ is needed, found {major or 'nothing'}")
    default = Path.home() / ".cache" / "castore-pydantic" / f"castore-{CASTORE_VERSION}"
    root = Path(os.environ.get("CASTORE_NODE_INTEROP_DIR", default))
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "node_modules" / "@castore" / "event-storage-adapter-postgres" / "package.json"
    with (root / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs install once
        if not marker.exists():
            try:
                result = subprocess.run(
                    [
                        npm,
                        "install",
                        "--no-audit",
                        "--no-fund",
                        "--loglevel=error",
                        "--prefix",
                        str(root),
                        f"@castore/event-storage-adapter-postgres@{CASTORE_VERSION}",
                        f"@castore/core@{CASTORE_VERSION}",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                _unavailable("npm install did not finish within 300 s")
            if result.returncode != 0 or not marker.exists():
                _unavailable(f"npm install failed: {result.stderr.strip()[-500:]}")
    version = json.loads(marker.read_text())["version"]
    assert version == CASTORE_VERSION
    return root


async def run_castore(root: Path, schema: str, request: dict[str, Any]) -> dict[str, Any]:
    """Run the Node script with ``request``; return its response."""
    request = {
        "connectionString": f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{DATABASE}"
        f"?search_path={schema}",
        "tableName": "event",
        **request,
    }
    env = {**os.environ, "NODE_PATH": str(root / "node_modules")}
    process = await asyncio.create_subprocess_exec(
        "node",
        str(SCRIPT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await process.communicate(json.dumps(request).encode())
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail("the Castore script did not finish within 60 s")
    assert process.returncode == 0, err.decode()
    response: dict[str, Any] = json.loads(out)
    return response


class TestRealCastore:
    """The npm package reads what we write, and we read what it writes, on one table."""

    @pytest.fixture(params=["castore-ddl", "our-ddl"])
    async def table(self, request: pytest.FixtureRequest, pg_schema: str) -> AsyncIterator[str]:
        """Castore's table (uuid ids) or ours (text ids), each named ``event`` in a schema."""
        schema = f"{pg_schema}_{request.param.replace('-', '_')}"
        await fetch(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        if request.param == "castore-ddl":
            await fetch(castore_ddl(schema))
        else:
            async with PostgresEventStorageAdapter(DSN, schema=schema) as adapter:
                await adapter.create_event_table()
        yield schema
        await fetch(f'DROP SCHEMA "{schema}" CASCADE')

    async def test_castore_reads_what_we_wrote_and_we_read_what_it_wrote(
        self, castore_node: Path, table: str
    ) -> None:
        """Events cross both ways unchanged; conflicts are detected on both sides."""
        ours, theirs = _new_id(), _new_id()
        async with PostgresEventStorageAdapter(DSN, schema=table) as adapter:
            store = counter_store(adapter, "POKEMONS")
            await store.push_event(
                created(ours, ts=datetime(2024, 1, 2, 3, 4, 5, 6000, tzinfo=UTC))
            )
            await store.push_event(incremented(ours, 2, by=3))
            await store.push_event(
                NoteAdded(aggregate_id=ours, version=3, metadata={"by": "python", "n": [1, 2]})
            )
            written = [e.model_dump(mode="json") for e in (await store.get_events(ours)).events]

            response = await run_castore(
                castore_node,
                table,
                {
                    "eventStoreId": "POKEMONS",
                    "write": [
                        {
                            "aggregateId": theirs,
                            "version": 1,
                            "type": "COUNTER_CREATED",
                            "payload": {"name": "from node"},
                            "timestamp": "2024-05-06T07:08:09.123Z",
                        },
                        {
                            "aggregateId": theirs,
                            "version": 2,
                            "type": "NOTE_ADDED",
                            "metadata": {"by": "castore"},
                        },
                    ],
                    "duplicate": {"aggregateId": ours, "version": 2, "type": "NOTE_ADDED"},
                    "read": [ours],
                    "list": True,
                },
            )
            assert response["read"][ours] == written
            assert response["duplicate"] == {
                "name": "PostgresEventAlreadyExistsError",
                "code": "EventAlreadyExistsError",
            }
            assert set(response["listed"]) == {ours, theirs}
            read_back = [e.model_dump(mode="json") for e in (await store.get_events(theirs)).events]
            assert read_back == response["written"]
            with pytest.raises(EventAlreadyExistsError):
                await store.push_event(NoteAdded(aggregate_id=theirs, version=2))
            listed = {e.aggregate_id for e in (await store.list_aggregate_ids()).aggregate_ids}
            assert listed == {ours, theirs}
