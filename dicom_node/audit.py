"""The audit trail: one JSON line per association, result sent and admin action, rotated by size.

Several processes append to one file (the listener processes, the node, an admin's CLI command). Each record
is one ``write`` to a file opened with O_APPEND, so lines never interleave. Rotation takes an exclusive lock
on ``<path>.lock``; a writer whose open file was rotated away (its inode no longer at ``path``) reopens it.
Records carry AE titles, addresses and UIDs, never patient names or IDs.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from dicom_node.config import Config

log = logging.getLogger("dicom_node.audit")


class AuditLog:
    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd = -1
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: Config) -> AuditLog:
        return cls(cfg.audit_path, cfg.audit.max_bytes, cfg.audit.backups)

    def record(self, event: str, **fields: Any) -> None:
        """Append one record; a failure to write is logged, never raised (auditing must not stop a transfer)."""
        rec = {"ts": round(time.time(), 3), "event": event, **{k: v for k, v in fields.items() if v is not None}}
        line = (json.dumps(rec, default=str, separators=(",", ":")) + "\n").encode()
        try:
            with self._lock:
                self._append(line)
        except OSError as exc:
            log.warning("audit_write_failed", extra={"fields": {"path": str(self.path), "error": str(exc)}})

    def _append(self, line: bytes) -> None:
        if self._fd < 0 or self._rotated_away():
            self._reopen()
        if os.fstat(self._fd).st_size + len(line) > self.max_bytes:
            self._rotate()
        os.write(self._fd, line)

    def _rotated_away(self) -> bool:
        try:
            return os.stat(self.path).st_ino != os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return True

    def _reopen(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def _rotate(self) -> None:
        lock_fd = os.open(f"{self.path}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            # another process may have rotated while we waited for the lock
            if not self._rotated_away() and os.fstat(self._fd).st_size > 0:
                if self.backups == 0:
                    os.truncate(self.path, 0)
                else:
                    for i in range(self.backups - 1, 0, -1):
                        with contextlib.suppress(FileNotFoundError):
                            os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
                    os.replace(self.path, f"{self.path}.1")
            self._reopen()
        finally:
            os.close(lock_fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def cli_actor() -> str:
    """Who runs an admin command in a terminal: the OS user."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"
