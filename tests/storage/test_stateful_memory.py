"""The in-memory adapter against the stateful model of the storage contract."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from castore_pydantic import Event, GroupedEvent, ListAggregateIdsResult
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from castore_pydantic.testing.contracts import make_adapter_state_machine


async def make_adapter() -> InMemoryEventStorageAdapter:
    """A fresh adapter per example: the cheapest reset there is."""
    return InMemoryEventStorageAdapter()


InMemoryStateMachine = make_adapter_state_machine(make_adapter, name="InMemoryStateMachine")


class TestInMemoryStateful(InMemoryStateMachine.TestCase):  # type: ignore[name-defined,misc]
    """Random pushes, groups, reads and listings agree with the model."""

    settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


# -- negative controls: adapters with a known bug must make the machine fail -----------------


class _ExclusiveBounds(InMemoryEventStorageAdapter):
    """Treats listing bounds as exclusive (Castore's Postgres adapter does, B88)."""

    async def list_aggregate_ids(self, context: Any, **options: Any) -> ListAggregateIdsResult:
        result = await super().list_aggregate_ids(context, **options)
        bounds = {options.get("initial_event_after"), options.get("initial_event_before")}
        kept = [e for e in result.aggregate_ids if e.initial_event_timestamp not in bounds]
        return ListAggregateIdsResult(kept, result.next_page_token)


class _SharedNamespace(InMemoryEventStorageAdapter):
    """Keys events by aggregate id only, like Castore's in-memory adapter (B70)."""

    def __init__(self) -> None:
        super().__init__()
        self._stores = _OneNamespace()


class _OneNamespace(dict[str, Any]):
    def get(self, key: str, default: Any = None) -> Any:
        return super().setdefault("shared", {})

    def setdefault(self, key: str, default: Any = None) -> Any:
        return super().setdefault("shared", {})


class _NonAtomicGroup(InMemoryEventStorageAdapter):
    """Writes group members one by one, leaving earlier ones behind on a conflict."""

    async def push_event_group(
        self, grouped_events: Sequence[GroupedEvent], *, force: bool = False
    ) -> list[Event]:
        stored = []
        for grouped in grouped_events:
            assert grouped.context is not None
            stored.append(await self.push_event(grouped.event, grouped.context, force=force))
        return stored


class _LimitBeforeReverse(InMemoryEventStorageAdapter):
    """Cuts to ``limit`` before reversing, so it returns the oldest events reversed."""

    async def get_events(
        self,
        aggregate_id: str,
        context: Any,
        *,
        min_version: int | None = None,
        max_version: int | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[Event]:
        events = await super().get_events(
            aggregate_id, context, min_version=min_version, max_version=max_version, limit=limit
        )
        return events[::-1] if reverse else events


@pytest.mark.parametrize(
    "broken", [_ExclusiveBounds, _SharedNamespace, _NonAtomicGroup, _LimitBeforeReverse]
)
def test_machine_catches_a_broken_adapter(broken: type[InMemoryEventStorageAdapter]) -> None:
    """Each deliberately broken adapter makes the state machine fail."""

    async def make() -> InMemoryEventStorageAdapter:
        return broken()

    machine = make_adapter_state_machine(make, name=f"Broken{broken.__name__}")
    # The run stops at the first failure; the budget is generous because Hypothesis also
    # draws constants from the modules loaded so far, so which examples come first depends
    # on what else the process imported.
    quick = settings(
        max_examples=2000,
        stateful_step_count=50,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
    )
    with pytest.raises(AssertionError):
        run_state_machine_as_test(machine, settings=quick)
