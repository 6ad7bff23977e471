"""Connecting once outside the pool: whether the adapter can connect, and whether retrying helps.

psycopg's pool connects in the background and retries a failing connection with backoff,
logging why; a caller waiting for one of its connections only learns, at its timeout, that
none came. The adapter connects once by itself when it opens its pool (and again when a wait
for the pool times out) to tell why it cannot.

Some failures pass with time: the server is down, restarting or full. Others stay until
someone changes the configuration: the database does not exist (SQLSTATE ``3D000``), the
role does not exist, may not log in, or no ``pg_hba.conf`` line admits it (``28000``), its
password is wrong (``28P01``), it lacks ``CONNECT`` on the database (``42501``), or the
server asks for a password and none was given. libpq keeps the SQLSTATE of a failed
connection to itself (psycopg's error has none), so these are told by the server's message,
in the English PostgreSQL writes unless its ``lc_messages`` chooses another language, and by
libpq's ``PQconnectionNeedsPassword``. A failure they do not recognise counts as passing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

__all__ = ["Failure", "try_connect"]

#: The server's words for a connection it refuses until its configuration changes.
_LASTING = re.compile(
    r'database ".*" does not exist'
    r'|role ".*" does not exist'
    r'|role ".*" is not permitted to log in'
    r"|authentication failed for user"
    r"|no pg_hba\.conf entry for"
    r"|pg_hba\.conf rejects connection"
    r"|permission denied for database"
)
#: Seconds one connection attempt may take at most (unless ``connect_timeout`` says).
_CONNECT_SECONDS = 5


@dataclass(frozen=True, slots=True)
class Failure:
    """Why connecting failed.

    Attributes:
        reason: libpq's message, without the password.
        lasting: Whether retrying cannot help until the configuration changes.
    """

    reason: str
    lasting: bool


def _lasting(exc: psycopg.Error) -> bool:
    pgconn = getattr(exc, "pgconn", None)
    if pgconn is not None and getattr(pgconn, "needs_password", False):
        return True  # the server asked for a password and none was given
    return _LASTING.search(str(exc)) is not None


async def try_connect(
    pool: AsyncConnectionPool[Any], redact: Callable[[str], str], seconds: float
) -> Failure | None:
    """Connect once as ``pool`` does (an owned pool: its conninfo and keywords), then close.

    ``redact`` takes the password out of a text; ``seconds`` bounds the attempt, unless the
    keywords set a ``connect_timeout`` of their own.

    Returns:
        ``None`` if the connection was made, else why it failed.
    """
    kwargs = dict(pool.kwargs) if isinstance(pool.kwargs, Mapping) else {}
    kwargs.setdefault("connect_timeout", max(1, math.ceil(min(seconds, _CONNECT_SECONDS))))
    conninfo = pool.conninfo if isinstance(pool.conninfo, str) else ""
    try:
        conn = await psycopg.AsyncConnection.connect(conninfo, **kwargs)
    except psycopg.Error as exc:
        return Failure(reason=redact(str(exc).strip()), lasting=_lasting(exc))
    await conn.close()
    return None
