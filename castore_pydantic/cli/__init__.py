"""``castore``: inspect, export, import and replay event stores from the command line.

Event stores are loaded by import string, like uvicorn loads apps
(``examples.pokemon.stores:pokemons``; the current directory is on ``sys.path``), and read
through the adapter given by ``--url`` (``sqlite:///pokemon.db``, ``postgresql://...``) or
the one the store was defined with. Human output by default, ``--json`` for scripts, progress
bars on stderr, one-line errors and documented exit codes (the ``EXIT_*`` constants).

Needs the ``cli`` extra (click and rich): ``pip install 'castore-pydantic[cli]'``. Nothing else
in ``castore_pydantic`` imports this package.
"""

from __future__ import annotations

import logging

try:
    import click  # noqa: F401 - fail early, with the extra to install
    import rich  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the castore command needs click and rich: pip install 'castore-pydantic[cli]'"
    ) from exc

from castore_pydantic.cli import _inspect, _pour, _transfer
from castore_pydantic.cli._app import cli
from castore_pydantic.cli._running import (
    EXIT_BROKEN_PIPE,
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_INVALID_DATA,
    EXIT_MESSAGING,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_STORAGE,
    EXIT_USAGE,
    CliError,
)

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_CONFLICT",
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_INVALID_DATA",
    "EXIT_MESSAGING",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_STORAGE",
    "EXIT_USAGE",
    "CliError",
    "cli",
    "main",
]

# The command modules register their commands on ``cli`` when imported.
_COMMAND_MODULES = (_inspect, _pour, _transfer)


#: Loggers of drivers that log the failures the CLI reports itself, as one line
#: (``--traceback`` shows the details): the PostgreSQL pool logs every failed connection
#: attempt, the broker clients every refused or lost connection.
_DRIVER_LOGGERS = ("psycopg.pool", "aiormq", "aio_pika", "redis")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``castore`` script and of ``python -m castore_pydantic``."""
    for name in _DRIVER_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    cli.main(args=argv, prog_name="castore")
