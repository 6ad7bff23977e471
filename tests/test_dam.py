from __future__ import annotations

import asyncio
import dataclasses
import math
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from castore_pydantic import AggregateIdEntry, Event, EventStore, GetEventsResult, dam
from castore_pydantic.dam import (
    PourProgress,
    ScanInfo,
    pour_aggregate_events,
    pour_event_store_aggregate_ids,
    pour_event_store_collection_events,
    pour_event_store_events,
)
from castore_pydantic.errors import MessageChannelEventStoreNotFoundError
from castore_pydantic.messaging import (
    AggregateExistsMessage,
    MessageContext,
    NotificationMessage,
    NotificationMessageBus,
)
from castore_pydantic.messaging.memory import InMemoryMessageBusAdapter
from tests.domain import Appeared, PokemonAppeared, PokemonCaught, PokemonLeveledUp, make_store


class Recorder:
    """A message channel that records what it is given and when (loop clock)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.replays: list[bool] = []
        self.times: list[float] = []

    async def publish_message(self, message: Any, *, replay: bool = False) -> None:
        self.times.append(asyncio.get_running_loop().time())
        self.messages.append(message)
        self.replays.append(replay)

    def events(self) -> list[tuple[str, str, int]]:
        """(store id, aggregate id, version) of every recorded notification."""
        return [(m.event_store_id, m.event.aggregate_id, m.event.version) for m in self.messages]


def at(day: int, ms: int = 0) -> datetime:
    return datetime(2024, 1, day, tzinfo=UTC) + timedelta(milliseconds=ms)


def appeared(aggregate_id: str, ts: datetime) -> PokemonAppeared:
    payload = Appeared(name=aggregate_id.title(), level=1)
    return PokemonAppeared(aggregate_id=aggregate_id, version=1, timestamp=ts, payload=payload)


def leveled(aggregate_id: str, version: int, ts: datetime) -> PokemonLeveledUp:
    return PokemonLeveledUp(aggregate_id=aggregate_id, version=version, timestamp=ts)


async def seeded(events: Sequence[Any], event_store_id: str = "POKEMONS") -> EventStore[Any, Any]:
    store = make_store(event_store_id=event_store_id)
    for event in events:
        await store.push_event(event)
    return store


# Six events interleaved across three aggregates (B112's shape).
INTERLEAVED = [
    appeared("pikachu", at(1)),
    appeared("eevee", at(2)),
    leveled("pikachu", 2, at(3)),
    appeared("snorlax", at(4)),
    leveled("eevee", 2, at(5)),
    leveled("pikachu", 3, at(6)),
]


class TestPourAggregateEvents:
    """``pour_aggregate_events`` replays one aggregate."""

    async def test_pours_in_version_order_with_replay(self) -> None:
        """Each event becomes a NotificationMessage published with replay=True (B109)."""
        store = await seeded(INTERLEAVED)
        channel = Recorder()
        result = await pour_aggregate_events(
            event_store=store, message_channel=channel, aggregate_id="pikachu"
        )
        assert all(isinstance(m, NotificationMessage) for m in channel.messages)
        assert channel.events() == [("POKEMONS", "pikachu", v) for v in (1, 2, 3)]
        assert channel.replays == [True, True, True]
        assert result.poured_event_count == 3
        assert result.first_poured_event == INTERLEAVED[0]
        assert result.last_poured_event == INTERLEAVED[5]

    async def test_nothing_poured(self) -> None:
        """An unknown aggregate pours nothing; first and last are None (B109)."""
        channel = Recorder()
        result = await pour_aggregate_events(
            event_store=await seeded(INTERLEAVED), message_channel=channel, aggregate_id="mew"
        )
        assert result == dam.PourAggregateEventsResult(0, None, None)
        assert channel.messages == []

    async def test_filters_are_inclusive(self) -> None:
        """Only events inside the inclusive from/to range are poured (B110)."""
        events = [appeared("p", at(1)), *(leveled("p", v, at(v)) for v in range(2, 6))]
        channel = Recorder()
        result = await pour_aggregate_events(
            event_store=await seeded(events),
            message_channel=channel,
            aggregate_id="p",
            filters={"from": at(2), "to": "2024-01-04T00:00:00.000Z"},
        )
        assert [v for _, _, v in channel.events()] == [2, 3, 4]
        assert result.poured_event_count == 3
        assert result.first_poured_event == events[1]
        assert result.last_poured_event == events[3]

    async def test_options_are_forwarded_to_get_events(self) -> None:
        """``options`` reach ``get_events`` as given: reverse and limit apply (B110)."""
        channel = Recorder()
        await pour_aggregate_events(
            event_store=await seeded(INTERLEAVED),
            message_channel=channel,
            aggregate_id="pikachu",
            options={"reverse": True, "limit": 2},
        )
        assert [v for _, _, v in channel.events()] == [3, 2]

    @pytest.mark.parametrize(
        ("filters", "error"),
        [
            ({"from": datetime(2024, 1, 1)}, ValueError),
            ({"since": at(1)}, ValueError),
            ({"to": "yesterday"}, ValueError),
            ({"to": 3}, TypeError),
            ({"from": at(3), "to": at(1)}, ValueError),  # reversed: nothing could be poured
        ],
    )
    async def test_bad_filters_are_refused(self, filters: Any, error: type[Exception]) -> None:
        """Naive, unparseable or misspelt filters raise before anything is published."""
        channel = Recorder()
        with pytest.raises(error):
            await pour_aggregate_events(
                event_store=await seeded(INTERLEAVED),
                message_channel=channel,
                aggregate_id="pikachu",
                filters=filters,
            )
        assert channel.messages == []


async def test_a_store_the_channel_does_not_carry_is_refused_before_publishing() -> None:
    """A pour over several stores checks every store against the channel's sources first:
    a missing one used to fail mid-pour, after part of the history was published."""
    pokemons = await seeded(INTERLEAVED)
    trainers = await seeded([appeared("ash", at(1))], "TRAINERS")
    bus = NotificationMessageBus(message_bus_id="only-pokemons", source_event_stores=[pokemons])
    adapter = InMemoryMessageBusAdapter.attach_to(bus)
    seen: list[Any] = []

    async def listener(message: Any, context: Any) -> None:
        seen.append(message)

    adapter.on({}, listener)
    with pytest.raises(MessageChannelEventStoreNotFoundError):
        await pour_event_store_collection_events(
            event_stores=[pokemons, trainers], message_channel=bus
        )
    with pytest.raises(MessageChannelEventStoreNotFoundError):
        await pour_event_store_events(event_store=trainers, message_channel=bus)
    with pytest.raises(MessageChannelEventStoreNotFoundError):
        await pour_aggregate_events(event_store=trainers, message_channel=bus, aggregate_id="ash")
    await adapter.join()
    assert seen == []
    await adapter.aclose()


async def test_an_aggregate_without_version_one_is_poured_once_even_if_it_gets_one() -> None:
    """An aggregate poured for lacking a version-1 event is not poured again when listing
    finds it, because its version 1 was written during the pour (it used to be)."""
    store = await seeded([appeared(f"a{i:03}", at(1, i)) for i in range(150)])
    await store.push_event(leveled("late", 2, at(3)))

    class WritesMeanwhile(Recorder):
        async def publish_message(self, message: Any, *, replay: bool = False) -> None:
            await super().publish_message(message, replay=replay)
            if len(self.messages) == 1:
                await store.push_event(appeared("late", at(2)))

    channel = WritesMeanwhile()
    await pour_event_store_events(event_store=store, message_channel=channel)
    keys = channel.events()
    assert len(keys) == len(set(keys))
    assert ("POKEMONS", "late", 2) in keys


class TestPourEventStoreAggregateIds:
    """``pour_event_store_aggregate_ids`` replays the list of aggregates."""

    async def test_follows_every_page(self) -> None:
        """Every aggregate is poured as an AggregateExistsMessage, pages followed (B111)."""
        channel = Recorder()
        result = await pour_event_store_aggregate_ids(
            event_store=await seeded(INTERLEAVED),
            message_channel=channel,
            options={"limit": 1},
        )
        assert all(isinstance(m, AggregateExistsMessage) for m in channel.messages)
        assert [(m.event_store_id, m.aggregate_id) for m in channel.messages] == [
            ("POKEMONS", "pikachu"),
            ("POKEMONS", "eevee"),
            ("POKEMONS", "snorlax"),
        ]
        assert [m.initial_event_timestamp for m in channel.messages] == [at(1), at(2), at(4)]
        assert channel.replays == [True] * 3
        assert result.poured_aggregate_id_count == 3
        assert result.first_scanned_aggregate == AggregateIdEntry("pikachu", at(1))
        assert result.last_scanned_aggregate == AggregateIdEntry("snorlax", at(4))

    async def test_options_are_forwarded(self) -> None:
        """Bounds and reverse reach ``list_aggregate_ids`` (B111)."""
        channel = Recorder()
        result = await pour_event_store_aggregate_ids(
            event_store=await seeded(INTERLEAVED),
            message_channel=channel,
            options={"reverse": True, "initial_event_after": at(2), "limit": 1},
        )
        assert [m.aggregate_id for m in channel.messages] == ["snorlax", "eevee"]
        assert result.first_scanned_aggregate == AggregateIdEntry("snorlax", at(4))
        assert result.last_scanned_aggregate == AggregateIdEntry("eevee", at(2))

    async def test_empty_store(self) -> None:
        """An empty store pours nothing; scan fields are None."""
        result = await pour_event_store_aggregate_ids(
            event_store=await seeded([]), message_channel=Recorder()
        )
        assert result == dam.PourEventStoreAggregateIdsResult(0, None, None)

    async def test_page_token_in_options_is_refused(self) -> None:
        """A page token makes no sense for a pour that follows every page."""
        with pytest.raises(TypeError, match="page_token"):
            await pour_event_store_aggregate_ids(
                event_store=await seeded(INTERLEAVED),
                message_channel=Recorder(),
                options={"page_token": "x"},  # type: ignore[arg-type]
            )


class TestPourEventStoreEvents:
    """``pour_event_store_events`` replays a whole store chronologically."""

    async def test_global_timestamp_order(self) -> None:
        """Events of all aggregates come out in timestamp order (B112)."""
        channel = Recorder()
        result = await pour_event_store_events(
            event_store=await seeded(INTERLEAVED), message_channel=channel
        )
        assert channel.events() == [("POKEMONS", e.aggregate_id, e.version) for e in INTERLEAVED]
        assert channel.replays == [True] * 6
        assert result.poured_event_count == 6
        assert result.first_scanned_aggregate == AggregateIdEntry("pikachu", at(1))
        assert result.last_scanned_aggregate == AggregateIdEntry("snorlax", at(4))

    async def test_inclusive_filters(self) -> None:
        """``from``/``to`` keep events on the bounds; older aggregates' later events count."""
        channel = Recorder()
        result = await pour_event_store_events(
            event_store=await seeded(INTERLEAVED),
            message_channel=channel,
            filters={"from": at(3), "to": at(5)},
        )
        assert channel.events() == [
            ("POKEMONS", "pikachu", 2),
            ("POKEMONS", "snorlax", 1),
            ("POKEMONS", "eevee", 2),
        ]
        assert result.poured_event_count == 3

    async def test_ties_by_aggregate_id_then_version(self) -> None:
        """At one timestamp, events are ordered by aggregate id, then version."""
        events = [
            appeared("b", at(1)),
            leveled("b", 2, at(1)),
            appeared("a", at(1)),
            appeared("c", at(1)),
        ]
        channel = Recorder()
        await pour_event_store_events(event_store=await seeded(events), message_channel=channel)
        assert [(a, v) for _, a, v in channel.events()] == [("a", 1), ("b", 1), ("b", 2), ("c", 1)]

    async def test_to_keeps_a_version_stamped_back_into_the_range(self) -> None:
        """A version stamped earlier than the one before it (explicit timestamps, clock
        skew, an import) is poured when it is in the range, even after one past ``to``,
        as ``pour_aggregate_events`` pours it. (The pour stopped at the first event past
        ``to`` and never delivered it.)"""
        events = [
            appeared("a", at(1)),
            leveled("a", 2, at(5)),
            leveled("a", 3, at(2)),
            appeared("b", at(3)),
        ]
        store = await seeded(events)
        channel = Recorder()
        result = await pour_event_store_events(
            event_store=store, message_channel=channel, filters={"to": at(3)}
        )
        # In version order: version 3 comes once version 2 has had its turn (skipped).
        assert [(a, v) for _, a, v in channel.events()] == [("a", 1), ("b", 1), ("a", 3)]
        assert result.poured_event_count == 3
        one = Recorder()
        await pour_aggregate_events(
            event_store=store, message_channel=one, aggregate_id="a", filters={"to": at(3)}
        )
        assert [(a, v) for _, a, v in one.events()] == [("a", 1), ("a", 3)]

    async def test_nothing_matched(self) -> None:
        """No event in range: the count is 0 but the scan still names what was listed."""
        channel = Recorder()
        result = await pour_event_store_events(
            event_store=await seeded(INTERLEAVED),
            message_channel=channel,
            filters={"from": at(20)},
        )
        assert result.poured_event_count == 0
        assert channel.messages == []
        assert result.first_scanned_aggregate == AggregateIdEntry("pikachu", at(1))

    async def test_empty_store(self) -> None:
        """An empty store gives a zero count and no scanned aggregates."""
        result = await pour_event_store_events(
            event_store=await seeded([]), message_channel=Recorder()
        )
        assert result == dam.PourEventStoreEventsResult(0, None, None)


