"""Drive async stores and commands from the synchronous code Hypothesis runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from castore_pydantic._command import Command
from castore_pydantic._event import Event
from castore_pydantic._event_store import EventStore
from castore_pydantic._types import PushEventResult, renote
from castore_pydantic.errors import UndefinedEventStorageAdapterError
from castore_pydantic.testing import mock_event_store
from castore_pydantic.testing._refusals import Refusals

__all__ = ["run_commands", "run_now", "run_sync"]

T = TypeVar("T")


def run_now(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run the coroutine ``make()`` returns, without an event loop if it never waits.

    Work on in-memory stores never waits, and an event loop for each of Hypothesis' many
    examples costs more than the work itself. A coroutine that does wait (a hook on a real
    broker, say), or that needs a running loop, is dropped, and a new one from ``make`` runs
    with ``run_sync``: ``make``'s coroutine must be safe to run again after an unfinished
    start.
    """
    coroutine = make()
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    except RuntimeError as exc:
        # Something asked for the running loop (asyncio.sleep, a task) before waiting.
        if "no running event loop" not in str(exc):
            raise
        return run_sync(make())
    coroutine.close()
    return run_sync(make())


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` on a private event loop and return its result.

    Hypothesis draws values and runs property checks synchronously, but stores are async. When
    this thread already runs a loop (a sync helper called from an ``async def`` test), the
    coroutine runs on a fresh loop in a helper thread instead: a thread runs one loop at most.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        running = False
    else:
        running = True
    if not running:
        return asyncio.run(coroutine)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = asyncio.run(coroutine)
        except BaseException as exc:  # handed to the calling thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="castore-run-sync")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    result: T = outcome["result"]
    return result


def run_commands(
    store: EventStore[Any, Any],
    steps: Sequence[tuple[Command[Any, Any], Any]],
    *,
    aggregate_id: str | None,
    contexts: Mapping[str, Sequence[Any]],
    expected_errors: tuple[type[BaseException], ...],
    failures: Mapping[str, Refusals] | None = None,
) -> list[Event]:
    """Run commands on fresh in-memory copies of their stores; return one aggregate's events.

    The aggregate is ``aggregate_id``, or when it is ``None`` the one that received the first
    event pushed to ``store``. Each command gets ``contexts[command_id]`` as extra arguments;
    those raising ``expected_errors`` are skipped, and counted in ``failures[command_id]``
    (which warns about a command that never succeeds). ``UndefinedEventStorageAdapterError``
    is never expected: it means the handler pushed to a store it was not given.
    """
    return run_sync(
        _run(
            store,
            steps,
            aggregate_id=aggregate_id,
            contexts=contexts,
            expected_errors=expected_errors,
            failures=failures or {},
        )
    )


async def _run(
    store: EventStore[Any, Any],
    steps: Sequence[tuple[Command[Any, Any], Any]],
    *,
    aggregate_id: str | None,
    contexts: Mapping[str, Sequence[Any]],
    expected_errors: tuple[type[BaseException], ...],
    failures: Mapping[str, Refusals],
) -> list[Event]:
    copies: dict[int, EventStore[Any, Any]] = {}

    def copy_of(original: EventStore[Any, Any]) -> EventStore[Any, Any]:
        if id(original) not in copies:
            copies[id(original)] = mock_event_store(original)
        return copies[id(original)]

    target = copy_of(store)
    pushed_to: list[str] = []

    async def remember(result: PushEventResult[Any, Any]) -> None:
        pushed_to.append(result.event.aggregate_id)

    target.on_event_pushed = remember
    skipped: dict[int, str] = {}
    for index, (command, value) in enumerate(steps):
        stores = [copy_of(required) for required in command.required_event_stores]
        counter = failures.get(command.command_id)
        try:
            await command.handler(value, stores, *contexts[command.command_id])
        except UndefinedEventStorageAdapterError as error:
            # A set-up mistake, never a business rule: the copies all have an adapter.
            error.add_note(
                f"Command {command.command_id} used event store {error.event_store_id}, which "
                "has no adapter, instead of the copies it was given: a handler must push "
                "through the stores of its second argument (required_event_stores)."
            )
            renote(error, _history_note(steps[: index + 1], skipped), replacing=_HISTORY)
            raise
        except expected_errors as expected:
            skipped[index] = type(expected).__name__
            if counter is not None:
                counter.refused(f"{type(expected).__name__}: {expected}"[:_SHOWN_INPUT])
        except Exception as error:
            # Hypothesis runs the history again while shrinking it: keep the last one only.
            renote(error, _history_note(steps[: index + 1], skipped), replacing=_HISTORY)
            raise
        else:
            if counter is not None:
                counter.passed()
    key = aggregate_id if aggregate_id is not None else next(iter(pushed_to), None)
    if key is None:
        return []
    events: list[Event] = (await target.get_events(key)).events
    return events


def _history_note(
    steps: Sequence[tuple[Command[Any, Any], Any]], skipped: Mapping[int, str]
) -> str:
    """The commands a history ran, the failing one last, for an unexpected error's note.

    Hypothesis shrinks the history before showing the error: the list is then short.
    """
    lines = [f"{_HISTORY} (the last command raised it):"]
    for index, (command, value) in enumerate(steps):
        try:
            shown = repr(value)
        except Exception:  # a broken __repr__ must not hide the error being reported
            shown = f"<{type(value).__name__}>"
        if len(shown) > _SHOWN_INPUT:
            shown = shown[: _SHOWN_INPUT - 3] + "..."
        outcome = f" (raised {skipped[index]}, expected: skipped)" if index in skipped else ""
        lines.append(f"  {index + 1}. {command.command_id}: {shown}{outcome}")
    return "\n".join(lines)


#: How the note on an error a command history raised starts.
_HISTORY = "The command history that raised this"
#: The longest input repr a history note shows.
_SHOWN_INPUT = 300
