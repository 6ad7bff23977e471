"""``ConnectedEventStore``: an event store that publishes every pushed event to a channel."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from castore_pydantic._aggregate import AggregateT, EventT, Reducer
from castore_pydantic._event import Event
from castore_pydantic._event_store import EventStore, OnEventPushed, SimulateSideEffect
from castore_pydantic._serialization import EventStoreContext
from castore_pydantic._types import (
    EventStorageAdapter,
    GetAggregateResult,
    GetEventsResult,
    GetExistingAggregateResult,
    GroupedEvent,
    ListAggregateIdsResult,
    PushEventResult,
    call_and_await,
)
from castore_pydantic.messaging._channels import (
    AggregateExistsMessageChannel,
    MessageChannel,
    NotificationMessageChannel,
    StateCarryingMessageChannel,
)
from castore_pydantic.messaging._messages import (
    AggregateExistsMessage,
    NotificationMessage,
    StateCarryingMessage,
)

__all__ = ["ConnectedEventStore"]


class ConnectedEventStore(EventStore[AggregateT, EventT]):
    """An event store that publishes a message to a channel after every successful push.

    It has the wrapped store's API and can be used wherever an ``EventStore`` is expected;
    reads and the storage adapter are the wrapped store's. What is published depends on the
    channel's kind:

    - notification channel: ``NotificationMessage(event_store_id, event)``;
    - state-carrying channel: ``StateCarryingMessage(event_store_id, event, aggregate)``,
      with the aggregate computed by the push when it could be (version 1, or
      ``prev_aggregate`` given), else read back up to the event's version;
    - aggregate-exists channel: ``AggregateExistsMessage`` for version-1 events only (Castore
      publishes nothing there).

    Events pushed in a group with ``EventStore.push_event_group`` are published too, each to
    its own store's channel, after the group is written. Messages are published with
    ``replay=False``.

    Publishing happens *after* the event is committed (there is no outbox): if publishing
    fails, the event stays stored and the error (for example
    ``MessageBrokerUnavailableError``) reaches the caller; if the process dies in between,
    the message is lost. Consumers that must not miss events can re-read the store.

    Args:
        event_store: The store to wrap.
        message_channel: The channel to publish to; the store must be one of its source
            event stores.

    Raises:
        MessageChannelEventStoreNotFoundError: The store is not a source of the channel.
    """

    def __init__(
        self,
        event_store: EventStore[AggregateT, EventT],
        message_channel: MessageChannel[Any],
    ) -> None:
        # Deliberately no super().__init__(): every piece of state is the wrapped store's.
        message_channel.get_event_store(event_store.event_store_id)
        self._event_store = event_store
        self._message_channel = message_channel

    def __repr__(self) -> str:
        return (
            f"ConnectedEventStore(event_store_id={self.event_store_id!r}, "
            f"message_channel={self._message_channel!r})"
        )

    @property
    def event_store(self) -> EventStore[AggregateT, EventT]:
        """The wrapped event store."""
        return self._event_store

    @property
    def message_channel(self) -> MessageChannel[Any]:
        """The channel messages are published to."""
        return self._message_channel

    # -- the wrapped store's properties ----------------------------------------------------

    @property
    def event_store_id(self) -> str:
        """The wrapped store's id."""
        return self._event_store.event_store_id

    @property
    def event_types(self) -> tuple[type[Event], ...]:
        """The wrapped store's event types."""
        return self._event_store.event_types

    @property
    def reducer(self) -> Reducer[AggregateT, EventT]:
        """The wrapped store's reducer."""
        return self._event_store.reducer

    @property
    def simulate_side_effect(self) -> SimulateSideEffect:
        """The wrapped store's side-effect simulator."""
        return self._event_store.simulate_side_effect

    @property
    def context(self) -> EventStoreContext:
        """The wrapped store's context."""
        return self._event_store.context

    @property
    def event_storage_adapter(self) -> EventStorageAdapter | None:
        """The wrapped store's storage adapter; setting it sets the wrapped store's."""
        return self._event_store.event_storage_adapter

    @event_storage_adapter.setter
    def event_storage_adapter(self, adapter: EventStorageAdapter | None) -> None:
        self._event_store.event_storage_adapter = adapter

    @property
    def on_event_pushed(self) -> OnEventPushed | None:
        """The wrapped store's hook; setting it sets the wrapped store's.

        Publishing is not part of it (``c.on_event_pushed = chain(c.on_event_pushed)`` chains
        the hook, as on any store): pushes and groups publish after running it.
        """
        return self._event_store.on_event_pushed

    @on_event_pushed.setter
    def on_event_pushed(self, hook: OnEventPushed | None) -> None:
        self._event_store.on_event_pushed = hook

    def _after_push(self) -> OnEventPushed:
        """For ``EventStore.push_event_group``: the wrapped store's hook, then publishing."""
        return self._on_event_pushed

    async def _on_event_pushed(self, result: PushEventResult[Any, Any]) -> None:
        hook = self._event_store._after_push()  # an inner connected store publishes too
        if hook is not None:
            await call_and_await(hook, result)
        await self.publish_pushed_event(result)

    def get_event_storage_adapter(self) -> EventStorageAdapter:
        """Return the wrapped store's storage adapter (see ``EventStore``)."""
        return self._event_store.get_event_storage_adapter()

    # -- reading: the wrapped store's ------------------------------------------------------

    async def get_events(
        self,
        aggregate_id: str,
        *,
        min_version: int | None = None,
        max_version: int | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> GetEventsResult[EventT]:
        """Return an aggregate's events (see ``EventStore.get_events``)."""
        return await self._event_store.get_events(
            aggregate_id,
            min_version=min_version,
            max_version=max_version,
            limit=limit,
            reverse=reverse,
        )

    def build_aggregate(
        self, events: Iterable[EventT], initial_aggregate: AggregateT | None = None
    ) -> AggregateT | None:
        """Fold events into an aggregate (see ``EventStore.build_aggregate``)."""
        return self._event_store.build_aggregate(events, initial_aggregate)

    async def get_aggregate(
        self, aggregate_id: str, *, max_version: int | None = None
    ) -> GetAggregateResult[AggregateT, EventT]:
        """Fold an aggregate's events (see ``EventStore.get_aggregate``)."""
        return await self._event_store.get_aggregate(aggregate_id, max_version=max_version)

    async def get_existing_aggregate(
        self, aggregate_id: str, *, max_version: int | None = None
    ) -> GetExistingAggregateResult[AggregateT, EventT]:
        """Fold an aggregate that must exist (see ``EventStore.get_existing_aggregate``)."""
        return await self._event_store.get_existing_aggregate(aggregate_id, max_version=max_version)

    async def list_aggregate_ids(
        self,
        *,
        limit: int | None = None,
        page_token: str | None = None,
        initial_event_after: datetime | str | None = None,
        initial_event_before: datetime | str | None = None,
        reverse: bool | None = None,
    ) -> ListAggregateIdsResult:
        """List aggregates (see ``EventStore.list_aggregate_ids``)."""
        return await self._event_store.list_aggregate_ids(
            limit=limit,
            page_token=page_token,
            initial_event_after=initial_event_after,
            initial_event_before=initial_event_before,
            reverse=reverse,
        )

    def simulate_aggregate(
        self,
        events: Iterable[EventT | Mapping[str, Any]],
        *,
        simulation_date: datetime | str | None = None,
    ) -> AggregateT | None:
        """Simulate an aggregate (see ``EventStore.simulate_aggregate``)."""
        return self._event_store.simulate_aggregate(events, simulation_date=simulation_date)

    # -- writing: the wrapped store's, then publish -------------------------------------

    async def push_event(
        self,
        event: EventT | Mapping[str, Any] | str | bytes,
        *,
        prev_aggregate: AggregateT | Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> PushEventResult[AggregateT, EventT]:
        """Push through the wrapped store (its own hook runs), then publish the message.

        What ``EventStore.push_event`` raises before writing is raised the same way, and then
        nothing is published. A reducer that fails on the stored event does not stop the
        publishing: its error is raised afterwards (see ``EventStore.push_event``).

        Raises:
            MessageBrokerUnavailableError: Publishing failed; the event *is* stored.
            UndefinedMessageChannelAdapterError: The channel has no adapter; the event *is*
                stored.
            Exception: On a state-carrying channel without a next aggregate (no
                ``prev_aggregate``, or the reducer failed on the event), whatever reading the
                aggregate back raises (the reducer's error, a storage error); the event *is*
                stored. A cancellation between the write and the publish leaves the event
                stored and unpublished too.
        """
        if _pushes_plainly(self):
            return await self._push(event, prev_aggregate, force, self._on_event_pushed)
        # A wrapped store overrides push_event: it is called, as any caller would, and a
        # reducer failing inside it then stops the publishing.
        result = await self._event_store.push_event(
            event, prev_aggregate=prev_aggregate, force=force
        )
        await self.publish_pushed_event(result)
        return result

    async def _push(
        self,
        event: EventT | Mapping[str, Any] | str | bytes,
        prev_aggregate: AggregateT | Mapping[str, Any] | None,
        force: bool,
        hook: OnEventPushed | None,
    ) -> PushEventResult[AggregateT, EventT]:
        # ``hook`` already runs this store's publishing (``_after_push``), however nested.
        return await self._event_store._push(event, prev_aggregate, force, hook)

    def _pushed(
        self, stored: Any, prev_aggregate: Any
    ) -> tuple[PushEventResult[Any, Any], Exception | None]:
        return self._event_store._pushed(stored, prev_aggregate)

    def group_event(
        self,
        event: EventT | Mapping[str, Any] | str | bytes,
        *,
        prev_aggregate: AggregateT | Mapping[str, Any] | None = None,
    ) -> GroupedEvent:
        """Group an event so that ``EventStore.push_event_group`` publishes it afterwards."""
        grouped = self._event_store.group_event(event, prev_aggregate=prev_aggregate)
        return dataclasses.replace(grouped, event_store=self)

    async def publish_pushed_event(self, result: PushEventResult[Any, Any]) -> None:
        """Publish the message for a push result to the channel (what a push does).

        Raises:
            MessagingError: The channel's adapter failed to publish.
        """
        channel = self._message_channel
        event = result.event
        store_id = self.event_store_id
        if isinstance(channel, NotificationMessageChannel):
            await channel.publish_message(NotificationMessage(event_store_id=store_id, event=event))
        elif isinstance(channel, StateCarryingMessageChannel):
            aggregate = result.next_aggregate
            if aggregate is None:
                aggregate = (
                    await self._event_store.get_aggregate(
                        event.aggregate_id, max_version=event.version
                    )
                ).aggregate
            await channel.publish_message(
                StateCarryingMessage(event_store_id=store_id, event=event, aggregate=aggregate)
            )
        elif isinstance(channel, AggregateExistsMessageChannel) and event.version == 1:
            await channel.publish_message(
                AggregateExistsMessage(
                    event_store_id=store_id,
                    aggregate_id=event.aggregate_id,
                    initial_event_timestamp=event.timestamp,
                )
            )


def _pushes_plainly(store: EventStore[Any, Any]) -> bool:
    """Whether every ``push_event`` a push of ``store`` goes through is the library's own.

    A subclass overriding it (to audit or authorise pushes, say) must still be called when
    connected: then a connected store pushes through it instead of the shorter way.
    """
    while True:
        push = type(store).push_event
        if push is EventStore.push_event:
            return True
        if push is not ConnectedEventStore.push_event or not isinstance(store, ConnectedEventStore):
            return False
        store = store.event_store
