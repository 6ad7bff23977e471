"""The ``castore`` command line, end to end against real SQLite files and PostgreSQL tables."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from castore_pydantic import EventStore
from castore_pydantic.cli import (
    EXIT_BROKEN_PIPE,
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_INVALID_DATA,
    EXIT_MESSAGING,
    EXIT_NOT_FOUND,
    EXIT_STORAGE,
    EXIT_USAGE,
    cli,
    main,
)
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
from examples.pokemon.events import (
    CaughtPayload,
    PokemonAppeared,
    PokemonAppearedPayload,
    PokemonCaught,
    PokemonLeveledUp,
    TrainerCaughtPokemon,
    TrainerCaughtPokemonPayload,
    TrainerCreated,
    TrainerCreatedPayload,
)
from examples.pokemon.stores import pokemons, trainers
from tests.services import POSTGRES_HOST, POSTGRES_PORT, require_postgres

REPO_ROOT = Path(__file__).resolve().parent.parent
POKEMONS = "examples.pokemon.stores:pokemons"
TRAINERS = "examples.pokemon.stores:trainers"
PG_DSN = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
DAY = timedelta(days=1)
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def twin(store: EventStore[Any, Any], adapter: Any) -> EventStore[Any, Any]:
    """The example store's twin on ``adapter`` (the example's stores have no adapter)."""
    return EventStore(
        event_store_id=store.event_store_id,
        event_types=store.event_types,
        reducer=store.reducer,
        event_storage_adapter=adapter,
    )


def story() -> dict[str, list[Any]]:
    """A small, fully dated history: three Pokémon (Pikachu caught by Ash) and one trainer."""
    return {
        "POKEMONS": [
            PokemonAppeared(
                aggregate_id="pikachu",
                version=1,
                timestamp=T0,
                payload=PokemonAppearedPayload(name="Pikachu", level=5),
            ),
            PokemonAppeared(
                aggregate_id="eevee",
                version=1,
                timestamp=T0 + DAY,
                payload=PokemonAppearedPayload(name="Eevee", level=3),
            ),
            PokemonAppeared(
                aggregate_id="snorlax",
                version=1,
                timestamp=T0 + 2 * DAY,
                payload=PokemonAppearedPayload(name="Snorlax", level=12),
            ),
            PokemonCaught(
                aggregate_id="pikachu",
                version=2,
                timestamp=T0 + 3 * DAY,
                payload=CaughtPayload(trainer_id="ash"),
            ),
            PokemonLeveledUp(aggregate_id="pikachu", version=3, timestamp=T0 + 4 * DAY),
        ],
        "TRAINERS": [
            TrainerCreated(
                aggregate_id="ash",
                version=1,
                timestamp=T0,
                payload=TrainerCreatedPayload(name="Ash"),
            ),
            TrainerCaughtPokemon(
                aggregate_id="ash",
                version=2,
                timestamp=T0 + 3 * DAY,
                payload=TrainerCaughtPokemonPayload(pokemon_id="pikachu"),
            ),
        ],
    }


def jsonl(events: list[Any]) -> bytes:
    """Events as the JSON Lines ``castore export`` writes."""
    return b"".join(event.model_dump_json().encode() + b"\n" for event in events)


#: An event of an aggregate whose history starts at version 3 (allowed: versions need not be
#: contiguous), so it has no initial event.
LATE_MEW = PokemonLeveledUp(aggregate_id="mew", version=3, timestamp=T0 + 5 * DAY)


def pokemon_lines() -> bytes:
    """The Pokémon of ``story()`` in export order: by initial timestamp, then version."""
    by_id: dict[str, list[Any]] = {}
    for event in story()["POKEMONS"]:
        by_id.setdefault(event.aggregate_id, []).append(event)
    return jsonl([e for aid in ("pikachu", "eevee", "snorlax") for e in by_id[aid]])


async def seed(adapter: Any) -> None:
    """Push ``story()`` through the example's stores on ``adapter``."""
    for store in (twin(pokemons, adapter), twin(trainers, adapter)):
        for event in story()[store.event_store_id]:
            await store.push_event(event)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A SQLite file holding ``story()``."""
    path = tmp_path / "pokemon.db"

    async def run() -> None:
        async with SQLiteEventStorageAdapter(path) as adapter:
            await seed(adapter)

    asyncio.run(run())
    return path


@pytest.fixture
def url(db: Path) -> str:
    """The ``--url`` of the seeded SQLite file."""
    return f"sqlite:///{db}"


@pytest.fixture
def restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo the current-directory entry the CLI adds to ``sys.path``."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def castore(
    *args: str, stdin: bytes | str | None = None, env: dict[str, str] | None = None
) -> Result:
    """Run the command group in-process, as ``castore ARGS``."""
    return CliRunner().invoke(cli, list(args), input=stdin, env=env, catch_exceptions=False)


def one_line_error(result: Result) -> str:
    """The single error line of a failed run (and check that it is a single line)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


#: Puts SIGINT back to its default action, then becomes the command (same process id).
_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def with_ctrl_c(command: list[str]) -> list[str]:
    """``command`` with Ctrl-C working, however this suite was started.

    A shell starts background jobs with SIGINT ignored and children inherit that: without
    this, a suite run in the background saw every Ctrl-C test hang or run to the end.
    """
    return [sys.executable, "-c", _DEFAULT_SIGINT, *command]


def interrupted_once(
    command: list[str], *, cwd: Path, env: dict[str, str], ready: Callable[[], bool], what: str
) -> tuple[int, str]:
    """Run ``command``, press Ctrl-C (SIGINT) once ``ready()`` holds; its exit code and stderr.

    Fails, saying ``what``, if the command ends first or is not ready within a minute.
    """
    with subprocess.Popen(
        with_ctrl_c(command), cwd=cwd, env=env, stderr=subprocess.PIPE, text=True
    ) as process:
        deadline = time.monotonic() + 60
        while not ready():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, what
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


def _summary_command(command: str, channels: str) -> tuple[tuple[str, ...], Path]:
    """The arguments of a command that prints a summary once done, and its export file."""
    source, exported = Path("in.jsonl"), Path("out.jsonl")  # in the channels' directory
    source.write_bytes(pokemon_lines())
    args = {
        "import": ("import", "-s", POKEMONS, "--force", str(source)),
        "export -o FILE": ("export", "-s", POKEMONS, "-o", str(exported)),
        "pour": ("pour", "-s", POKEMONS, "-c", f"{channels}:bus"),
    }[command]
    return args, exported


def _ctrl_c(process: subprocess.Popen[str], failure: str) -> str:
    """Send the process a Ctrl-C and return its stderr once it ended; ``failure`` if not."""
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=10)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail(failure)


