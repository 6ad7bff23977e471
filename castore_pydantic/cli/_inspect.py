"""``castore stores``, ``aggregates``, ``events``, ``aggregate`` and ``schema``: reading."""

from __future__ import annotations

import shlex
from datetime import datetime
from typing import Any, get_type_hints

import click
from pydantic import BaseModel, TypeAdapter
from rich.json import JSON
from rich.table import Table
from rich.text import Text

from castore_pydantic import Command, Event, EventStore
from castore_pydantic._event import format_timestamp
from castore_pydantic._event_types import event_type_names
from castore_pydantic.cli._app import TIMESTAMP, cli, json_option, store_options
from castore_pydantic.cli._loading import Target, load_commands, load_stores
from castore_pydantic.cli._running import (
    EXIT_NOT_FOUND,
    CliError,
    compact,
    emit_json,
    jsonable,
    out,
    run,
)


def _payload_summary(event_type: type[Event]) -> str:
    annotation = event_type.model_fields["payload"].annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        fields = [
            f"{name}: {getattr(info.annotation, '__name__', str(info.annotation))}"
            for name, info in annotation.model_fields.items()
        ]
        return ", ".join(fields)
    return (
        "" if annotation in (None, type(None)) else getattr(annotation, "__name__", str(annotation))
    )


def _type_names(event_type: type[Event]) -> list[str]:
    return list(event_type_names(event_type))


@cli.command()
@click.option(
    "--store",
    "-s",
    "specs",
    multiple=True,
    required=True,
    envvar="CASTORE_STORE",
    help="Import string of a store, or of a module to list all its stores (repeatable).",
)
@json_option
def stores(specs: tuple[str, ...], as_json: bool) -> None:
    """List event stores and their event types, with each type's JSON Schema (--json)."""

    async def work() -> None:
        found: list[tuple[str, EventStore[Any, Any]]] = []
        for spec in specs:
            found.extend(load_stores(spec))
        if as_json:
            emit_json(
                {
                    "eventStores": [
                        {
                            "eventStoreId": store.event_store_id,
                            "importString": name,
                            "eventTypes": [
                                {
                                    "types": _type_names(event_type),
                                    "class": f"{event_type.__module__}.{event_type.__qualname__}",
                                    "jsonSchema": event_type.model_json_schema(by_alias=True),
                                }
                                for event_type in store.event_types
                            ],
                        }
                        for name, store in found
                    ]
                }
            )
            return
        for name, store in found:
            table = Table(title=Text(f"{store.event_store_id}  ({name})"), title_justify="left")
            table.add_column("Type")
            table.add_column("Class")
            table.add_column("Payload")
            for event_type in store.event_types:
                table.add_row(
                    Text(", ".join(_type_names(event_type))),
                    Text(f"{event_type.__module__}.{event_type.__qualname__}"),
                    Text(_payload_summary(event_type)),
                )
            out().print(table)

    run(work)


# -- aggregates --------------------------------------------------------------------------------

#: Aggregates per page when neither --limit nor a page token says.
_DEFAULT_LIMIT = 50


@cli.command()
@store_options
@click.option(
    "--limit",
    "-n",
    type=click.IntRange(min=0),
    default=None,
    help="Aggregates per page  [default: 50, or the page token's]",
)
@click.option("--page-token", default=None, help="Continue a previous listing.")
@click.option(
    "--after", type=TIMESTAMP, default=None, help="Initial event at or after this ISO timestamp."
)
@click.option(
    "--before", type=TIMESTAMP, default=None, help="Initial event at or before this ISO timestamp."
)
@click.option("--reverse", is_flag=True, help="Newest first.")
@click.option("--all", "all_pages", is_flag=True, help="Follow every page.")
@json_option
def aggregates(
    *,
    store: str,
    url: str | None,
    table: str,
    schema: str | None,
    timeout: float,
    limit: int | None,
    page_token: str | None,
    after: datetime | None,
    before: datetime | None,
    reverse: bool,
    all_pages: bool,
    as_json: bool,
) -> None:
    """List aggregate ids with their initial event timestamps, a page at a time."""

    async def work() -> None:
        target = Target(store, url, table, timeout, schema=schema)
        entries: list[tuple[str, datetime]] = []
        token = page_token
        # A token carries its own page size; without one, the default applies.
        size = _DEFAULT_LIMIT if limit is None and page_token is None else limit
        async with target.opened() as working:
            while True:
                page = await working.list_aggregate_ids(
                    limit=size,
                    page_token=token,
                    initial_event_after=after,
                    initial_event_before=before,
                    reverse=reverse or None,
                )
                entries.extend(
                    (e.aggregate_id, e.initial_event_timestamp) for e in page.aggregate_ids
                )
                token = page.next_page_token
                if not all_pages or token is None:
                    break
        if as_json:
            emit_json(
                {
                    "aggregateIds": [
                        {"aggregateId": aid, "initialEventTimestamp": format_timestamp(ts)}
                        for aid, ts in entries
                    ],
                    "nextPageToken": token,
                }
            )
            return
        # Cells are Text, not str: stored text ("[/]", "[bold]") is shown, never read as markup.
        listing = Table(
            title=Text(f"{target.store.event_store_id} aggregates"), title_justify="left"
        )
        listing.add_column("Aggregate id")
        listing.add_column("Initial event timestamp")
        for aid, ts in entries:
            listing.add_row(Text(aid), format_timestamp(ts))
        out().print(listing)
        if token is not None:
            # Unwrapped and shell-quoted: the line is meant to be pasted back.
            click.echo(f"More aggregates: --page-token {shlex.quote(token)}", err=True)

    run(work)


