"""The real Sender against PACS peers that fail: nothing built is lost, and every failure says what it was.

Each test records a finished job with a small real SEG and SR (as the worker would: files in the file store,
results and deliveries in the job store) and drives ``Sender.run_once`` against DCMTK storescp or a scripted
pynetdicom PACS (tests/fault_peers.py) on loopback.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread

from ai_models.types import SegmentationResult
from dicom_node.cli import main as cli_main
from dicom_node.config import Config, load_config
from dicom_node.delivery.sender import Sender
from dicom_node.results import build_seg, build_sr, derive_uid
from dicom_node.results.rejection import build_rejection_note
from dicom_node.runtime import Runtime, open_runtime
from storage.records import DeliveryRecord, NewJob, NewResult
from tests.fault_peers import SEG_CLASS, SR_CLASS, FaultSCP
from tests.peers import StoreSCP, free_port, running, wait_for
from tests.unit.results_helpers import NODE, identity, lung_nodule_mask, make_ct_series, volume_of

BACKOFF = 0.2


@dataclass(frozen=True)
class Results:
    seg: bytes
    sr: bytes
    seg_uid: str
    sr_uid: str
    study_uid: str
    series_uid: str
    note: bytes  # an IOCM rejection note retiring an earlier run's SEG, as a re-run's last result
    note_uid: str


KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


@pytest.fixture(scope="module")
def results() -> Results:
    """A small real SEG and SR of a synthetic CT series (built once, written into each test's store)."""
    source = make_ct_series(8, 32, 32, with_pixels=False)
    seg_result = SegmentationResult(identity(), lung_nodule_mask((8, 32, 32)))
    series = str(source[0].SeriesInstanceUID)
    seg = build_seg(
        source,
        seg_result,
        series_uid=derive_uid("t-seg-series", series),
        sop_uid=derive_uid("t-seg", series),
        series_number=9001,
        node=NODE,
    )
    sr = build_sr(
        source,
        volume_of(source),
        segmentations=[(seg_result, seg)],
        detections=[],
        classifications=[],
        series_uid=derive_uid("t-sr-series", series),
        sop_uid=derive_uid("t-sr", series),
        series_number=9002,
        node=NODE,
    )

    def encode(ds: pydicom.Dataset) -> bytes:
        from io import BytesIO

        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    earlier = pydicom.Dataset()
    earlier.StudyInstanceUID, earlier.SeriesInstanceUID = seg.StudyInstanceUID, seg.SeriesInstanceUID
    earlier.SOPClassUID, earlier.SOPInstanceUID = SEG_CLASS, derive_uid("t-earlier-seg", series)
    note = build_rejection_note(
        source[0],
        [earlier],
        series_uid=derive_uid("t-ko-series", series),
        sop_uid=derive_uid("t-ko", series),
        series_number=9200,
        instance_number=2,
        node=NODE,
        reason="superseded",
    )
    return Results(
        encode(seg),
        encode(sr),
        str(seg.SOPInstanceUID),
        str(sr.SOPInstanceUID),
        str(source[0].StudyInstanceUID),
        series,
        encode(note),
        str(note.SOPInstanceUID),
    )


@dataclass
class Setup:
    cfg: Config
    config_path: Path
    rt: Runtime
    sender: Sender
    job_id: int
    results: Results

    def deliveries(self) -> dict[str, DeliveryRecord]:
        return {d.result.kind: d for d in self.rt.jobs.deliveries_of_job(self.job_id)}

    def send_until(self, done: Callable[[dict[str, DeliveryRecord]], bool], timeout: float, what: str) -> None:
        """Run the sender (as its loop would) until the deliveries reach the wanted state."""
        wait_for(lambda: (self.sender.run_once(), done(self.deliveries()))[1], timeout, what, interval=0.05)


def _config(
    tmp: Path,
    *,
    port: int,
    ae_title: str = "PACS",
    max_attempts: int = 3,
    dimse_timeout: float = 3,
    backoff: float = BACKOFF,
) -> Path:
    path = tmp / "config.toml"
    path.write_text(f"""
[node]
ae_title = "DICOM_NODE"
port = {free_port()}
bind = "127.0.0.1"
data_dir = "{tmp / "var"}"
min_free_mb = 0

[sender]
max_attempts = {max_attempts}
backoff_seconds = {backoff}
backoff_max_seconds = {4 * backoff}
poll_seconds = 0.1
acse_timeout = 3
dimse_timeout = {dimse_timeout}
network_timeout = 3

[[destinations]]
name = "pacs"
ae_title = "{ae_title}"
host = "127.0.0.1"
port = {port}
""")
    return path


@pytest.fixture()
def make_setup(tmp_path: Path, results: Results) -> Iterator[Callable[..., Setup]]:
    opened: list[Runtime] = []

    def make(*, note: bool = False, **kwargs: object) -> Setup:
        """``note``: the job is a re-run, its results followed by a rejection note."""
        path = _config(tmp_path, **kwargs)  # type: ignore[arg-type]
        cfg = load_config(path)
        rt = open_runtime(cfg)
        opened.append(rt)
        new_results = []
        made = [("seg", results.seg, results.seg_uid, SEG_CLASS), ("sr", results.sr, results.sr_uid, SR_CLASS)]
        for kind, data, uid, cls in made + ([("rejection", results.note, results.note_uid, KO_CLASS)] * note):
            p = rt.files.result_path(results.study_uid, uid)
            rt.files.write_atomic(p, data)
            new_results.append(
                NewResult(
                    kind=kind,
                    model="chest-ct-seg" if kind == "seg" else "",
                    study_uid=results.study_uid,
                    series_uid=results.series_uid + f".{kind}",
                    sop_instance_uid=uid,
                    sop_class_uid=cls,
                    path=rt.files.relative(p),
                )
            )
        job = rt.jobs.enqueue_job(
            results.study_uid,
            0,
            NewJob(route="chest-ct", series_uid=results.series_uid, models=("chest-ct-seg",), destinations=("pacs",)),
        )
        claimed = rt.jobs.claim_job("worker", 60)
        assert claimed is not None and claimed.id == job.id
        assert rt.jobs.finish_job(job.id, "worker", new_results)
        return Setup(cfg, path, rt, Sender(cfg, rt.files, rt.jobs, "sender-test"), job.id, results)

    yield make
    for rt in opened:
        rt.jobs.engine.dispose()


def _states(ds: dict[str, DeliveryRecord]) -> dict[str, str]:
    return {k: d.state for k, d in ds.items()}


def _all(state: str) -> Callable[[dict[str, DeliveryRecord]], bool]:
    return lambda ds: len(ds) == 2 and all(d.state == state for d in ds.values())


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, object]]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == event]