class TestPourEventStoreCollectionEvents:
    """``pour_event_store_collection_events`` merges several stores chronologically."""

    async def test_merges_stores_chronologically(self) -> None:
        """Ten events of two stores come out in one timestamp order, with scans (B113)."""
        pokemons = await seeded(
            [appeared("pikachu", at(1)), leveled("pikachu", 2, at(4)), appeared("eevee", at(6)),
             leveled("pikachu", 3, at(8)), leveled("eevee", 2, at(10))]
        )  # fmt: skip
        trainers = await seeded(
            [appeared("ash", at(2)), appeared("misty", at(3)), leveled("ash", 2, at(5)),
             leveled("misty", 2, at(7)), leveled("ash", 3, at(9))],
            event_store_id="TRAINERS",
        )  # fmt: skip
        channel = Recorder()
        result = await pour_event_store_collection_events(
            event_stores=[pokemons, trainers], message_channel=channel
        )
        days = [m.event.timestamp.day for m in channel.messages]
        assert days == list(range(1, 11))
        assert [m.event_store_id for m in channel.messages][:3] == [
            "POKEMONS",
            "TRAINERS",
            "TRAINERS",
        ]
        assert result.poured_event_count == 10
        assert dict(result.scans) == {
            "POKEMONS": ScanInfo(
                AggregateIdEntry("pikachu", at(1)), AggregateIdEntry("eevee", at(6))
            ),
            "TRAINERS": ScanInfo(AggregateIdEntry("ash", at(2)), AggregateIdEntry("misty", at(3))),
        }

    @pytest.mark.parametrize("order", [("POKEMONS", "TRAINERS"), ("TRAINERS", "POKEMONS")])
    async def test_ties_follow_the_store_list(self, order: tuple[str, str]) -> None:
        """At equal timestamps the store listed first is poured first (not Castore's B113)."""
        stores = {
            "POKEMONS": await seeded([appeared("z", at(1))]),
            "TRAINERS": await seeded([appeared("a", at(1))], event_store_id="TRAINERS"),
        }
        channel = Recorder()
        await pour_event_store_collection_events(
            event_stores=[stores[name] for name in order], message_channel=channel
        )
        assert [m.event_store_id for m in channel.messages] == list(order)

    async def test_empty_store_has_an_empty_scan(self) -> None:
        """A store with no aggregates is in ``scans`` with None fields."""
        result = await pour_event_store_collection_events(
            event_stores=[await seeded(INTERLEAVED), await seeded([], "TRAINERS")],
            message_channel=Recorder(),
        )
        assert result.scans["TRAINERS"] == ScanInfo(None, None)
        assert result.poured_event_count == 6

    async def test_no_stores(self) -> None:
        """No stores: nothing poured, no scans."""
        result = await pour_event_store_collection_events(
            event_stores=[], message_channel=Recorder()
        )
        assert (result.poured_event_count, dict(result.scans)) == (0, {})

    async def test_a_store_twice_is_refused(self) -> None:
        """Pouring one store twice would duplicate events: refused."""
        store = await seeded(INTERLEAVED)
        with pytest.raises(ValueError, match="once"):
            await pour_event_store_collection_events(
                event_stores=[store, store], message_channel=Recorder()
            )

    async def test_results_are_frozen(self) -> None:
        """Results cannot be changed after the fact, their scans included."""
        result = await pour_event_store_collection_events(
            event_stores=[await seeded(INTERLEAVED)], message_channel=Recorder()
        )
        with pytest.raises(dataclasses.FrozenInstanceError):
            result.poured_event_count = 1  # type: ignore[misc]
        with pytest.raises(TypeError):
            result.scans["X"] = ScanInfo()  # type: ignore[index]


