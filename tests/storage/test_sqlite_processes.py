"""Several processes share one SQLite file: appends race, none is lost or duplicated."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.storage import _sqlite_worker

PROCESSES = 4
APPENDS = 250


def race(path: Path, *, force: bool) -> list[dict[str, Any]]:
    """Start the worker processes together; return their reports."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(PROCESSES)
    results = context.Queue()
    workers = [
        context.Process(
            target=_sqlite_worker.run,
            args=(str(path), i),
            kwargs={"appends": APPENDS, "force": force, "start": start, "results": results},
        )
        for i in range(PROCESSES)
    ]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return reports


def stored_versions(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT version FROM event WHERE aggregate_name = 'RACE' AND aggregate_id = 'hot'"
            " ORDER BY version"
        ).fetchall()
    finally:
        conn.close()
    return [version for (version,) in rows]


def history_problems(reports: list[dict[str, Any]], stored: list[int]) -> list[str]:
    """What is wrong with a race's outcome: lost, duplicated or untyped results."""
    problems = [f"worker {r['worker']} crashed: {r['crash']}" for r in reports if "crash" in r]
    problems += [f"worker {r['worker']}: {o}" for r in reports for o in r.get("others", [])]
    acknowledged = [v for r in reports for v in r.get("acknowledged", [])]
    total = PROCESSES * APPENDS
    if len(acknowledged) != len(set(acknowledged)):
        problems.append("one version was acknowledged to two writers")
    if sorted(set(acknowledged)) != list(range(1, total + 1)):
        problems.append("acknowledged versions are not exactly 1..N")
    if stored != list(range(1, total + 1)):
        problems.append("stored versions are not exactly 1..N")
    if len(stored) != len(set(stored)):
        problems.append("a version is stored twice")
    return problems


@pytest.mark.slow
class TestProcessesShareOneFile:
    async def test_racing_appends_from_processes_lose_nothing(self, tmp_path: Path) -> None:
        """4 processes x 250 read-then-append-with-retry: versions 1..1000, each acked once."""
        path = tmp_path / "race.db"
        reports = await asyncio.to_thread(race, path, force=False)
        assert history_problems(reports, stored_versions(path)) == []
        conflicts = sum(r["conflicts"] for r in reports)
        # Every lost race surfaced as EventAlreadyExistsError (no other type was seen), and
        # the processes really did race.
        assert conflicts > 0
        assert all(len(r["acknowledged"]) == APPENDS for r in reports)

    async def test_the_check_catches_blind_overwrites(self, tmp_path: Path) -> None:
        """Negative control: writers that blindly overwrite (force) fail the same check."""
        path = tmp_path / "blind.db"
        reports = await asyncio.to_thread(race, path, force=True)
        assert "one version was acknowledged to two writers" in history_problems(
            reports, stored_versions(path)
        )
