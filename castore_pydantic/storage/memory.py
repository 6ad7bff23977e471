"""``InMemoryEventStorageAdapter``: events in a dict, for tests and prototypes."""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, ClassVar, Self

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_json

from castore_pydantic._event import (
    MAX_VERSION,
    VERSION_TOO_LARGE,
    Event,
    normalize_timestamp,
    read_timestamp,
    stamped,
    utc_now,
)
from castore_pydantic._paging import ListingOptions, check_read_options
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic._types import AggregateIdEntry, GroupedEvent, ListAggregateIdsResult
from castore_pydantic.errors import (
    EventAlreadyExistsError,
    EventGroupError,
    EventLimitExceededError,
)
from castore_pydantic.storage._columns import storable_columns
from castore_pydantic.storage._sqlite_rows import timestamp_text

__all__ = ["InMemoryEventStorageAdapter"]


class _Stored:
    """One stored event: its JSON text, as the SQLite adapter reads it back.

    Keeping text instead of the pushed object means that nothing a caller does to an event
    it pushed or read (a payload it mutates) changes the stored history, and that values
    read back as they would from a database (a tuple as a list, for one). Every read
    validates the text into new events.
    """

    __slots__ = ("text", "timestamp", "version")

    def __init__(self, version: int, text: str, timestamp: datetime | None) -> None:
        self.version = version
        self.text = text
        #: In UTC milliseconds; ``None`` for a seeded mapping whose timestamp did not parse
        #: (reading it raises the store's validation error).
        self.timestamp = timestamp


def _non_finite(value: Any) -> bool:
    """Whether ``value`` holds NaN or an infinity, which JSON cannot hold.

    Walked without recursion, each container once: a deep or self-referencing seed is left
    to the JSON serialisation, which refuses it with the documented error.
    """
    pending = [value]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return True
            continue
        if isinstance(item, BaseModel):
            item = item.__dict__
        if isinstance(item, Mapping | list | tuple | set | frozenset):
            if id(item) in seen:
                continue
            seen.add(id(item))
            pending.extend(item.values() if isinstance(item, Mapping) else item)
    return False


def _stored(event: Event, event_store_id: str) -> _Stored:
    """The stored form of a stamped event.

    Raises:
        EventLimitExceededError: Its payload or metadata cannot be stored as JSON.
    """
    if not 0 < event.version <= MAX_VERSION:  # as SQL refuses it (adapters used directly)
        raise EventLimitExceededError(event_store_id, VERSION_TOO_LARGE, ("version",))
    payload, metadata = storable_columns(event, event_store_id)
    stamp = event.timestamp
    assert stamp is not None  # stamped by the caller
    text = (
        f'{{"aggregateId":{json.dumps(event.aggregate_id)},"version":{event.version},'
        f'"type":{json.dumps(event.type)},"timestamp":"{timestamp_text(stamp)}",'
        f'"payload":{payload or "null"},"metadata":{metadata or "null"}}}'
    )
    return _Stored(event.version, text, normalize_timestamp(stamp))


def _stored_mapping(event_store_id: str, event: Mapping[str, Any], now: datetime) -> _Stored:
    """The stored form of a seeded mapping, validated by the store that reads it.

    Raises:
        TypeError: It lacks a string aggregate id or an int version, or JSON cannot hold it.
    """
    aggregate_id = event.get("aggregateId", event.get("aggregate_id"))
    version = event.get("version")
    if not isinstance(aggregate_id, str) or type(version) is not int:
        raise TypeError(
            f"initial event of {event_store_id} needs a string aggregate id and an int "
            f"version: {event!r:.200}"
        )
    if not 0 < version <= MAX_VERSION:
        raise EventLimitExceededError(
            event_store_id, f"version {version} is not from 1 to 2**63-1", ("version",)
        )
    if _non_finite(event):
        raise TypeError(
            f"initial event of {event_store_id} cannot be stored as JSON (NaN or infinity): "
            f"{event!r:.200}"
        )
    data = dict(event)
    raw = data.get("timestamp")
    timestamp: datetime | None = now
    if raw is None:  # absent or None: the adapter's creation time
        data["timestamp"] = timestamp_text(now)
    else:
        try:
            timestamp = read_timestamp(raw)
        except ValueError:
            timestamp = None  # kept as given: reading the event reports it
        else:
            data["timestamp"] = timestamp_text(timestamp)
    try:
        text = to_json(data, by_alias=True).decode()
    except (PydanticSerializationError, ValueError) as exc:
        raise TypeError(
            f"initial event of {event_store_id} cannot be stored as JSON ({exc}): {event!r:.200}"
        ) from exc
    return _Stored(version, text, timestamp)


