"""Multiprocess mode for the node's metrics, chosen before prometheus_client is imported (see metrics.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess(data_dir: Path) -> Path:
    """Empty ``<data_dir>/.metrics`` (a node starts its counters from zero, as Prometheus expects after a
    restart) and select multiprocess mode for this process and the listener processes it starts."""
    folder = data_dir / ".metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None
