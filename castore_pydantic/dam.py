"""Pour history into a message channel: replay stored events to new or rebuilt consumers.

Every message is published with ``replay=True`` and awaited before the next one, so the
channel sees them one at a time and in order. ``rate_limit`` (messages per second) spaces
publishes evenly; ``filters={"from": ..., "to": ...}`` keeps events whose timestamp lies in
the inclusive range.

``pour_event_store_events`` and ``pour_event_store_collection_events`` pour in global
chronological order. Ties are broken deterministically by the store's position in the list
given, then the aggregate id (code point order), then the version. They read the stores as a
merge of per-aggregate streams: aggregates are listed page by page in order of their initial
event, and each aggregate's events are fetched in small chunks only when it is its turn.
Memory holds at most about 10,000 events plus one per aggregate whose events are being
poured, however large the stores are (fetches shrink to one event as that budget fills, which
costs more queries when very many aggregates interleave). This assumes, as
Castore does, that an aggregate's timestamps do not go down as its versions go up (what
``push_event`` produces); otherwise its events are still poured in version order, each when
its predecessors have been poured. So every event of a listed aggregate is read, also after
``to``: a later version may have an earlier timestamp, back in the range, and is poured. Once
every aggregate's next event is past ``to``, what is left of each is read in large chunks,
one aggregate after the other, and its events in the range poured in version order.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol, TypedDict

from castore_pydantic._event import Event
from castore_pydantic._event_store import EventStore
from castore_pydantic._paging import parse_timestamp
from castore_pydantic._types import AggregateIdEntry, call_and_await
from castore_pydantic.messaging import AggregateExistsMessage, NotificationMessage

__all__ = [
    "GetEventsOptions",
    "ListAggregateIdsOptions",
    "MessagePublisher",
    "OnPourProgress",
    "PourAggregateEventsResult",
    "PourEventStoreAggregateIdsResult",
    "PourEventStoreCollectionEventsResult",
    "PourEventStoreEventsResult",
    "PourFilters",
    "PourProgress",
    "ScanInfo",
    "pour_aggregate_events",
    "pour_event_store_aggregate_ids",
    "pour_event_store_collection_events",
    "pour_event_store_events",
]

#: Aggregates listed per ``list_aggregate_ids`` call when the options do not say.
_PAGE_SIZE = 100
#: Events buffered across all aggregates being poured before fetches shrink to one event.
_BUFFER_BUDGET = 10_000
#: Events fetched per ``get_events`` call at most.
_MAX_CHUNK = 100
#: Events fetched per call when reading what is left of aggregates past a pour's range.
_TAIL_CHUNK = 1000


class MessagePublisher(Protocol):
    """What the pour functions publish to: any message channel (queue or bus)."""

    async def publish_message(self, message: Any, *, replay: bool = False) -> None:
        """Publish one message."""
        ...


PourFilters = TypedDict("PourFilters", {"from": datetime | str, "to": datetime | str}, total=False)
"""Inclusive timestamp bounds on poured events (datetimes or ISO strings, timezone-aware)."""


class GetEventsOptions(TypedDict, total=False):
    """Options forwarded to ``EventStore.get_events`` by ``pour_aggregate_events``."""

    min_version: int
    max_version: int
    limit: int
    reverse: bool


class ListAggregateIdsOptions(TypedDict, total=False):
    """Options forwarded to ``EventStore.list_aggregate_ids`` (the pour follows the pages)."""

    limit: int
    initial_event_after: datetime | str
    initial_event_before: datetime | str
    reverse: bool


@dataclass(frozen=True, slots=True)
class PourProgress:
    """Where a pour stands, handed to ``on_progress`` after every published message.

    Attributes:
        poured_count: Messages published so far.
        scanned_aggregate_count: Aggregates listed (or read) so far.
    """

    poured_count: int
    scanned_aggregate_count: int


OnPourProgress = Callable[[PourProgress], Awaitable[None] | None]
"""``on_progress(progress)``, awaited when it returns an awaitable."""


@dataclass(frozen=True, slots=True)
class PourAggregateEventsResult:
    """What ``pour_aggregate_events`` returns.

    Attributes:
        poured_event_count: How many events were published.
        first_poured_event: The first of them, ``None`` when none was.
        last_poured_event: The last of them, ``None`` when none was.
    """

    poured_event_count: int
    first_poured_event: Event | None = None
    last_poured_event: Event | None = None


@dataclass(frozen=True, slots=True)
class PourEventStoreAggregateIdsResult:
    """What ``pour_event_store_aggregate_ids`` returns.

    Attributes:
        poured_aggregate_id_count: How many aggregates were published.
        first_scanned_aggregate: The first listed aggregate, ``None`` when none was.
        last_scanned_aggregate: The last listed aggregate, ``None`` when none was.
    """

    poured_aggregate_id_count: int
    first_scanned_aggregate: AggregateIdEntry | None = None
    last_scanned_aggregate: AggregateIdEntry | None = None


@dataclass(frozen=True, slots=True)
class ScanInfo:
    """Which aggregates of one event store a pour listed.

    Attributes:
        first_scanned_aggregate: The first listed aggregate, ``None`` when none was.
        last_scanned_aggregate: The last listed aggregate, ``None`` when none was.
    """

    first_scanned_aggregate: AggregateIdEntry | None = None
    last_scanned_aggregate: AggregateIdEntry | None = None


@dataclass(frozen=True, slots=True)
class PourEventStoreEventsResult:
    """What ``pour_event_store_events`` returns.

    Attributes:
        poured_event_count: How many events were published.
        first_scanned_aggregate: The first listed aggregate, ``None`` when none was.
        last_scanned_aggregate: The last listed aggregate, ``None`` when none was.
    """

    poured_event_count: int
    first_scanned_aggregate: AggregateIdEntry | None = None
    last_scanned_aggregate: AggregateIdEntry | None = None


@dataclass(frozen=True, slots=True)
class PourEventStoreCollectionEventsResult:
    """What ``pour_event_store_collection_events`` returns.

    Attributes:
        poured_event_count: How many events were published, across all stores.
        scans: One ``ScanInfo`` per event store id (a read-only mapping).
    """

    poured_event_count: int
    scans: Mapping[str, ScanInfo] = field(default_factory=lambda: MappingProxyType({}))


# -- shared plumbing ----------------------------------------------------------------------------


class _Throttle:
    """Spaces calls ``1 / rate_limit`` seconds apart, measured on the event loop's clock."""

    __slots__ = ("_interval", "_next")

    def __init__(self, rate_limit: float | None) -> None:
        if rate_limit is not None and (
            isinstance(rate_limit, bool) or not isinstance(rate_limit, int | float)
        ):
            raise TypeError(f"rate_limit must be a number, not {type(rate_limit).__name__}")
        if rate_limit is not None and not (rate_limit > 0 and math.isfinite(rate_limit)):
            raise ValueError(
                f"rate_limit must be a positive number of messages per second, got {rate_limit}"
            )
        self._interval = None if rate_limit is None else 1.0 / rate_limit
        self._next: float | None = None

    async def wait(self) -> None:
        if self._interval is None:
            return
        loop = asyncio.get_running_loop()
        if self._next is not None:
            delay = self._next - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        # Measured after waking: a late publish never lets the next one come sooner.
        self._next = loop.time() + self._interval


