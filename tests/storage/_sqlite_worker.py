"""Runs in a separate process: appends to one aggregate of a SQLite file, racing others."""

from __future__ import annotations

import asyncio
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any, Literal

from castore_pydantic import Aggregate, Event, EventAlreadyExistsError, EventStore
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter


class Appended(Event):
    type: Literal["APPENDED"] = "APPENDED"
    payload: dict[str, int]


class Tally(Aggregate):
    count: int


def reduce_tally(tally: Tally | None, event: Appended) -> Tally:
    count = 0 if tally is None else tally.count
    return Tally(aggregate_id=event.aggregate_id, version=event.version, count=count + 1)


async def append(
    path: str, worker: int, *, appends: int, force: bool, start: Barrier
) -> dict[str, Any]:
    acknowledged: list[int] = []
    conflicts = 0
    others: list[str] = []
    async with SQLiteEventStorageAdapter(path, busy_timeout=60) as adapter:
        store = EventStore(
            event_store_id="RACE",
            event_types=[Appended],
            reducer=reduce_tally,
            event_storage_adapter=adapter,
        )
        await store.get_events("warm-up")
        start.wait()
        while len(acknowledged) < appends and len(others) < 10:
            try:
                last = (await store.get_events("hot", reverse=True, limit=1)).events
                version = last[0].version + 1 if last else 1
                await store.push_event(
                    Appended(aggregate_id="hot", version=version, payload={"worker": worker}),
                    force=force,
                )
            except EventAlreadyExistsError:
                conflicts += 1
                continue
            except Exception as exc:  # reported to the parent, which fails
                others.append(f"{type(exc).__name__}: {exc}")
                continue
            acknowledged.append(version)
    return {
        "worker": worker,
        "acknowledged": acknowledged,
        "conflicts": conflicts,
        "others": others,
    }


def run(
    path: str, worker: int, *, appends: int, force: bool, start: Barrier, results: Queue[Any]
) -> None:
    """Process entry point: append ``appends`` events, put a report on ``results``."""
    try:
        results.put(asyncio.run(append(path, worker, appends=appends, force=force, start=start)))
    except BaseException as exc:  # anything at all must reach the parent
        results.put({"worker": worker, "crash": f"{type(exc).__name__}: {exc}"})