# -- order and memory under paging ---------------------------------------------------------------

_HISTORIES = st.lists(
    st.tuples(
        st.integers(0, 1),  # store
        st.sampled_from("abcdefgh"),  # aggregate id
        st.lists(st.integers(0, 3), min_size=1, max_size=4),  # ms steps between its events
        st.integers(0, 5),  # initial instant (ms)
    ),
    max_size=12,
    unique_by=lambda h: (h[0], h[1]),
)


@settings(max_examples=150, deadline=None)
@given(
    histories=_HISTORIES,
    start=st.none() | st.integers(0, 12),
    end=st.none() | st.integers(0, 12),
    headless=st.sets(st.integers(0, 11), max_size=4),
)
def test_order_matches_a_sort_whatever_the_paging(
    histories: list[tuple[int, str, list[int], int]],
    start: int | None,
    end: int | None,
    headless: set[int],
) -> None:
    """With tiny pages and buffers, pours equal a sort by (time, store, id, version).

    The histories numbered in ``headless`` have no version-1 event (versions need not be
    contiguous): listing leaves them out, and the pour must still publish their events.
    """
    base = datetime(2024, 1, 1, tzinfo=UTC)
    expected: list[tuple[datetime, int, str, int]] = []
    events: list[list[Event]] = [[], []]
    for index, (store, aggregate_id, steps, first) in enumerate(histories):
        ts = base + timedelta(milliseconds=first)
        if index not in headless:
            events[store].append(appeared(aggregate_id, ts))
            expected.append((ts, store, aggregate_id, 1))
        for version, step in enumerate(steps[1:], start=2):
            ts += timedelta(milliseconds=step)
            events[store].append(leveled(aggregate_id, version, ts))
            expected.append((ts, store, aggregate_id, version))
    low = None if start is None else base + timedelta(milliseconds=start)
    high = None if end is None else base + timedelta(milliseconds=end)
    expected = sorted(
        e for e in expected if (low is None or e[0] >= low) and (high is None or e[0] <= high)
    )
    names = ("POKEMONS", "TRAINERS")

    async def pour() -> list[tuple[datetime, int, str, int]]:
        stores = [await seeded(events[i], names[i]) for i in (0, 1)]
        channel = Recorder()
        filters: dam.PourFilters = {}
        if low is not None:
            filters["from"] = low
        if high is not None:
            filters["to"] = high
        if low is not None and high is not None and low > high:
            with pytest.raises(ValueError, match="is after"):  # refused: nothing could pour
                await pour_event_store_collection_events(
                    event_stores=stores, message_channel=channel, filters=filters
                )
            return []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dam, "_PAGE_SIZE", 2)
            patch.setattr(dam, "_MAX_CHUNK", 2)
            patch.setattr(dam, "_BUFFER_BUDGET", 3)
            result = await pour_event_store_collection_events(
                event_stores=stores, message_channel=channel, filters=filters
            )
        assert result.poured_event_count == len(channel.messages)
        return [
            (
                m.event.timestamp,
                names.index(m.event_store_id),
                m.event.aggregate_id,
                m.event.version,
            )
            for m in channel.messages
        ]

    assert asyncio.run(pour()) == expected


