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
from maildaemon.store.operator.actions import OperatorStore
from maildaemon.store.operator.records import Actor, MalformedCommand
from maildaemon.store.replicas import Replica


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
    who: Actor,
    reason: str | None,
    dry_run: bool = False,
) -> Replay:
    """Replay one record; Conflict if it was replayed already or is still invalid.

    A dry run validates only and writes nothing; a still-invalid record is then reported
    (``still_invalid`` 1) rather than refused."""
    record = await store.malformed_by_id(malformed_id)
    if record is None:
        raise NotFound(f"no malformed command {malformed_id}", field="id")
    if record.replayed_at is not None:
        raise Conflict(
            f"malformed command {malformed_id} was replayed already (delivery "
            f"{record.replayed_delivery_id!r})",
            code="already_replayed",
        )
    result = await _replay(store, policy, window, [record], 1, dry_run, who, reason)
    if not result.items:
        raise Conflict(
            f"malformed command {malformed_id} was replayed meanwhile", code="already_replayed"
        )
    item = result.items[0]
    if item.outcome == "still_invalid" and not dry_run:
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
    who: Actor,
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
        who,
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
    who: Actor,
    reason: str | None,
    detail: dict[str, object] | None = None,
) -> Replay:
    items, valid = _judge(records, policy)
    action_id = None
    if not dry_run:
        invalid = [i.id for i in items.values() if i.outcome == "still_invalid"]
        outcome, action_id = await store.replay(
            valid,
            window,
            who,
            reason,
            {**(detail or {}), "matched": matched, "still_invalid": invalid},
        )
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


def _judge(
    records: list[MalformedCommand], policy: CommandPolicy
) -> tuple[dict[int, ReplayItem], list[tuple[int, IntakeEntry]]]:
    """Each record validated again: its report item, and the entries intake would take."""
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
    return items, valid


_CLI_ADVICE = (
    "restart the daemon to load it, or replay through its API "
    "(POST /api/v1/internal/malformed-commands/…/replay), which judges with the catalog it "
    "renders from"
)


def judge_alike(
    live: list[Replica],
    catalog_hash: str,
    policy_hash: str,
    template_dir: str,
    advice: str = _CLI_ADVICE,
) -> None:
    """Refuse (Conflict ``judgement_differs``) unless every running replica judges commands
    the way ``catalog_hash`` / ``policy_hash`` would: same catalog, same intake policy.

    With no replica running, the catalog on disk is what the next daemon loads."""
    catalogs = {r.catalog_hash for r in live}
    policies = {r.policy_hash for r in live}
    names = ", ".join(r.consumer_name for r in live)
    if len(catalogs) > 1 or len(policies) > 1:
        raise Conflict(
            f"the running replicas ({names}) judge commands differently (a rollout in "
            "progress?); replay once they agree, or through one daemon's API",
            code="judgement_differs",
        )
    if catalogs and catalog_hash not in catalogs:
        raise Conflict(
            f"the running daemon ({names}) loaded template catalog {_short(catalogs)} but "
            f"{template_dir} holds {catalog_hash[:12]}: {advice}",
            code="judgement_differs",
        )
    if policies and policy_hash not in policies:
        raise Conflict(
            f"the running daemon ({names}) validates with other settings (MAIL_ALLOWED_*, "
            "limits) than this CLI's environment: use the daemon's MAIL_* settings, or "
            "replay through its API",
            code="judgement_differs",
        )


def _short(values: set[str]) -> str:
    return next(iter(values))[:12]
