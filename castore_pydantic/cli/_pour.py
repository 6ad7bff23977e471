"""``castore pour``: replay stored history into a message channel (``castore_pydantic.dam``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import click
from pydantic.alias_generators import to_camel

from castore_pydantic import Event, EventStore
from castore_pydantic._event import format_timestamp
from castore_pydantic._types import AggregateIdEntry
from castore_pydantic.cli._app import TIMESTAMP, cli, json_option, progress_option, store_options
from castore_pydantic.cli._loading import (
    adapter_from_url,
    entered,
    load_object,
    load_store,
    require_table,
    working_store,
)
from castore_pydantic.cli._running import (
    EXIT_INTERRUPTED,
    EXIT_MESSAGING,
    EXIT_USAGE,
    CliError,
    emit_json,
    err,
    finish,
    plural,
    run,
)
from castore_pydantic.storage import EventStorageAdapter


def result_json(value: object) -> Any:
    """A dam result in Castore's shape: camelCase keys, events and entries as JSON.

    As in Castore's JSON, where an undefined value has no key, absent values (no event
    poured, no aggregate scanned) leave their key out.
    """
    if isinstance(value, Event):
        return value.model_dump(mode="json")
    if isinstance(value, AggregateIdEntry):
        return {
            "aggregateId": value.aggregate_id,
            "initialEventTimestamp": format_timestamp(value.initial_event_timestamp),
        }
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            to_camel(f.name): result_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, Mapping):
        return {str(key): result_json(item) for key, item in value.items()}
    return value


def load_channel(spec: str, *, aggregate_exists: bool) -> Any:
    """The message channel (queue or bus) an import string names, checked for the pour.

    Raises:
        CliError: It cannot be imported, cannot publish, or carries other messages.
    """
    channel = load_object(spec)
    if not callable(getattr(channel, "publish_message", None)):
        raise CliError(
            EXIT_USAGE, f"{spec!r} is a {type(channel).__name__}, not a message queue or bus"
        )
    carries = getattr(channel, "message_type", None)
    wanted = "aggregateExists" if aggregate_exists else "notification"
    if carries is not None and carries != wanted:
        hint = (
            "pour events into a notification channel, or pass --aggregate-ids for an "
            "aggregate-exists channel"
        )
        raise CliError(
            EXIT_USAGE, f"{spec!r} carries {carries} messages, not {wanted} messages: {hint}"
        )
    return channel


@cli.command()
@functools.partial(store_options, multiple=True)
@click.option(
    "--channel",
    "-c",
    "channel_spec",
    required=True,
    help="Message queue or bus import string, e.g. app.channels:pokemons_bus.",
)
@click.option("--aggregate-id", default=None, help="Pour only this aggregate's events.")
@click.option(
    "--aggregate-ids",
    "aggregate_exists",
    is_flag=True,
    help="Pour one aggregate-exists message per aggregate instead of events.",
)
@click.option(
    "--from",
    "from_",
    type=TIMESTAMP,
    default=None,
    help="Only events at or after this ISO timestamp (with --aggregate-ids: "
    "aggregates whose initial event is).",
)
@click.option("--to", type=TIMESTAMP, default=None, help="Only events at or before this.")
@click.option(
    "--rate-limit",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="At most this many messages per second.",
)
@progress_option
@json_option
def pour(
    *,
    stores: tuple[str, ...],
    url: str | None,
    table: str,
    schema: str | None,
    timeout: float,
    channel_spec: str,
    aggregate_id: str | None,
    aggregate_exists: bool,
    from_: datetime | None,
    to: datetime | None,
    rate_limit: float | None,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Replay stored events into a message channel, as replayed messages, oldest first.

    Every event of the stores (several --store: one chronological stream) is published as a
    notification message with replay=True, one at a time. --aggregate-id pours one aggregate;
    --aggregate-ids pours aggregate-exists messages instead.
    """
    if (aggregate_id is not None or aggregate_exists) and len(stores) != 1:
        raise click.UsageError("--aggregate-id and --aggregate-ids take exactly one --store")
    if aggregate_id is not None and aggregate_exists:
        raise click.UsageError("--aggregate-id and --aggregate-ids exclude each other")
    if len(set(stores)) != len(stores):
        raise click.UsageError("each --store may be given once")
    if from_ is not None and to is not None and from_ > to:
        raise click.UsageError("--from is after --to: nothing could be poured")
    if rate_limit is not None and not math.isfinite(rate_limit):
        raise click.UsageError("--rate-limit must be a finite number of messages per second")

    async def work() -> Any:
        channel = load_channel(channel_spec, aggregate_exists=aggregate_exists)
        working, adapters = await _stores_on_adapters(stores, url, table, schema, timeout)
        channel_adapter = getattr(channel, "message_channel_adapter", None)
        if getattr(channel_adapter, "worker", True) is None:
            join = getattr(channel_adapter, "join", None)
            if callable(join):  # an in-process queue: it would drop every message
                raise CliError(
                    EXIT_USAGE,
                    f"{channel_spec} has no worker: the poured messages would be dropped",
                )
        failed_before = await _failures(channel_adapter)
        with _progress(progress) as on_progress:
            async with contextlib.AsyncExitStack() as stack:
                for adapter in adapters:
                    require_table(adapter)
                    await stack.enter_async_context(entered(adapter, url, timeout))
                closing = getattr(channel_adapter, "aclose", None)
                if callable(closing):
                    stack.push_async_callback(closing)
                poured = [0]

                def counted(progress: Any) -> Any:
                    poured[0] = progress.poured_count
                    return on_progress(progress)

                try:
                    result = await _pour(
                        working,
                        channel,
                        aggregate_id=aggregate_id,
                        aggregate_exists=aggregate_exists,
                        start=from_,
                        end=to,
                        rate_limit=rate_limit,
                        on_progress=counted,
                    )
                    # In-process channels handle messages in the background: let them finish.
                    join = getattr(channel_adapter, "join", None)
                    if callable(join):
                        joined = join()
                        if inspect.isawaitable(joined):
                            await joined
                except (asyncio.CancelledError, KeyboardInterrupt) as exc:
                    # Ctrl-C reaches the pour as the cancellation of its task.
                    raise CliError(
                        EXIT_INTERRUPTED,
                        f"interrupted after {plural(poured[0], 'published message')} (a pour "
                        "may be run again: consumers see replayed messages)",
                    ) from exc
                if callable(join):
                    failed = await _failures(channel_adapter) - failed_before
                    if failed:
                        raise CliError(
                            EXIT_MESSAGING,
                            f"{plural(failed, 'poured message')} failed in {channel_spec} and "
                            "went to its dead letters (their errors are logged above)",
                        )
        return result

    body = result_json(run(work))
    if as_json:
        finish(lambda: emit_json(body))
        return
    count = body.get("pouredEventCount", body.get("pouredAggregateIdCount", 0))
    what = plural(count, "aggregate-exists message" if aggregate_exists else "event")
    finish(lambda: click.echo(f"Poured {what} into {channel_spec}."))


