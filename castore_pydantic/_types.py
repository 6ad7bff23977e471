"""Result objects, grouped events and the storage adapter Protocol shared by the core."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from castore_pydantic._event import Event

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

    from castore_pydantic._event_store import EventStore
    from castore_pydantic._serialization import EventStoreContext

__all__ = [
    "AggregateIdEntry",
    "EventStorageAdapter",
    "GetAggregateResult",
    "GetEventsResult",
    "GetExistingAggregateResult",
    "GroupedEvent",
    "ListAggregateIdsResult",
    "PushEventGroupResult",
    "PushEventResult",
]

A_co = TypeVar("A_co", covariant=True)
E_co = TypeVar("E_co", bound=Event, covariant=True)


@dataclass(frozen=True, slots=True)
class GetEventsResult(Generic[E_co]):
    """What ``get_events`` returns.

    Attributes:
        events: The events, ordered by version (descending with ``reverse=True``).
    """

    events: list[E_co]


@dataclass(frozen=True, slots=True)
class GetAggregateResult(Generic[A_co, E_co]):
    """What ``get_aggregate`` returns.

    Attributes:
        aggregate: The folded aggregate, ``None`` when there are no events.
        events: The events that were folded.
        last_event: The last of them, ``None`` when there are none.
    """

    aggregate: A_co | None
    events: list[E_co]
    last_event: E_co | None


@dataclass(frozen=True, slots=True)
class GetExistingAggregateResult(Generic[A_co, E_co]):
    """What ``get_existing_aggregate`` returns: like ``GetAggregateResult``, never empty.

    Attributes:
        aggregate: The folded aggregate.
        events: The events that were folded.
        last_event: The last of them.
    """

    aggregate: A_co
    events: list[E_co]
    last_event: E_co


@dataclass(frozen=True, slots=True)
class PushEventResult(Generic[A_co, E_co]):
    """What ``push_event`` returns.

    Attributes:
        event: The event as stored (timestamp filled in).
        next_aggregate: The aggregate after the event, when it could be computed without a
            read: the event is version 1 or ``prev_aggregate`` was given. ``None`` otherwise.
    """

    event: E_co
    next_aggregate: A_co | None = None


@dataclass(frozen=True, slots=True)
class PushEventGroupResult:
    """What ``EventStore.push_event_group`` returns.

    Attributes:
        event_group: One ``PushEventResult`` per grouped event, in input order.
    """

    event_group: tuple[PushEventResult[Any, Event], ...]


@dataclass(frozen=True, slots=True)
class AggregateIdEntry:
    """One listed aggregate.

    Attributes:
        aggregate_id: The aggregate's id.
        initial_event_timestamp: The timestamp of its version-1 event.
    """

    aggregate_id: str
    initial_event_timestamp: datetime


@dataclass(frozen=True, slots=True)
class ListAggregateIdsResult:
    """What ``list_aggregate_ids`` returns.

    Attributes:
        aggregate_ids: The listed aggregates, ordered by initial event timestamp then id.
        next_page_token: Pass it back to get the next page; ``None`` on the last page.
    """

    aggregate_ids: list[AggregateIdEntry]
    next_page_token: str | None = None


@dataclass(frozen=True, slots=True)
class GroupedEvent:
    """An event waiting to be pushed atomically with others (see ``EventStore.group_event``).

    Attributes:
        event: The validated event (its timestamp may still be ``None``).
        event_storage_adapter: The adapter that will store it.
        context: The event store context it belongs to.
        prev_aggregate: The aggregate before the event, if the caller gave it.
        event_store: The event store that grouped it.
    """

    event: Event
    event_storage_adapter: EventStorageAdapter
    context: EventStoreContext | None = None
    prev_aggregate: Any = None
    event_store: EventStore[Any, Any] | None = None


@runtime_checkable
class EventStorageAdapter(Protocol):
    """What an event storage adapter provides. Third-party adapters need not subclass it.

    Every method receives the ``EventStoreContext`` of the calling event store: its
    ``event_store_id`` is part of every key, and its ``parse_*`` methods turn stored data back
    into validated events of the store's types. The event store hands adapters events that
    are already validated and carry a timestamp.
    """

    async def push_event(
        self, event: Event, context: EventStoreContext, *, force: bool = False
    ) -> Event:
        """Store one event; raise ``EventAlreadyExistsError`` if its version exists.

        With ``force=True`` an existing event with that version is replaced.
        Returns the event as stored.
        """
        ...

    async def push_event_group(
        self, grouped_events: Sequence[GroupedEvent], *, force: bool = False
    ) -> list[Event]:
        """Store all grouped events in one transaction, or none of them.

        Returns the stored events in input order.
        """
        ...

    def group_event(self, event: Event, context: EventStoreContext) -> GroupedEvent:
        """Wrap an event so that it can be pushed as part of a group by this adapter."""
        ...

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
        """Return an aggregate's events ordered by version, bounds inclusive."""
        ...

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
        """List the aggregates that have a version-1 event, paged.

        Options left as ``None`` are taken from ``page_token`` when one is given
        (``castore_pydantic.storage.ListingOptions.resolve`` does this for adapters).
        """
        ...

    async def aclose(self) -> None:
        """Release connections and other resources; idempotent."""
        ...

    async def __aenter__(self) -> Self:
        """Open the adapter's resources, if any, and return the adapter."""
        ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the adapter (``aclose``)."""
        ...


async def call_and_await(function: Callable[..., object], *args: Any) -> None:
    """Call ``function(*args)``, and await what it returns when that is awaitable.

    How the library calls the callbacks it is given, async or not (as Castore awaits
    whatever they return): ``on_event_pushed``, ``on_event_already_exists``,
    ``on_progress``.
    """
    outcome = function(*args)
    if inspect.isawaitable(outcome):
        await outcome


def renote(error: BaseException, note: str, *, replacing: str) -> None:
    """Add ``note`` to ``error``, dropping its earlier notes that start with ``replacing``.

    One exception object may be raised again and again (a module-level instance, a mock's
    ``side_effect``): each pass would otherwise leave a note of its own.
    """
    notes = getattr(error, "__notes__", None)
    if notes:
        notes[:] = [earlier for earlier in notes if not earlier.startswith(replacing)]
    error.add_note(note)


def function_of(handler: Callable[..., Any]) -> Any:
    """The function whose annotations describe ``handler`` (a command's, a reducer).

    ``handler`` may be a function, a method, a partial or a decorated wrapper of one, or an
    object with a ``__call__`` method (its class's other annotations are not the
    handler's). A class gives ``type.__call__``: calling it makes an instance.
    """
    target: Any = handler
    while isinstance(target, functools.partial):
        target = target.func
    target = inspect.unwrap(target)
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        for klass in type(target).__mro__:  # an object with a ``__call__`` method
            if "__call__" in vars(klass):
                return inspect.unwrap(vars(klass)["__call__"])
    return target
