"""Opening and closing the PostgreSQL adapter: failing early, and letting operations finish."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from castore_pydantic import EventStore
from castore_pydantic.errors import StorageError, StorageUnavailableError
from castore_pydantic.storage import _postgres_connect as connect
from castore_pydantic.storage.postgres import PostgresEventStorageAdapter
from castore_pydantic.testing.contracts._storage import created, incremented
from tests.services import POSTGRES_HOST, POSTGRES_PORT, require_postgres
from tests.storage.postgres_support import (
    DATABASE,
    DSN,
    SlowServer,
    counter_store,
    fetch,
    make_table,
    pg_schema,
    wait_for,
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


def _closed(server: SlowServer) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``wait_for``: no connection through ``server`` is open."""

    async def closed() -> bool:
        return server.open == 0

    return closed


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

    @pytest.mark.parametrize(
        ("query", "said"),
        [(":99999/test", 'invalid port number: "99999"'), ("/test?sslmode=bogus", "sslmode")],
    )
    async def test_entering_fails_at_once_on_values_libpq_refuses(
        self, query: str, said: str
    ) -> None:
        """A value libpq refuses before connecting can never connect: StorageError at once
        naming it. (Entering retried it until the timeout, as a server that may come up.)"""
        adapter = PostgresEventStorageAdapter(f"postgresql://postgres@127.0.0.1{query}", timeout=30)
        started = time.monotonic()
        with pytest.raises(StorageError, match=said) as info:
            async with adapter:
                pass
        assert time.monotonic() - started < 10
        assert not isinstance(info.value, StorageUnavailableError)
        assert adapter.pool.closed

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

    async def test_entering_gives_the_servers_reason_at_the_timeout(self) -> None:
        """The last try, cut short at the timeout, does not hide the server's earlier reason."""
        role = f"castore_test_{uuid.uuid4().hex[:12]}"
        await fetch(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
        try:
            adapter = PostgresEventStorageAdapter(
                f"postgresql://{role}@{POSTGRES_HOST}:{POSTGRES_PORT}/test", timeout=1
            )
            with pytest.raises(StorageUnavailableError, match="too many connections for role"):
                async with adapter:
                    pass
        finally:
            await fetch(f"DROP ROLE {role}")

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

    async def test_ssl_the_server_lacks_is_not_retriable(self) -> None:
        """``sslmode=require`` on a server without SSL fails at once with StorageError."""
        ((ssl,),) = await fetch("SHOW ssl")
        if ssl == "on":
            pytest.skip("the test server offers SSL")
        adapter = PostgresEventStorageAdapter(f"{DSN}?sslmode=require", timeout=10)
        started = time.monotonic()
        with pytest.raises(StorageError, match="SSL was required") as info:
            async with adapter:
                pass
        assert time.monotonic() - started < 5
        assert not isinstance(info.value, StorageUnavailableError)

    async def test_a_borrowed_pool_is_not_connected_to_on_entering(self) -> None:
        """Entering an adapter on a borrowed pool opens nothing and connects nowhere."""
        pool = AsyncConnectionPool(f"{SERVER}/castore_no_such_db", open=False)
        async with PostgresEventStorageAdapter(pool=pool):
            pass
        assert pool.closed


@pytest.mark.postgres
class TestFirstConnection:
    """The connection made on entering is the pool's first, not one more."""

    async def test_the_pool_starts_with_the_connection_entering_made(self, pg_schema: str) -> None:
        """Entering, then filling the pool, connects once. (Entering connected, hung up,
        and the pool connected again.)"""
        table = await make_table(pg_schema)
        async with SlowServer(0) as server:
            async with PostgresEventStorageAdapter(
                server.dsn, schema=pg_schema, table_name=table, min_size=1
            ) as adapter:
                await adapter.pool.wait(timeout=10)
                assert (await counter_store(adapter).get_events("a1")).events == []
                assert server.accepted == 1
            await wait_for(_closed(server), within=5, what="the connection to close")

    async def test_without_min_size_entering_keeps_no_connection(self, pg_schema: str) -> None:
        """With ``min_size=0``, the connection entering made is closed at once, and the first
        operation connects when it needs to. (It stayed open, outside the pool, until an
        operation took it or the adapter closed.)"""
        table = await make_table(pg_schema)
        async with (
            SlowServer(0) as server,
            PostgresEventStorageAdapter(
                server.dsn, schema=pg_schema, table_name=table, min_size=0
            ) as adapter,
        ):
            assert server.accepted == 1
            await wait_for(_closed(server), within=5, what="the connection to close")
            store = counter_store(adapter)
            for _ in range(3):
                assert (await store.get_events("a1")).events == []
            assert server.accepted == 2

    async def test_a_first_operation_uses_the_connection_it_checked(self, pg_schema: str) -> None:
        """Not entered, with ``min_size=0``: the first operation's check of the server is
        the connection it works on."""
        table = await make_table(pg_schema)
        async with SlowServer(0) as server:
            adapter = PostgresEventStorageAdapter(
                server.dsn, schema=pg_schema, table_name=table, min_size=0
            )
            try:
                store = counter_store(adapter)
                for _ in range(3):
                    assert (await store.get_events("a1")).events == []
                assert server.accepted == 1
            finally:
                await adapter.aclose()

    async def test_a_connection_no_operation_took_is_closed(self) -> None:
        """Opened once as the command line does (``min_size=0``), the connection is kept for
        the command's work; with nothing done, it is closed with the adapter."""
        async with SlowServer(0) as server:
            adapter = PostgresEventStorageAdapter(server.dsn, min_size=0)
            assert await adapter._open_once(10) is None
            await asyncio.sleep(0.2)
            assert (server.accepted, server.open) == (1, 1)
            await adapter.aclose()
            await wait_for(_closed(server), within=5, what="the connection to close")

    @pytest.mark.parametrize("how", ["async with", "open once"])
    async def test_a_cancellation_after_connecting_closes_the_connection(
        self, how: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Cancelled just after the first connection was made, before the pool opened (a
        timeout around ``async with adapter`` firing then): the connection is closed at
        once. (It stayed open, used by nothing, until ``aclose`` or garbage collection.)"""
        real = psycopg.AsyncConnection.connect.__func__  # type: ignore[attr-defined]
        opening: asyncio.Task[object] | None = None

        async def connect(cls: Any, *args: Any, **kw: Any) -> Any:
            conn = await real(cls, *args, **kw)
            if opening is not None and not opening.done():
                opening.cancel()
            return conn

        async with SlowServer(0) as server:
            adapter = PostgresEventStorageAdapter(server.dsn, min_size=1)
            try:
                monkeypatch.setattr(psycopg.AsyncConnection, "connect", classmethod(connect))
                if how == "async with":
                    opening = asyncio.ensure_future(adapter.__aenter__())
                else:  # the command line's
                    opening = asyncio.ensure_future(adapter._open_once(10))
                with pytest.raises(asyncio.CancelledError):
                    await opening
                monkeypatch.undo()
                assert server.accepted == 1
                await wait_for(_closed(server), within=5, what="the connection to close")
                assert not adapter._conns._opened
            finally:
                await adapter.aclose()


@pytest.mark.postgres
class TestConnectTimeout:
    """Each attempt keeps to the user's ``connect_timeout``; all of them to ``timeout``."""

    async def test_a_connect_timeout_given_anywhere_is_kept(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A URL's, key=value string's or PGCONNECT_TIMEOUT's connect_timeout ends each try."""
        monkeypatch.setenv("PGCONNECT_TIMEOUT", "2")
        async with SlowServer(2.4) as server:
            port = server.dsn.split(":")[2].split("/")[0]
            given = [
                f"{server.dsn}?connect_timeout=2",
                f"host=127.0.0.1 port={port} user=postgres dbname={DATABASE} connect_timeout=2",
                server.dsn,  # PGCONNECT_TIMEOUT
            ]

            async def enter(dsn: str) -> None:
                async with PostgresEventStorageAdapter(dsn, timeout=2.8):
                    pass

            async with asyncio.timeout(10):
                results = await asyncio.gather(*map(enter, given), return_exceptions=True)
            assert [type(result) for result in results] == [StorageUnavailableError] * 3
            assert server.accepted >= 6  # a second attempt each, after the first timed out

    async def test_entering_keeps_to_the_timeout(self) -> None:
        """A hung server: ``async with`` gives up at the timeout, saying so, and hangs up."""
        async with SlowServer(None) as server:
            adapter = PostgresEventStorageAdapter(
                server.dsn, timeout=1, connect_kwargs={"connect_timeout": 20}
            )
            started = time.monotonic()
            async with asyncio.timeout(10):
                with pytest.raises(StorageUnavailableError) as info:
                    async with adapter:
                        pass
            waited = time.monotonic() - started
            assert waited < 3
            said = re.search(r"within ([0-9.]+)s because connecting fails", str(info.value))
            assert said is not None
            assert 1 <= float(said[1]) <= waited + 0.05
            assert "connecting took longer than" in str(info.value)
            assert adapter.pool.closed
            await wait_for(_closed(server), within=5, what="the attempt's connection to close")

    async def test_a_first_operation_keeps_to_the_timeout(self) -> None:
        """A hung server: the first operation gives up at the timeout, not the connect_timeout."""
        async with SlowServer(None) as server:
            adapter = PostgresEventStorageAdapter(
                server.dsn, timeout=1, connect_kwargs={"connect_timeout": 2}
            )
            try:
                started = time.monotonic()
                with pytest.raises(StorageUnavailableError, match="connecting took longer"):
                    await counter_store(adapter).get_events("a1")
                assert time.monotonic() - started < 1.9
            finally:
                await adapter.aclose()

    async def test_a_wait_for_the_pool_says_why_within_the_timeout(self, pg_schema: str) -> None:
        """A wait for a pool that cannot connect ends at the timeout with the pool's reason."""
        table = await make_table(pg_schema)
        name = f"castore-{uuid.uuid4().hex[:12]}"
        async with SlowServer(0) as server:
            adapter = PostgresEventStorageAdapter(
                server.dsn,
                schema=pg_schema,
                table_name=table,
                max_size=1,
                timeout=3,
                connect_kwargs={"connect_timeout": 2, "application_name": name},
            )
            async with adapter:
                store = counter_store(adapter)
                await store.get_events("a1")
                server.delay = None  # new connections hang from now on
                query = "FROM pg_stat_activity WHERE application_name = %s"
                await fetch(f"SELECT pg_terminate_backend(pid) {query}", name)

                async def gone() -> bool:
                    return await fetch(f"SELECT count(*) {query}", name) == [(0,)]

                await wait_for(gone, what="the adapter's connection to end")
                await wait_for(_closed(server), what="the proxy to pass the end on")
                started = time.monotonic()
                with pytest.raises(StorageUnavailableError, match="timeout expired"):
                    await store.get_events("a1")
                assert time.monotonic() - started < 4.5

    @pytest.mark.parametrize("hung", [False, True], ids=["refused", "hung"])
    async def test_aclose_stops_entering(self, hung: bool) -> None:
        """``aclose()`` stops ``async with``'s tries at once; entering fails: it is closed."""
        async with SlowServer(None) as server:
            dsn = server.dsn if hung else f"{SERVER.rsplit(':', 1)[0]}:1/test"
            adapter = PostgresEventStorageAdapter(dsn, timeout=30)

            async def enter() -> None:
                async with adapter:
                    pass

            entering = asyncio.ensure_future(enter())
            if hung:
                await server.arrived.wait()
            else:
                await asyncio.sleep(0.2)  # a few refused tries
            async with asyncio.timeout(5):
                await adapter.aclose()
                with pytest.raises(StorageError, match="is closed") as info:
                    await entering
            assert not isinstance(info.value, StorageUnavailableError)
            assert adapter.pool.closed


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
            ('FATAL:  Peer authentication failed for user "app"', True),
            ("server does not support SSL, but SSL was required", True),
            ('FATAL:  LDAP authentication failed for user "app"', False),
            ('FATAL:  RADIUS authentication failed for user "app"', False),
            ('FATAL:  PAM authentication failed for user "app"', False),
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


@pytest.mark.postgres
class TestClosing:
    """``aclose()`` lets the operations in progress finish, then closes the pool."""

    async def test_operations_in_progress_finish(self, pg_schema: str) -> None:
        """48 operations in flight on two connections: aclose() waited for none of them,
        and 46 failed with 'the pool is closed'; now all succeed, then the pool closes."""
        table = await make_table(pg_schema)
        adapter = PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table, max_size=2)
        store = counter_store(adapter)
        await store.push_event(created("w"))
        tasks = [asyncio.ensure_future(store.push_event(incremented("w", v))) for v in range(2, 40)]
        tasks += [asyncio.ensure_future(store.get_events("w")) for _ in range(10)]
        await asyncio.sleep(0)
        await adapter.aclose()
        assert adapter.pool.closed
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        with pytest.raises(StorageError, match="is closed"):
            await store.get_events("w")
        ((count,),) = await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"')
        assert count == 39

    async def test_operations_after_aclose_began_are_refused(self, pg_schema: str) -> None:
        """While aclose() waits for an operation, a new one gets 'is closed' at once."""
        table = await make_table(pg_schema)
        adapter = PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table)
        store = counter_store(adapter)
        await store.push_event(created("a1"))
        async with await psycopg.AsyncConnection.connect(DSN) as side:
            await side.execute(f'LOCK TABLE "{pg_schema}"."{table}" IN ACCESS EXCLUSIVE MODE')
            blocked = asyncio.ensure_future(store.push_event(incremented("a1", 2)))
            await asyncio.sleep(0.2)  # the INSERT waits for the lock
            closing = asyncio.ensure_future(adapter.aclose())
            await asyncio.sleep(0.1)
            assert not closing.done()
            with pytest.raises(StorageError, match="is closed"):
                await store.get_events("a1")
            await side.rollback()  # releases the lock
        await blocked
        await closing
        assert adapter.pool.closed
        assert await fetch(f'SELECT version FROM "{pg_schema}"."{table}" ORDER BY 1') == [
            (1,),
            (2,),
        ]

    async def test_a_cancelled_aclose_still_closes_the_pool(self, pg_schema: str) -> None:
        """Cancelling aclose() while it waits leaves the adapter closed to new work, and
        the pool closes when the last operation in progress ends."""
        table = await make_table(pg_schema)
        adapter = PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table)
        store = counter_store(adapter)
        await store.push_event(created("a1"))
        async with await psycopg.AsyncConnection.connect(DSN) as side:
            await side.execute(f'LOCK TABLE "{pg_schema}"."{table}" IN ACCESS EXCLUSIVE MODE')
            blocked = asyncio.ensure_future(store.push_event(incremented("a1", 2)))
            await asyncio.sleep(0.2)
            closing = asyncio.ensure_future(adapter.aclose())
            await asyncio.sleep(0.1)
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            with pytest.raises(StorageError, match="is closed"):
                await store.get_events("a1")
            assert not adapter.pool.closed
            await side.rollback()
        await blocked

        async def pool_closed() -> bool:
            return adapter.pool.closed

        await wait_for(pool_closed, what="the pool to close")
        await adapter.aclose()  # idempotent

    async def test_aclose_cancelled_at_once_still_closes_the_pool(self, pg_schema: str) -> None:
        """aclose() cancelled at its start still closes the pool and every connection."""
        table = await make_table(pg_schema)
        name = f"castore-{uuid.uuid4().hex[:12]}"
        adapter = PostgresEventStorageAdapter(
            DSN,
            schema=pg_schema,
            table_name=table,
            max_size=4,
            connect_kwargs={"application_name": name},
        )
        store = counter_store(adapter)
        await asyncio.gather(*(store.get_events(f"a{i}") for i in range(3)))
        closing = asyncio.ensure_future(adapter.aclose())
        await asyncio.sleep(0)  # aclose() begins
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing

        async def pool_closed() -> bool:
            return adapter.pool.closed

        async def disconnected() -> bool:
            query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            return (await fetch(query, name)) == [(0,)]

        await wait_for(pool_closed, within=5, what="the pool to close")
        await wait_for(disconnected, within=5, what="the pool's connections to close")
        await adapter.aclose()  # idempotent

    async def test_a_cancelled_operation_lets_aclose_finish(self, pg_schema: str) -> None:
        """An operation in progress that is cancelled ends there: aclose() goes on."""
        table = await make_table(pg_schema)
        adapter = PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table)
        store = counter_store(adapter)
        await store.push_event(created("a1"))
        async with await psycopg.AsyncConnection.connect(DSN) as side:
            await side.execute(f'LOCK TABLE "{pg_schema}"."{table}" IN ACCESS EXCLUSIVE MODE')
            blocked = asyncio.ensure_future(store.push_event(incremented("a1", 2)))
            await asyncio.sleep(0.2)
            closing = asyncio.ensure_future(adapter.aclose())
            await asyncio.sleep(0.1)
            blocked.cancel()
            await asyncio.wait_for(closing, 10)  # the lock is still held
            assert blocked.cancelled()
            assert adapter.pool.closed
        assert await fetch(f'SELECT version FROM "{pg_schema}"."{table}"') == [(1,)]

    async def test_a_group_in_progress_finishes(self, pg_schema: str) -> None:
        """A group waiting for a connection when aclose() begins is written too."""
        table = await make_table(pg_schema)
        adapter = PostgresEventStorageAdapter(DSN, schema=pg_schema, table_name=table, max_size=1)
        store = counter_store(adapter)
        groups = [
            asyncio.ensure_future(
                EventStore.push_event_group(
                    store.group_event(created(f"g{i}")), store.group_event(incremented(f"g{i}", 2))
                )
            )
            for i in range(5)
        ]
        await asyncio.sleep(0)
        await adapter.aclose()
        await asyncio.gather(*groups)
        ((count,),) = await fetch(f'SELECT count(*) FROM "{pg_schema}"."{table}"')
        assert count == 10
