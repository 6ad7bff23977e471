"""What the SQLite adapter tests share: a plain sqlite3 connection to the adapter's file."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def raw(path: Path, *, timeout: float = 0) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to look at the file or hold its lock.

    ``timeout`` is sqlite3's busy timeout: 0 fails at once on a lock (to hold one, or to see
    one is held); a writer racing the adapter needs one.
    """
    conn = sqlite3.connect(path, isolation_level=None, timeout=timeout)
    try:
        yield conn
    finally:
        conn.close()