@settings(max_examples=150, deadline=None)
@given(
    histories=st.lists(
        st.tuples(
            st.integers(0, 1),  # store
            st.sampled_from("abcdefgh"),  # aggregate id
            st.lists(st.integers(-3, 3), min_size=1, max_size=4),  # ms steps, down too
            st.integers(0, 5),  # initial instant (ms)
        ),
        max_size=12,
        unique_by=lambda h: (h[0], h[1]),
    ),
    start=st.none() | st.integers(0, 8),
    end=st.none() | st.integers(0, 8),
    headless=st.sets(st.integers(0, 11), max_size=4),
)
def test_every_event_in_range_is_poured_whatever_the_timestamps(
    histories: list[tuple[int, str, list[int], int]],
    start: int | None,
    end: int | None,
    headless: set[int],
) -> None:
    """With timestamps that go down as versions go up, a pour still publishes every event
    in the range of every aggregate it lists (``to`` bounds listing by the initial event,
    as in Castore; aggregates without a version-1 event are all poured), each aggregate's
    events in version order."""
    base = datetime(2024, 1, 1, tzinfo=UTC)
    low = None if start is None else base + timedelta(milliseconds=start)
    high = None if end is None else base + timedelta(milliseconds=max(end, start or 0))
    expected: set[tuple[int, str, int]] = set()
    events: list[list[Event]] = [[], []]
    for index, (store, aggregate_id, steps, first) in enumerate(histories):
        ts = base + timedelta(milliseconds=first)
        listed = index in headless or high is None or ts <= high
        for version, step in enumerate(steps, start=1):
            ts += timedelta(milliseconds=step if version > 1 else 0)
            if version == 1 and index in headless:
                continue
            event = (
                appeared(aggregate_id, ts) if version == 1 else leveled(aggregate_id, version, ts)
            )
            events[store].append(event)
            if listed and (low is None or ts >= low) and (high is None or ts <= high):
                expected.add((store, aggregate_id, version))
    names = ("POKEMONS", "TRAINERS")

    async def pour() -> list[tuple[int, str, int]]:
        stores = [await seeded(events[i], names[i]) for i in (0, 1)]
        channel = Recorder()
        filters: dam.PourFilters = {}
        if low is not None:
            filters["from"] = low
        if high is not None:
            filters["to"] = high
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dam, "_PAGE_SIZE", 2)
            patch.setattr(dam, "_MAX_CHUNK", 2)
            patch.setattr(dam, "_BUFFER_BUDGET", 3)
            await pour_event_store_collection_events(
                event_stores=stores, message_channel=channel, filters=filters
            )
        return [(names.index(s), a, v) for s, a, v in channel.events()]

    poured = asyncio.run(pour())
    assert sorted(poured) == sorted(expected)
    for key in {(s, a) for s, a, _ in poured}:
        versions = [v for s, a, v in poured if (s, a) == key]
        assert versions == sorted(versions)