def _read_filters(filters: PourFilters | None) -> tuple[datetime | None, datetime | None]:
    if filters is None:
        return None, None
    unknown = set(filters) - {"from", "to"}
    if unknown:
        raise ValueError(f"unknown filter keys {sorted(unknown)}; use 'from' and 'to'")
    start, end = filters.get("from"), filters.get("to")
    bounds = (
        None if start is None else parse_timestamp(start, "filters['from']"),
        None if end is None else parse_timestamp(end, "filters['to']"),
    )
    if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
        raise ValueError(
            f"filters['from'] ({bounds[0].isoformat()}) is after filters['to'] "
            f"({bounds[1].isoformat()}): nothing could be poured"
        )
    return bounds


def _check_sources(channel: MessagePublisher, stores: Sequence[EventStore[Any, Any]]) -> None:
    """Refuse, before publishing anything, a store the channel does not carry.

    A channel of the library names its source stores (``get_event_store``); publishing a
    message of another store fails, and a pour would stop with part of it published.

    Raises:
        MessageChannelEventStoreNotFoundError: A store is not among the channel's sources.
    """
    find = getattr(channel, "get_event_store", None)
    if find is not None:
        for store in stores:
            find(store.event_store_id)


class _Pourer:
    """Publishes messages with replay, throttled, counting and reporting progress."""

    def __init__(
        self,
        channel: MessagePublisher,
        rate_limit: float | None,
        on_progress: OnPourProgress | None,
    ) -> None:
        self.channel = channel
        self.throttle = _Throttle(rate_limit)
        self.on_progress = on_progress
        self.count = 0
        self.scanned = 0

    async def publish(self, message: Any) -> None:
        await self.throttle.wait()
        await self.channel.publish_message(message, replay=True)
        self.count += 1
        if self.on_progress is not None:
            await call_and_await(self.on_progress, PourProgress(self.count, self.scanned))