def _job_untouched(s: Setup) -> None:
    """Delivery problems never send the job back to inference."""
    job = s.rt.jobs.get_job(s.job_id)
    assert job is not None and job.state == "done" and job.attempts == 1
    assert len(s.rt.jobs.results_of_job(s.job_id)) == 2


# ---------------------------------------------------------------------------------------------------- tests


def test_pacs_down_results_wait_with_backoff_then_arrive(
    make_setup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    base = 1.0
    s = make_setup(port=port, max_attempts=10, backoff=base)
    waits = []
    for attempt in (1, 2):
        if attempt == 2:
            due = min(d.not_before for d in s.deliveries().values())
            if time.time() < due - 0.1:  # (always, unless this machine stalled): not due, so nothing is sent
                assert s.sender.run_once() is False
            wait_for(lambda: time.time() >= max(d.not_before for d in s.deliveries().values()), 5, "backoff over")
        t0 = time.time()
        assert s.sender.run_once() is True
        t1 = time.time()
        ds = s.deliveries()
        assert _states(ds) == {"seg": "pending", "sr": "pending"}
        for d in ds.values():
            assert d.attempts == attempt and "cannot connect" in d.error and d.last_status == ""
            waits.append((d.not_before - t1, d.not_before - t0))
    # exponential backoff: base after the first attempt, twice that after the second
    for (lo, hi), expected in zip(waits, [base] * 2 + [2 * base] * 2, strict=True):
        assert lo - 0.01 <= expected <= hi + 0.01, (waits, expected)
    assert len(_events(caplog, "delivery_retry_scheduled")) == 4

    pacs = StoreSCP(tmp_path / "pacs", port=port).start()
    with running(pacs):
        s.send_until(_all("done"), 20, "delivery once the PACS is up")
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pacs.files()}
    assert got == {s.results.seg_uid, s.results.sr_uid}
    assert all(d.last_status == "0x0000" and d.attempts == 3 for d in s.deliveries().values())
    _job_untouched(s)


