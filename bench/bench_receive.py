"""Receive throughput: the node against DCMTK storescp and Orthanc, with DCMTK storescu as the sender.

Two studies (300 CT slices of 512x512 and 2000 of 128x128, generated once into a cache under /tmp) are
sent on one association and on 4 in parallel (the files split over 4 storescu processes) to:
  storescp   DCMTK, writing each object to a file (no fsync), --fork for the parallel case;
  storescp +fsync   the same with bench/fsync_on_close.c preloaded (built with cc into the cache; the row
             is left out without a compiler): each file and its folder fsynced before the response, as
             the node does; it still keeps no index;
  Orthanc    Debian's package, SQLite index, its own temp storage;
  dicom-node `dicom-node serve` with its defaults (one listener process per CPU core, at most 4), no models or routes:
             each instance renamed into place and fsynced, its folder fsynced and its row committed (SQLite
             WAL, synchronous FULL) before Success is answered;
  flush floor   no receiver: the file-system steps alone that answering only once an instance is durable
             takes (see measure_flush_floor), in 1 or 4 threads;
  C durable ceiling   with --native-ceiling: bench/durable_ceiling.c (built with cc into the cache), the
             least a receiver keeping the node's durability rule does, written in C: a measuring stick for
             what a native receive path could reach, not a receiver to deploy (it checks nothing).
Each receiver is started fresh for each measurement, in a folder of its own, and the count of stored
instances checked afterwards; the folders are removed only when the run ends (see common.workdir:
on ext4 without a journal, deleting the previous receiver's files would slow the next one's);
with --repeats the receivers are interleaved and medians reported (the machine's load moves a lot here).
The `fsync ms` column is the disk's median write+fsync time probed just before the cell: the node waits for
three flushes in a row per instance (file, folder, index), storescp +fsync for two, storescp for none.
`busy %` is the machine's CPU use while sending, `rcv CPU ms` the CPU per instance of everything but the
senders (see common.CpuUse).
Time is storescu's wall time (including its own file reading, the same for every peer). The run happens
in a private network namespace (Orthanc listens on all interfaces), so nothing leaves loopback.

    .venv/bin/python bench/bench_receive.py [--quick] [--repeats N] [--no-orthanc] [--flush-diagnostic]
                                            [--single-process-row] [--postgres-row] [--native-ceiling]

--single-process-row adds the node with node.listener_processes = 1 (receiving in its main process), to
show what the extra listener processes bring. --postgres-row adds the node with its job store on
PostgreSQL (node.database_url; a throwaway server of Debian's package on a Unix socket, see
tests/postgres.py), as sites run it when several machines share the work.
--flush-diagnostic adds rows for the node's listener run in this process with fsync made a no-op and
SQLite synchronous=OFF: not a mode of the product (it would acknowledge instances a power cut can lose),
only a way to show how much of the node's time is the disk's flushes rather than its own work.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH_TMP,
    ORTHANC,
    CeilingPeer,
    CpuUse,
    NodePeer,
    OrthancPeer,
    Peer,
    StoreSCPPeer,
    Study,
    cached_ct_study,
    describe_file_system,
    durable_ceiling,
    flush_latency_ms,
    fsync_shim,
    in_private_netns,
    reexec_in_netns,
    send,
    workdir,
)


def measure(make: Callable[[Path], Peer], study: Study, associations: int) -> tuple[str, float, CpuUse]:
    """(receiver name, instances/s, CPU used while sending) of one run against a freshly started receiver."""
    with workdir("bench-recv-", keep_until_exit=KEEP_FILES) as work:
        peer = make(work).start()
        try:
            with CpuUse() as cpu:  # its wall time is storescu's, start to exit
                send(peer, study.paths, associations)
            stored = peer.count()
        finally:
            peer.stop()
    if stored != len(study.paths):
        raise RuntimeError(f"{peer.name} stored {stored} of {len(study.paths)} instances")
    return peer.name, len(study.paths) / cpu.wall, cpu


KEEP_FILES = True  # receivers' files stay until the run ends (see common.workdir); main() turns it off when short


NO_FLUSH = "node, no flush*"
SINGLE = "node, 1 listener"
FLOOR = "flush floor\u2020"
CEILING = CeilingPeer.name
POSTGRES = "node, PostgreSQL"


def _postgres_server():  # type: ignore[no-untyped-def]
    """The tests' throwaway PostgreSQL server (tests/postgres.py), stopped when the run ends."""
    import atexit

    from tests.postgres import PostgresServer

    server = PostgresServer().start()
    atexit.register(server.stop)
    return server


INDEX_PAGE = 4096


