"""``castore export`` and ``castore import``: JSON Lines in Castore's event JSON, streamed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import IO, Any

import click
from pydantic import ValidationError
from rich.progress import Progress, TaskID

from castore_pydantic import EventStore, GroupedEvent
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic.cli._app import TIMESTAMP, cli, json_option, progress_option, store_options
from castore_pydantic.cli._files import Source, input_source, output_file, writes_to_stdout
from castore_pydantic.cli._loading import Target, iter_aggregate_ids, iter_events
from castore_pydantic.cli._running import (
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_INVALID_DATA,
    CliError,
    byte_progress_bar,
    classify,
    emit_json,
    finish,
    interruptible,
    plural,
    progress_bar,
    run,
    validation_reason,
)
from castore_pydantic.dam import _find_unlisted
from castore_pydantic.errors import (
    EventAlreadyExistsError,
    EventLimitExceededError,
    UnknownEventTypeError,
)

DEFAULT_BATCH_SIZE = 500


@cli.command("export")
@store_options
@click.option(
    "--output",
    "-o",
    default="-",
    show_default=True,
    help="File to write (a regular file is replaced only when the export succeeds); - for stdout.",
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
    schema: str | None,
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
    Aggregates whose history does not start at version 1 have no initial event: they come
    last, by id, and only when neither --after nor --before is given.
    """

    async def work() -> tuple[int, int]:
        exported_events = exported_aggregates = 0
        # The output first: a descriptor that -o names (/dev/fd/3) must be the one the shell
        # opened, not one the store's module or adapter opens under the same number.
        with output_file(output) as sink:
            target = Target(store, url, table, timeout, schema=schema)
            async with target.opened() as working:
                unlisted: list[str] = []
                if after is None and before is None:
                    unlisted = await _unlisted_aggregate_ids(working)
                with progress_bar(progress) as bar:
                    total = None
                    if not bar.disable:
                        total = len(unlisted)
                        async for _ in iter_aggregate_ids(working, after=after, before=before):
                            total += 1
                    task = bar.add_task(f"Exporting {working.event_store_id}", total=total)
                    listed = iter_aggregate_ids(working, after=after, before=before)
                    async for aggregate_id in _then(listed, unlisted):
                        async for event in iter_events(working, aggregate_id):
                            sink.write(event.model_dump_json().encode())
                            sink.write(b"\n")
                            exported_events += 1
                        exported_aggregates += 1
                        bar.advance(task)
        return exported_events, exported_aggregates

    exported_events, exported_aggregates = run(work)

    def summary() -> None:
        to_stderr = writes_to_stdout(output)  # the events went to stdout: keep it for them
        if as_json:
            counts = {"exportedEvents": exported_events, "exportedAggregates": exported_aggregates}
            click.echo(json.dumps(counts), err=to_stderr)
            return
        where = "stdout" if output == "-" else output
        click.echo(
            f"Exported {plural(exported_events, 'event')} of "
            f"{plural(exported_aggregates, 'aggregate')} to {where}.",
            err=to_stderr,
        )

    finish(summary)


async def _unlisted_aggregate_ids(store: EventStore[Any, Any]) -> list[str]:
    """Aggregates that listing leaves out (no version-1 event), for adapters that can tell.

    The library's adapters can; for another adapter a warning says what may be missing.
    """
    found = await _find_unlisted(store)
    if found is None:
        adapter = type(store.get_event_storage_adapter()).__name__
        click.echo(
            f"castore: warning: {adapter} cannot tell which aggregates have no version-1 "
            "event; such aggregates are not exported",
            err=True,
        )
        return []
    return found


async def _then(
    listed: AsyncIterator[tuple[str, datetime]], unlisted: list[str]
) -> AsyncIterator[str]:
    """The ids of ``listed``, then those of ``unlisted``, each once.

    An aggregate found without a version-1 event may get one while the export runs: listing
    then finds it too, and it is written with the unlisted ones only.
    """
    later = set(unlisted)
    async for aggregate_id, _ in listed:
        if aggregate_id not in later:
            yield aggregate_id
    for aggregate_id in unlisted:
        yield aggregate_id


def _line_reason(exc: Exception, tags: tuple[str, ...]) -> str:
    if isinstance(exc, ValidationError):
        return validation_reason(exc, tags)
    return str(exc)


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
    schema: str | None,
    timeout: float,
    source: str,
    force: bool,
    batch_size: int,
    create_table: bool,
    progress: bool | None,
    as_json: bool,
) -> None:
    """Import JSON Lines of events (Castore's event JSON) from SOURCE (a file or pipe, - for stdin).

    Every line is validated against the store's event types first: at the first bad line
    the import stops with its number and the reason, and nothing is written. Events are then
    written in batches, each one transaction (an event group). An event whose version exists
    stops the import (exit code 6) and nothing of its batch is written, unless --force. Any
    failure while writing says how many events were imported (and stay stored) before it.
    Importing never runs the store's on_event_pushed hook nor publishes messages.
    """

    async def work() -> int:
        target = Target(store, url, table, timeout, schema=schema, must_exist=False)
        with input_source(source) as reading, byte_progress_bar(progress) as bar:
            checking = bar.add_task("Validating", total=reading.size)
            _validate(reading, target.store.context, force=force, bar=bar, task=checking)
            await asyncio.sleep(0)  # a Ctrl-C just after validating stops here: nothing written
            writing = bar.add_task(
                f"Importing into {target.store.event_store_id}", total=reading.size
            )
            async with target.opened() as working:
                if create_table:
                    create = getattr(target.adapter, "create_event_table", None)
                    if create is not None:
                        await create()
                batches = _Batches(working, batch_size=batch_size, force=force)
                await batches.write(reading.second_pass(), bar, writing)
                return batches.written

    imported = run(work)
    if as_json:
        finish(lambda: emit_json({"importedEvents": imported}))
    else:
        finish(lambda: click.echo(f"Imported {plural(imported, 'event')}."))


