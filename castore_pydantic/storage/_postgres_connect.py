"""Connecting outside the pool: whether the adapter can connect, and whether retrying helps.

psycopg's pool connects in the background and retries a failing connection with backoff,
logging why; a caller waiting for one of its connections only learns, at its timeout, that
none came. The adapter connects once by itself when it opens its pool, to tell why it
cannot, and its pool's connections record how their last attempt ended (``Attempts``), so
that a wait for the pool that times out can say why without connecting again.

Some failures pass with time: the server is down, restarting or full, or an authentication
service the server asks (LDAP, RADIUS, PAM) is out. Others stay until someone changes the
configuration: the database does not exist (SQLSTATE ``3D000``), the role does not exist,
may not log in, or no ``pg_hba.conf`` line admits it (``28000``), its password is wrong
(``28P01``), it lacks ``CONNECT`` on the database (``42501``), the server asks for a
password and none was given, or the client requires SSL and the server has none. libpq
keeps the SQLSTATE of a failed connection to itself (psycopg's error has none), so these are
told by the server's message, in the English PostgreSQL writes unless its ``lc_messages``
chooses another language, by libpq's own message and by libpq's
``PQconnectionNeedsPassword``. A failure they do not recognise counts as passing. libpq
also refuses values of the connection parameters before it tries to connect (a port out of
range, an unknown ``sslmode``): that failure lasts too, and is told apart as ``malformed``.

Each attempt keeps to the ``connect_timeout`` the connection string, the keywords or
``PGCONNECT_TIMEOUT`` set (per host, as libpq does), and to the time the caller has left.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Self

import psycopg
from psycopg_pool import AsyncConnectionPool

__all__ = ["Attempts", "Failure", "try_connect"]

#: The server's (and libpq's) words for a connection refused until the configuration changes.
#: An authentication failure counts unless the method asks another service (LDAP, RADIUS,
#: PAM): the server words a failure of that service as it words a wrong password.
_LASTING = re.compile(
    r'database ".*" does not exist'
    r'|role ".*" does not exist'
    r'|role ".*" is not permitted to log in'
    r"|(?<!LDAP )(?<!RADIUS )(?<!PAM )authentication failed for user"
    r"|no pg_hba\.conf entry for"
    r"|pg_hba\.conf rejects connection"
    r"|permission denied for database"
    r"|server does not support SSL, but SSL was required"
)


@dataclass(frozen=True, slots=True)
class Failure:
    """Why connecting failed.

    Attributes:
        reason: libpq's message, without the password.
        lasting: Whether retrying cannot help until the configuration changes.
        cut_short: Whether the caller's time ran out first (``reason`` then says only that).
        malformed: Whether libpq refused the connection parameters before connecting
            (then ``lasting`` too); ``reason`` then says which value, without libpq's prefix.
    """

    reason: str
    lasting: bool
    cut_short: bool = False
    malformed: bool = False


def _lasting(exc: psycopg.Error) -> bool:
    pgconn = getattr(exc, "pgconn", None)
    if pgconn is not None and getattr(pgconn, "needs_password", False):
        return True  # the server asked for a password and none was given
    return _LASTING.search(str(exc)) is not None


#: How libpq words a connection it refused to start (psycopg's prefix, then libpq's words).
_BAD = "connection is bad:"


def failure(exc: psycopg.Error, redact: Callable[[str], str]) -> Failure:
    """The ``Failure`` of a connection attempt that raised ``exc``."""
    reason = redact(str(exc).strip())
    # libpq refuses the parameters' values before connecting ("invalid port number",
    # "missing ..."); a socket file that is missing fails before connecting too, but is not
    # the parameters' fault.
    detail = reason.removeprefix(_BAD).strip()
    if reason.startswith(_BAD) and detail.lower().startswith(("invalid", "missing")):
        return Failure(reason=detail, lasting=True, malformed=True)
    return Failure(reason=reason, lasting=_lasting(exc))


async def try_connect(
    pool: AsyncConnectionPool[Any],
    redact: Callable[[str], str],
    seconds: float | None,
    attempts: Attempts,
) -> Failure | None:
    """Connect once as ``pool`` does (an owned pool: its class, conninfo and keywords).

    ``redact`` takes the password out of a text; ``seconds`` bounds the attempt, whatever
    ``connect_timeout`` says (which bounds each host's attempt within it); ``None`` leaves
    it to ``connect_timeout``. The connection made is kept as ``attempts``' spare: the
    pool's next connection (its first, once it opens) is that one, not a new one.

    Returns:
        ``None`` if the connection was made, else why it failed.
    """
    kwargs = dict(pool.kwargs) if isinstance(pool.kwargs, Mapping) else {}
    conninfo = pool.conninfo if isinstance(pool.conninfo, str) else ""
    try:
        # psycopg waits for the socket in the event loop; a cancelled attempt stops
        # waiting, and its half-made connection is closed when it is freed.
        async with asyncio.timeout(seconds):
            conn = await pool.connection_class.connect(conninfo, **kwargs)
    except TimeoutError:
        reason = f"connecting took longer than {seconds or 0:.1f}s"
        return Failure(reason=reason, lasting=False, cut_short=True)
    except psycopg.Error as exc:
        return failure(exc, redact)
    earlier, attempts.spare = attempts.spare, conn
    if earlier is not None:
        await earlier.close()
    return None


class Attempts:
    """How the last connection attempt of an owned pool ended.

    Args:
        redact: Takes the password out of a text.
    """

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
        #: Why the pool's last attempt failed; ``None`` while none did or the last succeeded.
        self.failure: Failure | None = None
        #: A connection ``try_connect`` made, which the pool's next connection attempt
        #: takes instead of connecting again.
        self.spare: psycopg.AsyncConnection[Any] | None = None

    async def discard_spare(self) -> None:
        """Close the spare connection no pool took (the pool closed first)."""
        spare, self.spare = self.spare, None
        if spare is not None:
            await spare.close()

    def connection_class(self) -> type[psycopg.AsyncConnection[Any]]:
        """A connection class for the pool that records each attempt here."""
        attempts = self

        class Connection(psycopg.AsyncConnection[Any]):
            """psycopg's connection, whose ``connect`` records how it ended."""

            __qualname__ = "Connection"  # in the pool's logs

            @classmethod
            async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
                spare, attempts.spare = attempts.spare, None
                if isinstance(spare, cls) and not spare.closed:
                    return spare  # made with the same parameters, moments ago
                try:
                    conn = await super().connect(conninfo, **kwargs)
                except psycopg.Error as exc:
                    attempts.failure = failure(exc, attempts._redact)
                    raise
                attempts.failure = None
                return conn

        return Connection
