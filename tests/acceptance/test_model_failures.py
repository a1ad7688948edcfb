"""Models that fail, through `dicom-node serve` and the admin CLI: nothing is lost, nothing else stops.

One node, one PACS (storescp), routes by PatientID to fault bundles (tests/fault_models.py):
- a CUDA out-of-memory model and a MemoryError model are retried with backoff up to worker.max_attempts,
  then failed with their reason; the worker thread survives both and later jobs still run;
- a series with duplicate slice positions fails at once ("invalid geometry"), without a second attempt;
- a good study sent alongside gets its SEG and SR;
- `dicom-node cancel` cancels a queued job (it never runs), `dicom-node jobs --state failed` lists the
  failures with their errors, and `dicom-node retry` re-queues a failed job that then succeeds once the
  model is fixed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom import dcmread

from ai_models.phantom import generate_phantom
from dicom_node.synth import StudyIds, phantom_datasets, write_datasets
from storage.db import make_engine
from storage.jobstore import JobStore
from storage.records import JobRecord
from tests.fault_models import write_fault_bundle
from tests.peers import REPO, NodeProcess, StoreSCP, free_port, running, storescu, wait_for

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
BACKOFF = 0.5
MAX_ATTEMPTS = 2
# study name -> model name, failure mode of that model
STUDIES = {
    "block": ("blocker", "block"),  # holds the single worker until the test releases it
    "cancel": ("good", "none"),
    "memerr": ("memerr", "memory"),
    "oom": ("oom", "cuda_oom"),
    "geom": ("good", "none"),
    "good": ("good", "none"),
}


def _write_study(tmp: Path, name: str, seed: int) -> tuple[StudyIds, list[Path]]:
    ph = generate_phantom(seed, shape=(12, 64, 64), spacing=(2.5, 1.6, 1.6), n_nodules=0)
    ids = StudyIds.new(f"mf-{name}")
    datasets = phantom_datasets(ph, ids)
    for ds in datasets:  # the routes pick the model by PatientID
        ds.PatientID = f"MF-{name}"
    if name == "geom":  # two slices at one position: not one regular grid
        datasets[6].ImagePositionPatient = datasets[5].ImagePositionPatient
        datasets[6].SliceLocation = datasets[5].SliceLocation
    return ids, write_datasets(datasets, tmp / "in" / name)


def _config(tmp: Path, port: int, pacs_port: int, flags: dict[str, Path]) -> Path:
    bundles = tmp / "bundles"
    models = []
    for model, failure in sorted({v for v in STUDIES.values()}):
        bundle = write_fault_bundle(bundles, model, failure, flags.get(model))
        models.append(f'[[models]]\nname = "{model}"\nbundle = "{bundle}"\n')
    routes = [
        f'[[routes]]\nname = "{study}"\nmatch = {{ PatientID = "MF-{study}" }}\nmodels = ["{model}"]\n'
        f'send_to = ["pacs"]\n'
        for study, (model, _) in STUDIES.items()
    ]
    path = tmp / "config.toml"
    path.write_text(f"""
[node]
ae_title = "DICOM_NODE"
port = {port}
bind = "127.0.0.1"
data_dir = "{tmp / "var"}"
min_free_mb = 0

[completion]
stable_seconds = 0.5
poll_seconds = 0.1

[worker]
device = "cpu"
poll_seconds = 0.1
max_attempts = {MAX_ATTEMPTS}
retry_backoff_seconds = {BACKOFF}

[sender]
poll_seconds = 0.1
backoff_seconds = 0.5
acse_timeout = 5
dimse_timeout = 10
network_timeout = 10

[http]
enabled = false

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {pacs_port}

{chr(10).join(models)}
{chr(10).join(routes)}
""")
    return path


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node.cli", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def _pacs_results(pacs: StoreSCP) -> dict[str, set[str]]:
    """Study UID -> kinds received."""
    out: dict[str, set[str]] = {}
    for p in pacs.files():
        ds = dcmread(p, stop_before_pixels=True)
        kind = {SEG_CLASS: "seg", SR_CLASS: "sr"}.get(str(ds.SOPClassUID), "other")
        out.setdefault(str(ds.StudyInstanceUID), set()).add(kind)
    return out


def _events(log: str, job_id: int) -> list[tuple[str, str]]:
    """(event, line) of one job's worker events, in order."""
    out = []
    for line in log.splitlines():
        if re.search(rf"\bjob_id={job_id}\b", line) and "logger=dicom_node.worker" in line:
            m = re.search(r"\bevent=(\S+)", line)
            if m:
                out.append((m.group(1), line))
    return out


