"""Finding what a ``castore`` command works on: stores by import string, adapters by URL."""

from __future__ import annotations

import contextlib
import importlib
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from castore_pydantic import Command, Event, EventStore
from castore_pydantic.cli._running import EXIT_STORAGE, EXIT_USAGE, CliError
from castore_pydantic.storage import EventStorageAdapter

#: Aggregates asked for per listing page, and events per read, while streaming a store.
PAGE_SIZE = 500
EVENT_CHUNK = 1000


def load_object(spec: str) -> object:
    """Import ``package.module`` or ``package.module:attribute.path`` and return it.

    Raises:
        CliError: The module or attribute does not exist, or importing it failed.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or (":" in spec and not attribute):
        raise CliError(EXIT_USAGE, f"{spec!r} is not an import string like 'package.module:name'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(f"{missing}."):
            raise CliError(
                EXIT_USAGE,
                f"cannot import {module_name!r}: no such module (run castore from the "
                "directory that contains it, or set PYTHONPATH)",
            ) from exc
        raise CliError(EXIT_USAGE, f"importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise CliError(
            EXIT_USAGE, f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attribute.split(".") if attribute else ():
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise CliError(EXIT_USAGE, f"{spec!r}: {module_name!r} has no {attribute!r}") from exc
    return obj


def _as_store(obj: object) -> EventStore[Any, Any] | None:
    if isinstance(obj, EventStore):
        return obj
    inner = getattr(obj, "event_store", None)  # a ConnectedEventStore
    return inner if isinstance(inner, EventStore) else None


def load_stores(spec: str) -> list[tuple[str, EventStore[Any, Any]]]:
    """The event stores an import string names: one attribute, or every store of a module.

    Raises:
        CliError: Nothing importable, or no event store there.
    """
    obj = load_object(spec)
    store = _as_store(obj)
    if store is not None:
        return [(spec, store)]
    if isinstance(obj, ModuleType):
        found: dict[int, tuple[str, EventStore[Any, Any]]] = {}
        for name, value in vars(obj).items():
            candidate = _as_store(value)
            if candidate is not None and not name.startswith("_"):
                found.setdefault(id(candidate), (f"{spec}:{name}", candidate))
        if found:
            return list(found.values())
        raise CliError(EXIT_USAGE, f"module {spec!r} defines no EventStore")
    raise CliError(EXIT_USAGE, f"{spec!r} is a {type(obj).__name__}, not an EventStore")


def load_store(spec: str) -> EventStore[Any, Any]:
    """The one event store an import string names.

    Raises:
        CliError: None or several stores there.
    """
    stores = load_stores(spec)
    if len(stores) > 1:
        names = ", ".join(name for name, _ in stores)
        raise CliError(EXIT_USAGE, f"{spec!r} holds several event stores; name one: {names}")
    return stores[0][1]


def adapter_from_url(
    url: str, *, table: str, timeout: float, must_exist: bool, schema: str | None = None
) -> EventStorageAdapter:
    """Build a storage adapter from a database URL.

    ``sqlite:///relative.db``, ``sqlite:////absolute.db``, ``postgresql://user@host/db``.
    ``schema`` is the PostgreSQL schema of the table (``None``: the ``search_path``'s).

    Raises:
        CliError: An unsupported or malformed URL, a missing file, a missing extra, or a
            schema for SQLite.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise CliError(
            EXIT_USAGE, f"{url!r} is not a database URL (sqlite:///PATH or postgresql://...)"
        )
    if scheme == "sqlite":
        from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter

        if schema is not None:
            raise CliError(EXIT_USAGE, "--schema is for PostgreSQL: a SQLite file has no schemas")

        path = rest[1:] if rest.startswith("/") else rest
        if not path:
            raise CliError(EXIT_USAGE, f"{url!r} names no file (sqlite:///path/to/file.db)")
        if must_exist and path != ":memory:" and not Path(path).is_file():
            raise CliError(EXIT_STORAGE, f"SQLite database {path!r} does not exist")
        try:
            return SQLiteEventStorageAdapter(path, table_name=table)
        except ValueError as exc:
            raise CliError(EXIT_USAGE, str(exc)) from exc
    if scheme in ("postgresql", "postgres"):
        try:
            from castore_pydantic.storage.postgres import PostgresEventStorageAdapter
        except ImportError as exc:
            raise CliError(EXIT_USAGE, str(exc)) from exc
        # The URL's (or PGCONNECT_TIMEOUT's) connect_timeout is the user's: keywords would
        # override it. No connection is made ahead of need (min_size=0): the pool's first
        # one is the connection ``entered`` made, and a command that reads one thing at a
        # time uses no other.
        given = connect_timeout_given(url)
        try:
            return PostgresEventStorageAdapter(
                url,
                table_name=table,
                schema=schema,
                timeout=timeout,
                min_size=0,
                max_size=2,
                connect_kwargs=None if given else {"connect_timeout": max(1, round(timeout))},
            )
        except ValueError as exc:
            raise CliError(EXIT_USAGE, str(exc)) from exc
    raise CliError(
        EXIT_USAGE,
        f"unsupported database URL scheme {scheme!r} (use sqlite:///PATH or postgresql://...)",
    )


def working_store(
    store: EventStore[Any, Any], adapter: EventStorageAdapter
) -> EventStore[Any, Any]:
    """A twin of ``store`` on ``adapter`` without hooks: the CLI never publishes by accident."""
    return EventStore(
        event_store_id=store.event_store_id,
        event_types=store.event_types,
        reducer=store.reducer,
        event_storage_adapter=adapter,
        simulate_side_effect=store.simulate_side_effect,
        limits=store.context.limits,
    )


def require_table(adapter: EventStorageAdapter) -> None:
    """For reading commands: refuse a SQLite database without the events table.

    The SQLite adapter creates its table when it is opened, which a command that only reads
    must not do (a mistyped ``--table`` would silently show an empty store). The database
    is inspected read-only instead. PostgreSQL adapters create nothing: reading a missing
    table fails by itself.

    Raises:
        CliError: The file does not exist, cannot be read, or lacks the table (exit code 4).
    """
    from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter

    if not isinstance(adapter, SQLiteEventStorageAdapter) or adapter.path in ("", ":memory:"):
        return
    path = Path(adapter.path)
    if not path.is_file():
        raise CliError(EXIT_STORAGE, f"SQLite database {adapter.path!r} does not exist")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ? COLLATE NOCASE",
                (adapter.table_name,),
            ).fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise CliError(
            EXIT_STORAGE, f"cannot read SQLite database {adapter.path!r}: {exc}"
        ) from exc
    if found is None:
        raise CliError(
            EXIT_STORAGE,
            f"SQLite database {adapter.path!r} has no table {adapter.table_name!r}: check "
            "--table (castore import creates the table)",
        )


