"""Shared benchmark plumbing: cached test studies, peers (DCMTK storescp, Orthanc, the node), timed sends.

Everything talks over loopback only. Orthanc 1.10 binds every interface, so the benchmarks run inside a
private network namespace (``unshare -n`` + ``ip link set lo up``) whenever Orthanc is part of the run:
``reexec_in_netns`` re-runs the benchmark script there, so Orthanc, storescp, the node and every storescu
share one namespace that reaches nothing outside.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import (  # noqa: E402  (the repo root goes on sys.path first)
    DCMTK_ENV,
    STORESCP,
    STORESCU,
    NodeProcess,
    await_listening,
    children,
    free_port,
    port_open,
    stored_instances,
    wait_for,
    write_config,
)

ORTHANC = "/usr/sbin/Orthanc"
CACHE = Path(os.environ.get("DICOM_NODE_BENCH_CACHE", "/tmp/dicom-node-bench-cache"))
NETNS_FLAG = "DICOM_NODE_BENCH_NETNS"


# ---- studies ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    name: str
    paths: tuple[Path, ...]

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


def cached_ct_study(name: str, slices: int, size: int, seed: int) -> Study:
    """A generated CT phantom series (one file per slice), written once under the cache dir."""
    out = CACHE / name
    done = out / ".complete"
    if not done.exists():
        from ai_models.phantom import generate_phantom
        from dicom_node.synth import StudyIds, phantom_datasets, write_datasets

        shutil.rmtree(out, ignore_errors=True)
        ph = generate_phantom(seed, shape=(slices, size, size), n_nodules=2)
        ids = StudyIds(
            study_uid=f"1.2.826.0.1.3680043.10.1234.88.{seed}", patient_id=f"BENCH{seed}", accession=f"ACC{seed}"
        )  # short UIDs: generated ones plus suffixes would pass 64 chars
        batch = 100  # keep at most this many datasets in memory
        for start in range(0, slices, batch):
            part = ph.__class__(
                hu=ph.hu[start : start + batch],
                labels=ph.labels[start : start + batch],
                spacing=ph.spacing,
                nodules=ph.nodules,
            )
            dss = phantom_datasets(
                part, ids, series_uid=_series_uid(ids.study_uid), origin=(-200.0, -200.0, start * ph.spacing[0])
            )
            for k, ds in enumerate(dss):  # unique SOP UIDs and numbers across batches
                ds.InstanceNumber = start + k + 1
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ds.SeriesInstanceUID}.{start + k + 1}"
            write_datasets(dss, out)
        done.write_text(str(slices))
    paths = tuple(sorted((p for p in out.iterdir() if p.suffix == ".dcm"), key=lambda p: int(p.stem.rsplit(".", 1)[1])))
    return Study(name, paths)


def _series_uid(study_uid: str) -> str:
    return f"{study_uid}.2"


def cached_multiframe_study(name: str, instances: int, frames: int, size: int) -> Study:
    """Large multi-frame 16-bit instances (Multi-frame Grayscale Word SC), for memory benchmarks."""
    from pydicom import uid as pduid
    from pydicom.dataset import Dataset, FileMetaDataset

    out = CACHE / name
    done = out / ".complete"
    if not done.exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        rng = np.random.default_rng(0)
        pixels = rng.integers(-1000, 1000, size=(frames, size, size), dtype=np.int16).tobytes()
        study = "1.2.826.0.1.3680043.10.1234.77.1"
        for i in range(instances):
            ds = Dataset()
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
            ds.SOPInstanceUID = f"{study}.2.{i + 1}"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.2"
            ds.PatientName, ds.PatientID, ds.Modality = "BENCH^MEMORY", "BM1", "OT"
            ds.InstanceNumber = i + 1
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows = ds.Columns = size
            ds.NumberOfFrames = frames
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = pixels
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = pduid.ExplicitVRLittleEndian
            ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        done.write_text(str(instances))
    return Study(name, tuple(sorted(p for p in out.iterdir() if p.suffix == ".dcm")))


# ---- network namespace --------------------------------------------------------------------------------


def in_private_netns() -> bool:
    return os.environ.get(NETNS_FLAG) == "1"


def reexec_in_netns() -> None:
    """Re-run this script in a private network namespace with only loopback up; returns only on failure."""
    if in_private_netns() or shutil.which("unshare") is None:
        return
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        print(
            "note: cannot create a network namespace (needs root or user namespaces); Orthanc is skipped",
            file=sys.stderr,
        )
        return
    argv = " ".join(_quote(a) for a in [sys.executable, *sys.argv])
    env = {**os.environ, NETNS_FLAG: "1"}
    os.execvpe("unshare", ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {argv}"], env)


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


# ---- peers --------------------------------------------------------------------------------------------


class Peer:
    """A receiver started for one measurement; ``count()`` tells how many instances it holds."""

    name = "peer"
    ae_title = "PEER"
    port = 0

    def start(self) -> Peer:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def pids(self) -> list[int]:
        return []


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


FSYNC_SHIM_SOURCE = Path(__file__).resolve().parent / "fsync_on_close.c"
CEILING_SOURCE = Path(__file__).resolve().parent / "durable_ceiling.c"


def _built(source: Path, out: Path, flags: Sequence[str], libs: Sequence[str]) -> Path | None:
    """``source`` compiled with ``flags`` and linked with ``libs`` into ``out`` in the cache, once (again when
    the source is newer);
    None without a C compiler or when it does not build (the reason printed)."""
    if out.exists() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    built = subprocess.run([cc, *flags, "-o", str(tmp), str(source), *libs], capture_output=True, text=True)
    if built.returncode != 0:
        print(f"# cannot build {source.name}: {built.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    tmp.replace(out)
    return out


def fsync_shim() -> Path | None:
    """``fsync_on_close.c`` built once into the cache (None without a C compiler): preloaded into storescp,
    it fsyncs each object's file and folder before storescp answers, as the node does."""
    return _built(FSYNC_SHIM_SOURCE, CACHE / "fsync_on_close.so", ["-shared", "-fPIC", "-O2"], ["-ldl"])