def count_rows_if_any(path: Path) -> int:
    """Like ``count_rows``, but 0 while the table does not exist yet."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM event").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def count_rows(path: Path) -> int:
    """How many events the SQLite file holds, all stores together."""
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM event").fetchone()[0])


def write_own_store(path: Path, db: Path) -> None:
    """A module whose ``pokemons`` store has its own SQLite adapter on ``db``."""
    path.write_text(
        textwrap.dedent(
            f"""
            from castore_pydantic import EventStore
            from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
            from examples.pokemon.stores import pokemons as example

            pokemons = EventStore(
                event_store_id="POKEMONS",
                event_types=example.event_types,
                reducer=example.reducer,
                event_storage_adapter=SQLiteEventStorageAdapter({str(db)!r}),
            )
            """
        )
    )


class ClosedPipe(io.StringIO):
    """A stdout whose reader went away, found out when it writes or only when it flushes
    (what was printed sat in the buffer until the command returned)."""

    def __init__(self, *, when: str) -> None:
        super().__init__()
        self.when = when

    def write(self, text: str) -> int:
        if self.when == "write":
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)

    def flush(self) -> None:
        if self.when == "flush" and self.getvalue():
            raise BrokenPipeError(32, "Broken pipe")

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no descriptor")


class TestEntryPoint:
    """``castore`` as a shell runs it (``main``), beyond the command group itself."""

    @pytest.mark.parametrize("when", ["write", "flush"])
    @pytest.mark.parametrize(
        "args",
        [
            ("schema", "-s", POKEMONS),
            ("aggregates", "-s", POKEMONS, "--json"),
            ("events", "-s", POKEMONS, "pikachu"),
            ("aggregate", "-s", POKEMONS, "pikachu", "--json"),
        ],
        ids=["schema", "aggregates --json", "events", "aggregate --json"],
    )
    def test_output_closed_early_is_exit_141_for_every_command(
        self, args: tuple[str, ...], when: str, url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A reader that went away (`castore aggregates --json | head`) is exit 141, whether
        the write or the flush finds out."""
        monkeypatch.setattr(sys, "stdout", ClosedPipe(when=when))
        extra = ("--url", url) if args[0] != "schema" else ()
        with pytest.raises(SystemExit) as done:
            main([*args, *extra])
        assert done.value.code == EXIT_BROKEN_PIPE

    @pytest.mark.parametrize("when", ["write", "flush"])
    @pytest.mark.parametrize("command", ["import", "export -o FILE", "pour"])
    def test_a_summary_to_a_closed_stdout_is_exit_141(
        self,
        command: str,
        when: str,
        url: str,
        channels: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The summary printed once the work is done finds the reader gone: exit 141, as
        for any output. (import, export -o FILE and pour exited 1, silently, although
        their work had succeeded.)"""
        args, exported = _summary_command(command, channels)
        monkeypatch.setattr(sys, "stdout", ClosedPipe(when=when))
        with pytest.raises(SystemExit) as done:
            main([*args, "--url", url])
        assert done.value.code == EXIT_BROKEN_PIPE
        if command == "export -o FILE":
            assert exported.read_bytes() == pokemon_lines()
        if command == "pour":
            assert len(sys.modules[channels].received) == 5

    @pytest.mark.parametrize("command", ["import", "export -o FILE", "pour"])
    def test_without_a_stdout_the_work_is_done_and_the_summary_skipped(
        self, command: str, url: str, channels: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With stdout closed before the start (``>&-``), Python's sys.stdout is None: the
        summary raised AttributeError (exit 1) after the work was done."""
        args, exported = _summary_command(command, channels)
        monkeypatch.setattr(sys, "stdout", None)
        with pytest.raises(SystemExit) as done:
            main([*args, "--url", url])
        assert done.value.code in (0, None)
        if command == "export -o FILE":
            assert exported.read_bytes() == pokemon_lines()
        if command == "pour":
            assert len(sys.modules[channels].received) == 5

    def test_usage_errors_and_help_keep_their_exit_codes(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The entry point shows click's usage errors (exit 2) and help (exit 0) as before."""
        with pytest.raises(SystemExit) as done:
            main(["aggregates"])
        assert done.value.code == EXIT_USAGE
        assert "Missing option" in capsys.readouterr().err
        with pytest.raises(SystemExit) as done:
            main(["--help"])
        assert done.value.code == 0
        assert "Usage: castore" in capsys.readouterr().out


class TestLoading:
    """Stores come from import strings and adapters from URLs; mistakes are one line."""

    def test_unknown_module(self, url: str) -> None:
        """An import string naming no module is a usage error that says so."""
        result = castore("aggregates", "-s", "no_such_module:store", "--url", url)
        assert result.exit_code == EXIT_USAGE
        assert "no such module" in one_line_error(result)

    def test_unknown_attribute(self, url: str) -> None:
        """A missing attribute is named."""
        result = castore("aggregates", "-s", "examples.pokemon.stores:nope", "--url", url)
        assert result.exit_code == EXIT_USAGE
        assert "has no 'nope'" in one_line_error(result)

    def test_not_an_event_store(self, url: str) -> None:
        """An attribute that is not an EventStore is refused with its type."""
        result = castore(
            "aggregates", "-s", "examples.pokemon.commands:catch_pokemon", "--url", url
        )
        assert result.exit_code == EXIT_USAGE
        assert "Command, not an EventStore" in one_line_error(result)

    def test_module_with_several_stores_needs_a_name(self, url: str) -> None:
        """A module holding two stores must be narrowed to one, and the choices are listed."""
        result = castore("aggregates", "-s", "examples.pokemon.stores", "--url", url)
        assert result.exit_code == EXIT_USAGE
        error = one_line_error(result)
        assert POKEMONS in error
        assert TRAINERS in error

    def test_failing_module_import(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_sys_path: None
    ) -> None:
        """A module that raises while importing is reported, not dumped as a traceback."""
        (tmp_path / "broken_stores.py").write_text("raise RuntimeError('boom at import')\n")
        monkeypatch.chdir(tmp_path)
        result = castore("aggregates", "-s", "broken_stores:store")
        assert result.exit_code == EXIT_USAGE
        assert "RuntimeError: boom at import" in one_line_error(result)

    @pytest.mark.parametrize(
        ("given", "expected"),
        [
            ("mysql://localhost/db", "unsupported database URL scheme 'mysql'"),
            ("pokemon.db", "is not a database URL"),
            ("sqlite://", "names no file"),
        ],
    )
    def test_bad_urls(self, given: str, expected: str) -> None:
        """Unsupported and malformed URLs are usage errors."""
        result = castore("aggregates", "-s", POKEMONS, "--url", given)
        assert result.exit_code == EXIT_USAGE
        assert expected in one_line_error(result)

    def test_missing_sqlite_file(self, tmp_path: Path) -> None:
        """Reading a SQLite file that does not exist fails and creates nothing."""
        missing = tmp_path / "missing.db"
        result = castore("aggregates", "-s", POKEMONS, "--url", f"sqlite:///{missing}")
        assert result.exit_code == EXIT_STORAGE
        assert "does not exist" in one_line_error(result)
        assert not missing.exists()

    def test_store_without_adapter_needs_a_url(self) -> None:
        """The example's stores have no adapter of their own: --url is required."""
        result = castore("aggregates", "-s", POKEMONS)
        assert result.exit_code == EXIT_USAGE
        assert "has no storage adapter: pass --url" in one_line_error(result)

    def test_store_as_defined(
        self, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_sys_path: None
    ) -> None:
        """Without --url the store's own adapter is used (modules load from the cwd)."""
        write_own_store(tmp_path / "my_stores.py", db)
        monkeypatch.chdir(tmp_path)
        result = castore("aggregates", "-s", "my_stores:pokemons", "--json")
        assert result.exit_code == 0, result.output
        listed = json.loads(result.stdout)["aggregateIds"]
        assert [e["aggregateId"] for e in listed] == ["pikachu", "eevee", "snorlax"]

    def test_table_and_timeout_need_a_url(
        self, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_sys_path: None
    ) -> None:
        """--table, --schema or --timeout without --url is a usage error, not an option
        ignored."""
        write_own_store(tmp_path / "own_stores.py", db)
        monkeypatch.chdir(tmp_path)
        for args, named in [
            (("--table", "archive"), "--table needs --url"),
            (("--schema", "bank"), "--schema needs --url"),
            (("--timeout", "3"), "--timeout needs --url"),
            (("--table", "event", "--timeout", "3"), "--table and --timeout need --url"),
            (
                ("--table", "event", "--schema", "bank", "--timeout", "3"),
                "--table, --schema and --timeout need --url",
            ),
        ]:
            result = castore("aggregates", "-s", "own_stores:pokemons", *args)
            assert result.exit_code == EXIT_USAGE, result.output
            assert named in result.stderr
        with_url = castore(
            "aggregates", "-s", "own_stores:pokemons", "--url", f"sqlite:///{db}",
            "--table", "event", "--timeout", "3", "--json",
        )  # fmt: skip
        assert with_url.exit_code == 0, with_url.output
        assert len(json.loads(with_url.stdout)["aggregateIds"]) == 3

    def test_a_schema_is_for_postgresql(self, url: str) -> None:
        """--schema with a SQLite URL is a usage error rather than an option ignored."""
        result = castore("aggregates", "-s", POKEMONS, "--url", url, "--schema", "bank")
        assert result.exit_code == EXIT_USAGE, result.output
        assert "--schema is for PostgreSQL" in one_line_error(result)

    @pytest.mark.parametrize("seconds", ["inf", "nan", "Infinity"])
    def test_a_timeout_that_is_not_finite_is_a_usage_error(self, seconds: str) -> None:
        """--timeout inf or nan is refused as a usage error naming --timeout, before any
        connection. (inf was an unexpected OverflowError, exit 1; nan a cryptic
        "cannot convert float NaN to integer".)"""
        result = castore("events", "-s", POKEMONS, "--url", PG_DSN, "--timeout", seconds, "x")
        assert result.exit_code == EXIT_USAGE, result.output
        assert "Invalid value for '--timeout'" in result.stderr
        assert "is not a finite number of seconds" in result.stderr

    @pytest.mark.parametrize(
        "command",
        [
            ("aggregates",),
            ("events", "pikachu"),
            ("aggregate", "pikachu"),
            ("export", "-o", "out.jsonl"),
        ],
    )
    def test_reading_a_sqlite_file_without_the_table(
        self, db: Path, url: str, tmp_path: Path, command: tuple[str, ...]
    ) -> None:
        """Reading commands refuse a missing --table (exit 4) and create nothing."""
        name, *rest = command
        args = [str(tmp_path / arg) if arg.endswith(".jsonl") else arg for arg in rest]
        result = castore(name, "-s", POKEMONS, "--url", url, "--table", "evnet", *args)
        assert result.exit_code == EXIT_STORAGE, result.output
        assert f"SQLite database {str(db)!r} has no table 'evnet'" in one_line_error(result)
        with sqlite3.connect(db) as conn:
            tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
        assert "evnet" not in tables
        assert not (tmp_path / "out.jsonl").exists()

    def test_options_from_the_environment(self, url: str) -> None:
        """CASTORE_STORE and CASTORE_URL stand in for --store and --url."""
        result = castore(
            "aggregates", "--json", env={"CASTORE_STORE": POKEMONS, "CASTORE_URL": url}
        )
        assert result.exit_code == 0, result.output
        assert len(json.loads(result.stdout)["aggregateIds"]) == 3


class TestStoresAndSchema:
    """``stores`` lists event types; ``schema`` prints JSON Schemas."""

    def test_stores_of_a_module(self) -> None:
        """A module lists all its stores with their event types."""
        result = castore("stores", "-s", "examples.pokemon.stores")
        assert result.exit_code == 0, result.output
        for text in ("POKEMONS", "TRAINERS", "POKEMON_APPEARED", "TRAINER_CAUGHT_POKEMON"):
            assert text in result.stdout

    def test_stores_json_carries_each_schema(self) -> None:
        """--json gives each event type's JSON Schema, with the wire's camelCase keys."""
        result = castore("stores", "-s", POKEMONS, "--json")
        assert result.exit_code == 0, result.output
        [store] = json.loads(result.stdout)["eventStores"]
        assert store["eventStoreId"] == "POKEMONS"
        by_type = {t["types"][0]: t for t in store["eventTypes"]}
        assert set(by_type) == {"POKEMON_APPEARED", "POKEMON_CAUGHT", "POKEMON_LEVELED_UP"}
        caught = by_type["POKEMON_CAUGHT"]["jsonSchema"]
        assert "aggregateId" in caught["properties"]
        payload = caught["$defs"]["CaughtPayload"]
        assert payload["properties"]["trainerId"]["minLength"] == 1

    def test_schema_of_stores_aggregates_and_commands(self) -> None:
        """Events by type, the reducer's aggregate, and command inputs and outputs."""
        result = castore("schema", "-s", POKEMONS, "-c", "examples.pokemon.commands")
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)
        [store] = document["eventStores"]
        appeared = store["events"]["POKEMON_APPEARED"]
        level = appeared["$defs"]["PokemonAppearedPayload"]["properties"]["level"]
        assert (level["minimum"], level["maximum"]) == (1, 100)
        assert set(store["aggregate"]["properties"]) >= {"aggregateId", "level", "status"}
        commands = {c["commandId"]: c for c in document["commands"]}
        assert set(commands) == {
            "CREATE_TRAINER",
            "MAKE_POKEMON_APPEAR",
            "CATCH_POKEMON",
            "LEVEL_UP_POKEMON",
        }
        catch = commands["CATCH_POKEMON"]
        assert catch["input"]["required"] == ["pokemon_id", "trainer_id"]
        assert set(catch["output"]["properties"]) == {"pokemon", "trainer"}

    def test_schema_needs_something(self) -> None:
        """Without --store or --command, schema is a usage error."""
        assert castore("schema").exit_code == EXIT_USAGE


class TestAggregates:
    """``aggregates`` pages through aggregate ids with their initial timestamps."""

    def listed(self, *args: str) -> dict[str, Any]:
        result = castore("aggregates", "-s", POKEMONS, "--json", *args)
        assert result.exit_code == 0, result.output
        body: dict[str, Any] = json.loads(result.stdout)
        return body

    def test_table(self, url: str) -> None:
        """The human table shows ids and Castore-form timestamps in listing order."""
        result = castore("aggregates", "-s", POKEMONS, "--url", url)
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert out.index("pikachu") < out.index("eevee") < out.index("snorlax")
        assert "2024-01-01T00:00:00.000Z" in out

    def test_pages_and_tokens(self, url: str) -> None:
        """A limit gives a page and a token; the token alone continues the listing."""
        first = self.listed("--url", url, "--limit", "2")
        assert [e["aggregateId"] for e in first["aggregateIds"]] == ["pikachu", "eevee"]
        assert first["aggregateIds"][0]["initialEventTimestamp"] == "2024-01-01T00:00:00.000Z"
        second = self.listed("--url", url, "--page-token", first["nextPageToken"])
        assert [e["aggregateId"] for e in second["aggregateIds"]] == ["snorlax"]
        assert second["nextPageToken"] is None

    def test_a_token_keeps_its_page_size(self, url: str) -> None:
        """The token carries its listing's options, its limit included: the command's
        default page size used to override it on every page after the first."""
        first = self.listed("--url", url, "--limit", "1")
        second = self.listed("--url", url, "--page-token", first["nextPageToken"])
        assert [e["aggregateId"] for e in second["aggregateIds"]] == ["eevee"]
        assert second["nextPageToken"] is not None
        wider = self.listed("--url", url, "--limit", "5", "--page-token", first["nextPageToken"])
        assert [e["aggregateId"] for e in wider["aggregateIds"]] == ["eevee", "snorlax"]

    def test_all_pages(self, url: str) -> None:
        """--all follows every page."""
        listed = self.listed("--url", url, "--limit", "1", "--all")
        assert [e["aggregateId"] for e in listed["aggregateIds"]] == ["pikachu", "eevee", "snorlax"]
        assert listed["nextPageToken"] is None

    def test_human_output_hints_the_next_page(self, url: str) -> None:
        """Without --json the next page's token is printed on stderr, on one line and
        shell-quoted, so that it can be pasted back (it used to be wrapped at 80 columns
        when stderr was not a terminal, and then refused)."""
        result = castore("aggregates", "-s", POKEMONS, "--url", url, "--limit", "1")
        assert result.exit_code == 0
        assert "--page-token" not in result.stdout
        (hint,) = [line for line in result.stderr.splitlines() if "--page-token" in line]
        _, _, quoted = hint.partition("--page-token ")
        (token,) = shlex.split(quoted)
        second = self.listed("--url", url, "--limit", "1", "--page-token", token)
        assert [e["aggregateId"] for e in second["aggregateIds"]] == ["eevee"]

    def test_bounds_are_inclusive_and_reverse(self, url: str) -> None:
        """--after/--before include their bounds; --reverse lists newest first."""
        listed = self.listed(
            "--url",
            url,
            "--after",
            "2024-01-01T00:00:00.000Z",
            "--before",
            "2024-01-02T00:00:00Z",
            "--reverse",
        )
        assert [e["aggregateId"] for e in listed["aggregateIds"]] == ["eevee", "pikachu"]

    @pytest.mark.parametrize(
        "args", [("--after", "yesterday"), ("--page-token", "not a token"), ("--limit", "-1")]
    )
    def test_bad_options(self, url: str, args: tuple[str, str]) -> None:
        """Bad bounds, tokens and limits are usage errors."""
        result = castore("aggregates", "-s", POKEMONS, "--url", url, *args)
        assert result.exit_code == EXIT_USAGE


class TestEventsAndAggregate:
    """``events`` shows an aggregate's events; ``aggregate`` folds them."""

    def test_events_json_is_castores(self, url: str) -> None:
        """--json prints the events in Castore's JSON, in version order."""
        result = castore("events", "-s", POKEMONS, "--url", url, "pikachu", "--json")
        assert result.exit_code == 0, result.output
        expected = [
            e.model_dump(mode="json") for e in story()["POKEMONS"] if e.aggregate_id == "pikachu"
        ]
        assert json.loads(result.stdout) == {"events": expected}

    def test_event_options(self, url: str) -> None:
        """Version bounds, limit and reverse combine as in get_events."""
        result = castore(
            "events", "-s", POKEMONS, "--url", url, "pikachu", "--json",
            "--min-version", "2", "--max-version", "3", "--reverse", "--limit", "1",
        )  # fmt: skip
        assert [e["version"] for e in json.loads(result.stdout)["events"]] == [3]

    def test_events_table(self, url: str) -> None:
        """The human table names each event's version, type and payload."""
        result = castore("events", "-s", POKEMONS, "--url", url, "pikachu")
        assert result.exit_code == 0, result.output
        for text in ("POKEMON_APPEARED", "POKEMON_CAUGHT", "trainerId", "3 events"):
            assert text in result.stdout

    def test_stored_text_is_shown_not_read_as_markup(self, empty_url: str, tmp_path: Path) -> None:
        """Ids and payloads holding rich markup ("[/]", "[bold]") are printed as they are."""
        source = tmp_path / "in.jsonl"
        source.write_bytes(
            jsonl(
                [
                    PokemonAppeared(
                        aggregate_id="[/weird]",
                        version=1,
                        timestamp=T0,
                        payload=PokemonAppearedPayload(name="[bold]Mew[/bold] a [/] b", level=5),
                    )
                ]
            )
        )
        assert castore("import", "-s", POKEMONS, "--url", empty_url, str(source)).exit_code == 0
        shown = castore("events", "-s", POKEMONS, "--url", empty_url, "[/weird]")
        assert shown.exit_code == 0, shown.output
        assert "[/weird]: 1 events" in shown.stdout
        assert "[bold]Mew[/bold] a [/] b" in shown.stdout
        listed = castore("aggregates", "-s", POKEMONS, "--url", empty_url)
        assert listed.exit_code == 0, listed.output
        assert "[/weird]" in listed.stdout

    def test_events_of_unknown_aggregate(self, url: str) -> None:
        """An unknown aggregate has no events; that is not an error."""
        result = castore("events", "-s", POKEMONS, "--url", url, "missingno", "--json")
        assert result.exit_code == 0
        assert json.loads(result.stdout) == {"events": []}

    def test_aggregate_and_version(self, url: str) -> None:
        """The folded aggregate, now and at an earlier version."""
        now = castore("aggregate", "-s", POKEMONS, "--url", url, "pikachu", "--json")
        assert now.exit_code == 0, now.output
        body = json.loads(now.stdout)
        assert body["aggregate"] == {
            "aggregateId": "pikachu",
            "version": 3,
            "name": "Pikachu",
            "level": 6,
            "status": "caught",
            "trainerId": "ash",
        }
        assert body["lastEvent"]["type"] == "POKEMON_LEVELED_UP"
        then = castore(
            "aggregate", "-s", POKEMONS, "--url", url, "pikachu", "--version", "1", "--json"
        )
        assert json.loads(then.stdout)["aggregate"]["status"] == "wild"
        human = castore("aggregate", "-s", POKEMONS, "--url", url, "pikachu")
        assert '"level": 6' in human.stdout
        assert "version 3, last event POKEMON_LEVELED_UP" in human.stdout

    def test_unknown_aggregate_is_exit_3(self, url: str) -> None:
        """A missing aggregate exits with the not-found code and says which."""
        result = castore("aggregate", "-s", POKEMONS, "--url", url, "missingno")
        assert result.exit_code == EXIT_NOT_FOUND
        assert "'missingno' not found in event store POKEMONS" in one_line_error(result)

    def test_stored_event_that_no_longer_validates(self, db: Path, url: str) -> None:
        """A stored event that breaks its model is exit 5, naming the aggregate and version."""
        with sqlite3.connect(db) as conn:
            conn.execute(
                "UPDATE event SET data = ? WHERE aggregate_id = 'eevee' AND version = 1",
                ('{"name": "Eevee", "level": 500}',),
            )
        result = castore("events", "-s", POKEMONS, "--url", url, "eevee")
        assert result.exit_code == EXIT_INVALID_DATA
        error = one_line_error(result)
        assert "aggregate eevee, version 1" in error
        assert "less than or equal to 100" in error


class TestExport:
    """``export`` streams Castore's event JSON as JSON Lines."""

    def test_export_to_stdout(self, url: str) -> None:
        """Aggregates in listing order, events in version order, one JSON per line."""
        result = castore("export", "-s", POKEMONS, "--url", url)
        assert result.exit_code == 0, result.output
        assert result.stdout_bytes == pokemon_lines()
        assert "Exported 5 events of 3 aggregates to stdout." in result.stderr

    def test_an_aggregate_getting_version_1_during_the_export_is_written_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_sys_path: None
    ) -> None:
        """Export first finds the aggregates without a version-1 event, then lists the
        others. One that gets its version 1 in between (another writer) was written twice,
        and the file could not be imported back."""
        (tmp_path / "racy_stores.py").write_text(
            textwrap.dedent(
                """
                from datetime import UTC, datetime

                from castore_pydantic import EventStore
                from castore_pydantic.storage.memory import InMemoryEventStorageAdapter
                from examples.pokemon.events import PokemonAppeared, PokemonLeveledUp
                from examples.pokemon.stores import pokemons as example

                class ConcurrentWriter(InMemoryEventStorageAdapter):
                    fired = False

                    async def _unlisted_aggregate_ids(self, context):
                        found = await super()._unlisted_aggregate_ids(context)
                        if not self.fired:  # another process writes version 1 now
                            self.fired = True
                            first = PokemonAppeared(
                                aggregate_id="mew", version=1,
                                timestamp=datetime(2024, 1, 1, tzinfo=UTC),
                                payload={"name": "Mew", "level": 1},
                            )
                            await self.push_event(first, context)
                        return found

                pokemons = EventStore(
                    event_store_id="POKEMONS",
                    event_types=example.event_types,
                    reducer=example.reducer,
                    event_storage_adapter=ConcurrentWriter(initial_events={"POKEMONS": [
                        PokemonLeveledUp(aggregate_id="mew", version=2,
                                         timestamp=datetime(2024, 1, 2, tzinfo=UTC)),
                    ]}),
                )
                """
            )
        )
        monkeypatch.chdir(tmp_path)
        result = castore("export", "-s", "racy_stores:pokemons", "--json", "-o", "out.jsonl")
        assert result.exit_code == 0, result.output
        lines = (tmp_path / "out.jsonl").read_text().splitlines()
        assert [
            (json.loads(line)["aggregateId"], json.loads(line)["version"]) for line in lines
        ] == [
            ("mew", 1),
            ("mew", 2),
        ]
        assert json.loads(result.stdout) == {"exportedEvents": 2, "exportedAggregates": 1}

    def test_export_to_file(self, url: str, tmp_path: Path) -> None:
        """-o writes the file and prints the summary on stdout (JSON with --json)."""
        target = tmp_path / "out.jsonl"
        result = castore("export", "-s", POKEMONS, "--url", url, "-o", str(target), "--json")
        assert result.exit_code == 0, result.output
        assert target.read_bytes() == pokemon_lines()
        assert json.loads(result.stdout) == {"exportedEvents": 5, "exportedAggregates": 3}
        assert list(tmp_path.glob("*.partial")) == []

    def test_failed_export_leaves_no_file(self, db: Path, url: str, tmp_path: Path) -> None:
        """An export that fails half-way does not leave a truncated file behind."""
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE event SET type = 'GONE' WHERE aggregate_id = 'snorlax'")
        target = tmp_path / "out.jsonl"
        result = castore("export", "-s", POKEMONS, "--url", url, "-o", str(target))
        assert result.exit_code == EXIT_INVALID_DATA
        assert not target.exists()
        assert list(tmp_path.glob("*.partial")) == []

    def test_bounds(self, url: str) -> None:
        """--after/--before select aggregates by their initial event, inclusive."""
        result = castore("export", "-s", POKEMONS, "--url", url, "--after", "2024-01-02T00:00:00Z")
        assert [json.loads(line)["aggregateId"] for line in result.stdout.splitlines()] == [
            "eevee",
            "snorlax",
        ]

    def test_aggregates_without_version_one_are_exported_last(
        self, url: str, empty_url: str
    ) -> None:
        """An aggregate whose history starts later has no initial event, so listing leaves
        it out; export still writes it (after the listed ones, by id) and the file imports
        back whole. With --after/--before it is left out. (Export used to drop it.)"""
        late = [LATE_MEW, LATE_MEW.model_copy(update={"version": 4})]
        assert castore("import", "-s", POKEMONS, "--url", url, stdin=jsonl(late)).exit_code == 0
        exported = castore("export", "-s", POKEMONS, "--url", url, "--json")
        assert exported.exit_code == 0, exported.output
        assert exported.stdout_bytes == pokemon_lines() + jsonl(late)
        assert json.loads(exported.stderr)["exportedAggregates"] == 4
        imported = castore(
            "import", "-s", POKEMONS, "--url", empty_url, stdin=exported.stdout_bytes
        )
        assert imported.exit_code == 0, imported.output
        again = castore("export", "-s", POKEMONS, "--url", empty_url)
        assert again.stdout_bytes == exported.stdout_bytes
        bounded = castore("export", "-s", POKEMONS, "--url", url, "--after", "2000-01-01T00:00:00Z")
        assert bounded.stdout_bytes == pokemon_lines()

    def test_progress_only_when_asked(self, url: str) -> None:
        """No progress bar off a terminal by default; --progress forces one, on stderr."""
        quiet = castore("export", "-s", POKEMONS, "--url", url)
        assert "Exporting" not in quiet.stderr
        loud = castore("export", "-s", POKEMONS, "--url", url, "--progress")
        assert "Exporting POKEMONS" in loud.stderr
        assert loud.stdout_bytes == pokemon_lines()