class InMemoryEventStorageAdapter:
    """Keeps events in memory, keyed by ``(event_store_id, aggregate_id)``.

    Events are kept as the JSON text a database would store, and every read validates them
    again: changing an event after pushing it, or one read back, never changes the stored
    history, and events read back as they would from SQLite or PostgreSQL.

    Every operation runs without yielding to the event loop, so a push or a group is atomic
    even when the calling task is cancelled. Events of an aggregate are kept ordered by
    version.

    Args:
        initial_events: Events to start with, per event store id
            (``{"POKEMONS": [event, {...}, ...]}``). Mappings are validated by the event store
            that reads them; events without a timestamp get the construction time.

    Raises:
        ValueError: Two initial events share an aggregate and a version.
        TypeError: ``initial_events`` is not a mapping of lists (Castore's single list
            included), or an initial event lacks a string aggregate id or an int version,
            or JSON cannot hold it.
        EventLimitExceededError: An initial event's payload or metadata cannot be stored as
            JSON.
    """

    #: ``EventStore`` hands groups to this adapter as they are: ``group_event`` only wraps,
    #: and ``push_event_group`` gives the events without a timestamp one timestamp.
    _stamps_groups: ClassVar[bool] = True

    def __init__(
        self, *, initial_events: Mapping[str, Iterable[Event | Mapping[str, Any]]] | None = None
    ) -> None:
        self._stores: dict[str, dict[str, list[_Stored]]] = {}
        now = utc_now()
        if not isinstance(initial_events, Mapping | None):
            raise TypeError(
                "initial_events maps event store ids to their events, e.g."
                f" {{'POKEMONS': [...]}}, not a {type(initial_events).__name__} (Castore's"
                " in-memory adapter takes one list: its stores share one namespace)"
            )
        for event_store_id, events in (initial_events or {}).items():
            if isinstance(events, Mapping | str | bytes | BaseModel) or not isinstance(
                events, Iterable
            ):
                raise TypeError(
                    f"initial_events[{event_store_id!r}] must be a list of events,"
                    f" not a {type(events).__name__}"
                )
            for event in events:
                self._seed(event_store_id, event, now)

    def _seed(self, event_store_id: str, event: Event | Mapping[str, Any], now: datetime) -> None:
        # Seeds skip the event store's limits: NaN would be stored as null, silently.
        if isinstance(event, Event):
            if _non_finite(event.payload) or _non_finite(event.metadata):
                raise EventLimitExceededError(
                    event_store_id, "NaN and infinity cannot be stored as JSON"
                )
            item = _stored(stamped(event, now), event_store_id)
            aggregate_id = event.aggregate_id
        elif isinstance(event, Mapping):
            item = _stored_mapping(event_store_id, event, now)
            aggregate_id = event.get("aggregateId", event.get("aggregate_id"))
        else:
            raise TypeError(f"initial events must be events or mappings, not {type(event)}")
        events = self._stores.setdefault(event_store_id, {}).setdefault(aggregate_id, [])
        if not events or events[-1].version < item.version:  # seeds usually come in order
            events.append(item)
            return
        versions = [i.version for i in events]
        if item.version in versions:
            raise ValueError(
                f"initial events of {event_store_id} repeat aggregate {aggregate_id} "
                f"version {item.version}"
            )
        events.insert(bisect.bisect(versions, item.version), item)

    def copy_storage(self) -> InMemoryEventStorageAdapter:
        """A new adapter holding what this one holds now; later writes to either stay apart."""
        copy = InMemoryEventStorageAdapter()
        # Stored events are immutable text: copying the lists is enough.
        copy._stores = {
            event_store_id: {aggregate_id: list(events) for aggregate_id, events in aggs.items()}
            for event_store_id, aggs in self._stores.items()
        }
        return copy

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

    def _place(
        self, aggregate_id: str, version: int, event_store_id: str, *, force: bool
    ) -> tuple[list[_Stored], int]:
        """Find where the event goes; raise if its version is taken and not forced."""
        events = self._stores.get(event_store_id, {}).get(aggregate_id, [])
        if not events or events[-1].version < version:
            return events, len(events)
        index = bisect.bisect_left([i.version for i in events], version)
        if index < len(events) and events[index].version == version and not force:
            raise EventAlreadyExistsError(event_store_id, aggregate_id, version)
        return events, index

    def _write(self, aggregate_id: str, item: _Stored, event_store_id: str, index: int) -> None:
        events = self._stores.setdefault(event_store_id, {}).setdefault(aggregate_id, [])
        if index < len(events) and events[index].version == item.version:
            events[index] = item
        else:
            events.insert(index, item)

    async def push_event(
        self, event: Event, context: EventStoreContext, *, force: bool = False
    ) -> Event:
        """Store one event (see ``EventStorageAdapter.push_event``).

        Raises:
            EventAlreadyExistsError: The version is taken (and ``force`` is false).
            EventLimitExceededError: The payload or metadata cannot be stored as JSON.
        """
        event_store_id = context.event_store_id
        event = stamped(event)
        item = _stored(event, event_store_id)
        aggregates = self._stores.get(event_store_id)
        if aggregates is None:
            aggregates = self._stores[event_store_id] = {}
        events = aggregates.get(event.aggregate_id)
        if events is None:
            aggregates[event.aggregate_id] = [item]
        elif events[-1].version < event.version:  # the usual case: appending
            events.append(item)
        else:
            _, index = self._place(event.aggregate_id, event.version, event_store_id, force=force)
            self._write(event.aggregate_id, item, event_store_id, index)
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
            EventLimitExceededError: An event's payload or metadata cannot be stored as
                JSON; nothing is written.
        """
        if not grouped_events:
            raise EventGroupError("An event group needs at least one grouped event")
        targets: list[tuple[InMemoryEventStorageAdapter, str, Event, _Stored]] = []
        now = utc_now()
        for index, grouped in enumerate(grouped_events):
            adapter = grouped.event_storage_adapter
            if not isinstance(adapter, InMemoryEventStorageAdapter):
                raise EventGroupError(
                    f"Event group event #{index} is not connected to an InMemoryEventStorageAdapter"
                )
            if grouped.context is None:
                raise EventGroupError(f"Event group event #{index} misses context")
            event_store_id = grouped.context.event_store_id
            event = stamped(grouped.event, now)
            targets.append((adapter, event_store_id, event, _stored(event, event_store_id)))
        # Check every event before writing any, so that a failure leaves no trace; the
        # same aggregate and version twice in one group is a conflict too.
        seen: set[tuple[int, str, str, int]] = set()
        for adapter, event_store_id, event, _ in targets:
            key = (id(adapter), event_store_id, event.aggregate_id, event.version)
            if key in seen and not force:
                raise EventAlreadyExistsError(event_store_id, event.aggregate_id, event.version)
            seen.add(key)
            adapter._place(event.aggregate_id, event.version, event_store_id, force=force)
        for adapter, event_store_id, event, item in targets:
            _, index = adapter._place(event.aggregate_id, event.version, event_store_id, force=True)
            adapter._write(event.aggregate_id, item, event_store_id, index)
        return [event for _, _, event, _ in targets]

    # -- reading ---------------------------------------------------------------------------

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
            StoredEventValidationError: A stored event does not validate with the store's
                event types.
        """
        check_read_options(min_version, max_version, limit)
        events = self._stores.get(context.event_store_id, {}).get(aggregate_id)
        if not events:
            return []
        if min_version is not None or max_version is not None:
            versions = [e.version for e in events]
            lo = 0 if min_version is None else bisect.bisect_left(versions, min_version)
            hi = len(events) if max_version is None else bisect.bisect_right(versions, max_version)
            events = events[lo:hi]
        if reverse:
            events = events[::-1]
        if limit is not None:
            events = events[:limit]
        if not events:
            return []
        return context.parse_events_json("[" + ",".join([e.text for e in events]) + "]")

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
        """List aggregates with a version-1 event, paged (see ``ListingOptions``).

        Raises:
            StoredEventValidationError: A seeded first event's timestamp does not validate.
        """
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
            if events and events[0].version == 1:
                timestamp = events[0].timestamp
                if timestamp is None:
                    # A seeded mapping whose timestamp did not parse: its own validation
                    # error explains why (or, if the store's type reads it, its value).
                    (first,) = context.parse_events_json("[" + events[0].text + "]")
                    assert first.timestamp is not None
                    timestamp = normalize_timestamp(first.timestamp)
                entries.append(AggregateIdEntry(aggregate_id, timestamp))
        return options.page(entries)

    async def _unlisted_aggregate_ids(self, context: EventStoreContext) -> list[str]:
        """Aggregates without a version-1 event, which listing leaves out (by id).

        For ``castore export``, which exports every event.
        """
        aggregates = self._stores.get(context.event_store_id, {})
        return sorted(aid for aid, events in aggregates.items() if events and events[0].version > 1)
