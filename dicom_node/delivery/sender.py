"""The sender: deliver recorded results to their destinations, with retries and backoff.

A delivery is done only on a success or warning status from the peer. A down or busy peer (no association,
abort, timeout, 0xA7xx) is retried with exponential backoff up to ``sender.max_attempts``; a refusal that
retrying cannot fix (0xA9xx, 0xCxxx) fails the delivery at once with its status. Nothing is re-inferred.

An IOCM rejection note is optional for the destination: one it refuses (no presentation context for Key Object
Selection, a failure status) or never takes after the retries is logged (``rejection_note_not_accepted``) and
recorded as "refused", which is not a failed result: the results it follows were delivered.
"""

from __future__ import annotations

import logging
import time

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.delivery.scu import Outcome, Peer, send_files
from dicom_node.logs import log_event
from storage.files import FileStore
from storage.jobstore import REJECTION_KIND, JobStore
from storage.records import DeliveryRecord

log = logging.getLogger("dicom_node.sender")


def backoff(attempt: int, base: float, cap: float) -> float:
    return min(cap, base * (2 ** max(0, attempt - 1)))


def destination_peer(cfg: Config, destination: str) -> Peer:
    """A configured destination (by name) with the sender's timeouts."""
    d = cfg.destination(destination)
    s = cfg.sender
    return Peer(
        ae_title=d.ae_title,
        host=d.host,
        port=d.port,
        calling_ae_title=d.calling_ae_title or cfg.node.ae_title,
        acse_timeout=s.acse_timeout,
        dimse_timeout=s.dimse_timeout,
        network_timeout=s.network_timeout,
    )


class Sender:
    def __init__(
        self, cfg: Config, files: FileStore, jobs: JobStore, owner: str, audit: AuditLog | None = None
    ) -> None:
        self.audit = audit  # one record per result sent (done, retry or failed)
        self.cfg = cfg
        self.files = files
        self.jobs = jobs
        self.owner = owner

    def run_once(self) -> bool:
        """Send one batch (one destination, one association); False when nothing was due."""
        s = self.cfg.sender
        lease = s.acse_timeout + s.network_timeout + 32 * s.dimse_timeout
        batch = self.jobs.claim_deliveries(self.owner, lease)
        if not batch:
            return False
        dest = batch[0].destination
        try:
            peer = destination_peer(self.cfg, dest)
        except StopIteration:
            for d in batch:
                self._record(d, Outcome.PERMANENT, "", f"destination {dest!r} is no longer configured")
            return True
        paths = [self.files.absolute(d.result.path) for d in batch]
        started = time.perf_counter()
        try:
            results = send_files(peer, paths)
        except (OSError, ValueError) as exc:
            for d in batch:
                self._record(d, Outcome.RETRYABLE, "", f"{type(exc).__name__}: {exc}")
            return True
        metrics.SEND_SECONDS.labels(dest).observe(time.perf_counter() - started)
        for d, r in zip(batch, results, strict=True):
            self._record(d, r.outcome, r.status, r.detail)
        return True

    def _record(self, d: DeliveryRecord, outcome: Outcome, status: str, detail: str) -> None:
        s = self.cfg.sender
        fields = dict(
            study_uid=d.result.study_uid,
            job_id=d.job_id,
            delivery_id=d.id,
            destination=d.destination,
            kind=d.result.kind,
            sop_instance_uid=d.result.sop_instance_uid,
            attempt=d.attempts,
            status=status or None,
            detail=detail or None,
        )
        if outcome in (Outcome.SUCCESS, Outcome.WARNING):
            state = "done"
            self.jobs.delivery_outcome(d.id, self.owner, state="done", status=status, error=detail)
            log_event(log, "result_delivered", **fields)
        elif outcome is Outcome.RETRYABLE and d.attempts < s.max_attempts:
            state = "retry"
            wait = backoff(d.attempts, s.backoff_seconds, s.backoff_max_seconds)
            self.jobs.delivery_outcome(
                d.id, self.owner, state="pending", status=status, error=detail, not_before=time.time() + wait
            )
            log_event(log, "delivery_retry_scheduled", logging.WARNING, retry_in_s=round(wait, 1), **fields)
            metrics.RETRIES.labels("delivery").inc()
        elif d.result.kind == REJECTION_KIND:
            state = "refused"
            self.jobs.delivery_outcome(d.id, self.owner, state="refused", status=status, error=detail)
            log_event(
                log,
                "rejection_note_not_accepted",
                logging.WARNING,
                outcome=outcome.value,
                note="the destination keeps showing the superseded results next to the new ones",
                **fields,
            )
        else:
            state = "failed"
            self.jobs.delivery_outcome(d.id, self.owner, state="failed", status=status, error=detail)
            log_event(log, "delivery_failed", logging.ERROR, outcome=outcome.value, **fields)
        metrics.DELIVERIES.labels(d.destination, state).inc()
        if self.audit is not None:
            self.audit.record("result_sent", outcome=state, **fields, model=d.result.model or None)
