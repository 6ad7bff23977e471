"""The suite's time limit per test (``tests/conftest.py``): a hang ends the run, by name."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

HANGING = """
import asyncio
import time


def test_fine():
    pass


async def wait_deep_down():
    await asyncio.Event().wait()


async def test_waits_forever():
    await wait_deep_down()


def test_never_reached():
    time.sleep(0)
"""


def run_pytest(directory: Path, limit: str) -> tuple[subprocess.CompletedProcess[str], float]:
    (directory / "test_hanging.py").write_text(HANGING)
    env = {**os.environ, "CASTORE_TEST_TIME_LIMIT": limit, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-c",
            os.devnull,
            "--rootdir",
            str(directory),
            "-o",
            "asyncio_mode=auto",
            "-q",
            str(directory / "test_hanging.py"),
        ],
        env=env,
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done, time.monotonic() - started


@pytest.mark.slow
def test_a_hanging_test_ends_the_run_naming_it(tmp_path: Path) -> None:
    """Past the limit the run stops with status 3, names the test and prints the stacks."""
    done, seconds = run_pytest(tmp_path, "2")
    assert done.returncode == 3, done.stdout + done.stderr
    assert "test_hanging.py::test_waits_forever still runs after 2s" in done.stderr
    assert "Most recent call first" in done.stderr or "most recent call first" in done.stderr
    assert "asyncio task(s) pending" in done.stderr
    # Where the hung coroutine waits, down its chain of awaits.
    assert "in test_waits_forever" in done.stderr
    assert "in wait_deep_down" in done.stderr
    assert "test_never_reached" not in done.stdout + done.stderr
    assert seconds < 60


def test_a_limit_that_is_not_a_number_is_a_usage_error(tmp_path: Path) -> None:
    """A malformed CASTORE_TEST_TIME_LIMIT stops the run before any test, saying why."""
    done, _ = run_pytest(tmp_path, "ten minutes")
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "CASTORE_TEST_TIME_LIMIT must be a number of seconds" in done.stdout + done.stderr
