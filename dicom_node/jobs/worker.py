"""The worker: claim a job, load its series, run its models, encode SEG and SR, record results.

Result UIDs and numbers come from results/naming.py: a re-run after a crash writes the same objects again
(the PACS keeps one copy), while a re-run after late arrivals changed the input makes new instances in the
same result series that supersede the earlier ones.
Every written object is read back and checked before its deliveries are recorded.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import highdicom as hd
import pydicom
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ComprehensiveSRStorage

from ai_models.types import (
    ClassificationResult,
    DetectionResult,
    InvalidGeometryError,
    ModelError,
    ModelResult,
    SegmentationResult,
    Volume,
)
from ai_models.volume import read_series
from dicom_node import metrics
from dicom_node.config import Config
from dicom_node.jobs.model_cache import ModelCache
from dicom_node.logs import log_event
from dicom_node.results.equipment import NodeIdentity
from dicom_node.results.naming import findings_sr_name, input_digest, rejection_name, seg_name, sr_name
from dicom_node.results.rejection import build_rejection_note
from dicom_node.results.seg import EmptySegmentationError, build_seg
from dicom_node.results.sr import build_findings_sr, build_sr
from storage.files import FileStore
from storage.jobstore import JobStore
from storage.records import JobRecord, NewResult, ResultRecord

if TYPE_CHECKING:
    from ai_models.bundle import LoadedModel  # torch and MONAI load only with the first model

log = logging.getLogger("dicom_node.worker")
_T = TypeVar("_T")


_gc_lock = threading.Lock()
_gc_pauses = 0  # stages running with the collector paused (several workers may share a process)
_gc_resume = False  # whether the collector was on when the first of them started


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a job's short Python-heavy stages (reading the headers, building,
    writing and reading back SEG and SR: ~100k containers in a second or two). In a process holding a model,
    each full collection they would trigger costs 0.1-0.3 s on the critical path. Reference counting still
    frees them as they go; anything cyclic waits until the collector resumes, when the last paused stage
    in the process ends (and only if it was on to begin with). Inference runs with the collector on."""
    global _gc_pauses, _gc_resume
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_resume = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_resume:
                gc.enable()


class PermanentJobError(Exception):
    """Retrying cannot help (invalid geometry, no readable instances): fail the job at once."""


class SupersededError(Exception):
    """A later run of the same study and route exists: this job's results would be out of date on arrival."""

    def __init__(self, by_job_id: int) -> None:
        super().__init__(f"superseded by job {by_job_id}")
        self.by_job_id = by_job_id


class LeaseLostError(Exception):
    """Our lease ran out and another worker took the job, or it was cancelled."""


