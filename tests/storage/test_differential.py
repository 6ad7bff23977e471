"""One seeded sequence of random operations gives identical results on every adapter.

The in-memory adapter is the reference. Pushes (with conflicts and ``force``), groups (with
conflicting and repeated members), reads with random bounds, listings followed page by page,
and bad input all run in the same order on each backend; every result or error (its type and
fields) must match the reference's exactly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError

from castore_pydantic import Aggregate, Event, EventStore
from castore_pydantic.errors import CastoreError
from tests.storage._adapters import BACKENDS, AdapterMaker

OPERATIONS = 2000
SEED = 1_000_003
BASE = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
BAD_INPUTS = 9
AGGREGATE_IDS = ["a", "A", "b", "B", "a1", "a-1", "a_1", "é", "e", "Zz", "x y", "日本"]


class Profile(BaseModel):
    name: str
    level: int = Field(ge=1, le=100)


class Opened(Event):
    type: Literal["OPENED"] = "OPENED"
    payload: Profile


class Noted(Event):
    type: Literal["NOTED"] = "NOTED"
    payload: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class Closed(Event):
    type: Literal["CLOSED"] = "CLOSED"


class Tally(Aggregate):
    events: int
    last_type: str


def reduce_tally(tally: Tally | None, event: Opened | Noted | Closed) -> Tally:
    return Tally(
        aggregate_id=event.aggregate_id,
        version=event.version,
        events=(0 if tally is None else tally.events) + 1,
        last_type=event.type,
    )


@dataclass
class Generator:
    """Draws operations; its version hints only make contiguous histories likely."""

    rng: random.Random
    hints: dict[tuple[int, str], int] = field(default_factory=dict)

    def timestamp(self) -> str:
        ms = self.rng.choice([0, 0, 1, 7, 7, 999, 1000, 60_000, 3_600_000])
        micro = self.rng.choice([0, 0, 0, 250, 999])
        stamp = BASE + timedelta(milliseconds=ms, microseconds=micro)
        if self.rng.random() < 0.2:
            return stamp.astimezone(timezone(timedelta(hours=-3))).isoformat()
        return stamp.isoformat()

    def bound(self) -> Any:
        stamp = BASE + timedelta(
            milliseconds=self.rng.choice([-1, 0, 1, 7, 500, 1000, 60_000, 10**8]),
            microseconds=self.rng.choice([0, 0, 1, 999]),
        )
        return stamp.isoformat() if self.rng.random() < 0.3 else stamp

    def event(self, store: int, *, fresh_version: bool = True) -> dict[str, Any]:
        aggregate_id = self.rng.choice(AGGREGATE_IDS)
        hint = self.hints.get((store, aggregate_id), 0)
        if fresh_version and self.rng.random() < 0.65:
            version = hint + 1
        else:
            version = self.rng.randint(1, hint + 2)
        self.hints[store, aggregate_id] = max(hint, version)
        kind = "OPENED" if version == 1 and self.rng.random() < 0.7 else None
        kind = kind or self.rng.choice(["OPENED", "NOTED", "NOTED", "CLOSED"])
        event: dict[str, Any] = {
            "aggregateId": aggregate_id,
            "version": version,
            "type": kind,
            "timestamp": self.timestamp(),
        }
        if kind == "OPENED":
            event["payload"] = {"name": self.rng.choice(["Pika", "Évoli", "x" * 40]), "level": 5}
        elif kind == "NOTED":
            event["payload"] = self.rng.choice(
                [
                    None,
                    {},
                    {"n": 2**53 - 1, "f": 0.1, "neg": -3, "s": "«ça» ⚡", "l": [1, None, True]},
                    {"deep": {"er": [{"est": "x"}]}, "quote": 'a"b\\c\n'},
                ]
            )
            if self.rng.random() < 0.4:
                event["metadata"] = {"by": self.rng.choice(["ash", "misty"]), "n": version}
        return event

    def operation(self) -> dict[str, Any]:
        roll = self.rng.random()
        store = self.rng.randrange(2)
        if roll < 0.35:
            return {"op": "push", "store": store, "event": self.event(store),
                    "force": self.rng.random() < 0.1}  # fmt: skip
        if roll < 0.50:
            members = []
            for _ in range(self.rng.randint(1, 5)):
                member_store = self.rng.randrange(2)
                members.append((member_store, self.event(member_store)))
            if len(members) > 1 and self.rng.random() < 0.15:
                members.append(members[self.rng.randrange(len(members))])
            return {"op": "group", "members": members, "force": self.rng.random() < 0.05}
        if roll < 0.68:
            maybe = self.rng.random
            return {
                "op": "get_events",
                "store": store,
                "aggregate_id": self.rng.choice(AGGREGATE_IDS),
                "min_version": self.rng.randint(0, 6) if maybe() < 0.4 else None,
                "max_version": self.rng.randint(0, 6) if maybe() < 0.4 else None,
                "limit": self.rng.choice([0, 1, 2, 5]) if maybe() < 0.4 else None,
                "reverse": maybe() < 0.3,
            }
        if roll < 0.73:
            return {"op": "get_aggregate", "store": store,
                    "aggregate_id": self.rng.choice(AGGREGATE_IDS),
                    "max_version": self.rng.choice([None, 1, 2, 3])}  # fmt: skip
        if roll < 0.93:
            maybe = self.rng.random
            return {
                "op": "list",
                "store": store,
                "limit": self.rng.choice([0, 1, 2, 3, 5]) if maybe() < 0.7 else None,
                "initial_event_after": self.bound() if maybe() < 0.3 else None,
                "initial_event_before": self.bound() if maybe() < 0.3 else None,
                "reverse": self.rng.choice([None, True, False]),
                "override_limit": self.rng.choice([None, None, 1, 4]),
            }
        return {"op": "bad", "store": store, "kind": self.rng.randrange(BAD_INPUTS)}


def operations() -> list[dict[str, Any]]:
    generator = Generator(random.Random(SEED))
    return [generator.operation() for _ in range(OPERATIONS)]


def dump(event: Event) -> tuple[str, dict[str, Any]]:
    return type(event).__name__, event.model_dump(mode="json")


def error(exc: Exception) -> tuple[Any, ...]:
    """An error as observed by a caller: its type and its typed fields."""
    if isinstance(exc, ValidationError):
        return ("ValidationError", tuple(e["type"] for e in exc.errors()))
    fields = {
        name: getattr(exc, name)
        for name in ("event_store_id", "aggregate_id", "version", "event_type", "reason", "path")
        if hasattr(exc, name)
    }
    return (type(exc).__name__, fields)


async def bad_input(store: EventStore[Tally, Any], kind: int) -> Any:
    """Misuse that the library must refuse the same way whatever the adapter."""
    opened = {"aggregateId": "bad", "version": 1, "type": "OPENED",
              "payload": {"name": "n", "level": 1}}  # fmt: skip
    naive = datetime(2024, 1, 1)  # a bound without a time zone is refused
    attempts: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.push_event({**opened, "payload": {"name": "n", "level": 0}}),
        lambda: store.push_event({**opened, "type": "UNKNOWN"}),
        lambda: store.push_event({**opened, "version": 0}),
        lambda: store.get_events("a", limit=-1),
        lambda: store.list_aggregate_ids(page_token='{"lastEvaluatedKey": 3}'),
        lambda: store.list_aggregate_ids(initial_event_after=naive),
        lambda: store.push_event({**opened, "extra": 1}),
        lambda: store.push_event({**opened, "aggregateId": "nul\x00"}),
        EventStore.push_event_group,
    ]
    return await attempts[kind]()


async def run(ops: list[dict[str, Any]], make: AdapterMaker) -> list[Any]:
    """Run the operations on one backend; return what a caller observes of each."""
    stores: list[EventStore[Tally, Any]] = [
        EventStore(
            event_store_id=store_id,
            event_types=[Opened, Noted, Closed],
            reducer=reduce_tally,
            event_storage_adapter=await make(),
        )
        for store_id in ("DIFF_A", "DIFF_B")
    ]
    observed: list[Any] = []
    for op in ops:
        try:
            observed.append(("ok", await apply(stores, op)))
        except (CastoreError, ValueError, TypeError) as exc:
            observed.append(("error", error(exc)))
    return observed


async def apply(stores: list[EventStore[Tally, Any]], op: dict[str, Any]) -> Any:
    kind = op["op"]
    if kind == "push":
        result = await stores[op["store"]].push_event(op["event"], force=op["force"])
        aggregate = result.next_aggregate
        return dump(result.event), None if aggregate is None else aggregate.model_dump()
    if kind == "group":
        grouped = [stores[s].group_event(event) for s, event in op["members"]]
        group = await EventStore.push_event_group(*grouped, force=op["force"])
        return [dump(r.event) for r in group.event_group]
    store = stores[op["store"]]
    if kind == "get_events":
        options = {k: op[k] for k in ("min_version", "max_version", "limit", "reverse")}
        return [dump(e) for e in (await store.get_events(op["aggregate_id"], **options)).events]
    if kind == "get_aggregate":
        got = await store.get_aggregate(op["aggregate_id"], max_version=op["max_version"])
        return None if got.aggregate is None else got.aggregate.model_dump()
    if kind == "list":
        return await list_all(store, op)
    return await bad_input(store, op["kind"])


async def list_all(store: EventStore[Tally, Any], op: dict[str, Any]) -> list[Any]:
    """Follow a listing's tokens to the end; the second page may override the limit."""
    pages = []
    result = await store.list_aggregate_ids(
        limit=op["limit"],
        initial_event_after=op["initial_event_after"],
        initial_event_before=op["initial_event_before"],
        reverse=op["reverse"],
    )
    while True:
        pages.append(
            (
                [(e.aggregate_id, e.initial_event_timestamp) for e in result.aggregate_ids],
                None if result.next_page_token is None else json.loads(result.next_page_token),
            )
        )
        if result.next_page_token is None or len(pages) > 60:
            return pages
        limit = op["override_limit"] if len(pages) == 1 else None
        result = await store.list_aggregate_ids(page_token=result.next_page_token, limit=limit)


