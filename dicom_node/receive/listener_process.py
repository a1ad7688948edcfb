"""One of the node's listener processes: receives on a listening socket shared with its siblings.

Started by ``listener_pool.ListenerPool`` (``dicom-node serve`` with ``node.listener_processes`` above 1),
never by hand: the parent passes the socket and the association-count table as inherited descriptors and
the parsed config on stdin. Everything a listener needs is in ``storage`` and the receive modules, so this
process never imports torch. It dies with its parent (PR_SET_PDEATHSIG), so a killed node leaves no
process holding the port; unacknowledged instances are dropped as with any abort.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from dicom_node.config import Config
from dicom_node.logs import configure_logging, log_event
from dicom_node.receive.listener import start_listener
from dicom_node.receive.shared_counts import SharedCounts
from dicom_node.runtime import open_runtime

log = logging.getLogger("dicom_node.listener")
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Be killed when the parent exits, however it exits; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dicom_node.receive.listener_process")
    ap.add_argument("--listen-fd", type=int, required=True)
    ap.add_argument("--counts-fd", type=int, required=True)
    ap.add_argument("--slots", type=int, required=True)
    ap.add_argument("--slot", type=int, required=True)
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--ready-fd", type=int, required=True)
    args = ap.parse_args(argv)
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us
    cfg = pickle.load(sys.stdin.buffer)  # from the parent process, over a pipe
    if not isinstance(cfg, Config):
        raise SystemExit("expected the node's Config on stdin")
    configure_logging(cfg.logging.level, cfg.logging.format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sock = socket.socket(fileno=args.listen_fd)
    counts = SharedCounts(args.counts_fd, args.slots, args.slot)
    rt = open_runtime(cfg)
    _, server = start_listener(cfg, rt.files, rt.jobs, sock=sock, counts=counts)
    with contextlib.suppress(OSError):  # a restarted process has nobody waiting for it: EPIPE
        os.write(args.ready_fd, b"r")  # the pool makes the socket listen once every process has said so
    os.close(args.ready_fd)
    while not stop.wait(1.0):
        pass
    server.shutdown()
    counts.publish(0, 0)
    counts.close()
    rt.jobs.engine.dispose()
    log_event(log, "listener_stopped", pid=os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
