"""Operator API reads: deliveries, dead letters, malformed commands, stream entries, figures.

Open to the internal network; JSON views from ``operator_model``; listings are newest
first with an opaque ``next_cursor``.
"""

from __future__ import annotations

from aiohttp import web

from maildaemon.errors import NotFound
from maildaemon.http.keys import RETRY_KEY
from maildaemon.http.respond import operator_store, query_pairs, reply
from maildaemon.operator import inputs
from maildaemon.operator.model import delivery_detail


async def get_delivery(request: web.Request) -> web.Response:
    delivery_id = inputs.delivery_id(request.match_info["delivery_id"])
    inputs.parse_query(query_pairs(request), ())
    record = await operator_store(request).delivery(delivery_id)
    if record is None:
        raise NotFound(f"no delivery {delivery_id!r}", field="delivery_id")
    return reply(delivery_detail(record, request.app[RETRY_KEY]))


async def list_deliveries(request: web.Request) -> web.Response:
    flt, page = inputs.delivery_query(query_pairs(request))
    return reply(await operator_store(request).deliveries(flt, page))


async def list_dead_letters(request: web.Request) -> web.Response:
    flt, page = inputs.dead_letter_query(query_pairs(request))
    return reply(await operator_store(request).dead_letters(flt, page))


async def list_malformed(request: web.Request) -> web.Response:
    flt, page = inputs.malformed_query(query_pairs(request))
    return reply(await operator_store(request).malformed(flt, page))


async def get_command(request: web.Request) -> web.Response:
    entry_id = inputs.stream_entry_id(request.match_info["stream_entry_id"])
    inputs.parse_query(query_pairs(request), ())
    trace = await operator_store(request).command_trace(entry_id)
    if trace is None:
        raise NotFound(
            f"stream entry {entry_id} left no trace (unknown, not yet read, or "
            "removed by retention)",
            field="stream_entry_id",
        )
    return reply(trace)


async def get_stats(request: web.Request) -> web.Response:
    inputs.parse_query(query_pairs(request), ())
    return reply(await operator_store(request).stats())


async def get_sending(request: web.Request) -> web.Response:
    inputs.parse_query(query_pairs(request), ())
    return reply(await operator_store(request).sending_state())


async def list_suppressions(request: web.Request) -> web.Response:
    flt, page = inputs.suppression_query(query_pairs(request))
    return reply(await operator_store(request).suppressions(flt, page))


async def list_actions(request: web.Request) -> web.Response:
    flt, page = inputs.action_query(query_pairs(request))
    return reply(await operator_store(request).actions(flt, page))
