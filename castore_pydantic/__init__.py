"""castore-pydantic: asyncio-first, Pydantic-validated event sourcing in Castore's image.

The core API lives here; storage adapters are in ``castore_pydantic.storage.*``, messaging in
``castore_pydantic.messaging``, test tooling in ``castore_pydantic.testing`` and every error
in ``castore_pydantic.errors``.
"""

from castore_pydantic._aggregate import Aggregate, Reducer
from castore_pydantic._command import Command, OnEventAlreadyExistsContext
from castore_pydantic._event import RESERVED_EVENT_TYPES, Event, Timestamp
from castore_pydantic._event_limits import EventLimits
from castore_pydantic._event_store import EventStore
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic._types import (
    AggregateIdEntry,
    GetAggregateResult,
    GetEventsResult,
    GetExistingAggregateResult,
    GroupedEvent,
    ListAggregateIdsResult,
    PushEventGroupResult,
    PushEventResult,
)
from castore_pydantic.errors import (
    AggregateNotFoundError,
    CastoreError,
    EventAlreadyExistsError,
    UndefinedEventStorageAdapterError,
    is_event_already_exists_error,
)

__all__ = [
    "RESERVED_EVENT_TYPES",
    "Aggregate",
    "AggregateIdEntry",
    "AggregateNotFoundError",
    "CastoreError",
    "Command",
    "Event",
    "EventAlreadyExistsError",
    "EventLimits",
    "EventStore",
    "EventStoreContext",
    "GetAggregateResult",
    "GetEventsResult",
    "GetExistingAggregateResult",
    "GroupedEvent",
    "ListAggregateIdsResult",
    "OnEventAlreadyExistsContext",
    "PushEventGroupResult",
    "PushEventResult",
    "Reducer",
    "Timestamp",
    "UndefinedEventStorageAdapterError",
    "is_event_already_exists_error",
]
