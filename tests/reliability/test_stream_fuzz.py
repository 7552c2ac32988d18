"""Stream fuzzing against the running daemon (invariants 1, 9 and "nothing unsafe on the wire").

Hypothesis generates batches of stream entries -- random JSON shapes, deep nesting, huge
and binary values, invalid UTF-8, every field with wrong types, CRLF and template syntax in
every text field, mixed with valid commands -- and the real daemon takes them in and sends
them to the STARTTLS sink. After each batch:

* every entry ended as exactly one delivery, idempotency hit or malformed record;
* nothing is pending (XPENDING is 0) and the consumer is alive (it takes a new command in);
* every accepted delivery was sent (accepted means sendable: none ends ``failed``);
* every message the sink received came over TLS and is well-formed: parsed by the stdlib
  in strict mode, only our headers and the allowed custom ones, no bare CR/LF, no Bcc.

Batches are generated up front (hypothesis' generate phase) and then run against one
daemon, so a failure names the offending entries instead of shrinking them.
``--long`` runs 25x more batches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from tests import strategies
from tests.support import Db, command, redis_client, running_app, wait_for
from tests.wire import assert_well_formed

MakeSettings = Callable[..., Settings]
Entry = dict[str, bytes | str]

ENTRY = st.uuids().flatmap(lambda u: strategies.stream_entry(f"fz-{u.hex[:20]}"))


def generate_batches(count: int, size: int) -> list[list[Entry]]:
    batches: list[list[Entry]] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(ENTRY, min_size=size // 2, max_size=size))
    def collect(entries: list[Entry]) -> None:
        batches.append(entries)

    collect()
    return batches


async def _accounting(db: Db, ids: list[str]) -> dict[str, int]:
    rows = await db.fetch(
        """
        SELECT id, count(*) AS n FROM (
            SELECT stream_entry_id AS id FROM mail.deliveries WHERE stream_entry_id = ANY($1)
            UNION ALL
            SELECT stream_entry_id FROM mail.command_replays WHERE stream_entry_id = ANY($1)
            UNION ALL
            SELECT stream_entry_id FROM mail.malformed_commands WHERE stream_entry_id = ANY($1)
        ) AS taken GROUP BY id
        """,
        ids,
    )
    return {r["id"]: r["n"] for r in rows}


async def _pending(settings: Settings) -> int:
    client = redis_client(settings.redis_master_addr)
    try:
        info = await client.xpending(settings.command_stream, settings.consumer_group)
        return int(info["pending"])
    finally:
        await client.aclose()


async def _run_batch(settings: Settings, db: Db, entries: list[Entry]) -> list[str]:
    client = redis_client(settings.redis_master_addr)
    try:
        pipe = client.pipeline(transaction=False)
        for fields in entries:
            pipe.xadd(settings.command_stream, fields)  # type: ignore[arg-type]
        ids = [i.decode() for i in await pipe.execute()]
    finally:
        await client.aclose()

    async def settled() -> bool:
        counts = await _accounting(db, ids)
        return len(counts) == len(ids) and await _pending(settings) == 0

    try:
        await wait_for(settled, timeout=90, interval=0.2)
    except AssertionError:
        counts = await _accounting(db, ids)
        missing = [(i, entries[n]) for n, i in enumerate(ids) if i not in counts]
        raise AssertionError(f"entries not taken in: {str(missing)[:2000]}") from None
    counts = await _accounting(db, ids)
    twice = {i: n for i, n in counts.items() if n != 1}
    assert not twice, f"entries recorded more than once: {twice}"
    return ids


async def _all_ended(db: Db) -> bool:
    open_rows = await db.fetchval(
        "SELECT count(*) FROM mail.deliveries WHERE status IN ('queued', 'sending')"
    )
    return open_rows == 0


@pytest.mark.timeout(1800)
async def test_stream_fuzzing_keeps_every_invariant(
    make_settings: MakeSettings, smtp_sink: SmtpSink, long_run: bool
) -> None:
    batches = generate_batches(count=50 if long_run else 3, size=40)
    settings = make_settings(attempt_worker_concurrency=4)
    custom = frozenset(h.lower() for h in settings.allowed_headers)
    db = Db(settings.dsn)
    started = time.monotonic()
    async with running_app(settings) as app:
        for number, entries in enumerate(batches):
            await _run_batch(settings, db, entries)
            assert not app._crashed, (number, app._crashed)
            await wait_for(lambda: _all_ended(db), timeout=120, interval=0.2)
        # Still alive: a plain command goes all the way through.
        probe_ids = await _run_batch(settings, db, [{"command": json.dumps(command("probe"))}])
        await db.wait_status("probe", "sent", timeout=30)
        assert not app._crashed
    assert probe_ids
    failed = await db.fetch(
        "SELECT delivery_id, status_reason FROM mail.deliveries WHERE status <> 'sent'"
    )
    assert not failed, f"accepted but not sent: {[dict(r) for r in failed][:5]}"
    accepted = await db.fetchval("SELECT count(*) FROM mail.deliveries")
    assert accepted >= 2 and len(smtp_sink.messages) >= accepted
    for message in smtp_sink.messages:
        assert message.tls
        assert message.mail_from.isascii()
        assert all(rcpt.isascii() and rcpt == rcpt.strip() for rcpt in message.rcpt_tos)
        assert_well_formed(message.data, custom)
    malformed = await db.fetch(
        "SELECT failure_code, count(*) AS n FROM mail.malformed_commands GROUP BY 1"
    )
    codes: dict[str, Any] = {r["failure_code"]: r["n"] for r in malformed}
    assert "intake_error" not in codes, codes  # a daemon bug, if it ever happens
    print(  # the figures of a run, for the report
        f"\nstream fuzz: {len(batches)} batches, {sum(map(len, batches))} entries, "
        f"{accepted} delivered, {len(smtp_sink.messages)} messages, codes {codes}, "
        f"{time.monotonic() - started:.1f}s"
    )
