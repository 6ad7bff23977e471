"""Storage adapters: the ``EventStorageAdapter`` Protocol and what adapters share.

Adapters live in their own submodules, imported on purpose so that no driver is imported
before it is needed: ``storage.memory`` (``InMemoryEventStorageAdapter``), ``storage.sqlite``
(``SQLiteEventStorageAdapter``, standard library) and ``storage.postgres``
(``PostgresEventStorageAdapter``, extra ``[postgres]``).
"""

from castore_pydantic._event_limits import EventLimits
from castore_pydantic._paging import ListingOptions
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic._types import (
    AggregateIdEntry,
    EventStorageAdapter,
    GroupedEvent,
    ListAggregateIdsResult,
)

__all__ = [
    "AggregateIdEntry",
    "EventLimits",
    "EventStorageAdapter",
    "EventStoreContext",
    "GroupedEvent",
    "ListAggregateIdsResult",
    "ListingOptions",
]
