"""The process's one database engine and file store.

Kept free of torch and networking imports so admin commands (`status`, `jobs`, `retry`) start at once.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import Config, ConfigError
from storage.db import make_engine
from storage.files import FileStore
from storage.jobstore import JobStore


@dataclass(frozen=True)
class Runtime:
    files: FileStore
    jobs: JobStore


def open_runtime(cfg: Config, *, create: bool = True) -> Runtime:
    """The process's one engine and file store; creates the data folder and the schema on first use.

    ``create=False`` (the admin commands, perhaps run by another user than the node's) changes nothing in
    the data folder, and refuses one that holds no node's SQLite store rather than making an empty store
    there and reporting "no jobs" for a mistyped path. A data folder the node cannot use is a ConfigError
    naming ``node.data_dir``."""
    if not create and not has_store(cfg):
        raise ConfigError(f"node.data_dir: no node data in {cfg.data_dir} (has a node run with this config?)")
    try:
        if create:
            cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(cfg.data_dir, 0o700)
            if not os.access(cfg.data_dir, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable")
        files = FileStore(cfg.data_dir / "files", min_free_bytes=cfg.node.min_free_mb << 20, create=create)
    except OSError as exc:
        raise ConfigError(f"node.data_dir: cannot use {cfg.data_dir}: {exc.strerror or exc}") from exc
    jobs = JobStore(make_engine(cfg.database_url, synchronous=cfg.node.sqlite_synchronous))
    jobs.create_schema()
    return Runtime(files=files, jobs=jobs)


def has_store(cfg: Config) -> bool:
    """Whether there is a node's store to read: its SQLite file in the data folder, or a database by URL
    (an admin may query that from a host without the shared data folder)."""
    return bool(cfg.node.database_url) or (cfg.data_dir / "node.db").is_file()


def data_dir_problem(data_dir: Path) -> tuple[str, bool] | None:
    """Why the node might not create or write ``data_dir`` (looked at without creating it), and whether that
    is certain (a file in the way) or only so for this user (the node may run as another), or None."""
    existing = data_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder", True
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user (uid {os.getuid()})", False
    return None
