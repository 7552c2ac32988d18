"""Operator API reads of reports (bounces, complaints, delays): recent ones with their match
status, and one report's raw bytes (message/rfc822, as received)."""

from __future__ import annotations

from aiohttp import web

from maildaemon.errors import NotFound
from maildaemon.http.keys import STORE_KEY
from maildaemon.http.respond import eml, query_pairs, reply
from maildaemon.operator import inputs
from maildaemon.reports.model import KINDS, MATCH_STATUSES
from maildaemon.store.reports.db import ReportStore
from maildaemon.store.reports.records import ReportPage

REPORT_PARAMS = (
    inputs.Param(
        "match_status",
        {"type": "string", "enum": list(MATCH_STATUSES)},
        "Only reports with this match status.",
        inputs.enum_of(MATCH_STATUSES),
    ),
    inputs.Param(
        "kind",
        {"type": "string", "enum": list(KINDS)},
        "Only reports of this kind.",
        inputs.enum_of(KINDS),
    ),
    inputs.P_LIMIT,
    inputs.Param(
        "before",
        {"type": "integer", "minimum": 1},
        "Only reports older than this report id (the previous page's next_before).",
        inputs.int_between(1, 2**62),
    ),
)


def _reports(request: web.Request) -> ReportStore:
    return ReportStore(request.app[STORE_KEY].pool)


async def list_reports(request: web.Request) -> web.Response:
    q = inputs.parse_query(query_pairs(request), REPORT_PARAMS)
    limit = q["limit"] or inputs.DEFAULT_LIMIT
    items = await _reports(request).recent(limit, q["before"], q["match_status"], q["kind"])
    return reply(ReportPage(items, items[-1].report_id if len(items) == limit else None))


RATE_PARAMS = (
    inputs.Param(
        "hours",
        {"type": "integer", "minimum": 1, "maximum": 720},
        "The window, in hours (default 24).",
        inputs.int_between(1, 720),
    ),
)


async def get_rates(request: web.Request) -> web.Response:
    q = inputs.parse_query(query_pairs(request), RATE_PARAMS)
    return reply(await _reports(request).rates(q["hours"] or 24))


def _report_id(request: web.Request) -> int:
    text = request.match_info["report_id"]
    return int(inputs.int_between(1, 2**62)(text, "report_id"))


async def get_report_raw(request: web.Request) -> web.Response:
    report_id = _report_id(request)
    inputs.parse_query(query_pairs(request), ())
    raw = await _reports(request).raw(report_id)
    if raw is None:
        raise NotFound(f"no report {report_id} (unknown, or removed by retention)")
    return eml(raw, f"report-{report_id}")