@dataclass
class Timings:
    stages: dict[str, float] = field(default_factory=dict)

    def measure(self, name: str, fn: Callable[[], _T]) -> _T:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Summed per stage (a route's models share the inference stages), to the millisecond."""
        self.stages[name] = round(self.stages.get(name, 0.0) + seconds, 3)


def _read_back(data: bytes, kind: str, sop_uid: str) -> None:
    """Parse what was written as the viewer will; anything odd stops the job before sending."""
    ds = dcmread(BytesIO(data))
    if str(ds.SOPInstanceUID) != sop_uid:
        raise ModelError(f"{kind} read back with SOP Instance UID {ds.SOPInstanceUID}, expected {sop_uid}")
    if kind == "seg":
        hd.seg.Segmentation.from_dataset(ds, copy=False)
    elif kind == "rejection":
        hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
    elif ds.SOPClassUID == ComprehensiveSRStorage:  # the findings SR
        hd.sr.ComprehensiveSR.from_dataset(ds, copy=False)
    else:
        hd.sr.Comprehensive3DSR.from_dataset(ds, copy=False)


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class Worker:
    def __init__(
        self, cfg: Config, files: FileStore, jobs: JobStore, models: ModelCache, node: NodeIdentity, owner: str
    ) -> None:
        self.cfg = cfg
        self.files = files
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="result-writer")
        self.jobs = jobs
        self.models = models
        self.node = node
        self.owner = owner
        self.current_job: int | None = None

    # ---- loop --------------------------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim and process one job; False when none was due."""
        job = self.jobs.claim_job(self.owner, self.cfg.worker.lease_seconds)
        if job is None:
            return False
        self.current_job = job.id
        try:
            self.process(job)
        finally:
            self.current_job = None
        return True

    def process(self, job: JobRecord) -> None:
        log_event(
            log,
            "job_started",
            study_uid=job.study_uid,
            job_id=job.id,
            attempt=job.attempts,
            series_uid=job.series_uid,
            models=",".join(job.models),
        )
        stop_beat = threading.Event()
        lost = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(job.id, stop_beat, lost), daemon=True, name=f"heartbeat-{job.id}"
        )
        beat.start()
        try:
            results, timings = self._run(job, lost)
        except (PermanentJobError, InvalidGeometryError) as exc:
            self._fail(job, str(exc), permanent=True)
            return
        except LeaseLostError as exc:
            self._log_lost(job, str(exc))
            return
        except SupersededError as exc:
            if self.jobs.supersede_job(job.id, self.owner, exc.by_job_id):
                log_event(log, "job_superseded", study_uid=job.study_uid, job_id=job.id, by_job_id=exc.by_job_id)
            else:
                self._log_lost(job, "lease lost")
            return
        except Exception as exc:  # model crash, OOM, encoder bug: retry with backoff, then fail
            log.exception("job_attempt_failed", extra={"fields": {"study_uid": job.study_uid, "job_id": job.id}})
            self._fail(job, f"{type(exc).__name__}: {exc}", permanent=False)
            return
        finally:
            stop_beat.set()
            beat.join(timeout=5)
        if lost.is_set() or not self.jobs.finish_job(job.id, self.owner, results, json.dumps(timings.stages)):
            self._log_lost(job, "lease lost before its results were recorded")
            return
        metrics.JOBS_FINISHED.labels("done").inc()
        for stage in ("load", "seg_encode", "sr_encode", "write"):
            if stage in timings.stages:
                metrics.STAGE_SECONDS.labels(stage).observe(timings.stages[stage])
        log_event(
            log,
            "job_done",
            study_uid=job.study_uid,
            job_id=job.id,
            results=",".join(r.kind for r in results),
            **{f"t_{k}": v for k, v in timings.stages.items()},
        )

    def _log_lost(self, job: JobRecord, why: str) -> None:
        """The job was taken from this worker: by an admin's `cancel` (said as such), or by another worker
        after this one's lease ran out (a warning: this worker was too slow to renew it)."""
        current = self.jobs.get_job(job.id)
        if current is not None and current.state == "cancelled":
            log_event(log, "job_cancelled_while_running", study_uid=job.study_uid, job_id=job.id)
            return
        log_event(log, "job_lease_lost", logging.WARNING, study_uid=job.study_uid, job_id=job.id, error=why)

    def _heartbeat(self, job_id: int, stop: threading.Event, lost: threading.Event) -> None:
        interval = max(0.5, self.cfg.worker.lease_seconds / 3)
        while not stop.wait(interval):
            if not self.jobs.heartbeat(job_id, self.owner, self.cfg.worker.lease_seconds):
                lost.set()
                return

    def _fail(self, job: JobRecord, error: str, *, permanent: bool) -> None:
        max_attempts = job.attempts if permanent else self.cfg.worker.max_attempts
        state = self.jobs.fail_job(
            job.id, self.owner, error, max_attempts=max_attempts, backoff_seconds=self.cfg.worker.retry_backoff_seconds
        )
        if state in ("failed", "queued"):
            metrics.JOBS_FINISHED.labels("failed" if state == "failed" else "retry").inc()
        if state == "queued":
            metrics.RETRIES.labels("job").inc()
        log_event(
            log,
            "job_failed" if state == "failed" else "job_retry_scheduled",
            logging.ERROR,
            study_uid=job.study_uid,
            job_id=job.id,
            attempt=job.attempts,
            state=state,
            error=error[:500],
        )

    # ---- one job -----------------------------------------------------------------------------------------

    def _check_current(self, job: JobRecord) -> None:
        """Jobs of one study and route may run out of order (a retry's backoff, several workers): an older
        run found superseded is dropped before its work, and again before its results are written, so its
        SR never reaches the PACS after, and unaware of, the later run's."""
        later = self.jobs.superseding_job(job.id)
        if later is not None:
            raise SupersededError(later.id)

    def _run(self, job: JobRecord, lost: threading.Event) -> tuple[list[NewResult], Timings]:
        t = Timings()
        self._check_current(job)
        instances = self.jobs.instances_of_series(job.series_uid)
        if not instances:
            raise PermanentJobError(f"no instances of series {job.series_uid}")
        paths = [self.files.absolute(i.path) for i in instances]
        # one parse per file: the volume and, in its slice order, the headers the SEG and SR reference
        with collector_paused():
            volume, headers = t.measure("load", lambda: read_series(paths))
        for warning in volume.warnings:  # what the series got wrong that the volume tolerated
            log_event(
                log,
                "series_geometry_tolerated",
                logging.WARNING,
                study_uid=job.study_uid,
                job_id=job.id,
                series_uid=job.series_uid,
                warning=warning,
            )
        digest = input_digest(volume.sop_instance_uids)
        model_results: list[ModelResult] = []
        for name in job.models:
            if lost.is_set():
                raise LeaseLostError("lease lost before inference")
            model = t.measure("model_load", functools.partial(self.models.get, name))
            started = time.perf_counter()
            model_results.append(t.measure("inference", functools.partial(self._infer, model, volume, t)))
            metrics.INFERENCE_SECONDS.labels(name).observe(time.perf_counter() - started)
        if lost.is_set():
            raise LeaseLostError("lease lost after inference")
        self._check_current(job)
        with collector_paused():
            return self._encode_results(job, volume, headers, digest, model_results, t), t

    @staticmethod
    def _infer(model: LoadedModel, volume: Volume, t: Timings) -> ModelResult:
        """Run one model; the runner's own stages (pre, forward, window, post) are added to the job's
        timings as inference_<stage>, summed over the job's models, so the log and the job row say how
        much of inference is the network's forward pass."""
        result, stages = model.run_timed(volume)
        for stage, seconds in stages.items():
            t.add(f"inference_{stage}", seconds)
        return result

    def close(self) -> None:
        """Stop the result-writer thread, once the worker loop has ended."""
        self._writer.shutdown(wait=True)

    def _write(self, ds: Dataset, kind: str, model: str) -> NewResult:
        """Serialise, then store durably in a helper thread while the bytes are read back and checked here:
        the flush (file and folder) overlaps the parse. Nothing refers to the file until the job's
        deliveries are recorded, and a failed check removes it again."""
        data = _encode(ds)
        path = self.files.result_path(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
        if path.exists():  # a rebuild (same UIDs): check before replacing what earlier deliveries refer to
            _read_back(data, kind, str(ds.SOPInstanceUID))
            self.files.write_atomic(path, data)
            return self._result(ds, kind, model, path)
        stored = self._writer.submit(self.files.write_atomic, path, data)
        try:
            _read_back(data, kind, str(ds.SOPInstanceUID))
        except BaseException:
            if stored.exception() is None:
                self.files.remove(path)
            raise
        stored.result()
        return self._result(ds, kind, model, path)

    def _result(self, ds: Dataset, kind: str, model: str, path: Path) -> NewResult:
        return NewResult(
            kind=kind,
            model=model,
            study_uid=str(ds.StudyInstanceUID),
            series_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            path=self.files.relative(path),
        )

    def _encode_results(
        self,
        job: JobRecord,
        volume: Volume,
        headers: list[Dataset],
        digest: str,
        model_results: list[ModelResult],
        t: Timings,
    ) -> list[NewResult]:
        """Stages: seg_encode / sr_encode (building the datasets), write (serialise, read back, store)."""
        rc = self.cfg.results
        out: list[NewResult] = []
        segs = [r for r in model_results if isinstance(r, SegmentationResult)]
        dets = [r for r in model_results if isinstance(r, DetectionResult)]
        clss = [r for r in model_results if isinstance(r, ClassificationResult)]
        reported: list[tuple[SegmentationResult, pydicom.Dataset | None]] = []  # each with its SEG, if any
        earlier = self.jobs.earlier_results(job.study_uid, job.route, job.generation)
        for i, r in enumerate(segs):
            ident = r.identity
            name = seg_name(
                volume.series_instance_uid, ident, digest, earlier, job.generation, rc.seg_series_number + i
            )
            try:
                ds = t.measure(
                    "seg_encode",
                    functools.partial(
                        build_seg,
                        headers,
                        r,
                        series_uid=name.series_uid,
                        sop_uid=name.sop_uid,
                        instance_number=name.instance_number,
                        series_number=name.series_number,
                        node=self.node,
                        series_description=f"AI SEG {ident.name}"[:64],
                    ),
                )
            except EmptySegmentationError:
                log_event(log, "segmentation_empty", study_uid=job.study_uid, job_id=job.id, model=ident.name)
                reported.append((r, None))
                continue
            out.append(t.measure("write", functools.partial(self._write, ds, "seg", ident.name)))
            reported.append((r, ds))
        identities = [r.identity for r in model_results]
        report = sr_name(
            volume.series_instance_uid, job.route, identities, digest, earlier, job.generation, rc.sr_series_number
        )
        sr = t.measure(
            "sr_encode",
            lambda: build_sr(
                headers,
                volume,
                segmentations=reported,
                detections=dets,
                classifications=clss,
                series_uid=report.series_uid,
                sop_uid=report.sop_uid,
                series_number=report.series_number,
                node=self.node,
                instance_number=report.instance_number,
                predecessors=[_reference(r) for r in report.follows],
            ),
        )
        out.append(t.measure("write", lambda: self._write(sr, "sr", "")))
        # the findings with geometry again, alone, for viewers that cannot open the full report (OHIF)
        fname = findings_sr_name(
            volume.series_instance_uid,
            job.route,
            identities,
            report.sop_uid,
            earlier,
            job.generation,
            rc.findings_sr_series_number,
        )
        findings = t.measure(
            "sr_encode",
            lambda: build_findings_sr(
                headers,
                volume,
                detections=dets,
                report_sop_uid=report.sop_uid,
                series_uid=fname.series_uid,
                sop_uid=fname.sop_uid,
                series_number=fname.series_number,
                node=self.node,
                instance_number=fname.instance_number,
                predecessors=[_reference(r) for r in fname.follows],
            ),
        )
        if findings is not None:  # recorded under the detection models that found them (the report has none)
            by = ",".join(dict.fromkeys(r.identity.name for r in dets if r.detections))
            out.append(t.measure("write", lambda: self._write(findings, "sr", by)))
        note = self._rejection_note(job, headers[0], earlier, out)
        if note is not None:  # last: its deliveries wait until the replacements are delivered (JobStore)
            out.append(t.measure("write", lambda: self._write(note, "rejection", "")))
        return out

    def _rejection_note(
        self, job: JobRecord, header: Dataset, earlier: list[ResultRecord], made: list[NewResult]
    ) -> Dataset | None:
        """The IOCM rejection note retiring what this re-run replaces at the PACS: the earlier run's SEGs and
        findings SR (viewers list every SEG and SR of a study; a SEG cannot name a predecessor). The full SR
        stays: its successor names it in Predecessor Documents, the versioning IHE AI Results consumers read.
        An earlier object this run made again (same UID) is current, not rejected. None on a first run."""
        current = {r.sop_instance_uid for r in made}
        rejected = [
            e
            for e in earlier
            if e.sop_instance_uid not in current
            and (e.kind == "seg" or (e.kind == "sr" and e.sop_class_uid == ComprehensiveSRStorage))
        ]
        if not rejected:
            return None
        uids = sorted(e.sop_instance_uid for e in rejected)
        log_event(log, "rejection_note_built", study_uid=job.study_uid, job_id=job.id, rejected=",".join(uids))
        name = rejection_name(job.study_uid, job.route, uids, job.generation, self.cfg.results.rejection_series_number)
        return build_rejection_note(
            header,
            [_reference(e) for e in rejected],
            series_uid=name.series_uid,
            sop_uid=name.sop_uid,
            series_number=name.series_number,
            instance_number=name.instance_number,
            node=self.node,
            reason=f"Superseded by the AI results of job {job.id} (a re-run of route {job.route} after late arrivals)",
        )


def _reference(result: ResultRecord) -> Dataset:
    """An earlier result as the UIDs that name it (what a Predecessor Documents Sequence item needs)."""
    ref = Dataset()
    ref.StudyInstanceUID, ref.SeriesInstanceUID = result.study_uid, result.series_uid
    ref.SOPClassUID, ref.SOPInstanceUID = result.sop_class_uid, result.sop_instance_uid
    return ref