@pytest.fixture
def empty_url(tmp_path: Path) -> str:
    """The URL of a SQLite file that does not exist yet (import creates it)."""
    return f"sqlite:///{tmp_path / 'imported.db'}"


class TestImport:
    """``import`` validates everything first, then writes batches atomically."""

    def export(self, url: str) -> bytes:
        result = castore("export", "-s", POKEMONS, "--url", url)
        assert result.exit_code == 0, result.output
        return result.stdout_bytes

    def test_round_trip(self, empty_url: str, tmp_path: Path) -> None:
        """Importing an export and exporting again gives the same bytes."""
        source = tmp_path / "in.jsonl"
        source.write_bytes(pokemon_lines())
        result = castore("import", "-s", POKEMONS, "--url", empty_url, str(source))
        assert result.exit_code == 0, result.output
        assert "Imported 5 events." in result.stdout
        assert self.export(empty_url) == pokemon_lines()

    def test_from_stdin_with_blank_lines(self, empty_url: str) -> None:
        """'-' reads stdin; blank lines are skipped."""
        text = pokemon_lines().replace(b"\n", b"\n\n", 1)
        result = castore("import", "-s", POKEMONS, "--url", empty_url, "--json", stdin=text)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == {"importedEvents": 5}
        assert self.export(empty_url) == pokemon_lines()

    @pytest.mark.parametrize(
        ("bad_line", "reason"),
        [
            ('{"aggregateId": "mew", "version": 1, "type": "POKEMON_APPEARED",'
             ' "payload": {"name": "Mew", "level": 101}}',
             "line 4: payload.level: Input should be less than or equal to 100"),
            ('{"aggregateId": "mew", "version": 1, "type": "POKEMON_EVOLVED"}',
             "line 4: Event type 'POKEMON_EVOLVED' is not declared by event store POKEMONS"),
            ("{not json", "line 4: Invalid JSON"),
            ('{"aggregateId": "mew", "version": 0, "type": "POKEMON_LEVELED_UP"}',
             "line 4: version: Input should be greater than or equal to 1"),
        ],
    )  # fmt: skip
    def test_bad_line_writes_nothing(
        self, empty_url: str, tmp_path: Path, bad_line: str, reason: str
    ) -> None:
        """The first bad line is reported with its number and reason; nothing is written."""
        lines = pokemon_lines().splitlines(keepends=True)
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"".join([*lines[:3], bad_line.encode() + b"\n", *lines[3:]]))
        result = castore("import", "-s", POKEMONS, "--url", empty_url, str(source))
        assert result.exit_code == EXIT_INVALID_DATA
        error = one_line_error(result)
        assert reason in error
        assert "nothing was imported" in error
        assert not Path(empty_url.removeprefix("sqlite:///")).exists()

    def test_a_file_repeating_an_event_key_is_refused_unless_forced(
        self, empty_url: str, tmp_path: Path
    ) -> None:
        """One aggregate version on two lines of the file: the lines are named and nothing is
        imported (it was reported as a version already in the store); with --force the
        later line wins."""
        lines = pokemon_lines().splitlines(keepends=True)
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"".join([*lines, lines[1]]))
        result = castore("import", "-s", POKEMONS, "--url", empty_url, str(source))
        assert result.exit_code == EXIT_INVALID_DATA
        error = one_line_error(result)
        assert f"line {len(lines) + 1}:" in error
        assert "is already on line 2" in error
        assert "nothing was imported" in error
        assert not Path(empty_url.removeprefix("sqlite:///")).exists()
        forced = castore("import", "-s", POKEMONS, "--url", empty_url, "--force", str(source))
        assert forced.exit_code == 0, forced.output

    def test_conflict_stops_at_the_failing_batch(self, url: str, db: Path, tmp_path: Path) -> None:
        """Batches before a conflict are written; the conflicting batch is not, at all."""
        new = jsonl(
            [
                PokemonAppeared(
                    aggregate_id=f"new-{n}",
                    version=1,
                    timestamp=T0,
                    payload=PokemonAppearedPayload(name="Ditto", level=n + 1),
                )
                for n in range(3)
            ]
        )
        clash = jsonl([story()["POKEMONS"][1]])  # eevee version 1 exists already
        source = tmp_path / "in.jsonl"
        # Batches of 2: [new-0, new-1] is written; [new-2, eevee v1] fails as a whole.
        source.write_bytes(new + clash)
        before = count_rows(db)
        result = castore("import", "-s", POKEMONS, "--url", url, "--batch-size", "2", str(source))
        assert result.exit_code == EXIT_CONFLICT
        error = one_line_error(result)
        assert "line 4: version 1 of aggregate 'eevee' already exists in POKEMONS" in error
        assert "2 events were imported before line 3 and stay stored" in error
        assert "lines 3-4 and any after them were not imported" in error
        assert count_rows(db) == before + 2
        listed = castore("aggregates", "-s", POKEMONS, "--url", url, "--json")
        ids = {e["aggregateId"] for e in json.loads(listed.stdout)["aggregateIds"]}
        assert {"new-0", "new-1"} <= ids
        assert "new-2" not in ids

    def test_a_version_beyond_64_bits_is_refused_before_anything_is_written(
        self, empty_url: str, tmp_path: Path
    ) -> None:
        """A version no SQL database can store is refused while the lines are validated,
        as every adapter refuses it: exit 5 and nothing imported. (It used to pass
        validation and be refused by SQLite in the second batch, after the first was
        written.) A refusal while writing is covered by the PostgreSQL uuid test."""
        lines = pokemon_lines().splitlines(keepends=True)[:2]
        huge = (
            b'{"aggregateId": "mew", "version": 99999999999999999999, "type": "POKEMON_LEVELED_UP"}'
        )
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"".join([*lines, huge, b"\n"]))
        result = castore(
            "import", "-s", POKEMONS, "--url", empty_url, "--batch-size", "2", str(source)
        )
        assert result.exit_code == EXIT_INVALID_DATA
        error = one_line_error(result)
        assert "line 3: " in error
        assert "version does not fit a 64-bit integer" in error
        assert "(nothing was imported)" in error
        assert count_rows_if_any(Path(empty_url.removeprefix("sqlite:///"))) == 0

    def test_lines_longer_than_max_bytes_round_trip(
        self,
        empty_url: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        restore_sys_path: None,
    ) -> None:
        """An event within the store's limits whose line is longer than max_bytes in bytes
        (non-ASCII text) imports back; an event over the limits is still refused."""
        (tmp_path / "small_stores.py").write_text(
            textwrap.dedent(
                """
                from typing import Any, Literal

                from castore_pydantic import Event, EventLimits, EventStore

                class Noted(Event):
                    type: Literal["NOTED"] = "NOTED"
                    payload: Any = None

                notes = EventStore(
                    event_store_id="NOTES",
                    event_types=[Noted],
                    reducer=lambda aggregate, event: event.payload,
                    limits=EventLimits(max_bytes=1000),
                )
                """
            )
        )
        monkeypatch.chdir(tmp_path)
        source = tmp_path / "in.jsonl"
        accepted = {"aggregateId": "a", "version": 1, "type": "NOTED", "payload": "é" * 700}
        line = json.dumps(accepted, ensure_ascii=False).encode() + b"\n"
        assert len(line) > 1000
        source.write_bytes(line)
        result = castore("import", "-s", "small_stores:notes", "--url", empty_url, str(source))
        assert result.exit_code == 0, result.output
        exported = castore("export", "-s", "small_stores:notes", "--url", empty_url)
        assert json.loads(exported.stdout)["payload"] == "é" * 700
        refused = {**accepted, "aggregateId": "b", "payload": "é" * 1000}
        source.write_text(json.dumps(refused, ensure_ascii=False) + "\n")
        result = castore("import", "-s", "small_stores:notes", "--url", empty_url, str(source))
        assert result.exit_code == EXIT_INVALID_DATA
        error = one_line_error(result)
        assert "line 1: Event refused by event store NOTES at payload" in error
        assert "larger than max_bytes=1000" in error

    def test_force_overwrites(self, url: str, tmp_path: Path) -> None:
        """--force replaces events whose version exists."""
        shiny = PokemonAppeared(
            aggregate_id="eevee",
            version=1,
            timestamp=T0 + DAY,
            payload=PokemonAppearedPayload(name="Shiny Eevee", level=3),
        )
        source = tmp_path / "in.jsonl"
        source.write_bytes(jsonl([shiny]))
        refused = castore("import", "-s", POKEMONS, "--url", url, str(source))
        assert refused.exit_code == EXIT_CONFLICT
        forced = castore("import", "-s", POKEMONS, "--url", url, "--force", str(source))
        assert forced.exit_code == 0, forced.output
        folded = castore("aggregate", "-s", POKEMONS, "--url", url, "eevee", "--json")
        assert json.loads(folded.stdout)["aggregate"]["name"] == "Shiny Eevee"

    def test_import_never_runs_hooks(
        self,
        empty_url: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        restore_sys_path: None,
    ) -> None:
        """A store's on_event_pushed hook is not called by import (nothing is published)."""
        (tmp_path / "hooked_stores.py").write_text(
            textwrap.dedent(
                """
                from castore_pydantic import EventStore
                from examples.pokemon.stores import pokemons as example

                async def explode(result):
                    raise RuntimeError("the hook ran")

                pokemons = EventStore(
                    event_store_id="POKEMONS",
                    event_types=example.event_types,
                    reducer=example.reducer,
                    on_event_pushed=explode,
                )
                """
            )
        )
        source = tmp_path / "in.jsonl"
        source.write_bytes(pokemon_lines())
        monkeypatch.chdir(tmp_path)
        result = castore("import", "-s", "hooked_stores:pokemons", "--url", empty_url, str(source))
        assert result.exit_code == 0, result.output
        assert self.export(empty_url) == pokemon_lines()

    def test_missing_source_file(self, empty_url: str, tmp_path: Path) -> None:
        """An unreadable source is a usage error."""
        result = castore("import", "-s", POKEMONS, "--url", empty_url, str(tmp_path / "no.jsonl"))
        assert result.exit_code == EXIT_USAGE
        assert "cannot read" in one_line_error(result)


