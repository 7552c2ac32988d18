"""Malformed command replay: validate a stored entry again and take it in if it now passes.

A command refused at intake (say, for a template not deployed yet) is kept in
``mail.malformed_commands`` with its raw text. Replay checks that text against the daemon's
current ``CommandPolicy``, exactly as the stream consumer would, and hands the ones that pass
to the same intake transaction, under their original stream entry id.
"""

from __future__ import annotations

import json

from maildaemon.contract.command import COMMAND_FIELD, CommandPolicy, DeliveryCommand, Rejection
from maildaemon.contract.parsing import parse_command, parse_entry
from maildaemon.delivery import IntakeEntry
from maildaemon.errors import Conflict, NotFound
from maildaemon.operator.views import Replay, ReplayItem
from maildaemon.store.operator import OperatorStore
from maildaemon.store.records import MalformedCommand


def revalidate(record: MalformedCommand, policy: CommandPolicy) -> DeliveryCommand | Rejection:
    """The stored entry checked again, as the consumer checks a fresh one."""
    if record.raw_truncated:
        return Rejection(
            "too_large",
            "the stored entry was truncated; it cannot be replayed",
            record.delivery_id,
            record.source,
        )
    fields = _entry_fields(record.raw)
    if fields is not None:
        return parse_entry(fields, policy)
    return parse_command(record.raw, policy)


def _entry_fields(raw: str) -> dict[str, str] | None:
    """The entry's field map when the record holds one (the entry had more than ``command``)."""
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if (
        isinstance(document, dict)
        and COMMAND_FIELD in document
        and all(isinstance(v, str) for v in document.values())
    ):
        return document
    return None


async def replay_one(
    store: OperatorStore,
    policy: CommandPolicy,
    window: float,
    malformed_id: int,
    actor: str,
    reason: str | None,
) -> Replay:
    """Replay one record; Conflict if it was replayed already or is still invalid."""
    record = await store.malformed_by_id(malformed_id)
    if record is None:
        raise NotFound(f"no malformed command {malformed_id}", field="id")
    if record.replayed_at is not None:
        raise Conflict(
            f"malformed command {malformed_id} was replayed already (delivery "
            f"{record.replayed_delivery_id!r})",
            code="already_replayed",
        )
    result = await _replay(store, policy, window, [record], 1, False, actor, reason)
    if not result.items:
        raise Conflict(
            f"malformed command {malformed_id} was replayed meanwhile", code="already_replayed"
        )
    item = result.items[0]
    if item.outcome == "still_invalid":
        raise Conflict(
            f"still invalid: {item.failure_code}: {item.failure_detail}", code="still_invalid"
        )
    return result


async def replay_bulk(
    store: OperatorStore,
    policy: CommandPolicy,
    window: float,
    failure_code: str,
    source: str | None,
    limit: int,
    dry_run: bool,
    actor: str,
    reason: str | None,
) -> Replay:
    """Replay up to ``limit`` unreplayed records with this failure code, oldest first."""
    matched, records = await store.replayable(failure_code, source, limit)
    return await _replay(
        store,
        policy,
        window,
        records,
        matched,
        dry_run,
        actor,
        reason,
        {"failure_code": failure_code, "source": source},
    )


async def _replay(
    store: OperatorStore,
    policy: CommandPolicy,
    window: float,
    records: list[MalformedCommand],
    matched: int,
    dry_run: bool,
    actor: str,
    reason: str | None,
    detail: dict[str, object] | None = None,
) -> Replay:
    items: dict[int, ReplayItem] = {}
    valid: list[tuple[int, IntakeEntry]] = []
    for record in records:
        parsed = revalidate(record, policy)
        if isinstance(parsed, Rejection):
            items[record.id] = ReplayItem(
                record.id,
                record.stream_entry_id,
                "still_invalid",
                None,
                parsed.failure_code,
                parsed.failure_detail,
            )
            continue
        valid.append((record.id, IntakeEntry(record.stream_entry_id, parsed, None, "")))
        items[record.id] = ReplayItem(
            record.id, record.stream_entry_id, "accepted", parsed.delivery_id, None, None
        )
    action_id = None
    if valid and not dry_run:
        outcome, action_id = await store.replay(valid, window, actor, reason, detail or {})
        for malformed_id, _ in valid:
            entry = items.pop(malformed_id)
            if malformed_id not in outcome:
                continue  # replayed by someone else meanwhile
            kind, delivery_id, rejection = outcome[malformed_id]
            items[malformed_id] = ReplayItem(
                malformed_id,
                entry.stream_entry_id,
                kind,
                delivery_id,
                rejection.failure_code if rejection else None,
                rejection.failure_detail if rejection else None,
            )
    ordered = [items[r.id] for r in records if r.id in items]
    accepted = sum(1 for i in ordered if i.outcome != "still_invalid")
    return Replay(
        dry_run=dry_run,
        matched=matched,
        accepted=accepted,
        still_invalid=len(ordered) - accepted,
        items=ordered,
        action_id=action_id,
    )
