"""Orthanc (Debian's package) as a real PACS for tests and benchmarks.

Orthanc 1.10 listens on all interfaces, so callers run it inside a private network namespace
(`unshare -n`, then `ip link set lo up`) together with everything that talks to it.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.peers import free_port, port_open, track, wait_for

ORTHANC = "/usr/sbin/Orthanc"


class Orthanc:
    def __init__(self, workdir: Path, ae_title: str = "PACS", extra: dict[str, Any] | None = None) -> None:
        """``extra``: more Orthanc settings (e.g. a plugin and its section)."""
        self.workdir = workdir
        self.extra = extra or {}
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "test-pacs",
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "Plugins": [],
            "HttpServerEnabled": True,
            "StableAge": 1,
            "OverwriteInstances": False,
            "DicomScpTimeout": 30,
            **self.extra,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(cfg))
        self.log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115
        self.proc = track(subprocess.Popen([ORTHANC, str(path)], stdout=self.log, stderr=subprocess.STDOUT))
        wait_for(
            lambda: (port_open(self.dicom_port) and port_open(self.http_port)) or self.proc.poll() is not None,
            timeout,
            "Orthanc's ports",
        )
        if self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}")
        return self

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as rsp:
            return json.loads(rsp.read())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "log", None):
            self.log.close()
