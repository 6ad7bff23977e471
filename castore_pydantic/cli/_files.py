"""The files ``export`` writes and ``import`` reads.

A regular file that ``export`` writes is written aside and renamed into place, so that a
failed export leaves the previous file as it was. Anything else a path can name (a FIFO, a
terminal, ``/dev/null``) is opened and written: renaming a file over it would replace the
node itself instead of feeding it. A path that names one of the process's open descriptors
(``/dev/stdout``, ``/dev/fd/3``, ``/proc/self/fd/1``) is written through that descriptor,
as shells do: its file may be regular, but the shell opened it for us, appending or not.
``import`` reads its input twice (validate, then write); input that cannot be read again
(stdin, a pipe) is copied into a spool on the first pass.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from castore_pydantic.cli._running import EXIT_USAGE, CliError, interruptible

#: Flags of the file written aside: a new file only, no translation of newlines on Windows.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


#: How many symbolic links are followed, at most, to find the descriptor a path names.
_MAX_LINKS = 40

#: The descriptors ``/dev`` names.
_STANDARD_STREAMS = {"stdin": 0, "stdout": 1, "stderr": 2}


def _read_only(descriptor: int) -> bool:
    """Whether an open descriptor was opened for reading only (POSIX; elsewhere, unknown)."""
    try:
        import fcntl  # POSIX only
    except ImportError:
        return False
    return fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY


def _unwritable(path: str, exc: OSError) -> CliError:
    return CliError(EXIT_USAGE, f"cannot write {path!r}: {exc.strerror or exc}")


def _descriptor_directory(directory: str) -> bool:
    """Whether ``directory`` (without symbolic links) lists this process's descriptors."""
    pid = os.getpid()
    return (
        directory == "/dev/fd"
        or re.fullmatch(rf"/proc/{pid}(?:/task/\d+)?/fd", directory) is not None
    )


def descriptor_named(path: str) -> int | None:
    """The open descriptor of this process that ``path`` names, if it names one.

    ``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N``, ``/proc/self/fd/N`` and symbolic links
    that lead to one of them. On Linux such a path resolves to the descriptor's file, which
    may be a regular file the shell opened (``>> all.jsonl``); replacing or truncating that
    file would lose what the shell was asked to keep.
    """
    current = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    for _ in range(_MAX_LINKS):
        parent, name = os.path.split(current)
        parent = os.path.realpath(parent)
        if parent == "/dev" and name in _STANDARD_STREAMS:
            return _STANDARD_STREAMS[name]
        if name.isdigit() and name.isascii() and _descriptor_directory(parent):
            return int(name)
        try:
            target = os.readlink(current)
        except OSError:  # not a link (or not one that can be read): a file's path
            return None
        current = os.path.join(parent, target)
    return None


def writes_to_stdout(path: str) -> bool:
    """Whether ``export -o path`` writes its events to stdout (``-``, ``/dev/stdout``, ...)."""
    return path == "-" or descriptor_named(path) == 1