@pytest.fixture(scope="module")
def ops() -> list[dict[str, Any]]:
    return operations()


@pytest.fixture(scope="module")
def reference(ops: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """What the in-memory reference adapter observes."""
    import asyncio

    async def observe() -> list[Any]:
        async with BACKENDS["memory"](tmp_path_factory.mktemp("memory")) as make:
            return await run(ops, make)

    return asyncio.run(observe())


def test_the_sequence_exercises_every_outcome(reference: list[Any]) -> None:
    """The seeded run contains successes, conflicts, bad input and multi-page listings."""
    errors = {obs[1][0] for obs in reference if obs[0] == "error"}
    assert {
        "EventAlreadyExistsError",
        "ValidationError",
        "UnknownEventTypeError",
        "InvalidPageTokenError",
        "EventGroupError",
        "EventLimitExceededError",
        "ValueError",
    } <= errors
    assert sum(obs[0] == "ok" for obs in reference) > OPERATIONS // 2
    pages = [len(obs[1]) for obs in reference if obs[0] == "ok" and isinstance(obs[1], list)]
    assert max(pages) >= 4


@pytest.mark.parametrize(
    "backend",
    ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
async def test_backend_observes_exactly_what_memory_observes(
    backend: str, ops: list[dict[str, Any]], reference: list[Any], tmp_path: Path
) -> None:
    """Every operation's result or error on this backend equals the in-memory adapter's."""
    async with BACKENDS[backend](tmp_path) as make:
        observed = await run(ops, make)
    for index, (got, expected) in enumerate(zip(observed, reference, strict=True)):
        assert got == expected, f"operation #{index} {ops[index]!r} diverged"
