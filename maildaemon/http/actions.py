"""Operator API actions: requeue, cancel, review, bulk requeue, replay, pause, suppressions.

Each needs an operator token (see ``respond.guarded``) and is recorded in
``mail.operator_actions`` in the same transaction as the change: who (the identity of the
token used; the body's ``actor`` or the ``X-Operator`` header is only kept as a note) and
why (``reason``). Requeue, cancel and both replays take ``dry_run``: judge and report,
write nothing; every action's reply says ``dry_run``.
"""

from __future__ import annotations

from aiohttp import web

from maildaemon.contract.command import CommandPolicy
from maildaemon.errors import Unavailable
from maildaemon.http.keys import CATALOG_HASH_KEY, POLICY_KEY, SETTINGS_KEY
from maildaemon.http.respond import identity, operator_store, reply
from maildaemon.operator import bodies, inputs, replay
from maildaemon.store import replicas
from maildaemon.store.operator.filters import GLOBAL_SCOPE
from maildaemon.store.operator.records import Actor


async def _body(request: web.Request, model: type[bodies.M]) -> bodies.M:
    return bodies.parse_body(model, await request.read())


def _who(request: web.Request, body: bodies.Body) -> Actor:
    note = inputs.actor_note(body.actor, request.headers.get("X-Operator"))
    return Actor(identity(request), note)


async def requeue(request: web.Request) -> web.Response:
    delivery_id = inputs.delivery_id(request.match_info["delivery_id"])
    body = await _body(request, bodies.DeliveryActionBody)
    change = await operator_store(request).requeue(
        delivery_id, _who(request, body), body.reason, body.dry_run
    )
    return reply(change)


async def cancel(request: web.Request) -> web.Response:
    delivery_id = inputs.delivery_id(request.match_info["delivery_id"])
    body = await _body(request, bodies.DeliveryActionBody)
    change = await operator_store(request).cancel(
        delivery_id, _who(request, body), body.reason, body.dry_run
    )
    return reply(change)


async def review(request: web.Request) -> web.Response:
    delivery_id = inputs.delivery_id(request.match_info["delivery_id"])
    body = await _body(request, bodies.ReviewBody)
    done = await operator_store(request).review(
        delivery_id, _who(request, body), body.note, body.reason
    )
    return reply(done)


async def bulk_requeue(request: web.Request) -> web.Response:
    body = await _body(request, bodies.BulkRequeueBody)
    flt = inputs.dead_letter_filter(
        {
            "source": body.source,
            "reply_code": body.reply_code,
            "reply_class": body.reply_class,
            "recipient_domain": body.recipient_domain.lower() if body.recipient_domain else None,
            "created_after": body.created_after,
            "created_before": body.created_before,
        }
    )
    result = await operator_store(request).bulk_requeue(
        flt,
        body.limit,
        body.rate_per_second,
        _who(request, body),
        body.reason,
        body.dry_run,
    )
    return reply(result)


async def _policy(request: web.Request) -> CommandPolicy:
    """This daemon's intake policy, once every other live replica judges alike: a replayed
    delivery may be claimed and rendered by any of them (a rollout in progress: 409)."""
    policy = request.app.get(POLICY_KEY)
    catalog_hash = request.app.get(CATALOG_HASH_KEY)
    if policy is None or catalog_hash is None:
        raise Unavailable(
            "replay needs the daemon's template catalog, which this listener was not given",
            code="replay_unavailable",
        )
    me = request.app[SETTINGS_KEY].consumer_name
    others = [r for r in await replicas.live(operator_store(request).pool) if r.consumer_name != me]
    replay.judge_alike(
        others,
        catalog_hash,
        policy.fingerprint(),
        f"this daemon ({me})",
        "replay once every replica runs the same catalog (restart the others)",
    )
    return policy


async def replay_one(request: web.Request) -> web.Response:
    malformed_id = inputs.malformed_id(request.match_info["id"])
    body = await _body(request, bodies.ReplayBody)
    window = request.app[SETTINGS_KEY].idempotency_window
    result = await replay.replay_one(
        operator_store(request),
        await _policy(request),
        window,
        malformed_id,
        _who(request, body),
        body.reason,
        body.dry_run,
    )
    return reply(result)


async def replay_bulk(request: web.Request) -> web.Response:
    body = await _body(request, bodies.BulkReplayBody)
    window = request.app[SETTINGS_KEY].idempotency_window
    result = await replay.replay_bulk(
        operator_store(request),
        await _policy(request),
        window,
        body.failure_code,
        body.source,
        body.limit,
        body.dry_run,
        _who(request, body),
        body.reason,
    )
    return reply(result)


async def pause(request: web.Request) -> web.Response:
    body = await _body(request, bodies.PauseBody)
    change = await operator_store(request).pause(
        body.source or GLOBAL_SCOPE, _who(request, body), body.reason
    )
    return reply(change)


async def resume(request: web.Request) -> web.Response:
    body = await _body(request, bodies.PauseBody)
    change = await operator_store(request).resume(
        body.source or GLOBAL_SCOPE, _who(request, body), body.reason
    )
    return reply(change)


async def add_suppression(request: web.Request) -> web.Response:
    body = await _body(request, bodies.SuppressionAddBody)
    change = await operator_store(request).suppress(
        body.address, body.reason, body.expires_at, _who(request, body)
    )
    return reply(change)


async def remove_suppression(request: web.Request) -> web.Response:
    body = await _body(request, bodies.SuppressionRemoveBody)
    change = await operator_store(request).unsuppress(
        body.address, _who(request, body), body.reason
    )
    return reply(change)