# -- events ------------------------------------------------------------------------------------


@cli.command()
@store_options
@click.argument("aggregate_id")
@click.option("--min-version", type=click.IntRange(min=0), default=None, help="Inclusive.")
@click.option("--max-version", type=click.IntRange(min=0), default=None, help="Inclusive.")
@click.option("--limit", "-n", type=click.IntRange(min=0), default=None, help="At most N events.")
@click.option("--reverse", is_flag=True, help="Newest first.")
@json_option
def events(
    *,
    store: str,
    url: str | None,
    table: str,
    schema: str | None,
    timeout: float,
    aggregate_id: str,
    min_version: int | None,
    max_version: int | None,
    limit: int | None,
    reverse: bool,
    as_json: bool,
) -> None:
    """Show the events of AGGREGATE_ID (none, with exit code 0, if it does not exist)."""

    async def work() -> None:
        target = Target(store, url, table, timeout, schema=schema)
        async with target.opened() as working:
            found = (
                await working.get_events(
                    aggregate_id,
                    min_version=min_version,
                    max_version=max_version,
                    limit=limit,
                    reverse=reverse,
                )
            ).events
        if as_json:
            emit_json({"events": [event.model_dump(mode="json") for event in found]})
            return
        listing = Table(
            title=Text(f"{target.store.event_store_id} {aggregate_id}: {len(found)} events"),
            title_justify="left",
        )
        listing.add_column("Version", justify="right", no_wrap=True)
        listing.add_column("Timestamp", no_wrap=True)
        listing.add_column("Type", no_wrap=True)
        listing.add_column("Payload")
        listing.add_column("Metadata")
        for event in found:
            listing.add_row(
                str(event.version),
                format_timestamp(event.timestamp) if event.timestamp else "",
                Text(event.type),
                Text(compact(event.payload)),
                Text(compact(event.metadata)),
            )
        out().print(listing)

    run(work)


# -- aggregate ---------------------------------------------------------------------------------


@cli.command()
@store_options
@click.argument("aggregate_id")
@click.option(
    "--version",
    "-v",
    "max_version",
    type=click.IntRange(min=1),
    default=None,
    help="Fold events up to this version (inclusive).",
)
@json_option
def aggregate(
    *,
    store: str,
    url: str | None,
    table: str,
    schema: str | None,
    timeout: float,
    aggregate_id: str,
    max_version: int | None,
    as_json: bool,
) -> None:
    """Show AGGREGATE_ID folded from its events (exit code 3 if it does not exist)."""

    async def work() -> None:
        target = Target(store, url, table, timeout, schema=schema)
        async with target.opened() as working:
            result = await working.get_aggregate(aggregate_id, max_version=max_version)
        if result.aggregate is None or result.last_event is None:
            raise CliError(
                EXIT_NOT_FOUND,
                f"aggregate {aggregate_id!r} not found in event store {working.event_store_id}",
            )
        body = {
            "aggregate": jsonable(result.aggregate),
            "lastEvent": result.last_event.model_dump(mode="json"),
        }
        if as_json:
            emit_json(body)
            return
        last = result.last_event
        out().print(JSON.from_data(body["aggregate"]))
        stamp = format_timestamp(last.timestamp) if last.timestamp else "?"
        out().print(f"version {last.version}, last event {last.type} at {stamp}", markup=False)

    run(work)


# -- schema ------------------------------------------------------------------------------------


def _schema_of(annotation: object) -> Any:
    if annotation is None:
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.model_json_schema(by_alias=True)
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)  # type: ignore[arg-type]
    return adapter.json_schema(by_alias=True)


def _aggregate_type(store: EventStore[Any, Any]) -> object:
    try:
        return get_type_hints(store.reducer).get("return")
    except (NameError, TypeError):
        return None


@cli.command()
@click.option(
    "--store",
    "-s",
    "store_specs",
    multiple=True,
    envvar="CASTORE_STORE",
    help="Event store or module import string (repeatable).",
)
@click.option(
    "--command",
    "-c",
    "command_specs",
    multiple=True,
    help="Command or module import string, e.g. examples.pokemon.commands (repeatable).",
)
def schema(store_specs: tuple[str, ...], command_specs: tuple[str, ...]) -> None:
    """Print the JSON Schema of events, aggregates and command inputs and outputs."""
    if not store_specs and not command_specs:
        raise click.UsageError("give at least one --store or --command")

    async def work() -> None:
        found: list[tuple[str, EventStore[Any, Any]]] = []
        for spec in store_specs:
            found.extend(load_stores(spec))
        commands: list[Command[Any, Any]] = []
        for spec in command_specs:
            commands.extend(load_commands(spec))
        document: dict[str, Any] = {}
        if store_specs:
            document["eventStores"] = [
                {
                    "eventStoreId": store.event_store_id,
                    "events": {
                        name: event_type.model_json_schema(by_alias=True)
                        for event_type in store.event_types
                        for name in _type_names(event_type)
                    },
                    "aggregate": _schema_of(_aggregate_type(store)),
                }
                for _, store in found
            ]
        if command_specs:
            document["commands"] = [
                {
                    "commandId": command.command_id,
                    "input": _schema_of(command.input_schema),
                    "output": _schema_of(command.output_schema),
                }
                for command in commands
            ]
        emit_json(document)

    run(work)
