"""Several listener processes on one port, supervised by ``dicom-node serve``.

The receive path is Python: one process spends its per-instance work under one interpreter lock, so with
parallel senders a single process caps the node at one core. The pool binds the port itself (so a busy
port fails the start at once), then starts ``node.listener_processes`` children that all accept on that
socket. Each blocks in accept(), and Linux hands a new connection to the process that has waited longest,
so the children take turns. A child that exits unexpectedly is logged and started again (with a growing
pause if it keeps failing); on shutdown each gets SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from dicom_node.config import Config
from dicom_node.logs import log_event
from dicom_node.receive.server import LISTEN_BACKLOG, bind_listener
from dicom_node.receive.shared_counts import SharedCounts

log = logging.getLogger("dicom_node.listener")
MAX_AUTO_PROCESSES = 4
BIND_RETRY_SECONDS = 5.0  # a just-killed node's children may hold the port for a moment
STOP_GRACE_SECONDS = 15.0
RESTART_PAUSE_MAX = 30.0
READY_TIMEOUT_SECONDS = 60.0


def listener_count(cfg: Config) -> int:
    """How many listener processes ``node.listener_processes`` asks for (0: one per CPU core, at most 4).
    Sharing relies on Linux (memfd, PR_SET_PDEATHSIG); elsewhere the node receives in its main process."""
    if sys.platform != "linux" or not hasattr(os, "memfd_create"):
        return 1
    n = cfg.node.listener_processes
    return n if n > 0 else max(1, min(os.cpu_count() or 1, MAX_AUTO_PROCESSES))


def bind_with_retry(address: tuple[str, int], patience: float = BIND_RETRY_SECONDS) -> socket.socket:
    """Bound, not yet listening: connections are refused until every listener process is ready."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return bind_listener(address, listen=False)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


class ListenerPool:
    def __init__(self, cfg: Config, processes: int) -> None:
        self.cfg = cfg
        self.n = processes
        self.sock: socket.socket | None = None
        self.counts: SharedCounts | None = None
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * processes
        self._started_at = [0.0] * processes
        self._failures = [0] * processes
        self._ready_w = -1
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="listener-pool", daemon=True)

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    def start(self) -> ListenerPool:
        self.sock = bind_with_retry((self.cfg.node.bind, self.cfg.node.port))
        self.counts = SharedCounts.create(self.n)
        ready_r, self._ready_w = os.pipe()
        try:
            for slot in range(self.n):
                self._spawn(slot)
            ready = self._wait_ready(ready_r)
        finally:
            os.close(ready_r)
        self.sock.listen(LISTEN_BACKLOG)  # the children's accept loops start once the socket listens
        self._monitor.start()
        if ready < self.n:
            log_event(log, "listener_processes_not_ready", logging.WARNING, ready=ready, expected=self.n)
        log_event(
            log,
            "listener_pool_started",
            processes=self.n,
            port=self.port,
            pids=",".join(str(p.pid) for p in self.procs if p is not None),
        )
        return self

    def _wait_ready(self, ready_r: int, timeout: float = READY_TIMEOUT_SECONDS) -> int:
        """Count the children's ready bytes until all arrived, all died, or ``timeout``."""
        deadline, ready = time.monotonic() + timeout, 0
        while ready < self.n and time.monotonic() < deadline:
            if all(p is not None and p.poll() is not None for p in self.procs):
                break
            readable, _, _ = select.select([ready_r], [], [], 0.2)
            if readable:
                ready += len(os.read(ready_r, self.n))
        return ready

    def _spawn(self, slot: int) -> subprocess.Popen[bytes]:
        assert self.sock is not None and self.counts is not None
        cmd = [
            sys.executable,
            "-m",
            "dicom_node.receive.listener_process",
            "--listen-fd",
            str(self.sock.fileno()),
            "--counts-fd",
            str(self.counts.fd),
            "--slots",
            str(self.n),
            "--slot",
            str(slot),
            "--parent",
            str(os.getpid()),
            "--ready-fd",
            str(self._ready_w),
        ]
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, pass_fds=(self.sock.fileno(), self.counts.fd, self._ready_w)
        )
        assert proc.stdin is not None
        try:
            proc.stdin.write(pickle.dumps(self.cfg))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; the monitor sees the exit and logs it
        self.procs[slot] = proc
        self._started_at[slot] = time.monotonic()
        return proc

    def _watch(self) -> None:
        """Notice exits and restart each slot when its own pause is over: one child waiting out a long pause
        does not hold up the restart of another."""
        due: dict[int, float] = {}  # slot -> when to start it again
        while not self._stop.wait(min([0.5, *(max(0.0, t - time.monotonic()) for t in due.values())])):
            for slot, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                assert self.counts is not None
                self.counts.clear(slot)
                ran = time.monotonic() - self._started_at[slot]
                self._failures[slot] = self._failures[slot] + 1 if ran < 10 else 1
                pause = min(RESTART_PAUSE_MAX, 0.5 * 2 ** (self._failures[slot] - 1))
                log_event(
                    log,
                    "listener_process_exited",
                    logging.ERROR,
                    pid=proc.pid,
                    returncode=proc.returncode,
                    slot=slot,
                    restart_in=f"{pause:.1f}s",
                )
                self.procs[slot] = None
                due[slot] = time.monotonic() + pause
            for slot, when in sorted(due.items()):
                if when <= time.monotonic() and not self._stop.is_set():
                    del due[slot]
                    proc = self._spawn(slot)
                    log_event(log, "listener_process_restarted", slot=slot, pid=proc.pid)

    def shutdown(self) -> None:
        """SIGTERM every child (each aborts its open associations), wait, then SIGKILL stragglers."""
        self._stop.set()
        if self._monitor.is_alive():
            self._monitor.join(5)
        live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        with contextlib.suppress(OSError):
            os.close(self._ready_w)
        if self.counts is not None:
            self.counts.close()