def write_many(path: Path, aggregates: int, per_aggregate: int) -> bytes:
    """A canonical export of ``aggregates`` x ``per_aggregate`` events; returns its bytes."""
    chunks: list[bytes] = []
    for n in range(aggregates):
        aggregate_id = f"pokemon-{n:06d}"
        start = T0 + timedelta(seconds=n)
        events: list[Any] = [
            PokemonAppeared(
                aggregate_id=aggregate_id,
                version=1,
                timestamp=start,
                payload=PokemonAppearedPayload(name=f"Ditto #{n}", level=1 + n % 100),
            )
        ]
        events.extend(
            PokemonLeveledUp(
                aggregate_id=aggregate_id,
                version=version,
                timestamp=start + timedelta(milliseconds=version),
            )
            for version in range(2, per_aggregate + 1)
        )
        chunks.append(jsonl(events))
    data = b"".join(chunks)
    path.write_bytes(data)
    return data


@pytest.mark.slow
def test_hundred_thousand_events_round_trip_on_sqlite(tmp_path: Path) -> None:
    """100,000 events: import, export, import elsewhere, export again: all byte-identical."""
    source = tmp_path / "source.jsonl"
    original = write_many(source, aggregates=10_000, per_aggregate=10)
    assert original.count(b"\n") == 100_000
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    exported = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    for db, out, src in ((first, exported[0], source), (second, exported[1], exported[0])):
        url = f"sqlite:///{db}"
        imported = castore("import", "-s", POKEMONS, "--url", url, str(src), "--json")
        assert imported.exit_code == 0, imported.output
        assert json.loads(imported.stdout) == {"importedEvents": 100_000}
        result = castore("export", "-s", POKEMONS, "--url", url, "-o", str(out), "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == {
            "exportedEvents": 100_000,
            "exportedAggregates": 10_000,
        }
    assert exported[0].read_bytes() == original
    assert exported[1].read_bytes() == original


