"""Group commit: instances received on several associations at once share folder fsyncs and index
transactions, in a two-stage pipeline.

Each instance passes two stages, each batched leader/follower style (the first caller to find a stage idle
takes everything waiting there, the others wait for it), with its own file's fsync in between:
  place   look up which SOP Instance UIDs exist and rename the new files into place;
  flush   (each caller, in its own thread) fsync its file; on a journaling file system (ext4's default,
          XFS) that one journal commit also covers its inode and new name, and concurrent callers'
          flushes merge in the kernel;
  index   fsync each folder of the batch once (then little more than a cache flush where the journal
          already holds the names; the step that makes them durable on ext4 without a journal), then
          record the rows of the whole batch in one transaction (one WAL fsync).
Renaming before the flush is safe because nothing refers to a file before its row is committed: a crash
in between leaves at most an unacknowledged file under its final name, which the peer's resend replaces.
A file that replaces an indexed one (duplicate_policy "replace") is flushed before its rename instead, so
an acknowledged file is never swapped for a partial one. Batch k is indexed while batch k+1 is placed. A
caller returns only once its own file and row are durable, or with a failure status and nothing left
behind: Success is never answered early. An instance whose SOP Instance UID is still in flight waits for
that one to finish and is then judged against the outcome (kept first, replaced, refused). Across listener
processes the same holds through the file system: a new file is renamed only where no file has its name
yet, and a name taken by a file another process is still storing (its temp file's flock, see
FileStore.open_temp) makes this instance wait for that process and be judged again. With one association
each stage is the plain per-instance step, with no extra thread hop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.logs import log_event
from dicom_node.receive.incoming import (
    OUT_OF_RESOURCES,
    OUT_OF_RESOURCES_DB,
    SUCCESS,
    UID_MISMATCH,
    Pending,
    StoreSettings,
)
from storage.batching import InstanceIndex
from storage.files import FileStore

log = logging.getLogger("dicom_node.listener")
MAX_BATCH = 256
_MOVED = "SOPInstanceUID already stored under another study or series"


def _cannot_write(exc: OSError) -> tuple[int, str]:
    return OUT_OF_RESOURCES, f"cannot write: {exc.strerror or exc}"


@dataclass(eq=False)
class _Slot:
    pending: Pending
    status: int = -1  # -1 while undecided
    outcome: str = ""  # "stored" / "replaced" / ... on success, else the failure comment
    placed_new: bool = False
    flushed: bool = False
    blocked_by: _Slot | None = None  # an in-flight instance with the same SOP Instance UID
    held_elsewhere: bool = False  # its final name is taken by a file another process is still storing
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
        self.settings = settings
        self._in_flight: dict[str, _Slot] = {}  # SOP Instance UID -> placed, not yet indexed
        self._in_flight_lock = threading.Lock()
        self._place_stage = _Stage(1, self._guarded(self._place_batch))
        self._index_stage = _Stage(2, self._guarded(self._index_batch))
        self._db = InstanceIndex(engine)  # look-ups by the place stage's leader, commits by the index stage's

    def close(self) -> None:
        """Give back the index's kept database connections (at shutdown)."""
        self._db.close()

    def commit(self, pending: Pending) -> tuple[int, str]:
        """Place and index one instance (durably) together with whatever else is waiting."""
        slot = _Slot(pending)
        try:
            while True:
                slot.stage_done = 0
                self._place_stage.run(slot)
                if slot.blocked_by is not None:
                    slot.blocked_by.finished.wait()
                    slot.blocked_by = None
                elif slot.held_elsewhere:  # another listener process: wait for its outcome, then judge again
                    slot.held_elsewhere = False
                    self.files.wait_until_written(slot.pending.path)
                else:
                    break
            if slot.status < 0 and not slot.flushed:
                self._flush(slot)
            if slot.status < 0:
                self._index_stage.run(slot)
        finally:
            with contextlib.suppress(OSError):
                os.close(pending.fd)
            with self._in_flight_lock:
                if self._in_flight.get(slot.sop) is slot:
                    del self._in_flight[slot.sop]
            slot.finished.set()
        return slot.status, slot.outcome

    def _flush(self, s: _Slot) -> None:
        try:
            os.fsync(s.pending.fd)
            s.flushed = True
        except OSError as exc:
            s.status, s.outcome = _cannot_write(exc)
            self._undo(s)

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
                existing = self._db.existing_paths([s.sop for s in batch])
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
        for s in placed:
            try:
                if s.placed_new and not self.files.place_new(s.pending.tmp, s.pending.path):
                    # The name is taken though no row had it: never replaced blindly, since that file may be
                    # another listener process's instance in flight, which would be lost if this one failed.
                    s.placed_new = False
                    if self.files.being_written(s.pending.path):
                        s.held_elsewhere = True
                        with self._in_flight_lock:
                            del self._in_flight[s.sop]
                        continue
                    # nobody is storing it: left by a crash before its row (never acknowledged) or indexed
                    # since the lookup; replaced below as a whole durable file, like a resend's replace
                if not s.placed_new:  # replaces an existing file: its bytes must be durable first
                    os.fsync(s.pending.fd)
                    s.flushed = True
                    self.files.place(s.pending.tmp, s.pending.path)
            except OSError as exc:
                s.status, s.outcome = _cannot_write(exc)
                s.placed_new = False
                self.files.remove(s.pending.tmp)

    def _index_batch(self, batch: list[_Slot]) -> None:
        try:
            self.files.sync_dirs({os.path.dirname(s.pending.path) for s in batch})
        except OSError as exc:
            for s in batch:
                s.status, s.outcome = _cannot_write(exc)
                self._undo(s)
            return
        try:
            outcomes = self._db.record(
                [s.pending.instance for s in batch],
                late_arrivals=self.settings.late_arrivals,
                reopen_classes=self.settings.reopen_classes,
            )
        except SQLAlchemyError as exc:
            log_event(log, "index_failed", logging.WARNING, instances=len(batch), error=type(exc).__name__)
            for s in batch:
                s.status, s.outcome = OUT_OF_RESOURCES_DB, f"cannot index: {type(exc).__name__}"
                self._undo(s)
            return
        for s, outcome in zip(batch, outcomes, strict=True):
            s.status, s.outcome = SUCCESS, outcome
