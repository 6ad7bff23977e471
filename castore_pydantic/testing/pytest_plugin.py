"""pytest fixtures for code built on castore-pydantic.

Installed packages register this plugin automatically (entry point ``pytest11``); to use it
where that is disabled, add ``pytest_plugins = ["castore_pydantic.testing.pytest_plugin"]`` to
a ``conftest.py``. It only defines fixtures, each with a name of its own, so a project that
does not ask for them is not affected: it adds no hooks, options or markers, and loading it
imports neither Hypothesis nor any database or broker driver. A fixture of the same name in
the project's own ``conftest.py`` takes precedence.

Fixtures:
    in_memory_adapter: A fresh, empty ``InMemoryEventStorageAdapter``.
    mock_store: A factory, ``mock_store(store, initial_events=())`` →
        ``mock_event_store(store, initial_events)``.
    mute_store: A factory, ``mute_store(store, initial_events=())``, that mutes a store in
        place and puts its previous adapter back when the test ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from castore_pydantic import EventStore
    from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
    from castore_pydantic.testing import InitialEvent, MockedEventStore

__all__ = ["MockStore", "in_memory_adapter", "mock_store", "mute_store"]


class MockStore(Protocol):
    """The ``mock_store`` fixture's type: ``mock_store(store, initial_events=())``."""

    def __call__(
        self, event_store: EventStore[Any, Any], initial_events: Iterable[InitialEvent] = ()
    ) -> MockedEventStore[Any, Any]:
        """Return ``mock_event_store(event_store, initial_events)``."""
        ...


@pytest.fixture
def in_memory_adapter() -> InMemoryEventStorageAdapter:
    """A fresh, empty in-memory event storage adapter."""
    from castore_pydantic.storage.memory import InMemoryEventStorageAdapter

    return InMemoryEventStorageAdapter()


@pytest.fixture(scope="session")
def mock_store() -> MockStore:
    """A factory of mocked event stores: ``mock_store(store, initial_events=())``.

    It holds no state (each call makes a new store), so it is session-scoped: Hypothesis'
    ``@given`` tests may use it.
    """
    from castore_pydantic.testing import mock_event_store

    return mock_event_store


@pytest.fixture
def mute_store() -> Iterator[Callable[..., None]]:
    """A factory that mutes stores in place and restores their adapters after the test."""
    from castore_pydantic.testing import mute_event_store

    saved: list[tuple[EventStore[Any, Any], Any]] = []

    def mute(event_store: EventStore[Any, Any], initial_events: Iterable[Any] = ()) -> None:
        previous = event_store.event_storage_adapter
        mute_event_store(event_store, initial_events)
        saved.append((event_store, previous))

    yield mute
    # Newest first, so that a store muted twice gets its original adapter back.
    for event_store, previous in reversed(saved):
        event_store.event_storage_adapter = previous
