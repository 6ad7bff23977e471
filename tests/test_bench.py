"""The benchmarks still run: each, at a tiny size, completes and prints what it compares.

Speed is measured by running them (``python -m bench.<name>``), never in tests; their
numbers at this size mean nothing. This only keeps them from breaking unnoticed. Left out:
the PostgreSQL benchmark, which needs asyncpg (the ``bench`` extra, not a test
dependency); the in-memory one, which takes 18 s even at its smallest; and the broker ones,
which publish to the brokers' default database and vhost.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("bench.bench_sqlite", ["--scale", "0.02"], "ratio ours/raw sqlite3"),
        ("bench.bench_dam", ["--aggregates", "50", "--versions", "5"], "pour/naive"),
    ],
)
def test_a_benchmark_runs_at_a_tiny_size(module: str, args: list[str], expected: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert expected in done.stdout, done.stdout[-2000:]