def _inside(event: Event, start: datetime | None, end: datetime | None) -> bool:
    ts = event.timestamp
    if ts is None:
        return start is None and end is None
    return (start is None or ts >= start) and (end is None or ts <= end)


# -- one aggregate, one store's ids -------------------------------------------------------------


async def pour_aggregate_events(
    *,
    event_store: EventStore[Any, Any],
    message_channel: MessagePublisher,
    aggregate_id: str,
    options: GetEventsOptions | None = None,
    filters: PourFilters | None = None,
    rate_limit: float | None = None,
    on_progress: OnPourProgress | None = None,
) -> PourAggregateEventsResult:
    """Publish an aggregate's events as ``NotificationMessage``s, in ``get_events`` order.

    Args:
        event_store: The store to read.
        message_channel: Where to publish (``publish_message(message, replay=True)``).
        aggregate_id: The aggregate.
        options: Forwarded to ``get_events`` as they are (``min_version``, ``limit``, ...).
        filters: Inclusive ``{"from": ..., "to": ...}`` bounds on event timestamps.
        rate_limit: At most this many messages per second, evenly spaced.
        on_progress: Called after every published message.

    Returns:
        The count and the first and last poured events.

    Raises:
        ValueError: A non-positive ``rate_limit``, an unknown filter key, a naive bound, or
            ``from`` after ``to``.
        MessageChannelEventStoreNotFoundError: The channel does not carry the store
            (nothing is published).
    """
    start, end = _read_filters(filters)
    _check_sources(message_channel, [event_store])
    pourer = _Pourer(message_channel, rate_limit, on_progress)
    pourer.scanned = 1
    events = (await event_store.get_events(aggregate_id, **(options or {}))).events
    first = last = None
    for event in events:
        if not _inside(event, start, end):
            continue
        message = NotificationMessage(event_store_id=event_store.event_store_id, event=event)
        await pourer.publish(message)
        first = first or event
        last = event
    return PourAggregateEventsResult(pourer.count, first, last)


