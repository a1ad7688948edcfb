"""Group commit: instances received on several associations at once share folder fsyncs and index
transactions, in a two-stage pipeline.

Each association thread fsyncs its own temp file (the kernel merges concurrent fsyncs), then passes two
stages, each batched leader/follower style (the first caller to find a stage idle takes everything
waiting there, the others wait for it):
  place   look up which SOP Instance UIDs exist, rename the files into place, fsync each folder once;
  index   record the rows of the whole batch in one transaction (one WAL fsync).
Batch k is indexed while batch k+1 is placed, so their flushes overlap. A caller returns only once its
own file and row are durable, or with a failure status and nothing left behind: Success is never
answered early. An instance whose SOP Instance UID is still in flight waits for that one to finish and is
then judged against the outcome (kept first, replaced, refused). With one association each stage is the
plain per-instance step, with no extra thread hop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.handlers import (
    OUT_OF_RESOURCES,
    OUT_OF_RESOURCES_DB,
    SUCCESS,
    UID_MISMATCH,
    Pending,
    StoreSettings,
)
from dicom_node.logs import log_event
from storage.batching import existing_paths, instance_batch
from storage.files import FileStore

log = logging.getLogger("dicom_node.listener")
MAX_BATCH = 256
_MOVED = "SOPInstanceUID already stored under another study or series"


@dataclass(eq=False)
class _Slot:
    pending: Pending
    status: int = -1  # -1 while undecided
    outcome: str = ""  # "stored" / "replaced" / ... on success, else the failure comment
    placed_new: bool = False
    blocked_by: _Slot | None = None  # an in-flight instance with the same SOP Instance UID
    stage_done: int = 0
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def sop(self) -> str:
        return self.pending.instance.sop_instance_uid


class _Stage:
    """Leader/follower batching of one step: ``work`` gets every slot waiting when the stage falls idle."""

    def __init__(self, number: int, work: Callable[[list[_Slot]], None]) -> None:
        self.number = number
        self.work = work
        self._cond = threading.Condition()
        self._queue: list[_Slot] = []
        self._leading = False

    def run(self, slot: _Slot) -> None:
        with self._cond:
            self._queue.append(slot)
            while slot.stage_done < self.number:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                self._cond.release()
                try:
                    self.work(batch)
                finally:
                    self._cond.acquire()
                    for s in batch:
                        s.stage_done = self.number
                    self._leading = False
                    self._cond.notify_all()


class GroupCommitter:
    def __init__(self, files: FileStore, engine: Engine, settings: StoreSettings) -> None:
        self.files = files
        self.engine = engine
        self.settings = settings
        self._in_flight: dict[str, _Slot] = {}  # SOP Instance UID -> placed, not yet indexed
        self._in_flight_lock = threading.Lock()
        self._place = _Stage(1, self._guarded(self._place_batch))
        self._index = _Stage(2, self._guarded(self._index_batch))

    def commit(self, pending: Pending) -> tuple[int, str]:
        """Place and index one instance (durably) together with whatever else is waiting."""
        slot = _Slot(pending)
        try:
            while True:
                slot.stage_done = 0
                self._place.run(slot)
                if slot.blocked_by is None:
                    break
                slot.blocked_by.finished.wait()
                slot.blocked_by = None
            if slot.status < 0:
                self._index.run(slot)
        finally:
            with self._in_flight_lock:
                if self._in_flight.get(slot.sop) is slot:
                    del self._in_flight[slot.sop]
            slot.finished.set()
        return slot.status, slot.outcome

    def _guarded(self, step: Callable[[list[_Slot]], None]) -> Callable[[list[_Slot]], None]:
        def run(batch: list[_Slot]) -> None:
            try:
                step(batch)
            except Exception as exc:  # never leave a caller waiting forever, nor a file without its row
                log.exception("group_commit_failed")
                for s in batch:
                    if s.status < 0 and s.blocked_by is None:
                        s.status, s.outcome = OUT_OF_RESOURCES, f"internal error: {type(exc).__name__}"
                        self._undo(s)
        return run

    def _undo(self, s: _Slot) -> None:
        self.files.remove(s.pending.tmp)
        if s.placed_new:
            self.files.remove(s.pending.path)  # never leave a file without its row

    def _place_batch(self, batch: list[_Slot]) -> None:
        keep_first = self.settings.duplicate_policy == "keep_first"
        placed: list[_Slot] = []
        with self._in_flight_lock:  # held across the lookup: a slot leaves in-flight only after its commit
            try:
                existing = existing_paths(self.engine, [s.sop for s in batch])
            except SQLAlchemyError as exc:
                for s in batch:
                    s.status, s.outcome = OUT_OF_RESOURCES_DB, f"cannot index: {type(exc).__name__}"
                    self.files.remove(s.pending.tmp)
                return
            for s in batch:
                other = self._in_flight.get(s.sop)
                if other is not None:
                    s.blocked_by = other  # judged once that one is durable, or has failed
                    continue
                prev = existing.get(s.sop)
                if prev is not None and keep_first:
                    s.status, s.outcome = SUCCESS, "duplicate_kept_first"
                    self.files.remove(s.pending.tmp)
                    continue
                if prev is not None and prev != s.pending.instance.path:
                    s.status, s.outcome = UID_MISMATCH, _MOVED
                    self.files.remove(s.pending.tmp)
                    continue
                self._in_flight[s.sop] = s
                s.placed_new = prev is None
                placed.append(s)
        folders: set[Path] = set()
        for s in placed:
            try:
                self.files.place(s.pending.tmp, s.pending.path)
            except OSError as exc:
                s.status, s.outcome = OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}"
                s.placed_new = False
                self.files.remove(s.pending.tmp)
                continue
            folders.add(s.pending.path.parent)
        try:
            self.files.sync_dirs(folders)
        except OSError as exc:
            for s in placed:
                if s.status < 0:
                    s.status, s.outcome = OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}"
                    self._undo(s)

    def _index_batch(self, batch: list[_Slot]) -> None:
        try:
            with instance_batch(self.engine) as tx:
                outcomes = tx.record([s.pending.instance for s in batch], late_arrivals=self.settings.late_arrivals)
        except SQLAlchemyError as exc:
            log_event(log, "index_failed", logging.WARNING, instances=len(batch), error=type(exc).__name__)
            for s in batch:
                s.status, s.outcome = OUT_OF_RESOURCES_DB, f"cannot index: {type(exc).__name__}"
                self._undo(s)
            return
        for s, outcome in zip(batch, outcomes, strict=True):
            s.status, s.outcome = SUCCESS, outcome
