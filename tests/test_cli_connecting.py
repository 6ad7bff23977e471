"""How ``castore`` connects to PostgreSQL: once per command, within the URL's own timeout."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from castore_pydantic.cli import EXIT_STORAGE, EXIT_USAGE
from tests.services import POSTGRES_HOST, POSTGRES_PORT, require_postgres
from tests.test_cli import (  # the fixtures are used by name
    POKEMONS,
    castore,
    channels,  # noqa: F401
    one_line_error,
    pokemon_lines,
    restore_sys_path,  # noqa: F401
)

pytestmark = pytest.mark.postgres


class Proxy:
    """A TCP proxy to the test server in a thread, counting the connections made through it.

    With ``silent``, it forwards nothing and never answers, as a hung server: the kernel
    accepts the connections, nobody reads them.
    """

    def __init__(self, *, silent: bool = False) -> None:
        self.silent = silent
        self.accepted = 0
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        if not silent:
            self._spawn(self._accept)

    def url(self, database: str = "test", query: str = "") -> str:
        """A URL of ``database`` through the proxy."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}{query}"

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.accepted += 1
                self._sockets.append(client)
            try:
                server = socket.create_connection((POSTGRES_HOST, POSTGRES_PORT))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets.append(server)
            self._spawn(self._pump, client, server)
            self._spawn(self._pump, server, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop accepting and hang up every connection."""
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    """A counting proxy to the test server."""
    require_postgres()
    proxy = Proxy()
    yield proxy
    proxy.close()


@pytest.fixture
def hung() -> Iterator[Proxy]:
    """A server that accepts connections and never answers."""
    proxy = Proxy(silent=True)
    yield proxy
    proxy.close()


@pytest.fixture
def table() -> Iterator[str]:
    """A fresh events table name in database ``test``, dropped afterwards."""
    require_postgres()
    import psycopg
    from psycopg import sql

    name = f"cli_connect_{uuid.uuid4().hex[:10]}"
    yield name
    dsn = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


class TestOneConnectionPerCommand:
    """A command makes one connection to PostgreSQL, and works on it."""

    def test_each_command_connects_once(
        self,
        proxy: Proxy,
        table: str,
        channels: str,  # noqa: F811
    ) -> None:
        """Importing, listing, reading, folding, exporting and pouring each connect once.
        (Each connected four times: the command's own check, the adapter's, and the pool's
        first connection and a second one started as the first was awaited.)"""
        where = ("-s", POKEMONS, "--url", proxy.url(), "--table", table)
        commands: list[tuple[tuple[str, ...], bytes | None]] = [
            (("import", *where, "--create-table"), pokemon_lines()),
            (("aggregates", *where, "--json"), None),
            (("events", *where, "pikachu", "--json"), None),
            (("aggregate", *where, "pikachu", "--json"), None),
            (("export", *where), None),
            (("pour", *where, "-c", f"{channels}:bus"), None),
        ]
        for args, stdin in commands:
            before = proxy.accepted
            result = castore(*args, stdin=stdin)
            assert result.exit_code == 0, result.output
            assert proxy.accepted - before == 1, args
        assert castore("export", *where).stdout_bytes == pokemon_lines()

    def test_a_failing_command_connects_once(self, proxy: Proxy, table: str) -> None:
        """A table that does not exist is found on the one connection (exit 4)."""
        result = castore("aggregates", "-s", POKEMONS, "--url", proxy.url(), "--table", table)
        assert result.exit_code == EXIT_STORAGE
        assert "does not exist" in one_line_error(result)
        assert proxy.accepted == 1


class TestConnectTimeout:
    """A URL's ``connect_timeout`` (or ``PGCONNECT_TIMEOUT``) is the user's; ``--timeout``
    applies without one."""

    @pytest.mark.parametrize(
        ("query", "options", "environment", "seconds"),
        [
            ("?connect_timeout=2", (), {}, 2),
            ("?connect_timeout=3", ("--timeout", "1"), {}, 3),
            ("", (), {"PGCONNECT_TIMEOUT": "2"}, 2),
        ],
    )
    def test_a_hung_server_is_given_up_after_the_urls_timeout(
        self,
        hung: Proxy,
        query: str,
        options: tuple[str, ...],
        environment: dict[str, str],
        seconds: float,
    ) -> None:
        """A server that never answers: exit 4 after about the URL's connect_timeout, with
        or without --timeout. (--timeout's, 10 by default, replaced the URL's.)"""
        started = time.monotonic()
        result = castore(
            "aggregates", "-s", POKEMONS, "--url", hung.url(query=query), *options,
            env=environment,
        )  # fmt: skip
        waited = time.monotonic() - started
        assert result.exit_code == EXIT_STORAGE, result.output
        assert "cannot connect to PostgreSQL" in one_line_error(result)
        assert seconds - 0.5 <= waited < seconds + 2.5

    @pytest.mark.parametrize(
        ("query", "environment"),
        [
            ("", {}),
            ("?connect_timeout=0", {}),
            ("?connect_timeout=-3", {}),
            ("?connect_timeout=soon", {}),
            ("", {"PGCONNECT_TIMEOUT": "0"}),
        ],
    )
    def test_without_one_the_timeout_applies(
        self, hung: Proxy, query: str, environment: dict[str, str]
    ) -> None:
        """Without a connect_timeout above 0 (0 is no limit to libpq; a negative or
        unreadable one is none), --timeout bounds the attempt, as docs/cli.md says."""
        started = time.monotonic()
        result = castore(
            "aggregates", "-s", POKEMONS, "--url", hung.url(query=query), "--timeout", "1",
            env=environment,
        )  # fmt: skip
        waited = time.monotonic() - started
        assert result.exit_code == EXIT_STORAGE, result.output
        assert "cannot connect to PostgreSQL" in one_line_error(result)
        assert 0.9 <= waited < 3


def test_the_timeout_help_names_what_takes_its_place() -> None:
    """--timeout's help names PGCONNECT_TIMEOUT and a connect_timeout above 0, as
    docs/cli.md does (it named the URL's alone)."""
    help_text = " ".join(castore("aggregates", "--help").output.split())
    assert "(or else PGCONNECT_TIMEOUT) gives a connect_timeout above 0" in help_text


class TestExitCodes:
    """Each failure to connect keeps its exit code, and none waits for --timeout."""

    @pytest.mark.parametrize(
        ("url", "code", "said"),
        [
            (f"postgresql://postgres@{POSTGRES_HOST}:99999/test", EXIT_USAGE, "invalid port"),
            (
                f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test?sslmode=bogus",
                EXIT_USAGE,
                "invalid sslmode value",
            ),
            ("postgresql://postgres@127.0.0.1:1/test", EXIT_STORAGE, "refused"),
            (
                f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/no_such_db",
                EXIT_STORAGE,
                'database "no_such_db" does not exist',
            ),
            (
                f"postgresql://no_such_role@{POSTGRES_HOST}:{POSTGRES_PORT}/test",
                EXIT_STORAGE,
                'role "no_such_role" does not exist',
            ),
        ],
    )
    @pytest.mark.parametrize("command", ["aggregates", "export", "import", "pour"])
    def test_each_failure_keeps_its_exit_code(
        self,
        url: str,
        code: int,
        said: str,
        command: str,
        channels: str,  # noqa: F811
    ) -> None:
        """A malformed URL is exit 2 naming the value; a refused connection, an unknown
        database or role exit 4; each at once, whatever --timeout says."""
        require_postgres()
        args = ["-s", POKEMONS, "--url", url, "--timeout", "30"]
        if command == "pour":
            args += ["-c", f"{channels}:bus"]
        started = time.monotonic()
        result = castore(command, *args, stdin=b"" if command == "import" else None)
        assert result.exit_code == code, result.output
        error = one_line_error(result)
        prefix = "not a valid PostgreSQL URL" if code == EXIT_USAGE else "cannot connect"
        assert prefix in error
        assert said in error
        assert time.monotonic() - started < 10


class TestPourChecksTheChannelFirst:
    """``pour`` checks its channel before it connects to the store's database."""

    @pytest.mark.parametrize("server", ["refused", "hung"])
    def test_a_queue_without_worker_is_told_before_connecting(
        self,
        hung: Proxy,
        server: str,
        channels: str,  # noqa: F811
    ) -> None:
        """A queue without a worker and a database that cannot be reached: exit 2 for the
        queue, at once, without waiting for the server. (Before the connection was made
        through the adapter, the connection was tried first: exit 4, or --timeout spent.)"""
        require_postgres()
        url = "postgresql://postgres@127.0.0.1:1/test" if server == "refused" else hung.url()
        started = time.monotonic()
        result = castore(
            "pour", "-s", POKEMONS, "--url", url, "--timeout", "5",
            "-c", f"{channels}:idle_queue",
        )  # fmt: skip
        assert result.exit_code == EXIT_USAGE, result.output
        assert "has no worker" in one_line_error(result)
        assert time.monotonic() - started < 3
