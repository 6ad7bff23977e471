"""What the whole suite shares: a time limit per test, so that a hang fails the run.

A test that waits forever (a broker call that never returns, a lock never released) would
otherwise hold CI until its own deadline and say nothing. Past the limit, the test's name
and the stacks of all threads are printed and the run ends with exit status 3.
``CASTORE_TEST_TIME_LIMIT`` sets the limit in seconds (default 600; the slowest test takes
well under a minute); ``0`` turns it off, for a debugger session.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import os
import sys
import threading
from collections.abc import Generator

import pytest

_DEFAULT_LIMIT = 600.0
_EXIT_STATUS = 3
_MAX_TASKS_SHOWN = 50


def _limit() -> float:
    text = os.environ.get("CASTORE_TEST_TIME_LIMIT", "")
    try:
        return float(text) if text else _DEFAULT_LIMIT
    except ValueError:
        raise pytest.UsageError(
            f"CASTORE_TEST_TIME_LIMIT must be a number of seconds, not {text!r}"
        ) from None


def _give_up(config: pytest.Config, nodeid: str, limit: float) -> None:
    # pytest captures the test's output (file descriptors included): stop that first, or
    # the message would go to a capture file that nobody reads after the exit.
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        with contextlib.suppress(Exception):
            capture.suspend(in_=True)
    stream = sys.stderr
    stream.write(f"\n\n{nodeid} still runs after {limit:g}s: stopping the test run.\n")
    stream.flush()
    faulthandler.dump_traceback(file=stream, all_threads=True)
    # A hung async test shows only its event loop waiting above: say where its tasks wait.
    # (Read from this thread while the loop sleeps in select; good enough at the very end.)
    with contextlib.suppress(Exception):
        pending = [o for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()]
        stream.write(f"\n{len(pending)} asyncio task(s) pending:\n")
        for task in pending[:_MAX_TASKS_SHOWN]:
            stream.write(f"{task!r} waits in:\n")
            for line in _await_chain(task.get_coro()):
                stream.write(f"  {line}\n")
    stream.flush()
    os._exit(_EXIT_STATUS)


def _await_chain(coro: object) -> list[str]:
    """Where a suspended coroutine waits: each frame down its chain of awaits."""
    lines = []
    while coro is not None and len(lines) < 100:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            code = frame.f_code
            lines.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return lines


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    limit = _limit()
    watchdog = None
    if limit > 0:
        watchdog = threading.Timer(limit, _give_up, args=(item.config, item.nodeid, limit))
        watchdog.daemon = True
        watchdog.start()
    try:
        return (yield)
    finally:
        if watchdog is not None:
            watchdog.cancel()
