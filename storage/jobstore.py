"""The job store: the only channel between listener, assembler, worker and sender.

Each public method is one unit of work (one session, one transaction). Claims are atomic: the row is
selected and updated inside one BEGIN IMMEDIATE transaction (SQLite) or with FOR UPDATE SKIP LOCKED
(PostgreSQL), so two workers never hold the same job. A lease that runs out makes the job claimable
again, which is how work survives a killed process. On PostgreSQL, where writers of several machines run
side by side, every read-modify-write of a row locks it first (FOR UPDATE; SQLite has no such clause and
needs none), so a worker whose lease ran out cannot overwrite its successor's claim, nor an instance
being indexed a study's completion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from storage.batching import reopens
from storage.db import rowcount
from storage.records import (
    DeliveryRecord,
    InstanceRecord,
    JobRecord,
    NewInstance,
    NewJob,
    NewResult,
    ResultRecord,
    StudyRecord,
)
from storage.schema import Base, DeliveryRow, InstanceRow, JobRow, ResultRow, StudyPurgeRow, StudyRow

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
# "refused": a rejection note the destination would not take (it does not do IOCM); not a failed result
DELIVERY_STATES = ("pending", "sending", "done", "failed", "refused")
REJECTION_KIND = "rejection"


class JobStoreError(Exception):
    """A job-store operation was refused (unknown job, wrong state)."""


def _job(r: JobRow) -> JobRecord:
    return JobRecord(
        id=r.id,
        study_uid=r.study_uid,
        route=r.route,
        generation=r.generation,
        series_uid=r.series_uid,
        models=tuple(m for m in r.models.split(",") if m),
        destinations=tuple(d for d in r.destinations.split(",") if d),
        state=r.state,
        attempts=r.attempts,
        not_before=r.not_before,
        lease_owner=r.lease_owner,
        lease_expires_at=r.lease_expires_at,
        error=r.error,
        created_at=r.created_at,
        updated_at=r.updated_at,
        timings=r.timings or "",
    )


def _instance(r: InstanceRow) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=r.sop_instance_uid,
        study_uid=r.study_uid,
        series_uid=r.series_uid,
        sop_class_uid=r.sop_class_uid,
        transfer_syntax=r.transfer_syntax,
        path=r.path,
        size=r.size,
        received_at=r.received_at,
    )


def _study(r: StudyRow) -> StudyRecord:
    return StudyRecord(
        study_uid=r.study_uid,
        state=r.state,
        generation=r.generation,
        first_received_at=r.first_received_at,
        last_received_at=r.last_received_at,
        instance_count=r.instance_count,
    )


def _result(r: ResultRow) -> ResultRecord:
    return ResultRecord(
        id=r.id,
        job_id=r.job_id,
        kind=r.kind,
        model=r.model,
        study_uid=r.study_uid,
        series_uid=r.series_uid,
        sop_instance_uid=r.sop_instance_uid,
        sop_class_uid=r.sop_class_uid,
        path=r.path,
    )


def _later_run(s: Session, row: JobRow) -> JobRow | None:
    """The latest run (not cancelled) of ``row``'s study and route with a higher generation, if any."""
    return s.scalars(
        select(JobRow)
        .where(
            JobRow.study_uid == row.study_uid,
            JobRow.route == row.route,
            JobRow.generation > row.generation,
            JobRow.state != "cancelled",
        )
        .order_by(JobRow.generation.desc())
        .limit(1)
    ).first()


def _purged(s: Session, row: JobRow) -> str:
    """What a retry of ``row`` would need that retention removed: "received instances" or "results"; else ""."""
    if row.state in ("failed", "cancelled") and s.get(StudyPurgeRow, row.study_uid) is not None:
        kept = select(InstanceRow.sop_instance_uid).where(InstanceRow.series_uid == row.series_uid).limit(1)
        if s.scalars(kept).first() is None:
            return "received instances"
    if s.scalars(select(ResultRow.id).where(ResultRow.job_id == row.id, ResultRow.path == "").limit(1)).first():
        return "results"
    return ""


def _new_job_row(study_uid: str, generation: int, job: NewJob, now: float) -> JobRow:
    return JobRow(
        study_uid=study_uid,
        route=job.route,
        generation=generation,
        series_uid=job.series_uid,
        models=",".join(job.models),
        destinations=",".join(job.destinations),
        state="queued",
        attempts=0,
        not_before=0.0,
        lease_owner="",
        lease_expires_at=0.0,
        error="",
        created_at=now,
        updated_at=now,
    )


