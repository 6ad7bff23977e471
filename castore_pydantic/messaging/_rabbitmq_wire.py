"""What the RabbitMQ adapters put on the wire: names, routing keys, headers, error mapping.

Imported only through ``castore_pydantic.messaging.rabbitmq``, which checks that aio-pika is
installed first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import aio_pika
import aiormq

from castore_pydantic.errors import MessageBrokerUnavailableError, MessagingError
from castore_pydantic.messaging._messages import (
    AggregateExistsMessage,
    FilterPattern,
    Message,
    MessageHandler,
    describe_error,
)
from castore_pydantic.messaging._routing import ListenerFilter

if TYPE_CHECKING:
    from castore_pydantic.messaging._channels import MessageChannel

__all__ = [
    "ATTEMPTS_HEADER",
    "ATTEMPT_HEADER",
    "BROKER_ERRORS",
    "ERROR_HEADER",
    "REPLAY_HEADER",
    "Subscription",
    "access_refused",
    "amqp_properties",
    "attempt_of",
    "binding_keys",
    "check_name",
    "declared_otherwise",
    "name_part",
    "raise_broker_error",
    "routing_key",
]

#: Header carrying the replay flag beside the body (``true`` / ``false``).
REPLAY_HEADER = "replay"
#: Header carrying the attempt number of a retried delivery (absent on the first one).
ATTEMPT_HEADER = "x-attempt"
#: Dead letters: the last error, as text (``"ValueError: boom"``).
ERROR_HEADER = "x-error"
#: Dead letters: how many times the message was handled.
ATTEMPTS_HEADER = "x-attempts"

_AGGREGATE_EXISTS_WORD = "__AGGREGATE_EXISTS__"  # a reserved type: no event can carry it
_ESCAPES = str.maketrans({"%": "%25", ".": "%2E", "*": "%2A", "#": "%23"})
_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
_MAX_ROUTING_KEY_BYTES = 255  # an AMQP short string
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:@#,/ ")
# AMQP allows 255 characters; aio-pika (pamqp) checks exchange names against 127.
_MAX_NAME_LENGTH = {"queue": 255, "exchange": 127}

# Errors that mean "the broker cannot be reached now": retriable.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and TimeoutError
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)
# Connection errors that retrying will not fix: wrong credentials, vhost or protocol.
_MISCONFIGURED: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AuthenticationError,
    aiormq.exceptions.ProbableAuthenticationError,
    aiormq.exceptions.IncompatibleProtocolError,
    aiormq.exceptions.ConnectionNotAllowed,
)
#: Everything the driver raises when the broker fails or refuses.
BROKER_ERRORS: tuple[type[BaseException], ...] = (*_UNAVAILABLE, aiormq.exceptions.AMQPError)


def _word(value: str) -> str:
    """One routing-key word: ``%``, ``.``, ``*`` and ``#`` escaped; ``""`` becomes ``%``."""
    return value.translate(_ESCAPES) if value else "%"


def routing_key(message: Message, *, replay: bool = False) -> str:
    """The routing key a bus message is published with.

    ``live.<event store id>.<event type>`` (``replay.`` for replays), each id escaped so that
    dots and wildcards in ids cannot widen a binding; aggregate-exists messages use the
    reserved type ``__AGGREGATE_EXISTS__``, which no event type can take.

    Raises:
        ValueError: The key is longer than AMQP's 255 bytes.
    """
    event_type = (
        _AGGREGATE_EXISTS_WORD
        if isinstance(message, AggregateExistsMessage)
        else _word(message.event.type)
    )
    key = f"{'replay' if replay else 'live'}.{_word(message.event_store_id)}.{event_type}"
    if len(key.encode()) > _MAX_ROUTING_KEY_BYTES:
        raise ValueError(
            f"routing key for event store {message.event_store_id!r} is longer than "
            f"{_MAX_ROUTING_KEY_BYTES} bytes; use shorter event store ids and event types"
        )
    return key


