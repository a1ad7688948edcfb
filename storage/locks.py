"""Locks: the processes writing instance rows to one SQLite database; one purge at a time.

SQLite makes a writer that finds the database locked sleep and retry (1, 2, 5, 10... ms): with several
listener processes committing hundreds of small transactions a second, those sleeps, not the disk, would
set the pace. Queueing on an flock instead wakes the next writer the moment the lock is released.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path
from types import TracebackType

from sqlalchemy import Connection, Engine, text


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

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def close(self) -> None:
        os.close(self._fd)


PURGE_LOCK_KEY = 0x64636D70  # PostgreSQL advisory lock key of the purge ("dcmp")


class PurgeLock:
    """One purge at a time per job store: a flock beside the SQLite file (every process on the host), or a
    PostgreSQL session advisory lock (every machine using the database). Held on a connection of its own."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        db = engine.url.database if engine.dialect.name == "sqlite" else None
        self._path = Path(db + ".purge.lock") if db and db != ":memory:" else None
        self._fd: int | None = None
        self._conn: Connection | None = None
        self._threads = threading.Lock()

    def acquire(self, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to ``timeout`` seconds; False if another purge still holds it."""
        deadline = time.monotonic() + timeout
        if not (self._threads.acquire(timeout=timeout) if timeout > 0 else self._threads.acquire(blocking=False)):
            return False
        try:
            while not self._try():
                if time.monotonic() >= deadline:
                    self._threads.release()
                    return False
                time.sleep(0.05)
        except BaseException:
            self._threads.release()
            raise
        return True

    def _try(self) -> bool:
        if self.engine.dialect.name == "postgresql":
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            if conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": PURGE_LOCK_KEY}).scalar():
                self._conn = conn
                return True
            conn.close()
            return False
        if self._path is None:
            return True
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        try:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                try:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PURGE_LOCK_KEY})
                finally:
                    conn.close()
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)  # closing drops the flock
        finally:
            self._threads.release()