_Select = TypeVar("_Select", bound="Select[*tuple[Any, ...]]")  # keeps its row type through FOR UPDATE


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._sqlite = engine.dialect.name == "sqlite"

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def _locked(self, stmt: _Select) -> _Select:
        return stmt if self._sqlite else stmt.with_for_update(skip_locked=True)

    # ---- instances and studies -------------------------------------------------------------------------

    def record_instance(
        self,
        inst: NewInstance,
        *,
        now: float | None = None,
        late_arrivals: str = "rerun",
        reopen_classes: Collection[str] | None = None,
    ) -> str:
        """Index a stored instance; returns "stored", "replaced" (same SOP UID again) or "reopened"."""
        now = time.time() if now is None else now
        with self._tx() as s:
            study = s.get(StudyRow, inst.study_uid, with_for_update=True)  # held against concurrent writers
            if study is None:
                self._create_study(s, inst.study_uid, now)
                study = s.get(StudyRow, inst.study_uid, with_for_update=True, populate_existing=True)
                assert study is not None
            existing = s.get(InstanceRow, inst.sop_instance_uid)
            outcome = "stored" if existing is None else "replaced"
            if study.state == "complete" and late_arrivals == "rerun" and reopens(inst, reopen_classes):
                study.state = "receiving"
                study.generation += 1
                outcome = "reopened" if existing is None else outcome
            study.last_received_at = now
            if existing is None:
                study.instance_count += 1
                s.add(
                    InstanceRow(
                        sop_instance_uid=inst.sop_instance_uid,
                        study_uid=inst.study_uid,
                        series_uid=inst.series_uid,
                        sop_class_uid=inst.sop_class_uid,
                        transfer_syntax=inst.transfer_syntax,
                        path=inst.path,
                        size=inst.size,
                        received_at=now,
                        calling_ae=inst.calling_ae,
                    )
                )
            else:
                existing.path, existing.size, existing.received_at = inst.path, inst.size, now
                existing.transfer_syntax = inst.transfer_syntax
        return outcome

    def _create_study(self, s: Session, study_uid: str, now: float) -> None:
        """A new study row; where another writer creates the same one at this moment (PostgreSQL: several
        machines), theirs is kept and used instead of failing this transaction."""
        row = StudyRow(
            study_uid=study_uid,
            state="receiving",
            generation=0,
            first_received_at=now,
            last_received_at=now,
            instance_count=0,
        )
        if self._sqlite:  # BEGIN IMMEDIATE: nobody else writes until we commit
            s.add(row)
            s.flush()
            return
        try:
            with s.begin_nested():
                s.add(row)
        except IntegrityError:
            pass

    def get_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        with self._tx() as s:
            r = s.get(InstanceRow, sop_instance_uid)
            return _instance(r) if r else None

    def instances_of_study(self, study_uid: str) -> list[InstanceRecord]:
        with self._tx() as s:
            rows = s.scalars(select(InstanceRow).where(InstanceRow.study_uid == study_uid)).all()
            return [_instance(r) for r in rows]

    def instances_of_series(self, series_uid: str) -> list[InstanceRecord]:
        with self._tx() as s:
            rows = s.scalars(select(InstanceRow).where(InstanceRow.series_uid == series_uid)).all()
            return [_instance(r) for r in rows]

    def all_instances(self) -> list[InstanceRecord]:
        with self._tx() as s:
            return [_instance(r) for r in s.scalars(select(InstanceRow)).all()]

    def get_study(self, study_uid: str) -> StudyRecord | None:
        with self._tx() as s:
            r = s.get(StudyRow, study_uid)
            return _study(r) if r else None

    def due_studies(self, stable_seconds: float, *, now: float | None = None) -> list[StudyRecord]:
        """Studies still receiving that have been quiet for ``stable_seconds``."""
        now = time.time() if now is None else now
        with self._tx() as s:
            rows = s.scalars(
                select(StudyRow).where(StudyRow.state == "receiving", StudyRow.last_received_at <= now - stable_seconds)
            ).all()
            return [_study(r) for r in rows]

    def complete_study(
        self, study_uid: str, generation: int, jobs: Sequence[NewJob], *, instance_count: int | None = None
    ) -> list[JobRecord] | None:
        """Mark a study complete and enqueue its jobs, idempotently; None when it was not completed.

        ``instance_count``: how many instances the caller planned the jobs from. Nothing is done if the study
        moved on since the caller read it: another instance indexed (its count differs: perhaps a series the
        jobs do not cover; the study is completed once quiet again), a new generation, or completed already.
        Enqueuing the same (study, route, generation) twice is a no-op.
        """
        now = time.time()
        with self._tx() as s:
            study = s.get(StudyRow, study_uid, with_for_update=True)  # an instance may be being indexed now
            if study is None or study.generation != generation or study.state != "receiving":
                return None
            if instance_count is not None and study.instance_count != instance_count:
                return None
            study.state = "complete"
            out: list[JobRow] = []
            for j in jobs:
                row = s.scalars(
                    select(JobRow).where(
                        JobRow.study_uid == study_uid, JobRow.route == j.route, JobRow.generation == generation
                    )
                ).first()
                if row is None:
                    row = _new_job_row(study_uid, generation, j, now)
                    s.add(row)
                    s.flush()
                out.append(row)
            return [_job(r) for r in out]

    def enqueue_job(self, study_uid: str, generation: int, job: NewJob) -> JobRecord:
        """Insert a job unless the same (study, route, generation) exists; return the job either way."""
        now = time.time()
        try:
            with self._tx() as s:
                row = _new_job_row(study_uid, generation, job, now)
                s.add(row)
                s.flush()
                return _job(row)
        except IntegrityError:
            with self._tx() as s:
                row = s.scalars(
                    select(JobRow).where(
                        JobRow.study_uid == study_uid, JobRow.route == job.route, JobRow.generation == generation
                    )
                ).one()
                return _job(row)

    # ---- jobs ------------------------------------------------------------------------------------------

    def claim_job(self, owner: str, lease_seconds: float, *, now: float | None = None) -> JobRecord | None:
        """Atomically take the oldest due job, or one whose lease ran out; counts the attempt."""
        now = time.time() if now is None else now
        with self._tx() as s:
            stmt = (
                select(JobRow)
                .where(
                    ((JobRow.state == "queued") & (JobRow.not_before <= now))
                    | ((JobRow.state == "running") & (JobRow.lease_expires_at < now))
                )
                .order_by(JobRow.not_before, JobRow.id)
                .limit(1)
            )
            row = s.scalars(self._locked(stmt)).first()
            if row is None:
                return None
            row.state = "running"
            row.attempts += 1
            row.lease_owner = owner
            row.lease_expires_at = now + lease_seconds
            row.updated_at = now
            return _job(row)

    def heartbeat(self, job_id: int, owner: str, lease_seconds: float) -> bool:
        """Extend a lease; False means the job was taken from us (lease expired and re-claimed, or cancelled)."""
        now = time.time()
        with self._tx() as s:
            res = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.state == "running")
                .values(lease_expires_at=now + lease_seconds, updated_at=now)
            )
            return rowcount(res) == 1

    def _owned(self, s: Session, job_id: int, owner: str) -> JobRow | None:
        row = s.get(JobRow, job_id, with_for_update=True)  # a worker whose lease ran out races the new holder
        if row is None or row.state != "running" or row.lease_owner != owner:
            return None
        return row

    def finish_job(self, job_id: int, owner: str, results: Sequence[NewResult], timings: str = "") -> bool:
        """Record results and their deliveries and mark the job done, in one transaction."""
        now = time.time()
        with self._tx() as s:
            row = self._owned(s, job_id, owner)
            if row is None:
                return False
            for r in results:
                res = s.scalars(
                    select(ResultRow).where(
                        ResultRow.job_id == job_id, ResultRow.kind == r.kind, ResultRow.model == r.model
                    )
                ).first()
                if res is None:
                    res = ResultRow(
                        job_id=job_id,
                        kind=r.kind,
                        model=r.model,
                        study_uid=r.study_uid,
                        series_uid=r.series_uid,
                        sop_instance_uid=r.sop_instance_uid,
                        sop_class_uid=r.sop_class_uid,
                        path=r.path,
                        created_at=now,
                    )
                    s.add(res)
                    s.flush()
                for dest in row.destinations.split(","):
                    if (
                        dest
                        and s.scalars(
                            select(DeliveryRow).where(DeliveryRow.result_id == res.id, DeliveryRow.destination == dest)
                        ).first()
                        is None
                    ):
                        s.add(
                            DeliveryRow(
                                result_id=res.id,
                                job_id=job_id,
                                destination=dest,
                                state="pending",
                                attempts=0,
                                not_before=0.0,
                                updated_at=now,
                            )
                        )
            row.state = "done"
            row.error = ""
            row.lease_owner = ""
            row.lease_expires_at = 0.0
            row.updated_at = now
            row.timings = timings
            return True

    def fail_job(self, job_id: int, owner: str, error: str, *, max_attempts: int, backoff_seconds: float) -> str:
        """Record a failed attempt: requeue with exponential backoff, or fail for good; returns the new state."""
        now = time.time()
        with self._tx() as s:
            row = self._owned(s, job_id, owner)
            if row is None:
                return "lost"
            row.error = error[:2000]
            row.lease_owner = ""
            row.lease_expires_at = 0.0
            row.updated_at = now
            if row.attempts >= max_attempts:
                row.state = "failed"
            else:
                row.state = "queued"
                row.not_before = now + backoff_seconds * (2 ** (row.attempts - 1))
            return row.state

    def release_job(self, job_id: int, owner: str) -> bool:
        """Give a lease back without counting the attempt (clean shutdown)."""
        with self._tx() as s:
            row = self._owned(s, job_id, owner)
            if row is None:
                return False
            row.state = "queued"
            row.attempts = max(0, row.attempts - 1)
            row.lease_owner = ""
            row.lease_expires_at = 0.0
            row.updated_at = time.time()
            return True

    def retry_job(self, job_id: int) -> JobRecord:
        """Admin: run a failed or cancelled job again (fresh attempt count) and re-send its failed deliveries;
        for a done job, send all its results again (same UIDs, so the PACS keeps one copy)."""
        with self._tx() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise JobStoreError(f"no job {job_id}")
            resend = DeliveryRow.state == "failed"
            purged = _purged(s, row)
            if purged:
                raise JobStoreError(
                    f"job {job_id}: retention already removed its {purged}; send the study again to run it anew"
                )
            if row.state in ("failed", "cancelled"):
                later = _later_run(s, row)
                if later is not None:  # its results would reach the PACS after, and look newer than, the later run's
                    raise JobStoreError(
                        f"job {job_id} was superseded by job {later.id} (a later run of the same study "
                        f"and route, after late arrivals); retry that one if it needs it"
                    )
                row.state, row.attempts, row.not_before, row.error = "queued", 0, 0.0, ""
            elif row.state == "done":
                resend = DeliveryRow.state.in_(("failed", "done", "refused"))
            else:
                raise JobStoreError(f"job {job_id} is {row.state}; only failed, cancelled or done jobs can be retried")
            s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.job_id == job_id, resend)
                .values(state="pending", attempts=0, not_before=0.0, error="")
            )
            row.updated_at = time.time()
            return _job(row)

    def superseding_job(self, job_id: int) -> JobRecord | None:
        """A later run (higher generation, not cancelled) of the same study and route, if any: its results
        replace this job's, so this one must not deliver after it."""
        with self._tx() as s:
            row = s.get(JobRow, job_id)
            later = None if row is None else _later_run(s, row)
            return None if later is None else _job(later)

    def supersede_job(self, job_id: int, owner: str, by_job_id: int) -> bool:
        """The worker holding ``job_id`` gives it up for ``by_job_id``: cancelled, saying why."""
        with self._tx() as s:
            row = self._owned(s, job_id, owner)
            if row is None:
                return False
            row.state, row.error = "cancelled", f"superseded by job {by_job_id}"
            row.lease_owner, row.lease_expires_at, row.updated_at = "", 0.0, time.time()
            return True

    def cancel_job(self, job_id: int) -> JobRecord:
        with self._tx() as s:
            row = s.get(JobRow, job_id, with_for_update=True)
            if row is None:
                raise JobStoreError(f"no job {job_id}")
            if row.state in ("done", "failed", "cancelled"):
                raise JobStoreError(f"job {job_id} is already {row.state}")
            row.state, row.lease_owner, row.lease_expires_at = "cancelled", "", 0.0
            row.updated_at = time.time()
            return _job(row)

    def get_job(self, job_id: int) -> JobRecord | None:
        with self._tx() as s:
            r = s.get(JobRow, job_id)
            return _job(r) if r else None

    def list_jobs(
        self, *, state: str | None = None, limit: int = 20, or_failed_deliveries: bool = False
    ) -> list[JobRecord]:
        """Newest first; ``state`` filters, and ``or_failed_deliveries`` adds jobs with a result that could not
        be delivered (a done job whose SEG a destination refused also needs the admin's attention)."""
        with self._tx() as s:
            stmt = select(JobRow).order_by(JobRow.id.desc()).limit(limit)
            cond = None if not state else JobRow.state == state
            if or_failed_deliveries:
                undelivered = JobRow.id.in_(select(DeliveryRow.job_id).where(DeliveryRow.state == "failed"))
                cond = undelivered if cond is None else cond | undelivered
            if cond is not None:
                stmt = stmt.where(cond)
            return [_job(r) for r in s.scalars(stmt).all()]

    def earlier_results(self, study_uid: str, route: str, generation: int) -> list[ResultRecord]:
        """Results of the latest done job of ``route`` on the study before ``generation``: what a re-run after
        late arrivals supersedes (its SR names that SR as predecessor; its SEGs follow those SEGs)."""
        with self._tx() as s:
            latest = s.scalars(
                select(JobRow.generation)
                .where(
                    JobRow.study_uid == study_uid,
                    JobRow.route == route,
                    JobRow.generation < generation,
                    JobRow.state == "done",
                )
                .order_by(JobRow.generation.desc())
                .limit(1)
            ).first()
            if latest is None:
                return []
            rows = s.scalars(
                select(ResultRow)
                .join(JobRow, ResultRow.job_id == JobRow.id)
                .where(
                    JobRow.study_uid == study_uid,
                    JobRow.route == route,
                    JobRow.generation == latest,
                    JobRow.state == "done",
                )
                .order_by(ResultRow.id)
            ).all()
            return [_result(r) for r in rows]

    def results_of_job(self, job_id: int) -> list[ResultRecord]:
        with self._tx() as s:
            return [_result(r) for r in s.scalars(select(ResultRow).where(ResultRow.job_id == job_id)).all()]

    # ---- deliveries ------------------------------------------------------------------------------------

    def claim_deliveries(
        self, owner: str, lease_seconds: float, *, limit: int = 32, now: float | None = None
    ) -> list[DeliveryRecord]:
        """Take due deliveries for one destination (one association sends them all). A rejection note is due
        only once every other result of its job has been delivered there: the PACS must hold the replacements
        before it hides what they replace."""
        now = time.time() if now is None else now
        other = aliased(DeliveryRow)
        waiting = DeliveryRow.result_id.in_(select(ResultRow.id).where(ResultRow.kind == REJECTION_KIND)) & exists(
            select(other.id).where(
                other.job_id == DeliveryRow.job_id,
                other.destination == DeliveryRow.destination,
                other.id != DeliveryRow.id,
                other.state != "done",
            )
        )
        due = (
            ((DeliveryRow.state == "pending") & (DeliveryRow.not_before <= now))
            | ((DeliveryRow.state == "sending") & (DeliveryRow.lease_expires_at < now))
        ) & ~waiting
        with self._tx() as s:
            first = s.scalars(
                self._locked(select(DeliveryRow).where(due).order_by(DeliveryRow.not_before, DeliveryRow.id).limit(1))
            ).first()
            if first is None:
                return []
            rows = s.scalars(
                self._locked(
                    select(DeliveryRow)
                    .where(due, DeliveryRow.destination == first.destination)
                    .order_by(DeliveryRow.id)
                    .limit(limit)
                )
            ).all()
            out = []
            for r in rows:
                r.state, r.lease_owner, r.lease_expires_at, r.updated_at = "sending", owner, now + lease_seconds, now
                r.attempts += 1
                res = s.get(ResultRow, r.result_id)
                assert res is not None
                out.append(
                    DeliveryRecord(
                        id=r.id,
                        job_id=r.job_id,
                        destination=r.destination,
                        state=r.state,
                        attempts=r.attempts,
                        not_before=r.not_before,
                        last_status=r.last_status,
                        error=r.error,
                        result=_result(res),
                    )
                )
            return out

    def delivery_outcome(
        self, delivery_id: int, owner: str, *, state: str, status: str = "", error: str = "", not_before: float = 0.0
    ) -> bool:
        """Record a send attempt: state "done", "pending" (retry at not_before), "failed", or "refused" (a
        rejection note the destination would not take). A result that failed there fails its job's rejection
        note there too, unsent (it must not hide what was not replaced); retrying the job sends both again."""
        if state not in ("done", "pending", "failed", "refused"):
            raise JobStoreError(f"bad delivery state {state!r}")
        with self._tx() as s:
            r = s.get(DeliveryRow, delivery_id, with_for_update=True)
            if r is None or r.state != "sending" or r.lease_owner != owner:
                return False
            r.state, r.last_status, r.error, r.not_before = state, status, error[:2000], not_before
            r.lease_owner, r.lease_expires_at, r.updated_at = "", 0.0, time.time()
            if state == "failed":
                s.execute(
                    update(DeliveryRow)
                    .where(
                        DeliveryRow.job_id == r.job_id,
                        DeliveryRow.destination == r.destination,
                        DeliveryRow.state == "pending",
                        DeliveryRow.id != r.id,
                        DeliveryRow.result_id.in_(select(ResultRow.id).where(ResultRow.kind == REJECTION_KIND)),
                    )
                    .values(
                        state="failed", error="not sent: a result it follows was not delivered", updated_at=time.time()
                    )
                )
            return True

    def release_deliveries(self, owner: str) -> int:
        with self._tx() as s:
            res = s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.state == "sending", DeliveryRow.lease_owner == owner)
                .values(state="pending", lease_owner="", lease_expires_at=0.0)
            )
            return rowcount(res)

    def deliveries_of_job(self, job_id: int) -> list[DeliveryRecord]:
        with self._tx() as s:
            rows = s.scalars(select(DeliveryRow).where(DeliveryRow.job_id == job_id).order_by(DeliveryRow.id)).all()
            return [
                DeliveryRecord(
                    id=r.id,
                    job_id=r.job_id,
                    destination=r.destination,
                    state=r.state,
                    attempts=r.attempts,
                    not_before=r.not_before,
                    last_status=r.last_status,
                    error=r.error,
                    result=_result(s.get_one(ResultRow, r.result_id)),
                )
                for r in rows
            ]

    # ---- recovery --------------------------------------------------------------------------------------

    def recover_dead_owners(self, host: str, is_alive: Callable[[int], bool]) -> tuple[int, int]:
        """Free leases held by dead processes of this host (owner "host:pid:..."), without waiting them out.

        Their attempts stay counted. Leases of other hosts still run out on their own.
        """
        prefix = f"{host}:"

        def dead(owner: str) -> bool:
            if not owner.startswith(prefix):
                return False
            try:
                return not is_alive(int(owner[len(prefix) :].split(":", 1)[0]))
            except ValueError:
                return False

        now = time.time()
        with self._tx() as s:
            # only this host's leases, locked in one order: other hosts' workers keep their heartbeats going
            mine = JobRow.lease_owner.startswith(prefix, autoescape=True)
            jobs = [
                r
                for r in s.scalars(
                    select(JobRow).where(JobRow.state == "running", mine).order_by(JobRow.id).with_for_update()
                ).all()
                if dead(r.lease_owner)
            ]
            for r in jobs:
                r.state, r.lease_owner, r.lease_expires_at, r.updated_at = "queued", "", 0.0, now
            mine_d = DeliveryRow.lease_owner.startswith(prefix, autoescape=True)
            dels = [
                r
                for r in s.scalars(
                    select(DeliveryRow)
                    .where(DeliveryRow.state == "sending", mine_d)
                    .order_by(DeliveryRow.id)
                    .with_for_update()
                ).all()
                if dead(r.lease_owner)
            ]
            for d in dels:
                d.state, d.lease_owner, d.lease_expires_at, d.updated_at = "pending", "", 0.0, now
            return len(jobs), len(dels)

    # ---- overview --------------------------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        with self._tx() as s:
            out: dict[str, dict[str, int]] = {}
            for name, col in (("studies", StudyRow.state), ("jobs", JobRow.state), ("deliveries", DeliveryRow.state)):
                out[name] = {k: int(v) for k, v in s.execute(select(col, func.count()).group_by(col)).all()}
            out["instances"] = {"total": int(s.scalar(select(func.count()).select_from(InstanceRow)) or 0)}
            return out
