"""Retention: which studies are purged and when, what is never purged, crash safety, late arrivals after a
purge, watermark order, the [retention] config, and SQLite giving its space back."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from dicom_node.config import ConfigError, parse_config
from dicom_node.housekeeping import DAY, HOUR, Housekeeper
from storage.db import make_engine
from storage.files import FileStore
from storage.jobstore import JobStore, JobStoreError
from storage.records import NewInstance, NewJob, NewResult
from storage.retention import RetentionStore
from storage.schema import InstanceRow, PurgeFileRow, ResultRow

CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Env:
    js: JobStore
    files: FileStore
    store: RetentionStore
    tmp: Path

    def keeper(self, **retention: object) -> Housekeeper:
        cfg = parse_config(
            {"node": {"data_dir": str(self.tmp / "var"), "min_free_mb": 0}, "retention": retention}, self.tmp
        )
        return Housekeeper(cfg, self.files, self.store)

    def study(self, study: str, n: int = 3, *, series: str | None = None, when: float = 0.0) -> str:
        """A received study of ``n`` instances (files on disk), indexed as the listener does."""
        series = series or f"{study}.1"
        for i in range(n):
            path = self.files.instance_path(study, series, f"{series}.{i + 1}")
            size = self.files.write_atomic(path, b"DICM" * 256)
            self.js.record_instance(
                NewInstance(
                    f"{series}.{i + 1}", study, series, CT, "1.2.840.10008.1.2.1", self.files.relative(path), size
                ),
                now=when or time.time(),
            )
        return series

    def run(self, study: str, series: str, *, deliver: str = "done", job_fails: bool = False) -> int:
        """Complete the study, run its job and record one SEG result; ``deliver``: the delivery's end state."""
        s = self.js.get_study(study)
        (job,) = self.js.complete_study(study, s.generation, [NewJob("r", series, ("m",), ("pacs",))])
        claimed = self.js.claim_job("w", 60)
        assert claimed is not None and claimed.id == job.id
        if job_fails:
            assert self.js.fail_job(job.id, "w", "boom", max_attempts=1, backoff_seconds=0) == "failed"
            return job.id
        path = self.files.result_path(study, f"{series}.99.{s.generation}")
        self.files.write_atomic(path, b"SEG" * 100)
        self.js.finish_job(
            job.id,
            "w",
            [
                NewResult(
                    "seg",
                    "m",
                    study,
                    f"{series}.9",
                    f"{series}.99.{s.generation}",
                    "1.2.840.10008.5.1.4.1.1.66.4",
                    self.files.relative(path),
                )
            ],
        )
        if deliver != "pending":
            (d,) = self.js.claim_deliveries("s", 60)
            self.js.delivery_outcome(d.id, "s", state=deliver)
        return job.id

    def on_disk(self, study: str) -> list[Path]:
        return sorted(p for p in self.files.root.rglob("*.dcm") if study in str(p))


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    url = (
        f"sqlite:///{tmp_path / 'var' / 'node.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    js = JobStore(make_engine(url))
    js.create_schema()
    files = FileStore(tmp_path / "var" / "files")
    yield Env(js, files, RetentionStore(js.engine, files), tmp_path)
    js.engine.dispose()


def test_delivered_study_is_purged_after_its_ages_and_its_rows_after_history(env: Env) -> None:
    series = env.study("1.5.1")
    env.run("1.5.1", series)
    keeper = env.keeper(keep_received_hours=1, keep_results_days=2, keep_history_days=3)
    now = time.time()
    assert keeper.plan(now=now + 0.5 * HOUR) == []
    assert [(p.what, p.reason) for p in keeper.plan(now=now + 1.1 * HOUR)] == [("received", "retention")]
    assert {p.what for p in keeper.plan(now=now + 2.1 * DAY)} == {"received", "results"}
    for p in keeper.plan(now=now + 2.1 * DAY):
        assert not keeper.execute(p).skipped
    assert env.on_disk("1.5.1") == []
    assert env.js.instances_of_study("1.5.1") == []
    assert not (env.files.root / "incoming" / "1.5.1").exists()
    assert keeper.plan(now=now + 2.5 * DAY) == []
    (hist,) = keeper.plan(now=now + 3.1 * DAY)
    assert hist.what == "history" and not keeper.execute(hist).skipped
    assert env.js.get_study("1.5.1") is None and env.js.list_jobs() == []


def test_nothing_a_job_or_a_pending_delivery_needs_is_purged(env: Env) -> None:
    receiving = env.study("1.6.1")
    queued = env.study("1.6.2")
    s = env.js.get_study("1.6.2")
    env.js.complete_study("1.6.2", s.generation, [NewJob("r", queued, ("m",), ("pacs",))])
    pending = env.study("1.6.3")
    env.js.claim_job("other", 60)  # 1.6.2's job: running now
    env.run("1.6.3", pending, deliver="pending")
    keeper = env.keeper(keep_received_hours=0, keep_results_days=0, keep_failed_days=0)
    assert keeper.plan(older_than_days=0) == []
    for uid in ("1.6.1", "1.6.2", "1.6.3"):
        for what in ("received", "results"):
            purge = env.store.purge_received if what == "received" else env.store.purge_results
            assert purge(uid, "admin").skipped
    assert len(env.on_disk("1.6.1")) == 3 and len(env.on_disk("1.6.2")) == 3 and len(env.on_disk("1.6.3")) == 4
    assert receiving


def test_failed_studies_are_kept_keep_failed_days(env: Env) -> None:
    env.run("1.7.1", env.study("1.7.1"), job_fails=True)
    env.run("1.7.2", env.study("1.7.2"), deliver="failed")
    keeper = env.keeper(keep_received_hours=0, keep_results_days=0, keep_failed_days=5)
    now = time.time()
    assert keeper.plan(now=now + 4 * DAY) == []
    planned = keeper.plan(now=now + 5.1 * DAY)
    assert {(p.study_uid, p.what, p.reason) for p in planned} == {
        ("1.7.1", "received", "failed_retention"),
        ("1.7.2", "received", "failed_retention"),
        ("1.7.2", "results", "failed_retention"),
    }


def test_retry_after_purge_is_refused_with_the_reason(env: Env) -> None:
    failed = env.run("1.8.1", env.study("1.8.1"), job_fails=True)
    done = env.run("1.8.2", env.study("1.8.2"))
    assert not env.store.purge_received("1.8.1", "admin").skipped
    assert not env.store.purge_results("1.8.2", "admin").skipped
    with pytest.raises(JobStoreError, match="received instances"):
        env.js.retry_job(failed)
    with pytest.raises(JobStoreError, match="results"):
        env.js.retry_job(done)


def test_a_crash_between_rows_and_files_leaves_notes_that_the_next_start_completes(env: Env, monkeypatch) -> None:
    env.run("1.9.1", env.study("1.9.1", n=5))
    with monkeypatch.context() as m:
        m.setattr(RetentionStore, "_unlink", lambda self, notes: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):  # the process dies right after the commit
            env.store.purge_received("1.9.1", "retention")
    with env.js._tx() as s:
        assert s.scalars(select(InstanceRow)).all() == []
        assert len(s.scalars(select(PurgeFileRow)).all()) == 5
    assert len(env.on_disk("1.9.1")) == 6  # five received files nothing indexes, noted; and the result
    assert env.store.finish_pending() == 5
    assert [p.name for p in env.on_disk("1.9.1")] == ["1.9.1.1.99.0.dcm"]
    with env.js._tx() as s:
        assert s.scalars(select(PurgeFileRow)).all() == []
        assert all((env.files.root / r.path).is_file() for r in s.scalars(select(ResultRow)).all())


def test_a_noted_file_stored_again_since_is_kept(env: Env, monkeypatch) -> None:
    series = env.study("1.10.1", n=2)
    env.run("1.10.1", series)
    with monkeypatch.context() as m:
        m.setattr(RetentionStore, "_unlink", lambda self, notes: None)
        env.store.purge_received("1.10.1", "retention")
    env.study("1.10.1", n=1)  # the first instance sent again: a new file under the same name, indexed
    env.store.finish_pending()
    assert [p.name for p in env.on_disk("1.10.1") if "incoming" in str(p)] == [f"{series}.1.dcm"]


def test_orphan_sweep_removes_only_old_unindexed_files(env: Env) -> None:
    env.study("1.11.1", n=2)
    stray = env.files.instance_path("1.11.1", "1.11.1.1", "1.11.1.1.77")
    env.files.write_atomic(stray, b"x" * 10)
    assert env.store.sweep_orphans(min_age_seconds=3600) == (0, 0)  # young: may be a transfer in flight
    os.utime(stray, (time.time() - 7200, time.time() - 7200))
    assert env.store.sweep_orphans(min_age_seconds=3600) == (1, 10)
    assert len(env.on_disk("1.11.1")) == 2


def test_late_arrival_after_purge_runs_only_series_sent_again_whole(env: Env) -> None:
    from dicom_node.jobs.assembly import Assembler
    from dicom_node.jobs.routing import SeriesInfo

    series = env.study("1.12.1", n=4)
    env.run("1.12.1", series)
    assert not env.store.purge_received("1.12.1", "retention").skipped
    env.study("1.12.1", n=1)  # a straggler: one instance of the purged series
    study = env.js.get_study("1.12.1")
    assert (study.state, study.generation, study.instance_count) == ("receiving", 1, 1)
    asm = Assembler(env.keeper(), env.files, env.js)
    info = SeriesInfo(series_uid=series, instance_count=1, header=None)  # type: ignore[arg-type]
    assert asm._whole(study, [info]) == []
    new = SeriesInfo(series_uid="1.12.1.5", instance_count=1, header=None)  # type: ignore[arg-type]
    whole = SeriesInfo(series_uid=series, instance_count=4, header=None)  # type: ignore[arg-type]
    assert asm._whole(study, [whole, new]) == [whole, new]


def test_disk_pressure_evicts_delivered_studies_oldest_first_then_failed(env: Env) -> None:
    env.run("1.13.1", env.study("1.13.1"), deliver="failed")
    env.run("1.13.2", env.study("1.13.2"))
    time.sleep(0.01)
    env.run("1.13.4", env.study("1.13.4"))
    env.run("1.13.3", env.study("1.13.3"), deliver="pending")
    order = [u.study_uid for u in env.keeper().evictable(env.store.usage())]
    assert order == ["1.13.2", "1.13.4", "1.13.1"]
    assert [u.study_uid for u in env.keeper(evict_failed=False).evictable(env.store.usage())] == ["1.13.2", "1.13.4"]


def test_sqlite_gives_purged_rows_space_back(tmp_path: Path) -> None:
    js = JobStore(make_engine(f"sqlite:///{tmp_path / 'node.db'}"))
    js.create_schema()
    files = FileStore(tmp_path / "files")
    env = Env(js, files, RetentionStore(js.engine, files), tmp_path)
    with js.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() == 2  # incremental
    for k in range(15):
        env.study(f"1.14.{k}", n=40)
    for k in range(15):
        env.store.purge_received(f"1.14.{k}", "admin")  # complete? not yet: receiving, so kept
    for k in range(15):
        s = js.get_study(f"1.14.{k}")
        js.complete_study(f"1.14.{k}", s.generation, [])
        assert not env.store.purge_received(f"1.14.{k}", "admin").skipped
    with js.engine.connect() as conn:
        free_before = conn.exec_driver_sql("PRAGMA freelist_count").scalar()
    assert free_before > 0
    assert env.store.vacuum() >= free_before
    with js.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA freelist_count").scalar() == 0
    js.engine.dispose()


@pytest.mark.parametrize(
    ("retention", "message"),
    [
        ({"keep_received_hours": -1}, "retention.keep_received_hours: must not be negative"),
        ({"keep_history_days": -0.5}, "retention.keep_history_days: must not be negative"),
        ({"low_watermark_percent": 95}, "retention.low_watermark_percent, retention.high_watermark_percent"),
        ({"high_watermark_percent": 101}, "retention.low_watermark_percent"),
        ({"interval_seconds": 0}, "retention.interval_seconds: must be positive"),
        ({"keep_results_days": "7"}, "retention.keep_results_days: expected a number"),
        ({"keep_forever": True}, "retention.keep_forever: unknown key"),
    ],
)
def test_retention_config_errors_name_the_key(retention: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_config({"retention": retention}, Path("/tmp"))


def test_cli_status_and_purge_dry_run_then_purge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dicom_node.cli import main

    js = JobStore(make_engine(f"sqlite:///{tmp_path / 'var' / 'node.db'}"))
    js.create_schema()
    files = FileStore(tmp_path / "var" / "files")
    env = Env(js, files, RetentionStore(js.engine, files), tmp_path)
    env.run("1.15.1", env.study("1.15.1"))
    env.run("1.15.2", env.study("1.15.2"), deliver="pending")
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "var"}"\nmin_free_mb = 0\n[retention]\nkeep_received_hours = 0\n')
    assert main(["--config", str(cfg), "status"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"disk: [\d.]+% used, \d+ MiB free \(evicts above 90% or below 0 MiB free, down to 80%\)", out)
    assert "eligible for purge now: 1 studies" in out
    assert main(["--config", str(cfg), "purge", "--dry-run"]) == 0
    assert "would purge received of 1.15.1 (retention; 3 files, 3072 bytes)" in capsys.readouterr().out
    assert len(env.on_disk("1.15.1")) == 4
    assert main(["--config", str(cfg), "purge", "--study", "1.15.2", "--older-than", "0"]) == 0
    assert "kept 1.15.2: delivery pending" in capsys.readouterr().out
    assert main(["--config", str(cfg), "purge"]) == 0
    assert "purged received of 1.15.1 (retention; 3 files, 3072 bytes)" in capsys.readouterr().out
    assert [p.name for p in env.on_disk("1.15.1")] == ["1.15.1.1.99.0.dcm"]
    assert main(["--config", str(cfg), "purge", "--study", "9.9"]) == 1
    js.engine.dispose()
