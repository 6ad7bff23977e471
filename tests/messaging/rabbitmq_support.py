"""What the RabbitMQ adapter tests share: a private vhost per test and a TCP proxy to cut links.

The proxy sits between an adapter and the real broker, so a test can drop live connections
(the broker sees a client vanish, the client sees its socket die) or refuse new ones, which
is how a crashed worker or a broker outage looks on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import aio_pika
import pytest
from pydantic import BaseModel

from castore_pydantic import Aggregate, Event, EventStore
from castore_pydantic.messaging import Message, NotificationMessage
from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
from tests.services import RABBITMQ_HOST, RABBITMQ_PORT, require_command, require_rabbitmq

#: Each step takes milliseconds; past this one is stuck and the test fails naming it.
WITHIN = 20


@contextlib.asynccontextmanager
async def within(what: str, seconds: float = WITHIN) -> AsyncIterator[None]:
    """Fail the test, naming ``what``, if the block has not finished after ``seconds``."""
    deadline = asyncio.timeout(seconds)
    try:
        async with deadline:
            yield
    finally:
        if deadline.expired():
            pytest.fail(f"{what} did not happen within {seconds}s")


def vhost_url(vhost: str, *, port: int = RABBITMQ_PORT, host: str = RABBITMQ_HOST) -> str:
    """The AMQP URL of ``vhost`` as the guest user."""
    return f"amqp://guest:guest@{host}:{port}/{vhost}"


def _rabbitmqctl(*args: str) -> None:
    require_command("rabbitmqctl", "the RabbitMQ tests make vhosts and policies with it")
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def queue_policy(vhost: str, pattern: str, definition: str) -> Iterator[None]:
    """An operator's policy on the queues of ``vhost`` matching ``pattern``, while inside."""
    name = f"castore_test_{secrets.token_hex(4)}"
    _rabbitmqctl("set_policy", "-p", vhost, name, pattern, definition, "--apply-to", "queues")
    try:
        yield
    finally:
        _rabbitmqctl("clear_policy", "-p", vhost, name)


@contextlib.contextmanager
def private_vhost() -> Iterator[str]:
    """Create a vhost only these tests use (guest may do anything there); delete it after.

    Synchronous, so a module-scoped fixture can share one vhost between tests (each test
    uses its own queue names and purges them).
    """
    require_rabbitmq()
    name = f"castore_test_{secrets.token_hex(6)}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        _rabbitmqctl("delete_vhost", name)


class TcpProxy:
    """A local TCP proxy to the broker that can drop, stall or refuse connections."""

    def __init__(self, host: str = RABBITMQ_HOST, port: int = RABBITMQ_PORT) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        #: Links whose bytes from the broker are thrown away (``stall``).
        self._stalled: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        #: While true, links made from now on are stalled from their first byte.
        self.stall_new = False
        self.port = 0
        self.drops = 0

    async def start(self) -> int:
        """Listen (on the same port as before, after ``refuse``); return the port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def url(self, vhost: str) -> str:
        """The AMQP URL of ``vhost`` through this proxy."""
        return vhost_url(vhost, port=self.port, host="127.0.0.1")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        if self.stall_new:
            self._stalled.add(link)
        for source, sink, from_broker in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pump(source, sink, link, from_broker=from_broker))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        link: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
        *,
        from_broker: bool,
    ) -> None:
        try:
            while data := await source.read(65536):
                if from_broker and link in self._stalled:
                    continue  # lost on the way: the client waits for an answer for ever
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._abort(link)

    def _abort(self, link: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
        self._stalled.discard(link)
        if link in self._links:
            self._links.discard(link)
            for writer in link:
                writer.transport.abort()

    def drop(self) -> int:
        """Cut every live connection abruptly (no AMQP close); return how many were cut."""
        links = list(self._links)
        for link in links:
            self._abort(link)
        self.drops += len(links)
        return len(links)

    def stall(self) -> int:
        """Stop passing on what the broker sends on every live connection (new ones work).

        The client's frames still reach the broker, which acts on them, but no answer, no
        confirmation and no heartbeat comes back: a link that died silently, or a broker
        that blocks its publishers. Returns how many connections were stalled.
        """
        self._stalled |= self._links
        return len(self._links)

    async def refuse(self) -> None:
        """Stop listening and cut every live connection: the broker looks down."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.drop()

    async def close(self) -> None:
        """Stop the proxy and wait for its tasks."""
        await self.refuse()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)


# -- a small domain shared by the RabbitMQ tests -------------------------------------------


class Appeared(BaseModel):
    """Payload of ``PokemonAppeared``."""

    name: str
    level: int


class PokemonAppeared(Event):
    """A Pokémon appeared."""

    type: Literal["POKEMON_APPEARED"] = "POKEMON_APPEARED"
    payload: Appeared


class PokemonCaught(Event):
    """A Pokémon was caught."""

    type: Literal["POKEMON_CAUGHT"] = "POKEMON_CAUGHT"