def connect_timeout_given(url: str) -> bool:
    """Whether ``url`` (or ``PGCONNECT_TIMEOUT``) bounds each connection attempt itself.

    A ``connect_timeout`` of 0 (or less) waits forever in libpq, so it bounds nothing; an
    unreadable URL is left for the connection attempt to refuse.
    """
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        value = conninfo_to_dict(url).get("connect_timeout")
    except Error:
        return False
    if value is None:
        value = os.environ.get("PGCONNECT_TIMEOUT")
    try:
        return value is not None and int(str(value).strip()) > 0
    except ValueError:
        return False  # libpq refuses it when connecting


@contextlib.asynccontextmanager
async def entered(
    adapter: EventStorageAdapter, url: str | None, seconds: float
) -> AsyncIterator[None]:
    """``async with adapter``; for a PostgreSQL ``--url``, after one connection attempt.

    The adapter's own pool would retry a failing connection until its timeout; a command
    says at once that the URL is malformed (exit code 2) or the server cannot be reached or
    refuses it (exit code 4). That attempt is the adapter's, and opens its pool: ``async
    with`` connects no more. It keeps to the URL's ``connect_timeout`` when the URL (or
    ``PGCONNECT_TIMEOUT``) gives one, else to ``seconds`` (``--timeout``).

    Raises:
        CliError: The connection fails (the message never shows a password).
    """
    from castore_pydantic.storage.postgres import PostgresEventStorageAdapter

    if url is not None and type(adapter) is PostgresEventStorageAdapter:
        try:
            failure = await adapter._open_once(None if connect_timeout_given(url) else seconds)
        except BaseException:
            await adapter.aclose()
            raise
        if failure is not None:
            await adapter.aclose()
            if failure.malformed:
                raise CliError(EXIT_USAGE, f"--url is not a valid PostgreSQL URL: {failure.reason}")
            raise CliError(EXIT_STORAGE, f"cannot connect to PostgreSQL: {failure.reason}")
    async with adapter:
        yield


