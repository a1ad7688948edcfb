"""Models load when the node starts: the first study does not wait for them, and a bundle that cannot load
is named in the log at once, while the others load and serve."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from ai_models.types import ModelError
from dicom_node.config import parse_config
from dicom_node.jobs.model_cache import ModelCache
from dicom_node.service import _loop
from tests.fault_models import write_fault_bundle


def _cache(tmp_path: Path, **worker: object) -> ModelCache:
    good = write_fault_bundle(tmp_path, "good")
    bad = write_fault_bundle(tmp_path, "bad", failure="bogus")  # its network refuses to be built
    cfg = parse_config(
        {
            "node": {"data_dir": str(tmp_path / "var")},
            "worker": worker,
            "models": [{"name": "good", "bundle": str(good)}, {"name": "bad", "bundle": str(bad)}],
        },
        tmp_path,
    )
    return ModelCache(cfg)


def test_preload_loads_what_it_can_and_names_what_it_cannot(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cache = _cache(tmp_path)
    assert cache.preload() == 1
    loaded = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "model_loaded"]
    failed = [(r.levelno, getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == "model_load_failed"]
    assert [f["model"] for f in loaded] == ["good"]
    assert len(failed) == 1 and failed[0][0] == logging.ERROR
    assert failed[0][1]["model"] == "bad" and "'network_def' cannot be instantiated" in str(failed[0][1]["error"])
    model = cache.get("good")
    assert cache.get("good") is model  # kept: the job uses the preloaded model, nothing loads again
    assert sum(r.getMessage() == "model_loaded" for r in caplog.records) == 1
    with pytest.raises(ModelError, match="'network_def' cannot be instantiated"):  # as the job needing it will
        cache.get("bad")


def test_the_worker_loop_preloads_before_its_first_poll(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    polled: list[int] = []
    stop = threading.Event()

    def step() -> bool:
        polled.append(len(cache._loaded))
        stop.set()
        return False

    _loop("worker", step, 0.01, stop, threading.Event(), cache.preload)
    assert polled == [1]  # the good model was loaded before the worker looked for a job


def test_preload_models_is_a_checked_config_key(tmp_path: Path) -> None:
    assert _cache(tmp_path).cfg.worker.preload_models is True
    assert _cache(tmp_path / "off", preload_models=False).cfg.worker.preload_models is False
    with pytest.raises(ValueError, match="preload_models"):
        _cache(tmp_path / "wrong", preload_models="yes")
