"""A Hypothesis state machine that checks any storage adapter against a plain model.

The machine drives an ``EventStorageAdapter`` through two ``EventStore``s that share it, with
random pushes (some conflicting, some forced), event groups, reads with random options and
paged listings, and compares every result, errors included, with what a few dicts say it
should be. Hypothesis shrinks a failure to a short program of calls.

Given a second factory (``peer_factory``, or an override of ``make_peer_adapter``) whose
adapters share the first one's storage (a database file or server), the members of event
groups are spread over two adapter instances, so that a group is checked to be one
transaction across instances too.

Use it from a test module::

    from castore_pydantic.testing.contracts import make_adapter_state_machine

    async def make_adapter():
        return MyAdapter(...)

    TestMyAdapterStateful = make_adapter_state_machine(make_adapter).TestCase
    TestMyAdapterStateful.settings = settings(max_examples=200, stateful_step_count=50,
                                              deadline=None)

or subclass :class:`EventStorageAdapterStateMachine` and override ``make_adapter``. Every
example gets a new adapter from the factory (closed again at its end) and fresh event store
ids, so examples never see each other's data even when all adapters share one database.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule
from pydantic import BaseModel, ConfigDict

from castore_pydantic._aggregate import Aggregate
from castore_pydantic._event import Event
from castore_pydantic._event_store import EventStore
from castore_pydantic._types import (
    AggregateIdEntry,
    EventStorageAdapter,
    ListAggregateIdsResult,
)
from castore_pydantic.errors import EventAlreadyExistsError, InvalidPageTokenError
from castore_pydantic.testing.contracts._storage import AdapterFactory

__all__ = ["EventStorageAdapterStateMachine", "make_adapter_state_machine"]

T = TypeVar("T")


class NotePayload(BaseModel):
    """Payload of ``NOTE_TAKEN``: a number and a text that may hold any character."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int
    text: str


class NoteTaken(Event):
    """An event with a payload and, sometimes, metadata."""

    type: Literal["NOTE_TAKEN"] = "NOTE_TAKEN"
    payload: NotePayload
    metadata: dict[str, str] | None = None


class NotesCleared(Event):
    """An event with neither payload nor metadata."""

    type: Literal["NOTES_CLEARED"] = "NOTES_CLEARED"


class Tally(Aggregate):
    """How many events an aggregate has seen."""

    count: int


def reduce_tally(tally: Tally | None, event: NoteTaken | NotesCleared) -> Tally:
    """Count events."""
    count = 1 if tally is None else tally.count + 1
    return Tally(aggregate_id=event.aggregate_id, version=event.version, count=count)


# -- strategies -------------------------------------------------------------------------------

_BASE = datetime(2024, 1, 1, tzinfo=UTC)
_STORES = st.integers(0, 1)
# Ids that differ only in case, sort differently in code points and collations, or carry
# characters that quoting, LIKE patterns or JSON could mishandle.
_IDS = ("a", "B", "b", "é", "x'y%_\\\"z")
_AGGREGATE_IDS = st.sampled_from(_IDS)


def _to_millis(value: datetime) -> datetime:
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


# A handful of instants a millisecond apart make equal timestamps (ties) common; arbitrary
# instants check that every timestamp round-trips exactly.
_INSTANTS = st.integers(0, 3).map(lambda ms: _BASE + timedelta(milliseconds=ms))
_TIMESTAMPS = st.one_of(
    _INSTANTS,
    st.datetimes(
        min_value=datetime(2000, 1, 1),
        max_value=datetime(2099, 12, 31),
        timezones=st.just(UTC),
    ).map(_to_millis),
)
_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
_LIMITS = st.none() | st.integers(0, 3)
_VERSION_BOUNDS = st.none() | st.integers(1, 5)
# "next" is the usual case (and what failures shrink to); "taken" picks an existing version
# (a conflict, or an overwrite when forced); "gap" skips a version.
_VERSION_CHOICES = st.sampled_from(("next", "next", "next", "taken", "gap"))
_FORCE = st.integers(0, 4).map(lambda n: n == 4)