def measure_flush_floor(study: Study, threads: int) -> tuple[float, CpuUse]:
    """The least any receiver that answers only once an instance is durable must do, with nothing else: per
    instance, in ``threads`` threads, write the file's bytes (read into memory beforehand) to a new temp
    file, rename it into a study/series folder, fsync the file and the folder, then write one 4 KiB index
    page and fdatasync it. No network, no parsing, no database, no batching."""
    import threading

    blobs = [p.read_bytes() for p in study.paths]
    with workdir("bench-floor-", keep_until_exit=KEEP_FILES) as work:
        folder = work / "incoming" / "study" / "series"
        folder.mkdir(parents=True)
        index = os.open(work / "index", os.O_RDWR | os.O_CREAT, 0o600)
        os.pwrite(index, b"\0" * INDEX_PAGE * threads, 0)
        os.fsync(index)
        page = b"i" * INDEX_PAGE
        errors: list[BaseException] = []

        def run(k: int) -> None:
            try:
                dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    for i in range(k, len(blobs), threads):
                        tmp = work / "incoming" / f".tmp-{k}-{i}"
                        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                        try:
                            os.write(fd, blobs[i])
                            os.rename(tmp, folder / f"{i}.dcm")
                            os.fsync(fd)
                        finally:
                            os.close(fd)
                        os.fsync(dir_fd)
                        os.pwrite(index, page, INDEX_PAGE * k)
                        os.fdatasync(index)
                finally:
                    os.close(dir_fd)
            except BaseException as exc:  # reported below: a floor that failed is no floor
                errors.append(exc)

        workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
        with CpuUse() as cpu:
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        os.close(index)
    if errors:
        raise errors[0]
    return len(blobs) / cpu.wall, cpu