class Pokemon(Aggregate):
    """The aggregate the events fold into."""

    name: str
    status: Literal["wild", "caught"]


def reduce_pokemon(pokemon: Pokemon | None, event: PokemonAppeared | PokemonCaught) -> Pokemon:
    """Fold one event."""
    if isinstance(event, PokemonAppeared):
        return Pokemon(
            aggregate_id=event.aggregate_id,
            version=event.version,
            name=event.payload.name,
            status="wild",
        )
    assert pokemon is not None
    return pokemon.model_copy(update={"version": event.version, "status": "caught"})


def pokemon_store(event_store_id: str = "POKEMONS") -> EventStore[Pokemon, Any]:
    """A fresh in-memory event store of Pokémon events."""
    return EventStore(
        event_store_id=event_store_id,
        event_types=[PokemonAppeared, PokemonCaught],
        reducer=reduce_pokemon,
        event_storage_adapter=InMemoryEventStorageAdapter(),
    )


T0 = datetime(2024, 1, 1, tzinfo=UTC)


def notification(index: int, *, event_store_id: str = "POKEMONS") -> NotificationMessage:
    """The ``index``-th of a series of distinct notification messages."""
    event: Event
    if index % 2 == 0:
        event = PokemonAppeared(
            aggregate_id=f"pokemon-{index // 2}",
            version=1,
            timestamp=T0 + timedelta(milliseconds=index),
            payload=Appeared(name=f"Pikachu {index}", level=1 + index % 100),
        )
    else:
        event = PokemonCaught(
            aggregate_id=f"pokemon-{index // 2}",
            version=2,
            timestamp=T0 + timedelta(milliseconds=index),
        )
    return NotificationMessage(event_store_id=event_store_id, event=event)


def event_key(message: Message) -> tuple[str, str, int]:
    """What a deduplicating consumer keys on: ``(event_store_id, aggregate_id, version)``."""
    assert isinstance(message, NotificationMessage)
    return (message.event_store_id, message.event.aggregate_id, message.event.version)


class DeadLetterWatch(logging.Handler):
    """Counts the adapters' dead-letter log records so a test can await them, not sleep."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.queues: list[str] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        """Record a dead letter (called in the event loop's thread)."""
        queue = getattr(record, "castore_dead_letter_queue", None)
        if queue is not None:
            self.queues.append(queue)
            self._changed.set()

    async def wait_for(self, count: int) -> None:
        """Return once ``count`` messages were dead-lettered in all."""
        while len(self.queues) < count:
            self._changed.clear()
            await self._changed.wait()

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[DeadLetterWatch]:
        """Attach a watch to the ``castore_pydantic.messaging`` logger for the block."""
        watch = cls()
        log = logging.getLogger("castore_pydantic.messaging")
        log.addHandler(watch)
        try:
            yield watch
        finally:
            log.removeHandler(watch)


class LogWatch(logging.Handler):
    """Keeps the adapters' log records from INFO up so a test can await one, not sleep."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        """Keep a record (called in the event loop's thread)."""
        self.records.append(record)
        self._changed.set()

    def messages(self, level: int = logging.INFO) -> list[str]:
        """The messages logged at ``level`` or above, in order."""
        return [record.getMessage() for record in self.records if record.levelno >= level]

    def count(self, text: str, level: int = logging.INFO) -> int:
        """How many messages at ``level`` or above contain ``text``."""
        return sum(text in message for message in self.messages(level))

    async def wait_for(self, text: str, *, count: int = 1, level: int = logging.INFO) -> None:
        """Return once ``count`` messages at ``level`` or above contained ``text``."""
        while self.count(text, level) < count:
            self._changed.clear()
            await self._changed.wait()

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[LogWatch]:
        """Watch the ``castore_pydantic.messaging`` logger, from INFO up, for the block."""
        watch = cls()
        log = logging.getLogger("castore_pydantic.messaging")
        level = log.level
        log.setLevel(logging.INFO)
        log.addHandler(watch)
        try:
            yield watch
        finally:
            log.removeHandler(watch)
            log.setLevel(level)


async def queue_state(url: str, queue: str) -> tuple[int, int]:
    """``(messages, consumers)`` of ``queue``, as the broker reports them."""
    async with (
        await aio_pika.connect(url) as connection,
        connection.channel() as channel,
    ):
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return (result.message_count or 0, result.consumer_count or 0)


async def message_count(url: str, queue: str) -> int:
    """How many messages ``queue`` holds."""
    return (await queue_state(url, queue))[0]


async def consumer_count(url: str, queue: str) -> int:
    """How many consumers the broker counts on ``queue``."""
    return (await queue_state(url, queue))[1]


async def stopped_consuming(adapter: Any, what: str, seconds: float) -> None:
    """Wait until ``adapter.is_consuming`` says false (polled: no event tells a user)."""
    async with within(what, seconds):
        while True:
            if not adapter.is_consuming:
                break
            await asyncio.sleep(0.01)
