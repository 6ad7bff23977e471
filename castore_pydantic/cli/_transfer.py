"""``castore export`` and ``castore import``: JSON Lines in Castore's event JSON, streamed."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import click
from pydantic import ValidationError
from rich.progress import Progress, TaskID

from castore_pydantic import EventStore
from castore_pydantic.cli._app import TIMESTAMP, cli, json_option, progress_option, store_options
from castore_pydantic.cli._loading import Target, iter_aggregate_ids, iter_events
from castore_pydantic.cli._running import (
    EXIT_CONFLICT,
    EXIT_INVALID_DATA,
    EXIT_USAGE,
    CliError,
    byte_progress_bar,
    emit_json,
    plural,
    progress_bar,
    run,
    validation_reason,
)
from castore_pydantic.errors import (
    EventAlreadyExistsError,
    EventLimitExceededError,
    UnknownEventTypeError,
)

DEFAULT_BATCH_SIZE = 500


@contextlib.contextmanager
def _output(path: str) -> Iterator[IO[bytes]]:
    """Stdout for ``-``; otherwise a temporary file renamed into place on success only."""
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    target = Path(path)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - renamed or removed below
        "wb",
        dir=target.parent or Path(),
        prefix=f".{target.name}.",
        suffix=".partial",
        delete=False,
    )
    try:
        with handle:
            yield handle
        os.replace(handle.name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


@cli.command("export")
@store_options
@click.option(
    "--output",
    "-o",
    default="-",
    show_default=True,
    help="File to write (replaced only when the export succeeds); - for stdout.",
)
@click.option(
    "--after",
    type=TIMESTAMP,
    default=None,
    help="Aggregates whose initial event is at or after this.",
)
@click.option(
    "--before",
    type=TIMESTAMP,
    default=None,
    help="Aggregates whose initial event is at or before this.",
)
@progress_option
@json_option
def export_command(
    *,
    store: str,
    url: str | None,
    table: str,
    timeout: float,
    output: str,
    after: datetime | None,
    before: datetime | None,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Write every event of the store as JSON Lines (Castore's event JSON), streaming.

    Aggregates come in listing order (initial event timestamp, then id), each aggregate's
    events in version order, so exporting the same events always gives the same bytes.
    """

    async def work() -> tuple[int, int]:
        target = Target(store, url, table, timeout)
        exported_events = exported_aggregates = 0
        async with target.opened() as working:
            with progress_bar(progress) as bar:
                total = None
                if not bar.disable:
                    total = 0
                    async for _ in iter_aggregate_ids(working, after=after, before=before):
                        total += 1
                task = bar.add_task(f"Exporting {working.event_store_id}", total=total)
                with _output(output) as sink:
                    async for aggregate_id, _ in iter_aggregate_ids(
                        working, after=after, before=before
                    ):
                        async for event in iter_events(working, aggregate_id):
                            sink.write(event.model_dump_json().encode())
                            sink.write(b"\n")
                            exported_events += 1
                        exported_aggregates += 1
                        bar.advance(task)
        return exported_events, exported_aggregates

    exported_events, exported_aggregates = run(work)
    summary = {"exportedEvents": exported_events, "exportedAggregates": exported_aggregates}
    to_stderr = output == "-"
    if as_json:
        click.echo(json.dumps(summary), err=to_stderr)
    else:
        where = "stdout" if to_stderr else output
        click.echo(
            f"Exported {plural(exported_events, 'event')} of "
            f"{plural(exported_aggregates, 'aggregate')} to {where}.",
            err=to_stderr,
        )


def _line_reason(exc: Exception, tags: tuple[str, ...]) -> str:
    if isinstance(exc, ValidationError):
        return validation_reason(exc, tags)
    return str(exc)


