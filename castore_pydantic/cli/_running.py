"""How the ``castore`` commands run: exit codes, one-line errors, output and progress bars."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, NoReturn, TypeVar

import click
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from castore_pydantic.errors import (
    EventAlreadyExistsError,
    InvalidPageTokenError,
    MessageChannelEventStoreNotFoundError,
    MessagingError,
    StorageError,
    StoredEventValidationError,
    UndefinedMessageChannelAdapterError,
)

#: Success.
EXIT_OK = 0
#: An unexpected error (a bug, or a failure the tool does not classify); see ``--traceback``.
EXIT_ERROR = 1
#: Bad usage: unknown option or store, malformed URL or page token, missing extra or file.
EXIT_USAGE = 2
#: The aggregate does not exist (``castore aggregate``).
EXIT_NOT_FOUND = 3
#: The database is unreachable, locked, missing its table, or failed.
EXIT_STORAGE = 4
#: Data does not validate: a bad import line (nothing was written) or a bad stored event.
EXIT_INVALID_DATA = 5
#: ``import`` met an event whose version exists; the failing batch was not written.
EXIT_CONFLICT = 6
#: The message broker failed or could not be reached while pouring.
EXIT_MESSAGING = 7
#: Interrupted with Ctrl-C.
EXIT_INTERRUPTED = 130
#: The reader of stdout went away (``castore export | head``), as shell tools report it.
EXIT_BROKEN_PIPE = 141

_T = TypeVar("_T")

#: Width of human output when stdout is not a terminal (a file, a pipe): wide enough that
#: tables are not squeezed into an arbitrary 80 columns.
PIPED_WIDTH = 200


class _Console(Console):
    """rich's console, but a closed pipe is left to ``run``, which exits 141 for it."""

    def on_broken_pipe(self) -> None:
        """Stop printing and raise (rich's own exits with status 1)."""
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "the reader of the output went away")


def out() -> Console:
    """A console for human output on the current stdout (tables and pretty JSON)."""
    console = _Console(highlight=False)
    if not console.is_terminal:
        console = _Console(highlight=False, width=PIPED_WIDTH)
    return console


#: Progress bars and hints, on stderr so that stdout stays clean for data.
err = Console(stderr=True, highlight=False)


class CliError(Exception):
    """A failure the tool reports as one line and an exit code.

    Attributes:
        exit_code: One of the ``EXIT_*`` codes.
        message: What went wrong and, when possible, how to fix it.
    """

    def __init__(self, exit_code: int, message: str) -> None:
        self.exit_code = exit_code
        self.message = " ".join(message.split())
        super().__init__(self.message)


def validation_reason(error: ValidationError, tags: tuple[str, ...] = ()) -> str:
    """The first error of a ``ValidationError`` in one line: ``payload.level: <message>``.

    A discriminated union puts the event's type first in the location; ``tags`` (the
    store's event types) lets it be dropped, since the type is not a field.
    """
    first = error.errors(include_url=False)[0]
    loc = list(first["loc"])
    if loc and loc[0] in tags:
        loc = loc[1:]
    where = ".".join(str(part) for part in loc)
    more = error.error_count() - 1
    extra = f" (and {more} more)" if more else ""
    return f"{where}: {first['msg']}{extra}" if where else f"{first['msg']}{extra}"


#: Known failures and their exit codes, most specific first.
_EXIT_CODES: tuple[tuple[type[Exception], int], ...] = (
    (StoredEventValidationError, EXIT_INVALID_DATA),
    (StorageError, EXIT_STORAGE),
    (InvalidPageTokenError, EXIT_USAGE),
    (EventAlreadyExistsError, EXIT_CONFLICT),
    (MessagingError, EXIT_MESSAGING),
    (MessageChannelEventStoreNotFoundError, EXIT_USAGE),
    (UndefinedMessageChannelAdapterError, EXIT_USAGE),
    (ValidationError, EXIT_INVALID_DATA),
)


#: SQLSTATE of PostgreSQL's "undefined_table" error.
_UNDEFINED_TABLE = "42P01"


