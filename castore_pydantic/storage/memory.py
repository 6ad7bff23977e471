"""``InMemoryEventStorageAdapter``: events in a dict, for tests and prototypes."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, ClassVar, Self

from castore_pydantic._event import Event, normalize_timestamp, stamped, utc_now, with_timestamp
from castore_pydantic._paging import ListingOptions, check_read_options
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic._types import AggregateIdEntry, GroupedEvent, ListAggregateIdsResult
from castore_pydantic.errors import EventAlreadyExistsError, EventGroupError

__all__ = ["InMemoryEventStorageAdapter"]

# Stored items are validated events, or mappings seeded through ``initial_events`` that are
# validated against the reading store's types (and cached) the first time they are read.
_Item = Event | Mapping[str, Any]


def _version(item: _Item) -> int:
    return item.version if isinstance(item, Event) else int(item["version"])


class InMemoryEventStorageAdapter:
    """Keeps events in memory, keyed by ``(event_store_id, aggregate_id)``.

    Every operation runs without yielding to the event loop, so a push or a group is atomic
    even when the calling task is cancelled. Events of an aggregate are kept ordered by
    version.

    Args:
        initial_events: Events to start with, per event store id
            (``{"POKEMONS": [event, {...}, ...]}``). Mappings are validated by the event store
            that first reads them; events without a timestamp get the construction time.

    Raises:
        ValueError: Two initial events share an aggregate and a version.
        TypeError: An initial event lacks a string aggregate id or an int version.
    """

    #: ``EventStore`` hands groups to this adapter as they are: ``group_event`` only wraps,
    #: and ``push_event_group`` gives the events without a timestamp one timestamp.
    _stamps_groups: ClassVar[bool] = True

    def __init__(
        self, *, initial_events: Mapping[str, Iterable[Event | Mapping[str, Any]]] | None = None
    ) -> None:
        self._stores: dict[str, dict[str, list[_Item]]] = {}
        now = utc_now()
        for event_store_id, events in (initial_events or {}).items():
            for event in events:
                self._seed(event_store_id, event, now)

    def _seed(self, event_store_id: str, event: Event | Mapping[str, Any], now: datetime) -> None:
        item: _Item
        if isinstance(event, Event):
            stamp = now if event.timestamp is None else normalize_timestamp(event.timestamp)
            item = event if stamp is event.timestamp else with_timestamp(event, stamp)
            aggregate_id, version = event.aggregate_id, event.version
        elif isinstance(event, Mapping):
            aggregate_id = event.get("aggregateId", event.get("aggregate_id"))
            raw_version = event.get("version")
            if not isinstance(aggregate_id, str) or not isinstance(raw_version, int):
                raise TypeError(
                    f"initial event of {event_store_id} needs a string aggregate id and an int "
                    f"version: {event!r:.200}"
                )
            version = raw_version
            # A mapping without a timestamp, or with None, gets the adapter's creation time.
            item = event if event.get("timestamp") is not None else {**event, "timestamp": now}
        else:
            raise TypeError(f"initial events must be events or mappings, not {type(event)}")
        events = self._stores.setdefault(event_store_id, {}).setdefault(aggregate_id, [])
        versions = [_version(i) for i in events]
        if version in versions:
            raise ValueError(
                f"initial events of {event_store_id} repeat aggregate {aggregate_id} "
                f"version {version}"
            )
        events.insert(bisect.bisect(versions, version), item)

    def __repr__(self) -> str:
        counts = {sid: len(aggs) for sid, aggs in self._stores.items()}
        return f"InMemoryEventStorageAdapter(aggregates={counts})"

    # -- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Nothing to release; present for the adapter contract."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- writing ---------------------------------------------------------------------------

    def _place(self, event: Event, event_store_id: str, *, force: bool) -> tuple[list[_Item], int]:
        """Find where ``event`` goes; raise if its version is taken and not forced."""
        events = self._stores.get(event_store_id, {}).get(event.aggregate_id, [])
        if not events or _version(events[-1]) < event.version:
            return events, len(events)
        index = bisect.bisect_left([_version(i) for i in events], event.version)
        if index < len(events) and _version(events[index]) == event.version and not force:
            raise EventAlreadyExistsError(event_store_id, event.aggregate_id, event.version)
        return events, index

    def _write(self, event: Event, event_store_id: str, index: int) -> None:
        events = self._stores.setdefault(event_store_id, {}).setdefault(event.aggregate_id, [])
        if index < len(events) and _version(events[index]) == event.version:
            events[index] = event
        else:
            events.insert(index, event)

    async def push_event(
        self, event: Event, context: EventStoreContext, *, force: bool = False
    ) -> Event:
        """Store one event (see ``EventStorageAdapter.push_event``)."""
        aggregates = self._stores.get(context.event_store_id)
        if aggregates is None:
            aggregates = self._stores[context.event_store_id] = {}
        events = aggregates.get(event.aggregate_id)
        if events is None:
            aggregates[event.aggregate_id] = [event]
            return event
        if _version(events[-1]) < event.version:  # the usual case: appending
            events.append(event)
            return event
        _, index = self._place(event, context.event_store_id, force=force)
        self._write(event, context.event_store_id, index)
        return event

    def group_event(self, event: Event, context: EventStoreContext) -> GroupedEvent:
        """Wrap an event for a group pushed by in-memory adapters."""
        return GroupedEvent(event=event, event_storage_adapter=self, context=context)

    async def push_event_group(
        self, grouped_events: Sequence[GroupedEvent], *, force: bool = False
    ) -> list[Event]:
        """Store the group atomically, each event in its own grouped event's adapter.

        Raises:
            EventGroupError: A grouped event is attached to another kind of adapter or
                lacks its context; nothing is written.
            EventAlreadyExistsError: A version is taken; nothing is written.
        """
        targets: list[tuple[InMemoryEventStorageAdapter, str, Event]] = []
        now = utc_now()
        for index, grouped in enumerate(grouped_events):
            adapter = grouped.event_storage_adapter
            if not isinstance(adapter, InMemoryEventStorageAdapter):
                raise EventGroupError(
                    f"Event group event #{index} is not connected to an InMemoryEventStorageAdapter"
                )
            if grouped.context is None:
                raise EventGroupError(f"Event group event #{index} misses context")
            targets.append((adapter, grouped.context.event_store_id, stamped(grouped.event, now)))
        # Check every event before writing any, so that a failure leaves no trace; the
        # same aggregate and version twice in one group is a conflict too.
        seen: set[tuple[int, str, str, int]] = set()
        for adapter, event_store_id, event in targets:
            key = (id(adapter), event_store_id, event.aggregate_id, event.version)
            if key in seen and not force:
                raise EventAlreadyExistsError(event_store_id, event.aggregate_id, event.version)
            seen.add(key)
            adapter._place(event, event_store_id, force=force)
        for adapter, event_store_id, event in targets:
            _, index = adapter._place(event, event_store_id, force=True)
            adapter._write(event, event_store_id, index)
        return [event for _, _, event in targets]

    # -- reading ---------------------------------------------------------------------------

    def _validated(self, context: EventStoreContext, aggregate_id: str) -> list[_Item]:
        events = self._stores.get(context.event_store_id, {}).get(aggregate_id)
        if not events:
            return []
        parsed = context.parse_events(events)
        if parsed is not events:
            events[:] = parsed  # cache the validated form of seeded mappings
        return events

    async def get_events(
        self,
        aggregate_id: str,
        context: EventStoreContext,
        *,
        min_version: int | None = None,
        max_version: int | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[Event]:
        """Return events ordered by version, bounds inclusive (``limit=0`` gives none).

        Raises:
            TypeError, ValueError: A bound or the limit is not ``None`` or an int >= 0.
        """
        check_read_options(min_version, max_version, limit)
        events: list[Any] = self._validated(context, aggregate_id)
        if min_version is not None or max_version is not None:
            versions = [e.version for e in events]
            lo = 0 if min_version is None else bisect.bisect_left(versions, min_version)
            hi = len(events) if max_version is None else bisect.bisect_right(versions, max_version)
            events = events[lo:hi]
        else:
            events = list(events)
        if reverse:
            events.reverse()
        if limit is not None:
            events = events[:limit]
        return events

    async def list_aggregate_ids(
        self,
        context: EventStoreContext,
        *,
        limit: int | None = None,
        page_token: str | None = None,
        initial_event_after: datetime | None = None,
        initial_event_before: datetime | None = None,
        reverse: bool | None = None,
    ) -> ListAggregateIdsResult:
        """List aggregates with a version-1 event, paged (see ``ListingOptions``)."""
        options = ListingOptions.resolve(
            limit=limit,
            page_token=page_token,
            initial_event_after=initial_event_after,
            initial_event_before=initial_event_before,
            reverse=reverse,
        )
        if options.lists_nothing:
            return ListAggregateIdsResult(aggregate_ids=[])
        entries = []
        for aggregate_id, events in self._stores.get(context.event_store_id, {}).items():
            if events and _version(events[0]) == 1:
                first = context.parse_event(events[0])
                events[0] = first
                assert first.timestamp is not None
                entries.append(AggregateIdEntry(aggregate_id, first.timestamp))
        return options.page(entries)