def run_castore(
    *args: str, cwd: Path = REPO_ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m castore_pydantic ARGS`` in a subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "castore_pydantic", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class TestProcess:
    """The real entry points, in subprocesses."""

    def test_python_dash_m(self, url: str) -> None:
        """``python -m castore_pydantic`` runs the same commands."""
        completed = run_castore("aggregates", "-s", POKEMONS, "--url", url, "--json")
        assert completed.returncode == 0, completed.stderr
        assert len(json.loads(completed.stdout)["aggregateIds"]) == 3

    def test_console_script(self, url: str) -> None:
        """The installed ``castore`` script is the same tool."""
        script = Path(sys.executable).parent / "castore"
        if not script.exists():
            pytest.skip("the castore script is not installed (pip install -e '.[cli]')")
        completed = subprocess.run(
            [str(script), "aggregate", "-s", POKEMONS, "--url", url, "eevee", "--json"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        assert json.loads(completed.stdout)["aggregate"]["name"] == "Eevee"

    def test_errors_are_one_line_with_documented_codes(self) -> None:
        """An unknown store gives exit 2 and a single stderr line, no traceback."""
        completed = run_castore("aggregates", "-s", "nowhere:store", "--url", "sqlite:///x.db")
        assert completed.returncode == EXIT_USAGE
        assert completed.stderr.count("\n") == 1
        assert completed.stderr.startswith("castore: error: ")

    def test_unreachable_postgres(self) -> None:
        """A PostgreSQL server that refuses connections is exit 4, in one line, quickly."""
        completed = run_castore(
            "aggregates", "-s", POKEMONS, "--url", "postgresql://postgres@127.0.0.1:1/test",
            "--timeout", "1",
        )  # fmt: skip
        assert completed.returncode == EXIT_STORAGE, completed.stderr
        assert completed.stderr.count("\n") == 1, completed.stderr
        assert "PostgreSQL" in completed.stderr or "connection" in completed.stderr

    def test_malformed_postgres_url_is_a_usage_error_at_once(self) -> None:
        """Values libpq refuses before connecting (a port out of range, an unknown
        sslmode) are exit 2 naming the problem; a server that cannot be reached is exit 4.
        Neither waits for the pool's timeout, and no password is shown. (A malformed URL
        used to wait the whole --timeout, then exit 4.)"""
        for url, problem in [
            ("postgresql://postgres@127.0.0.1:99999/test", 'invalid port number: "99999"'),
            ("postgresql://postgres@127.0.0.1/test?sslmode=bogus", "invalid sslmode value"),
        ]:
            result = castore("aggregates", "-s", POKEMONS, "--url", url, "--timeout", "60")
            assert result.exit_code == EXIT_USAGE, result.output
            assert "not a valid PostgreSQL URL" in one_line_error(result)
            assert problem in one_line_error(result)
        no_socket = castore(
            "aggregates", "-s", POKEMONS, "--url", "postgresql:///test?host=/nonexistent-dir",
        )  # fmt: skip
        assert no_socket.exit_code == EXIT_STORAGE, no_socket.output  # not the URL's fault
        refused = castore(
            "aggregates", "-s", POKEMONS, "--url", "postgresql://postgres:sekret@127.0.0.1:1/t",
            "--timeout", "60",
        )  # fmt: skip
        assert refused.exit_code == EXIT_STORAGE
        assert "cannot connect to PostgreSQL" in one_line_error(refused)
        assert "sekret" not in refused.output

    def test_traceback_on_request(self) -> None:
        """--traceback prints the traceback of an error as well as its line."""
        completed = run_castore(
            "--traceback", "aggregates", "-s", POKEMONS, "--url", "postgresql://postgres@127.0.0.1:1/test",
            "--timeout", "1",
        )  # fmt: skip
        assert completed.returncode == EXIT_STORAGE
        assert "Traceback" in completed.stderr

    def test_unexpected_errors_are_exit_1(self, tmp_path: Path) -> None:
        """An error the tool does not classify is exit 1 with a hint about --traceback."""
        (tmp_path / "odd_stores.py").write_text(
            textwrap.dedent(
                """
                from castore_pydantic import EventStore
                from examples.pokemon.stores import pokemons as example

                class Broken:
                    async def __aenter__(self):
                        raise KeyError("surprise")

                    async def __aexit__(self, *exc):
                        return None

                pokemons = EventStore(
                    event_store_id="POKEMONS",
                    event_types=example.event_types,
                    reducer=example.reducer,
                    event_storage_adapter=Broken(),
                )
                """
            )
        )
        completed = run_castore("aggregates", "-s", "odd_stores:pokemons", cwd=tmp_path)
        assert completed.returncode == EXIT_ERROR
        assert "castore: unexpected error: KeyError: 'surprise'" in completed.stderr
        assert "--traceback" in completed.stderr

    def test_interrupted_import_says_what_was_imported(self, tmp_path: Path) -> None:
        """Ctrl-C while writing: exit 130, and the message gives the events already imported
        (they stay stored: one transaction per batch) and the first line that was not."""
        source = tmp_path / "in.jsonl"
        write_many(source, aggregates=50_000, per_aggregate=1)
        db = tmp_path / "imported.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        command = [
            sys.executable, "-m", "castore_pydantic", "import", "-s", POKEMONS,
            "--url", f"sqlite:///{db}", "--batch-size", "1", str(source),
        ]  # fmt: skip
        returncode, stderr = interrupted_once(
            command,
            cwd=REPO_ROOT,
            env=env,
            ready=lambda: db.exists() and bool(count_rows_if_any(db)),
            what="the import never started writing",
        )
        assert returncode == EXIT_INTERRUPTED, stderr
        assert stderr.count("\n") == 1, stderr
        match = re.search(r"(\d+) events? (?:was|were) imported before line (\d+) and stay", stderr)
        assert match is not None, stderr
        imported, first_not = int(match[1]), int(match[2])
        assert stderr.startswith("castore: error: interrupted: ")
        assert count_rows(db) == imported
        assert first_not == imported + 1

    @pytest.mark.skipif(sys.platform == "win32", reason="needs SIGINT and FIONREAD")
    @pytest.mark.skipif(not Path("/proc/self/wchan").exists(), reason="needs Linux's /proc")
    def test_ctrl_c_while_import_waits_for_a_fifo_writer(self, tmp_path: Path) -> None:
        """Opening a FIFO that has no writer yet waits; Ctrl-C there took a second press
        (the wait came before the import's own handling of it). One now stops it: exit
        130, one line."""
        fifo = tmp_path / "in.jsonl"
        os.mkfifo(fifo)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        command = [
            sys.executable, "-m", "castore_pydantic", "import", "-s", POKEMONS,
            "--url", f"sqlite:///{tmp_path / 'imported.db'}", str(fifo),
        ]  # fmt: skip
        with subprocess.Popen(
            with_ctrl_c(command), cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True
        ) as process:
            deadline = time.monotonic() + 60
            wchan = Path(f"/proc/{process.pid}/wchan")
            while wchan.read_text() != "wait_for_partner":  # blocked opening the FIFO
                assert process.poll() is None, process.communicate()[1]
                assert time.monotonic() < deadline, "the import never opened its input"
                time.sleep(0.01)
            stderr = _ctrl_c(process, "one Ctrl-C did not stop an import waiting for a FIFO writer")
        assert process.returncode == EXIT_INTERRUPTED, stderr
        assert stderr == (
            f"castore: error: interrupted while opening {str(fifo)!r}: nothing was imported\n"
        )

    def test_ctrl_c_while_import_waits_for_input(self, tmp_path: Path) -> None:
        """Ctrl-C stops an import whose stdin stays open (a terminal, a slow producer) at
        once: exit 130, one line, nothing imported. (The read went on waiting for input,
        and the import only stopped once stdin was closed.)"""
        import fcntl
        import struct
        import termios

        def unread(fd: int) -> int:
            return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])

        db = tmp_path / "imported.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        command = [
            sys.executable, "-m", "castore_pydantic", "import", "-s", POKEMONS,
            "--url", f"sqlite:///{db}",
        ]  # fmt: skip
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, pokemon_lines())  # and the pipe stays open: more may come
            with subprocess.Popen(
                with_ctrl_c(command),
                cwd=REPO_ROOT,
                env=env,
                stdin=read_end,
                stderr=subprocess.PIPE,
                text=True,
            ) as process:
                deadline = time.monotonic() + 60
                while unread(read_end):  # once read, the import waits for the next line
                    assert process.poll() is None, process.communicate()[1]
                    assert time.monotonic() < deadline, "the import never read its input"
                    time.sleep(0.01)
                stderr = _ctrl_c(process, "Ctrl-C did not stop an import waiting for input")
        finally:
            os.close(read_end)
            os.close(write_end)
        assert process.returncode == EXIT_INTERRUPTED, stderr
        assert stderr == (
            "castore: error: interrupted while validating the input: nothing was imported\n"
        )
        assert count_rows_if_any(db) == 0

    def test_an_unreachable_broker_is_one_line(self, url: str, tmp_path: Path) -> None:
        """Pouring into a RabbitMQ that cannot be reached prints the one-line error and
        nothing else: the broker client's own log line is kept quiet. (It came first.)"""
        pytest.importorskip("aio_pika")
        (tmp_path / "far_channels.py").write_text(
            textwrap.dedent(
                """
                from castore_pydantic.messaging import NotificationMessageBus
                from castore_pydantic.messaging.rabbitmq import RabbitMQMessageBusAdapter
                from examples.pokemon.stores import pokemons

                bus = NotificationMessageBus(message_bus_id="FAR", source_event_stores=[pokemons])
                RabbitMQMessageBusAdapter.attach_to(bus, "amqp://guest:guest@127.0.0.1:1/")
                """
            )
        )
        completed = run_castore(
            "pour", "-s", POKEMONS, "-c", "far_channels:bus", "--url", url, cwd=tmp_path
        )
        assert completed.returncode == EXIT_MESSAGING, completed.stderr
        assert completed.stderr.count("\n") == 1, completed.stderr
        assert completed.stderr.startswith("castore: error: RabbitMQ at "), completed.stderr

    def test_core_import_does_not_load_the_cli(self) -> None:
        """``import castore_pydantic`` imports neither click nor rich."""
        completed = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, castore_pydantic; "
                "print('click' in sys.modules, 'rich' in sys.modules)",
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert completed.stdout.split() == ["False", "False"]


