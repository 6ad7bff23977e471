"""Opening the PostgreSQL adapter: failing early, and at once when retrying cannot help."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from castore_pydantic.errors import StorageError, StorageUnavailableError
from castore_pydantic.storage import _postgres_connect as connect
from castore_pydantic.storage.postgres import PostgresEventStorageAdapter
from castore_pydantic.testing.contracts._storage import created
from tests.services import POSTGRES_HOST, POSTGRES_PORT, require_postgres
from tests.storage.postgres_support import (
    counter_store,
    pg_schema,
)

__all__ = ["pg_schema"]  # the fixture is used by name

SERVER = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}"


@pytest.fixture
async def database_name() -> AsyncIterator[str]:
    """The name of a database that does not exist yet; dropped afterwards if made."""
    require_postgres()
    name = f"castore_test_{uuid.uuid4().hex[:12]}"
    yield name
    async with await psycopg.AsyncConnection.connect(f"{SERVER}/test", autocommit=True) as conn:
        await conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


async def _create_database(name: str) -> None:
    async with await psycopg.AsyncConnection.connect(f"{SERVER}/test", autocommit=True) as conn:
        await conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


@pytest.mark.postgres
class TestOpening:
    """``async with`` connects first; what no retry can fix fails at once, not at the timeout."""

    async def test_entering_fails_at_once_on_a_database_that_does_not_exist(
        self, database_name: str
    ) -> None:
        """``async with`` entered fine and the first operation waited the whole timeout
        for a retriable error; it now fails on entering, at once, with StorageError naming
        the cause, and leaves no pool open: once the database exists, it enters."""
        adapter = PostgresEventStorageAdapter(f"{SERVER}/{database_name}", timeout=30)
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            async with adapter:
                pass
        assert time.monotonic() - started < 10
        assert not isinstance(info.value, StorageUnavailableError)
        assert f'database "{database_name}" does not exist' in str(info.value)
        assert "retrying cannot help" in str(info.value)
        assert adapter.pool.closed
        await _create_database(database_name)
        async with adapter:
            await adapter.create_event_table()
            assert (await counter_store(adapter).get_events("a1")).events == []

    async def test_a_first_operation_without_entering_fails_at_once(
        self, database_name: str
    ) -> None:
        """Without ``async with``, the first operation fails at once too (it waited the
        pool's 30 seconds for a StorageUnavailableError); so does the next one."""
        adapter = PostgresEventStorageAdapter(f"{SERVER}/{database_name}", timeout=30)
        try:
            for _ in range(2):
                started = time.monotonic()
                with pytest.raises(StorageError, match="does not exist") as info:
                    await counter_store(adapter).get_events("a1")
                assert time.monotonic() - started < 10
                assert not isinstance(info.value, StorageUnavailableError)
        finally:
            await adapter.aclose()

    async def test_entering_waits_up_to_the_timeout_for_a_server_that_refuses(self) -> None:
        """A server that refuses connections may come up: entering tries again until the
        timeout, then raises the retriable error with the reason."""
        adapter = PostgresEventStorageAdapter(f"{SERVER.rsplit(':', 1)[0]}:1/test", timeout=0.6)
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError, match="refused"):
            async with adapter:
                pass
        assert time.monotonic() - started >= 0.5
        assert adapter.pool.closed

    async def test_a_database_dropped_later_is_not_retriable(
        self, database_name: str, pg_schema: str
    ) -> None:
        """When the pool cannot connect any more because the database is gone, the wait
        for a connection ends with StorageError saying why, not a retriable error."""
        await _create_database(database_name)
        async with PostgresEventStorageAdapter(f"{SERVER}/{database_name}", timeout=1) as adapter:
            await adapter.create_event_table()
            await counter_store(adapter).push_event(created("a1"))
            async with await psycopg.AsyncConnection.connect(
                f"{SERVER}/test", autocommit=True
            ) as conn:
                await conn.execute(
                    sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database_name))
                )
            # The drop ended the adapter's connection: the first read may meet it (lost).
            errors: list[StorageError] = []
            for _ in range(2):
                with pytest.raises(StorageError) as info:
                    await counter_store(adapter).get_events("a1")
                errors.append(info.value)
        assert "does not exist" in str(errors[-1])
        assert not isinstance(errors[-1], StorageUnavailableError)

    async def test_a_borrowed_pool_is_not_connected_to_on_entering(self) -> None:
        """Entering an adapter on a borrowed pool opens nothing and connects nowhere."""
        pool = AsyncConnectionPool(f"{SERVER}/castore_no_such_db", open=False)
        async with PostgresEventStorageAdapter(pool=pool):
            pass
        assert pool.closed


class TestLastingFailures:
    """Which connection failures no retry can fix (libpq gives them no SQLSTATE)."""

    @pytest.mark.parametrize(
        ("message", "lasting"),
        [
            ('FATAL:  database "x" does not exist', True),
            ('FATAL:  password authentication failed for user "app"', True),
            ('FATAL:  role "app" does not exist', True),
            ('FATAL:  role "app" is not permitted to log in', True),
            ('FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "app", database "x"', True),
            ('FATAL:  pg_hba.conf rejects connection for host "10.0.0.1"', True),
            ('FATAL:  permission denied for database "x"', True),
            ("FATAL:  sorry, too many clients already", False),
            ("FATAL:  the database system is starting up", False),
            ("Connection refused\n\tIs the server running on that host?", False),
            ("timeout expired", False),
        ],
    )
    def test_the_servers_words_tell_them(self, message: str, lasting: bool) -> None:
        """The server's message (in English) says whether the failure lasts."""
        error = psycopg.OperationalError(
            f'connection failed: connection to server at "127.0.0.1", port 5432 failed: {message}'
        )
        assert connect._lasting(error) is lasting
