"""The ``castore`` command group and the options its commands share."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from castore_pydantic._paging import parse_timestamp

if TYPE_CHECKING:
    _ParamType = click.ParamType[datetime]
else:  # click < 8.2 has no generic ParamType at run time
    _ParamType = click.ParamType


class TimestampType(_ParamType):
    """A timezone-aware ISO 8601 timestamp (``2024-01-01T00:00:00.000Z``)."""

    name = "timestamp"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> datetime:
        """Parse the option's text, or fail as a usage error."""
        if isinstance(value, datetime):
            return value
        try:
            return parse_timestamp(str(value), "timestamp")
        except (TypeError, ValueError) as exc:
            self.fail(f"{value!r} is not a timezone-aware ISO 8601 timestamp ({exc})", param, ctx)


#: Click type of ``--after`` / ``--before`` / ``--from`` / ``--to``.
TIMESTAMP = TimestampType()

_STORE_HELP = "Event store import string, e.g. examples.pokemon.stores:pokemons ($CASTORE_STORE)."
_URL_HELP = (
    "Database URL: sqlite:///PATH or postgresql://USER@HOST/DB ($CASTORE_URL). "
    "Default: the adapter the store is defined with."
)


def store_options(function: Callable[..., Any], *, multiple: bool = False) -> Callable[..., Any]:
    """Add the options naming the store and its database.

    ``--store`` (repeatable if ``multiple``), ``--url``, ``--table``, ``--schema`` and
    ``--timeout``.
    """
    decorators = [
        click.option(
            "--store",
            "-s",
            "stores" if multiple else "store",
            required=True,
            multiple=multiple,
            envvar="CASTORE_STORE",
            help=f"{_STORE_HELP}{' Repeatable.' if multiple else ''}",
        ),
        click.option("--url", "-u", envvar="CASTORE_URL", default=None, help=_URL_HELP),
        click.option(
            "--table", default="event", show_default=True, help="Events table name (with --url)."
        ),
        click.option(
            "--schema",
            default=None,
            help="PostgreSQL schema of the events table (with --url). "
            "Default: the connection's search_path.",
        ),
        click.option(
            "--timeout",
            type=click.FloatRange(min=0.1),
            default=10.0,
            show_default=True,
            callback=_finite,
            help="Seconds to wait for a PostgreSQL connection (with --url), unless the URL "
            "(or else PGCONNECT_TIMEOUT) gives a connect_timeout above 0.",
        ),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return _needs_url(function)


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """Refuse ``inf`` and ``nan``, which ``FloatRange`` lets through, as a usage error."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number of seconds", ctx, param)
    return value


def _needs_url(function: Callable[..., Any]) -> Callable[..., Any]:
    """Refuse ``--table``, ``--schema`` and ``--timeout`` without ``--url``.

    Without ``--url`` the store's own adapter is used as defined, with its own table and
    connection settings: the options could only be ignored, which would show another table
    than the one asked for.
    """

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("url") is None:
            ctx = click.get_current_context()
            given = [
                f"--{name}"
                for name in ("table", "schema", "timeout")
                if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)
            ]
            if given:
                named = " and ".join([", ".join(given[:-1]), given[-1]] if given[1:] else given)
                raise click.UsageError(
                    f"{named} {'needs' if len(given) == 1 else 'need'} --url: "
                    "without it the store's own adapter is used, with the table and settings "
                    "it was defined with (pass --url to choose the database and table)"
                )
        return function(*args, **kwargs)

    return checked


def json_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--json``."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables."
    )(function)


def progress_option(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--progress/--no-progress``."""
    return click.option(
        "--progress/--no-progress",
        default=None,
        help="Show a progress bar on stderr (default: only on a terminal).",
    )(function)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("castore-pydantic")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(_version(), prog_name="castore")
@click.option("--traceback", is_flag=True, help="Print the full traceback of errors.")
@click.pass_context
def cli(ctx: click.Context, traceback: bool) -> None:
    """Inspect, export, import and replay castore-pydantic event stores.

    Stores are loaded by import string (module:attribute) from the current directory.
    Exit codes: 0 ok, 1 unexpected error, 2 usage, 3 not found, 4 storage, 5 invalid data,
    6 conflict, 7 messaging, 130 interrupted, 141 output closed early.
    """
    ctx.meta["traceback"] = traceback