def measure_without_flushes(study: Study, associations: int) -> tuple[float, CpuUse]:
    """Diagnostic only: the listener in this process, every fsync a no-op, SQLite synchronous=OFF."""
    from unittest import mock

    from dicom_node.config import parse_config
    from dicom_node.receive.listener import start_listener
    from dicom_node.runtime import open_runtime

    with (
        workdir("bench-noflush-", keep_until_exit=KEEP_FILES) as work,
        mock.patch("os.fsync"),
        mock.patch("storage.files._fsync_dir"),
    ):
        cfg = parse_config(
            {
                "node": {
                    "port": 0,
                    "bind": "127.0.0.1",
                    "data_dir": str(work / "var"),
                    "min_free_mb": 0,
                    "sqlite_synchronous": "OFF",
                }
            },
            work,
        )
        rt = open_runtime(cfg)
        ae, server = start_listener(cfg, rt.files, rt.jobs)
        try:
            peer = Peer()
            peer.ae_title, peer.port = cfg.node.ae_title, server.server_address[1]
            with CpuUse() as cpu:
                send(peer, study.paths, associations)
            stored = len(rt.jobs.all_instances())
        finally:
            server.shutdown()
            ae.shutdown()
            rt.jobs.engine.dispose()
    if stored != len(study.paths):
        raise RuntimeError(f"stored {stored} of {len(study.paths)} instances")
    return len(study.paths) / cpu.wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller studies (100 x 512^2, 500 x 128^2)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell; the median is reported")
    ap.add_argument("--no-orthanc", action="store_true")
    ap.add_argument("--flush-diagnostic", action="store_true", help="add rows for the node without flushes")
    ap.add_argument("--single-process-row", action="store_true", help="add the node with node.listener_processes = 1")
    ap.add_argument(
        "--postgres-row",
        action="store_true",
        help="add the node with its job store on PostgreSQL (a throwaway local server, Unix socket)",
    )
    ap.add_argument(
        "--native-ceiling",
        action="store_true",
        help="add bench/durable_ceiling.c: a minimal durable receiver in C, as a bound",
    )
    args = ap.parse_args()
    want_orthanc = not args.no_orthanc and Path(ORTHANC).exists()
    if want_orthanc:
        reexec_in_netns()  # returns only where a namespace cannot be made
        if not in_private_netns():
            want_orthanc = False

    big = cached_ct_study("ct-300x512", 300, 512, seed=11)
    small = cached_ct_study("ct-2000x128", 2000, 128, seed=12)
    if args.quick:
        big, small = Study(big.name + "-quick", big.paths[:100]), Study(small.name + "-quick", small.paths[:500])

    durable_storescp = fsync_shim() is not None
    ceiling = args.native_ceiling and durable_ceiling() is not None
    # storescp, the node and the floor, then the optional rows
    receivers = (
        3
        + durable_storescp
        + bool(want_orthanc)
        + args.single_process_row
        + args.flush_diagnostic
        + ceiling
        + args.postgres_row
    )
    postgres = _postgres_server() if args.postgres_row else None
    needed = 2 * args.repeats * receivers * (big.bytes + small.bytes)  # 1 and 4 associations per study
    global KEEP_FILES
    KEEP_FILES = shutil.disk_usage(BENCH_TMP).free > needed + (2 << 30)
    if not KEEP_FILES:
        print(
            f"# {BENCH_TMP} has less than {needed / 2**30:.1f} GiB + 2 GiB free: each receiver's files are "
            "removed right after its run, which on ext4 without a journal slows the next one",
            flush=True,
        )
    print(
        f"# receive benchmark  cpus={os.cpu_count()}  load={os.getloadavg()[0]:.1f}  "
        f"fsync={flush_latency_ms():.2f} ms  fs={describe_file_system()}  "
        f"netns={'private' if in_private_netns() else 'host'}",
        flush=True,
    )
    header = (
        f"{'study':<24} {'assoc':>5} {'receiver':<22} {'inst/s':>8} {'MB/s':>7} {'node/peer':>10} "
        f"{'fsync ms':>8} {'busy %':>6} {'rcv CPU ms':>10}"
    )
    print(header)
    print("-" * len(header))
    started = time.monotonic()
    for study in (big, small):
        per_mb = study.bytes / 1e6 / len(study.paths)
        label = f"{study.name} ({len(study.paths)})"
        for n in (1, 4):
            makers: list[Callable[[Path], Peer]] = [lambda w, n=n: StoreSCPPeer(w, fork=n > 1)]
            if durable_storescp:
                makers.append(lambda w, n=n: StoreSCPPeer(w, fork=n > 1, durable=True))
            if want_orthanc:
                makers.append(OrthancPeer)
            makers.append(NodePeer)
            if postgres is not None:
                makers.append(lambda w, pg=postgres: NodePeer(w, name=POSTGRES, database_url=pg.new_database()))
            if ceiling:
                makers.append(CeilingPeer)
            if args.single_process_row:
                makers.append(lambda w: NodePeer(w, extra_node="listener_processes = 1", name=SINGLE))
            rates: dict[str, list[float]] = {}
            cpus: dict[str, list[CpuUse]] = {}
            flush = []
            for _ in range(args.repeats):  # receivers interleaved, so a change in the machine's load hits all
                flush.append(flush_latency_ms(20))
                results = [measure(make, study, n) for make in makers]
                if args.flush_diagnostic:
                    results.append((NO_FLUSH, *measure_without_flushes(study, n)))
                results.append((FLOOR, *measure_flush_floor(study, n)))
                for name, rate, cpu in results:
                    rates.setdefault(name, []).append(rate)
                    cpus.setdefault(name, []).append(cpu)
            median = {name: statistics.median(r) for name, r in rates.items()}
            node = median["dicom-node"]
            for name, rate in median.items():
                ratio = f"{node / rate:>9.2f}x" if name not in ("dicom-node", NO_FLUSH, SINGLE, POSTGRES) else ""
                busy = statistics.median(c.busy_percent() for c in cpus[name])
                rcv_ms = statistics.median(c.receiver_ms(len(study.paths)) for c in cpus[name])
                print(
                    f"{label:<24} {n:>5} {name:<22} {rate:>8.0f} {rate * per_mb:>7.1f} {ratio:>10} "
                    f"{statistics.median(flush):>8.2f} {busy:>6.0f} {rcv_ms:>10.3f}",
                    flush=True,
                )
            if CEILING in median:  # what a durable receiver in C reaches against the storescp goals
                plain = next(rate for name, rate in median.items() if name.startswith("storescp") and "+" not in name)
                print(f"{label:<24} {n:>5} {'  ceiling / storescp':<22} {median[CEILING] / plain:>26.2f}x")
    print(f"# {time.monotonic() - started:.0f} s, load={os.getloadavg()[0]:.1f}, fsync={flush_latency_ms():.2f} ms")
    print(
        f"# \u2020 {FLOOR[:-1]}: the file-system steps alone, no network, no parsing, no database (see "
        "measure_flush_floor); node/peer on its row is the node's rate against it."
    )
    print(
        f"# busy %: the machine's CPU use while sending, out of {100 * (os.cpu_count() or 1)}; rcv CPU ms: CPU time "
        "per instance of everything but the senders (the receiver, and the kernel's work for it)."
    )
    if ceiling:
        print(
            f"# {CEILING}: bench/durable_ceiling.c, the node's durability rule kept with the least work C allows "
            "and no checks at all: a bound for a native receive path, not a receiver to deploy."
        )
    if args.flush_diagnostic:
        print("# * diagnostic only: listener in-process with fsync a no-op and SQLite synchronous=OFF (not durable)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
