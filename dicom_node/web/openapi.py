"""OpenAPI 3.1 description of the REST API (served at /api/openapi.json)."""

from __future__ import annotations

from typing import Any

from dicom_node import __version__


def _get(
    summary: str, schema: dict[str, Any], *, params: list[dict[str, Any]] | None = None, errors: tuple[int, ...] = ()
) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": {"description": "OK", "content": {"application/json": {"schema": schema}}}}
    for code in errors:
        responses[str(code)] = {"$ref": f"#/components/responses/E{code}"}
    responses["401"] = {"$ref": "#/components/responses/E401"}
    return {"get": {"summary": summary, "parameters": params or [], "responses": responses}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _arr(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


def _param(name: str, where: str, kind: str, doc: str, *, required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "description": doc,
        "schema": {"type": kind},
    }


_LIMIT = _param("limit", "query", "integer", "at most this many (1-500, default 50)")
_JOB_ID = _param("id", "path", "integer", "job id")
_OBJ = {"type": "object"}
_STR, _INT, _NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
_ERR = {"description": "Error", "content": {"application/json": {"schema": _ref("Error")}}}

SCHEMA: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "dicom-node",
        "version": __version__,
        "description": "The node's REST API. Every path needs the node's token: Authorization: Bearer "
        "<token>. POSTs made with the dashboard's session cookie need its CSRF value too "
        "(header X-CSRF-Token). /healthz and /metrics (Prometheus) are outside /api.",
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/status": _get("Counts of instances, studies, jobs and deliveries by state; disk use", _OBJ),
        "/api/studies": _get(
            "Studies, newest first",
            _arr(_ref("Study")),
            params=[
                _param("search", "query", "string", "an accession number (exact) or a study UID (or its start)"),
                _LIMIT,
            ],
        ),
        "/api/studies/{uid}": _get(
            "One study with its series and jobs",
            _ref("StudyDetail"),
            params=[_param("uid", "path", "string", "Study Instance UID")],
            errors=(404,),
        ),
        "/api/jobs": _get(
            "Jobs, newest first",
            _arr(_ref("Job")),
            params=[
                _param(
                    "state",
                    "query",
                    "string",
                    "queued, running, done, failed (also jobs with an undelivered result) or cancelled",
                ),
                _LIMIT,
            ],
            errors=(400,),
        ),
        "/api/jobs/{id}": _get("One job", _ref("Job"), params=[_JOB_ID], errors=(404,)),
        "/api/jobs/{id}/retry": {
            "post": {
                "summary": "Run a failed or cancelled job again; for a done job, send its results again",
                "parameters": [_JOB_ID],
                "responses": {
                    "200": {"description": "Done", "content": {"application/json": {"schema": _ref("ActionResult")}}},
                    "409": {"$ref": "#/components/responses/E409"},
                    "401": {"$ref": "#/components/responses/E401"},
                    "403": {"$ref": "#/components/responses/E403"},
                },
            }
        },
        "/api/jobs/{id}/cancel": {
            "post": {
                "summary": "Cancel a queued or running job",
                "parameters": [_JOB_ID],
                "responses": {
                    "200": {"description": "Done", "content": {"application/json": {"schema": _ref("ActionResult")}}},
                    "409": {"$ref": "#/components/responses/E409"},
                    "401": {"$ref": "#/components/responses/E401"},
                    "403": {"$ref": "#/components/responses/E403"},
                },
            }
        },
        "/api/destinations": _get("Configured destinations", _arr(_OBJ)),
        "/api/destinations/{name}/echo": {
            "post": {
                "summary": "C-ECHO a destination",
                "parameters": [_param("name", "path", "string", "destination")],
                "responses": {
                    "200": {
                        "description": "The destination answered",
                        "content": {"application/json": {"schema": _ref("Echo")}},
                    },
                    "502": {"description": "It did not", "content": {"application/json": {"schema": _ref("Echo")}}},
                    "404": {"$ref": "#/components/responses/E404"},
                    "401": {"$ref": "#/components/responses/E401"},
                },
            }
        },
        "/api/models": _get("Configured models, as `dicom-node models` lists them", _arr(_OBJ)),
        "/api/health": _get(
            "Listener processes, worker and sender loops, database, disk (503 when not ok)", _ref("Health")
        ),
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "responses": {
            f"E{c}": {**_ERR, "description": d}
            for c, d in (
                (400, "Bad request"),
                (401, "No or wrong token"),
                (403, "CSRF check failed"),
                (404, "Not found"),
                (409, "Refused in the job's state (the message says why)"),
            )
        },
        "schemas": {
            "Error": {"type": "object", "properties": {"error": _STR}},
            "Study": {
                "type": "object",
                "properties": {
                    "study_uid": _STR,
                    "state": {"enum": ["receiving", "complete"]},
                    "generation": _INT,
                    "instances": _INT,
                    "first_received_at": _NUM,
                    "last_received_at": _NUM,
                    "accession_number": _STR,
                    "study_date": _STR,
                    "study_description": _STR,
                    "modalities": _STR,
                    "calling_ae": _STR,
                },
            },
            "StudyDetail": {
                "allOf": [
                    _ref("Study"),
                    {
                        "type": "object",
                        "properties": {
                            "series": _arr(
                                {
                                    "type": "object",
                                    "properties": {
                                        "series_uid": _STR,
                                        "sop_class_uid": _STR,
                                        "instances": _INT,
                                        "bytes": _INT,
                                    },
                                }
                            ),
                            "jobs": _arr(_ref("Job")),
                        },
                    },
                ]
            },
            "Job": {
                "type": "object",
                "properties": {
                    "id": _INT,
                    "study_uid": _STR,
                    "route": _STR,
                    "generation": _INT,
                    "series_uid": _STR,
                    "models": _arr(_STR),
                    "destinations": _arr(_STR),
                    "state": {"enum": ["queued", "running", "done", "failed", "cancelled"]},
                    "attempts": _INT,
                    "error": _STR,
                    "created_at": _NUM,
                    "updated_at": _NUM,
                    "timings": {
                        "type": "object",
                        "additionalProperties": _NUM,
                        "description": "seconds per stage: load, model_load, inference, inference_<step>, "
                        "seg_encode, sr_encode, write",
                    },
                    "deliveries": _arr(_ref("Delivery")),
                },
            },
            "Delivery": {
                "type": "object",
                "properties": {
                    "id": _INT,
                    "kind": {"enum": ["seg", "sr", "rejection"]},
                    "model": _STR,
                    "destination": _STR,
                    "state": {"enum": ["pending", "sending", "done", "failed", "refused"]},
                    "attempts": _INT,
                    "last_status": _STR,
                    "error": _STR,
                    "sop_instance_uid": _STR,
                },
            },
            "ActionResult": {"type": "object", "properties": {"message": _STR, "job": _ref("Job")}},
            "Echo": {
                "type": "object",
                "properties": {
                    "destination": _STR,
                    "ae_title": _STR,
                    "host": _STR,
                    "port": _INT,
                    "ok": {"type": "boolean"},
                    "detail": _STR,
                },
            },
            "Health": {
                "type": "object",
                "properties": {
                    "ok": {"type": "boolean"},
                    "listeners": _OBJ,
                    "loops": _OBJ,
                    "database": _OBJ,
                    "disk": _OBJ,
                },
            },
        },
    },
}