def _validate(
    reading: Source, context: EventStoreContext, *, force: bool, bar: Progress, task: TaskID
) -> None:
    """The first pass of ``import``: every line is validated, nothing is written.

    It reads and validates without awaiting, so Ctrl-C raises at once, even while a read
    of stdin or a pipe waits for input: asyncio's own handler would only cancel the task,
    at an await that a blocked read never reaches.

    Raises:
        CliError: A line does not validate or repeats an event key without ``force``
            (exit code 5), or Ctrl-C (exit code 130).
    """
    seen: dict[tuple[str, int], int] = {}  # line of each event key (without --force)
    with interruptible("interrupted while validating the input: nothing was imported"):
        for number, raw in enumerate(reading.first_pass(), start=1):
            bar.advance(task, len(raw))
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
                earlier = seen.setdefault((event.aggregate_id, event.version), number)
                if earlier != number:
                    raise CliError(
                        EXIT_INVALID_DATA,
                        f"line {number}: aggregate {event.aggregate_id!r} version "
                        f"{event.version} is already on line {earlier} (nothing was "
                        "imported; with --force the later line wins)",
                    )


class _Batches:
    """Writes validated lines as event groups, and reports how far it got when it stops."""

    def __init__(self, store: EventStore[Any, Any], *, batch_size: int, force: bool) -> None:
        self.store = store
        self.batch_size = batch_size
        self.force = force
        #: Events written so far (committed: each batch is one transaction).
        self.written = 0
        self._batch: list[GroupedEvent] = []
        self._keys: dict[tuple[str, int], int] = {}
        #: The lines of the batch being built or written.
        self._first_line = self._last_line = 0

    async def write(self, handle: IO[bytes], bar: Progress, task: TaskID) -> None:
        """Push every line of ``handle``, ``batch_size`` events per transaction.

        Raises:
            CliError: Any failure, with what was imported before it.
        """
        try:
            for number, raw in enumerate(handle, start=1):
                bar.advance(task, len(raw))
                if not raw.strip():
                    continue
                if not self._batch:
                    self._first_line = number
                self._last_line = number
                grouped = self.store.group_event(raw)
                self._batch.append(grouped)
                self._keys[(grouped.event.aggregate_id, grouped.event.version)] = number
                if len(self._batch) >= self.batch_size:
                    await self._flush()
            await self._flush()
        except EventAlreadyExistsError as exc:
            line = self._keys.get((exc.aggregate_id, exc.version))
            at = f"line {line}: " if line is not None else ""
            raise CliError(
                EXIT_CONFLICT,
                f"{at}version {exc.version} of aggregate {exc.aggregate_id!r} already exists "
                f"in {exc.event_store_id}; {self._so_far()} (use --force to overwrite)",
            ) from exc
        except (Exception, asyncio.CancelledError, KeyboardInterrupt) as exc:
            # A Ctrl-C reaches the import as the cancellation of its task.
            raise self._stopped(exc) from exc

    async def _flush(self) -> None:
        if not self._batch:
            return
        await EventStore.push_event_group(*self._batch, force=self.force)
        self.written += len(self._batch)
        self._batch.clear()
        self._keys.clear()

    def _so_far(self) -> str:
        """What was imported and what was not, once the batch of the current lines failed."""
        first, last = self._first_line, self._last_line
        lines = f"line {first}" if first == last else f"lines {first}-{last}"
        if self.written == 0:
            return "nothing was imported"
        events = (
            "1 event was imported" if self.written == 1 else f"{self.written} events were imported"
        )
        return (
            f"{events} before line {first} and stay stored; {lines} and any after them "
            "were not imported"
        )

    def _stopped(self, exc: BaseException) -> CliError:
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter

            caveat = ""
            if not isinstance(self.store.event_storage_adapter, SQLiteEventStorageAdapter):
                # A SQLite write never spans an await: a cancelled batch was not written.
                caveat = (
                    " (unless the interruption came as the batch was committing: check "
                    "before importing again)"
                )
            return CliError(EXIT_INTERRUPTED, f"interrupted: {self._so_far()}{caveat}")
        if isinstance(exc, EventLimitExceededError):
            # The database refused a value the event store accepted (a version beyond
            # 64 bits, an id that is not a UUID for a uuid column): invalid data too.
            return CliError(EXIT_INVALID_DATA, f"{exc}; {self._so_far()}")
        known = classify(exc)
        if known is not None:
            return CliError(known.exit_code, f"{known.message}; {self._so_far()}")
        return CliError(
            EXIT_ERROR,
            f"unexpected error: {type(exc).__name__}: {exc}; {self._so_far()} "
            "(run with --traceback for details)",
        )
