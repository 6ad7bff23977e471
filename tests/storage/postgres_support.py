"""What the PostgreSQL adapter tests share: the server, a private schema, small helpers.

Every test module gets its own schema ``castore_test_<random>`` in database ``test`` and drops
it at the end, so runs never see each other's tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any, Self

import psycopg
import pytest
from psycopg import sql

from castore_pydantic import EventStore
from castore_pydantic.storage.postgres import PostgresEventStorageAdapter
from castore_pydantic.testing.contracts._storage import (
    Counter,
    CounterCreated,
    CounterEvent,
    CounterIncremented,
    NoteAdded,
    reduce_counter,
)
from tests.services import POSTGRES_HOST, POSTGRES_PORT, require_postgres

DATABASE = os.environ.get("CASTORE_TEST_PG_DATABASE", "test")
DSN = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{DATABASE}"
#: The same server through the other database, for "not the same database" checks.
OTHER_DSN = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/postgres"


@pytest.fixture(scope="module")
def pg_schema() -> Iterator[str]:
    """A fresh schema for the module's tables, dropped with everything in it afterwards."""
    require_postgres()
    name = f"castore_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    yield name
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


def unique_table() -> str:
    """A table name no other test uses."""
    return f"ev_{uuid.uuid4().hex[:10]}"


def counter_store(
    adapter: Any, event_store_id: str | None = None
) -> EventStore[Counter, CounterEvent]:
    """A counter event store (the contract suite's types) on ``adapter``."""
    return EventStore(
        event_store_id=event_store_id or f"C{uuid.uuid4().hex[:10].upper()}",
        event_types=[CounterCreated, CounterIncremented, NoteAdded],
        reducer=reduce_counter,
        event_storage_adapter=adapter,
    )


async def fetch(query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one query on a connection of its own (not the adapter's pool)."""
    async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
        cursor = await conn.execute(query.encode(), params or None)
        return await cursor.fetchall() if cursor.description else []


async def make_table(schema: str, *, aggregate_id_type: str = "text") -> str:
    """Create a fresh event table in ``schema`` with the adapter; return its name."""
    table = unique_table()
    async with PostgresEventStorageAdapter(DSN, schema=schema, table_name=table) as adapter:
        await adapter.create_event_table(aggregate_id_type=aggregate_id_type)  # type: ignore[arg-type]
    return table


async def wait_for(predicate: Any, *, within: float = 10.0, what: str = "condition") -> None:
    """Poll an async predicate until it holds (for states the server only shows by query)."""
    deadline = asyncio.get_running_loop().time() + within
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


class SlowServer:
    """A TCP proxy to the test server that answers each new connection late, or never.

    It forwards nothing of a connection until ``delay`` seconds after accepting it (``None``:
    never, a hung server), as a far, cold-starting or overloaded server does. Use it as
    ``async with SlowServer(2.5) as server:``, then connect to ``server.dsn``.
    """

    def __init__(self, delay: float | None) -> None:
        self.delay = delay
        self.dsn = ""
        #: Connections accepted so far, and those the client has not closed yet.
        self.accepted = 0
        self.open = 0
        self.arrived = asyncio.Event()
        self._closing = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> Self:
        require_postgres()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.dsn = f"postgresql://postgres@127.0.0.1:{port}/{DATABASE}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self._closing.set()
        for writer in self._writers:
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(self._handlers)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self.accepted += 1
        self.open += 1
        self.arrived.set()
        self._writers.add(writer)
        try:
            if self.delay is None:
                await reader.read()  # until the client hangs up
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.delay)
            if self._closing.is_set():
                return
            up_reader, up_writer = await asyncio.open_connection(POSTGRES_HOST, POSTGRES_PORT)
            self._writers.add(up_writer)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        except (ConnectionError, OSError):
            pass
        finally:
            self.open -= 1
            writer.transport.abort()
            self._handlers.discard(handler)

    @staticmethod
    async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.transport.abort()
