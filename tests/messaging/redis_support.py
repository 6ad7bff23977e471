"""What the Redis adapter tests share: a private key prefix per test, messages, recorders.

Every test works under its own prefix (``castore-test:<random>:``) and deletes exactly the keys
under it afterwards: the database is shared with other suites, so nothing is flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from castore_pydantic.messaging import MessageContext, NotificationMessage
from tests.domain import Appeared, PokemonAppeared, PokemonCaught
from tests.services import REDIS_HOST, REDIS_PORT, require_redis

__all__ = [
    "REDIS_URL",
    "T0",
    "GaveUpWatch",
    "Key",
    "Recorder",
    "StallingProxy",
    "caught",
    "closed_port",
    "connections_named",
    "event_key",
    "notification",
    "private_prefix",
    "raw_client",
    "watch_dead_letters",
]

REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
T0 = datetime(2024, 1, 1, tzinfo=UTC)
#: What a deduplicating consumer keys on: ``(event_store_id, aggregate_id, version)``.
Key = tuple[str, str, int]


def raw_client() -> Redis:
    """A plain redis-py client on the test server (bytes in, bytes out)."""
    return Redis.from_url(REDIS_URL, decode_responses=False)


@contextlib.asynccontextmanager
async def private_prefix() -> AsyncIterator[str]:
    """A key prefix only this test uses; every key under it is deleted afterwards."""
    require_redis()
    prefix = f"castore-test:{secrets.token_hex(6)}:"
    try:
        yield prefix
    finally:
        client = raw_client()
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
            if keys:
                await client.unlink(*keys)
        finally:
            await client.aclose()


def notification(index: int, event_store_id: str = "POKEMONS") -> NotificationMessage:
    """The notification of pokemon ``index``'s first event (distinct ids and timestamps)."""
    return NotificationMessage(
        event_store_id=event_store_id,
        event=PokemonAppeared(
            aggregate_id=f"pokemon-{index}",
            version=1,
            timestamp=T0 + timedelta(milliseconds=index),
            payload=Appeared(name=f"Pokemon {index}", level=1 + index % 100),
        ),
    )


def caught(index: int, version: int = 2) -> NotificationMessage:
    """A POKEMON_CAUGHT notification (another event type of the same store)."""
    return NotificationMessage(
        event_store_id="POKEMONS",
        event=PokemonCaught(
            aggregate_id=f"pokemon-{index}",
            version=version,
            timestamp=T0 + timedelta(milliseconds=index),
        ),
    )


def event_key(message: Any) -> Key:
    """``(event_store_id, aggregate_id, version)`` of an event-carrying message."""
    return (message.event_store_id, message.event.aggregate_id, message.event.version)


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def connections_named(client: Redis, name: str) -> list[int]:
    """The ids of the server's client connections called ``name`` (``CLIENT SETNAME``)."""
    listed: Any = await client.client_list()
    return [int(entry["id"]) for entry in listed if entry.get("name") == name]


class StallingProxy:
    """A TCP proxy to the test Redis that can stop forwarding, as a cut network does.

    After ``stall()`` nothing more goes through either way, yet no connection is closed: a
    client's commands neither complete nor fail. Use it as ``async with StallingProxy() as
    proxy:``, then connect to ``proxy.url``.
    """

    def __init__(self) -> None:
        self.url = ""
        self._stalled = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    def stall(self) -> None:
        """Stop forwarding anything, in both directions."""
        self._stalled.set()

    async def __aenter__(self) -> StallingProxy:
        require_redis()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        for writer in self._writers:
            writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(REDIS_HOST, REDIS_PORT)
        self._writers += [writer, up_writer]
        for source, target in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._forward(source, target))
            self._tasks.add(task)

    async def _forward(self, source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if self._stalled.is_set():
                    await asyncio.Event().wait()  # hold the bytes for ever
                target.write(data)
                await target.drain()


class Recorder:
    """A handler that records what it receives and lets a test await a number of calls."""

    def __init__(self, fail: Callable[[Any, MessageContext], bool] | None = None) -> None:
        self.calls: list[tuple[Any, MessageContext]] = []
        self.times: list[float] = []
        self._fail = fail
        self._changed = asyncio.Condition()

    async def __call__(self, message: Any, context: MessageContext) -> None:
        self.calls.append((message, context))
        self.times.append(asyncio.get_running_loop().time())
        async with self._changed:
            self._changed.notify_all()
        if self._fail is not None and self._fail(message, context):
            raise ValueError(f"cannot handle {event_key(message)[1]} (attempt {context.attempt})")

    @property
    def messages(self) -> list[Any]:
        """The messages received, in order."""
        return [message for message, _ in self.calls]

    async def wait_for(self, count: int, seconds: float = 20) -> None:
        """Wait until at least ``count`` calls happened."""
        async with asyncio.timeout(seconds), self._changed:
            await self._changed.wait_for(lambda: len(self.calls) >= count)


class GaveUpWatch(logging.Handler):
    """Counts the adapter's "gave up on a message" log records, so tests await dead letters."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._changed: asyncio.Event | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if "gave up" in record.getMessage():
            self.records.append(record)
            if self._changed is not None:
                self._changed.set()

    async def wait_for(self, count: int, seconds: float = 20) -> None:
        """Wait until at least ``count`` messages were dead-lettered."""
        async with asyncio.timeout(seconds):
            while len(self.records) < count:
                self._changed = asyncio.Event()
                await self._changed.wait()


@contextlib.contextmanager
def watch_dead_letters() -> Iterator[GaveUpWatch]:
    """Watch the Redis adapters' logger for dead-lettered messages while in the block."""
    logger = logging.getLogger("castore_pydantic.messaging.redis")
    watch = GaveUpWatch()
    logger.addHandler(watch)
    try:
        yield watch
    finally:
        logger.removeHandler(watch)
