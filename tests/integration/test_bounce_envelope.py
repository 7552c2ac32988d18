"""The traceable envelope: a signed per-delivery sender, the tracking header in the pinned
bytes, and DSN asked for only when the server offers it (plain and pipelined paths)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.returnpath import HEADER, ReturnPath
from tests.support import Db, command, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
SECRET = "s3cret-for-the-bounce-tests"
DOMAIN = "bounces.test.example"
RP = ReturnPath(DOMAIN, SECRET)


def bounce_settings(make_settings: MakeSettings, **more: object) -> Settings:
    return make_settings(bounce_domain=DOMAIN, bounce_secret=SECRET, **more)


def _commands(sink: SmtpSink, verb: str) -> list[str]:
    return [c.arg or "" for c in sink.commands if c.verb == verb]


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelined"])
async def test_signed_sender_header_and_dsn_when_offered(
    make_settings: MakeSettings, smtp_sink: SmtpSink, pipelining: bool
) -> None:
    smtp_sink.behaviour.dsn = True
    smtp_sink.behaviour.pipelining = pipelining
    settings = bounce_settings(make_settings)
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("env-1", cc=["carol+tag@example.com"]))
        await db.wait_status("env-1", "sent")
    token = RP.token("env-1")
    received = smtp_sink.messages[0]
    assert received.mail_from == f"bounces+{token}@{DOMAIN}"
    assert len(received.mail_from.partition("@")[0]) <= 64
    assert received.parse()[HEADER] == token
    pinned = await db.fetch("SELECT rendered FROM mail.delivery_payloads WHERE delivery_id='env-1'")
    assert bytes(pinned[0]["rendered"]) == received.data  # the header is in the pinned bytes
    (mail,) = _commands(smtp_sink, "MAIL")
    assert mail.endswith(f"RET=HDRS ENVID={token}")
    rcpts = sorted(_commands(smtp_sink, "RCPT"))
    assert rcpts == [
        "TO:<alice@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;alice@example.com",
        "TO:<carol+tag@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;carol+2Btag@example.com",
    ]
    assert RP.check(token).status == "valid"


@pytest.mark.parametrize("pipelining", [False, True], ids=["plain", "pipelined"])
async def test_no_dsn_parameters_when_not_offered(
    make_settings: MakeSettings, smtp_sink: SmtpSink, pipelining: bool
) -> None:
    smtp_sink.behaviour.pipelining = pipelining
    settings = bounce_settings(make_settings)
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("env-2"))
        await db.wait_status("env-2", "sent")
    (mail,) = _commands(smtp_sink, "MAIL")
    assert "RET=" not in mail and "ENVID=" not in mail
    assert all("NOTIFY=" not in r for r in _commands(smtp_sink, "RCPT"))
    assert smtp_sink.messages[0].mail_from.startswith("bounces+")


async def test_without_bounce_domain_the_fixed_sender_and_no_header(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.dsn = True
    settings = make_settings()
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("env-3"))
        await db.wait_status("env-3", "sent")
    received = smtp_sink.messages[0]
    assert received.mail_from == "noreply@test.example"
    assert received.parse()[HEADER] is None
    assert "ENVID=" not in _commands(smtp_sink, "MAIL")[0]


async def test_a_producer_cannot_forge_the_tracking_header(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = bounce_settings(make_settings)
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("env-4", headers={HEADER: RP.token("someone-else")}))

        async def refused() -> object:
            rows = await db.fetch(
                "SELECT failure_code FROM mail.malformed_commands WHERE delivery_id = 'env-4'"
            )
            return rows[0]["failure_code"] if rows else None

        assert await wait_for(refused) == "header_not_allowed"
    assert smtp_sink.messages == []


def test_tokens_are_signed() -> None:
    token = RP.token("d-42")
    assert len(token) == 32 and RP.check(token.upper()).status == "valid"
    altered = token[:-1] + ("a" if token[-1] != "a" else "b")
    assert RP.check(altered).status == "bad_token"
    assert ReturnPath(DOMAIN, "another-secret-entirely").check(token).status == "bad_token"
    assert RP.check("not a token").status == "bad_token"
    assert RP.token_in_address(f"BOUNCES+{token}@Bounces.Test.Example") == token
    assert RP.token_in_address(f"bounces+{token}@elsewhere.example") is None
    assert RP.owns(f"postmaster@{DOMAIN}") is False
