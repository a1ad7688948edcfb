"""The dashboard: server-rendered pages (Jinja2), with retry and cancel as CSRF-protected forms."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from dicom_node import admin, metrics
from dicom_node.web import overlay
from dicom_node.web.api import actor, csrf_ok, info_json
from dicom_node.web.auth import SESSION_COOKIE, SESSION_SECONDS
from dicom_node.web.study_index import index_new_studies
from storage.jobstore import JobStoreError

if TYPE_CHECKING:
    from dicom_node.web.app import WebContext

log = logging.getLogger("dicom_node.web")
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
PICTURES_KEPT = 8


def _ts(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _ago(t: float) -> str:
    s = max(0, int(time.time() - t))
    return f"{s} s" if s < 120 else f"{s // 60} min" if s < 7200 else f"{s // 3600} h"


TEMPLATES.env.filters["ts"] = _ts
TEMPLATES.env.filters["ago"] = _ago


def login_page(request: Request, *, status_code: int = 200, message: str = "") -> Response:
    nxt = request.url.path if request.url.path not in ("/login", "/logout") else "/"
    return TEMPLATES.TemplateResponse(
        request, "login.html", {"message": message, "next": nxt, "page": "login"}, status_code=status_code
    )


class Pictures:
    """Rendered pictures of recent jobs (reading a series and its SEGs takes a moment; pages reload)."""

    def __init__(self) -> None:
        self._kept: OrderedDict[tuple[int, str], overlay.Picture] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ctx: WebContext, job_id: int) -> overlay.Picture | str:
        """The job's picture, or why there is none."""
        job = ctx.rt.jobs.get_job(job_id)
        if job is None:
            return "no such job"
        segs = [r for r in ctx.rt.jobs.results_of_job(job_id) if r.kind == "seg"]
        if not segs:
            return "this job has no segmentation result"
        if any(not r.path for r in segs):
            return "retention has removed this job's results"
        key = (job_id, ",".join(r.sop_instance_uid for r in segs))
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        instances = ctx.rt.jobs.instances_of_series(job.series_uid)
        if not instances:
            return "retention has removed the source images"
        try:
            pic = overlay.render(
                [ctx.rt.files.absolute(i.path) for i in instances],
                [(r.model, ctx.rt.files.absolute(r.path)) for r in segs],
            )
        except (OSError, ValueError) as exc:  # files gone meanwhile, or a series the reader refuses now
            log.warning("picture_failed", extra={"fields": {"job_id": job_id, "error": str(exc)[:300]}})
            return f"cannot draw the picture: {exc}"
        with self._lock:
            self._kept[key] = pic
            while len(self._kept) > PICTURES_KEPT:
                self._kept.popitem(last=False)
        return pic


def _page(request: Request, ctx: WebContext, name: str, **context: Any) -> Response:
    cookie = request.cookies.get(SESSION_COOKIE, "")
    context |= {
        "csrf": ctx.auth.csrf_for(cookie) if cookie else "",
        "node": ctx.cfg.node,
        "msg": request.query_params.get("msg", ""),
        "show_patient": ctx.cfg.http.show_patient_details,
    }
    return TEMPLATES.TemplateResponse(request, name, context)


def _safe_next(value: str) -> str:
    """Only a path of this site (no scheme, no host): the login form must not send anyone elsewhere."""
    parts = urlsplit(value)
    return value if value.startswith("/") and not value.startswith("//") and not parts.netloc else "/"


