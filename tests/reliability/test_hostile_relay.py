"""No reply from a relay stops delivery (issue 22): replies with 8-bit bytes, NUL and other
control bytes, invalid UTF-8, a 100 KB line, thousands of continuation lines and a line
that never ends, at every stage (greeting, EHLO, STARTTLS, MAIL, RCPT, DATA, end of data),
on every path (one command at a time, pipelined with DATA, with BDAT), through the real
daemon into real PostgreSQL.

Each hostile reply is scripted for one delivery's first try; the daemon must keep running,
every delivery must end with a recorded outcome whose text PostgreSQL stored (so: no lone
surrogate, no NUL) and that is bounded, and a well-behaved delivery after them all is sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from maildaemon.config import Settings
from maildaemon.devstack.smtp_script import ENDLESS
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.sending.reply import MAX_REPLY_TEXT
from tests.support import Db, command, running_app, xadd

MakeSettings = Callable[..., Settings]
TERMINAL = ("sent", "failed", "suppressed", "dead_letter", "expired")
PATHS = {"one at a time": (False, "off"), "DATA": (False, "auto"), "BDAT": (True, "auto")}
TEXTS = {
    "latin-1": b"5.1.1 Empf\xe4nger unbekannt",
    "nul and controls": b"5.7.1 bad \x00 byte \x1b[31m red \x07\x7f",
    "invalid utf-8": b"5.7.1 \xc3\x28 \xff\xfe \xed\xa0\x80 \xf0\x9f",
    "100 KB line": b"5.7.1 " + b"x" * 100_000,
}
STAGES = {  # stage → the reply code a refusal there carries
    "banner": b"554",
    "ehlo": b"550",
    "starttls": b"454",
    "mail": b"550",
    "rcpt": b"550",
    "data": b"554",
    "end of data": b"554",
}


def _actions() -> list[tuple[str, str, bytes | str]]:
    cases: list[tuple[str, str, bytes | str]] = []
    for stage, code in STAGES.items():
        for name, text in TEXTS.items():
            cases.append((stage, name, code + b" " + text))
        lines = [code + b"-" + b"\xe4\x00 line %d" % i for i in range(3000)]
        cases.append(
            (stage, "3000 continuation lines", b"\r\n".join(lines) + b"\r\n" + code + b" end")
        )
        cases.append((stage, "endless line", ENDLESS))
        long = [code + b"-5.7.1 r\xe9ponse ligne %04d" % i for i in range(900)]  # ~21 KB
        cases.append((stage, "21 KB in 900 lines", b"\r\n".join(long) + b"\r\n" + code + b" end"))
    cases.append(("end of data", "accepted, 8-bit", b"250 2.0.0 queued \xe4\x00 \xff"))
    cases.append(("rcpt", "accepted, 8-bit", b"250 2.1.5 Empf\xe4nger ok \x00"))
    return cases


CASES = _actions()


def _storable_problems(where: str, *texts: str | None) -> list[str]:
    problems = []
    for text in texts:
        if text is None:
            continue
        if "\x00" in text or len(text) > MAX_REPLY_TEXT + 200:  # a reason's prefix, at most
            problems.append(f"{where}: stored text not clean or unbounded: {text[:80]!r}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            problems.append(f"{where}: a lone surrogate in {text[:80]!r}")
    return problems


async def _check(db: Db, did: str, where: str) -> list[str]:
    row = (await db.fetch("SELECT * FROM mail.deliveries WHERE delivery_id = $1", did))[0]
    attempts = await db.attempts(did)
    problems = _storable_problems(where, row["status_reason"], row["last_reply_text"])
    if not attempts or not all(a["reply_text"] for a in attempts):
        problems.append(f"{where}: an attempt without its reply or reason")
    for a in attempts:
        problems += _storable_problems(where, a["reply_text"])
        for outcome in json.loads(a["recipients"] or "{}").values():
            problems += _storable_problems(where, outcome["text"])
    return problems


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", list(PATHS))
async def test_hostile_replies_never_stop_delivery(
    make_settings: MakeSettings, scripted: SmtpSink, path: str
) -> None:
    scripted.behaviour.chunking, pipelining = PATHS[path]
    settings = make_settings(
        smtp_addr=scripted.addr,
        smtp_ca_file=scripted.ca_file,
        smtp_pipelining=pipelining,
        smtp_timeout="2s",
        retry_ladder="100ms",
        retry_jitter=0,
        attempt_worker_concurrency=1,
    )
    db = Db(settings.dsn)
    problems: list[str] = []
    async with running_app(settings) as app:
        for n, (stage, name, action) in enumerate(CASES):
            if scripted.behaviour.chunking and stage == "data":
                continue  # no DATA command with BDAT
            scripted.behaviour.clear_script()
            scripted.endless_written = 0
            scripted.behaviour.script[stage] = [action]
            did = f"h-{n}"
            await xadd(settings, command(did))
            try:
                await db.wait_status(did, *TERMINAL, timeout=30)
            except (AssertionError, TimeoutError) as exc:
                problems.append(f"{stage}, {name}: no outcome recorded ({exc})")
                break  # the daemon is stuck or gone: the rest would only wait too
            problems += await _check(db, did, f"{stage}, {name}")
            if name.startswith("21 KB") and not any(
                "characters, cut]" in (a["reply_text"] or "") for a in await db.attempts(did)
            ):
                problems.append(f"{stage}, {name}: the long reply was not recorded, cut")
            await db.fetch("DELETE FROM mail.suppressions")  # 5.1.1 lists the address
            if action == ENDLESS and scripted.endless_written > 8 * 2**20:
                problems.append(f"{stage}: {scripted.endless_written} bytes of one line read")
        scripted.behaviour.clear_script()
        await xadd(settings, command("healthy"))
        if await db.wait_status("healthy", *TERMINAL) != "sent":
            problems.append("a well-behaved delivery after the hostile ones was not sent")
        assert app.readiness.workers_running
    assert not problems, "\n".join(problems)