def durable_ceiling() -> Path | None:
    """``durable_ceiling.c`` built once into the cache (None without a C compiler or SQLite's headers)."""
    return _built(CEILING_SOURCE, CACHE / "durable_ceiling", ["-O2", "-pthread"], ["-lsqlite3"])


class CeilingPeer(Peer):
    """``durable_ceiling.c``: the least a durable receiver does, in C (a measuring stick, see its header)."""

    name = "C durable ceiling"

    def __init__(self, work: Path) -> None:
        self.ae_title = "CEILING"
        self.dir = work / "ceiling"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CeilingPeer:
        exe = durable_ceiling()
        if exe is None:
            raise RuntimeError("durable_ceiling.c could not be built")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(exe), str(self.port), str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        proc = self.proc
        await_listening(
            proc,
            self.port,
            10,
            "the ceiling's port",
            lambda: RuntimeError(f"durable_ceiling exited: {proc.stderr.read().decode()[-500:]}"),
        )
        return self

    def stop(self) -> None:
        _terminate(self.proc)

    def count(self) -> int:
        import sqlite3

        with contextlib.closing(sqlite3.connect(self.dir / "index.sqlite")) as db:
            rows = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
        stored = sorted(p for p in (self.dir / "store").iterdir() if p.suffix == ".dcm" and p.stem in rows)
        if stored:  # a stick that kept less than it was sent would measure nothing: read one back whole
            import pydicom

            ds = pydicom.dcmread(stored[-1])
            if ds.SOPInstanceUID != stored[-1].stem or len(ds.PixelData) != ds.Rows * ds.Columns * 2:
                raise RuntimeError(f"durable_ceiling stored a broken file: {stored[-1]}")
        return len(stored)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []


