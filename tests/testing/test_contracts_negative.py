"""The public storage contracts fail adapters that break the design, not only pass good ones.

Each adapter here is the in-memory adapter with one deliberate bug. Their instances share
one backing dict, as instances of a database adapter share their database, so that the
contracts can check what spans adapter instances.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from castore_pydantic import Event, GroupedEvent, ListAggregateIdsResult
from castore_pydantic._paging import ListingOptions
from castore_pydantic.errors import EventGroupError
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from castore_pydantic.testing.contracts import make_adapter_state_machine

pytest_plugins = ["pytester"]


class SharedMemory(InMemoryEventStorageAdapter):
    """In-memory adapters over one backing dict, like adapters on one database."""

    def __init__(self, backing: dict[str, Any]) -> None:
        super().__init__()
        self._stores = backing


class GroupPerInstance(SharedMemory):
    """Commits a group one adapter instance at a time: a conflict met in a later
    instance's part leaves the earlier parts stored (DESIGN §3: all or nothing)."""

    async def push_event_group(
        self, grouped_events: Sequence[GroupedEvent], *, force: bool = False
    ) -> list[Event]:
        if not all(
            isinstance(grouped.event_storage_adapter, InMemoryEventStorageAdapter)
            for grouped in grouped_events
        ):  # other kinds are still refused before anything is written
            raise EventGroupError("a group takes in-memory adapters only")
        parts: dict[int, list[GroupedEvent]] = {}
        for grouped in grouped_events:
            parts.setdefault(id(grouped.event_storage_adapter), []).append(grouped)
        written: dict[int, Event] = {}
        for part in parts.values():
            events = await super().push_event_group(part, force=force)
            written.update(
                {id(grouped): event for grouped, event in zip(part, events, strict=True)}
            )
        return [written[id(grouped)] for grouped in grouped_events]


class TokenOverridesExplicit(SharedMemory):
    """Next to a page token, uses the token's bounds and direction instead of those given
    (DESIGN §6.4: explicit options override the token's); an explicit limit still wins."""

    async def list_aggregate_ids(
        self,
        context: Any,
        *,
        limit: int | None = None,
        page_token: str | None = None,
        initial_event_after: datetime | None = None,
        initial_event_before: datetime | None = None,
        reverse: bool | None = None,
    ) -> ListAggregateIdsResult:
        if page_token is not None:
            ListingOptions.resolve(  # what is given is still checked (a naive bound)...
                initial_event_after=initial_event_after,
                initial_event_before=initial_event_before,
                reverse=reverse,
            )
            initial_event_after = initial_event_before = reverse = None  # ...then dropped
        return await super().list_aggregate_ids(
            context,
            limit=limit,
            page_token=page_token,
            initial_event_after=initial_event_after,
            initial_event_before=initial_event_before,
            reverse=reverse,
        )


# -- the example-based contract, run as an adapter author runs it -------------------------------

_SUITE = """
import pytest_asyncio

from castore_pydantic.testing.contracts import EventStorageAdapterContract
from tests.testing.test_contracts_negative import {name}


class TestBroken(EventStorageAdapterContract):
    @pytest_asyncio.fixture
    async def adapter_factory(self):
        backing = {{}}

        async def make():
            return {name}(backing)

        yield make
"""


@pytest.mark.parametrize(
    ("broken", "caught_by"),
    [
        (
            GroupPerInstance,
            {"test_group_across_adapter_instances_with_a_conflict_writes_nothing[1]"},
        ),
        (
            TokenOverridesExplicit,
            {
                "test_explicit_bounds_override_the_tokens",
                "test_explicit_reverse_overrides_the_tokens",
            },
        ),
    ],
    ids=["group per instance", "token overrides explicit options"],
)
def test_example_contract_fails_a_broken_adapter(
    pytester: pytest.Pytester, broken: type[SharedMemory], caught_by: set[str]
) -> None:
    """The storage contract fails the adapter in the tests named, and only there. (Both
    adapters used to pass every test of the contract.)"""
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_broken=textwrap.dedent(_SUITE.format(name=broken.__name__)))
    recorded = pytester.inline_run("-p", "no:cacheprovider", "-q")
    failed = {report.nodeid.rpartition("::")[2] for report in recorded.getfailures()}
    passed, _, _ = recorded.listoutcomes()
    assert failed == caught_by
    assert len(passed) > 40  # the rest of the suite ran and passed


# -- the state machine ----------------------------------------------------------------------------

_BACKING: dict[str, Any] = {}


@pytest.mark.parametrize(
    ("make", "peers"),
    [
        # One backing for every example and both instances of one (examples use fresh ids).
        (lambda: GroupPerInstance(_BACKING), True),
        # A new backing per example: one instance, the listing overrides catch it.
        (lambda: TokenOverridesExplicit({}), False),
    ],
    ids=["group per instance", "token overrides explicit options"],
)
def test_state_machine_fails_a_broken_adapter(
    make: Callable[[], SharedMemory], peers: bool
) -> None:
    """The state machine fails each adapter. (Both used to pass 200 examples of 50 steps.)"""

    async def factory() -> SharedMemory:
        return make()

    machine = make_adapter_state_machine(
        factory, peer_factory=factory if peers else None, name="BrokenAdapterMachine"
    )
    quick = settings(
        max_examples=2000,
        stateful_step_count=50,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
    )
    with pytest.raises(AssertionError) as failed:
        run_state_machine_as_test(machine, settings=quick)
    assert "must share their storage" not in str(failed.value)
