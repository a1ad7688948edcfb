"""The process's one database engine and file store.

Kept free of torch and networking imports so admin commands (`status`, `jobs`, `retry`) start at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dicom_node.config import Config
from storage.db import make_engine
from storage.files import FileStore
from storage.jobstore import JobStore


@dataclass(frozen=True)
class Runtime:
    files: FileStore
    jobs: JobStore


def open_runtime(cfg: Config) -> Runtime:
    """The process's one engine and file store; creates the schema on first use."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(cfg.data_dir, 0o700)
    files = FileStore(cfg.data_dir / "files", min_free_bytes=cfg.node.min_free_mb << 20)
    jobs = JobStore(make_engine(cfg.database_url, synchronous=cfg.node.sqlite_synchronous))
    jobs.create_schema()
    return Runtime(files=files, jobs=jobs)
