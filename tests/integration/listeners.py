"""The in-process listener the security and hostile-wire tests drive: a config on loopback with the given
[security] and [node] keys, the runtime, and the listener started on a free port."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicom_node.config import parse_config
from dicom_node.receive.listener import start_listener
from dicom_node.runtime import open_runtime
from tests.peers import free_port


def listener_config(tmp_path: Path, port: int, security: dict[str, Any] | None = None, **node: Any) -> Any:
    return parse_config(
        {
            "node": {"port": port, "bind": "127.0.0.1", "data_dir": str(tmp_path / "var"), "min_free_mb": 0, **node},
            "security": security or {},
        },
        tmp_path,
    )


class Listener:
    def __init__(self, tmp_path: Path, security: dict[str, Any] | None = None, **node: Any) -> None:
        self.port = free_port()
        self.cfg = listener_config(tmp_path, self.port, security, **node)
        self.rt = open_runtime(self.cfg)
        self.ae, self.server = start_listener(self.cfg, self.rt.files, self.rt.jobs)

    def stop(self) -> None:
        self.server.shutdown()
        self.ae.shutdown()
