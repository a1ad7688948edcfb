"""A lock shared by the processes writing instance rows to one SQLite database.

SQLite makes a writer that finds the database locked sleep and retry (1, 2, 5, 10... ms): with several
listener processes committing hundreds of small transactions a second, those sleeps, not the disk, would
set the pace. Queueing on an flock instead wakes the next writer the moment the lock is released.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from types import TracebackType


class WriterLock:
    """Exclusive across processes (flock on ``path``) and across this process's threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self._threads = threading.Lock()  # flock is per open file: threads of one process share it

    def __enter__(self) -> WriterLock:
        self._threads.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def close(self) -> None:
        os.close(self._fd)
