"""Peak memory of the node while it receives a ~2 GB study: it must stay flat (data is streamed to disk).

The study is 16 multi-frame instances of 256 frames of 512x512 int16 (128 MiB each, 2 GiB in all),
generated once into the cache under /tmp. `dicom-node serve` (no models, no routes) receives it from DCMTK
storescu on one association and then on 4 in parallel. RSS of the node's process tree is sampled from
/proc every 20 ms; the kernel's own high-water mark (VmHWM) catches what falls between samples.

    .venv/bin/python bench/bench_memory.py [--instances 16] [--frames 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import NodePeer, cached_multiframe_study, send, workdir


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


class RssSampler:
    """Peak of the summed RSS of a set of processes, sampled in a background thread."""

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        self.pids = pids
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current_kib(self) -> int:
        return sum(_status_kib(p, "VmRSS") for p in self.pids)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, self.current_kib())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def hwm_kib(self) -> int:
        return sum(_status_kib(p, "VmHWM") for p in self.pids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--frames", type=int, default=256)
    args = ap.parse_args()
    study = cached_multiframe_study(f"mf-{args.instances}x{args.frames}", args.instances, args.frames, 512)
    gib = study.bytes / (1 << 30)
    largest = max(p.stat().st_size for p in study.paths) / (1 << 20)
    print(
        f"# memory while receiving {len(study.paths)} instances, {gib:.2f} GiB (largest {largest:.0f} MiB); "
        f"load={os.getloadavg()[0]:.1f}"
    )
    header = f"{'assoc':>5} {'idle RSS MiB':>13} {'peak RSS MiB':>13} {'VmHWM MiB':>10} {'MB/s':>7} {'stored':>7}"
    print(header)
    print("-" * len(header))
    for n in (1, 4):
        with workdir("bench-mem-") as work:
            node = NodePeer(work).start()
            try:
                pids = node.pids()
                sampler = RssSampler(pids)
                idle = sampler.current_kib()
                with sampler:
                    start = time.perf_counter()
                    send(node, study.paths, n)
                    elapsed = time.perf_counter() - start
                hwm = sampler.hwm_kib()
                stored = node.count()
            finally:
                node.stop()
        print(
            f"{n:>5} {idle / 1024:>13.0f} {sampler.peak_kib / 1024:>13.0f} {hwm / 1024:>10.0f} "
            f"{study.bytes / elapsed / 1e6:>7.0f} {stored:>7}",
            flush=True,
        )
        if stored != len(study.paths):
            raise RuntimeError(f"the node stored {stored} of {len(study.paths)} instances")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
