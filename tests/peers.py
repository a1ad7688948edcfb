"""Real peers for tests: DCMTK storescp/storescu, the node as a subprocess, dciodvfy. Loopback only."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DCMTK_BIN = Path(os.environ.get("DICOM_NODE_DCMTK_BIN", "/usr/bin"))  # another DCMTK (an unpacked one) by folder
STORESCU = str(DCMTK_BIN / "storescu")
STORESCP = str(DCMTK_BIN / "storescp")
ECHOSCU = str(DCMTK_BIN / "echoscu")
DCIODVFY = "/usr/bin/dciodvfy"
BUNDLES = REPO / "tests" / "fixtures" / "phantom_bundles"
PHANTOM_SEG_BUNDLE = Path(os.environ.get("DICOM_NODE_TEST_SEG_BUNDLE", BUNDLES / "chest_ct_seg"))
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # DCMTK keeps Nagle on otherwise (~100x slower on loopback)


_LIVE: list[subprocess.Popen[bytes]] = []


def track(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Remember a peer process so a failing test (or an exiting driver) never leaves it running."""
    _LIVE.append(proc)
    return proc


def kill_leftovers() -> None:
    while _LIVE:
        proc = _LIVE.pop()
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


atexit.register(kill_leftovers)


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children and their descendants (from /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for c in (task / "children").read_text().split():
                out += [int(c), *children(int(c))]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until predicate() is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def await_listening(
    proc: subprocess.Popen[bytes], port: int, timeout: float, what: str, exited: Callable[[], Exception]
) -> None:
    """Wait until ``proc`` accepts connections on ``port``; if it exits first, raise what ``exited`` makes of
    it (the error with the process's own last words, which each caller finds in its own place)."""
    wait_for(lambda: port_open(port) or proc.poll() is not None, timeout, what)
    if proc.poll() is not None:
        raise exited()


class StoreSCP:
    """DCMTK storescp writing every received object to ``out_dir`` (a stand-in PACS)."""

    def __init__(
        self, out_dir: Path, port: int | None = None, ae_title: str = "PACS", extra: Sequence[str] = ()
    ) -> None:
        self.out_dir = out_dir
        self.port = port or free_port()
        self.ae_title = ae_title
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out_dir.parent / f"storescp-{self.port}.log", "ab")  # noqa: SIM115
        self.proc = track(
            subprocess.Popen(
                [STORESCP, "-aet", self.ae_title, "-od", str(self.out_dir), "+xa", "-uf", *self.extra, str(self.port)],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                env=DCMTK_ENV,
            )
        )
        wait_for(lambda: port_open(self.port), 10, f"storescp on port {self.port}")
        return self

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file() and not p.name.startswith("."))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if getattr(self, "log", None):
            self.log.close()


def storescu(
    port: int,
    paths: Sequence[Path],
    *,
    called: str = "DICOM_NODE",
    calling: str = "SCANNER",
    flags: Sequence[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    cmd = [STORESCU, "-aec", called, "-aet", calling, *flags, "127.0.0.1", str(port), *map(str, paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"storescu failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's error lines for a file (warnings are not errors)."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


def write_config(
    path: Path,
    *,
    port: int,
    data_dir: Path,
    destinations: Sequence[dict[str, Any]],
    stable_seconds: float = 1.0,
    extra: str = "",
    models: str | None = None,
    routes: str | None = None,
    route_models: Sequence[str] = ("chest-ct-seg",),
    node_extra: str = "",
    log_level: str = "INFO",
    http: str = "enabled = false",
) -> Path:
    """A node config on loopback; ``node_extra``: more [node] keys (TOML lines); ``extra``: more sections;
    ``http``: the [http] keys (off unless a test asks: nodes of parallel tests would share its port)."""
    dest = "\n".join(
        f'[[destinations]]\nname = "{d["name"]}"\nae_title = "{d.get("ae_title", "PACS")}"\n'
        f'host = "127.0.0.1"\nport = {d["port"]}\n'
        for d in destinations
    )
    bundle = PHANTOM_SEG_BUNDLE
    models = (
        models
        if models is not None
        else "".join(
            f'[[models]]\nname = "{name}"\nbundle = "{path}"\n'
            for name, path in (
                ("chest-ct-seg", bundle),
                ("chest-ct-det", BUNDLES / "chest_ct_det"),
                ("chest-ct-cls", BUNDLES / "chest_ct_cls"),
            )
        )
    )
    route_list = ", ".join(f'"{m}"' for m in route_models)
    names = ", ".join(f'"{d["name"]}"' for d in destinations)
    routes = (
        routes
        if routes is not None
        else (
            f'[[routes]]\nname = "chest-ct"\nmatch = {{ Modality = "CT" }}\nmodels = [{route_list}]\n'
            f"send_to = [{names}]\n"
        )
    )
    path.write_text(f"""
[node]
ae_title = "DICOM_NODE"
port = {port}
bind = "127.0.0.1"
data_dir = "{data_dir}"
min_free_mb = 0
{node_extra}

[completion]
stable_seconds = {stable_seconds}
poll_seconds = 0.2

[worker]
device = "cpu"
poll_seconds = 0.2
retry_backoff_seconds = 1

[sender]
poll_seconds = 0.2
backoff_seconds = 0.5
backoff_max_seconds = 2
acse_timeout = 5
dimse_timeout = 20
network_timeout = 10

[http]
{http}

[logging]
level = "{log_level}"
{extra}
{dest}
{models}
{routes}
""")
    return path


def stored_instances(data_dir: Path, database_url: str = "") -> int:
    """Rows in the node's instance index, read as an outsider would: plain sqlite3 on the file under
    ``data_dir``, or a connection of its own to ``database_url`` when the node indexes there."""
    if database_url:
        from sqlalchemy import create_engine, text

        engine = create_engine(database_url)
        try:
            with engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM instances")).scalar_one())
        finally:
            engine.dispose()
    with contextlib.closing(sqlite3.connect(data_dir / "node.db")) as db:
        return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])


class NodeProcess:
    """`dicom-node serve` as a subprocess, as an admin would run it."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.config = config
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> NodeProcess:
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = track(
            subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "--config", str(self.config), "serve"],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        )
        proc = self.proc
        await_listening(
            proc,
            self.port,
            timeout,
            "the node's port",
            lambda: AssertionError(f"node exited with {proc.returncode}:\n{self.log_text()[-3000:]}"),
        )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicom_node.cli", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(Exception):
            self.log.close()
        return int(self.proc.returncode)


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for t in reversed(things):
            with contextlib.suppress(Exception):
                t.stop()


def shipped_models_and_route() -> tuple[str, str]:
    """The shipped config.toml's [[models]] (bundle paths made absolute) and its route, as TOML."""
    cfg = tomllib.loads((REPO / "config.toml").read_text())
    models = "".join(
        f'[[models]]\nname = "{m["name"]}"\nbundle = "{REPO / m["bundle"]}"\nmin_score = {m.get("min_score", -1.0)}\n'
        for m in cfg["models"]
    )
    (route,) = cfg["routes"]
    match = ", ".join(f"{k} = {json.dumps(v)}" for k, v in route["match"].items())
    names = ", ".join(f'"{m}"' for m in route["models"])
    route_toml = f'[[routes]]\nname = "{route["name"]}"\nmatch = {{ {match} }}\nmodels = [{names}]\n'
    return models, route_toml + 'send_to = ["pacs"]\n'
