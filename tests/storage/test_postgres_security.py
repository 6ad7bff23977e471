"""The PostgreSQL adapter against hostile names and values, and its handling of passwords."""

from __future__ import annotations

import logging
import traceback
from collections.abc import AsyncIterator
from typing import Literal
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from castore_pydantic import Event, EventStore
from castore_pydantic.errors import (
    EventAlreadyExistsError,
    EventLimitExceededError,
    StorageError,
    StorageUnavailableError,
)
from castore_pydantic.storage.postgres import PostgresEventStorageAdapter
from castore_pydantic.testing.contracts._storage import created
from tests.services import POSTGRES_HOST, POSTGRES_PORT
from tests.storage.postgres_support import DSN, counter_store, fetch, pg_schema

__all__ = ["pg_schema"]  # the fixture is used by name

pytestmark = pytest.mark.postgres

HOSTILE = [
    'event"; DROP TABLE canary; --',
    "'; DROP TABLE canary; --",
    'a"b',
    "a'b",
    "back\\slash",
    "t%sx",
    "t%%x",
    "t%(name)s",
    "$1",
    "Ünïcode 表 😀",
    "dotted.name",
    "CamelCase",
    " padded ",
    "x" * 63,
]


class HostileTyped(Event):
    """An event type whose name is an injection attempt."""

    type: Literal["T'); DROP TABLE canary; --"] = "T'); DROP TABLE canary; --"


@pytest.fixture
async def canary(pg_schema: str) -> AsyncIterator[str]:
    """A table with one row that every injection attempt must leave alone."""
    qualified = sql.Identifier(pg_schema, "canary").as_string(None)
    await fetch(f"CREATE TABLE IF NOT EXISTS {qualified} (v text); DELETE FROM {qualified}")
    await fetch(f"INSERT INTO {qualified} VALUES ('alive')")
    yield qualified
    assert await fetch(f"SELECT v FROM {qualified}") == [("alive",)]


