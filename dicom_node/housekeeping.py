"""Retention and disk watermarks: what the node deletes, when, and why (config ``[retention]``).

Rules, for a study nothing still needs (complete, no job queued or running, no delivery pending), with ages
counted from when it finished (its last instance, job or delivery):
  received instances  after keep_received_hours once every job is done or cancelled and every result
                      delivered; after keep_failed_days if a job failed or a result was not delivered;
  result files        after keep_results_days (keep_failed_days likewise); their rows stay, so a later
                      re-run still supersedes them;
  rows                after keep_history_days once no file of the study is left.
Disk pressure (data volume above high_watermark_percent, or free space below node.min_free_mb) evicts
finished studies whole, delivered ones oldest first, then failed ones (``evict_failed``), until use is at
low_watermark_percent and free space above the floor. Only when nothing more may be evicted does the
listener refuse (0xA700), and the log says what holds the space.
One purge runs at a time per job store (storage.locks.PurgeLock). Every deletion is one log event: study
UID, what, files, bytes, why; never patient data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from dicom_node.config import Config
from dicom_node.logs import log_event
from storage.files import FileStore
from storage.locks import PurgeLock
from storage.retention import PurgeOutcome, RetentionStore, StudyUsage, ensure_incremental_vacuum

log = logging.getLogger("dicom_node.housekeeping")
HOUR = 3600.0
DAY = 86400.0
ORPHAN_MIN_AGE_SECONDS = 3600.0  # an unindexed file this old is no transfer in flight
REFUSAL_LOG_SECONDS = 10.0  # at most one "refusing" event per this, per process
RETRY_EVICTION_SECONDS = 2.0  # after an eviction that found nothing, the listener looks again only after this


@dataclass(frozen=True)
class Planned:
    """One deletion the policy calls for."""

    study_uid: str
    what: str  # received | results | history
    reason: str  # retention | failed_retention | history | disk_pressure | admin
    files: int
    bytes: int  # received instances' bytes (result files are measured when purged)


@dataclass(frozen=True)
class DiskUse:
    total: int
    used: int
    free: int

    @property
    def percent(self) -> float:
        """Used share of what this user may fill, as df shows it."""
        return 100.0 * self.used / max(1, self.used + self.free)


class Housekeeper:
    def __init__(self, cfg: Config, files: FileStore, store: RetentionStore) -> None:
        self.cfg = cfg
        self.files = files
        self.store = store
        self.lock = PurgeLock(store.engine)
        self.floor = cfg.node.min_free_mb << 20

    # ---- policy ------------------------------------------------------------------------------------------

    def plan(
        self, *, now: float | None = None, study_uid: str | None = None, older_than_days: float | None = None
    ) -> list[Planned]:
        """What the retention rules delete now (``older_than_days``: that age for every rule instead)."""
        now = time.time() if now is None else now
        r = self.cfg.retention
        out: list[Planned] = []
        for u in self.store.usage(study_uid):
            if u.busy:
                continue
            age = now - u.finished_at
            keep_received = r.keep_failed_days * DAY if u.failed else r.keep_received_hours * HOUR
            keep_results = r.keep_failed_days * DAY if u.failed else r.keep_results_days * DAY
            if older_than_days is not None:
                keep_received = keep_results = older_than_days * DAY
            why = "admin" if older_than_days is not None else "failed_retention" if u.failed else "retention"
            if u.received_count and age >= keep_received:
                out.append(Planned(u.study_uid, "received", why, u.received_count, u.received_bytes))
            if u.result_count and age >= keep_results:
                out.append(Planned(u.study_uid, "results", why, u.result_count, 0))
            history = (
                r.keep_history_days * DAY
                if older_than_days is None
                else max(older_than_days * DAY, r.keep_history_days * DAY)
            )
            if not u.received_count and not u.result_count and age >= history:
                out.append(Planned(u.study_uid, "history", "history", 0, 0))
        return out

    def evictable(self, usage: Iterable[StudyUsage]) -> list[StudyUsage]:
        """Studies disk pressure may evict, in order: delivered ones oldest first, then failed ones."""
        ok = [
            u
            for u in usage
            if not u.busy and (u.received_count or u.result_count) and (self.cfg.retention.evict_failed or not u.failed)
        ]
        return sorted(ok, key=lambda u: (u.failed, u.finished_at))

    def disk(self) -> DiskUse:
        free, used = self.files.usage()
        return DiskUse(total=used + free, used=used, free=free)

    def over(self, d: DiskUse, incoming: int = 0) -> bool:
        """Above the high watermark, or below the free-space floor."""
        return d.percent > self.cfg.retention.high_watermark_percent or d.free - incoming < self.floor

    def relieved(self, d: DiskUse, incoming: int = 0) -> bool:
        return d.percent <= self.cfg.retention.low_watermark_percent and d.free - incoming >= self.floor

    # ---- doing it ----------------------------------------------------------------------------------------

    def execute(self, planned: Planned) -> PurgeOutcome:
        if planned.what == "received":
            out = self.store.purge_received(planned.study_uid, planned.reason)
        elif planned.what == "results":
            out = self.store.purge_results(planned.study_uid, planned.reason)
        else:
            out = self.store.purge_history(planned.study_uid)
        self._log(out, planned.reason)
        return out

    @staticmethod
    def _log(out: PurgeOutcome, reason: str) -> None:
        if out.skipped:
            log_event(log, "purge_skipped", logging.DEBUG, study_uid=out.study_uid, what=out.what, why=out.skipped)
        else:
            log_event(
                log,
                "study_purged",
                study_uid=out.study_uid,
                what=out.what,
                files=out.files,
                bytes=out.bytes,
                reason=reason,
            )

    def run_once(self, *, wait: float = 0.0) -> int:
        """One housekeeping round (retention, then watermarks, then the database); number of deletions.
        Skipped when another process's purge holds the lock."""
        if not self.lock.acquire(wait):
            return 0
        try:
            self.store.finish_pending()
            done = 0
            if self.cfg.retention.enabled:
                for p in self.plan():
                    done += not self.execute(p).skipped
                done += self._evict(0)
            if done:
                freed = self.store.vacuum()
                if freed:
                    log_event(log, "database_compacted", pages=freed)
            return done
        finally:
            self.lock.release()

    def _evict(self, incoming: int) -> int:
        """Evict finished studies while the disk is over its watermark; the number of purges. Lock held."""
        d = self.disk()
        if not self.over(d, incoming):
            return 0
        done = 0
        for u in self.evictable(self.store.usage()):
            for what in ("received", "results"):
                if u.received_count if what == "received" else u.result_count:
                    done += not self.execute(Planned(u.study_uid, what, "disk_pressure", 0, 0)).skipped
            d = self.disk()
            if self.relieved(d, incoming):
                break
        return done

    def relieve(self, incoming: int, wait: float) -> bool:
        """Under pressure now: evict what may be evicted (waiting up to ``wait`` for another purge to end)."""
        if not self.lock.acquire(wait):
            return True  # another purge ran meanwhile: measure again
        try:
            return self._evict(incoming) > 0
        finally:
            self.lock.release()

    def start_up(self) -> None:
        """At start, before the listener: finish purges a crash cut short, remove files nothing indexes, give a
        SQLite file made before incremental auto-vacuum its space back once."""
        with_lock = self.lock.acquire(30.0)
        try:
            notes = self.store.finish_pending()
            if notes:
                log_event(log, "interrupted_purge_finished", files=notes)
            files, size = self.store.sweep_orphans(min_age_seconds=ORPHAN_MIN_AGE_SECONDS)
            if files:
                log_event(log, "orphan_files_removed", files=files, bytes=size)
        finally:
            if with_lock:
                self.lock.release()
        if ensure_incremental_vacuum(self.store.engine):
            log_event(log, "database_vacuumed", auto_vacuum="incremental")