async def test_buffered_events_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every aggregate active at once, events read but not poured stay within budget."""
    aggregates, versions, budget = 50, 10, 20
    monkeypatch.setattr(dam, "_BUFFER_BUDGET", budget)
    events: list[Event] = []
    for i in range(aggregates):
        events.append(appeared(f"p{i:02}", at(1, i)))
        events.extend(leveled(f"p{i:02}", v, at(1, v * 100 + i)) for v in range(2, versions + 1))
    store = await seeded(events)
    read = 0
    limits: list[int | None] = []
    real_get_events = store.get_events

    async def counting_get_events(aggregate_id: str, **options: Any) -> GetEventsResult[Any]:
        nonlocal read
        limits.append(options.get("limit"))
        result = await real_get_events(aggregate_id, **options)
        read += len(result.events)
        return result

    store.get_events = counting_get_events  # type: ignore[method-assign]
    outstanding: list[int] = []
    channel = Recorder()
    original_publish = channel.publish_message

    async def publish(message: Any, *, replay: bool = False) -> None:
        await original_publish(message, replay=replay)
        outstanding.append(read - len(channel.messages))

    channel.publish_message = publish  # type: ignore[method-assign]
    result = await pour_event_store_events(event_store=store, message_channel=channel)
    assert result.poured_event_count == aggregates * versions
    assert read == aggregates * versions
    assert None not in limits
    # At most the budget plus one waiting event per aggregate; never the whole store.
    assert max(outstanding) <= budget + aggregates < aggregates * versions
    times = [m.event.timestamp for m in channel.messages]
    assert times == sorted(times)


# -- rate limit and progress ----------------------------------------------------------------------


def _pour_calls(store: EventStore[Any, Any], channel: Recorder) -> dict[str, Any]:
    return {
        "aggregate_events": lambda **kw: pour_aggregate_events(
            event_store=store, message_channel=channel, aggregate_id="pikachu", **kw
        ),
        "aggregate_ids": lambda **kw: pour_event_store_aggregate_ids(
            event_store=store, message_channel=channel, **kw
        ),
        "store_events": lambda **kw: pour_event_store_events(
            event_store=store, message_channel=channel, **kw
        ),
        "collection_events": lambda **kw: pour_event_store_collection_events(
            event_stores=[store], message_channel=channel, **kw
        ),
    }


RATE_SOURCE = [appeared("pikachu", at(1)), *(leveled("pikachu", v, at(v)) for v in range(2, 5))]
RATE_SOURCE += [appeared("eevee", at(5)), appeared("snorlax", at(6))]


@pytest.mark.parametrize(
    "function", ["aggregate_events", "aggregate_ids", "store_events", "collection_events"]
)
async def test_rate_limit_spaces_messages_evenly(function: str) -> None:
    """``rate_limit=20`` puts about 50 ms between consecutive publishes (B114)."""
    channel = Recorder()
    await _pour_calls(await seeded(RATE_SOURCE), channel)[function](rate_limit=20)
    gaps = [b - a for a, b in zip(channel.times, channel.times[1:], strict=False)]
    assert len(gaps) >= 2
    assert min(gaps) >= 0.05 * 0.95, gaps
    # The median: one sleep that a loaded host wakes late does not move it; waiting twice
    # as long as asked, every time, does.
    assert statistics.median(gaps) <= 0.05 * 1.5, gaps


@pytest.mark.parametrize(
    "function", ["aggregate_events", "aggregate_ids", "store_events", "collection_events"]
)
async def test_no_rate_limit_no_delay(function: str) -> None:
    """Without ``rate_limit`` messages go out back to back (B114)."""
    channel = Recorder()
    await _pour_calls(await seeded(RATE_SOURCE), channel)[function]()
    assert len(channel.times) >= 3
    assert channel.times[-1] - channel.times[0] < 0.05


@pytest.mark.parametrize(("rate", "error"), [(0, ValueError), (-1, ValueError),
                         (math.nan, ValueError), (math.inf, ValueError), ("2", TypeError),
                         (True, TypeError)])  # fmt: skip
async def test_bad_rate_limit_is_refused(rate: Any, error: type[Exception]) -> None:
    """A rate limit that is not a positive finite number raises before any publish."""
    channel = Recorder()
    with pytest.raises(error):
        await pour_event_store_events(
            event_store=await seeded(INTERLEAVED), message_channel=channel, rate_limit=rate
        )
    assert channel.messages == []


async def test_progress_is_reported_after_each_message() -> None:
    """``on_progress`` (sync or async) sees the running counts after every publish."""
    seen: list[PourProgress] = []
    awaited: list[int] = []

    async def on_async(progress: PourProgress) -> None:
        awaited.append(progress.poured_count)

    store = await seeded(INTERLEAVED)
    await pour_event_store_events(
        event_store=store, message_channel=Recorder(), on_progress=seen.append
    )
    assert [p.poured_count for p in seen] == [1, 2, 3, 4, 5, 6]
    assert seen[-1].scanned_aggregate_count == 3
    await pour_event_store_aggregate_ids(
        event_store=store, message_channel=Recorder(), on_progress=on_async
    )
    assert awaited == [1, 2, 3]


async def test_pours_through_a_real_bus_as_replays() -> None:
    """Through an in-memory bus, only listeners that accept replays get the messages."""
    store = await seeded(INTERLEAVED)
    bus = NotificationMessageBus(message_bus_id="REPLAY", source_event_stores=[store])
    adapter = InMemoryMessageBusAdapter.attach_to(bus)
    replayed: list[tuple[int, bool]] = []
    live: list[int] = []

    async def on_replay(message: NotificationMessage, context: MessageContext) -> None:
        replayed.append((message.event.version, context.replay))

    async def on_live(message: NotificationMessage, context: MessageContext) -> None:
        live.append(message.event.version)

    adapter.on({"on_replay": True}, on_replay)
    adapter.on({}, on_live)
    result = await pour_aggregate_events(
        event_store=store, message_channel=bus, aggregate_id="pikachu"
    )
    await adapter.join()
    assert result.poured_event_count == 3
    assert sorted(replayed) == [(1, True), (2, True), (3, True)]
    assert live == []


async def test_caught_event_type_round_trips() -> None:
    """Poured events keep their own class (not the base ``Event``)."""
    store = await seeded([appeared("p", at(1)), PokemonCaught(aggregate_id="p", version=2)])
    channel = Recorder()
    await pour_event_store_events(event_store=store, message_channel=channel)
    assert [type(m.event).__name__ for m in channel.messages] == [
        "PokemonAppeared",
        "PokemonCaught",
    ]
