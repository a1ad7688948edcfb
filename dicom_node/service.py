"""`dicom-node serve`: listener, assembler, worker, sender and housekeeping in one process, stopped cleanly by a
signal. Housekeeping (retention, watermarks, database compaction) runs every ``retention.interval_seconds``;
at start it first finishes purges a crash cut short.

On SIGTERM or Ctrl-C the listener stops accepting, the worker gets ``shutdown_grace_seconds`` to finish
its job and otherwise gives its lease back, and in-flight deliveries are released, so a restart finds no
job left "running" by this process.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from dicom_node import __version__
from dicom_node.audit import AuditLog
from dicom_node.config import Config, ConfigError
from dicom_node.delivery.sender import Sender
from dicom_node.housekeeping import Housekeeper
from dicom_node.jobs.assembly import Assembler
from dicom_node.jobs.model_cache import ModelCache
from dicom_node.jobs.worker import Worker
from dicom_node.logs import log_event
from dicom_node.receive.listener import start_listener
from dicom_node.receive.listener_pool import ListenerPool, listener_count
from dicom_node.receive.server import ReceiveServer
from dicom_node.results.equipment import NodeIdentity
from dicom_node.runtime import open_runtime
from storage.retention import RetentionStore

if TYPE_CHECKING:
    from dicom_node.web.server import WebServer

log = logging.getLogger("dicom_node.service")
SHUTDOWN_GRACE_SECONDS = 20.0


def node_identity(cfg: Config) -> NodeIdentity:
    return NodeIdentity(
        software_version=__version__,
        device_serial_number=socket.gethostname()[:64] or "unknown",
        institution_name=cfg.results.institution_name,
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _loop(
    name: str,
    step: Callable[[], object],
    poll: float,
    stop: threading.Event,
    wake: threading.Event,
    first: Callable[[], object] | None = None,
) -> None:
    """Run ``step`` until stopped; when it found nothing to do, wait ``poll`` or until woken. ``first`` runs
    once before, in this thread (the worker's model loading: the listeners already receive meanwhile)."""
    if first is not None:
        first()
    while not stop.is_set():
        try:
            busy = step()
        except Exception:  # one bad iteration must not kill the loop; the job store keeps the state
            log.exception(f"{name}_loop_error")
            busy = False
        if not busy:
            wake.wait(poll)
            wake.clear()


def _then_wake(step: Callable[[], object], other: threading.Event) -> Callable[[], object]:
    """``step``, waking the next loop when it did something: a job queued by the assembler, or deliveries
    recorded by the worker, are picked up at once, not at the next poll (the job store stays the channel)."""

    def run() -> object:
        did = step()
        if did:
            other.set()
        return did

    return run


class Node:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rt = open_runtime(cfg)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stop = threading.Event()
        self.worker_stop = threading.Event()
        self.models = ModelCache(cfg)
        self.assembler = Assembler(cfg, self.rt.files, self.rt.jobs)
        self.worker = Worker(cfg, self.rt.files, self.rt.jobs, self.models, node_identity(cfg), self.owner)
        self.audit = AuditLog.from_config(cfg)
        self.sender = Sender(cfg, self.rt.files, self.rt.jobs, self.owner, audit=self.audit)
        self.housekeeper = Housekeeper(cfg, self.rt.files, RetentionStore(self.rt.jobs.engine, self.rt.files))
        self.server: ReceiveServer | None = None
        self.pool: ListenerPool | None = None
        self.threads: list[threading.Thread] = []
        self.wakes: list[threading.Event] = []
        self.web: WebServer | None = None

    def start(self) -> None:
        removed = self.rt.files.clean_temp_files()
        if removed:
            log_event(log, "temp_files_removed", count=removed)
        jobs, deliveries = self.rt.jobs.recover_dead_owners(socket.gethostname(), _pid_alive)
        if jobs or deliveries:
            log_event(log, "leases_recovered", jobs=jobs, deliveries=deliveries)
        self.housekeeper.start_up()
        if self.cfg.http.enabled:  # first: a busy HTTP port or a missing token stops the start before anything runs
            from dicom_node.web.server import WebServer

            self.web = WebServer(self.cfg, self.rt, self.audit, self.web_state).start()
        processes = listener_count(self.cfg)
        try:
            if processes > 1:
                self.pool = ListenerPool(self.cfg, processes).start()
            else:
                _, self.server = start_listener(self.cfg, self.rt.files, self.rt.jobs)
        except OSError as exc:  # binding the port: in use (another node?), or a bind address not of this host
            n = self.cfg.node
            raise ConfigError(f"node.port: cannot listen on {n.bind}:{n.port}: {exc.strerror or exc}") from exc
        c = self.cfg
        wake = {name: threading.Event() for name in ("assembler", "worker", "sender", "housekeeping")}
        self.wakes = list(wake.values())
        for name, step, poll, stop in (
            ("assembler", _then_wake(self.assembler.run_once, wake["worker"]), c.completion.poll_seconds, self.stop),
            ("worker", _then_wake(self.worker.run_once, wake["sender"]), c.worker.poll_seconds, self.worker_stop),
            ("sender", self.sender.run_once, c.sender.poll_seconds, self.stop),
            ("housekeeping", self.housekeeper.run_once, c.retention.interval_seconds, self.stop),
        ):
            first = self.models.preload if name == "worker" and c.worker.preload_models and c.models else None
            t = threading.Thread(target=_loop, args=(name, step, poll, stop, wake[name], first), name=name, daemon=True)
            t.start()
            self.threads.append(t)
        log_event(
            log,
            "node_started",
            owner=self.owner,
            database=self.rt.jobs.engine.dialect.name,
            models=",".join(m.name for m in c.models),
            routes=",".join(r.name for r in c.routes),
        )

    def web_state(self) -> dict[str, object]:
        """What the web server reports of the running node: listener processes, loops, open associations."""
        if self.pool is not None:
            pids = [p.pid for p in self.pool.procs if p is not None and p.poll() is None]
            expected, assocs = self.pool.n, self.pool.counts.total() if self.pool.counts else 0
        else:
            pids = [os.getpid()] if self.server is not None else []
            expected, assocs = 1, self.server.active_associations() if self.server else 0
        return {
            "listeners_alive": len(pids),
            "listeners_expected": expected,
            "listener_pids": pids,
            "associations_open": assocs,
            "loops": {t.name: t.is_alive() for t in self.threads},
        }

    def shutdown(self) -> None:
        log_event(log, "node_stopping")
        if self.web is not None:
            self.web.stop()
        if self.pool is not None:
            self.pool.shutdown()
        if self.server is not None:
            self.server.shutdown()
        self.stop.set()
        self.worker_stop.set()
        for w in self.wakes:
            w.set()
        for t in self.threads:
            t.join(timeout=SHUTDOWN_GRACE_SECONDS if t.name == "worker" else 5)
        if not any(t.name == "worker" and t.is_alive() for t in self.threads):
            self.worker.close()  # else the job still running may yet write a result; the process is ending anyway
        job = self.worker.current_job
        if job is not None and self.rt.jobs.release_job(job, self.owner):
            log_event(log, "job_lease_released", job_id=job)
        released = self.rt.jobs.release_deliveries(self.owner)
        if released:
            log_event(log, "deliveries_released", count=released)
        self.rt.jobs.engine.dispose()
        log_event(log, "node_stopped")


def serve(cfg: Config) -> int:
    node = Node(cfg)
    stopping = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log_event(log, "signal_received", signal=signal.Signals(signum).name)
        stopping.set()

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        node.start()
    except BaseException:  # e.g. the port is taken: the caller reports it; leave the process as it was
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        raise
    while not stopping.wait(1.0):
        pass
    node.shutdown()
    return 0