class TestHostileNames:
    """Table, schema, store, aggregate and type names are data, never SQL."""

    @pytest.mark.parametrize("table_name", HOSTILE)
    async def test_any_table_name_addresses_exactly_that_table(
        self, pg_schema: str, canary: str, table_name: str
    ) -> None:
        """Each name creates, writes, reads, lists and conflicts on a table of that exact name."""
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name=table_name
        ) as adapter:
            await adapter.create_event_table()
            store = counter_store(adapter)
            pushed = await store.push_event(created("a1"))
            await EventStore.push_event_group(store.group_event(created("a2")))
            with pytest.raises(EventAlreadyExistsError):
                await store.push_event(created("a1"))
            with pytest.raises(EventAlreadyExistsError):
                await EventStore.push_event_group(
                    store.group_event(created("a3")), store.group_event(created("a2"))
                )
            assert (await store.get_events("a1")).events == [pushed.event]
            listed = [e.aggregate_id for e in (await store.list_aggregate_ids()).aggregate_ids]
            assert sorted(listed) == ["a1", "a2"]
            tables = await fetch(
                "SELECT relname::text FROM pg_class c JOIN pg_namespace n"
                " ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'"
                " AND relname::text = %s",
                pg_schema,
                table_name,
            )
            assert tables == [(table_name,)]
            await adapter.drop_event_table()

    @pytest.mark.parametrize("schema_suffix", ['"; DROP TABLE canary; --', "%s", "s'q"])
    async def test_any_schema_name_is_quoted(
        self, pg_schema: str, canary: str, schema_suffix: str
    ) -> None:
        """A hostile schema name is created and used as one identifier."""
        schema = pg_schema + schema_suffix
        try:
            async with PostgresEventStorageAdapter(DSN, schema=schema) as adapter:
                await adapter.create_event_table()
                store = counter_store(adapter)
                await store.push_event(created("a1"))
                assert len((await store.get_events("a1")).events) == 1
        finally:
            await fetch(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
                .format(sql.Identifier(schema))
                .as_string(None)
            )

    @pytest.mark.parametrize("value", [*HOSTILE, "é" * 300, "'; DROP TABLE canary; --" * 20])
    async def test_store_and_aggregate_ids_are_bound_values(
        self, pg_schema: str, canary: str, value: str
    ) -> None:
        """Hostile store and aggregate ids round-trip and stay isolated from other stores."""
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name="values_event"
        ) as adapter:
            await adapter.create_event_table()
            store = counter_store(adapter, value)
            await store.push_event(created(value))
            await store.push_event(created("plain"))
            assert [e.aggregate_id for e in (await store.get_events(value)).events] == [value]
            listed = {e.aggregate_id for e in (await store.list_aggregate_ids()).aggregate_ids}
            assert listed == {value, "plain"}
            other = counter_store(adapter, value + "x")
            assert (await other.get_events(value)).events == []

    async def test_hostile_event_type_is_a_bound_value(self, pg_schema: str, canary: str) -> None:
        """An event type name full of SQL is stored and read back as text."""
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name="values_event"
        ) as adapter:
            await adapter.create_event_table()
            store: EventStore[object, HostileTyped] = EventStore(
                event_store_id="HOSTILE_TYPES",
                event_types=[HostileTyped],
                reducer=lambda aggregate, event: aggregate,
                event_storage_adapter=adapter,
            )
            await store.push_event(HostileTyped(aggregate_id="a1", version=1))
            (event,) = (await store.get_events("a1")).events
            assert event.type == "T'); DROP TABLE canary; --"

    async def test_nul_and_surrogates_are_refused_before_writing(
        self, pg_schema: str, canary: str
    ) -> None:
        """Values PostgreSQL text cannot hold are refused on write and absent on read."""
        async with PostgresEventStorageAdapter(
            DSN, schema=pg_schema, table_name="values_event"
        ) as adapter:
            await adapter.create_event_table()
            # A store id PostgreSQL cannot hold is refused when the store is declared.
            with pytest.raises(ValueError, match="NUL"):
                counter_store(adapter, "NUL\x00STORE")
            store = counter_store(adapter)
            with pytest.raises(EventLimitExceededError):
                await store.push_event(created("a\x00b"))
            assert (await store.get_events("a\x00b")).events == []
            assert (await store.get_events("\ud800")).events == []
            with pytest.raises(EventLimitExceededError):
                await store.push_event(
                    {
                        "aggregateId": "a1",
                        "version": 1,
                        "type": "NOTE_ADDED",
                        "payload": {"x": "\x00"},
                    }
                )
        rows = await fetch(
            f'SELECT count(*) FROM "{pg_schema}".values_event WHERE aggregate_name = %s',
            store.event_store_id,
        )
        assert rows == [(0,)]


CANARY = "CANARY-7f3a"


def _everything_said(error: BaseException, caplog: pytest.LogCaptureFixture) -> str:
    """The error's formatted traceback (causes and contexts included) and every log line."""
    formatted = "".join(traceback.format_exception(error))
    chain, seen = [], error
    while seen is not None:  # also what a traceback would hide with `from None`
        chain.append(repr(seen) + str(seen))
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    logs = "\n".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    return formatted + "\n".join(chain) + logs


async def _enter_then_push(adapter: PostgresEventStorageAdapter, *, enter: bool) -> None:
    """Push an event, after entering the adapter if ``enter``."""
    if enter:
        await adapter.__aenter__()
    await counter_store(adapter).push_event(created("a1"))


