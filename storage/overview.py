"""Read-only views of the job store for the operator (dashboard, REST API, metrics), and the study header
values they show and search by. The job store's own reads (jobs, deliveries, results, counts) are not
repeated here; these are the queries it has no use for itself."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, Select, delete, func, or_, select, text
from sqlalchemy.orm import Session, sessionmaker

from storage.jobstore import _study
from storage.records import SeriesCount, StudyInfo, StudyRecord
from storage.schema import InstanceRow, JobRow, StudyInfoRow, StudyRow


@dataclass(frozen=True)
class QueueStats:
    queued: int
    running: int
    oldest_queued_at: float  # created_at of the oldest queued job; 0 when none
    done_last_hour: int
    failed_last_hour: int
    received_last_hour: int  # instances


def _info(r: StudyInfoRow) -> StudyInfo:
    return StudyInfo(
        study_uid=r.study_uid,
        accession_number=r.accession_number,
        study_date=r.study_date,
        study_description=r.study_description,
        modalities=r.modalities,
        patient_name=r.patient_name,
        patient_id=r.patient_id,
        calling_ae=r.calling_ae,
    )


class Overview:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    def reachable(self) -> bool:
        """The database answers a query."""
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT 1")).scalar() == 1

    def studies(self, *, search: str = "", limit: int = 50) -> list[tuple[StudyRecord, StudyInfo | None]]:
        """Newest received first; ``search`` matches a study UID (prefix) or an accession number (exact)."""
        with self._tx() as s:
            stmt = (
                select(StudyRow, StudyInfoRow)
                .outerjoin(StudyInfoRow, StudyInfoRow.study_uid == StudyRow.study_uid)
                .order_by(StudyRow.last_received_at.desc())
                .limit(limit)
            )
            if search:
                stmt = stmt.where(
                    or_(StudyRow.study_uid.startswith(search, autoescape=True), StudyInfoRow.accession_number == search)
                )
            return [(_study(st), _info(i) if i is not None else None) for st, i in s.execute(stmt).all()]

    def study_info(self, study_uid: str) -> StudyInfo | None:
        with self._tx() as s:
            r = s.get(StudyInfoRow, study_uid)
            return _info(r) if r else None

    def series_of_study(self, study_uid: str) -> list[SeriesCount]:
        with self._tx() as s:
            rows = s.execute(
                select(
                    InstanceRow.series_uid,
                    func.min(InstanceRow.sop_class_uid),
                    func.count(),
                    func.coalesce(func.sum(InstanceRow.size), 0),
                )
                .where(InstanceRow.study_uid == study_uid)
                .group_by(InstanceRow.series_uid)
            ).all()
            return [SeriesCount(series_uid=u, sop_class_uid=c, instances=int(n), bytes=int(b)) for u, c, n, b in rows]

    def jobs_of_study(self, study_uid: str) -> list[int]:
        with self._tx() as s:
            return list(s.scalars(select(JobRow.id).where(JobRow.study_uid == study_uid).order_by(JobRow.id.desc())))

    def unindexed(self, limit: int = 200) -> list[tuple[str, str, str]]:
        """Studies without header values yet: (study UID, one instance's path, its calling AE title)."""
        with self._tx() as s:
            missing = (
                select(StudyRow.study_uid)
                .outerjoin(StudyInfoRow, StudyInfoRow.study_uid == StudyRow.study_uid)
                .where(StudyInfoRow.study_uid.is_(None), StudyRow.instance_count > 0)
                .limit(limit)
            )
            out = []
            for uid in s.scalars(missing).all():
                inst = s.execute(
                    select(InstanceRow.path, InstanceRow.calling_ae).where(InstanceRow.study_uid == uid).limit(1)
                ).first()
                out.append((uid, inst[0] if inst else "", inst[1] if inst else ""))
            return out

    def save_info(self, infos: Sequence[StudyInfo]) -> None:
        """Insert (or replace) header values; rows of studies no longer in the store go at the same time."""
        with self._tx() as s:
            for i in infos:
                s.merge(StudyInfoRow(**i.__dict__))
            s.execute(delete(StudyInfoRow).where(StudyInfoRow.study_uid.not_in(select(StudyRow.study_uid))))

    def queue(self, *, now: float | None = None) -> QueueStats:
        now = time.time() if now is None else now
        hour = now - 3600
        with self._tx() as s:

            def n(stmt: Select[Any]) -> int:
                return int(s.scalar(stmt) or 0)

            jobs = select(func.count()).select_from(JobRow)
            return QueueStats(
                queued=n(jobs.where(JobRow.state == "queued")),
                running=n(jobs.where(JobRow.state == "running")),
                oldest_queued_at=float(
                    s.scalar(select(func.min(JobRow.created_at)).where(JobRow.state == "queued")) or 0.0
                ),
                done_last_hour=n(jobs.where(JobRow.state == "done", JobRow.updated_at >= hour)),
                failed_last_hour=n(jobs.where(JobRow.state == "failed", JobRow.updated_at >= hour)),
                received_last_hour=n(
                    select(func.count()).select_from(InstanceRow).where(InstanceRow.received_at >= hour)
                ),
            )
