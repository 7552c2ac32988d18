"""The pipelined paths record what one command at a time records, for every reply (issue
22): the same scripted STARTTLS server, the same daemon and the same reply at each
transaction stage, sent three ways — one command at a time (``MAIL_SMTP_PIPELINING=off``),
pipelined with DATA (RFC 2920) and pipelined with BDAT (RFC 3030) — must give the same
recorded outcome: the first attempt's status and reply code, and the delivery's state.

The replies include the ones a relay sends just before it closes the link (a 421 to MAIL
FROM, a 550 at RCPT, a 552 to the message), which a pipelined client reads in the same
segment as the close: every reply read before the link went counts. BDAT has no DATA
command, so the ``data`` stage is not scripted on that path. And with BDAT the message
is in the first write: when the link is lost, or the server falls silent, before any reply
refuses the message or says the server is closing (421), the server may have taken it, so
that attempt is ``unknown`` (retried as a possible duplicate) where one command at a time,
which had not sent the message yet, records ``transport_failed`` or ``timed_out``; the
delivery's state is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from maildaemon.config import Settings
from maildaemon.devstack.smtp_script import CLOSE
from maildaemon.devstack.smtp_sink import SmtpSink
from tests.support import Db, command, running_app, xadd

MakeSettings = Callable[..., Settings]
A, B = "a@example.com", "b@example.com"
TERMINAL = ("sent", "failed", "suppressed", "dead_letter", "expired")
ACTIONS = (
    "451 4.3.0 local error",
    "554 5.7.1 refused by policy",
    "421 4.3.2 shutting down" + CLOSE,
    "550 5.1.1 no such user" + CLOSE,
    "drop",
    "silence",
)
PATHS = {  # path → (server offers CHUNKING, MAIL_SMTP_PIPELINING)
    "one at a time": (False, "off"),
    "pipelined DATA": (False, "auto"),
    "pipelined BDAT": (True, "auto"),
}


@dataclass(frozen=True)
class Case:
    stage: str  # a stage of smtp_script, or "rcpt a" / "rcpt b"
    action: str  # what the server does there; "" for the all-2xx baseline
    rcpts: tuple[str, ...] = (A, B)

    @property
    def id(self) -> str:
        return f"{self.stage} [{len(self.rcpts)} rcpt]: {self.action or '2xx'}"


CASES = [
    Case("mail", ""),
    *(Case(stage, action) for stage in ("mail", "rcpt a", "rcpt b", "data") for action in ACTIONS),
    *(Case("rcpt a", action, (A,)) for action in ACTIONS),
    *(Case("end of data", action) for action in ACTIONS),
    Case("end of data", "552 5.3.4 message too big" + CLOSE),
]
# What one command at a time records for the replies just before a close: the reply counts.
EXPECTED = {
    Case("mail", "421 4.3.2 shutting down" + CLOSE): ("transport_failed", 421, "sent"),
    Case("mail", "550 5.1.1 no such user" + CLOSE): ("provider_rejected", 550, "failed"),
    Case("rcpt a", "550 5.1.1 no such user" + CLOSE, (A,)): (
        "provider_rejected",
        550,
        "suppressed",
    ),
    Case("end of data", "552 5.3.4 message too big" + CLOSE): ("provider_rejected", 552, "failed"),
}
Outcome = tuple[str, int | None, str]


def _apply(server: SmtpSink, case: Case) -> None:
    server.behaviour.clear_script()
    if not case.action:
        return
    if case.stage.startswith("rcpt "):
        server.behaviour.rcpt_replies[A if case.stage.endswith("a") else B] = [case.action]
    else:
        server.behaviour.script[case.stage] = [case.action]


async def _outcomes(
    make_settings: MakeSettings, server: SmtpSink, path: str
) -> dict[Case, Outcome]:
    chunking, pipelining = PATHS[path]
    server.behaviour.chunking = chunking
    settings = make_settings(
        smtp_addr=server.addr,
        smtp_ca_file=server.ca_file,
        smtp_pipelining=pipelining,
        smtp_timeout="1s",
        retry_ladder="200ms,200ms,200ms",
        retry_jitter=0,
        attempt_worker_concurrency=1,
    )
    db = Db(settings.dsn)
    found: dict[Case, Outcome] = {}
    async with running_app(settings):
        for n, case in enumerate(CASES):
            if chunking and case.stage == "data":
                continue  # no DATA command with BDAT
            did = f"{path.replace(' ', '-')}-{n}"
            _apply(server, case)
            await xadd(settings, command(did, to=[{"address": a} for a in case.rcpts]))
            final = await db.wait_status(did, *TERMINAL, timeout=20)
            first = (await db.attempts(did))[0]
            found[case] = (first["status"], first["reply_code"], final)
            await db.fetch("DELETE FROM mail.suppressions")
    return found


def _unknown_with_bdat(path: str, case: Case, got: Outcome, reference: Outcome) -> bool:
    """The one difference BDAT makes: the link lost with no reply that refused the message
    or announced the close, after the message had gone out with the first write."""
    lost = case.action in ("drop", "silence") or (
        case.action.endswith(CLOSE) and not case.action.startswith("421")
    )
    return (
        path == "pipelined BDAT"
        and lost
        and reference[0] in ("transport_failed", "timed_out")
        and reference[1] is None
        and got == ("unknown", None, reference[2])
    )


@pytest.mark.timeout(900)
async def test_pipelined_paths_record_what_one_command_at_a_time_records(
    make_settings: MakeSettings, scripted: SmtpSink
) -> None:
    results = {path: await _outcomes(make_settings, scripted, path) for path in PATHS}
    reference = results["one at a time"]
    problems = [
        f"{case.id}: one at a time {reference[case]}, expected {want}"
        for case, want in EXPECTED.items()
        if reference[case] != want
    ]
    for path, found in results.items():
        problems += [
            f"{case.id}: {path} recorded {got}, one at a time {reference[case]}"
            for case, got in found.items()
            if got != reference[case] and not _unknown_with_bdat(path, case, got, reference[case])
        ]
    assert not problems, "\n".join(problems)
