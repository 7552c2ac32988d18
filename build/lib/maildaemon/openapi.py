"""The OpenAPI 3.1 document of the internal HTTP API, served at /api/v1/internal/openapi.json.

Built from the code it describes: response schemas from the ``operator_model`` views,
request bodies from the ``operator_inputs`` models, query parameters from their ``Param``
specs. ``python -m maildaemon.openapi`` prints it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter

from maildaemon import __version__
from maildaemon import operator_bodies as bodies
from maildaemon import operator_inputs as inputs
from maildaemon import operator_views as v

PREFIX = "/api/v1/internal"
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    response: type[Any]
    params: tuple[inputs.Param, ...] = ()
    path_params: tuple[str, ...] = ()
    body: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    tags: tuple[str, ...] = field(default_factory=tuple)


_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "delivery_id": {"type": "string", "pattern": inputs.DELIVERY_ID, "maxLength": 128},
    "stream_entry_id": {"type": "string", "pattern": inputs.STREAM_ENTRY_ID},
    "id": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
}

_P = PREFIX
OPERATIONS = (
    Op("get", "/healthz", "Liveness: the process answers.", v.Health, tags=("probes",)),
    Op(
        "get",
        f"{_P}/deliveries",
        "Deliveries, newest first (keyset pagination).",
        v.DeliveryPage,
        inputs.DELIVERY_PARAMS,
        errors=(400,),
        tags=("deliveries",),
    ),
    Op(
        "get",
        f"{_P}/deliveries/{{delivery_id}}",
        "One delivery with its attempts, dead letter and retry plan.",
        v.DeliveryDetail,
        path_params=("delivery_id",),
        errors=(400, 404),
        tags=("deliveries",),
    ),
    Op(
        "post",
        f"{_P}/deliveries/{{delivery_id}}/requeue",
        "Requeue a dead-lettered or "
        "failed delivery: queued, due now, the retry ladder starts over, attempts kept.",
        v.DeliveryChange,
        path_params=("delivery_id",),
        body=bodies.DeliveryActionBody,
        errors=(400, 404, 409),
        tags=("deliveries",),
    ),
    Op(
        "post",
        f"{_P}/deliveries/{{delivery_id}}/cancel",
        "Cancel a queued (due or scheduled) delivery; it is never sent.",
        v.DeliveryChange,
        path_params=("delivery_id",),
        body=bodies.DeliveryActionBody,
        errors=(400, 404, 409),
        tags=("deliveries",),
    ),
    Op(
        "get",
        f"{_P}/dead-letters",
        "Dead letters: unreviewed first, then newest first.",
        v.DeadLetterPage,
        inputs.DEAD_LETTER_PARAMS,
        errors=(400,),
        tags=("dead letters",),
    ),
    Op(
        "post",
        f"{_P}/dead-letters/{{delivery_id}}/review",
        "Mark a dead letter reviewed.",
        v.Review,
        path_params=("delivery_id",),
        body=bodies.ReviewBody,
        errors=(400, 404),
        tags=("dead letters",),
    ),
    Op(
        "post",
        f"{_P}/dead-letters/requeue",
        "Requeue the dead letters matching a filter "
        "(dry run: count only), released at a given rate.",
        v.BulkRequeue,
        body=bodies.BulkRequeueBody,
        errors=(400, 409),
        tags=("dead letters",),
    ),
    Op(
        "get",
        f"{_P}/malformed-commands",
        "Stream entries refused at intake, newest first.",
        v.MalformedPage,
        inputs.MALFORMED_PARAMS,
        errors=(400,),
        tags=("malformed commands",),
    ),
    Op(
        "post",
        f"{_P}/malformed-commands/{{id}}/replay",
        "Validate a refused entry again and take it in if it now passes.",
        v.Replay,
        path_params=("id",),
        body=bodies.ReplayBody,
        errors=(400, 404, 409),
        tags=("malformed commands",),
    ),
    Op(
        "post",
        f"{_P}/malformed-commands/replay",
        "Replay refused entries by failure code (dry run: validate only).",
        v.Replay,
        body=bodies.BulkReplayBody,
        errors=(400, 409),
        tags=("malformed commands",),
    ),
    Op(
        "get",
        f"{_P}/commands/{{stream_entry_id}}",
        "What became of one stream entry.",
        v.CommandTrace,
        path_params=("stream_entry_id",),
        errors=(400, 404),
        tags=("malformed commands",),
    ),
    Op(
        "get",
        f"{_P}/stats",
        "The figures an operator checks first.",
        v.Stats,
        errors=(400,),
        tags=("figures",),
    ),
    Op(
        "get",
        f"{_P}/sending",
        "Whether sending is paused, globally or per source.",
        v.SendingState,
        errors=(400,),
        tags=("sending",),
    ),
    Op(
        "post",
        f"{_P}/sending/pause",
        "Pause sending (claiming stops, intake goes on), for "
        "one source or all; shared by every replica, survives restarts.",
        v.PauseChange,
        body=bodies.PauseBody,
        errors=(400,),
        tags=("sending",),
    ),
    Op(
        "post",
        f"{_P}/sending/resume",
        "Resume sending for one source or all.",
        v.PauseChange,
        body=bodies.PauseBody,
        errors=(400,),
        tags=("sending",),
    ),
    Op(
        "get",
        f"{_P}/suppressions",
        "The suppression list, by address.",
        v.SuppressionPage,
        inputs.SUPPRESSION_PARAMS,
        errors=(400,),
        tags=("suppressions",),
    ),
    Op(
        "post",
        f"{_P}/suppressions",
        "Add (or replace) a suppression.",
        v.SuppressionChange,
        body=bodies.SuppressionAddBody,
        errors=(400,),
        tags=("suppressions",),
    ),
    Op(
        "post",
        f"{_P}/suppressions/remove",
        "Remove a suppression.",
        v.SuppressionChange,
        body=bodies.SuppressionRemoveBody,
        errors=(400, 404),
        tags=("suppressions",),
    ),
    Op(
        "get",
        f"{_P}/operator-actions",
        "The audit trail of operator actions, newest first.",
        v.OperatorActionPage,
        inputs.ACTION_PARAMS,
        errors=(400,),
        tags=("audit",),
    ),
)

_STATUS_TEXT = {
    400: "Invalid input; `error.field` names the parameter or body field.",
    401: "Missing or wrong operator token.",
    403: "Operator actions are disabled (MAIL_OPERATOR_TOKEN is not configured).",
    404: "No such object.",
    409: "The object is not in a state that allows this action.",
    413: "The request body is too large.",
    503: "PostgreSQL is unavailable; try again later.",
}

_ACTOR_HEADER = {
    "name": "X-Operator",
    "in": "header",
    "required": False,
    "description": "Who acts, when the body has no `actor`.",
    "schema": {"type": "string", "pattern": inputs.HEADER_ACTOR},
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _ref(kind: type[Any]) -> dict[str, Any]:
    return {"$ref": _REF.format(model=kind.__name__)}


def _operation(op: Op) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": _PATH_PARAMS[name]}
        for name in op.path_params
    ]
    params += [
        {
            "name": p.name,
            "in": "query",
            "required": False,
            "schema": p.schema,
            "description": p.description,
        }
        for p in op.params
    ]
    responses: dict[str, Any] = {"200": _json(_ref(op.response), "OK")}
    error = _ref(v.ErrorBody)
    statuses = set(op.errors) | ({503} if op.path.startswith(PREFIX) else set())
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": _operation_id(op),
        "tags": list(op.tags),
    }
    if op.method == "post":
        params.append(_ACTOR_HEADER)
        statuses |= {400, 401, 403, 413}
        out["security"] = [{"operatorToken": []}]
        assert op.body is not None
        required = any(f.is_required() for f in op.body.model_fields.values())
        out["requestBody"] = {
            "required": required,
            "content": {"application/json": {"schema": _ref(op.body)}},
        }
    for status in sorted(statuses):
        responses[str(status)] = _json(error, _STATUS_TEXT[status])
    if params:
        out["parameters"] = params
    out["responses"] = responses
    return out


def _operation_id(op: Op) -> str:
    words = [
        w
        for w in op.path.removeprefix(PREFIX).replace("-", "_").split("/")
        if w and not w.startswith("{")
    ]
    return "_".join([op.method, *words]) + ("_one" if op.path.endswith("}") else "")


def _schemas() -> dict[str, Any]:
    kinds: list[type[Any]] = [op.response for op in OPERATIONS] + [v.ErrorBody]
    bodies = [op.body for op in OPERATIONS if op.body is not None]
    entries = [((k.__name__, "serialization"), "serialization", TypeAdapter(k)) for k in kinds]
    entries += [((b.__name__, "validation"), "validation", TypeAdapter(b)) for b in bodies]
    _, defs = TypeAdapter.json_schemas(entries, ref_template=_REF)  # type: ignore[arg-type]
    return dict(sorted(defs.get("$defs", {}).items()))


@cache
def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    paths["/readyz"] = {
        "get": {
            "summary": "Readiness: migrations applied, workers running, PostgreSQL and Redis "
            "reachable.",
            "operationId": "get_readyz",
            "tags": ["probes"],
            "responses": {
                "200": _json({"$ref": _REF.format(model="Readiness")}, "Ready"),
                "503": _json({"$ref": _REF.format(model="Readiness")}, "Not ready"),
            },
        }
    }
    paths[f"{PREFIX}/openapi.json"] = {
        "get": {
            "summary": "This document.",
            "operationId": "get_openapi",
            "tags": ["probes"],
            "responses": {"200": _json({"type": "object"}, "The OpenAPI document")},
        }
    }
    schemas = _schemas()
    schemas["Readiness"] = {
        "type": "object",
        "required": ["status", "checks"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "not ready"]},
            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "maildaemon internal API",
            "version": __version__,
            "description": "Delivery lookup and operator repair on MAIL_INTERNAL_HTTP_ADDR. "
            "Reads are open to the internal network; actions (POST) need "
            "`Authorization: Bearer <MAIL_OPERATOR_TOKEN>` and are recorded "
            "in the audit trail. Times are ISO-8601 UTC.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {"operatorToken": {"type": "http", "scheme": "bearer"}},
        },
    }


async def serve(request: web.Request) -> web.Response:
    return web.json_response(document())


if __name__ == "__main__":
    print(json.dumps(document(), indent=2))
