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

    ``create=False`` (the admin commands) refuses a data folder that holds no node's data, rather than
    making an empty store there and reporting "no jobs" for a mistyped path. Either way a data folder the
    node cannot use is a ConfigError naming ``node.data_dir``."""
    if not create and not has_store(cfg):
        raise ConfigError(f"node.data_dir: no node data in {cfg.data_dir} (has a node run with this config?)")
    try:
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(cfg.data_dir, 0o700)
        if not os.access(cfg.data_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as exc:
        raise ConfigError(f"node.data_dir: cannot use {cfg.data_dir}: {exc.strerror or exc}") from exc
    files = FileStore(cfg.data_dir / "files", min_free_bytes=cfg.node.min_free_mb << 20)
    jobs = JobStore(make_engine(cfg.database_url, synchronous=cfg.node.sqlite_synchronous))
    jobs.create_schema()
    return Runtime(files=files, jobs=jobs)


def has_store(cfg: Config) -> bool:
    """Whether the data folder holds a node's store (its SQLite file; with a database URL, the folder)."""
    return (cfg.data_dir / "node.db").is_file() if not cfg.node.database_url else cfg.data_dir.is_dir()


def data_dir_problem(data_dir: Path) -> str | None:
    """Why the node could not create or write ``data_dir`` (without creating it), or None."""
    existing = data_dir
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None