class Target:
    """What a command works on: the store from ``--store`` and the adapter from ``--url``."""

    def __init__(
        self,
        store: str,
        url: str | None,
        table: str,
        timeout: float,
        *,
        schema: str | None = None,
        must_exist: bool = True,
    ) -> None:
        self.defined = load_store(store)
        self.must_exist = must_exist
        self.url = url
        self.timeout = timeout
        if url is not None:
            self.adapter = adapter_from_url(
                url, table=table, schema=schema, timeout=timeout, must_exist=must_exist
            )
        elif self.defined.event_storage_adapter is not None:
            self.adapter = self.defined.event_storage_adapter
        else:
            raise CliError(
                EXIT_USAGE,
                f"event store {self.defined.event_store_id} has no storage adapter: pass --url",
            )
        self.store = working_store(self.defined, self.adapter)

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[EventStore[Any, Any]]:
        """The working store, with its adapter open for the duration.

        Raises:
            CliError: A command that reads found no events table (see ``require_table``).
        """
        if self.must_exist:
            require_table(self.adapter)
        async with entered(self.adapter, self.url, self.timeout):
            yield self.store


def load_commands(spec: str) -> list[Command[Any, Any]]:
    """The commands an import string names: one attribute, or every command of a module.

    Raises:
        CliError: Nothing importable, or no command there.
    """
    obj = load_object(spec)
    if isinstance(obj, Command):
        return [obj]
    if isinstance(obj, ModuleType):
        found = [value for value in vars(obj).values() if isinstance(value, Command)]
        if found:
            return list({id(c): c for c in found}.values())
        raise CliError(EXIT_USAGE, f"module {spec!r} defines no Command")
    raise CliError(EXIT_USAGE, f"{spec!r} is a {type(obj).__name__}, not a Command")


async def iter_aggregate_ids(
    store: EventStore[Any, Any],
    *,
    after: datetime | None = None,
    before: datetime | None = None,
    reverse: bool = False,
) -> AsyncIterator[tuple[str, datetime]]:
    """Every listed aggregate of a store, a page at a time (bounded memory)."""
    token: str | None = None
    while True:
        page = await store.list_aggregate_ids(
            limit=PAGE_SIZE,
            page_token=token,
            initial_event_after=after,
            initial_event_before=before,
            reverse=reverse,
        )
        for entry in page.aggregate_ids:
            yield entry.aggregate_id, entry.initial_event_timestamp
        token = page.next_page_token
        if token is None:
            return


async def iter_events(store: EventStore[Any, Any], aggregate_id: str) -> AsyncIterator[Event]:
    """Every event of an aggregate, in version order, a chunk at a time."""
    min_version: int | None = None
    while True:
        events = (
            await store.get_events(aggregate_id, min_version=min_version, limit=EVENT_CHUNK)
        ).events
        for event in events:
            yield event
        if len(events) < EVENT_CHUNK:
            return
        min_version = events[-1].version + 1