def _missing_table(exc: BaseException) -> str | None:
    """PostgreSQL's words for a missing events table, if that is what ``exc`` comes from."""
    seen: BaseException | None = exc.__cause__
    visited: set[int] = set()
    while seen is not None and id(seen) not in visited:
        if getattr(seen, "sqlstate", None) == _UNDEFINED_TABLE:
            diag = getattr(seen, "diag", None)
            return str(getattr(diag, "message_primary", None) or "the table does not exist")
        visited.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return None


def classify(exc: BaseException) -> CliError | None:
    """Map a known failure to its exit code; ``None`` for unexpected ones."""
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, StorageError):
        missing = _missing_table(exc)
        if missing is not None:
            # The adapter's own advice is for Python code; CLI users have an option.
            return CliError(
                EXIT_STORAGE,
                f"PostgreSQL: {missing}: check --table and --schema, or create the events "
                "table with castore import --create-table",
            )
    for kind, code in _EXIT_CODES:
        if isinstance(exc, kind):
            message = validation_reason(exc) if isinstance(exc, ValidationError) else str(exc)
            cause = exc.__cause__
            if isinstance(exc, StoredEventValidationError) and isinstance(cause, ValidationError):
                message = f"{message}: {validation_reason(cause)}"
            return CliError(code, message)
    return None


def run(work: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run async work; report failures as one line and exit with their code."""
    show_traceback = bool(click.get_current_context().find_root().meta.get("traceback"))
    try:
        return asyncio.run(work())
    except KeyboardInterrupt:
        click.echo("castore: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _reader_went_away()
    except Exception as exc:
        known = classify(exc)
        if show_traceback:
            traceback.print_exc()
        if known is not None:
            click.echo(f"castore: error: {known.message}", err=True)
            sys.exit(known.exit_code)
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        hint = "" if show_traceback else " (run with --traceback for details)"
        click.echo(f"castore: unexpected error: {message}{hint}", err=True)
        sys.exit(EXIT_ERROR)


@contextlib.contextmanager
def interruptible(interrupted: str) -> Iterator[None]:
    """Ctrl-C stops the block at once, even in a blocking read (exit 130, ``interrupted``).

    ``asyncio.run`` handles SIGINT by cancelling its task, which takes effect at the next
    await; synchronous work that waits for input (stdin, a pipe) never reaches one. A
    SIGINT that is ignored (a background job) stays ignored.
    """
    previous = signal.getsignal(signal.SIGINT)
    swap = (
        threading.current_thread() is threading.main_thread()
        and previous is not None
        and previous is not signal.SIG_IGN
    )
    if swap:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        raise CliError(EXIT_INTERRUPTED, interrupted) from None
    finally:
        if swap:
            signal.signal(signal.SIGINT, previous)


def _reader_went_away() -> NoReturn:
    """Stop quietly with exit code 141, as shell tools do when their reader went away."""
    with contextlib.suppress(OSError):
        # Nothing more reaches the reader, not even the flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(EXIT_BROKEN_PIPE)


def finish(show: Callable[[], None]) -> None:
    """Print what a command prints once ``run`` is done (its summary).

    A reader that went away meanwhile is exit 141 here too, as during the work. With no
    stdout at all (closed before the command started: ``>&-``), there is nothing to show.
    """
    if sys.stdout is None:
        return
    try:
        show()
        sys.stdout.flush()
    except BrokenPipeError:
        _reader_went_away()


def emit_json(value: object) -> None:
    """Print one JSON document on stdout (no colours, no wrapping)."""
    click.echo(json.dumps(value, ensure_ascii=False, indent=2))


def jsonable(value: object) -> Any:
    """The JSON form of an event, aggregate or anything Pydantic can serialise."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return to_jsonable_python(value)


def plural(count: int, noun: str) -> str:
    """``1 event``, ``2 events``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def compact(value: object) -> str:
    """A short one-line JSON rendering for table cells."""
    return "" if value is None else json.dumps(jsonable(value), ensure_ascii=False)


def progress_bar(enabled: bool | None) -> Progress:
    """A progress display on stderr; shown only on a terminal unless forced either way."""
    show = err.is_terminal if enabled is None else enabled
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not show,
        transient=False,
    )


def byte_progress_bar(enabled: bool | None) -> Progress:
    """Like ``progress_bar``, counting bytes."""
    show = err.is_terminal if enabled is None else enabled
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not show,
        transient=False,
    )