@contextlib.contextmanager
def output_file(path: str) -> Iterator[IO[bytes]]:
    """Where ``export`` writes: stdout for ``-``, else the file at ``path``.

    A regular file (or a missing one) is written aside and renamed into place when the
    body succeeds; a symbolic link's target is what gets replaced. The replaced file keeps
    its permissions; a new file gets the usual ones (``0o666`` less the umask). A path that
    names an open descriptor (``/dev/stdout``, ``/dev/fd/N``) is written through it.

    Raises:
        CliError: The path is a directory, its directory does not exist, it names a
            descriptor that is not open, or it cannot be written (exit code 2).
    """
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    if not path:
        raise CliError(EXIT_USAGE, "--output is empty: give a file path, or - for stdout")
    descriptor = descriptor_named(path)
    if descriptor is not None:
        try:
            if _read_only(descriptor):  # writing would fail only once the work is done
                raise CliError(
                    EXIT_USAGE,
                    f"cannot write {path!r}: descriptor {descriptor} is open for reading only",
                )
            # A copy of the descriptor: its file, offset and append mode, as the shell made it.
            shared = os.fdopen(os.dup(descriptor), "wb")
        except OSError as exc:
            raise _unwritable(path, exc) from exc
        with shared:
            yield shared
        return
    try:
        found: os.stat_result | None = os.stat(path)  # follows symbolic links
    except FileNotFoundError:
        found = None
    except OSError as exc:
        raise _unwritable(path, exc) from exc
    if found is not None and stat.S_ISDIR(found.st_mode):
        raise CliError(EXIT_USAGE, f"cannot write {path!r}: it is a directory (give a file path)")
    if found is not None and not stat.S_ISREG(found.st_mode):
        try:
            direct = Path(path).open("wb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise _unwritable(path, exc) from exc
        with direct:
            yield direct
        return
    with _written_aside(Path(os.path.realpath(path)), path, found) as handle:
        yield handle


@contextlib.contextmanager
def _written_aside(
    target: Path, given: str, previous: os.stat_result | None
) -> Iterator[IO[bytes]]:
    """A new file next to ``target``, renamed onto it if the body succeeds, else removed."""
    if not target.parent.is_dir():
        raise CliError(
            EXIT_USAGE,
            f"cannot write {given!r}: directory {str(target.parent)!r} does not exist",
        )
    for _ in range(100):
        partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
        try:
            fd = os.open(partial, _NEW_FILE, 0o666)  # the umask applies, as for any new file
        except FileExistsError:
            continue
        except OSError as exc:
            raise _unwritable(given, exc) from exc
        break
    else:  # pragma: no cover - a hundred random names all taken
        raise CliError(EXIT_USAGE, f"cannot write {given!r}: no free temporary name beside it")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        if previous is not None:
            if hasattr(os, "chown"):
                with contextlib.suppress(OSError):  # only root may give a file away
                    os.chown(partial, previous.st_uid, previous.st_gid)
            os.chmod(partial, stat.S_IMODE(previous.st_mode))
        try:
            os.replace(partial, target)
        except OSError as exc:
            raise _unwritable(given, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


class Source:
    """What ``import`` reads: once to validate, then again to write.

    Attributes:
        size: The size in bytes, when known (a regular file).
    """

    def __init__(self, stream: IO[bytes], spool: IO[bytes] | None, size: int | None) -> None:
        self._stream = stream
        self._spool = spool
        self.size = size

    def first_pass(self) -> Iterator[bytes]:
        """The lines, copied into the spool when the input cannot be read again."""
        spool = self._spool
        for raw in self._stream:
            if spool is not None:
                spool.write(raw)
            yield raw

    def second_pass(self) -> IO[bytes]:
        """The input again, from its start."""
        handle = self._spool if self._spool is not None else self._stream
        handle.seek(0)
        return handle


@contextlib.contextmanager
def input_source(path: str) -> Iterator[Source]:
    """The input of ``import``: stdin for ``-``, else the file at ``path``.

    Raises:
        CliError: The file cannot be opened (exit code 2).
    """
    if path == "-":
        # Always spooled: stdin may be a file read from elsewhere than its start.
        with tempfile.TemporaryFile() as spool:
            yield Source(sys.stdin.buffer, spool, None)
        return
    try:
        # Opening a FIFO waits for a writer: Ctrl-C must stop that wait too.
        with interruptible(f"interrupted while opening {path!r}: nothing was imported"):
            stream = Path(path).open("rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise CliError(EXIT_USAGE, f"cannot read {path!r}: {exc.strerror}") from exc
    with stream:
        if stream.seekable():
            found = os.fstat(stream.fileno())
            yield Source(stream, None, found.st_size if stat.S_ISREG(found.st_mode) else None)
            return
        # A pipe (<(zcat ...), /dev/stdin, a FIFO) is read once: keep a copy to read again.
        with tempfile.TemporaryFile() as spool:
            yield Source(stream, spool, None)
