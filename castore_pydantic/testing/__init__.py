"""Test tooling: event stores on seeded in-memory adapters, strategies and contract suites.

``mock_event_store`` gives a copy of an event store on a fresh in-memory adapter (the original
is untouched); ``mute_event_store`` swaps a store's adapter in place. Hypothesis strategies live
in ``castore_pydantic.testing.strategies``, reducer checks in ``castore_pydantic.testing.laws``
and the adapter contract suites in ``castore_pydantic.testing.contracts``; those need the
``[testing]`` extra (Hypothesis) and are imported on purpose, never from here. A pytest plugin
with fixtures is in ``castore_pydantic.testing.pytest_plugin``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from castore_pydantic._aggregate import AggregateT, EventT
from castore_pydantic._event import Event, stamped, utc_now
from castore_pydantic._event_store import EventStore
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter

__all__ = ["MockedEventStore", "mock_event_store", "mute_event_store"]

InitialEvent = Event | Mapping[str, Any] | str | bytes
"""What may be given as initial events: instances of the store's event types, mappings (either key
spelling) or JSON text, each validated like a pushed event.
"""


def _validate_initial_events(
    event_store: EventStore[Any, Any], initial_events: Iterable[InitialEvent]
) -> tuple[tuple[Event, ...], InMemoryEventStorageAdapter]:
    """Validate seed events now, so that bad data fails where the test sets it up.

    Returns the validated events (those without a timestamp share one, taken here) and an
    in-memory adapter seeded with them. The adapter holds copies: ``MockedEventStore.reset``
    copies it again, so it brings back the seed even if a test changed the event objects.
    """
    if isinstance(initial_events, str | bytes | Mapping | Event):
        raise TypeError(
            "initial_events must be an iterable of events, not a single "
            f"{type(initial_events).__name__}; wrap it in a list"
        )
    context = event_store.context
    validated = [context.validate_input(event, timestamp=False) for event in initial_events]
    now = utc_now()
    events = tuple(stamped(event, now) for event in validated)
    # The adapter refuses repeated versions: building it here reports them at mock time.
    return events, InMemoryEventStorageAdapter(initial_events={event_store.event_store_id: events})


class MockedEventStore(EventStore[AggregateT, EventT]):
    """An ``EventStore`` twin on its own in-memory adapter, seeded with initial events.

    It has the original's id, event types, reducer, side-effect simulator and limits. Its
    ``on_event_pushed`` hook starts unset, as in Castore: a hook usually reaches outside
    the store (publishing, projections), which a test of the store should not trigger by
    accident. Set ``mocked.on_event_pushed`` to test a hook on purpose. For the same reason
    the mock of a ``ConnectedEventStore`` does not publish; wrap the mock in a
    ``ConnectedEventStore`` of a test channel to test publishing.

    Args:
        event_store: The store to copy; it is not modified.
        initial_events: Events the adapter starts with, validated against the store's event
            types (instances, mappings or JSON text).

    Raises:
        pydantic.ValidationError: An initial event is invalid.
        UnknownEventTypeError: An initial event's type is not one of the store's.
        ValueError: Two initial events share an aggregate id and version.

    Attributes:
        initial_events: The validated initial events, timestamps filled in.
    """

    def __init__(
        self,
        event_store: EventStore[AggregateT, EventT],
        initial_events: Iterable[EventT | Mapping[str, Any] | str | bytes] = (),
    ) -> None:
        super().__init__(
            event_store_id=event_store.event_store_id,
            event_types=event_store.event_types,
            reducer=event_store.reducer,
            simulate_side_effect=event_store.simulate_side_effect,
            limits=event_store.context.limits,
        )
        self.initial_events: tuple[Event, ...]
        self.initial_events, self._seeded = _validate_initial_events(event_store, initial_events)
        self.reset()

    def __repr__(self) -> str:
        return f"MockedEventStore(event_store_id={self.event_store_id!r})"

    def reset(self) -> None:
        """Install a fresh in-memory adapter holding only the initial events.

        Everything pushed since the mock was made (or last reset) is gone. The initial events
        are the ones given when the mock was made: changing ``initial_events`` (or the event
        objects it holds) afterwards changes nothing.
        """
        self.event_storage_adapter = self._seeded.copy_storage()


def mock_event_store(
    event_store: EventStore[AggregateT, EventT],
    initial_events: Iterable[EventT | Mapping[str, Any] | str | bytes] = (),
) -> MockedEventStore[AggregateT, EventT]:
    """Copy an event store onto a fresh in-memory adapter seeded with ``initial_events``.

    The original store keeps its adapter (or lack of one). Events pushed to the copy are kept
    until ``reset()``, which brings back exactly the initial events.

    Args:
        event_store: The store to copy.
        initial_events: Events to start with: instances of the store's event types, mappings
            (``aggregateId`` or ``aggregate_id``) or JSON text, validated now.

    Returns:
        The mocked store.

    Raises:
        pydantic.ValidationError: An initial event is invalid.
        UnknownEventTypeError: An initial event's type is not one of the store's.
        ValueError: Two initial events share an aggregate id and version.
    """
    return MockedEventStore(event_store, initial_events)


def mute_event_store(
    event_store: EventStore[Any, EventT],
    initial_events: Iterable[EventT | Mapping[str, Any] | str | bytes] = (),
) -> None:
    """Replace a store's adapter, in place, with an in-memory one seeded with ``initial_events``.

    Use it when code under test imports the store itself (a module-level ``pokemons``) and a
    copy would not be seen. Nothing else about the store changes, ``on_event_pushed``
    included. The pytest fixture ``mute_store`` puts the previous adapter back afterwards.

    Args:
        event_store: The store to mute; its ``event_storage_adapter`` is replaced.
        initial_events: Events to start with, validated now (see ``mock_event_store``).

    Raises:
        pydantic.ValidationError: An initial event is invalid; the store is left unchanged.
        UnknownEventTypeError: An initial event's type is not one of the store's.
        ValueError: Two initial events share an aggregate id and version.
    """
    _, event_store.event_storage_adapter = _validate_initial_events(event_store, initial_events)