class SpaceKeeper:
    """The listener's guard (storage.files.SpaceGuard): on each free-space check, above the high watermark it
    starts an eviction in the background; below the floor (the instance would be refused) it evicts first,
    and if nothing may be evicted it logs what holds the space (at most every REFUSAL_LOG_SECONDS)."""

    def __init__(self, keeper: Housekeeper) -> None:
        self.keeper = keeper
        self._busy = threading.Lock()
        self._last_refusal_log = 0.0
        self._quiet_until = 0.0

    def pressure(self, free: int, used: int, incoming: int) -> bool:
        k = self.keeper
        d = DiskUse(total=free + used, used=used, free=free)
        if not k.over(d, incoming):
            return False
        if time.monotonic() < self._quiet_until:  # nothing was evictable a moment ago: no scan per instance
            if d.free - incoming < k.floor:
                self._explain(d)
            return False
        if d.free - incoming >= k.floor:  # above the high watermark only: evict without holding this instance
            if self._busy.acquire(blocking=False):
                threading.Thread(target=self._background, args=(incoming,), daemon=True, name="evict").start()
            return False
        with self._busy:
            freed = k.relieve(incoming, wait=30.0)
        if not freed:
            self._quiet_until = time.monotonic() + RETRY_EVICTION_SECONDS
        after = k.disk()
        if after.free - incoming < k.floor:
            self._explain(after)
        return freed

    def _background(self, incoming: int) -> None:
        try:
            if not self.keeper.relieve(incoming, wait=0.0):
                self._quiet_until = time.monotonic() + RETRY_EVICTION_SECONDS
        except Exception:  # an eviction that fails must not end the listener; the next check tries again
            log.exception("eviction_failed")
        finally:
            self._busy.release()

    def _explain(self, d: DiskUse) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log < REFUSAL_LOG_SECONDS:
            return
        self._last_refusal_log = now
        held: dict[str, int] = {}
        for u in self.keeper.store.usage():
            if u.received_count or u.result_count:
                key = u.busy.split(" ")[0] if u.busy else "failed_kept" if u.failed else "evictable"
                held[key] = held.get(key, 0) + 1
        log_event(
            log,
            "storage_full_nothing_to_evict",
            logging.ERROR,
            used_percent=round(d.percent, 1),
            free_mb=d.free >> 20,
            floor_mb=self.keeper.floor >> 20,
            **{f"studies_{k}": v for k, v in sorted(held.items())},
        )
