"""The internal HTTP API's route table: one ``Op`` per route — its handler and what the
OpenAPI document says about it. ``app.build_app`` registers the routes from this table and
``openapi.document`` describes the same table, so the two cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from maildaemon.http import actions, console_api, probes, reads
from maildaemon.http.keys import PREFIX
from maildaemon.http.respond import Handler
from maildaemon.operator import bodies, inbox, inputs, mailview
from maildaemon.operator import views as v
from maildaemon.store.operator import records


@dataclass(frozen=True)
class Op:
    handler: Handler
    method: str
    path: str
    summary: str
    response: type[Any]
    params: tuple[inputs.Param, ...] = ()
    path_params: tuple[str, ...] = ()
    body: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    tags: tuple[str, ...] = field(default_factory=tuple)
    media_type: str = "application/json"  # of the 200 response


_P = PREFIX
OPERATIONS = (
    Op(
        probes.healthz,
        "get",
        "/healthz",
        "Liveness: the process answers.",
        v.Health,
        tags=("probes",),
    ),
    Op(
        reads.list_deliveries,
        "get",
        f"{_P}/deliveries",
        "Deliveries, newest first (keyset pagination).",
        records.DeliveryPage,
        inputs.DELIVERY_PARAMS,
        errors=(400,),
        tags=("deliveries",),
    ),
    Op(
        reads.get_delivery,
        "get",
        f"{_P}/deliveries/{{delivery_id}}",
        "One delivery with its attempts, dead letter and retry plan.",
        v.DeliveryDetail,
        path_params=("delivery_id",),
        errors=(400, 404),
        tags=("deliveries",),
    ),
    Op(
        actions.requeue,
        "post",
        f"{_P}/deliveries/{{delivery_id}}/requeue",
        "Requeue a dead-lettered or "
        "failed delivery: queued, due now, the retry ladder starts over, attempts kept.",
        records.DeliveryChange,
        path_params=("delivery_id",),
        body=bodies.DeliveryActionBody,
        errors=(400, 404, 409),
        tags=("deliveries",),
    ),
    Op(
        actions.cancel,
        "post",
        f"{_P}/deliveries/{{delivery_id}}/cancel",
        "Cancel a queued (due or scheduled) delivery; it is never sent.",
        records.DeliveryChange,
        path_params=("delivery_id",),
        body=bodies.DeliveryActionBody,
        errors=(400, 404, 409),
        tags=("deliveries",),
    ),
    Op(
        reads.list_dead_letters,
        "get",
        f"{_P}/dead-letters",
        "Dead letters: unreviewed first, then newest first.",
        records.DeadLetterPage,
        inputs.DEAD_LETTER_PARAMS,
        errors=(400,),
        tags=("dead letters",),
    ),
    Op(
        actions.review,
        "post",
        f"{_P}/dead-letters/{{delivery_id}}/review",
        "Mark a dead letter reviewed.",
        records.Review,
        path_params=("delivery_id",),
        body=bodies.ReviewBody,
        errors=(400, 404),
        tags=("dead letters",),
    ),
    Op(
        actions.bulk_requeue,
        "post",
        f"{_P}/dead-letters/requeue",
        "Requeue the dead letters matching a filter "
        "(dry run: count only), released at a given rate.",
        records.BulkRequeue,
        body=bodies.BulkRequeueBody,
        errors=(400, 409),
        tags=("dead letters",),
    ),
    Op(
        reads.list_malformed,
        "get",
        f"{_P}/malformed-commands",
        "Stream entries refused at intake, newest first.",
        records.MalformedPage,
        inputs.MALFORMED_PARAMS,
        errors=(400,),
        tags=("malformed commands",),
    ),
    Op(
        actions.replay_one,
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
        actions.replay_bulk,
        "post",
        f"{_P}/malformed-commands/replay",
        "Replay refused entries by failure code (dry run: validate only).",
        v.Replay,
        body=bodies.BulkReplayBody,
        errors=(400, 409),
        tags=("malformed commands",),
    ),
    Op(
        reads.get_command,
        "get",
        f"{_P}/commands/{{stream_entry_id}}",
        "What became of one stream entry.",
        records.CommandTrace,
        path_params=("stream_entry_id",),
        errors=(400, 404),
        tags=("malformed commands",),
    ),
    Op(
        console_api.get_stats,
        "get",
        f"{_P}/stats",
        "The figures an operator checks first; with `window`, counts per interval too.",
        records.Stats,
        console_api.STATS_PARAMS,
        errors=(400,),
        tags=("figures",),
    ),
    Op(
        reads.get_sending,
        "get",
        f"{_P}/sending",
        "Whether sending is paused, globally or per source.",
        records.SendingState,
        errors=(400,),
        tags=("sending",),
    ),
    Op(
        actions.pause,
        "post",
        f"{_P}/sending/pause",
        "Pause sending (claiming stops, intake goes on), for "
        "one source or all; shared by every replica, survives restarts.",
        records.PauseChange,
        body=bodies.PauseBody,
        errors=(400,),
        tags=("sending",),
    ),
    Op(
        actions.resume,
        "post",
        f"{_P}/sending/resume",
        "Resume sending for one source or all.",
        records.PauseChange,
        body=bodies.PauseBody,
        errors=(400,),
        tags=("sending",),
    ),
    Op(
        reads.list_suppressions,
        "get",
        f"{_P}/suppressions",
        "The suppression list, by address.",
        records.SuppressionPage,
        inputs.SUPPRESSION_PARAMS,
        errors=(400,),
        tags=("suppressions",),
    ),
    Op(
        actions.add_suppression,
        "post",
        f"{_P}/suppressions",
        "Add (or replace) a suppression.",
        records.SuppressionChange,
        body=bodies.SuppressionAddBody,
        errors=(400,),
        tags=("suppressions",),
    ),
    Op(
        actions.remove_suppression,
        "post",
        f"{_P}/suppressions/remove",
        "Remove a suppression.",
        records.SuppressionChange,
        body=bodies.SuppressionRemoveBody,
        errors=(400, 404),
        tags=("suppressions",),
    ),
    Op(
        reads.list_actions,
        "get",
        f"{_P}/operator-actions",
        "The audit trail of operator actions, newest first.",
        records.OperatorActionPage,
        inputs.ACTION_PARAMS,
        errors=(400,),
        tags=("audit",),
    ),
    # Added for the operator console (issue 13).
    Op(
        console_api.get_message,
        "get",
        f"{_P}/deliveries/{{delivery_id}}/message",
        "The exact bytes sent (message/rfc822), as rendered and pinned at the first attempt.",
        bytes,
        path_params=("delivery_id",),
        errors=(400, 404, 409),
        tags=("deliveries",),
        media_type="message/rfc822",
    ),
    Op(
        console_api.get_rendered,
        "get",
        f"{_P}/deliveries/{{delivery_id}}/rendered",
        "The pinned message parsed: headers, text, HTML, attachments and source.",
        mailview.MessageView,
        path_params=("delivery_id",),
        errors=(400, 404, 409),
        tags=("deliveries",),
    ),
    Op(
        console_api.get_delivery_malformed,
        "get",
        f"{_P}/deliveries/{{delivery_id}}/malformed",
        "Stream entries refused at intake that named this delivery id, newest first.",
        records.MalformedPage,
        path_params=("delivery_id",),
        errors=(400,),
        tags=("malformed commands",),
    ),
    Op(
        console_api.get_preview,
        "get",
        f"{_P}/templates/{{template_id}}/preview",
        "Render a template with the daemon's loaded catalog, without sending.",
        console_api.Preview,
        console_api.PREVIEW_PARAMS,
        path_params=("template_id",),
        errors=(400, 404),
        tags=("templates",),
    ),
    Op(
        console_api.list_inbox,
        "get",
        f"{_P}/dev/inbox",
        "`maildaemon dev` only: the mail the SMTP sink caught, newest first.",
        inbox.InboxPage,
        console_api.INBOX_PARAMS,
        errors=(400, 404),
        tags=("dev inbox",),
    ),
    Op(
        console_api.get_caught,
        "get",
        f"{_P}/dev/inbox/{{name}}",
        "`maildaemon dev` only: one caught message, parsed.",
        console_api.CaughtMessage,
        path_params=("name",),
        errors=(400, 404),
        tags=("dev inbox",),
    ),
    Op(
        console_api.get_caught_raw,
        "get",
        f"{_P}/dev/inbox/{{name}}/raw",
        "`maildaemon dev` only: one caught message as received (message/rfc822).",
        bytes,
        path_params=("name",),
        errors=(400, 404),
        tags=("dev inbox",),
        media_type="message/rfc822",
    ),
)