# -- PostgreSQL ----------------------------------------------------------------------------------


@pytest.fixture
def pg_table() -> Iterator[str]:
    """A fresh events table name in database ``test``, dropped afterwards."""
    require_postgres()
    import psycopg
    from psycopg import sql

    table = f"cli_{uuid.uuid4().hex[:10]}"
    yield table
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


@pytest.fixture
def pg_schema_name() -> Iterator[str]:
    """A schema name in database ``test`` that does not exist yet; dropped afterwards."""
    require_postgres()
    import psycopg
    from psycopg import sql

    name = f"cli_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.mark.postgres
class TestPostgres:
    """The same commands against a PostgreSQL table."""

    def pg(self, command: str, table: str, *args: str, stdin: bytes | None = None) -> Result:
        return castore(
            command, "-s", POKEMONS, "--url", PG_DSN, "--table", table, *args, stdin=stdin
        )

    def test_import_inspect_export(self, pg_table: str) -> None:
        """--create-table, then import, list, fold and export: the bytes come back."""
        imported = self.pg("import", pg_table, "--create-table", stdin=pokemon_lines())
        assert imported.exit_code == 0, imported.output
        listed = self.pg("aggregates", pg_table, "--json", "--limit", "2")
        assert [e["aggregateId"] for e in json.loads(listed.stdout)["aggregateIds"]] == [
            "pikachu",
            "eevee",
        ]
        folded = self.pg("aggregate", pg_table, "pikachu", "--json")
        assert json.loads(folded.stdout)["aggregate"]["level"] == 6
        exported = self.pg("export", pg_table)
        assert exported.exit_code == 0, exported.output
        assert exported.stdout_bytes == pokemon_lines()
        # An aggregate without a version-1 event comes last.
        assert self.pg("import", pg_table, stdin=jsonl([LATE_MEW])).exit_code == 0
        assert self.pg("export", pg_table).stdout_bytes == pokemon_lines() + jsonl([LATE_MEW])

    def test_missing_table(self, pg_table: str) -> None:
        """Reading a table that does not exist is a storage error (exit 4) saying so, with
        the CLI's way to create it (not the adapter's Python method)."""
        result = self.pg("aggregates", pg_table)
        assert result.exit_code == EXIT_STORAGE
        error = one_line_error(result)
        assert f'relation "{pg_table}" does not exist' in error
        assert "check --table" in error
        assert "castore import --create-table" in error
        assert "create_event_table" not in error
        imported = self.pg("import", pg_table, stdin=pokemon_lines())
        assert imported.exit_code == EXIT_STORAGE
        error = one_line_error(imported)
        assert "castore import --create-table" in error
        assert "nothing was imported" in error

    def test_a_table_in_a_schema(self, pg_schema_name: str, channels: str) -> None:
        """--schema names the table's schema (a dotted --table was one name, so a table in
        a schema could not be reached): import creates both, reading commands and pour read
        it."""
        where = ("--url", PG_DSN, "--schema", pg_schema_name, "--table", "bus_events")
        imported = castore(
            "import", "-s", POKEMONS, *where, "--create-table", stdin=pokemon_lines()
        )
        assert imported.exit_code == 0, imported.output
        listed = castore("aggregates", "-s", POKEMONS, *where, "--json")
        assert listed.exit_code == 0, listed.output
        assert len(json.loads(listed.stdout)["aggregateIds"]) == 3
        assert castore("export", "-s", POKEMONS, *where).stdout_bytes == pokemon_lines()
        poured = castore("pour", "-s", POKEMONS, "-c", f"{channels}:bus", *where, "--json")
        assert poured.exit_code == 0, poured.output
        assert json.loads(poured.stdout)["pouredEventCount"] == 5
        dotted = castore(
            "aggregates", "-s", POKEMONS, "--url", PG_DSN, "--table", f"{pg_schema_name}.bus_events"
        )
        assert dotted.exit_code == EXIT_STORAGE
        assert "check --table and --schema" in one_line_error(dotted)

    def test_refused_value_says_what_was_imported(self, pg_table: str) -> None:
        """A uuid table refuses an id that is not a UUID in the second batch: exit 5, and
        the message says the first batch was imported and stays stored."""
        from castore_pydantic.storage.postgres import PostgresEventStorageAdapter

        async def create() -> None:
            async with PostgresEventStorageAdapter(PG_DSN, table_name=pg_table) as adapter:
                await adapter.create_event_table(aggregate_id_type="uuid")

        asyncio.run(create())
        appeared = [
            PokemonAppeared(
                aggregate_id=aggregate_id,
                version=1,
                timestamp=T0,
                payload=PokemonAppearedPayload(name="Ditto", level=1),
            )
            for aggregate_id in (str(uuid.uuid4()), str(uuid.uuid4()), "pikachu")
        ]
        result = self.pg("import", pg_table, "--batch-size", "2", stdin=jsonl(appeared))
        assert result.exit_code == EXIT_INVALID_DATA
        error = one_line_error(result)
        assert "uuid" in error
        assert "2 events were imported before line 3 and stay stored" in error
        listed = self.pg("aggregates", pg_table, "--json")
        assert len(json.loads(listed.stdout)["aggregateIds"]) == 2

    def test_conflict_writes_nothing_of_the_batch(self, pg_table: str) -> None:
        """A conflicting batch is rolled back as a whole on PostgreSQL too."""
        assert self.pg("import", pg_table, "--create-table", stdin=pokemon_lines()).exit_code == 0
        extra = jsonl(
            [
                PokemonAppeared(
                    aggregate_id="ditto",
                    version=1,
                    timestamp=T0,
                    payload=PokemonAppearedPayload(name="Ditto", level=1),
                )
            ]
        )
        result = self.pg("import", pg_table, stdin=extra + pokemon_lines())
        assert result.exit_code == EXIT_CONFLICT
        assert self.pg("events", pg_table, "ditto", "--json").stdout.count("POKEMON") == 0

    @pytest.mark.slow
    def test_hundred_thousand_events_round_trip(self, pg_table: str, tmp_path: Path) -> None:
        """100,000 events through PostgreSQL come back byte-identical."""
        source = tmp_path / "source.jsonl"
        original = write_many(source, aggregates=10_000, per_aggregate=10)
        imported = self.pg("import", pg_table, "--create-table", str(source))
        assert imported.exit_code == 0, imported.output
        out = tmp_path / "out.jsonl"
        exported = self.pg("export", pg_table, "-o", str(out))
        assert exported.exit_code == 0, exported.output
        assert out.read_bytes() == original