class TestPasswords:
    """A connection string's password never shows in reprs, errors, tracebacks or logs."""

    @pytest.fixture(autouse=True)
    def _debug_logs(self, caplog: pytest.LogCaptureFixture) -> None:
        caplog.set_level(logging.DEBUG)

    @pytest.mark.parametrize(
        ("dsn", "kind"),
        [
            # trust authentication ignores passwords, so an unknown role fails the login
            (
                f"postgresql://castore_nobody:{CANARY}@{POSTGRES_HOST}:{POSTGRES_PORT}/test",
                "role",
            ),
            (f"postgresql://postgres:{CANARY}@{POSTGRES_HOST}:1/test", "refused"),
            (
                f"host={POSTGRES_HOST} port={POSTGRES_PORT} user=postgres password={CANARY}"
                " dbname=castore_no_such_db",
                "database",
            ),
        ],
    )
    async def test_failed_connections_do_not_reveal_it(
        self, caplog: pytest.LogCaptureFixture, dsn: str, kind: str
    ) -> None:
        """Login, refused-connection and missing-database failures are clean and explained,
        on entering the adapter and on a first operation without it; a missing role or
        database is not retriable (StorageError, not StorageUnavailableError)."""
        for enter in (True, False):
            adapter = PostgresEventStorageAdapter(dsn, timeout=1.0)
            assert CANARY not in repr(adapter) + str(adapter)
            try:
                with pytest.raises(StorageError) as info:
                    await _enter_then_push(adapter, enter=enter)
            finally:
                await adapter.aclose()
            said = _everything_said(info.value, caplog)
            assert CANARY not in said
            assert isinstance(info.value, StorageUnavailableError) == (kind == "refused")
            assert {"role": "castore_nobody", "refused": "refused", "database": "castore_no_such"}[
                kind
            ] in str(info.value)

    def test_an_unencoded_at_in_the_password_is_refused_without_showing_it(self) -> None:
        """libpq ends the password at the first '@' and reads the rest as the host, which
        connection errors then showed: such a URL is refused up front, naming the fix."""
        dsn = f"postgresql://postgres:{CANARY}@{CANARY}@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
        with pytest.raises(ValueError, match="write it as %40") as info:
            PostgresEventStorageAdapter(dsn)
        assert CANARY not in "".join(traceback.format_exception(info.value))
        encoded = dsn.replace(f"{CANARY}@{CANARY}", f"{CANARY}%40{CANARY}")
        assert CANARY not in repr(PostgresEventStorageAdapter(encoded))
        # libpq would read a query's '@' into the host as well, when no path comes first.
        in_query = f"postgresql://{POSTGRES_HOST}?password={CANARY}@{CANARY}"
        with pytest.raises(ValueError, match="write it as %40"):
            PostgresEventStorageAdapter(in_query)
        for fine in (
            f"postgresql://postgres@{POSTGRES_HOST},{POSTGRES_HOST}/test",
            f"postgresql://postgres@{POSTGRES_HOST}/test?options=-ca%40b&application_name=x@y",
            f"host={POSTGRES_HOST} user=postgres password=a@b@c",
            f"postgresql://postgres:pa?ss@{POSTGRES_HOST}/test",  # libpq reads 'pa?ss'
        ):
            PostgresEventStorageAdapter(fine)  # never refused

    def test_an_unencoded_slash_in_the_password_is_refused_without_showing_it(self) -> None:
        """libpq looks for the credentials' '@' only up to the first '/': with a '/' in the
        password it read the text before it as the host and port and the rest as the
        database, and repr() and errors showed them. Such a URL is refused up front."""
        password = f"pK9/{CANARY}"
        dsn = f"postgresql://postgres:{password}@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
        with pytest.raises(ValueError, match="'/' as %2F") as info:
            PostgresEventStorageAdapter(dsn)
        assert CANARY not in "".join(traceback.format_exception(info.value))
        for refused in (
            f"postgresql://postgres:{password}@{POSTGRES_HOST}",  # no database
            f"postgresql://postgres:{password}@{POSTGRES_HOST}/test?application_name=x",
            f"postgresql://user/{CANARY}:pw@{POSTGRES_HOST}/test",  # in the user name
        ):
            with pytest.raises(ValueError, match="%2F"):
                PostgresEventStorageAdapter(refused)
        with pytest.raises(ValueError, match="%2F"):  # also a borrowed pool's
            PostgresEventStorageAdapter(pool=AsyncConnectionPool(dsn, open=False))
        encoded = PostgresEventStorageAdapter(dsn.replace(password, f"pK9%2F{CANARY}"))
        assert CANARY not in repr(encoded)
        assert f"host={POSTGRES_HOST} port={POSTGRES_PORT} dbname=test user=postgres" in repr(
            encoded
        )
        for fine in (
            f"postgresql://postgres@{POSTGRES_HOST}/test?application_name=a/b@c",
            f"postgresql://{POSTGRES_HOST}?application_name=a/b@c",
            f"postgresql://postgres:pw@{POSTGRES_HOST}/test",
        ):
            PostgresEventStorageAdapter(fine)  # never refused

    @pytest.mark.parametrize(
        "password",
        [f"a@{CANARY}/{CANARY}", f"{CANARY}@/{CANARY}", f"a/{CANARY}?application_name={CANARY}"],
    )
    def test_an_unencoded_at_and_slash_in_the_password_are_refused_without_showing_it(
        self, password: str
    ) -> None:
        """With an '@' before a '/' in the password, libpq ended the password at the '@' and
        read the rest as a host and a database name holding an '@', which repr() and errors
        showed; a '/' before a '?' made the rest a port, a database and a query."""
        for dsn in (
            f"postgresql://postgres:{password}@{POSTGRES_HOST}:{POSTGRES_PORT}/test",
            f"postgresql://postgres:{password}@{POSTGRES_HOST}",
            f"postgresql://postgres:{password}@{POSTGRES_HOST}/test?application_name=x",
        ):
            with pytest.raises(ValueError, match="%40") as info:
                PostgresEventStorageAdapter(dsn)
            assert CANARY not in "".join(traceback.format_exception(info.value))
            with pytest.raises(ValueError, match="%40"):  # also a borrowed pool's
                PostgresEventStorageAdapter(pool=AsyncConnectionPool(dsn, open=False))
        encoded = password.replace("@", "%40").replace("/", "%2F").replace("?", "%3F")
        adapter = PostgresEventStorageAdapter(
            f"postgresql://postgres:{encoded}@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
        )
        assert CANARY not in repr(adapter)

    def test_an_at_in_the_database_name_is_read_as_written_where_no_password_can_be(
        self,
    ) -> None:
        """libpq reads 'postgresql://host/team@prod' as database 'team@prod'. Such URIs
        (also a borrowed pool's) were refused, with a message blaming a '/' in a password
        the URI did not have. Only where a password could have been cut there (after a port
        with no user before it) is such a URI refused, and the message names the database."""
        for dsn in (
            f"postgresql://{POSTGRES_HOST}/team@prod",
            f"postgresql://{POSTGRES_HOST},{POSTGRES_HOST}/team@prod",
            "postgresql://[::1]/team@prod?application_name=x",
            f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/team@prod",
        ):
            assert "dbname=team@prod" in repr(PostgresEventStorageAdapter(dsn)), dsn
            PostgresEventStorageAdapter(pool=AsyncConnectionPool(dsn, open=False))
        # As libpq reads it, 'user:1234/abc@host' is host 'user', port '1234' and database
        # 'abc@host': the same shape, so the '@' must be written %40 there.
        ambiguous = f"postgresql://{POSTGRES_HOST}:{POSTGRES_PORT}/team@prod"
        with pytest.raises(ValueError, match="database name holding an '@'"):
            PostgresEventStorageAdapter(ambiguous)
        encoded = PostgresEventStorageAdapter(ambiguous.replace("@", "%40"))
        assert "dbname=team@prod" in repr(encoded)

    @settings(max_examples=300, deadline=None)
    @given(password=st.text(alphabet="aZ9@/?:,[]#=&.%", min_size=1, max_size=12))
    def test_every_accepted_password_is_read_as_written(self, password: str) -> None:
        """Whatever characters a password holds unencoded, the URI is either refused or
        libpq reads its user, password and host as written (nothing of the password can
        then show as a host, port or database name)."""
        for dsn in (
            f"postgresql://app:{password}@db.example:5432/test",
            f"postgresql://app:{password}@db.example/test?application_name=x",
            f"postgresql://app:{password}@db.example",
            f"postgresql://app:{password}@[::1]/test",
        ):
            try:
                PostgresEventStorageAdapter(dsn)
            except ValueError:
                continue  # refused (libpq's own complaints are checked above)
            read = conninfo_to_dict(dsn)
            assert (read.get("user"), read.get("password")) == ("app", unquote(password)), dsn
            assert read.get("host") in ("db.example", "::1"), dsn

    def test_a_malformed_string_with_a_password_elsewhere_does_not_show_it(self) -> None:
        """libpq quotes part of a string it cannot parse: a password in a URL's query or
        an unquoted key=value password (or a piece of it) was shown in the ValueError."""
        for dsn in (
            f"host={POSTGRES_HOST} user=postgres password=hunter2 {CANARY}",
            f"postgresql://postgres@[::1/test?password={CANARY}",
            f"postgresql://postgres@{POSTGRES_HOST}/test?password={CANARY}%zz",
            f"postgresql://postgres:{CANARY}@[::1/test",
        ):
            with pytest.raises(ValueError, match="invalid PostgreSQL connection string") as info:
                PostgresEventStorageAdapter(dsn)
            assert CANARY not in "".join(traceback.format_exception(info.value)), dsn
        with pytest.raises(ValueError, match='"host"'):  # no password: libpq says it all
            PostgresEventStorageAdapter("host")

    async def test_driver_errors_do_not_reveal_it(
        self, pg_schema: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A database error (here a missing table) through a canary DSN stays clean."""
        dsn = f"postgresql://postgres:{CANARY}@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
        async with PostgresEventStorageAdapter(
            dsn, schema=pg_schema, table_name="no_such_table"
        ) as adapter:
            with pytest.raises(StorageError) as info:
                await counter_store(adapter).get_events("a1")
            store = counter_store(adapter)
            assert CANARY not in repr(store) + repr(adapter)
        assert CANARY not in _everything_said(info.value, caplog)

    async def test_pool_exhaustion_does_not_reveal_it(
        self, pg_schema: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Waiting in vain for a busy pool's connection is a clean, retriable error."""
        dsn = f"postgresql://postgres:{CANARY}@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
        async with PostgresEventStorageAdapter(
            dsn, schema=pg_schema, max_size=1, timeout=0.2
        ) as adapter:
            await adapter.create_event_table()
            async with adapter.pool.connection():
                with pytest.raises(
                    StorageUnavailableError, match="no PostgreSQL connection"
                ) as info:
                    await counter_store(adapter).get_events("a1")
            assert (await counter_store(adapter).get_events("a1")).events == []
        assert CANARY not in _everything_said(info.value, caplog)

    @pytest.mark.parametrize(
        "dsn",
        [
            f"postgresql://u:{CANARY}%zz@localhost/db",
            f"postgresql://u:{CANARY}@localhost/db?sslmode=bogus=1&&",
            f"host=localhost password='{CANARY} port",
        ],
    )
    def test_unparseable_connection_strings_do_not_reveal_it(self, dsn: str) -> None:
        """A connection string libpq rejects raises ValueError without the password."""
        with pytest.raises(ValueError, match="invalid PostgreSQL connection string") as info:
            PostgresEventStorageAdapter(dsn)
        assert CANARY not in "".join(traceback.format_exception(info.value))
        assert info.value.__cause__ is None
        assert info.value.__suppress_context__

    async def test_password_given_as_a_keyword_is_hidden_too(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """connect_kwargs={"password": ...} is as secret as one in the string."""
        adapter = PostgresEventStorageAdapter(
            f"postgresql://castore_nobody@{POSTGRES_HOST}:{POSTGRES_PORT}/test",
            connect_kwargs={"password": CANARY},
            timeout=1.0,
        )
        try:
            with pytest.raises(StorageError, match='role "castore_nobody" does not exist') as info:
                await counter_store(adapter).get_events("a1")
        finally:
            await adapter.aclose()
        assert CANARY not in repr(adapter)
        assert CANARY not in _everything_said(info.value, caplog)
