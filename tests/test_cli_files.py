"""What ``castore export -o`` writes to, and what ``castore import`` reads from."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import Result

from castore_pydantic.cli import EXIT_USAGE
from castore_pydantic.storage.sqlite import SQLiteEventStorageAdapter
from tests.test_cli import (
    POKEMONS,
    REPO_ROOT,
    castore,
    one_line_error,
    pokemon_lines,
    seed,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


@pytest.fixture
def url(tmp_path: Path) -> str:
    """The ``--url`` of a SQLite file holding the example's story, in its own directory."""
    path = tmp_path / "db" / "pokemon.db"
    path.parent.mkdir()

    async def run() -> None:
        async with SQLiteEventStorageAdapter(path) as adapter:
            await seed(adapter)

    asyncio.run(run())
    return f"sqlite:///{path}"


@pytest.fixture
def empty_url(tmp_path: Path) -> str:
    """The URL of a SQLite file that does not exist yet (import creates it)."""
    return f"sqlite:///{tmp_path / 'imported.db'}"


def export_to(url: str, path: Path) -> Result:
    """Export the Pokémon store with ``-o path``."""
    return castore("export", "-s", POKEMONS, "--url", url, "-o", str(path))


@pytest.fixture
def umask_022() -> Iterator[None]:
    """Run with the usual umask, whatever the test runner's is."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


class InThread:
    """A function run in a thread; its result, once joined."""

    def __init__(self, function: Callable[[], object]) -> None:
        self.result: object = None
        self._function = function
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.result = self._function()

    def join(self) -> object:
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the other end of the FIFO never finished"
        return self.result


class TestExportOutput:
    """``-o`` replaces regular files safely and writes anything else directly."""

    def test_new_file_gets_the_usual_permissions(
        self, url: str, tmp_path: Path, umask_022: None
    ) -> None:
        """A new file is 0666 less the umask, like any file a tool creates (not 0600)."""
        target = tmp_path / "out.jsonl"
        assert export_to(url, target).exit_code == 0
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert target.read_bytes() == pokemon_lines()

    def test_replaced_file_keeps_its_permissions(self, url: str, tmp_path: Path) -> None:
        """Replacing a file keeps its mode."""
        target = tmp_path / "out.jsonl"
        target.write_text("old\n")
        target.chmod(0o640)
        assert export_to(url, target).exit_code == 0
        assert stat.S_IMODE(target.stat().st_mode) == 0o640
        assert target.read_bytes() == pokemon_lines()

    def test_symlink_target_is_replaced_and_the_link_kept(self, url: str, tmp_path: Path) -> None:
        """-o on a symbolic link writes its target; the link stays a link."""
        real = tmp_path / "real.jsonl"
        real.write_text("old\n")
        link = tmp_path / "link.jsonl"
        link.symlink_to(real.name)
        assert export_to(url, link).exit_code == 0
        assert link.is_symlink()
        assert real.read_bytes() == pokemon_lines()
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
            "link.jsonl",
            "real.jsonl",
        ]

    def test_fifo_is_written_not_replaced(self, url: str, tmp_path: Path) -> None:
        """-o on a FIFO feeds its reader, and the FIFO stays a FIFO."""
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        reader = InThread(fifo.read_bytes)
        result = export_to(url, fifo)
        assert stat.S_ISFIFO(fifo.lstat().st_mode), "the FIFO was replaced by a file"
        if result.exit_code != 0:
            with fifo.open("wb"):  # the export never opened it: let the reader go
                pass
        assert result.exit_code == 0, result.output
        assert reader.join() == pokemon_lines()

    def test_missing_directory_is_a_usage_error(self, url: str, tmp_path: Path) -> None:
        """-o into a directory that does not exist names the path, not a temporary file."""
        target = tmp_path / "nowhere" / "out.jsonl"
        result = export_to(url, target)
        assert result.exit_code == EXIT_USAGE
        error = one_line_error(result)
        assert str(target) in error
        assert "does not exist" in error
        assert "partial" not in error

    def test_directory_is_a_usage_error(self, url: str, tmp_path: Path) -> None:
        """-o naming a directory is refused and leaves it as it was."""
        directory = tmp_path / "out"
        directory.mkdir()
        result = export_to(url, directory)
        assert result.exit_code == EXIT_USAGE
        error = one_line_error(result)
        assert f"cannot write {str(directory)!r}: it is a directory" in error
        assert directory.is_dir()
        assert list(directory.iterdir()) == []
        assert list(tmp_path.glob("*.partial")) == []


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)"
)


@needs_proc
class TestExportToADescriptor:
    """-o naming an open descriptor writes through it, as the shell opened it."""

    def test_dev_stdout_appended_to_a_file_keeps_the_file(self, url: str, tmp_path: Path) -> None:
        """`castore export -o /dev/stdout >> all.jsonl` appends and keeps the earlier lines,
        and what is written to stdout afterwards still reaches the file. (The path resolved
        to the file itself, which was replaced: earlier and later lines were lost.)"""
        target = tmp_path / "all.jsonl"
        target.write_bytes(b"earlier line\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
        env["PYTHONPATH"] = str(REPO_ROOT)
        command = [sys.executable, "-m", "castore_pydantic", "export", "-s", POKEMONS]
        with target.open("ab") as appended:
            completed = subprocess.run(
                [*command, "--url", url, "-o", "/dev/stdout"],
                cwd=REPO_ROOT,
                env=env,
                stdout=appended,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
                check=False,
            )
            appended.write(b"later line\n")
        assert completed.returncode == 0, completed.stderr
        assert target.read_bytes() == b"earlier line\n" + pokemon_lines() + b"later line\n"
        # The events went to stdout, so the summary goes to stderr, as with -o -.
        assert "Exported 5 events of 3 aggregates to /dev/stdout." in completed.stderr

    @pytest.mark.parametrize("spelling", ["/dev/fd/{}", "/proc/self/fd/{}", "link to /dev/fd/{}"])
    def test_descriptor_paths_append_to_the_open_file(
        self, url: str, tmp_path: Path, spelling: str
    ) -> None:
        """/dev/fd/N, /proc/self/fd/N and a link to one write to descriptor N, in the mode
        it was opened with (appending here), and leave its file in place."""
        target = tmp_path / "all.jsonl"
        target.write_bytes(b"earlier line\n")
        with target.open("ab") as appended:
            path = spelling.removeprefix("link to ").format(appended.fileno())
            if spelling.startswith("link to "):
                link = tmp_path / "out.jsonl"
                link.symlink_to(path)
                path = str(link)
            result = export_to(url, Path(path))
            appended.write(b"later line\n")
        assert result.exit_code == 0, result.output
        assert target.read_bytes() == b"earlier line\n" + pokemon_lines() + b"later line\n"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".jsonl")) == (
            ["all.jsonl", "out.jsonl"] if spelling.startswith("link to ") else ["all.jsonl"]
        )

    def test_a_descriptor_open_for_reading_only_is_a_usage_error(
        self, url: str, tmp_path: Path
    ) -> None:
        """-o /dev/fd/3 with 3<file: the export failed at its first write, an unexpected
        error (exit 1) after the work; it is now a usage error naming the path."""
        source = tmp_path / "read.txt"
        source.write_bytes(b"kept\n")
        with source.open("rb") as read_only:
            path = f"/dev/fd/{read_only.fileno()}"
            result = castore("export", "-s", POKEMONS, "--url", url, "-o", path)
        assert result.exit_code == EXIT_USAGE
        assert f"cannot write {path!r}: descriptor" in one_line_error(result)
        assert source.read_bytes() == b"kept\n"

    def test_a_descriptor_that_is_not_open_is_a_usage_error(self, url: str) -> None:
        """-o /dev/fd/N for a descriptor the shell did not open is a usage error naming it."""
        import resource  # POSIX only, as this module

        closed = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # beyond every open one
        result = castore("export", "-s", POKEMONS, "--url", url, "-o", f"/dev/fd/{closed}")
        assert result.exit_code == EXIT_USAGE
        assert f"cannot write '/dev/fd/{closed}'" in one_line_error(result)


class TestImportSource:
    """``import`` reads a path that cannot be read twice, as it reads stdin."""

    def test_import_from_a_fifo(self, empty_url: str, tmp_path: Path) -> None:
        """A FIFO (like <(zcat ...) or /dev/stdin) is spooled, validated, then imported."""
        fifo = tmp_path / "in.jsonl"
        os.mkfifo(fifo)
        writer = InThread(lambda: fifo.write_bytes(pokemon_lines()))
        result = castore("import", "-s", POKEMONS, "--url", empty_url, str(fifo), "--json")
        writer.join()
        assert result.exit_code == 0, result.output
        exported = castore("export", "-s", POKEMONS, "--url", empty_url)
        assert exported.stdout_bytes == pokemon_lines()

    def test_import_from_a_directory_is_a_usage_error(self, empty_url: str, tmp_path: Path) -> None:
        """A SOURCE that cannot be read is named in a usage error."""
        result = castore("import", "-s", POKEMONS, "--url", empty_url, str(tmp_path))
        assert result.exit_code == EXIT_USAGE
        assert f"cannot read {str(tmp_path)!r}" in one_line_error(result)
