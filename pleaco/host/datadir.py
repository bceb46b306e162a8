"""One agent per data dir: an exclusive lock held for the agent's whole life.

Two agents on one data dir would share a node identity, a store and a proxy: they would
write the same records under the same key and fight over the same containers. The lock is
``flock`` on ``DATA_DIR/agent.lock``, which holds the owner's pid: the kernel drops it when
the process ends, however it ends (kill -9 included), so a stale file never blocks a start.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pleaco.errors import Conflict

LOCK_FILE = "agent.lock"


class DataDirInUse(Conflict, RuntimeError, code="data_dir_in_use"):
    """Another agent holds the data dir."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise DataDirInUse naming the agent that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(f"data dir {self.path.parent} is in use by another agent (pid {holder}); "
                               "stop it first, or give this one its own --data-dir") from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays (its pid is stale, harmless)
            self._fd = None