def test_every_command_option_and_exit_code_is_documented() -> None:
    """docs/cli.md names every command, every option and every exit code."""
    import castore_pydantic.cli as cli_module

    page = (REPO_ROOT / "docs" / "cli.md").read_text()
    missing = []
    for name, command in cli.commands.items():
        if f"### `castore {name}" not in page:
            missing.append(f"command {name}")
        for param in command.params:
            for flag in [*param.opts, *param.secondary_opts]:
                if (
                    flag.startswith("-")
                    and flag not in ("-h", "--help")
                    and f"`{flag}`" not in page
                ):
                    missing.append(f"{name} {flag}")
    for constant in dir(cli_module):
        if constant.startswith("EXIT_"):
            code = getattr(cli_module, constant)
            if f"\n| {code} |" not in page:
                missing.append(f"exit code {code} ({constant})")
    assert missing == []


# -- pour --------------------------------------------------------------------------------------

CHANNELS_MODULE = """
from castore_pydantic.messaging import (
    AggregateExistsMessageQueue,
    NotificationMessageBus,
    NotificationMessageQueue,
)
from castore_pydantic.messaging.memory import (
    InMemoryMessageBusAdapter,
    InMemoryMessageQueueAdapter,
)
from examples.pokemon.stores import pokemons, trainers

received = []
bus = NotificationMessageBus(message_bus_id="POKEMON_BUS", source_event_stores=[pokemons, trainers])
bus_adapter = InMemoryMessageBusAdapter.attach_to(bus)


async def remember(message, context):
    received.append((message.event_store_id, message.event.aggregate_id, message.event.version,
                     context.replay))


bus_adapter.on({"on_replay": True}, remember)

existing = []
exists_queue = AggregateExistsMessageQueue(
    message_queue_id="EXISTS", source_event_stores=[pokemons]
)


async def count_existing(message, context):
    existing.append((message.aggregate_id, context.replay))


InMemoryMessageQueueAdapter.attach_to(exists_queue, worker=count_existing)

failing_bus = NotificationMessageBus(message_bus_id="FAILING", source_event_stores=[pokemons])
failing_adapter = InMemoryMessageBusAdapter.attach_to(failing_bus, retry_attempts=0)


async def refuse(message, context):
    raise RuntimeError("this listener fails")


failing_adapter.on({"on_replay": True}, refuse)

idle_queue = NotificationMessageQueue(message_queue_id="IDLE", source_event_stores=[pokemons])
InMemoryMessageQueueAdapter.attach_to(idle_queue)
"""


@pytest.fixture
def channels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_sys_path: None
) -> Iterator[str]:
    """A fresh module of in-memory channels in the cwd; yields its name."""
    name = f"channels_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(CHANNELS_MODULE)
    monkeypatch.chdir(tmp_path)
    yield name
    sys.modules.pop(name, None)


def chronological(*store_ids: str) -> list[tuple[str, str, int, bool]]:
    """``story()``'s events of these stores as a pour delivers them (replayed, oldest first)."""
    events = [(sid, e) for sid in store_ids for e in story()[sid]]
    events.sort(
        key=lambda item: (item[1].timestamp, store_ids.index(item[0]), item[1].aggregate_id)
    )
    return [(sid, e.aggregate_id, e.version, True) for sid, e in events]


