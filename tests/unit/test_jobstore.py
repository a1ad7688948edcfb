"""Job store: idempotent enqueue, atomic claims with leases, retries, restarts."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.db import integrity_check, make_engine, sqlite_pragmas
from storage.jobstore import JobStore, JobStoreError
from storage.records import NewInstance, NewJob, NewResult


def _store(tmp_path: Path) -> JobStore:
    js = JobStore(make_engine(f"sqlite:///{tmp_path / 'db' / 'node.db'}"))
    js.create_schema()
    return js


@pytest.fixture(params=["sqlite", "postgresql"])
def js(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    """The job store on SQLite (the default) and on PostgreSQL (several machines sharing the work)."""
    if request.param == "sqlite":
        store = _store(tmp_path)
    else:
        store = JobStore(make_engine(request.getfixturevalue("postgres_url")))
        store.create_schema()
    yield store
    store.engine.dispose()


def _inst(sop: str, study: str = "1.2.3", series: str = "1.2.3.4") -> NewInstance:
    return NewInstance(sop, study, series, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", f"x/{sop}.dcm", 10)


def _job(route: str = "r") -> NewJob:
    return NewJob(route=route, series_uid="1.2.3.4", models=("m",), destinations=("pacs", "backup"))


def test_sqlite_pragmas_and_private_file(tmp_path: Path) -> None:
    js = _store(tmp_path)
    p = sqlite_pragmas(js.engine)
    assert p["journal_mode"] == "wal"
    assert p["synchronous"] == "2"  # FULL
    assert int(p["busy_timeout"]) >= 1000
    assert (tmp_path / "db" / "node.db").stat().st_mode & 0o077 == 0
    assert integrity_check(js.engine) == "ok"


def test_study_completes_once_and_enqueue_is_idempotent(js: JobStore) -> None:
    t0 = time.time()
    assert js.record_instance(_inst("1.1"), now=t0) == "stored"
    assert js.record_instance(_inst("1.2"), now=t0 + 1) == "stored"
    assert js.record_instance(_inst("1.2"), now=t0 + 2) == "replaced"
    assert js.get_study("1.2.3").instance_count == 2
    assert js.due_studies(5, now=t0 + 3) == []
    (due,) = js.due_studies(5, now=t0 + 8)
    jobs = js.complete_study(due.study_uid, due.generation, [_job()])
    assert len(jobs) == 1
    assert js.complete_study(due.study_uid, due.generation, [_job()]) is None  # already complete
    again = js.enqueue_job(due.study_uid, due.generation, _job())
    assert again.id == jobs[0].id
    assert js.due_studies(5, now=t0 + 100) == []


def test_completion_stands_back_when_an_instance_arrived_after_the_jobs_were_planned(js: JobStore) -> None:
    js.record_instance(_inst("1.1"), now=1.0)
    (due,) = js.due_studies(1, now=10)
    planned = len(js.instances_of_study(due.study_uid))  # the assembler routes what it sees here
    js.record_instance(_inst("2.1", series="1.2.3.9"), now=11.0)  # a series the plan does not know
    assert js.complete_study(due.study_uid, due.generation, [_job()], instance_count=planned) is None
    assert js.get_study("1.2.3").state == "receiving" and js.list_jobs() == []
    assert js.due_studies(1, now=11.5) == []  # not quiet yet
    (again,) = js.due_studies(1, now=20)
    jobs = js.complete_study(
        again.study_uid, again.generation, [_job()], instance_count=len(js.instances_of_study(again.study_uid))
    )
    assert jobs is not None and len(jobs) == 1 and js.get_study("1.2.3").state == "complete"


def test_late_arrival_reopens_study_with_new_generation(js: JobStore) -> None:
    js.record_instance(_inst("1.1"), now=1.0)
    (due,) = js.due_studies(1, now=10)
    js.complete_study(due.study_uid, due.generation, [_job()])
    assert js.record_instance(_inst("1.9"), now=20.0) == "reopened"
    (due2,) = js.due_studies(1, now=30)
    assert due2.generation == 1
    jobs = js.complete_study(due2.study_uid, due2.generation, [_job()])
    assert jobs[0].generation == 1
    assert len(js.list_jobs()) == 2


def test_only_an_instance_the_models_could_read_reopens_a_complete_study(js: JobStore) -> None:
    """The node's own SEG/SR forwarded back by the PACS, a presentation state or a key object note change
    nothing a job reads: stored, counted, and the study stays complete (no second inference)."""
    ct = "1.2.840.10008.5.1.4.1.1.2"
    js.record_instance(_inst("1.1"), now=1.0)
    js.complete_study("1.2.3", 0, [_job()])
    seg = dataclasses.replace(_inst("9.1"), sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4")
    assert js.record_instance(seg, now=20.0, reopen_classes={ct}) == "stored"
    study = js.get_study("1.2.3")
    assert study is not None and (study.state, study.generation, study.instance_count) == ("complete", 0, 2)
    assert js.get_instance("9.1") is not None
    assert js.record_instance(_inst("1.9"), now=21.0, reopen_classes={ct}) == "reopened"
    assert js.due_studies(1, now=30)[0].generation == 1


def test_claim_lease_expiry_and_attempts(js: JobStore) -> None:
    js.record_instance(_inst("1.1"), now=1.0)
    js.complete_study("1.2.3", 0, [_job()])
    a = js.claim_job("A", lease_seconds=10, now=100)
    assert a is not None and a.attempts == 1 and a.state == "running"
    assert js.claim_job("B", lease_seconds=10, now=105) is None  # leased to A
    b = js.claim_job("B", lease_seconds=10, now=111)  # A's lease ran out (A was killed)
    assert b is not None and b.id == a.id and b.attempts == 2
    assert not js.heartbeat(a.id, "A", 10)  # A lost it
    assert js.finish_job(a.id, "A", []) is False
    res = NewResult("seg", "m", "1.2.3", "9.9", "9.9.1", "1.2.840.10008.5.1.4.1.1.66.4", "results/a.dcm")
    assert js.finish_job(b.id, "B", [res])
    assert js.get_job(a.id).state == "done"
    deliveries = js.deliveries_of_job(a.id)
    assert sorted(d.destination for d in deliveries) == ["backup", "pacs"]


def test_fail_with_backoff_then_failed_then_admin_retry(js: JobStore) -> None:
    js.record_instance(_inst("1.1"), now=1.0)
    (job,) = js.complete_study("1.2.3", 0, [_job()])
    c = js.claim_job("W", 60)
    assert js.fail_job(c.id, "W", "boom", max_attempts=2, backoff_seconds=50) == "queued"
    assert js.claim_job("W", 60) is None  # backing off
    c = js.claim_job("W", 60, now=time.time() + 51)
    assert c is not None and c.attempts == 2
    assert js.fail_job(c.id, "W", "boom again", max_attempts=2, backoff_seconds=50) == "failed"
    failed = js.list_jobs(state="failed")
    assert [j.id for j in failed] == [job.id] and failed[0].error == "boom again"
    assert js.retry_job(job.id).state == "queued"
    assert js.claim_job("W", 60) is not None
    with pytest.raises(JobStoreError):
        js.retry_job(job.id)  # running


def test_a_failed_run_superseded_by_a_later_one_is_not_run_again(js: JobStore) -> None:
    """Re-running the first generation after late arrivals made a second would send its older results after
    the newer ones; the admin is pointed at the later job instead."""
    js.record_instance(_inst("1.1"), now=1.0)
    (first,) = js.complete_study("1.2.3", 0, [_job()])
    c = js.claim_job("W", 60)
    assert js.fail_job(c.id, "W", "boom", max_attempts=1, backoff_seconds=1) == "failed"
    js.record_instance(_inst("1.2"), now=20.0)  # late: generation 1
    (second,) = js.complete_study("1.2.3", 1, [_job()])
    with pytest.raises(JobStoreError, match=f"job {first.id} was superseded by job {second.id}"):
        js.retry_job(first.id)
    assert js.get_job(first.id).state == "failed"
    js.cancel_job(second.id)  # unless the later run was cancelled
    assert js.retry_job(first.id).state == "queued"


def test_release_does_not_count_attempt_and_cancel(js: JobStore) -> None:
    js.record_instance(_inst("1.1"), now=1.0)
    (job,) = js.complete_study("1.2.3", 0, [_job()])
    c = js.claim_job("W", 60)
    assert js.release_job(c.id, "W")
    assert js.get_job(job.id).attempts == 0 and js.get_job(job.id).state == "queued"
    assert js.cancel_job(job.id).state == "cancelled"
    assert js.claim_job("W", 60) is None


def test_deliveries_claim_retry_and_done(js: JobStore) -> None:
    js.record_instance(_inst("1.1"), now=1.0)
    js.complete_study("1.2.3", 0, [_job()])
    c = js.claim_job("W", 60)
    js.finish_job(
        c.id,
        "W",
        [
            NewResult("seg", "m", "1.2.3", "9.9", "9.9.1", "1.2.840.10008.5.1.4.1.1.66.4", "results/a.dcm"),
            NewResult("sr", "", "1.2.3", "9.8", "9.8.1", "1.2.840.10008.5.1.4.1.1.88.34", "results/b.dcm"),
        ],
    )
    batch = js.claim_deliveries("S", 60)
    assert len(batch) == 2 and len({d.destination for d in batch}) == 1
    other = js.claim_deliveries("S2", 60)
    assert other[0].destination != batch[0].destination
    for d in batch:
        assert js.delivery_outcome(d.id, "S", state="pending", status="0xA700", not_before=time.time() + 100)
    assert js.claim_deliveries("S", 60) == []
    later = js.claim_deliveries("S", 60, now=time.time() + 101)
    # S2's lease ran out first (S2 died): its deliveries are taken over before S's backed-off ones
    assert {d.id for d in later} == {d.id for d in other} and all(d.attempts == 2 for d in later)
    for d in later:
        assert not js.delivery_outcome(d.id, "S2", state="done")  # S2 no longer owns them
        js.delivery_outcome(d.id, "S", state="done", status="0x0000")
    assert js.counts()["deliveries"] == {"done": 2, "pending": 2}


def test_leases_of_dead_local_processes_are_recovered_at_once(js: JobStore) -> None:
    js.record_instance(_inst("1.1"), now=1.0)
    js.complete_study("1.2.3", 0, [_job("a"), _job("b")])
    dead = js.claim_job("host1:111:x", 600)
    alive = js.claim_job("host1:222:y", 600)
    js.finish_job(
        alive.id,
        "host1:222:y",
        [NewResult("sr", "", "1.2.3", "9.8", "9.8.1", "1.2.840.10008.5.1.4.1.1.88.34", "results/b.dcm")],
    )
    (d,) = js.claim_deliveries("host1:111:x", 600)
    other_host = js.enqueue_job("1.2.3", 5, _job("c"))
    js.claim_job("host2:111:z", 600)
    assert js.recover_dead_owners("host1", lambda pid: pid != 111) == (1, 1)
    job = js.get_job(dead.id)
    assert job.state == "queued" and job.attempts == 1  # the attempt that died still counts
    assert js.get_job(other_host.id).state == "running"  # another host's lease runs out on its own
    assert js.deliveries_of_job(alive.id)[0].state == "pending"
    assert d.id == js.deliveries_of_job(alive.id)[0].id
