"""The OpenAPI 3.1 document of the internal HTTP API, served at /api/v1/internal/openapi.json.

Built from the route table it describes (``routes.OPERATIONS``, which also registers the
routes): response schemas from the views and store records, request bodies from the
``operator.bodies`` models, query parameters from their ``Param`` specs.
``python -m maildaemon.http.openapi`` prints it.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from aiohttp import web
from pydantic import TypeAdapter

from maildaemon import __version__
from maildaemon.http.keys import PREFIX
from maildaemon.http.routes import OPERATIONS, Op
from maildaemon.operator import inbox, inputs
from maildaemon.operator import views as v

_REF = "#/components/schemas/{model}"


_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "delivery_id": {"type": "string", "pattern": inputs.DELIVERY_ID, "maxLength": 128},
    "stream_entry_id": {"type": "string", "pattern": inputs.STREAM_ENTRY_ID},
    "id": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
    "endpoint_id": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
    "name": {"type": "string", "pattern": inbox.NAME},
    "report_id": {"type": "integer", "minimum": 1, "maximum": 2**62},
    "template_id": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_.-]{0,63}$"},
}


_STATUS_TEXT = {
    400: "Invalid input; `error.field` names the parameter or body field.",
    401: "Missing or wrong token (actions: an operator token; reads, when "
    "MAIL_OPERATOR_READ_TOKEN is set: it or an operator token).",
    403: "Operator actions are disabled (no operator token is configured).",
    404: "No such object.",
    409: "The object is not in a state that allows this action.",
    413: "The request body is too large.",
    503: "PostgreSQL is unavailable, or the query ran past MAIL_API_STATEMENT_TIMEOUT "
    "(`error.code` query_timeout); try again later.",
}

_ACTOR_HEADER = {
    "name": "X-Operator",
    "in": "header",
    "required": False,
    "description": "A note on who acts, when the body has no `actor` (kept in the audit "
    "detail; the recorded actor is the token's identity).",
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
    if op.media_type != "application/json":
        binary = {"type": "string", "contentMediaType": op.media_type}
        responses["200"] = {"description": "OK", "content": {op.media_type: {"schema": binary}}}
    error = _ref(v.ErrorBody)
    statuses = set(op.errors) | ({503} if op.path.startswith(PREFIX) else set())
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": _operation_id(op),
        "tags": list(op.tags),
    }
    if op.method == "get" and op.path.startswith(PREFIX):
        # Open unless MAIL_OPERATOR_READ_TOKEN is set: then it or an operator token.
        out["security"] = [{}, {"operatorToken": []}]
        statuses |= {401}
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
    kinds: list[type[Any]] = [
        op.response for op in OPERATIONS if op.media_type == "application/json"
    ] + [v.ErrorBody]
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
            "catalog_hash": {
                "type": ["string", "null"],
                "description": "Content hash of the template catalog this process loaded.",
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "maildaemon internal API",
            "version": __version__,
            "description": "Delivery lookup and operator repair on MAIL_INTERNAL_HTTP_ADDR. "
            "Reads are open to the internal network unless MAIL_OPERATOR_READ_TOKEN is set "
            "(then they need it or an operator token); actions (POST) need "
            "`Authorization: Bearer <operator token>` (MAIL_OPERATOR_TOKEN or one of "
            "MAIL_OPERATOR_TOKENS) and are recorded in the audit trail under the token's "
            "identity. Times are ISO-8601 UTC.",
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
