"""Worker-side latency pieces: the runner's stages reach the job's timings; the collector pause nests and
restores; a model load freezes what lives as long as the process, after collecting garbage."""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset

from ai_models.types import ModelError, ModelIdentity, SegmentationResult
from dicom_node.jobs import model_cache as models_module
from dicom_node.jobs import worker as worker_module
from dicom_node.jobs.worker import Timings, Worker, collector_paused
from storage.files import FileStore

IDENT = ModelIdentity(name="m", version="1", task="segmentation", labels={1: "a"}, bundle_hash="0" * 64)


class _Timed:
    def __init__(self, stages: dict[str, float]) -> None:
        self.stages = stages

    def run_timed(self, volume: object) -> tuple[SegmentationResult, dict[str, float]]:
        return SegmentationResult(identity=IDENT, mask=None), dict(self.stages)  # type: ignore[arg-type]


def test_runner_stages_are_added_to_the_job_timings() -> None:
    t = Timings()
    Worker._infer(_Timed({"pre": 0.25, "forward": 8.0, "window": 0.125, "post": 0.5}), object(), t)  # type: ignore[arg-type]
    Worker._infer(_Timed({"pre": 0.5, "forward": 1.0}), object(), t)  # type: ignore[arg-type]  # a second model: summed
    assert t.stages == {
        "inference_pre": 0.75,
        "inference_forward": 9.0,
        "inference_window": 0.125,
        "inference_post": 0.5,
    }


def test_collector_paused_nests_across_threads_and_restores() -> None:
    assert gc.isenabled()
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with collector_paused():
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=other)
    with collector_paused():
        assert not gc.isenabled()
        thread.start()
        assert inside.wait(5)
    assert not gc.isenabled()  # the other thread's stage is still running
    release.set()
    thread.join(5)
    assert gc.isenabled()


def test_collector_stays_off_when_it_was_off() -> None:
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_collector_resumes_after_an_error() -> None:
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("stage failed")
    assert gc.isenabled()


class _Cyclic:
    def __init__(self) -> None:
        self.me = self


def test_model_load_freezes_long_lived_objects_but_not_garbage() -> None:
    gc.unfreeze()
    garbage = _Cyclic()  # unreachable once deleted, but only the cycle collector can free it
    ref = weakref.ref(garbage)
    del garbage
    models_module._freeze_long_lived()
    try:
        assert ref() is None  # collected before the freeze, not kept alive in the permanent generation
        assert gc.get_freeze_count() > 1000  # the process's modules and objects are out of the collector's walk
    finally:
        gc.unfreeze()


def _sr_like(sop: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.34", sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", "1.2.3.4"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds


def _bare_worker(tmp_path: Path) -> Worker:
    w = Worker.__new__(Worker)  # only what _write uses: the file store and the writer thread
    w.files = FileStore(tmp_path / "files")
    w._writer = ThreadPoolExecutor(max_workers=1)
    return w


def test_a_result_failing_its_read_back_is_not_left_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = _bare_worker(tmp_path)

    def broken(data: bytes, kind: str, sop_uid: str) -> None:
        raise ModelError("read back wrong")

    monkeypatch.setattr(worker_module, "_read_back", broken)
    with pytest.raises(ModelError):
        w._write(_sr_like("1.2.3.4.5"), "sr", "")
    assert not [p for p in (tmp_path / "files").rglob("*") if p.is_file()]


def test_a_rebuilt_result_failing_its_read_back_keeps_the_earlier_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = _bare_worker(tmp_path)
    monkeypatch.setattr(worker_module, "_read_back", lambda data, kind, sop_uid: None)
    first = w._write(_sr_like("1.2.3.4.6"), "sr", "")
    stored = w.files.absolute(first.path)
    before = stored.read_bytes()

    def broken(data: bytes, kind: str, sop_uid: str) -> None:
        raise ModelError("read back wrong")

    monkeypatch.setattr(worker_module, "_read_back", broken)
    with pytest.raises(ModelError):
        w._write(_sr_like("1.2.3.4.6"), "sr", "")
    assert stored.read_bytes() == before


def test_a_job_cancelled_while_running_is_logged_as_such(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`dicom-node cancel` on a running job takes its lease: the worker says it was cancelled, not that it
    lost its lease (the warning that means a worker too slow to renew it)."""
    from dicom_node.config import parse_config
    from dicom_node.jobs.model_cache import ModelCache
    from dicom_node.runtime import open_runtime
    from dicom_node.service import node_identity
    from storage.records import NewInstance, NewJob

    cfg = parse_config({"node": {"data_dir": str(tmp_path / "var")}}, tmp_path)
    rt = open_runtime(cfg)
    rt.jobs.record_instance(
        NewInstance("1.1", "1.2", "1.3", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", "x/1.dcm", 10), now=1.0
    )
    rt.jobs.complete_study("1.2", 0, [NewJob(route="r", series_uid="1.3", models=("m",), destinations=("p",))])
    worker = Worker(cfg, rt.files, rt.jobs, ModelCache(cfg), node_identity(cfg), "w")
    try:
        job = rt.jobs.claim_job("w", 60)
        assert job is not None
        caplog.set_level("INFO")
        rt.jobs.cancel_job(job.id)
        worker._log_lost(job, "lease lost after inference")
        rt.jobs.retry_job(job.id)
        job = rt.jobs.claim_job("w", 60)
        assert job is not None
        rt.jobs.claim_job("other", 60, now=job.lease_expires_at + 1)  # this worker was too slow: taken over
        worker._log_lost(job, "lease lost after inference")
    finally:
        worker.close()
    events = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "dicom_node.worker"]
    assert events == [("INFO", "job_cancelled_while_running"), ("WARNING", "job_lease_lost")]
