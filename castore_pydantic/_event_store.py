"""``EventStore``: validated events in, aggregates out, through a storage adapter."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Generic, TypeAlias

from castore_pydantic._aggregate import Aggregate, AggregateT, EventT, Reducer, reduced_model
from castore_pydantic._event import Event, utc_now, with_timestamp
from castore_pydantic._event_limits import EventLimits
from castore_pydantic._paging import check_count, check_read_options, parse_timestamp
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic._types import (
    EventStorageAdapter,
    GetAggregateResult,
    GetEventsResult,
    GetExistingAggregateResult,
    GroupedEvent,
    ListAggregateIdsResult,
    PushEventGroupResult,
    PushEventResult,
    call_and_await,
    function_of,
    renote,
)
from castore_pydantic.errors import (
    AggregateNotFoundError,
    EventGroupError,
    UndefinedEventStorageAdapterError,
)

__all__ = ["EventStore", "OnEventPushed", "SimulateSideEffect"]

#: ``(indexed_events, event) -> indexed_events``: how ``simulate_aggregate`` files an event.
SimulateSideEffect: TypeAlias = Callable[[dict[int, Event], Event], dict[int, Event]]
#: Awaited after every successful push with its result.
#: ``(push_result) -> None``, async or not: runs after every successful push.
OnEventPushed: TypeAlias = Callable[[PushEventResult[Any, Any]], Awaitable[None] | None]

#: How the note on a reducer's error raised after the write starts.
_AFTER_THE_WRITE = "After the write: "

logger = logging.getLogger(__name__)


def default_simulate_side_effect(indexed: dict[int, Event], event: Event) -> dict[int, Event]:
    """File events by version; a later event with the same version replaces the earlier."""
    indexed[event.version] = event
    return indexed


class EventStore(Generic[AggregateT, EventT]):
    """The events of one kind of entity, their types and how they fold into an aggregate.

    The aggregate and event types are inferred from ``reducer``. Every pushed event is
    validated against ``event_types`` before anything is written, and events read back are
    validated too.

    Args:
        event_store_id: The store's id, part of every storage key (``"POKEMONS"``).
        event_types: The ``Event`` subclasses this store accepts.
        reducer: ``(aggregate | None, event) -> aggregate``.
        event_storage_adapter: Where events live; may be set later.
        simulate_side_effect: How ``simulate_aggregate`` files events (default: by version).
        on_event_pushed: Called (and awaited if async) after every successful push with
            its result.
        limits: Depth and size limits for pushed events (default ``EventLimits()``).

    Raises:
        ReservedEventTypeError: An event type is ``__REPLAYED__`` or ``__AGGREGATE_EXISTS__``.
        TypeError: An event type is not an ``Event`` subclass with a ``Literal`` type.
    """

    def __init__(
        self,
        *,
        event_store_id: str,
        event_types: Sequence[type[Event]],
        reducer: Reducer[AggregateT, EventT],
        event_storage_adapter: EventStorageAdapter | None = None,
        simulate_side_effect: SimulateSideEffect | None = None,
        on_event_pushed: OnEventPushed | None = None,
        limits: EventLimits | None = None,
    ) -> None:
        if isinstance(event_types, type | str | bytes) or not isinstance(event_types, Iterable):
            raise TypeError(
                "event_types must be a sequence of Event subclasses (for example "
                f"[PokemonAppeared, PokemonCaught]), not {event_types!r}"
            )
        if not callable(reducer):
            raise TypeError(
                "reducer must be a function (aggregate | None, event) -> aggregate, "
                f"not {reducer!r}"
            )
        if _is_async(reducer):
            raise TypeError(
                f"reducer must be a plain function, not async: {reducer!r} would make every "
                "aggregate a coroutine (folding never awaits; do I/O in commands, not reducers)"
            )
        event_types = tuple(event_types)
        self._context = EventStoreContext(event_store_id, event_types, limits)
        self._event_types = tuple(dict.fromkeys(event_types))
        self._reducer = reducer
        self._simulate_side_effect = simulate_side_effect or default_simulate_side_effect
        self.event_storage_adapter = event_storage_adapter
        self.on_event_pushed = on_event_pushed

    def __repr__(self) -> str:
        return f"EventStore(event_store_id={self.event_store_id!r})"

    # -- properties ------------------------------------------------------------------------

    @property
    def event_store_id(self) -> str:
        """The store's id."""
        return self._context.event_store_id

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        """The event classes the store accepts, in declaration order."""
        return self._event_types

    @property
    def reducer(self) -> Reducer[AggregateT, EventT]:
        """The reducer that folds events into the aggregate."""
        return self._reducer

    @property
    def simulate_side_effect(self) -> SimulateSideEffect:
        """How ``simulate_aggregate`` files events."""
        return self._simulate_side_effect

    @property
    def context(self) -> EventStoreContext:
        """The context this store hands its storage adapter."""
        return self._context

    def get_event_storage_adapter(self) -> EventStorageAdapter:
        """Return the storage adapter.

        Raises:
            UndefinedEventStorageAdapterError: No adapter was set.
        """
        adapter = self.event_storage_adapter
        if adapter is None:
            raise UndefinedEventStorageAdapterError(self.event_store_id)
        return adapter

    # -- reading ---------------------------------------------------------------------------

    async def get_events(
        self,
        aggregate_id: str,
        *,
        min_version: int | None = None,
        max_version: int | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> GetEventsResult[EventT]:
        """Return an aggregate's events, ordered by version; unknown aggregates give ``[]``.

        Args:
            aggregate_id: The aggregate.
            min_version: Inclusive lower bound.
            max_version: Inclusive upper bound.
            limit: At most this many events (``0`` gives none).
            reverse: Newest first.

        Raises:
            UndefinedEventStorageAdapterError: No adapter was set.
            StoredEventValidationError: A stored event no longer validates.
            TypeError: The id is not a ``str``, or a bound or the limit not an int.
            ValueError: A negative limit or version.
        """
        if not isinstance(aggregate_id, str):
            raise TypeError(f"aggregate_id must be a str, not {type(aggregate_id).__name__}")
        check_read_options(min_version, max_version, limit)
        events = await self.get_event_storage_adapter().get_events(
            aggregate_id,
            self._context,
            min_version=min_version,
            max_version=max_version,
            limit=limit,
            reverse=reverse,
        )
        return GetEventsResult(events)  # type: ignore[arg-type]

    def build_aggregate(
        self, events: Iterable[EventT], initial_aggregate: AggregateT | None = None
    ) -> AggregateT | None:
        """Fold events into an aggregate with the reducer (synchronous, no I/O)."""
        reducer = self._reducer
        aggregate = initial_aggregate
        for event in events:
            aggregate = reducer(aggregate, event)
        return aggregate

    async def get_aggregate(
        self, aggregate_id: str, *, max_version: int | None = None
    ) -> GetAggregateResult[AggregateT, EventT]:
        """Fold an aggregate's events; ``aggregate`` is ``None`` when there are none.

        Args:
            aggregate_id: The aggregate.
            max_version: Fold only events up to this version (inclusive).
        """
        events = (await self.get_events(aggregate_id, max_version=max_version)).events
        aggregate = self.build_aggregate(events)
        return GetAggregateResult(aggregate, events, events[-1] if events else None)

    async def get_existing_aggregate(
        self, aggregate_id: str, *, max_version: int | None = None
    ) -> GetExistingAggregateResult[AggregateT, EventT]:
        """Like ``get_aggregate``, but the aggregate must exist.

        Raises:
            AggregateNotFoundError: No events, or the reducer folded them to ``None``.
        """
        result = await self.get_aggregate(aggregate_id, max_version=max_version)
        if result.aggregate is None or result.last_event is None:
            raise AggregateNotFoundError(self.event_store_id, aggregate_id)
        return GetExistingAggregateResult(result.aggregate, result.events, result.last_event)

    async def list_aggregate_ids(
        self,
        *,
        limit: int | None = None,
        page_token: str | None = None,
        initial_event_after: datetime | str | None = None,
        initial_event_before: datetime | str | None = None,
        reverse: bool | None = None,
    ) -> ListAggregateIdsResult:
        """List aggregates by the timestamp of their version-1 event, then by id.

        Args:
            limit: Page size; a ``next_page_token`` is returned when more remain.
            page_token: Continue a previous listing; explicit options override its own.
            initial_event_after: Inclusive lower bound (datetime or ISO string).
            initial_event_before: Inclusive upper bound (datetime or ISO string).
            reverse: Newest first.

        Raises:
            InvalidPageTokenError: ``page_token`` is malformed.
        """
        check_count("limit", limit)
        return await self.get_event_storage_adapter().list_aggregate_ids(
            self._context,
            limit=limit,
            page_token=page_token,
            initial_event_after=None
            if initial_event_after is None
            else parse_timestamp(initial_event_after, "initial_event_after"),
            initial_event_before=None
            if initial_event_before is None
            else parse_timestamp(initial_event_before, "initial_event_before"),
            reverse=reverse,
        )

    def simulate_aggregate(
        self,
        events: Iterable[EventT | Mapping[str, Any]],
        *,
        simulation_date: datetime | str | None = None,
    ) -> AggregateT | None:
        """Build the aggregate the events *would* give, ignoring their stored versions.

        Events are filed with ``simulate_side_effect``, those after ``simulation_date`` are
        dropped, the rest sorted by timestamp (events of one timestamp by their key, the
        version by default), renumbered 1..n and folded.
        """
        indexed: dict[int, Event] = {}
        for event in events:
            # Not written: the limits of pushes do not apply (reads do not check them).
            parsed = self._context.validate_input(event, timestamp=False, limits=False)
            indexed = self._simulate_side_effect(indexed, parsed)
        keys = list(indexed)
        if all(type(key) is int and key >= 0 for key in keys):
            # As Castore's index, a JavaScript object, lists integer keys: in order. Events
            # of one timestamp (a group's) then fold in version order, whatever the input's.
            keys.sort()
        kept = [indexed[key] for key in keys]
        if simulation_date is not None:
            date = parse_timestamp(simulation_date, "simulation_date")
            kept = [e for e in kept if e.timestamp is not None and e.timestamp <= date]
        kept.sort(key=lambda e: (e.timestamp is not None, e.timestamp or 0))
        renumbered = [
            e if e.version == i else e.model_copy(update={"version": i})
            for i, e in enumerate(kept, start=1)
        ]
        return self.build_aggregate(renumbered)  # type: ignore[arg-type]

    # -- writing ---------------------------------------------------------------------------

    async def push_event(
        self,
        event: EventT | Mapping[str, Any] | str | bytes,
        *,
        prev_aggregate: AggregateT | Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> PushEventResult[AggregateT, EventT]:
        """Validate and store one event.

        Args:
            event: An instance of one of the store's event types, a mapping or JSON text.
            prev_aggregate: The aggregate before this event; lets the result carry
                ``next_aggregate`` without a read. A mapping is validated into the model
                the reducer is annotated to return, if it names one.
            force: Overwrite an existing event with the same version.

        Returns:
            The stored event and, for a version-1 event or when ``prev_aggregate`` is given,
            the next aggregate.

        Raises:
            pydantic.ValidationError: The event, or a mapping given as ``prev_aggregate``, is
                invalid; nothing is written.
            UnknownEventTypeError: Its type is not one of the store's; nothing is written.
            EventLimitExceededError: It is too deep or too large; nothing is written.
            EventAlreadyExistsError: The version is taken (and ``force`` is false).
            UndefinedEventStorageAdapterError: No adapter was set.
            ValueError: ``prev_aggregate`` is an ``Aggregate`` of another id, or not older
                than the event; nothing is written.
            Exception: What ``on_event_pushed`` raises, or what the reducer raises on the
                stored event (the hook then still runs, with no next aggregate, and the
                reducer's error, noted as after the write, is raised afterwards): the event
                *is* stored.
        """
        return await self._push(event, prev_aggregate, force, self.on_event_pushed)

    async def _push(
        self,
        event: EventT | Mapping[str, Any] | str | bytes,
        prev_aggregate: AggregateT | Mapping[str, Any] | None,
        force: bool,
        hook: OnEventPushed | None,
    ) -> PushEventResult[AggregateT, EventT]:
        """``push_event``, with ``hook`` run after the write (a connected store publishes)."""
        adapter = self.get_event_storage_adapter()
        validated = self._context.validate_input(event)
        if prev_aggregate is not None:
            prev_aggregate = self._modelled(prev_aggregate)
            _check_prev_aggregate(prev_aggregate, validated)
        stored: Any = await adapter.push_event(validated, self._context, force=force)
        result, failure = self._pushed(stored, prev_aggregate)
        if failure is None:
            if hook is not None:
                await call_and_await(hook, result)
        else:
            await _run_hooks([(hook, result, failure)])
        return result

    def _modelled(self, prev_aggregate: Any) -> Any:
        """A mapping given as ``prev_aggregate``, validated into the reducer's aggregate model.

        Castore code passes plain objects; the reducer, annotated to return a model, expects
        one, and would fail on a mapping only once the event is written. Anything else, and
        a mapping for a reducer whose model is unknown, is the reducer's to take as it is.

        Raises:
            pydantic.ValidationError: The mapping does not validate; nothing is written.
        """
        if isinstance(prev_aggregate, Mapping):
            model = reduced_model(self._reducer)
            if model is not None:
                return model.model_validate(prev_aggregate)
        return prev_aggregate

    def _pushed(
        self, stored: Any, prev_aggregate: Any
    ) -> tuple[PushEventResult[Any, Any], Exception | None]:
        """The result of a stored event, and the reducer's error if it failed on it.

        The event is stored whatever the reducer does: its failure must not keep the hooks
        (and a connected store's publishing) from running. They then see no next aggregate,
        and the error is raised once they ran, with a note saying the event is stored.
        """
        if prev_aggregate is None and stored.version != 1:
            return PushEventResult(stored, None), None
        try:
            return PushEventResult(stored, self._reducer(prev_aggregate, stored)), None
        except Exception as error:
            renote(
                error,
                f"{_AFTER_THE_WRITE}event {stored.type!r} version {stored.version} of aggregate "
                f"{stored.aggregate_id!r} ({self.event_store_id}) is stored, but the reducer "
                "failed on it, so the result has no next aggregate.",
                replacing=_AFTER_THE_WRITE,
            )
            return PushEventResult(stored, None), error

    def group_event(
        self,
        event: EventT | Mapping[str, Any] | str | bytes,
        *,
        prev_aggregate: AggregateT | Mapping[str, Any] | None = None,
    ) -> GroupedEvent:
        """Validate an event for ``EventStore.push_event_group``; writes nothing.

        ``prev_aggregate`` is taken as ``push_event`` takes it.

        Raises:
            pydantic.ValidationError: The event, or a mapping given as ``prev_aggregate``, is
                invalid.
            UnknownEventTypeError: Its type is not one of the store's.
            UndefinedEventStorageAdapterError: No adapter was set.
        """
        adapter = self.get_event_storage_adapter()
        validated = self._context.validate_input(event, timestamp=False)
        if prev_aggregate is not None:
            prev_aggregate = self._modelled(prev_aggregate)
        if _stamps_groups(adapter):
            # One of ours: its ``group_event`` would build the plain wrapper; build it whole.
            return GroupedEvent(validated, adapter, self._context, prev_aggregate, self)
        grouped = adapter.group_event(validated, self._context)
        return _regrouped(grouped, grouped.event, self._context, prev_aggregate, self)

    @staticmethod
    async def push_event_group(
        *grouped_events: GroupedEvent, force: bool = False
    ) -> PushEventGroupResult:
        """Store events of one or several stores atomically: all of them or none.

        Events without a timestamp share one. The first event's adapter performs the write;
        every other grouped event must use an adapter of the same kind.

        Once the group is stored, each event's ``on_event_pushed`` (and a connected store's
        publishing) runs, in the group's order; a reducer or hook failing on one event does
        not stop the others, and the first failure is raised once all ran (the others are
        logged).

        Raises:
            EventGroupError: The group is empty or mixes incompatible adapters.
            EventAlreadyExistsError: One version is taken; nothing of the group is written.
            ValueError: A ``prev_aggregate`` is an ``Aggregate`` of another id, or not older
                than its event; nothing is written.
        """
        if not grouped_events:
            raise EventGroupError("An event group needs at least one grouped event")
        for index, grouped in enumerate(grouped_events):
            if not isinstance(grouped, GroupedEvent):
                if isinstance(grouped, list | tuple) and grouped:
                    raise EventGroupError(
                        f"Event group event #{index} is a {type(grouped).__name__}: pass the"
                        " grouped events as separate arguments,"
                        " EventStore.push_event_group(*grouped_events)"
                    )
                raise EventGroupError(
                    f"Event group event #{index} is not a GroupedEvent (use store.group_event)"
                )
            if grouped.context is None:
                raise EventGroupError(f"Event group event #{index} misses context")
        head = grouped_events[0].event_storage_adapter
        prepared: Sequence[GroupedEvent] = grouped_events
        if not _stamps_groups(head):
            prepared = _stamped_group(grouped_events)
        for grouped in prepared:
            if grouped.prev_aggregate is not None:
                _check_prev_aggregate(grouped.prev_aggregate, grouped.event)
        stored = await head.push_event_group(prepared, force=force)
        results: list[PushEventResult[Any, Event]] = []
        hooked: list[_Hooked] = []
        for grouped, event in zip(prepared, stored, strict=True):
            store = grouped.event_store
            if store is None:
                results.append(PushEventResult(event, None))
                continue
            result, failure = store._pushed(event, grouped.prev_aggregate)
            results.append(result)
            hook = store._after_push()
            if hook is not None or failure is not None:
                hooked.append((hook, result, failure))
        await _run_hooks(hooked)
        return PushEventGroupResult(tuple(results))

    def _after_push(self) -> OnEventPushed | None:
        """What runs for each event of this store once a group is stored: the hook.

        A ``ConnectedEventStore`` runs its hook and then publishes.
        """
        return self.on_event_pushed


#: A stored event's hook (``None`` for none), its result, and the reducer's error on it.
_Hooked: TypeAlias = tuple[OnEventPushed | None, PushEventResult[Any, Any], Exception | None]


async def _run_hooks(hooked: Sequence[_Hooked]) -> None:
    """Run stored events' hooks one after another, in the group's order.

    One at a time, so that messages of one aggregate are published in version order. A
    failing hook, or a reducer that failed on a stored event, does not stop the others:
    every event is stored, and each gets its hook's turn. The first failure is raised once
    all ran; the others are logged.
    """
    failures: list[tuple[PushEventResult[Any, Any], Exception, str]] = []
    reached = 0
    try:
        for hook, result, failure in hooked:
            reached += 1
            if failure is not None:
                failures.append((result, failure, "the reducer"))
            if hook is not None:
                try:
                    await call_and_await(hook, result)
                except Exception as exc:  # raised below, once every hook ran
                    failures.append((result, exc, "on_event_pushed (or publishing)"))
    except BaseException:
        # A cancellation goes on. The failures so far are logged, and so are the reducer's
        # on the events not reached: they are stored all the same.
        failures += [(r, f, "the reducer") for _, r, f in hooked[reached:] if f is not None]
        _log_hook_failures(failures)
        raise
    if failures:
        _log_hook_failures(failures[1:])
        raise failures[0][1]


def _log_hook_failures(
    failures: Sequence[tuple[PushEventResult[Any, Any], Exception, str]],
) -> None:
    for failed, error, what in failures:
        logger.error(
            "%s failed for aggregate %s version %s, which is stored: %s",
            what,
            failed.event.aggregate_id,
            failed.event.version,
            error,
            exc_info=error,
        )


def _is_async(function: Callable[..., Any]) -> bool:
    """Whether calling ``function`` gives a coroutine or an async generator."""
    called = function_of(function)
    return inspect.iscoroutinefunction(called) or inspect.isasyncgenfunction(called)


def _check_prev_aggregate(prev_aggregate: object, event: Event) -> None:
    """Refuse an ``Aggregate`` given as ``prev_aggregate`` that cannot precede the event.

    The next aggregate is folded from it (and published by state-carrying channels): another
    aggregate's, or one already at or past the event's version, would silently give a wrong
    state. Versions need not be contiguous, so an older aggregate is accepted. Checked
    before writing.

    Raises:
        ValueError: Another aggregate id, or a version not below the event's.
    """
    if not isinstance(prev_aggregate, Aggregate):
        return  # an aggregate type of the user's own: nothing known to check
    if not _same_id(prev_aggregate.aggregate_id, event.aggregate_id):
        problem = f"is aggregate {prev_aggregate.aggregate_id!r}"
    elif prev_aggregate.version >= event.version:
        problem = f"is already at version {prev_aggregate.version}"
    else:
        return
    raise ValueError(
        f"prev_aggregate {problem}, but the event is version {event.version} of aggregate "
        f"{event.aggregate_id!r}: pass the aggregate as it was before this event (or none); "
        "nothing was written"
    )


def _same_id(held: object, given: str) -> bool:
    """Whether an aggregate's id and an event's name the same aggregate.

    As text first: an ``Aggregate`` subclass may hold its id as a UUID, say. Then as UUIDs,
    so that a ``uuid`` table's canonical lower-case id matches the spelling the user keeps
    (upper case, braces, no hyphens).
    """
    text = str(held)
    if text == given:
        return True
    try:
        return uuid.UUID(text) == uuid.UUID(given)
    except ValueError:
        return False


def _stamps_groups(adapter: object) -> bool:
    """Whether the adapter's class is one of the library's, which stamp groups themselves.

    Only the class that declares it: a subclass may override ``group_event`` or
    ``push_event_group`` and expect what other adapters get.
    """
    return bool(type(adapter).__dict__.get("_stamps_groups", False))


def _stamped_group(grouped_events: Sequence[GroupedEvent]) -> list[GroupedEvent]:
    """The group with one timestamp for every event that has none (for other adapters)."""
    now = utc_now()
    prepared: list[GroupedEvent] = []
    for grouped in grouped_events:
        if grouped.event.timestamp is None:
            stamped = with_timestamp(grouped.event, now)
            grouped = _regrouped(  # noqa: PLW2901 - the stamped one replaces it
                grouped, stamped, grouped.context, grouped.prev_aggregate, grouped.event_store
            )
        prepared.append(grouped)
    return prepared


def _regrouped(
    grouped: GroupedEvent,
    event: Event,
    context: EventStoreContext | None,
    prev_aggregate: Any,
    event_store: EventStore[Any, Any] | None,
) -> GroupedEvent:
    """``grouped`` with these fields, keeping its adapter.

    The plain class is built directly (``dataclasses.replace`` costs about 1.5 µs, twice per
    grouped event); a subclass returned by another adapter goes through ``replace``.
    """
    if type(grouped) is GroupedEvent:
        return GroupedEvent(
            event, grouped.event_storage_adapter, context, prev_aggregate, event_store
        )
    return dataclasses.replace(
        grouped,
        event=event,
        context=context,
        prev_aggregate=prev_aggregate,
        event_store=event_store,
    )
