"""Files written so that a kill or a full disk leaves the previous good state: write a temporary file
beside the target, flush and ``fsync`` it, then ``os.replace`` it over the target (atomic on POSIX).
An ``OSError`` while writing (no space, read-only, permission) becomes one :class:`~vitdecomp.errors.
OutputError` naming the path; the temporary file is removed and the old file is untouched.

A folder several files of one set are written into is held with :func:`folder_lock` (an ``flock`` on
the folder itself: no lock file, released by the kernel when the holder dies, even by ``kill -9``);
under it, :func:`remove_stale_temps` removes what a killed writer left (its temporary files).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from vitdecomp.errors import OutputError


def os_error_message(err: OSError, path: str | Path) -> str:
    """One line for an OS error on ``path``: what failed and what to do."""
    why = {
        errno.ENOSPC: "no space left on the device; free some space or choose another folder",
        errno.EDQUOT: "disk quota exceeded; free some space or choose another folder",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EPERM: "operation not permitted; choose a folder you can write to",
        errno.EROFS: "read-only file system; choose a folder you can write to",
        errno.ENOTDIR: "a parent of this path is a file, not a folder",
        errno.EISDIR: "this path is a folder",
    }.get(err.errno, err.strerror or str(err))
    return f"cannot write {path}: {why}"


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` inside the block into an :class:`OutputError` naming ``path``."""
    try:
        yield
    except OSError as err:
        raise OutputError(os_error_message(err, path)) from err


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path`` and move it over ``path`` once complete."""
    path = Path(path)
    with writing(path):
        fd, tmp = temp_beside(path)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            fault_point(f"before-replace:{path.name}")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str, errors: str = "strict") -> Path:
    return atomic_write_bytes(path, text.encode("utf-8", errors))


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``folder`` itself while in the context (waits for another holder).
    No file is created; the kernel releases the lock when the process ends, however it ends."""
    folder = Path(folder)
    with writing(folder):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def temp_beside(path: str | Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (its folder made if missing), named as
    :func:`remove_stale_temps` finds it, with the permissions of a file ``open`` would create:
    ``(descriptor, its path)``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def remove_stale_temps(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left beside ``folder/<name>`` when its writer
    was killed; call it while holding :func:`folder_lock` (no live writer then has one open)."""
    gone = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                gone.append(tmp)
    return gone


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Fault injection for the test suite: ``VITDECOMP_KILL_AT=<point>`` makes the process kill itself
#: with SIGKILL when it reaches that point (e.g. ``before-replace:index.html``, ``store-before-commit``).
KILL_AT_ENV = "VITDECOMP_KILL_AT"


def fault_point(name: str) -> None:
    """Die here with SIGKILL when ``$VITDECOMP_KILL_AT`` names this point (tests of kill -9)."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