async def _failures(channel_adapter: Any) -> int:
    """How many messages an in-process channel adapter gave up on (0 for other adapters).

    The library's in-memory adapters count them; their dead-letter list keeps only the
    newest ones, so its length stops growing once full.
    """
    if not callable(getattr(channel_adapter, "join", None)):
        return 0
    counted = getattr(channel_adapter, "_dead_lettered", None)
    if isinstance(counted, int):
        return counted
    dead_letters = getattr(channel_adapter, "dead_letters", None)
    return len(await dead_letters()) if callable(dead_letters) else 0


async def _stores_on_adapters(
    specs: tuple[str, ...], url: str | None, table: str, schema: str | None, seconds: float
) -> tuple[list[EventStore[Any, Any]], list[EventStorageAdapter]]:
    """The working twins of the named stores, and the distinct adapters to open.

    With ``--url``, every store shares its adapter (``seconds``: its connection timeout);
    ``entered`` connects to its PostgreSQL server once when it is opened, so that a
    refused URL or an unknown database fails at once.

    Raises:
        CliError: A store is given twice or has no adapter.
    """
    shared = (
        None
        if url is None
        else adapter_from_url(url, table=table, schema=schema, timeout=seconds, must_exist=True)
    )
    adapters: list[EventStorageAdapter] = []
    working: list[EventStore[Any, Any]] = []
    for store in (load_store(spec) for spec in specs):
        if any(known.event_store_id == store.event_store_id for known in working):
            # The same store under two import strings (or a store and its connected twin).
            raise CliError(
                EXIT_USAGE,
                f"each event store may be poured once: {store.event_store_id} is given twice",
            )
        adapter = shared or store.event_storage_adapter
        if adapter is None:
            raise CliError(
                EXIT_USAGE, f"event store {store.event_store_id} has no storage adapter: pass --url"
            )
        if all(adapter is not known for known in adapters):
            adapters.append(adapter)
        working.append(working_store(store, adapter))
    return working, adapters


async def _pour(
    working: list[EventStore[Any, Any]],
    channel: Any,
    *,
    aggregate_id: str | None,
    aggregate_exists: bool,
    start: datetime | None,
    end: datetime | None,
    rate_limit: float | None,
    on_progress: Any,
) -> Any:
    """Call the ``dam`` function that matches the options."""
    from castore_pydantic import dam

    common: dict[str, Any] = {
        "message_channel": channel,
        "rate_limit": rate_limit,
        "on_progress": on_progress,
    }
    if aggregate_exists:
        listing: dam.ListAggregateIdsOptions = {}
        if start is not None:
            listing["initial_event_after"] = start
        if end is not None:
            listing["initial_event_before"] = end
        return await dam.pour_event_store_aggregate_ids(
            event_store=working[0], options=listing, **common
        )
    filters: dam.PourFilters = {}
    if start is not None:
        filters["from"] = start
    if end is not None:
        filters["to"] = end
    if aggregate_id is not None:
        return await dam.pour_aggregate_events(
            event_store=working[0], aggregate_id=aggregate_id, filters=filters, **common
        )
    if len(working) == 1:
        return await dam.pour_event_store_events(event_store=working[0], filters=filters, **common)
    return await dam.pour_event_store_collection_events(
        event_stores=working, filters=filters, **common
    )


@contextlib.contextmanager
def _progress(enabled: bool | None) -> Any:
    """An ``on_progress`` callback that drives a live counter on stderr (or does nothing)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    show = err.is_terminal if enabled is None else enabled
    bar = Progress(
        SpinnerColumn(),
        TextColumn("Pouring: {task.completed} messages, {task.fields[scanned]} aggregates scanned"),
        console=err,
        disable=not show,
        transient=False,
    )
    with bar:
        task = bar.add_task("pour", total=None, scanned=0)

        def on_progress(progress: Any) -> None:
            bar.update(
                task, completed=progress.poured_count, scanned=progress.scanned_aggregate_count
            )

        yield on_progress