class StoreSCPPeer(Peer):
    """DCMTK storescp writing each object to a file; ``fork`` serves associations in parallel. ``durable``:
    with ``fsync_shim`` preloaded, so each file and its folder are flushed before the response (no fsync
    otherwise)."""

    def __init__(self, work: Path, fork: bool, durable: bool = False) -> None:
        self.name = ("storescp --fork" if fork else "storescp") + (" +fsync" if durable else "")
        self.ae_title = "STORESCP"
        self.fork = fork
        self.durable = durable
        self.out = work / "storescp"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCPPeer:
        self.out.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        args = [STORESCP, "-aet", self.ae_title, "-od", str(self.out), "-pm", "+xa", "-uf"]
        if self.fork:
            args.append("--fork")
        env = DCMTK_ENV
        if self.durable:
            shim = fsync_shim()
            if shim is None:
                raise RuntimeError("a durable storescp needs fsync_on_close.so, and it could not be built")
            env = {**DCMTK_ENV, "LD_PRELOAD": str(shim)}
        self.proc = subprocess.Popen(
            [*args, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        wait_for(lambda: port_open(self.port), 10, "storescp's port")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # storescp --fork leaves children in its group
            self.proc.wait(10)

    def count(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file())


class OrthancPeer(Peer):
    """Debian's Orthanc with its SQLite index and file storage in a temp dir, HTTP off, no plugins."""

    def __init__(self, work: Path) -> None:
        self.name = "Orthanc"
        self.ae_title = "ORTHANC"
        self.dir = work / "orthanc"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OrthancPeer:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cfg = {
            "Name": "bench",
            "StorageDirectory": str(self.dir / "storage"),
            "IndexDirectory": str(self.dir / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "HttpServerEnabled": False,
            "HttpPort": free_port(),
            "Plugins": [],
            "StorageCompression": False,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomThreadsCount": 4,
            "LogExportedResources": False,
        }
        (self.dir / "orthanc.json").write_text(json.dumps(cfg))
        self.log = open(self.dir / "orthanc.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [ORTHANC, str(self.dir / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        await_listening(
            self.proc,
            self.port,
            30,
            "Orthanc's DICOM port",
            lambda: RuntimeError(f"Orthanc exited: {(self.dir / 'orthanc.log').read_text()[-2000:]}"),
        )
        return self

    def stop(self) -> None:
        _terminate(self.proc)
        self.log.close()

    def count(self) -> int:
        return sum(1 for p in (self.dir / "storage").rglob("*") if p.is_file() and len(p.name) == 36)

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []


class NodePeer(Peer):
    """`dicom-node serve` with a temp config: no models and no routes, so only the listener does work.
    ``database_url``: its job store there instead of SQLite in its data folder."""

    def __init__(self, work: Path, extra_node: str = "", name: str = "dicom-node", database_url: str = "") -> None:
        self.name = name
        self.ae_title = "DICOM_NODE"
        self.dir = work / "node"
        self.database_url = database_url
        self.extra_node = extra_node + (f'\ndatabase_url = "{database_url}"' if database_url else "")
        self.proc: NodeProcess | None = None

    def start(self) -> NodePeer:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        cfg = write_config(
            self.dir / "config.toml",
            port=self.port,
            data_dir=self.dir / "var",
            destinations=[],
            stable_seconds=3600,
            models="",
            routes="",
            node_extra=self.extra_node,
        )
        self.proc = NodeProcess(cfg, self.port, self.dir / "node.log").start()
        return self

    def stop(self) -> None:
        if self.proc is not None:
            rc = self.proc.stop()
            if rc != 0:
                raise RuntimeError(f"the node exited with {rc}:\n{self.proc.log_text()[-3000:]}")

    def count(self) -> int:
        return stored_instances(self.dir / "var", self.database_url)

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.proc is None:
            return []
        return [self.proc.proc.pid, *children(self.proc.proc.pid)]


# ---- sending ------------------------------------------------------------------------------------------


def split(paths: Sequence[Path], n: int) -> list[list[Path]]:
    """``n`` interleaved shares, so each association carries a similar mix."""
    return [list(paths[i::n]) for i in range(n)]


def send(peer: Peer, paths: Sequence[Path], associations: int) -> float:
    """Send ``paths`` with ``associations`` parallel DCMTK storescu processes; returns wall seconds."""
    procs = []
    start = time.perf_counter()
    for share in split(paths, associations):
        args = [STORESCU, "-aec", peer.ae_title, "-aet", "BENCHSCU", "127.0.0.1", str(peer.port)]
        procs.append(
            subprocess.Popen(
                [*args, *map(str, share)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=DCMTK_ENV
            )
        )
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            errors.append(err.decode(errors="replace")[-1500:])
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"storescu failed against {peer.name}:\n" + "\n".join(errors))
    return elapsed


@dataclass
class CpuUse:
    """CPU time spent on the whole machine and by this process's reaped children (the senders) over a span:
    what a receiver costs is the machine's busy time less the senders', whatever processes it forks."""

    wall: float = 0.0
    busy: float = 0.0  # CPU-seconds, all cores
    senders: float = 0.0
    _start: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __enter__(self) -> CpuUse:
        self._start = (time.perf_counter(), _machine_busy_seconds(), _children_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, senders = self._start
        self.wall = time.perf_counter() - wall
        self.busy = _machine_busy_seconds() - busy
        self.senders = _children_seconds() - senders

    def busy_percent(self) -> float:
        return 100 * self.busy / self.wall if self.wall else 0.0

    def receiver_ms(self, instances: int) -> float:
        """Clamped at 0: both counts are clock-tick samples, and an idle receiver's share is below their error."""
        return max(0.0, 1000 * (self.busy - self.senders) / instances)


def _machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in f.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")  # not idle, iowait, or a VM's steal


def _children_seconds() -> float:
    t = os.times()
    return t.children_user + t.children_system


def flush_latency_ms(samples: int = 40) -> float:
    """Median time of write-4-KiB-then-fsync in the benchmarks' temp folder: what one durable step costs on
    this disk right now (a durable receive needs three in a row per instance: file, folder, index)."""
    times = []
    with workdir("bench-fsync-") as d:
        for i in range(samples):
            start = time.perf_counter()
            fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1000


BENCH_TMP = os.environ.get("DICOM_NODE_BENCH_TMP", "/tmp")
_deferred: list[Path] = []


@contextlib.contextmanager
def workdir(prefix: str, *, keep_until_exit: bool = False) -> Iterator[Path]:
    """A fresh folder under ``BENCH_TMP``, removed on leaving the block, or with ``keep_until_exit`` only
    by ``remove_kept_workdirs`` (or at exit): on ext4 without a journal, as this VM's disk is, deleting
    thousands of files makes every file created in the next ~5-35 s cost 0.2-0.4 ms of kernel time
    (``find_inode_bit`` skips recently freed inodes one by one), which would bill each receiver for the
    previous one's clean-up."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=BENCH_TMP))
    if keep_until_exit:
        _deferred.append(d)
        yield d
        return
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def remove_kept_workdirs() -> None:
    while _deferred:
        shutil.rmtree(_deferred.pop(), ignore_errors=True)


atexit.register(remove_kept_workdirs)


def describe_file_system(path: str = BENCH_TMP) -> str:
    """Type of the file system holding ``path``, and for ext4 whether it journals (see ``workdir``)."""
    best, fstype, source = "", "?", ""
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            mount = fields[4]
            post = fields[fields.index("-") + 1 :]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, fstype, source = mount, post[0], post[1]
    if fstype == "ext4":
        dev = Path(source).name
        journal = any(Path("/proc/fs/jbd2").glob(f"{dev}-*"))
        return f"ext4 ({'journal' if journal else 'no journal'})"
    return fstype