@pytest.mark.parametrize("refusal", ["called AE title", "calling AE title"])
def test_association_rejected_is_retried_then_failed_with_reason(
    make_setup, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    if refusal == "called AE title":
        scp = FaultSCP(ae_title="PACS").start()
        s = make_setup(port=scp.port, ae_title="NOT_THE_PACS", max_attempts=2)
    else:
        scp = FaultSCP(ae_title="PACS", require_calling=["MODALITY"]).start()
        s = make_setup(port=scp.port, max_attempts=2)
    with running(scp):
        s.send_until(_all("failed"), 20, "deliveries failed after max_attempts")
        assert scp.received == []
    for d in s.deliveries().values():
        assert d.attempts == 2 and "association rejected" in d.error and refusal in d.error, d.error
    failed = _events(caplog, "delivery_failed")
    assert len(failed) == 2 and all("association rejected" in str(f["detail"]) for f in failed)
    _job_untouched(s)


def test_out_of_resources_is_retried_then_delivered(make_setup) -> None:
    scp = FaultSCP(statuses={SEG_CLASS: [0xA700, 0x0000], SR_CLASS: [0xA702, 0x0000]}).start()
    s = make_setup(port=scp.port)
    with running(scp):
        assert s.sender.run_once() is True
        ds = s.deliveries()
        assert _states(ds) == {"seg": "pending", "sr": "pending"}
        assert (ds["seg"].last_status, ds["sr"].last_status) == ("0xA700", "0xA702")
        s.send_until(_all("done"), 20, "delivery on the second attempt")
        assert sorted(scp.stored()) == sorted([s.results.seg_uid, s.results.sr_uid])
    assert all(d.last_status == "0x0000" and d.attempts == 2 for d in s.deliveries().values())
    _job_untouched(s)


@pytest.mark.parametrize("status", [0xA900, 0xC000])
def test_refusal_status_fails_at_once_and_is_recorded(
    make_setup, status: int, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    scp = FaultSCP(statuses={"*": [status]}).start()
    s = make_setup(port=scp.port)
    with running(scp):
        assert s.sender.run_once() is True
        assert s.sender.run_once() is False  # nothing left to retry
        assert len(scp.received) == 2
    ds = s.deliveries()
    assert _states(ds) == {"seg": "failed", "sr": "failed"}
    assert all(d.last_status == f"0x{status:04X}" and d.attempts == 1 for d in ds.values())
    failed = _events(caplog, "delivery_failed")
    assert sorted(str(f["status"]) for f in failed) == [f"0x{status:04X}"] * 2
    assert all(f["outcome"] == "permanent" for f in failed)
    _job_untouched(s)
    # the job itself is done, yet the admin's list of failures shows it, with what did not arrive
    capsys.readouterr()
    assert cli_main(["--config", str(s.config_path), "jobs", "--state", "failed"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^\s*{s.job_id}\s+done\b.*0/2 sent, 2 failed", out, re.M), out
    for kind in ("seg", "sr"):
        assert re.search(rf"^\s+{kind} -> pacs: failed 0x{status:04X}", out, re.M), out


@pytest.mark.parametrize("abort", ["--abort-after", "--abort-during"])
def test_pacs_aborting_mid_send_is_retried(make_setup, tmp_path: Path, abort: str) -> None:
    port = free_port()
    # a long DIMSE timeout: waiting it out would take 20 s, so the bound below holds on a loaded machine
    s = make_setup(port=port, dimse_timeout=20)
    bad = StoreSCP(tmp_path / "aborting", port=port, extra=[abort]).start()
    with running(bad):
        t0 = time.monotonic()
        assert s.sender.run_once() is True
        elapsed = time.monotonic() - t0
    # an abort is seen at once: the rest of the batch is not sent into the dead association to time out
    assert elapsed < s.cfg.sender.dimse_timeout / 2, f"{elapsed:.1f}s for an aborted association"
    ds = s.deliveries()
    assert _states(ds) == {"seg": "pending", "sr": "pending"}, ds
    assert all(d.last_status == "" and d.attempts == 1 for d in ds.values())
    assert "aborted by the peer" in ds["seg"].error and "association lost" in ds["sr"].error, ds
    good = StoreSCP(tmp_path / "pacs", port=port).start()
    with running(good):
        s.send_until(_all("done"), 20, "delivery to a PACS that no longer aborts")
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in good.files()}
    assert got == {s.results.seg_uid, s.results.sr_uid}
    _job_untouched(s)


def test_hanging_pacs_times_out_and_the_sender_moves_on(make_setup) -> None:
    scp = FaultSCP().start()
    s = make_setup(port=scp.port, dimse_timeout=1)
    with running(scp):
        scp.hang()
        t0 = time.monotonic()
        assert s.sender.run_once() is True
        elapsed = time.monotonic() - t0
        assert scp.store_started.is_set()
        assert elapsed < 5, f"sender stuck for {elapsed:.1f}s on a hanging PACS (dimse_timeout 1s)"
        ds = s.deliveries()
        assert _states(ds) == {"seg": "pending", "sr": "pending"}
        assert all(d.last_status == "" for d in ds.values())
        assert "no response within dimse_timeout" in ds["seg"].error and "association lost" in ds["sr"].error, ds
        scp.release()
        s.send_until(_all("done"), 20, "delivery once the PACS answers again")
        assert set(scp.stored()) >= {s.results.seg_uid, s.results.sr_uid}
    _job_untouched(s)


@pytest.mark.parametrize("refusal", ["SOP class not accepted", "0xA900"])
def test_seg_refused_sr_still_delivered_and_status_says_so(
    make_setup, refusal: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if refusal == "0xA900":
        scp = FaultSCP(statuses={SEG_CLASS: [0xA900]}).start()
    else:
        scp = FaultSCP(refuse_classes={SEG_CLASS}).start()
    s = make_setup(port=scp.port)
    with running(scp):
        s.send_until(lambda ds: _states(ds) == {"seg": "failed", "sr": "done"}, 20, "SR delivered, SEG failed")
        assert scp.stored() == [s.results.sr_uid]
    seg = s.deliveries()["seg"]
    if refusal == "0xA900":
        assert seg.last_status == "0xA900"
    else:
        assert seg.last_status == "" and "No presentation context" in seg.error
    assert seg.attempts == 1
    _job_untouched(s)

    capsys.readouterr()
    assert cli_main(["--config", str(s.config_path), "status"]) == 0
    out = capsys.readouterr().out
    assert "deliveries: done=1, failed=1" in out, out
    assert "1/2 sent, 1 failed" in out, out
    seg_line = next(ln for ln in out.splitlines() if "seg -> pacs" in ln)
    assert "failed" in seg_line
    assert ("0xA900" in seg_line) if refusal == "0xA900" else ("No presentation context" in seg_line), seg_line

    # the PACS learns SEG; the admin re-sends the job's results (same UIDs), without re-running the model
    fixed = FaultSCP(port=scp.port).start()
    with running(fixed):
        assert cli_main(["--config", str(s.config_path), "retry", str(s.job_id)]) == 0
        assert f"job {s.job_id}: results queued for re-sending" in capsys.readouterr().out
        s.send_until(_all("done"), 20, "the failed SEG re-sent after `dicom-node retry`")
        assert sorted(fixed.stored()) == sorted([s.results.seg_uid, s.results.sr_uid])
    _job_untouched(s)


@pytest.mark.parametrize("refusal", ["no KOS context", "failure status"])
def test_a_rejection_note_the_pacs_refuses_is_logged_not_a_failed_result(
    make_setup, refusal: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PACS without IOCM (Key Object Selection not among its contexts, or refused with a failure status) gets
    the results, logs why the superseded ones stay visible, and neither retries the note nor lists the job
    among the failures: nothing the radiologist needs is missing."""
    caplog.set_level(logging.INFO)
    if refusal == "no KOS context":
        scp = FaultSCP(refuse_classes=[KO_CLASS]).start()
    else:
        scp = FaultSCP(statuses={KO_CLASS: [0xA900], "*": [0x0000]}).start()
    s = make_setup(port=scp.port, note=True)
    with running(scp):
        assert s.sender.run_once() is True  # SEG and SR: the note waits for them
        assert _states(s.deliveries()) == {"seg": "done", "sr": "done", "rejection": "pending"}
        assert s.sender.run_once() is True  # the note, refused
        assert s.sender.run_once() is False  # and not retried
        stored = scp.stored()
    assert sorted(stored) == sorted([s.results.seg_uid, s.results.sr_uid])
    note = s.deliveries()["rejection"]
    assert (note.state, note.attempts) == ("refused", 1)
    if refusal == "failure status":
        assert note.last_status == "0xA900", note
    else:
        assert "no presentation context accepted" in note.error and KO_CLASS in note.error, note
    (logged,) = _events(caplog, "rejection_note_not_accepted")
    assert (logged["destination"], logged["study_uid"], logged["job_id"]) == ("pacs", s.results.study_uid, s.job_id)
    assert _events(caplog, "delivery_failed") == []
    capsys.readouterr()
    assert cli_main(["--config", str(s.config_path), "jobs", "--state", "failed"]) == 0
    assert capsys.readouterr().out.strip() == "no jobs"
    assert cli_main(["--config", str(s.config_path), "jobs"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^\s*{s.job_id}\s+done\b.*2/3 sent, 1 refused", out, re.M), out
    assert re.search(r"^\s+rejection -> pacs: refused", out, re.M), out


def test_a_rejection_note_is_not_sent_when_the_replacement_was_not_delivered(make_setup) -> None:
    """The PACS refused the new SEG: hiding the old one would leave it no segmentation at all. The note fails
    unsent with the SEG, and the job is among the failures; retrying it sends the SEG, then the note."""
    scp = FaultSCP(statuses={SEG_CLASS: [0xA900, 0x0000], "*": [0x0000]}).start()
    s = make_setup(port=scp.port, note=True)
    with running(scp):
        assert s.sender.run_once() is True
        assert s.sender.run_once() is False
        ds = s.deliveries()
        assert _states(ds) == {"seg": "failed", "sr": "done", "rejection": "failed"}
        assert "not sent" in ds["rejection"].error and ds["rejection"].attempts == 0
        assert s.results.note_uid not in scp.stored()
        assert [j.id for j in s.rt.jobs.list_jobs(state="failed", or_failed_deliveries=True)] == [s.job_id]
        s.rt.jobs.retry_job(s.job_id)
        s.send_until(lambda d: all(x.state == "done" for x in d.values()), 20, "SEG, SR and note delivered")
        assert scp.stored()[-1] == s.results.note_uid  # last: after the SEG it follows