@dataclass(frozen=True)
class EventBody:
    """Everything about a generated event except its aggregate id and version."""

    kind: Literal["note", "cleared"]
    timestamp: datetime
    n: int = 0
    text: str = ""
    metadata: dict[str, str] | None = None

    def make(self, aggregate_id: str, version: int) -> NoteTaken | NotesCleared:
        """Build the event."""
        if self.kind == "cleared":
            return NotesCleared(
                aggregate_id=aggregate_id, version=version, timestamp=self.timestamp
            )
        return NoteTaken(
            aggregate_id=aggregate_id,
            version=version,
            timestamp=self.timestamp,
            payload=NotePayload(n=self.n, text=self.text),
            metadata=self.metadata,
        )


_BODIES = st.builds(
    EventBody,
    kind=st.sampled_from(("note", "cleared")),
    timestamp=_TIMESTAMPS,
    n=st.integers(-(2**53), 2**53),
    text=_TEXT,
    metadata=st.none() | st.dictionaries(_TEXT, _TEXT, max_size=2),
)
# Which adapter instance a group member is written through (when there are two).
_INSTANCES = st.integers(0, 1)
_MEMBERS = st.lists(
    st.tuples(_STORES, _AGGREGATE_IDS, _VERSION_CHOICES, st.integers(0, 9), _BODIES, _INSTANCES),
    min_size=1,
    max_size=4,
)
_MALFORMED_TOKENS = st.sampled_from(
    (
        "",
        "not json",
        "[]",
        '{"limit": 2}',
        '{"lastEvaluatedKey": 3}',
        '{"lastEvaluatedKey": {"aggregateId": "a", "initialEventTimestamp": "yesterday"}}',
    )
)


@dataclass(frozen=True)
class _Override:
    """Options given next to a page token; ``None`` keeps the token's."""

    limit: int | None = None
    after: datetime | None = None
    before: datetime | None = None
    reverse: bool | None = None


_OVERRIDES = st.builds(
    _Override,
    limit=st.none() | st.integers(1, 3),
    after=st.none() | _INSTANTS,
    before=st.none() | _INSTANTS,
    reverse=st.none() | st.booleans(),
)


@dataclass
class _OpenListing:
    """The effective options of a listing, and where its next page starts."""

    store: int
    limit: int | None
    after: datetime | None
    before: datetime | None
    reverse: bool
    token: str | None = None
    cursor: AggregateIdEntry | None = None

    def override(self, given: _Override) -> None:
        """Take the options given next to the token (the next token carries them)."""
        self.limit = self.limit if given.limit is None else given.limit
        self.after = self.after if given.after is None else given.after
        self.before = self.before if given.before is None else given.before
        self.reverse = self.reverse if given.reverse is None else given.reverse