def routes(ctx: WebContext) -> list[Route]:
    pictures = Pictures()

    async def login(request: Request) -> Response:
        if request.method == "GET":
            return login_page(request)
        form = await request.form()
        who = actor(request, "dashboard")
        if not ctx.auth.token_ok(str(form.get("token", ""))):
            ctx.audit.record("admin_action", actor=who, action="login", outcome="refused")
            return login_page(request, status_code=401, message="That is not the node's token.")
        ctx.audit.record("admin_action", actor=who, action="login", outcome="done")
        response = RedirectResponse(_safe_next(str(form.get("next", "/"))), status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            ctx.auth.new_session(),
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=bool(ctx.cfg.http.tls_cert_file),
            path="/",
        )
        return response

    async def logout(request: Request) -> Response:
        if not await csrf_ok(request, ctx):
            return Response("CSRF check failed", status_code=403)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def overview_page(request: Request) -> Response:
        counts = ctx.rt.jobs.counts()
        q = ctx.overview.queue()
        failures = ctx.rt.jobs.list_jobs(state="failed", limit=10, or_failed_deliveries=True)
        return _page(
            request,
            ctx,
            "overview.html",
            page="overview",
            counts=counts,
            queue=q,
            oldest=_ago(q.oldest_queued_at) if q.oldest_queued_at else "-",
            failures=[admin.job_json(ctx.rt, j) for j in failures],
            health=ctx.health(),
            storage=admin.storage_status(ctx.cfg, ctx.rt),
            recent=ctx.rt.jobs.list_jobs(limit=10),
        )

    def studies_page(request: Request) -> Response:
        index_new_studies(ctx)
        q = request.query_params.get("q", "").strip()
        found = ctx.overview.studies(search=q, limit=100)
        rows = [(st, info_json(ctx, info)) for st, info in found]
        return _page(request, ctx, "studies.html", page="studies", q=q, rows=rows)

    def study_page(request: Request) -> Response:
        index_new_studies(ctx)
        uid = request.path_params["uid"]
        st = ctx.rt.jobs.get_study(uid)
        if st is None:
            return _page(request, ctx, "missing.html", page="studies", what=f"study {uid}")
        jobs = [j for j in (ctx.rt.jobs.get_job(i) for i in ctx.overview.jobs_of_study(uid)) if j]
        views = []
        for j in jobs:
            view = admin.job_json(ctx.rt, j)
            view["timings"] = view["timings"] if isinstance(view["timings"], dict) else {}
            sr = next((r for r in ctx.rt.jobs.results_of_job(j.id) if r.kind == "sr" and r.path), None)
            view["findings"] = overlay.sr_findings(ctx.rt.files.absolute(sr.path)) if sr else []
            view["picture"] = pictures.get(ctx, j.id) if j.state == "done" else None
            views.append(view)
        return _page(
            request,
            ctx,
            "study.html",
            page="studies",
            study=st,
            info=info_json(ctx, ctx.overview.study_info(uid)),
            series=ctx.overview.series_of_study(uid),
            jobs=views,
        )

    def picture_png(request: Request) -> Response:
        pic = pictures.get(ctx, request.path_params["id"])
        n = request.path_params["n"]
        if isinstance(pic, str) or not 0 <= n < len(pic.slices):
            return Response("no such picture", status_code=404)
        return Response(pic.slices[n].png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    async def job_form(request: Request) -> Response:
        if not await csrf_ok(request, ctx):
            return Response("CSRF check failed: reload the page and try again", status_code=403)
        job_id, action = request.path_params["id"], request.path_params["action"]
        if action not in admin.JOB_ACTIONS:
            return Response("no such action", status_code=404)
        job = ctx.rt.jobs.get_job(job_id)
        if job is None:
            return Response("no such job", status_code=404)
        try:
            done = admin.job_action(ctx.cfg, ctx.rt, action, job_id, actor=actor(request, "dashboard"))
            msg = admin.job_action_message(action, done)
            if action == "retry":
                metrics.RETRIES.labels("admin").inc()
        except JobStoreError as exc:
            msg = f"refused: {exc}"
        return RedirectResponse(f"/studies/{job.study_uid}?msg={quote(msg)}", status_code=303)

    return [
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", overview_page),
        Route("/studies", studies_page),
        Route("/studies/{uid}", study_page),
        Route("/jobs/{id:int}/picture/{n:int}.png", picture_png),
        Route("/jobs/{id:int}/{action:str}", job_form, methods=["POST"]),
    ]