@contextlib.contextmanager
def _input(path: str) -> Iterator[tuple[IO[bytes], int | None, bool]]:
    """The input as a binary file, its size if known, and whether it is a spool of stdin."""
    if path == "-":
        spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the with below
        with spool:
            yield spool, None, True
        return
    try:
        handle = Path(path).open("rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise CliError(EXIT_USAGE, f"cannot read {path!r}: {exc.strerror}") from exc
    with handle:
        yield handle, os.fstat(handle.fileno()).st_size, False


@cli.command("import")
@store_options
@click.argument("source", default="-")
@click.option("--force", is_flag=True, help="Overwrite events whose version already exists.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Events written per transaction.",
)
@click.option(
    "--create-table",
    is_flag=True,
    help="PostgreSQL: create the events table first if it does not exist.",
)
@progress_option
@json_option
def import_command(
    *,
    store: str,
    url: str | None,
    table: str,
    timeout: float,
    source: str,
    force: bool,
    batch_size: int,
    create_table: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Import JSON Lines of events (Castore's event JSON) from SOURCE (a file, or - for stdin).

    Every line is validated against the store's event types first: at the first bad line
    the import stops with its number and the reason, and nothing is written. Events are then
    written in batches, each one transaction (an event group). An event whose version exists
    stops the import (exit code 6) and nothing of its batch is written, unless --force.
    Importing never runs the store's on_event_pushed hook nor publishes messages.
    """

    async def work() -> int:
        target = Target(store, url, table, timeout, must_exist=False)
        context = target.store.context
        with _input(source) as (handle, size, from_stdin), byte_progress_bar(progress) as bar:
            checking = bar.add_task("Validating", total=size)
            reader = sys.stdin.buffer if from_stdin else handle
            lines: dict[tuple[str, int], int] = {}  # line of each event key (without --force)
            for number, raw in enumerate(reader, start=1):
                if from_stdin:
                    handle.write(raw)
                bar.advance(checking, len(raw))
                if not raw.strip():
                    continue
                try:
                    event = context.validate_input(raw, timestamp=False)
                except (ValidationError, UnknownEventTypeError, EventLimitExceededError) as exc:
                    raise CliError(
                        EXIT_INVALID_DATA,
                        f"line {number}: {_line_reason(exc, context.known_types)} "
                        "(nothing was imported)",
                    ) from exc
                if not force:
                    earlier = lines.setdefault((event.aggregate_id, event.version), number)
                    if earlier != number:
                        raise CliError(
                            EXIT_INVALID_DATA,
                            f"line {number}: aggregate {event.aggregate_id!r} version "
                            f"{event.version} is already on line {earlier} (nothing was "
                            "imported; with --force the later line wins)",
                        )
            handle.seek(0)
            writing = bar.add_task(f"Importing into {context.event_store_id}", total=size)
            async with target.opened() as working:
                if create_table:
                    create = getattr(target.adapter, "create_event_table", None)
                    if create is not None:
                        await create()
                return await _write_batches(
                    working, handle, bar, writing, batch_size=batch_size, force=force
                )

    imported = run(work)
    if as_json:
        emit_json({"importedEvents": imported})
    else:
        click.echo(f"Imported {plural(imported, 'event')}.")


async def _write_batches(
    store: EventStore[Any, Any],
    handle: IO[bytes],
    bar: Progress,
    task: TaskID,
    *,
    batch_size: int,
    force: bool,
) -> int:
    """Push validated lines as event groups of ``batch_size``; return how many were written."""
    written = 0
    batch: list[Any] = []
    keys: dict[tuple[str, int], int] = {}
    first_line = 1

    async def flush(last_line: int) -> None:
        nonlocal written, first_line
        if not batch:
            return
        try:
            await EventStore.push_event_group(*batch, force=force)
        except EventAlreadyExistsError as exc:
            line = keys.get((exc.aggregate_id, exc.version))
            at = f"line {line}: " if line is not None else ""
            raise CliError(
                EXIT_CONFLICT,
                f"{at}version {exc.version} of aggregate {exc.aggregate_id!r} already exists in "
                f"{exc.event_store_id}; {written} events were imported before this batch and "
                f"lines {first_line}-{last_line} were not (use --force to overwrite)",
            ) from exc
        written += len(batch)
        batch.clear()
        keys.clear()
        first_line = last_line + 1

    number = 0
    for number, raw in enumerate(handle, start=1):
        bar.advance(task, len(raw))
        if not raw.strip():
            continue
        grouped = store.group_event(raw)
        batch.append(grouped)
        keys[(grouped.event.aggregate_id, grouped.event.version)] = number
        if len(batch) >= batch_size:
            await flush(number)
    await flush(number)
    return written
