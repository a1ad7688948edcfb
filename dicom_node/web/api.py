"""The REST API (JSON under /api, schema at /api/openapi.json): the same reads and actions as the CLI
(dicom_node/admin.py), for scripts and monitoring."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from dicom_node import admin, metrics
from dicom_node.web.auth import SESSION_COOKIE
from dicom_node.web.openapi import SCHEMA
from storage.jobstore import JOB_STATES, JobStoreError

if TYPE_CHECKING:
    from dicom_node.web.app import WebContext

MAX_LIMIT = 500


def actor(request: Request, via: str) -> str:
    """Who did it, for the audit trail: the interface and the client's address (one token, no user names)."""
    return f"{via}@{request.client.host if request.client else '-'}"


async def csrf_ok(request: Request, ctx: WebContext) -> bool:
    """A POST authenticated by the session cookie must carry that session's CSRF value (form field ``csrf``
    or header X-CSRF-Token); one with the bearer header needs none."""
    if request.scope.get("state", {}).get("auth") == "bearer":
        return True
    value = request.headers.get("x-csrf-token", "")
    if not value:
        form = await request.form()
        value = str(form.get("csrf", ""))
    return ctx.auth.csrf_ok(request.cookies.get(SESSION_COOKIE, ""), value)


def _limit(request: Request, default: int = 50) -> int:
    try:
        return max(1, min(MAX_LIMIT, int(request.query_params.get("limit", default))))
    except ValueError:
        return default


def study_json(ctx: WebContext, study_uid: str, *, detail: bool) -> dict[str, Any] | None:
    st = ctx.rt.jobs.get_study(study_uid)
    if st is None:
        return None
    info = ctx.overview.study_info(study_uid)
    out: dict[str, Any] = {
        "study_uid": st.study_uid,
        "state": st.state,
        "generation": st.generation,
        "instances": st.instance_count,
        "first_received_at": st.first_received_at,
        "last_received_at": st.last_received_at,
    }
    out.update(info_json(ctx, info))
    if detail:
        out["series"] = [s.__dict__ for s in ctx.overview.series_of_study(study_uid)]
        out["jobs"] = [
            admin.job_json(ctx.rt, j)
            for j in (ctx.rt.jobs.get_job(i) for i in ctx.overview.jobs_of_study(study_uid))
            if j
        ]
    return out


def info_json(ctx: WebContext, info: Any) -> dict[str, Any]:
    if info is None:
        return {"accession_number": None}
    out = {
        "accession_number": info.accession_number,
        "study_date": info.study_date,
        "study_description": info.study_description,
        "modalities": info.modalities,
        "calling_ae": info.calling_ae,
    }
    if ctx.cfg.http.show_patient_details:
        out |= {"patient_name": info.patient_name, "patient_id": info.patient_id}
    return out


def routes(ctx: WebContext) -> list[Route]:
    from dicom_node.web.study_index import index_new_studies

    def studies(request: Request) -> JSONResponse:
        index_new_studies(ctx)
        found = ctx.overview.studies(search=request.query_params.get("search", "").strip(), limit=_limit(request))
        return JSONResponse([study_json(ctx, st.study_uid, detail=False) for st, _ in found])

    def study(request: Request) -> JSONResponse:
        index_new_studies(ctx)
        out = study_json(ctx, request.path_params["uid"], detail=True)
        return JSONResponse(out) if out else JSONResponse({"error": "no such study"}, status_code=404)

    def jobs(request: Request) -> JSONResponse:
        state = request.query_params.get("state") or None
        if state is not None and state not in JOB_STATES:
            return JSONResponse({"error": f"state: expected one of {', '.join(JOB_STATES)}"}, status_code=400)
        found = ctx.rt.jobs.list_jobs(state=state, limit=_limit(request), or_failed_deliveries=state == "failed")
        return JSONResponse([admin.job_json(ctx.rt, j) for j in found])

    def job(request: Request) -> JSONResponse:
        j = ctx.rt.jobs.get_job(request.path_params["id"])
        return JSONResponse(admin.job_json(ctx.rt, j)) if j else JSONResponse({"error": "no such job"}, 404)

    async def job_action(request: Request) -> JSONResponse:
        if not await csrf_ok(request, ctx):
            return JSONResponse({"error": "CSRF check failed"}, status_code=403)
        action = request.path_params["action"]
        if action not in admin.JOB_ACTIONS:
            return JSONResponse({"error": f"unknown action {action!r}"}, status_code=404)
        try:
            j = admin.job_action(ctx.cfg, ctx.rt, action, request.path_params["id"], actor=actor(request, "api"))
        except JobStoreError as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        if action == "retry":
            metrics.RETRIES.labels("admin").inc()
        return JSONResponse({"message": admin.job_action_message(action, j), "job": admin.job_json(ctx.rt, j)})

    def destinations(_request: Request) -> JSONResponse:
        return JSONResponse(
            [
                {
                    "name": d.name,
                    "ae_title": d.ae_title,
                    "host": d.host,
                    "port": d.port,
                    "calling_ae_title": d.calling_ae_title or ctx.cfg.node.ae_title,
                }
                for d in ctx.cfg.destinations
            ]
        )

    async def echo(request: Request) -> JSONResponse:
        if not await csrf_ok(request, ctx):
            return JSONResponse({"error": "CSRF check failed"}, status_code=403)
        from starlette.concurrency import run_in_threadpool

        try:
            r = await run_in_threadpool(
                admin.echo_destination, ctx.cfg, request.path_params["name"], actor=actor(request, "api")
            )
        except KeyError:
            return JSONResponse({"error": "no such destination"}, status_code=404)
        return JSONResponse(r.__dict__, status_code=200 if r.ok else 502)

    def models(_request: Request) -> JSONResponse:
        return JSONResponse(admin.models(ctx.cfg))

    def health(_request: Request) -> JSONResponse:
        h = ctx.health()
        return JSONResponse(h, status_code=200 if h["ok"] else 503)

    def status(_request: Request) -> JSONResponse:
        return JSONResponse({"counts": ctx.rt.jobs.counts(), "storage": admin.storage_status(ctx.cfg, ctx.rt)})

    def schema(_request: Request) -> JSONResponse:
        return JSONResponse(SCHEMA)

    return [
        Route("/api/openapi.json", schema),
        Route("/api/status", status),
        Route("/api/studies", studies),
        Route("/api/studies/{uid}", study),
        Route("/api/jobs", jobs),
        Route("/api/jobs/{id:int}", job),
        Route("/api/jobs/{id:int}/{action:str}", job_action, methods=["POST"]),
        Route("/api/destinations", destinations),
        Route("/api/destinations/{name}/echo", echo, methods=["POST"]),
        Route("/api/models", models),
        Route("/api/health", health),
    ]
