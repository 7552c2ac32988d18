"""Every SMTP reply at every stage has the right, recorded outcome (issue 10, item 8).

One daemon (one worker, so one transaction at a time) sends to a scripted server. For each
stage and each reply class — 2xx, 4xx, 5xx, the link dropped, silence past the timeout —
a two-recipient delivery is sent once with the script applied to its first try; the test
then checks, from the records and from what the server received: the first attempt's status
and reply, the delivery's outcome, who a retry went to, the suppression list, and that the
delivery never ends without its cause recorded. The checks use the transport's public
behaviour (what the server saw and what was written), so they hold for any transaction path.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from email import message_from_bytes
from typing import Any

import pytest

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from tests.support import Db, command, redis_client, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
A, B = "a@example.com", "b@example.com"
BOTH = (A, B)
AUTH = ("mailer", "pw-scripted")
TERMINAL = ("sent", "failed", "suppressed", "dead_letter", "expired")


@dataclass(frozen=True)
class Case:
    stage: str  # where the script acts: a stage of smtp_script, or "rcpt a" / "rcpt b"
    action: str  # a reply line, "drop" or "silence"; "" for the all-2xx baseline
    attempt: str  # status of the first attempt
    event: str  # the outcome event of the first attempt
    code: int | None  # reply code recorded on the first attempt
    final: str  # the delivery's state in the end
    retry_to: tuple[str, ...] | None = None  # who the second attempt went to
    suppressed: tuple[str, ...] = ()
    duplicate: bool = False

    @property
    def id(self) -> str:
        return f"{self.stage}: {self.action.split(' ')[0] if self.action else '2xx'}"


def _connect_stage(stage: str, r4: str, r5: str) -> list[Case]:
    c4, c5 = int(r4[:3]), int(r5[:3])
    return [
        Case(stage, r4, "transport_failed", "retry_scheduled", c4, "sent", BOTH),
        Case(stage, r5, "transport_failed", "retry_scheduled", c5, "sent", BOTH),
        Case(stage, "drop", "transport_failed", "retry_scheduled", None, "sent", BOTH),
        Case(stage, "silence", "timed_out", "retry_scheduled", None, "sent", BOTH),
    ]


def _transaction_stage(stage: str) -> list[Case]:
    return [
        Case(stage, "451 4.3.0 local error", "transport_failed", "retry_scheduled", 451, "sent",
             BOTH),
        Case(stage, "554 5.7.1 refused by policy", "provider_rejected", "failed", 554, "failed"),
        Case(stage, "drop", "transport_failed", "retry_scheduled", None, "sent", BOTH),
        Case(stage, "silence", "timed_out", "retry_scheduled", None, "sent", BOTH),
    ]  # fmt: skip


def _rcpt_stage(who: str) -> list[Case]:
    stage = f"rcpt {who[0]}"
    return [
        Case(stage, "450 4.2.1 mailbox busy", "sent", "retry_scheduled", 250, "sent", (who,)),
        Case(stage, "550 5.1.1 no such user", "sent", "sent", 250, "sent", suppressed=(who,)),
        Case(stage, "550 5.7.1 rejected as spam", "sent", "sent", 250, "sent"),
        Case(stage, "drop", "transport_failed", "retry_scheduled", None, "sent", BOTH),
        Case(stage, "silence", "timed_out", "retry_scheduled", None, "sent", BOTH),
    ]


CASES: list[Case] = [
    Case("mail", "", "sent", "sent", 250, "sent"),
    *_connect_stage("banner", "421 4.3.2 service not available", "554 5.3.2 no service"),
    *_connect_stage("ehlo", "421 4.3.2 closing", "550 5.5.0 EHLO refused"),
    *_connect_stage("starttls", "454 4.7.0 TLS not available", "554 5.7.0 no TLS for you"),
    *_connect_stage("auth", "454 4.7.0 temporary auth failure", "535 5.7.8 bad credentials"),
    *_transaction_stage("mail"),
    *_rcpt_stage(A),
    *_rcpt_stage(B),
    *_transaction_stage("data"),
    Case("end of data", "451 4.3.0 try later", "transport_failed", "retry_scheduled", 451,
         "sent", BOTH),
    Case("end of data", "554 5.7.1 spam", "provider_rejected", "failed", 554, "failed"),
    Case("end of data", "drop", "unknown", "retry_scheduled", None, "sent", BOTH,
         duplicate=True),
    Case("end of data", "silence", "unknown", "retry_scheduled", None, "sent", BOTH,
         duplicate=True),
]  # fmt: skip


def _apply(server: SmtpSink, case: Case) -> None:
    server.behaviour.clear_script()
    if not case.action:
        return
    if case.stage.startswith("rcpt "):
        server.behaviour.rcpt_replies[A if case.stage.endswith("a") else B] = [case.action]
    else:
        server.behaviour.script[case.stage] = [case.action]


async def _run_case(settings: Settings, server: SmtpSink, db: Db, case: Case, n: int) -> list[str]:
    """Send one delivery under the case's script; returns what did not match."""
    did = f"m-{n}"
    _apply(server, case)
    before = len(server.messages)
    await xadd(settings, command(did, to=[{"address": A}, {"address": B}]))
    await db.wait_status(did, *TERMINAL, timeout=20)
    row = (await db.fetch("SELECT * FROM mail.deliveries WHERE delivery_id = $1", did))[0]
    attempts = await db.attempts(did)
    problems: list[str] = []

    def check(what: str, got: Any, want: Any) -> None:
        if got != want:
            problems.append(f"{case.id}: {what} is {got!r}, expected {want!r}")

    first = attempts[0]
    check("first attempt status", first["status"], case.attempt)
    check("first attempt reply code", first["reply_code"], case.code)
    if case.action and case.action not in ("drop", "silence"):
        if case.stage.startswith("rcpt "):  # recorded per recipient
            who = A if case.stage.endswith("a") else B
            got = json.loads(first["recipients"])[who]
            check(
                "recipient's reply",
                (got["code"], got["text"]),
                (int(case.action[:3]), case.action[4:]),
            )
        else:
            check("first attempt reply text", first["reply_text"], case.action[4:])
    check("final state", row["status"], case.final)
    if not (row["last_reply_text"] or row["status_reason"]):
        problems.append(f"{case.id}: the delivery ended without a recorded cause")
    if not all(a["reply_text"] for a in attempts):
        problems.append(f"{case.id}: an attempt has no reply text or reason")
    events = await _events(settings, did)
    check("first outcome event", events[0] if events else None, case.event)
    if case.retry_to is not None:
        second = json.loads(attempts[1]["recipients"]) if len(attempts) > 1 else {}
        got = tuple(sorted(a for a, o in second.items() if o["outcome"] == "accepted"))
        check("recipients of the retry", got, tuple(sorted(case.retry_to)))
    else:
        check("number of attempts", len(attempts), 1)
    copies = [m for m in server.messages[before:] if _message_id(m.data) == row["message_id"]]
    got_rcpts = sorted(r for m in copies for r in m.rcpt_tos)
    want_rcpts = _expected_receivers(case)
    check("recipients that received it", got_rcpts, want_rcpts)
    listed = await db.fetch("SELECT address FROM mail.suppressions")
    check("suppressed", tuple(sorted(r["address"] for r in listed)), case.suppressed)
    check("possible_duplicate", row["possible_duplicate"], case.duplicate)
    return problems