class EventStorageAdapterStateMachine(RuleBasedStateMachine):
    """Random operations on a storage adapter, each checked against an in-memory model.

    Override :meth:`make_adapter` (or use :func:`make_adapter_state_machine`). The machine
    owns an event loop for its whole run: rules are synchronous and drive the adapter with
    ``loop.run_until_complete``; ``teardown`` closes the adapter and then the loop. Run it
    from a synchronous test (its ``TestCase``, or ``run_state_machine_as_test`` in a plain
    ``def`` test), not from inside a running event loop.

    What is checked, on two event stores sharing the adapter (so isolation by event store id
    is checked on every read): pushed and grouped events come back exactly (types, payloads,
    metadata, millisecond timestamps); a taken version raises ``EventAlreadyExistsError``
    naming it and writes nothing, also when it is one member of a group; ``force=True``
    overwrites; ``get_events`` honours inclusive version bounds, ``limit`` (``0`` gives none)
    and ``reverse``; ``list_aggregate_ids`` orders by ``(initial event timestamp, aggregate id)``
    in code point order, honours inclusive bounds, ``limit``, ``reverse`` and explicit options
    next to a page token (a limit, bounds, a direction: they override the token's from its
    cursor on), sets ``next_page_token`` exactly when more aggregates remain, and a listing
    continued after later writes returns what comes after its cursor; a malformed token
    raises ``InvalidPageTokenError``. Groups are written through two adapter instances when
    ``make_peer_adapter`` gives a second one (see the module's documentation).
    """

    def __init__(self) -> None:
        super().__init__()
        self._loop = asyncio.new_event_loop()
        self._adapter: EventStorageAdapter | None = None
        try:
            adapter = self._run(self.make_adapter())
            self._adapter = self._run(adapter.__aenter__())
        except BaseException:
            self._close_loop()
            raise
        run = uuid.uuid4().hex[:12]
        self.stores: tuple[EventStore[Tally, NoteTaken | NotesCleared], ...] = tuple(
            self._twin(f"SM{run}{name}", self._adapter) for name in ("A", "B")
        )
        # The same stores through a second adapter instance, once a group needs them.
        self._peer: EventStorageAdapter | None = None
        self._peer_stores: tuple[EventStore[Tally, NoteTaken | NotesCleared], ...] | None = None
        self._run_id = run
        # (store index, aggregate id) -> version -> event
        self.model: dict[tuple[int, str], dict[int, Event]] = {}
        self.open_listing: _OpenListing | None = None

    async def make_adapter(self) -> EventStorageAdapter:
        """Return the adapter for one example; called once per example.

        The adapter may share its backing storage with earlier examples: each example uses
        event store ids of its own.
        """
        raise NotImplementedError(
            "override make_adapter() or build the machine with make_adapter_state_machine()"
        )

    def teardown(self) -> None:
        """Close the adapters, then the event loop."""
        try:
            for adapter in (self._peer, self._adapter):
                if adapter is not None:
                    self._run(adapter.aclose())
        finally:
            self._close_loop()

    # -- plumbing ------------------------------------------------------------------------------

    def _run(self, awaitable: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(awaitable)

    def _close_loop(self) -> None:
        loop = self._loop
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    def _store_id(self, store: int) -> str:
        return self.stores[store].event_store_id

    async def make_peer_adapter(self) -> EventStorageAdapter | None:
        """Return a second adapter on the same storage as ``make_adapter``'s, or ``None``.

        Called at most once per example, when a group first needs it; with an adapter,
        groups spread their events over the two instances. The default gives ``None``:
        groups use one instance.
        """
        return None

    def _group_stores(
        self,
    ) -> tuple[tuple[EventStore[Tally, NoteTaken | NotesCleared], ...], ...]:
        """The stores through each adapter instance a group may use."""
        if self._peer_stores is None:
            made = self._run(self.make_peer_adapter())
            if made is None:
                self._peer_stores = self.stores
            else:
                peer = self._peer = self._run(made.__aenter__())
                probe = f"SM{self._run_id}P"
                pushed = self._run(
                    self._twin(probe, self._adapter).push_event(
                        NotesCleared(aggregate_id="probe", version=1)
                    )
                )
                seen = self._run(self._twin(probe, peer).get_events("probe")).events
                assert seen == [pushed.event], (
                    "make_peer_adapter's adapter does not read what make_adapter's wrote:"
                    " the two must share their storage"
                )
                self._peer_stores = tuple(
                    self._twin(store.event_store_id, peer) for store in self.stores
                )
        if self._peer_stores is self.stores:
            return (self.stores,)
        return (self.stores, self._peer_stores)

    @staticmethod
    def _twin(
        event_store_id: str, adapter: EventStorageAdapter | None
    ) -> EventStore[Tally, NoteTaken | NotesCleared]:
        """A tally store with this id on ``adapter``."""
        return EventStore(
            event_store_id=event_store_id,
            event_types=[NoteTaken, NotesCleared],
            reducer=reduce_tally,
            event_storage_adapter=adapter,
        )

    def _next_version(
        self, key: tuple[int, str], choice: str, pick: int, planned: Iterable[int] = ()
    ) -> int:
        versions = sorted(set(self.model.get(key, {})) | set(planned))
        top = versions[-1] if versions else 0
        if choice == "taken" and versions:
            return versions[pick % len(versions)]
        if choice == "gap":
            return top + 2
        return top + 1

    def _expect_conflict(
        self, call: Coroutine[Any, Any, Any], conflicts: set[tuple[str, str, int]]
    ) -> None:
        try:
            self._run(call)
        except EventAlreadyExistsError as exc:
            got = (exc.event_store_id, exc.aggregate_id, exc.version)
            assert got in conflicts, (
                f"EventAlreadyExistsError names {got}, expected one of {conflicts}"
            )
        else:
            raise AssertionError(f"expected EventAlreadyExistsError for one of {conflicts}")

    def _expect_written(self, call: Coroutine[Any, Any, T]) -> T:
        """Run a write the model says succeeds; a conflict there is the adapter's fault."""
        try:
            return self._run(call)
        except EventAlreadyExistsError as exc:
            got = (exc.event_store_id, exc.aggregate_id, exc.version)
            raise AssertionError(
                f"EventAlreadyExistsError names {got}, which the model does not hold (did a "
                "write that failed leave it stored?)"
            ) from exc

    def _expected_listing(
        self,
        store: int,
        after: datetime | None,
        before: datetime | None,
        reverse: bool,
        cursor: AggregateIdEntry | None = None,
    ) -> list[AggregateIdEntry]:
        entries = []
        for (index, aggregate_id), events in self.model.items():
            first = events.get(1)
            if index != store or first is None or first.timestamp is None:
                continue
            ts = first.timestamp
            if (after is not None and ts < after) or (before is not None and ts > before):
                continue
            entries.append(AggregateIdEntry(aggregate_id, ts))
        entries.sort(key=lambda e: (e.initial_event_timestamp, e.aggregate_id), reverse=reverse)
        if cursor is None:
            return entries
        key = (cursor.initial_event_timestamp, cursor.aggregate_id)

        def past_cursor(entry: AggregateIdEntry) -> bool:
            entry_key = (entry.initial_event_timestamp, entry.aggregate_id)
            return entry_key < key if reverse else entry_key > key

        return [entry for entry in entries if past_cursor(entry)]

    @staticmethod
    def _check_page(
        got: list[AggregateIdEntry],
        token: str | None,
        remaining: list[AggregateIdEntry],
        limit: int | None,
    ) -> bool:
        """Compare one page with the model; return whether more pages should follow."""
        expected = remaining if limit is None else remaining[:limit]
        more = limit is not None and limit > 0 and len(remaining) > limit
        assert got == expected, f"listed {got}, expected {expected}"
        assert (token is not None) == more, (
            f"next_page_token is {token!r} but {len(remaining) - len(expected)} aggregates remain"
        )
        return more

    # -- writes ----------------------------------------------------------------------------------

    @rule(
        store=_STORES,
        aggregate_id=_AGGREGATE_IDS,
        choice=_VERSION_CHOICES,
        pick=st.integers(0, 9),
        body=_BODIES,
        force=_FORCE,
    )
    def push_event(
        self, *, store: int, aggregate_id: str, choice: str, pick: int, body: EventBody, force: bool
    ) -> None:
        """Push one event; a taken version conflicts unless forced."""
        key = (store, aggregate_id)
        version = self._next_version(key, choice, pick)
        event = body.make(aggregate_id, version)
        stored = self.model.setdefault(key, {})
        if version in stored and not force:
            conflict = (self._store_id(store), aggregate_id, version)
            self._expect_conflict(self.stores[store].push_event(event), {conflict})
            return
        result = self._expect_written(self.stores[store].push_event(event, force=force))
        assert result.event == event, f"push returned {result.event!r}, pushed {event!r}"
        stored[version] = event

    @rule(members=_MEMBERS, force=_FORCE)
    def push_event_group(
        self, *, members: list[tuple[int, str, str, int, EventBody, int]], force: bool
    ) -> None:
        """Push a group across both stores; any taken version fails the whole group.

        When two adapter instances share the storage, members go through either.
        """
        instances = self._group_stores()
        planned: dict[tuple[int, str], set[int]] = {}
        events: list[tuple[int, NoteTaken | NotesCleared]] = []
        grouped = []
        conflicts: set[tuple[str, str, int]] = set()
        for store, aggregate_id, choice, pick, body, instance in members:
            key = (store, aggregate_id)
            in_group = planned.setdefault(key, set())
            version = self._next_version(key, choice, pick, in_group)
            if force and version in in_group:
                # Two events for one version in one forced group have no defined winner.
                version = self._next_version(key, "next", pick, in_group)
            taken = version in self.model.get(key, {}) or version in in_group
            if taken and not force:
                conflicts.add((self._store_id(store), aggregate_id, version))
            in_group.add(version)
            event = body.make(aggregate_id, version)
            events.append((store, event))
            grouped.append(instances[instance % len(instances)][store].group_event(event))
        if conflicts:
            self._expect_conflict(EventStore.push_event_group(*grouped), conflicts)
            return
        result = self._expect_written(EventStore.push_event_group(*grouped, force=force))
        got = [pushed.event for pushed in result.event_group]
        assert got == [event for _, event in events], f"group returned {got}"
        for store, event in events:
            self.model.setdefault((store, event.aggregate_id), {})[event.version] = event

    # -- reads -----------------------------------------------------------------------------------

    @rule(
        store=_STORES,
        aggregate_id=_AGGREGATE_IDS,
        min_version=_VERSION_BOUNDS,
        max_version=_VERSION_BOUNDS,
        limit=_LIMITS,
        reverse=st.booleans(),
    )
    def get_events(
        self,
        *,
        store: int,
        aggregate_id: str,
        min_version: int | None,
        max_version: int | None,
        limit: int | None,
        reverse: bool,
    ) -> None:
        """Read an aggregate's events with random options."""
        stored = self.model.get((store, aggregate_id), {})
        expected = [
            stored[v]
            for v in sorted(stored, reverse=reverse)
            if (min_version is None or v >= min_version)
            and (max_version is None or v <= max_version)
        ]
        if limit is not None:
            expected = expected[:limit]
        result = self._run(
            self.stores[store].get_events(
                aggregate_id,
                min_version=min_version,
                max_version=max_version,
                limit=limit,
                reverse=reverse,
            )
        )
        assert result.events == expected, f"got {result.events}, expected {expected}"

    @rule()
    def read_everything(self) -> None:
        """Every aggregate of both stores holds exactly the model's events."""
        for store in (0, 1):
            for aggregate_id in _IDS:
                stored = self.model.get((store, aggregate_id), {})
                expected = [stored[v] for v in sorted(stored)]
                got = self._run(self.stores[store].get_events(aggregate_id)).events
                assert got == expected, f"{self._store_id(store)}/{aggregate_id}: {got}"

    def _next_page(
        self, listing: _OpenListing, given: _Override
    ) -> tuple[ListAggregateIdsResult, list[AggregateIdEntry]]:
        """Fetch the page after ``listing``'s cursor with ``given`` next to its token.

        Returns the page and what the model says remains of the listing from that cursor.
        """
        assert listing.token is not None
        listing.override(given)
        remaining = self._expected_listing(
            listing.store, listing.after, listing.before, listing.reverse, listing.cursor
        )
        result = self._run(
            self.stores[listing.store].list_aggregate_ids(
                page_token=listing.token,
                limit=given.limit,
                initial_event_after=given.after,
                initial_event_before=given.before,
                reverse=given.reverse,
            )
        )
        return result, remaining

    @rule(
        store=_STORES,
        limit=_LIMITS,
        after=st.none() | _INSTANTS,
        before=st.none() | _INSTANTS,
        reverse=st.none() | st.booleans(),
        overrides=st.lists(_OVERRIDES, max_size=4),
    )
    def list_to_the_end(
        self,
        *,
        store: int,
        limit: int | None,
        after: datetime | None,
        before: datetime | None,
        reverse: bool | None,
        overrides: list[_Override],
    ) -> None:
        """List page by page until no token is left.

        Later pages may give options next to the token (a limit, bounds, a direction),
        which then hold for the pages after them.
        """
        listing = _OpenListing(store, limit, after, before, bool(reverse))
        remaining = self._expected_listing(store, after, before, bool(reverse))
        result = self._run(
            self.stores[store].list_aggregate_ids(
                limit=limit, initial_event_after=after, initial_event_before=before, reverse=reverse
            )
        )
        page = 0
        # Ends: once the overrides are used up, every page moves on in one direction.
        while self._check_page(
            result.aggregate_ids, result.next_page_token, remaining, listing.limit
        ):
            listing.token = result.next_page_token
            listing.cursor = result.aggregate_ids[-1]
            given = overrides[page] if page < len(overrides) else _Override()
            page += 1
            result, remaining = self._next_page(listing, given)

    @rule(
        store=_STORES,
        limit=st.integers(1, 2),
        after=st.none() | _INSTANTS,
        before=st.none() | _INSTANTS,
        reverse=st.booleans(),
    )
    def start_listing(
        self,
        *,
        store: int,
        limit: int,
        after: datetime | None,
        before: datetime | None,
        reverse: bool,
    ) -> None:
        """List a first page and keep its token for a later step."""
        remaining = self._expected_listing(store, after, before, reverse)
        result = self._run(
            self.stores[store].list_aggregate_ids(
                limit=limit, initial_event_after=after, initial_event_before=before, reverse=reverse
            )
        )
        more = self._check_page(result.aggregate_ids, result.next_page_token, remaining, limit)
        self.open_listing = None
        if more and result.next_page_token is not None:
            self.open_listing = _OpenListing(
                store,
                limit,
                after,
                before,
                reverse,
                result.next_page_token,
                result.aggregate_ids[-1],
            )

    @precondition(lambda self: self.open_listing is not None)
    @rule(given=st.just(_Override()) | _OVERRIDES)
    def continue_listing(self, *, given: _Override) -> None:
        """Fetch the next page of an open listing, after whatever was written meanwhile.

        Options may be given next to its token; they hold for the pages after.
        """
        listing = self.open_listing
        assert listing is not None
        result, remaining = self._next_page(listing, given)
        more = self._check_page(
            result.aggregate_ids, result.next_page_token, remaining, listing.limit
        )
        if more and result.next_page_token is not None:
            listing.token = result.next_page_token
            listing.cursor = result.aggregate_ids[-1]
        else:
            self.open_listing = None

    @rule(store=_STORES, token=_MALFORMED_TOKENS)
    def list_with_malformed_token(self, *, store: int, token: str) -> None:
        """A page token this library did not produce is refused."""
        try:
            self._run(self.stores[store].list_aggregate_ids(page_token=token))
        except InvalidPageTokenError:
            return
        raise AssertionError(f"page token {token!r} was accepted")


def make_adapter_state_machine(
    adapter_factory: AdapterFactory,
    *,
    peer_factory: AdapterFactory | None = None,
    name: str | None = None,
) -> type[EventStorageAdapterStateMachine]:
    """Build a state machine class that checks the adapters ``adapter_factory`` makes.

    Args:
        adapter_factory: ``async () -> adapter``, called once per example inside the
            machine's event loop; the machine closes the adapter when the example ends.
        peer_factory: ``async () -> adapter`` on the same storage (often the same
            factory): groups then spread over two instances (``make_peer_adapter``).
        name: The class name shown in Hypothesis' reports.

    Returns:
        A ``RuleBasedStateMachine`` subclass; run it with its ``TestCase`` attribute or
        ``hypothesis.stateful.run_state_machine_as_test``.
    """

    class AdapterStateMachine(EventStorageAdapterStateMachine):
        async def make_adapter(self) -> EventStorageAdapter:
            return await adapter_factory()

        async def make_peer_adapter(self) -> EventStorageAdapter | None:
            return None if peer_factory is None else await peer_factory()

    if name is not None:
        AdapterStateMachine.__name__ = AdapterStateMachine.__qualname__ = name
    return AdapterStateMachine