async def pour_event_store_aggregate_ids(
    *,
    event_store: EventStore[Any, Any],
    message_channel: MessagePublisher,
    options: ListAggregateIdsOptions | None = None,
    rate_limit: float | None = None,
    on_progress: OnPourProgress | None = None,
) -> PourEventStoreAggregateIdsResult:
    """Publish an ``AggregateExistsMessage`` per aggregate, following every page.

    Args:
        event_store: The store to list.
        message_channel: Where to publish (``publish_message(message, replay=True)``).
        options: Forwarded to ``list_aggregate_ids`` (bounds, ``reverse``; ``limit`` is the
            page size, 100 by default). Every page is poured.
        rate_limit: At most this many messages per second, evenly spaced.
        on_progress: Called after every published message.

    Returns:
        The count and the first and last listed aggregates.

    Raises:
        TypeError: ``options`` holds a ``page_token``.
        ValueError: A non-positive ``rate_limit``.
        MessageChannelEventStoreNotFoundError: The channel does not carry the store
            (nothing is published).
    """
    listing: dict[str, Any] = {"limit": _PAGE_SIZE, **(options or {})}
    if "page_token" in listing:
        raise TypeError("options may not hold a page_token: the pour follows every page")
    _check_sources(message_channel, [event_store])
    pourer = _Pourer(message_channel, rate_limit, on_progress)
    first: AggregateIdEntry | None = None
    last: AggregateIdEntry | None = None
    token: str | None = None
    while True:
        page = await event_store.list_aggregate_ids(**listing, page_token=token)
        for entry in page.aggregate_ids:
            pourer.scanned += 1
            first = first or entry
            last = entry
            await pourer.publish(
                AggregateExistsMessage(
                    event_store_id=event_store.event_store_id,
                    aggregate_id=entry.aggregate_id,
                    initial_event_timestamp=entry.initial_event_timestamp,
                )
            )
        token = page.next_page_token
        if token is None:
            return PourEventStoreAggregateIdsResult(pourer.count, first, last)


# -- chronological pours: a merge of per-aggregate streams --------------------------------------


@dataclass(slots=True)
class _Source:
    """One event store of a chronological pour and how far it has been listed."""

    index: int
    event_store: EventStore[Any, Any]
    #: Aggregates without a version-1 event, poured on their own: a version 1 pushed
    #: during the pour must not make listing pour them a second time.
    unlisted: frozenset[str] = frozenset()
    token: str | None = None
    listed_any_page: bool = False
    exhausted: bool = False
    frontier: datetime | None = None  # initial timestamp of the last listed aggregate
    first: AggregateIdEntry | None = None
    last: AggregateIdEntry | None = None


@dataclass(slots=True)
class _Stream:
    """The unpoured events of one aggregate: a small buffer, refilled on demand."""

    source: _Source
    aggregate_id: str
    buffer: deque[Event] = field(default_factory=deque)
    next_version: int | None = None
    exhausted: bool = False


#: A lower bound of every event's timestamp.
_BEFORE_ANY_EVENT = datetime.min.replace(tzinfo=UTC)

# (timestamp, store position, aggregate id, version, insertion number, stream): the key of the
# stream's next event, or a lower bound of it while the stream's buffer is empty.
_Entry = tuple[datetime, int, str, int, int, _Stream]


async def _find_unlisted(store: EventStore[Any, Any]) -> list[str] | None:
    """The store's aggregates without a version-1 event, which listing leaves out, by id.

    ``None`` when its adapter cannot tell (only the library's adapters can).
    """
    find = getattr(store.get_event_storage_adapter(), "_unlisted_aggregate_ids", None)
    if find is None:
        return None
    found: list[str] = await find(store.context)
    return found


