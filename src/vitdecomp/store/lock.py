"""The lock a store's writer holds: :class:`StoreLock`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from vitdecomp.errors import LockedError
from vitdecomp.fsio import writing
from vitdecomp.store.rows import StorePath


def is_url(path: StorePath) -> bool:
    """A store location given as an fsspec URL (``memory://``, ``s3://``, ``file://``...)."""
    return "://" in str(path)


class StoreLock:
    """An exclusive lock on a store folder (``lock``: an ``flock`` on that file, released by the
    kernel when the process dies, even by ``kill -9``). The file names the holder (pid, host, command,
    since); a second writer waits up to ``timeout`` seconds, then fails with
    :class:`~vitdecomp.errors.LockedError` naming the holder. A store at a URL has no lock (object
    stores have no ``flock``): one driver per store commits, workers write disjoint chunks."""

    def __init__(self, folder: StorePath, timeout: float = 0.0) -> None:
        self.url = is_url(folder)
        self.path = Path("/") if self.url else Path(folder) / "lock"
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        if self.url:
            return self
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
                    os.close(fd)
                    raise LockedError(
                        f"the store {self.path.parent} is being written by another run ({holder}); wait for it "
                        "to finish, or use another --cache-dir"
                    ) from None
                time.sleep(0.2)
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
        holder += " ".join(sys.argv)[:200]
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
