"""Readable output for the operator CLI: ``render(view)`` as aligned tables or field lists.

One renderer per view of ``operator_views``; ``--json`` prints the API's JSON instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import singledispatch
from typing import Any

from maildaemon.operator import views as v
from maildaemon.store.operator import records


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value is not None else "-"


def cell(value: Any, width: int = 60) -> str:
    if value is None:
        return "-"
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cursor: str | None = None) -> str:
    cells = [[cell(c) for c in row] for row in rows]
    if not cells:
        return "(none)"
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    more = [f"(more: --cursor {cursor})"] if cursor else []
    return "\n".join([line.rstrip() for line in lines] + more)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {cell(value, 200)}" for k, value in pairs)


def _reply(code: int | None, text: str | None) -> str | None:
    return f"{code or ''} {text or ''}".strip() or None


def _still_owed(d: v.DeliveryDetail) -> str:
    """Recipients still owed the message: NULL in the row means all of them — but only
    while the delivery can still be attempted; once it has ended nobody is owed it."""
    pending = d.recipients.pending
    if pending is not None:
        return ", ".join(pending) or "none"
    return "all recipients" if d.status in ("queued", "sending") else "none"


@singledispatch
def render(view: Any) -> str:
    raise TypeError(f"no text form for {type(view).__name__}")


@render.register
def _(d: v.DeliveryDetail) -> str:
    plan, r = d.retry_plan, d.recipients
    template = f"{d.template_id} ({d.locale or 'default locale'})" if d.template_id else None
    parts = [
        fields(
            [
                ("delivery", d.delivery_id),
                ("status", d.status),
                ("reason", d.status_reason),
                ("source", d.source),
                ("priority", d.priority),
                ("template", template or d.payload_mode),
                ("to", ", ".join(r.to)),
                ("cc", ", ".join(r.cc) or None),
                ("bcc", ", ".join(r.bcc) or None),
                ("still owed", _still_owed(d)),
                ("created", when(d.created_at)),
                ("send at", when(d.send_at)),
                ("expires", when(d.expires_at)),
                ("finished", when(d.finished_at)),
                ("message id", d.message_id),
                ("stream entry", d.stream_entry_id),
                (
                    "last error",
                    _reply(d.last_error.reply_code, d.last_error.reply_text)
                    if d.last_error
                    else None,
                ),
                ("next attempt", "running now" if plan.in_flight else when(plan.next_attempt_at)),
                (
                    "attempts",
                    f"{d.attempt_count} made, {plan.attempts_remaining} remaining"
                    + (" (sending paused)" if plan.paused else ""),
                ),
                ("gives up at", when(plan.gives_up_at)),
            ]
        )
    ]
    if d.attempts:
        parts.append(
            table(
                ["#", "status", "started", "finished", "code", "reply"],
                [
                    [
                        a.attempt_no,
                        a.status,
                        when(a.started_at),
                        when(a.finished_at),
                        a.reply_code,
                        a.reply_text,
                    ]
                    for a in d.attempts
                ],
            )
        )
    if d.reports:
        parts.append(
            table(
                ["report", "received", "kind", "match", "recipient", "status", "effect"],
                [
                    [
                        e.report_id,
                        when(e.received_at),
                        e.kind,
                        e.match_status,
                        line.get("address"),
                        line.get("status") or line.get("diagnostic"),
                        line.get("effect"),
                    ]
                    for e in d.reports
                    for line in (e.recipients or [{}])
                ],
            )
        )
    if d.dead_letter is not None:
        dl = d.dead_letter
        parts.append(
            fields(
                [
                    ("dead letter", when(dl.created_at)),
                    (
                        "reviewed",
                        f"{when(dl.reviewed_at)} by {dl.reviewed_by}: {dl.review_note}"
                        if dl.reviewed_at
                        else "no",
                    ),
                    (
                        "requeued",
                        f"{when(dl.requeued_at)} by {dl.requeued_by}" if dl.requeued_at else "no",
                    ),
                ]
            )
        )
    return "\n\n".join(parts)


@render.register
def _(page: records.DeliveryPage) -> str:
    return table(
        ["delivery", "status", "source", "to", "attempts", "created", "next attempt", "last reply"],
        [
            [
                d.delivery_id,
                d.status,
                d.source,
                ", ".join(d.to),
                d.attempt_count,
                when(d.created_at),
                when(d.next_attempt_at),
                _reply(d.last_reply_code, d.last_reply_text),
            ]
            for d in page.items
        ],
        page.next_cursor,
    )


@render.register
def _(page: records.DeadLetterPage) -> str:
    return table(
        [
            "delivery",
            "source",
            "to",
            "dead since",
            "attempts",
            "last reply",
            "reviewed",
            "requeued",
        ],
        [
            [
                d.delivery_id,
                d.source,
                ", ".join(d.to),
                when(d.created_at),
                d.attempt_count,
                _reply(d.last_reply_code, d.last_reply_text),
                d.reviewed_by or "no",
                d.requeued_by or "no",
            ]
            for d in page.items
        ],
        page.next_cursor,
    )


@render.register
def _(page: records.MalformedPage) -> str:
    return table(
        ["id", "stream entry", "received", "code", "detail", "replayed as"],
        [
            [
                c.id,
                c.stream_entry_id,
                when(c.received_at),
                c.failure_code,
                c.failure_detail,
                c.replayed_delivery_id,
            ]
            for c in page.items
        ],
        page.next_cursor,
    )


@render.register
def _(page: records.SuppressionPage) -> str:
    return table(
        ["address", "reason", "since", "expires", "by"],
        [
            [s.address, s.reason, when(s.created_at), when(s.expires_at), s.created_by]
            for s in page.items
        ],
        page.next_cursor,
    )


@render.register
def _(page: records.OperatorActionPage) -> str:
    return table(
        ["id", "at", "actor", "action", "target", "reason"],
        [[a.id, when(a.at), a.actor, a.action, a.target, a.reason] for a in page.items],
        page.next_cursor,
    )


@render.register
def _(c: records.DeliveryChange) -> str:
    if c.dry_run:
        return (
            f"dry run, nothing changed: {c.delivery_id} is {c.previous_status} and would "
            f"become {c.status}"
        )
    due = f", due {when(c.next_attempt_at)}" if c.next_attempt_at else ""
    return f"{c.delivery_id}: {c.previous_status} -> {c.status}{due} (action {c.action_id})"


@render.register
def _(r: records.Review) -> str:
    return f"{r.delivery_id}: reviewed by {r.reviewed_by} (action {r.action_id})"


@render.register
def _(b: records.BulkRequeue) -> str:
    due = f"due {when(b.first_due_at)} to {when(b.last_due_at)}"
    if b.dry_run:
        head = (
            f"dry run, nothing changed: {b.matched} dead letter(s) match; "
            f"{b.would_requeue} would be requeued, {due}"
        )
        shown = len(b.delivery_ids)
        more = f" (first {shown})" if shown < b.would_requeue else ""
        return head + (f"\nwould requeue{more}: " + ", ".join(b.delivery_ids) if shown else "")
    return (
        f"requeued {b.requeued} of {b.matched} matching dead letter(s), {due} "
        f"(action {b.action_id})"
    )


@render.register
def _(r: v.Replay) -> str:
    would = "would be " if r.dry_run else ""
    head = (
        "dry run, nothing changed: " if r.dry_run else ""
    ) + f"{r.matched} matching, {r.accepted} {would}accepted, {r.still_invalid} still invalid"
    if not r.dry_run:
        head += f" (action {r.action_id})"
    if not r.items:
        return head
    return (
        head
        + "\n"
        + table(
            ["id", "stream entry", "outcome", "delivery", "failure"],
            [
                [
                    i.id,
                    i.stream_entry_id,
                    i.outcome,
                    i.delivery_id,
                    f"{i.failure_code}: {i.failure_detail}" if i.failure_code else None,
                ]
                for i in r.items
            ],
        )
    )


@render.register
def _(t: records.CommandTrace) -> str:
    bad = t.malformed
    return fields(
        [
            ("stream entry", t.stream_entry_id),
            ("outcome", t.outcome),
            ("delivery", t.delivery.delivery_id if t.delivery else None),
            ("status", t.delivery.status if t.delivery else None),
            ("duplicate of", t.duplicate_of),
            ("malformed", f"#{bad.id} {bad.failure_code}: {bad.failure_detail}" if bad else None),
        ]
    )


@render.register
def _(p: records.PauseChange) -> str:
    what = "all sources" if p.scope == "*" else f"source {p.scope}"
    verb = "paused" if p.paused else "resumed"
    return f"sending {verb} for {what}" + ("" if p.changed else f" (already {verb})")


@render.register
def _(s: records.SuppressionChange) -> str:
    verb = "suppressed" if s.suppressed else "removed"
    return f"{s.address}: {verb} (action {s.action_id})"


@render.register
def _(s: records.Stats) -> str:
    pauses = ", ".join(
        f"{p.scope} (by {p.paused_by} since {when(p.paused_at)})" for p in s.sending.pauses
    )
    by_status = "  ".join(f"{k}={n}" for k, n in s.deliveries_by_status.items() if n)
    attempts = "  ".join(f"{k}={n}" for k, n in s.attempts_last_hour.items() if n)
    return fields(
        [
            ("deliveries", by_status or "none"),
            ("due now", f"{s.backlog.due} (oldest {s.backlog.oldest_due_age_seconds:.1f}s)"),
            ("scheduled", s.backlog.scheduled),
            ("in flight", s.backlog.in_flight),
            (
                "dead letters",
                f"{s.dead_letters.unreviewed} unreviewed, {s.dead_letters.open} "
                f"open, {s.dead_letters.total} total",
            ),
            ("malformed (1h)", s.malformed_commands_last_hour),
            ("attempts (1h)", attempts or "none"),
            ("paused", pauses or "no"),
        ]
    )