class _Merge:
    """Pours several stores' events in ``(timestamp, store, aggregate, version)`` order."""

    def __init__(
        self,
        event_stores: Sequence[EventStore[Any, Any]],
        pourer: _Pourer,
        start: datetime | None,
        end: datetime | None,
    ) -> None:
        ids = [store.event_store_id for store in event_stores]
        if len(set(ids)) != len(ids):
            raise ValueError(f"each event store may be poured once, got {ids}")
        self.sources = [_Source(i, store) for i, store in enumerate(event_stores)]
        self.pourer = pourer
        self.start = start
        self.end = end
        self.heap: list[_Entry] = []
        self.order = itertools.count()
        self.buffered = 0

    def _push(self, stream: _Stream, timestamp: datetime, version: int) -> None:
        entry = (timestamp, stream.source.index, stream.aggregate_id, version)
        heapq.heappush(self.heap, (*entry, next(self.order), stream))

    async def _list_page(self, source: _Source) -> None:
        if source.listed_any_page:
            page = await source.event_store.list_aggregate_ids(page_token=source.token)
        else:
            page = await source.event_store.list_aggregate_ids(
                limit=_PAGE_SIZE, initial_event_before=self.end
            )
            source.listed_any_page = True
        for entry in page.aggregate_ids:
            if entry.aggregate_id in source.unlisted:
                continue  # already in the merge (its version 1 came during the pour)
            self.pourer.scanned += 1
            source.first = source.first or entry
            source.last = entry
            self._push(_Stream(source, entry.aggregate_id), entry.initial_event_timestamp, 1)
        if page.aggregate_ids:
            source.frontier = page.aggregate_ids[-1].initial_event_timestamp
        source.token = page.next_page_token
        source.exhausted = source.token is None

    async def _list_enough(self) -> None:
        """List until no unlisted aggregate can come before the head of the heap."""
        listed = True
        while listed:
            listed = False
            for source in self.sources:
                if source.exhausted:
                    continue
                if self.heap and source.frontier is not None and source.frontier > self.heap[0][0]:
                    continue
                await self._list_page(source)
                listed = True

    async def _refill(self, stream: _Stream, chunk: int | None = None) -> None:
        """Fetch the stream's next events: ``chunk`` of them, or what the budget leaves."""
        if chunk is None:
            chunk = max(1, min(_MAX_CHUNK, _BUFFER_BUDGET - self.buffered))
        events = (
            await stream.source.event_store.get_events(
                stream.aggregate_id, min_version=stream.next_version, limit=chunk
            )
        ).events
        stream.exhausted = len(events) < chunk
        stream.buffer.extend(events)
        self.buffered += len(events)

    async def _add_unlisted(self) -> None:
        """Add the aggregates listing leaves out: those without a version-1 event.

        Only the library's adapters can tell which they are. Each joins the merge with a
        lower bound before any event, so its first chunk is read at once and it then waits
        for its turn like any other aggregate.
        """
        for source in self.sources:
            unlisted = await _find_unlisted(source.event_store) or []
            source.unlisted = frozenset(unlisted)
            for aggregate_id in unlisted:
                self.pourer.scanned += 1
                self._push(_Stream(source, aggregate_id), _BEFORE_ANY_EVENT, 0)

    async def _pour_tails(self) -> None:
        """Pour what is left in the range once every stream is past it, one aggregate at a time.

        An aggregate's timestamps may go down again (explicit timestamps, clock skew,
        imports), back into the range: the rest of each aggregate is read in chunks of
        ``_TAIL_CHUNK`` (not event by event, as the merge's shared budget would by now) and
        its events in the range are poured in version order.
        """
        while self.heap:
            stream = heapq.heappop(self.heap)[-1]
            while True:
                while stream.buffer:
                    await self._pour_next(stream)
                if stream.exhausted:
                    break
                await self._refill(stream, _TAIL_CHUNK)

    async def _pour_next(self, stream: _Stream) -> Event:
        """Take the stream's next buffered event, pour it if it is in the range, return it."""
        event = stream.buffer.popleft()
        self.buffered -= 1
        if _inside(event, self.start, self.end):
            store_id = stream.source.event_store.event_store_id
            await self.pourer.publish(NotificationMessage(event_store_id=store_id, event=event))
        stream.next_version = event.version + 1
        return event

    async def run(self) -> None:
        await self._add_unlisted()
        while True:
            await self._list_enough()
            if not self.heap:
                return
            if self.end is not None and self.heap[0][0] > self.end:
                # Every aggregate is listed, and each one's next event is past the range.
                await self._pour_tails()
                return
            timestamp, _, _, version, _, stream = heapq.heappop(self.heap)
            if not stream.buffer:
                await self._refill(stream)
                if not stream.buffer:
                    continue
                head = stream.buffer[0]
                assert head.timestamp is not None
                if (head.timestamp, head.version) > (timestamp, version):
                    self._push(stream, head.timestamp, head.version)  # its turn comes later
                    continue
            event = await self._pour_next(stream)
            assert event.timestamp is not None
            if stream.buffer:
                head = stream.buffer[0]
                assert head.timestamp is not None
                self._push(stream, head.timestamp, head.version)
            elif not stream.exhausted:
                # The next event is not fetched yet; its timestamp is at least this one's.
                self._push(stream, event.timestamp, event.version + 1)


