"""Which bus listener receives which message: its filter patterns, worked out once.

A listener's patterns become, when it registers, one table per replay flag: whether the
listener takes every message, and otherwise which event stores it takes whole and which
event types of the others. Checking a message is then a dictionary look-up, whatever the
number of patterns.

Consumers reading raw bodies ask ``ListenerFilter.select``, which validates a body at most
once and in one of two orders:

- filter first, where many bodies may not be wanted (a Redis listener reads the whole bus
  stream): only the routing fields are read, and a message the listener did not ask for is
  skipped without being validated, so an event type or store this service does not know is
  none of its business unless it asked for it;
- validate first, where nearly every body is wanted (a RabbitMQ listener's queue gets what its
  bindings route; a listener whose patterns take every message the channel validates): the
  routing fields are read only when validation fails, to tell a body nobody asked for
  (skipped) from one the listener wants (its error is raised, and the body dead-lettered).

Both orders give the same answer for the same body.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from castore_pydantic.errors import UnknownEventTypeError
from castore_pydantic.messaging._messages import (
    AggregateExistsMessage,
    FilterPattern,
    Message,
    check_filter_pattern,
)
from castore_pydantic.messaging._wire import routing_fields

if TYPE_CHECKING:
    from collections.abc import Mapping

    from castore_pydantic.messaging._channels import MessageChannel

__all__ = ["ListenerFilter", "listened_pattern"]


def listened_pattern(
    pattern: Mapping[str, object], channel: MessageChannel[Any] | None
) -> FilterPattern:
    """Check a pattern given to a bus adapter's ``on``, against its bus once attached.

    Besides ``check_filter_pattern``'s checks, a pattern that names what the bus cannot
    carry is refused: an event store that is not one of its sources, or an event type its
    store does not declare. Castore accepts such a listener, which then hears nothing.

    Raises:
        MessageChannelEventStoreNotFoundError: The store is not one of the bus's.
        UnknownEventTypeError: The store does not declare the type.
    """
    checked = check_filter_pattern(pattern)
    store_id = checked.get("event_store_id")
    if channel is None or store_id is None:
        return checked  # not attached yet, or a type alone (it matches every message)
    store = channel.get_event_store(store_id)
    event_type = checked.get("event_type")
    if event_type is None:
        return checked
    if channel.message_class is AggregateExistsMessage:
        return checked  # never matches (no event type), as in Castore; the contract pins it
    if event_type not in store.context.known_types:
        raise UnknownEventTypeError(store_id, event_type, store.context.known_types)
    return checked


#: The event types taken of a store no pattern names: none.
_NO_TYPES: frozenset[str] = frozenset()


class _Wanted:
    """What the patterns that apply to one replay flag let through.

    Attributes:
        everything: A pattern without ``event_store_id`` matches every message (Castore's
            rule: ``event_type`` alone filters nothing).
        nothing: No pattern applies (replays, when no pattern has ``on_replay=True``).
        stores: For each store a pattern names, ``None`` when a pattern takes all of it,
            else the event types the patterns name.
    """

    __slots__ = ("everything", "nothing", "stores")

    def __init__(self, patterns: Iterable[FilterPattern]) -> None:
        self.everything = False
        self.nothing = True
        self.stores: dict[str, frozenset[str] | None] = {}
        for pattern in patterns:
            self.nothing = False
            event_store_id = pattern.get("event_store_id")
            if event_store_id is None:
                self.everything = True
                continue
            event_type = pattern.get("event_type")
            types = self.stores.get(event_store_id, _NO_TYPES)
            if types is not None:
                self.stores[event_store_id] = None if event_type is None else types | {event_type}

    def takes(self, event_store_id: str, event_type: str | None) -> bool:
        """Whether a message of this store and event type (``None``: no event) is taken."""
        if self.everything:
            return True
        types = self.stores.get(event_store_id, _NO_TYPES)
        return types is None or event_type in types

    def takes_message(self, message: Message) -> bool:
        """``takes`` for a validated message."""
        event_type = None if isinstance(message, AggregateExistsMessage) else message.event.type
        return self.takes(message.event_store_id, event_type)

    def takes_body(self, body: str | bytes | bytearray) -> bool | None:
        """``takes`` for a JSON body, from its routing fields; ``None``: validate to know.

        ``None`` when the fields cannot be read, or when an event without a type belongs
        to a store the patterns take only some types of: validation may fill the type in
        (the class's default, for a store with one event class). Validation cannot change
        the store, so such an event of a store no pattern names is not taken.
        """
        if self.nothing:
            return False
        if self.everything:
            return True
        fields = routing_fields(body)
        if fields is None:
            return None
        event_store_id, event_type, carries_event = fields
        types = self.stores.get(event_store_id, _NO_TYPES)
        if types is None:
            return True
        if carries_event and event_type is None and types:
            return None
        return event_type in types

    def filter_first(
        self, body: str | bytes | bytearray, channel: MessageChannel[Any]
    ) -> Message | None:
        """The message in ``body`` if taken, validated only if its routing fields may say so."""
        taken = self.takes_body(body)
        if taken is False:
            return None
        message: Message = channel.parse_message(body)
        if taken is None and not self.takes_message(message):
            return None
        return message

    def validate_first(
        self, body: str | bytes | bytearray, channel: MessageChannel[Any]
    ) -> Message | None:
        """The message in ``body`` if taken; the routing fields are read if it does not validate."""
        try:
            message: Message = channel.parse_message(body)
        except Exception:
            if self.takes_body(body) is False:
                return None  # not asked for: what is wrong with it is none of our business
            raise
        return message if self.takes_message(message) else None

    def covers(self, channel: MessageChannel[Any]) -> bool:
        """Whether every message ``channel`` validates is taken (as far as this can tell)."""
        if self.everything:
            return True
        for store in channel.source_event_stores:
            types = self.stores.get(store.event_store_id, _NO_TYPES)
            if types is None:
                continue
            if channel.message_type == "aggregateExists":
                return False  # it has no event type, so a typed pattern never takes it
            if not types.issuperset(store.context.known_types):
                return False
        return True


class ListenerFilter:
    """A bus listener's filter patterns, worked out once; build a new one to change them.

    Args:
        patterns: Patterns checked with ``check_filter_pattern``. A message is taken when
            any of them matches it (Castore's rules; see ``matches``).

    Attributes:
        patterns: The patterns, in the order given.
    """

    __slots__ = ("_covered", "_live", "_replay", "patterns")

    def __init__(self, patterns: Iterable[FilterPattern]) -> None:
        self.patterns = tuple(patterns)
        self._live = _Wanted(self.patterns)
        self._replay = _Wanted(p for p in self.patterns if p.get("on_replay", False))
        #: The channel last asked about, and whether each table covers it.
        self._covered: tuple[MessageChannel[Any], bool, bool] | None = None

    def __repr__(self) -> str:
        return f"ListenerFilter({list(self.patterns)!r})"

    def matches(self, message: Message, replay: bool) -> bool:
        """Whether the listener receives ``message``: any pattern ``matches`` it."""
        return (self._replay if replay else self._live).takes_message(message)

    def body_matches(self, body: str | bytes | bytearray, replay: bool) -> bool | None:
        """``matches`` for the message in a JSON body, read without validating it.

        Returns:
            ``True`` or ``False``; ``None`` when only the validated message can tell (the
            routing fields cannot be read, or an event without a type belongs to a store
            the patterns take only some types of).
        """
        return (self._replay if replay else self._live).takes_body(body)

    def select(
        self,
        body: str | bytes | bytearray,
        replay: bool,
        channel: MessageChannel[Any],
        *,
        routed: bool = False,
    ) -> Message | None:
        """The message in ``body`` validated by ``channel``, if the listener receives it.

        Args:
            body: A message body as a broker delivered it.
            replay: Whether it was published as a replay.
            channel: The channel that validates it (``parse_message``).
            routed: The broker delivered only what the patterns match (RabbitMQ bindings):
                the body is validated first, as it is nearly always wanted.

        Returns:
            The message, or ``None`` when the listener does not receive it (then it was not
            validated, or its validation failed: nothing to dead-letter).

        Raises:
            Exception: What ``channel.parse_message`` raises for a body the listener may
                receive: it does not validate, and no retry can fix that.
        """
        wanted = self._replay if replay else self._live
        if wanted.nothing:
            return None
        if routed or wanted.everything or self._covers(channel, replay):
            return wanted.validate_first(body, channel)
        return wanted.filter_first(body, channel)

    def _covers(self, channel: MessageChannel[Any], replay: bool) -> bool:
        covered = self._covered
        if covered is None or covered[0] is not channel:
            covered = self._covered = (
                channel,
                self._live.covers(channel),
                self._replay.covers(channel),
            )
        return covered[2] if replay else covered[1]