def binding_keys(pattern: FilterPattern) -> tuple[str, ...]:
    """The topic bindings that deliver exactly the messages a filter pattern matches.

    Castore's rules: ``on_replay`` also binds ``replay.`` keys; a pattern with both
    ``event_store_id`` and ``event_type`` binds that store and type; ``event_store_id`` alone
    binds every type of the store; anything else (``{}``, or ``event_type`` alone) binds all.
    """
    prefix = "*" if pattern.get("on_replay", False) else "live"
    event_store_id = pattern.get("event_store_id")
    event_type = pattern.get("event_type")
    if event_store_id is not None and event_type is not None:
        return (f"{prefix}.{_word(event_store_id)}.{_word(event_type)}",)
    if event_store_id is not None:
        return (f"{prefix}.{_word(event_store_id)}.*",)
    return ("#",) if prefix == "*" else ("live.#",)


def name_part(value: str) -> str:
    """Make an id usable in an AMQP name: other characters become ``+XX`` (UTF-8 bytes)."""
    if all(char in _NAME_CHARS for char in value):
        return value
    return "".join(
        char if char in _NAME_CHARS else "".join(f"+{byte:02X}" for byte in char.encode())
        for char in value
    )


def check_name(kind: str, name: str) -> str:
    """Check a queue or exchange name (``kind``) before the broker refuses it.

    Raises:
        ValueError: Empty, too long, starting with ``amq.``, or with characters AMQP refuses.
    """
    limit = _MAX_NAME_LENGTH[kind]
    if (
        not name
        or len(name) > limit
        or name.startswith("amq.")
        or any(char not in _NAME_CHARS and char != "+" for char in name)
    ):
        raise ValueError(
            f"invalid RabbitMQ {kind} name {name!r}: use 1 to {limit} letters, digits and "
            "-_.:@#,/+ (not starting with 'amq.'); shorten the channel or listener id, or "
            "the name_prefix"
        )
    return name


def attempt_of(headers: Mapping[str, Any]) -> int:
    """The attempt number a delivery carries (1 when absent or malformed)."""
    value = headers.get(ATTEMPT_HEADER, 1)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def amqp_properties(headers: dict[str, Any]) -> aiormq.spec.Basic.Properties:
    """The properties of every message the adapters publish: persistent JSON, ``headers``."""
    return aiormq.spec.Basic.Properties(
        content_type="application/json", delivery_mode=_PERSISTENT, headers=headers
    )


def _closed_while_opening(error: BaseException) -> bool:
    """Whether the broker closed the connection while it was being opened.

    RabbitMQ does so for a vhost that does not exist (or that the user may not use); the
    driver reports it as an unexpected frame, naming only the frames.
    """
    text = str(error)
    return (
        isinstance(error, aiormq.exceptions.InvalidFrameError)
        and "Connection.OpenOk" in text
        and "Connection.Close" in text
    )


def declared_otherwise(error: BaseException) -> bool:
    """Whether the broker refused a declaration because the queue or exchange exists otherwise.

    RabbitMQ answers PRECONDITION_FAILED with "inequivalent arg" when a queue or exchange
    of that name exists with other arguments or of another type: that lasts until someone
    deletes or changes it. It answers PRECONDITION_FAILED for passing refusals too (a
    vhost's queue limit reached, say), which retrying outlasts. The reply's start is read,
    not the whole of it: a passing refusal quotes queue names, which may hold those words.
    """
    if not isinstance(error, aiormq.exceptions.ChannelPreconditionFailed) or not error.args:
        return False
    reply = error.args[0]
    return isinstance(reply, str) and reply.startswith("PRECONDITION_FAILED - inequivalent arg")


def access_refused(error: BaseException) -> bool:
    """Whether the broker refused an operation because the user lacks a permission.

    RabbitMQ answers ACCESS_REFUSED (403) when the user in the URL may not configure (declare
    or delete), write to (publish to) or read from (consume) a queue or exchange of the vhost:
    that lasts until an operator changes the user's permissions.
    """
    return isinstance(error, aiormq.exceptions.ChannelAccessRefused)