def _ts(line: str) -> float:
    """Seconds of day from a logfmt ts=...T12:34:56.789Z field."""
    m = re.search(r"ts=\S+T(\d\d):(\d\d):(\d\d)\.(\d{3})Z", line)
    assert m, line
    h, mi, s, ms = map(int, m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def _by_route(jobs: JobStore) -> dict[str, JobRecord]:
    return {j.route: j for j in jobs.list_jobs(limit=100)}


def _wait_states(jobs: JobStore, wanted: dict[str, Sequence[str]], timeout: float, what: str) -> dict[str, JobRecord]:
    def check() -> dict[str, JobRecord] | None:
        by = _by_route(jobs)
        ok = all(r in by and by[r].state in states for r, states in wanted.items())
        return by if ok else None

    return wait_for(check, timeout, what)  # type: ignore[no-any-return]


@pytest.mark.slow
def test_failing_models_are_retried_failed_and_administered(tmp_path: Path) -> None:
    flags = {"blocker": tmp_path / "block.flag", "oom": tmp_path / "oom.flag"}
    for f in flags.values():
        f.touch()
    studies = {name: _write_study(tmp_path, name, seed) for seed, name in enumerate(STUDIES, start=40)}
    pacs = StoreSCP(tmp_path / "pacs").start()
    port = free_port()
    config = _config(tmp_path, port, pacs.port, flags)
    node = NodeProcess(config, port, tmp_path / "node.log")
    jobs = JobStore(make_engine(f"sqlite:///{tmp_path / 'var' / 'node.db'}"))
    with running(pacs, node):
        node.start()
        storescu(port, studies["block"][1])
        _wait_states(jobs, {"block": ["running"]}, 60, "the blocking job to start")
        storescu(port, [p for name, (_, paths) in studies.items() if name != "block" for p in paths])
        by = _wait_states(jobs, {r: ["queued"] for r in STUDIES if r != "block"}, 60, "five queued jobs")

        # cancel a queued job through the CLI while the worker is busy
        cancel_id = by["cancel"].id
        res = _cli(config, "cancel", str(cancel_id))
        assert res.returncode == 0 and f"job {cancel_id} cancelled" in res.stdout, res.stderr
        assert jobs.get_job(cancel_id).state == "cancelled"  # type: ignore[union-attr]
        flags["blocker"].unlink()  # let the worker go on

        by = _wait_states(
            jobs,
            {
                "block": ["done"],
                "good": ["done"],
                "memerr": ["failed"],
                "oom": ["failed"],
                "geom": ["failed"],
                "cancel": ["cancelled"],
            },
            180,
            "every job settled",
        )
        wait_for(
            lambda: all(len(_pacs_results(pacs).get(studies[s][0].study_uid, ())) == 2 for s in ("good", "block")),
            60,
            "SEG and SR of the good studies at the PACS",
        )

        # failures: attempts, reasons, backoff
        assert by["memerr"].attempts == MAX_ATTEMPTS and "MemoryError" in by["memerr"].error
        assert by["oom"].attempts == MAX_ATTEMPTS and "CUDA out of memory" in by["oom"].error
        assert by["geom"].attempts == 1 and "invalid geometry" in by["geom"].error
        assert "duplicate slice positions" in by["geom"].error
        log = node.log_text()
        for route in ("memerr", "oom"):
            ev = _events(log, by[route].id)
            names = [e for e, _ in ev]
            assert names == [
                "job_started",
                "job_attempt_failed",
                "job_retry_scheduled",
                "job_started",
                "job_attempt_failed",
                "job_failed",
            ], names
            retry_at, started_again = _ts(ev[2][1]), _ts(ev[3][1])
            assert started_again - retry_at >= BACKOFF * 0.9, f"{route}: retried after {started_again - retry_at}s"
        assert [e for e, _ in _events(log, by["geom"].id)] == ["job_started", "job_failed"]
        # the worker thread survived MemoryError and OOM: a job after them still ran to the end
        first_memerr_fail = _ts(_events(log, by["memerr"].id)[1][1])
        good_done = next(_ts(ln) for e, ln in _events(log, by["good"].id) if e == "job_done")
        assert good_done > first_memerr_fail
        assert "worker_loop_error" not in log
        # the cancelled job never ran and produced nothing
        assert _events(log, cancel_id) == []
        assert studies["cancel"][0].study_uid not in _pacs_results(pacs)
        for s in ("memerr", "oom", "geom"):
            assert studies[s][0].study_uid not in _pacs_results(pacs)

        # the admin sees the failures with their reasons
        res = _cli(config, "jobs", "--state", "failed")
        assert res.returncode == 0, res.stderr
        rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^\s*(\d+)\s+failed\b.*$", res.stdout, re.M)}
        assert set(rows) == {by[r].id for r in ("memerr", "oom", "geom")}, res.stdout
        for text in ("MemoryError", "CUDA out of memory", "invalid geometry: duplicate slice positions"):
            assert re.search(rf"^\s+error: .*{re.escape(text)}", res.stdout, re.M), (text, res.stdout)

        # fix the model, retry the job: it runs again and its results arrive
        flags["oom"].unlink()
        res = _cli(config, "retry", str(by["oom"].id))
        assert res.returncode == 0 and f"job {by['oom'].id} queued again" in res.stdout, res.stderr
        _wait_states(jobs, {"oom": ["done"]}, 60, "the retried job done")
        wait_for(
            lambda: len(_pacs_results(pacs).get(studies["oom"][0].study_uid, ())) == 2,
            60,
            "SEG and SR of the retried study at the PACS",
        )
        assert jobs.get_job(by["oom"].id).attempts == 1  # type: ignore[union-attr]
        assert node.proc is not None and node.proc.poll() is None, "the node died"
        assert node.stop() == 0
    jobs.engine.dispose()