def _expected_receivers(case: Case) -> list[str]:
    if case.final != "sent":
        return []
    receivers = [A, B]
    if case.suppressed or "5.7.1" in case.action:  # refused at RCPT: the other one only
        receivers.remove(A if case.stage.endswith("a") else B)
    return sorted(receivers)  # a 4xx at RCPT: the first copy to one, the retry to the other


def _message_id(data: bytes) -> str | None:
    value = message_from_bytes(data)["Message-ID"]
    return str(value) if value is not None else None


async def _events(settings: Settings, delivery_id: str) -> list[str]:
    client = redis_client(settings.redis_master_addr)
    try:

        async def published() -> list[str]:
            entries = await client.xrange(settings.event_stream)
            return [
                fields[b"status"].decode()
                for _, fields in entries
                if fields[b"delivery_id"].decode() == delivery_id
            ]

        return list(await wait_for(published, timeout=10))
    finally:
        await client.aclose()


@pytest.mark.timeout(600)
async def test_every_reply_at_every_stage_has_the_right_recorded_outcome(
    make_settings: MakeSettings, scripted: SmtpSink
) -> None:
    scripted.behaviour.auth = AUTH
    settings = make_settings(
        smtp_addr=scripted.addr,
        smtp_ca_file=scripted.ca_file,
        smtp_username=AUTH[0],
        smtp_password=AUTH[1],
        smtp_timeout="1s",
        retry_ladder="200ms,200ms,200ms",
        retry_jitter=0,
        attempt_worker_concurrency=1,
    )
    db = Db(settings.dsn)
    problems: list[str] = []
    async with running_app(settings):
        for n, case in enumerate(CASES):
            problems += await _run_case(settings, scripted, db, case, n)
            await db.fetch("DELETE FROM mail.suppressions")
    assert not problems, "\n".join(problems)
