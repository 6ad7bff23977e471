"""The benchmarks still run: each, at a tiny size, completes and prints what it compares.

Speed is measured by running them (``python -m bench.<name>``), never in tests; their
numbers at this size mean nothing. This only keeps them from breaking unnoticed. The
PostgreSQL one runs without its asyncpg contenders when asyncpg (the ``bench`` extra, not a
test dependency) is missing. Left out: the in-memory one, which takes 18 s even at its
smallest, and the broker ones, which publish to the brokers' default database and vhost.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.services import require_postgres
from tests.storage.postgres_support import DSN

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        ("bench.bench_sqlite", ["--scale", "0.02"], "ratio ours/raw sqlite3"),
        ("bench.bench_dam", ["--aggregates", "50", "--versions", "5"], "pour/naive"),
        ("bench.bench_routing", ["--messages", "20", "--rounds", "2"], "4 listeners"),
    ],
)
def test_a_benchmark_runs_at_a_tiny_size(module: str, args: list[str], expected: str) -> None:
    run(module, args, expected)


def test_the_postgres_benchmark_runs_at_a_tiny_size_and_drops_its_schema() -> None:
    require_postgres()
    out = run(
        "bench.bench_postgres",
        ["--dsn", DSN, "--scale", "0.01", "--batches", "2"],
        "W4 vs best raw",
    )
    assert "ratio ours/raw psycopg" in out
    schema = out.split("schema ", 1)[1].split()[0]
    assert schema.startswith("castore_bench_"), out[:500]
    with psycopg.connect(DSN) as conn:
        left = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s", (schema,)
        ).fetchone()
    assert left == (0,), f"the benchmark left its schema {schema!r} behind"


def run(module: str, args: list[str], expected: str) -> str:
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
    return done.stdout