async def pour_event_store_collection_events(
    *,
    event_stores: Sequence[EventStore[Any, Any]],
    message_channel: MessagePublisher,
    filters: PourFilters | None = None,
    rate_limit: float | None = None,
    on_progress: OnPourProgress | None = None,
) -> PourEventStoreCollectionEventsResult:
    """Publish every event of several stores in one chronological stream.

    Events are ordered by timestamp, then by the store's position in ``event_stores``, then
    by aggregate id, then by version (Castore pours the later-listed store first on a tie;
    we do not copy that). Aggregates are found by listing them, which knows them by their
    version-1 event; on the library's adapters, aggregates without one (versions need not
    be contiguous) are poured too.

    Args:
        event_stores: The stores, each at most once.
        message_channel: Where to publish (``publish_message(message, replay=True)``);
            its source event stores must include them all.
        filters: Inclusive ``{"from": ..., "to": ...}`` bounds on event timestamps; ``to``
            also bounds which aggregates are listed (by their initial event).
        rate_limit: At most this many messages per second, evenly spaced.
        on_progress: Called after every published message.

    Returns:
        The count and, per event store id, the first and last listed aggregates.

    Raises:
        ValueError: An event store appears twice, a non-positive ``rate_limit``, an unknown
            filter key, a naive bound, or ``from`` after ``to``.
        MessageChannelEventStoreNotFoundError: The channel does not carry one of the
            stores (nothing is published).
    """
    start, end = _read_filters(filters)
    _check_sources(message_channel, event_stores)
    pourer = _Pourer(message_channel, rate_limit, on_progress)
    merge = _Merge(event_stores, pourer, start, end)
    await merge.run()
    scans = {
        source.event_store.event_store_id: ScanInfo(source.first, source.last)
        for source in merge.sources
    }
    return PourEventStoreCollectionEventsResult(pourer.count, MappingProxyType(scans))


async def pour_event_store_events(
    *,
    event_store: EventStore[Any, Any],
    message_channel: MessagePublisher,
    filters: PourFilters | None = None,
    rate_limit: float | None = None,
    on_progress: OnPourProgress | None = None,
) -> PourEventStoreEventsResult:
    """Publish every event of a store in chronological order (ties: aggregate id, version).

    Args:
        event_store: The store to read.
        message_channel: Where to publish (``publish_message(message, replay=True)``).
        filters: Inclusive ``{"from": ..., "to": ...}`` bounds on event timestamps.
        rate_limit: At most this many messages per second, evenly spaced.
        on_progress: Called after every published message.

    Returns:
        The count and the first and last listed aggregates.

    Raises:
        ValueError: A non-positive ``rate_limit``, an unknown filter key, a naive bound, or
            ``from`` after ``to``.
        MessageChannelEventStoreNotFoundError: The channel does not carry the store
            (nothing is published).
    """
    result = await pour_event_store_collection_events(
        event_stores=[event_store],
        message_channel=message_channel,
        filters=filters,
        rate_limit=rate_limit,
        on_progress=on_progress,
    )
    scan = result.scans[event_store.event_store_id]
    return PourEventStoreEventsResult(
        result.poured_event_count, scan.first_scanned_aggregate, scan.last_scanned_aggregate
    )