class TestPour:
    """``pour`` replays history into a channel, through ``castore_pydantic.dam``."""

    def test_pour_a_store(self, url: str, channels: str) -> None:
        """Every event is published once, replayed, in chronological order."""
        result = castore("pour", "-s", POKEMONS, "-c", f"{channels}:bus", "--url", url, "--json")
        assert result.exit_code == 0, result.output
        body = json.loads(result.stdout)
        assert body["pouredEventCount"] == 5
        assert body["firstScannedAggregate"]["aggregateId"] == "pikachu"
        assert sys.modules[channels].received == chronological("POKEMONS")

    def test_pour_from_a_sqlite_file_without_the_table(
        self, db: Path, url: str, channels: str
    ) -> None:
        """A missing --table is exit 4; nothing is created and nothing is published."""
        result = castore(
            "pour", "-s", POKEMONS, "-c", f"{channels}:bus", "--url", url, "--table", "evnet"
        )
        assert result.exit_code == EXIT_STORAGE, result.output
        assert "has no table 'evnet'" in one_line_error(result)
        with sqlite3.connect(db) as conn:
            tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
        assert "evnet" not in tables
        assert sys.modules[channels].received == []

    def test_pour_several_stores(self, url: str, channels: str) -> None:
        """Several stores pour as one chronological stream; scans are keyed by store."""
        result = castore(
            "pour", "-s", POKEMONS, "-s", TRAINERS, "-c", f"{channels}:bus", "--url", url, "--json"
        )
        assert result.exit_code == 0, result.output
        body = json.loads(result.stdout)
        assert body["pouredEventCount"] == 7
        assert set(body["scans"]) == {"POKEMONS", "TRAINERS"}
        assert sys.modules[channels].received == chronological("POKEMONS", "TRAINERS")

    def test_pour_one_aggregate_within_bounds(self, url: str, channels: str) -> None:
        """--aggregate-id pours one aggregate; --from/--to keep events inside, inclusive."""
        result = castore(
            "pour", "-s", POKEMONS, "-c", f"{channels}:bus", "--url", url,
            "--aggregate-id", "pikachu", "--from", "2024-01-04T00:00:00Z",
            "--to", "2024-01-05T00:00:00.000Z",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "Poured 2 events" in result.stdout
        assert sys.modules[channels].received == [
            ("POKEMONS", "pikachu", 2, True),
            ("POKEMONS", "pikachu", 3, True),
        ]

    def test_pour_aggregate_ids(self, url: str, channels: str) -> None:
        """--aggregate-ids publishes one aggregate-exists message per aggregate."""
        result = castore(
            "pour", "-s", POKEMONS, "-c", f"{channels}:exists_queue", "--url", url,
            "--aggregate-ids", "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["pouredAggregateIdCount"] == 3
        assert sys.modules[channels].existing == [
            ("pikachu", True),
            ("eevee", True),
            ("snorlax", True),
        ]

    def test_rate_limit(self, url: str, channels: str) -> None:
        """--rate-limit spaces the messages out (5 messages at 25/s take at least 160 ms)."""
        started = asyncio.run(_loop_time())
        result = castore(
            "pour", "-s", POKEMONS, "-c", f"{channels}:bus", "--url", url, "--rate-limit", "25"
        )
        elapsed = asyncio.run(_loop_time()) - started
        assert result.exit_code == 0, result.output
        assert elapsed >= 0.16

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            (("-c", "{m}:exists_queue"), "carries aggregateExists messages"),
            (("-c", "{m}:bus", "--aggregate-ids"), "carries notification messages"),
            (("-c", "{m}:received"), "not a message queue or bus"),
        ],
    )
    def test_wrong_channel(
        self, url: str, channels: str, args: tuple[str, ...], expected: str
    ) -> None:
        """A channel of the wrong kind is a usage error that says what to do."""
        result = castore(
            "pour", "-s", POKEMONS, "--url", url, *(a.format(m=channels) for a in args)
        )
        assert result.exit_code == EXIT_USAGE
        assert expected in one_line_error(result)
        assert sys.modules[channels].received == []

    def test_messages_that_fail_in_the_channel_are_exit_7(
        self, url: str, channels: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An in-process channel whose listener gives up on the poured messages, or a queue
        without a worker that would drop them, is not a success (both were exit 0)."""
        from castore_pydantic.messaging import memory

        monkeypatch.setattr(memory, "MAX_DEAD_LETTERS", 2)
        for _ in range(2):  # counted, not read off the dead letters (which keep only two)
            failed = castore("pour", "-s", POKEMONS, "-c", f"{channels}:failing_bus", "--url", url)
            assert failed.exit_code == EXIT_MESSAGING, failed.output
            assert "5 poured messages failed" in one_line_error(failed)
        idle = castore("pour", "-s", POKEMONS, "-c", f"{channels}:idle_queue", "--url", url)
        assert idle.exit_code == EXIT_USAGE
        assert "has no worker" in one_line_error(idle)

    def test_json_leaves_out_what_is_absent(self, url: str, channels: str) -> None:
        """Nothing poured: the first/last keys are left out, as Castore's JSON has no key
        for an undefined value (they used to be null)."""
        result = castore(
            "pour", "-s", POKEMONS, "-c", f"{channels}:bus", "--url", url,
            "--aggregate-id", "nobody", "--json",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == {"pouredEventCount": 0}

    def test_bad_bounds_rates_and_repeated_stores_are_usage_errors(
        self, url: str, channels: str
    ) -> None:
        """Reversed bounds (they used to pour nothing, exit 0), a rate that is not finite
        and a store given twice (both exit 1) are usage errors; nothing is published."""
        bus = f"{channels}:bus"
        for args in [
            ("--from", "2025-01-01T00:00:00Z", "--to", "2023-01-01T00:00:00Z"),
            ("--rate-limit", "inf"),
            ("--rate-limit", "nan"),
            ("-s", POKEMONS),
        ]:
            result = castore("pour", "-s", POKEMONS, "-c", bus, "--url", url, *args)
            assert result.exit_code == EXIT_USAGE, (args, result.output)
        # Refused before the channel module was even imported.
        assert channels not in sys.modules
        # One store under two import strings is given twice too (it was an unexpected error).
        Path(f"{channels}_alias.py").write_text(
            "from examples.pokemon.stores import pokemons as again\n"
        )
        result = castore("pour", "-s", POKEMONS, "-s", f"{channels}_alias:again", "-c", bus,
                         "--url", url)  # fmt: skip
        assert result.exit_code == EXIT_USAGE, result.output
        assert "POKEMONS is given twice" in one_line_error(result)

    @pytest.mark.parametrize(
        ("rate", "pause", "published"),
        [("2", 0, range(1, 5)), ("1000", 30, range(5, 6))],
        ids=["while-publishing", "while-handlers-run"],
    )
    def test_interrupted_pour_says_how_far_it_got(
        self, url: str, tmp_path: Path, rate: str, pause: int, published: range
    ) -> None:
        """Ctrl-C during a pour, while it publishes or while in-process handlers finish:
        exit 130, and the message says how many messages were published (it used to say
        only "interrupted")."""
        handled = tmp_path / "handled.log"
        (tmp_path / "slow_channels.py").write_text(
            textwrap.dedent(
                f"""
                import asyncio

                from castore_pydantic.messaging import NotificationMessageBus
                from castore_pydantic.messaging.memory import InMemoryMessageBusAdapter
                from examples.pokemon.stores import pokemons

                bus = NotificationMessageBus(message_bus_id="SLOW", source_event_stores=[pokemons])
                adapter = InMemoryMessageBusAdapter.attach_to(bus)

                async def log(message, context):
                    with open({str(handled)!r}, "a") as file:
                        file.write(message.event.aggregate_id + "\\n")
                    await asyncio.sleep({pause})

                adapter.on({{"on_replay": True}}, log)
                """
            )
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
        env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{tmp_path}"
        command = [
            sys.executable, "-m", "castore_pydantic", "pour", "-s", POKEMONS,
            "-c", "slow_channels:bus", "--url", url, "--rate-limit", rate,
        ]  # fmt: skip
        returncode, stderr = interrupted_once(
            command,
            cwd=tmp_path,
            env=env,
            # Once the first message is handled, or once all five are (handlers then sleep).
            ready=lambda: handled.exists() and len(handled.read_text().split()) >= published[0],
            what="the pour never published",
        )
        assert returncode == EXIT_INTERRUPTED, stderr
        match = re.search(r"interrupted after (\d+) published messages?", stderr)
        assert match is not None, stderr
        assert int(match[1]) in published

    @pytest.mark.postgres
    def test_a_postgres_url_is_tried_once_first(self, channels: str) -> None:
        """With a PostgreSQL --url, pour connects once first, as every command does: a URL
        libpq refuses is exit 2 and a database the server does not know exit 4, at once,
        and nothing is published. (pour waited the whole --timeout, then exited 4.)"""
        require_postgres()
        for url, code, said in [
            (f"postgresql://postgres@{POSTGRES_HOST}:99999/test", EXIT_USAGE, "not a valid"),
            (
                f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/no_such_{uuid.uuid4().hex}",
                EXIT_STORAGE,
                "cannot connect to PostgreSQL",
            ),
        ]:
            started = time.monotonic()
            result = castore(
                "pour", "-s", POKEMONS, "-c", f"{channels}:bus", "--url", url, "--timeout", "20"
            )
            assert result.exit_code == code, result.output
            assert said in one_line_error(result)
            assert time.monotonic() - started < 10
        assert sys.modules[channels].received == []

    def test_option_conflicts(self, url: str, channels: str) -> None:
        """--aggregate-id with two stores, or with --aggregate-ids, is refused."""
        two = castore(
            "pour", "-s", POKEMONS, "-s", TRAINERS, "-c", f"{channels}:bus", "--url", url,
            "--aggregate-id", "pikachu",
        )  # fmt: skip
        assert two.exit_code == EXIT_USAGE
        both = castore(
            "pour", "-s", POKEMONS, "-c", f"{channels}:bus", "--url", url,
            "--aggregate-id", "pikachu", "--aggregate-ids",
        )  # fmt: skip
        assert both.exit_code == EXIT_USAGE


async def _loop_time() -> float:
    return asyncio.get_running_loop().time()


@pytest.mark.rabbitmq
def test_pour_into_rabbitmq(url: str, tmp_path: Path) -> None:
    """A real RabbitMQ queue receives every event once, replayed, in order, and confirmed."""
    from tests.messaging.rabbitmq_support import private_vhost, vhost_url

    with private_vhost() as vhost:
        (tmp_path / "rabbit_channels.py").write_text(
            textwrap.dedent(
                f"""
                from castore_pydantic.messaging import NotificationMessageQueue
                from castore_pydantic.messaging.rabbitmq import RabbitMQMessageQueueAdapter
                from examples.pokemon.stores import pokemons

                queue = NotificationMessageQueue(
                    message_queue_id="POKEMON_REPLAY", source_event_stores=[pokemons]
                )
                RabbitMQMessageQueueAdapter.attach_to(queue, {vhost_url(vhost)!r})
                """
            )
        )
        completed = run_castore(
            "pour", "-s", POKEMONS, "-c", "rabbit_channels:queue", "--url", url, "--json",
            cwd=tmp_path,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        assert json.loads(completed.stdout)["pouredEventCount"] == 5

        async def drain() -> list[tuple[dict[str, Any], Any]]:
            import aio_pika

            connection = await aio_pika.connect(vhost_url(vhost))
            async with connection:
                channel = await connection.channel()
                queue = await channel.get_queue("castore.queue.POKEMON_REPLAY")
                got = []
                while (message := await queue.get(no_ack=True, fail=False)) is not None:
                    got.append((json.loads(message.body), message.headers.get("replay")))
                return got

        delivered = asyncio.run(drain())
    expected = [json.loads(line) for line in pokemon_lines().splitlines()]
    expected.sort(key=lambda e: (e["timestamp"], e["aggregateId"]))
    assert [body["event"] for body, _ in delivered] == expected
    assert {body["eventStoreId"] for body, _ in delivered} == {"POKEMONS"}
    assert all(replay is True for _, replay in delivered)
