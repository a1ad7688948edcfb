"""The HTTP server in the node process: uvicorn in a thread, on a socket bound before the node reports
itself started (a busy port stops the start with a message naming http.port), stopped with the node."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from dicom_node.audit import AuditLog
from dicom_node.config import Config, ConfigError, resolve_path
from dicom_node.logs import log_event
from dicom_node.runtime import Runtime
from dicom_node.web.app import WebContext, build_app
from dicom_node.web.auth import Auth, load_token
from storage.overview import Overview

log = logging.getLogger("dicom_node.web")
STOP_SECONDS = 5.0


class WebServer:
    def __init__(self, cfg: Config, rt: Runtime, audit: AuditLog, node_state: Callable[[], dict[str, Any]]) -> None:
        self.cfg = cfg
        self.ctx = WebContext(
            cfg=cfg,
            rt=rt,
            overview=Overview(rt.jobs.engine),
            auth=Auth(load_token(cfg)),
            audit=audit,
            node_state=node_state,
        )
        self.sock: socket.socket | None = None
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    def start(self) -> WebServer:
        h = self.cfg.http
        family = socket.AF_INET6 if ":" in h.bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((h.bind, h.port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"http.port: cannot listen on {h.bind}:{h.port}: {exc.strerror or exc}") from exc
        sock.listen(128)
        sock.set_inheritable(False)
        self.sock = sock
        tls = bool(h.tls_cert_file)
        config = uvicorn.Config(
            build_app(self.ctx),
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            ssl_certfile=str(resolve_path(self.cfg.base_dir, h.tls_cert_file)) if tls else None,
            ssl_keyfile=str(resolve_path(self.cfg.base_dir, h.tls_key_file)) if tls else None,
        )
        config.load()
        if config.ssl is not None:
            v = ssl.TLSVersion
            config.ssl.minimum_version = v.TLSv1_3 if h.tls_min_version == "1.3" else v.TLSv1_2
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        self.thread.start()
        token_from = f"env:{h.token_env}" if os.environ.get(h.token_env) else str(self.cfg.http_token_path)
        log_event(log, "http_started", bind=h.bind, port=self.port, tls=tls, token_from=token_from)
        return self

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(STOP_SECONDS)
        if self.sock is not None:
            self.sock.close()
