"""The Starlette application: routes of the API (api.py) and the dashboard (pages.py), the token check in
front of them, and /healthz and /metrics."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.metrics_setup import multiprocess_dir
from dicom_node.runtime import Runtime
from dicom_node.web import api, pages
from dicom_node.web.auth import SESSION_COOKIE, Auth
from dicom_node.web.collector import NodeCollector
from storage.overview import Overview

HERE = Path(__file__).parent
OPEN_PATHS = ("/login", "/static/")
PROBE_PATHS = ("/healthz", "/metrics")


@dataclass
class WebContext:
    """What the handlers need of the node: its config, store, token, and a view of its running parts."""

    cfg: Config
    rt: Runtime
    overview: Overview
    auth: Auth
    audit: AuditLog
    node_state: Callable[[], dict[str, Any]]  # see service.Node.web_state

    def health(self) -> dict[str, Any]:
        """Node health: listener processes and loops alive, the database answering, free space above the floor."""
        state = self.node_state()
        try:
            db_ok, db_error = self.overview.reachable(), ""
        except Exception as exc:  # any driver error means the same to the admin: the database does not answer
            db_ok, db_error = False, f"{type(exc).__name__}: {exc}"[:300]
        usage = shutil.disk_usage(self.rt.files.root)
        floor = self.cfg.node.min_free_mb << 20
        checks = {
            "listeners": {
                "ok": state["listeners_alive"] >= state["listeners_expected"] > 0,
                "alive": state["listeners_alive"],
                "expected": state["listeners_expected"],
                "pids": state.get("listener_pids", []),
            },
            "loops": {"ok": all(state["loops"].values()), **state["loops"]},
            "database": {"ok": db_ok, "dialect": self.rt.jobs.engine.dialect.name, "error": db_error or None},
            "disk": {
                "ok": usage.free >= floor,
                "free_bytes": usage.free,
                "total_bytes": usage.total,
                "floor_bytes": floor,
            },
        }
        return {"ok": all(c["ok"] for c in checks.values()), **checks}


class TokenGate:
    """Refuses every request without the token (bearer header or session cookie), except the login page, the
    static assets and, unless http.metrics_require_token, /healthz and /metrics. Marks how the request was
    authenticated (scope["state"]["auth"]: "bearer" or "cookie"), which the CSRF check needs."""

    def __init__(self, app: ASGIApp, auth: Auth, probes_open: bool) -> None:
        self.app = app
        self.auth = auth
        self.probes_open = probes_open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path.startswith(OPEN_PATHS) or (self.probes_open and path in PROBE_PATHS):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        how = None
        if self.auth.bearer_ok(request.headers.get("authorization", "")):
            how = "bearer"
        elif self.auth.session_ok(request.cookies.get(SESSION_COOKIE, "")):
            how = "cookie"
        if how is None:
            response = _refusal(request)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["auth"] = how
        await self.app(scope, receive, send)


def _refusal(request: Request) -> Response:
    if request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", ""):
        return JSONResponse(
            {"error": "the node's HTTP token is required (Authorization: Bearer <token>)"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="dicom-node"'},
        )
    return pages.login_page(request, status_code=401, message="Log in with the node's token to see this page.")


def metrics_endpoint(ctx: WebContext) -> Callable[[Request], Response]:
    folder = multiprocess_dir()
    registry = CollectorRegistry()
    if folder:  # every process's counters, summed from their files
        MultiProcessCollector(registry, path=folder)
    else:  # this process's own
        registry = REGISTRY
    collector = NodeCollector(ctx.rt.jobs, ctx.overview, ctx.rt.files.root, ctx.node_state)
    both = CollectorRegistry()

    class _Both(Collector):
        def collect(self) -> Iterator[Metric]:
            yield from registry.collect()
            yield from collector.collect()

    both.register(_Both())

    def handler(_request: Request) -> Response:
        return Response(generate_latest(both), media_type=CONTENT_TYPE_LATEST)

    return handler


def healthz_endpoint(ctx: WebContext) -> Callable[[Request], Response]:
    def handler(_request: Request) -> Response:
        h = ctx.health()
        return Response(json.dumps(h), status_code=200 if h["ok"] else 503, media_type="application/json")

    return handler


def build_app(ctx: WebContext) -> ASGIApp:
    routes = [
        Route("/healthz", healthz_endpoint(ctx)),
        Route("/metrics", metrics_endpoint(ctx)),
        *api.routes(ctx),
        *pages.routes(ctx),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.ctx = ctx
    return TokenGate(app, ctx.auth, probes_open=not ctx.cfg.http.metrics_require_token)