PERMISSION_ADVICE = (
    "the user in the URL lacks a permission on the vhost, as the broker's reason says. The"
    " adapters need configure, write and read on their queues (a retry queue's dead-letter"
    " setting needs read on it), write on the default exchange and, for a bus, on its"
    " exchange, and read on that exchange to bind to it: grant them, e.g. with rabbitmqctl"
    " set_permissions"
)


def _refusal(error: BaseException) -> str:
    if _closed_while_opening(error):
        return "closed while opening, as for a vhost that does not exist"
    return type(error).__name__


def raise_broker_error(url: str, error: BaseException) -> NoReturn:
    """Raise our error for a driver error, with the driver error as ``__cause__``.

    Args:
        url: The broker URL with its password masked.
        error: What the driver raised.

    Raises:
        MessageBrokerUnavailableError: The broker cannot be reached or the link dropped.
        MessagingError: The broker refused the credentials, a declaration (one that exists
            with other arguments is named as such, and a permission the user lacks) or a
            message.
    """
    if isinstance(error, _MISCONFIGURED) or _closed_while_opening(error):
        raise MessagingError(
            f"RabbitMQ at {url} refused the connection ({_refusal(error)}): "
            "check the user, password and vhost in the URL"
        ) from error
    if declared_otherwise(error):
        raise MessagingError(
            f"RabbitMQ at {url} refused a declaration ({describe_error(error)}): a queue or "
            "exchange of that name exists with other arguments or of another type (made by "
            "another version, or by hand); delete it, or give every adapter using it the "
            "same options"
        ) from error
    if access_refused(error):
        raise MessagingError(
            f"RabbitMQ at {url} refused access ({describe_error(error)}): {PERMISSION_ADVICE}"
        ) from error
    if isinstance(error, _UNAVAILABLE):
        raise MessageBrokerUnavailableError(
            f"RabbitMQ at {url} is unavailable ({describe_error(error)}); "
            "retry when the broker is back"
        ) from error
    raise MessagingError(f"RabbitMQ at {url} failed: {describe_error(error)}") from error


@dataclass(eq=False)
class Subscription:
    """One consumed queue: a queue adapter's queue, or one bus listener's queue.

    Attributes:
        queue: The consumed queue's name.
        handler: Returns the handler to call (a queue's worker can be replaced).
        listener_id: The bus listener's id (``None`` for queues).
        patterns: The bus listener's filter patterns (empty for queues).
    """

    queue: str
    handler: Callable[[], MessageHandler | None]
    listener_id: str | None = None
    patterns: list[FilterPattern] = field(default_factory=list)
    _filter: ListenerFilter | None = field(default=None, init=False, repr=False)

    def select(self, body: bytes, replay: bool, channel: MessageChannel[Any]) -> Message | None:
        """The message in ``body`` validated by ``channel``, or ``None`` if not for this queue.

        A queue's worker takes every message. A bus listener's queue gets what its bindings
        route, which its patterns almost always match: the body is validated first, and
        its routing fields are read only if that fails (a binding left from an earlier run
        may route bodies the listener never asked for: those are skipped, whatever they
        hold).

        Raises:
            Exception: What ``channel.parse_message`` raises for a body this queue takes:
                no retry can fix it.
        """
        if not self.patterns:
            message: Message = channel.parse_message(body)
            return message
        listener_filter = self._filter
        if listener_filter is None or len(listener_filter.patterns) != len(self.patterns):
            # Worked out on the first message, and again if the list (the adapter's) grew
            # since.
            listener_filter = self._filter = ListenerFilter(self.patterns)
        return listener_filter.select(body, replay, channel, routed=True)

    @property
    def dead_letter_queue(self) -> str:
        """Where messages go once their retries are spent: ``<queue>.dead``."""
        return f"{self.queue}.dead"

    def retry_queue(self, delay_ms: int) -> str:
        """The queue that holds messages for ``delay_ms`` before sending them back."""
        return f"{self.queue}.retry.{delay_ms}ms"
