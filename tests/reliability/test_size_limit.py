"""RFC 1870 SIZE on every path (issue 22): when the server offers SIZE, MAIL FROM says the
message's size, and a message larger than the server's limit is refused here, before any
of it is sent — the delivery ends `failed`, is never retried, and says both sizes."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from tests.support import Db, command, running_app, xadd

MakeSettings = Callable[..., Settings]
PATHS = {"one at a time": (False, "off"), "DATA": (False, "auto"), "BDAT": (True, "auto")}


def mail_args(server: SmtpSink) -> list[str | None]:
    return [c.arg for c in server.commands if c.verb == "MAIL"]


@pytest.mark.parametrize("path", list(PATHS))
async def test_size_is_declared_and_a_message_over_the_limit_is_refused_before_sending(
    make_settings: MakeSettings, scripted: SmtpSink, path: str
) -> None:
    scripted.behaviour.chunking, pipelining = PATHS[path]
    scripted.behaviour.size = 10_000_000
    settings = make_settings(
        smtp_addr=scripted.addr,
        smtp_ca_file=scripted.ca_file,
        smtp_pipelining=pipelining,
        retry_ladder="200ms,200ms",
        retry_jitter=0,
        attempt_worker_concurrency=1,
    )
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("fits"))
        assert await db.wait_status("fits", "sent", "failed", "dead_letter") == "sent"
        (declared,) = mail_args(scripted)
        match = re.search(r" SIZE=(\d+)$", declared)
        assert match, declared
        size = int(match.group(1))
        assert size == len(scripted.messages[0].data) or size == len(
            scripted.messages[0].data
        ) + len(b"\r\n")  # what was declared is what arrived (DATA adds no final CRLF)
        scripted.behaviour.size = size - 1  # the same message, one octet too many, on a new session
        await xadd(settings, command("too-big"))
        assert await db.wait_status("too-big", "sent", "failed", "dead_letter") == "failed"
        # The daemon goes on, and a smaller message fits under the same limit.
        await xadd(settings, command("after", variables={"code": "1", "expires_minutes": 1}))
        assert await db.wait_status("after", "sent", "failed", "dead_letter") == "sent"
    assert len(mail_args(scripted)) == 2  # no MAIL FROM for the refused message
    assert int(mail_args(scripted)[1].rpartition("SIZE=")[2]) < size
    (attempt,) = await db.attempts("too-big")
    assert attempt["status"] == "failed" and attempt["reply_code"] is None
    row = (await db.fetch("SELECT * FROM mail.deliveries WHERE delivery_id = 'too-big'"))[0]
    reason = row["status_reason"]
    assert reason.startswith("message_too_large:"), reason
    assert row["failure_code"] == "message_too_large"
    assert f"{size} octets" in reason and f"at most {size - 1}" in reason
    assert row["next_attempt_at"] is None
