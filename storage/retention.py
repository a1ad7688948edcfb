"""Retention's side of the store: what each study holds on disk, where its work stands, and the purges.

A purge removes index rows and notes the files it is about to unlink (``purge_files``) in one transaction,
then unlinks them and drops the notes. A crash in between leaves notes, which ``finish_pending`` completes
(at the next start), never a row pointing at a missing file. A noted file is unlinked only while it is the
same file (inode) and nothing indexes its path again: a study sent again at that moment keeps its new file.

Before removing anything a purge checks, with the study's row and its jobs locked, that nothing still needs
the study: it is complete (not receiving), no job of it is queued or running, no delivery of it is pending.
Policy (which study, when, why) is the caller's; this module only refuses what would break the node.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine, Select, delete, func, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

from storage.db import rowcount
from storage.files import TMP_PREFIX, FileStore
from storage.schema import DeliveryRow, InstanceRow, JobRow, PurgeFileRow, ResultRow, StudyPurgeRow, StudyRow

ACTIVE_JOB_STATES = ("queued", "running")
ACTIVE_DELIVERY_STATES = ("pending", "sending")


_Select = TypeVar("_Select", bound="Select[*tuple[Any, ...]]")  # keeps its row type through .where()


@dataclass(frozen=True)
class StudyUsage:
    """One study as retention sees it."""

    study_uid: str
    state: str
    finished_at: float  # its last instance, job or delivery activity
    busy: str  # what still needs its files ("receiving", "job queued", ...); "" when nothing does
    failed: bool  # a job failed, or a result was not delivered (superseded runs do not count)
    received_count: int
    received_bytes: int
    result_count: int  # result files still on disk
    purged_before: bool  # retention removed some of it already


@dataclass(frozen=True)
class PurgeOutcome:
    study_uid: str
    what: str  # received | results | history
    files: int
    bytes: int
    skipped: str = ""  # why nothing was removed; "" when it was


class RetentionStore:
    def __init__(self, engine: Engine, files: FileStore) -> None:
        self.engine = engine
        self.files = files
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._sqlite = engine.dialect.name == "sqlite"

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    # ---- what there is -------------------------------------------------------------------------------------

    def usage(self, study_uid: str | None = None) -> list[StudyUsage]:
        """Every study (or one), with its files and the state of its work."""

        def only(stmt: _Select, col: InstrumentedAttribute[str]) -> _Select:
            return stmt if study_uid is None else stmt.where(col == study_uid)

        with self._tx() as s:
            studies = s.execute(
                only(select(StudyRow.study_uid, StudyRow.state, StudyRow.last_received_at), StudyRow.study_uid)
            ).all()
            received = {
                u: (int(n), int(b or 0))
                for u, n, b in s.execute(
                    only(
                        select(InstanceRow.study_uid, func.count(), func.sum(InstanceRow.size)), InstanceRow.study_uid
                    ).group_by(InstanceRow.study_uid)
                ).all()
            }
            results = {
                u: int(n)
                for u, n in s.execute(
                    only(
                        select(ResultRow.study_uid, func.count()).where(ResultRow.path != ""), ResultRow.study_uid
                    ).group_by(ResultRow.study_uid)
                ).all()
            }
            jobs = s.execute(
                only(
                    select(
                        JobRow.id, JobRow.study_uid, JobRow.route, JobRow.generation, JobRow.state, JobRow.updated_at
                    ),
                    JobRow.study_uid,
                )
            ).all()
            deliveries = s.execute(
                only(
                    select(DeliveryRow.job_id, DeliveryRow.state, DeliveryRow.updated_at).join(
                        JobRow, JobRow.id == DeliveryRow.job_id
                    ),
                    JobRow.study_uid,
                )
            ).all()
            purged = set(s.scalars(only(select(StudyPurgeRow.study_uid), StudyPurgeRow.study_uid)).all())
        by_study: dict[str, list] = defaultdict(list)
        for j in jobs:
            by_study[j.study_uid].append(j)
        dels: dict[int, list] = defaultdict(list)
        for d in deliveries:
            dels[d.job_id].append(d)
        out = []
        for uid, state, last in studies:
            finished, busy, failed = last, "receiving" if state == "receiving" else "", False
            latest: dict[str, int] = {}
            for j in by_study[uid]:
                if j.state != "cancelled":
                    latest[j.route] = max(latest.get(j.route, -1), j.generation)
            for j in by_study[uid]:
                finished = max(finished, j.updated_at)
                if j.state in ACTIVE_JOB_STATES:
                    busy = busy or f"job {j.state}"
                current = j.generation >= latest.get(j.route, -1)
                failed = failed or (current and j.state == "failed")
                for d in dels[j.id]:
                    finished = max(finished, d.updated_at)
                    if d.state in ACTIVE_DELIVERY_STATES:
                        busy = busy or "delivery pending"
                    failed = failed or (current and d.state == "failed")
            n, b = received.get(uid, (0, 0))
            out.append(
                StudyUsage(
                    study_uid=uid,
                    state=state,
                    finished_at=finished,
                    busy=busy,
                    failed=failed,
                    received_count=n,
                    received_bytes=b,
                    result_count=results.get(uid, 0),
                    purged_before=uid in purged,
                )
            )
        return out

    def purged_series(self, study_uid: str) -> dict[str, int]:
        """{series UID: instances of it purged} for a study whose received instances retention removed."""
        with self._tx() as s:
            row = s.get(StudyPurgeRow, study_uid)
            return {} if row is None else {str(k): int(v) for k, v in json.loads(row.series_counts or "{}").items()}

    # ---- purges ---------------------------------------------------------------------------------------------

    def _why_needed(self, s: Session, study_uid: str) -> tuple[StudyRow | None, str]:
        """Lock the study and its jobs; what still needs the study's files ("" when nothing does)."""
        study = s.get(StudyRow, study_uid, with_for_update=True)
        if study is None:
            return None, "no such study"
        if study.state != "complete":
            return study, study.state
        jobs = s.scalars(
            select(JobRow).where(JobRow.study_uid == study_uid).order_by(JobRow.id).with_for_update()
        ).all()
        active = [j for j in jobs if j.state in ACTIVE_JOB_STATES]
        if active:
            return study, f"job {active[0].id} {active[0].state}"
        pending = s.scalars(
            select(DeliveryRow.id)
            .where(DeliveryRow.job_id.in_([j.id for j in jobs]), DeliveryRow.state.in_(ACTIVE_DELIVERY_STATES))
            .limit(1)
        ).first()
        return study, f"delivery {pending} pending" if pending is not None else ""

    def _note(self, s: Session, paths: list[str], now: float) -> list[tuple[int, str, int]]:
        notes = []
        for rel in paths:
            try:
                inode = os.stat(self.files.absolute(rel)).st_ino
            except OSError:  # already gone (an earlier purge's crash, or a hand): nothing to unlink
                continue
            row = PurgeFileRow(path=rel, inode=inode, created_at=now)
            s.add(row)
            s.flush()
            notes.append((row.id, rel, inode))
        return notes

    def _tombstone(self, s: Session, study_uid: str) -> StudyPurgeRow:
        row = s.get(StudyPurgeRow, study_uid)
        if row is None:
            row = StudyPurgeRow(
                study_uid=study_uid,
                series_counts="{}",
                received_purged_at=0.0,
                results_purged_at=0.0,
                received_bytes=0,
                results_bytes=0,
                reason="",
            )
            s.add(row)
        return row

    def purge_received(self, study_uid: str, reason: str, *, now: float | None = None) -> PurgeOutcome:
        """Remove a study's received instances (rows, then files), unless something still needs them."""
        now = time.time() if now is None else now
        with self._tx() as s:
            study, why = self._why_needed(s, study_uid)
            if why or study is None:
                return PurgeOutcome(study_uid, "received", 0, 0, skipped=why)
            rows = s.execute(
                select(InstanceRow.series_uid, InstanceRow.path, InstanceRow.size).where(
                    InstanceRow.study_uid == study_uid
                )
            ).all()
            if not rows:
                return PurgeOutcome(study_uid, "received", 0, 0, skipped="nothing stored")
            notes = self._note(s, [r.path for r in rows], now)
            s.execute(delete(InstanceRow).where(InstanceRow.study_uid == study_uid))
            study.instance_count = 0  # what arrives from now on is counted afresh (see storage.batching)
            counts: dict[str, int] = defaultdict(int)
            for r in rows:
                counts[r.series_uid] += 1
            tomb = self._tombstone(s, study_uid)
            known = json.loads(tomb.series_counts or "{}")
            tomb.series_counts = json.dumps(
                {k: max(int(known.get(k, 0)), counts.get(k, 0)) for k in sorted(set(known) | set(counts))}
            )
            size = sum(r.size for r in rows)
            tomb.received_purged_at, tomb.received_bytes, tomb.reason = now, (tomb.received_bytes or 0) + size, reason
        self._unlink(notes)
        return PurgeOutcome(study_uid, "received", len(rows), size)

    def purge_results(self, study_uid: str, reason: str, *, now: float | None = None) -> PurgeOutcome:
        """Remove a study's result files; their rows stay, path emptied (a later re-run still names them)."""
        now = time.time() if now is None else now
        with self._tx() as s:
            _study, why = self._why_needed(s, study_uid)
            if why:
                return PurgeOutcome(study_uid, "results", 0, 0, skipped=why)
            rows = s.scalars(select(ResultRow).where(ResultRow.study_uid == study_uid, ResultRow.path != "")).all()
            if not rows:
                return PurgeOutcome(study_uid, "results", 0, 0, skipped="nothing stored")
            size = 0
            for r in rows:
                with contextlib.suppress(OSError):
                    size += os.stat(self.files.absolute(r.path)).st_size
            notes = self._note(s, [r.path for r in rows], now)
            s.execute(update(ResultRow).where(ResultRow.id.in_([r.id for r in rows])).values(path=""))
            tomb = self._tombstone(s, study_uid)
            tomb.results_purged_at, tomb.results_bytes, tomb.reason = now, (tomb.results_bytes or 0) + size, reason
        self._unlink(notes)
        return PurgeOutcome(study_uid, "results", len(rows), size)

    def purge_history(self, study_uid: str) -> PurgeOutcome:
        """Delete every row of a study whose files are all gone: study, jobs, results, deliveries, tombstone."""
        with self._tx() as s:
            _study, why = self._why_needed(s, study_uid)
            if why:
                return PurgeOutcome(study_uid, "history", 0, 0, skipped=why)
            if (
                s.scalars(
                    select(InstanceRow.sop_instance_uid).where(InstanceRow.study_uid == study_uid).limit(1)
                ).first()
                is not None
                or s.scalars(
                    select(ResultRow.id).where(ResultRow.study_uid == study_uid, ResultRow.path != "").limit(1)
                ).first()
                is not None
            ):
                return PurgeOutcome(study_uid, "history", 0, 0, skipped="files still stored")
            job_ids = select(JobRow.id).where(JobRow.study_uid == study_uid).scalar_subquery()
            n = rowcount(s.execute(delete(DeliveryRow).where(DeliveryRow.job_id.in_(job_ids))))
            n += rowcount(s.execute(delete(ResultRow).where(ResultRow.job_id.in_(job_ids))))
            n += rowcount(s.execute(delete(JobRow).where(JobRow.study_uid == study_uid)))
            s.execute(delete(StudyPurgeRow).where(StudyPurgeRow.study_uid == study_uid))
            s.execute(delete(StudyRow).where(StudyRow.study_uid == study_uid))
        self._rmdirs([f"incoming/{study_uid}", f"results/{study_uid}"])
        return PurgeOutcome(study_uid, "history", n + 1, 0)

    # ---- files ----------------------------------------------------------------------------------------------

    def _unlink(self, notes: list[tuple[int, str, int]]) -> None:
        """Unlink noted files that are still the ones purged, then drop the notes."""
        if not notes:
            return
        indexed = self._indexed({rel for _, rel, _ in notes})
        folders = set()
        for _, rel, inode in notes:
            folders.add(os.path.dirname(rel))
            if rel in indexed:
                continue
            path = self.files.absolute(rel)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == inode:
                    path.unlink()
        self._rmdirs(sorted(folders, key=len, reverse=True))
        with self._tx() as s:
            s.execute(delete(PurgeFileRow).where(PurgeFileRow.id.in_([i for i, _, _ in notes])))

    def _indexed(self, paths: set[str]) -> set[str]:
        """Those of ``paths`` an instance or result row names now (stored again since the purge noted them)."""
        if not paths:
            return set()
        with self._tx() as s:
            found = set(s.scalars(select(InstanceRow.path).where(InstanceRow.path.in_(paths))).all())
            found |= set(s.scalars(select(ResultRow.path).where(ResultRow.path.in_(paths))).all())
        return found

    def _rmdirs(self, folders: list[str]) -> None:
        """Remove emptied folders, each and then its parent (a study's), up to incoming/ or results/. One a
        listener is filling at this moment is not empty, and FileStore makes it again if it is gone."""
        for rel in folders:
            p = self.files.absolute(rel)
            while p.parent != self.files.root and p != self.files.root:
                try:
                    p.rmdir()
                except OSError:  # not empty, or gone
                    break
                p = p.parent

    def finish_pending(self) -> int:
        """Complete purges a crash interrupted: unlink their noted files; returns how many notes there were."""
        with self._tx() as s:
            notes = [(r.id, r.path, r.inode) for r in s.scalars(select(PurgeFileRow).order_by(PurgeFileRow.id))]
        for i in range(0, len(notes), 500):
            self._unlink(notes[i : i + 500])
        return len(notes)

    def sweep_orphans(self, *, min_age_seconds: float, now: float | None = None) -> tuple[int, int]:
        """Remove received and result files that no row indexes and that nobody touched for ``min_age_seconds``
        (a crash between a file's rename and its row; a younger one may be a transfer in flight): (files,
        bytes). Temp files are ``FileStore.clean_temp_files``'s."""
        now = time.time() if now is None else now
        with self._tx() as s:
            indexed = set(s.scalars(select(InstanceRow.path)).all())
            indexed |= set(s.scalars(select(ResultRow.path).where(ResultRow.path != "")).all())
            noted = set(s.scalars(select(PurgeFileRow.path)).all())
        n = size = 0
        for pattern in ("incoming/*/*/*.dcm", "results/*/*.dcm"):
            for p in self.files.root.glob(pattern):
                rel = self.files.relative(p)
                if rel in indexed or rel in noted or p.name.startswith(TMP_PREFIX):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = p.stat()
                    if now - st.st_mtime >= min_age_seconds:
                        p.unlink()
                        n, size = n + 1, size + st.st_size
        return n, size

    def vacuum(self, max_pages: int = 4096) -> int:
        """Give free database pages back to the file system, a bounded step at a time (SQLite with incremental
        auto-vacuum: each step is a short write transaction, so listeners barely wait). Returns pages freed.
        PostgreSQL's autovacuum does its own."""
        if not self._sqlite:
            return 0
        freed = 0
        with self.engine.connect() as conn:
            if conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() != 2:
                return 0
            while True:
                free = int(conn.exec_driver_sql("PRAGMA freelist_count").scalar() or 0)
                conn.rollback()
                if free == 0:
                    return freed
                step = min(free, max_pages)
                conn.exec_driver_sql(f"PRAGMA incremental_vacuum({step})")
                conn.commit()
                freed += step


def ensure_incremental_vacuum(engine: Engine) -> bool:
    """Make a SQLite database created without incremental auto-vacuum use it: one full VACUUM, for the node
    to run at start before anything else opens the file. True if it ran."""
    if engine.dialect.name != "sqlite":
        return False
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        if cur.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return False
        cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
        cur.execute("VACUUM")
        return True
    finally:
        raw.close()
