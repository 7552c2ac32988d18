"""The loop against a real MTA: Debian's Postfix as the relay, started by the test (as the
pipelining tests run it), accepts the daemon's mail (250) and then fails to deliver it (an
unknown local user: 5.1.1). Its own DSN goes to the signed envelope sender and from there
to the daemon: over SMTP to the report listener, or through a ``pipe`` transport into
``maildaemon bounces ingest``. Skipped (with the reason) without root or Postfix."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from maildaemon.config import Settings
from maildaemon.devstack.postgres import pick_free_port
from maildaemon.returnpath import ReturnPath
from tests.postfix import NEEDED, Postfix, running_postfix
from tests.support import Db, command, running_app, xadd

pytestmark = NEEDED
MakeSettings = Callable[..., Settings]
SECRET = "s3cret-for-the-bounce-tests"
DOMAIN = "bounces.test.example"
RP = ReturnPath(DOMAIN, SECRET)
MAILDAEMON = str(Path(sys.executable).with_name("maildaemon"))


def _world_runnable(path: Path) -> bool:
    """Whether an unprivileged user (Postfix's pipe never runs as root) can run ``path``."""
    real = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in [*real.parents, real])


# Over the shared runner's configuration (a later line overrides an earlier one):
MAIN_CF = """
myhostname = relay.test.example
# example.com is "local" with no recipient map: smtpd accepts any address (250), then
# local(8) finds no such user and Postfix bounces it (5.1.1) to the envelope sender.
mydestination = example.com
virtual_mailbox_domains =
smtp_dns_support_level = disabled
smtpd_recipient_restrictions = permit_mynetworks, reject
# The bounce domain is routed to the daemon (its report listener or the pipe).
transport_maps = texthash:{d}/transport
bounce_queue_lifetime = 0
delay_warning_time = 0
"""


@pytest.fixture
def relay_for() -> Iterator[Callable[[str, str], Postfix]]:
    with contextlib.ExitStack() as stack:

        def start(report: str, pipe: str = "") -> Postfix:
            transport = {"transport": f"{DOMAIN} {report}\n"}
            return stack.enter_context(running_postfix(MAIN_CF, pipe, transport))

        yield start


def through(make_settings: MakeSettings, relay: Postfix, **more: Any) -> Settings:
    return make_settings(
        smtp_addr=f"127.0.0.1:{relay.port}",
        smtp_ca_file=relay.ca_file,
        bounce_domain=DOMAIN,
        bounce_secret=SECRET,
        retry_ladder="1s,1s,2s,2s,5s",  # Postfix's master may take a moment to accept
        **more,
    )


async def _bounced(db: Db, delivery_id: str, relay: Postfix) -> None:
    try:
        await db.wait_status(delivery_id, "bounced", timeout=45)
    except AssertionError:
        attempts = [
            (a["status"], a["reply_code"], a["reply_text"]) for a in await db.attempts(delivery_id)
        ]
        raise AssertionError(
            f"not bounced: {await db.status(delivery_id)} {attempts}; relay log:\n"
            f"{relay.log()[-4000:]}"
        ) from None


async def test_a_postfix_dsn_reaches_the_listener_and_ends_bounced(
    make_settings: MakeSettings, relay_for: Callable[..., Postfix]
) -> None:
    listen = pick_free_port()
    relay = relay_for(f"smtp:[127.0.0.1]:{listen}")
    settings = through(make_settings, relay, bounce_listen_addr=f"127.0.0.1:{listen}")
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("pf-1", to=[{"address": "gone@example.com"}]))
        await _bounced(db, "pf-1", relay)
    row = (await db.fetch("SELECT * FROM mail.reports"))[0]
    assert (row["via"], row["kind"], row["match_status"]) == ("listener", "bounce", "matched")
    assert b"relay.test.example" in bytes(row["raw"])  # Postfix's own report
    late = await db.fetch("SELECT address, status_code FROM mail.late_outcomes")
    assert [(r["address"], r["status_code"]) for r in late] == [("gone@example.com", "5.1.1")]
    suppressed = await db.fetch("SELECT address FROM mail.suppressions")
    assert [r["address"] for r in suppressed] == ["gone@example.com"]
    log = relay.log()
    assert "dsn=5.1.1" in log and "status=bounced" in log


@pytest.mark.skipif(
    not _world_runnable(Path(sys.executable)),
    reason="the interpreter is not reachable by an unprivileged user (Postfix's pipe(8) "
    "refuses to run commands as root)",
)
async def test_a_postfix_dsn_through_a_pipe_into_bounces_ingest(
    make_settings: MakeSettings, relay_for: Callable[..., Postfix], pg_dsn: str
) -> None:
    env = " ".join(
        f"{k}={v}"
        for k, v in {
            "MAIL_POSTGRES_PRIMARY_DSN": pg_dsn,
            "MAIL_SMTP_MODE": "stub",
            "MAIL_BOUNCE_DOMAIN": DOMAIN,
            "MAIL_BOUNCE_SECRET": SECRET,
            "HOME": "/tmp",
        }.items()
    )
    pipe = (
        "maildaemon unix - n n - - pipe flags=Rq user=nobody "
        f"argv=/usr/bin/env {env} {MAILDAEMON} bounces ingest "
        "--recipient ${original_recipient} --sender ${sender}\n"
    )
    relay = relay_for("maildaemon:", pipe)
    settings = through(make_settings, relay)
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("pf-2", to=[{"address": "gone@example.com"}]))
        await _bounced(db, "pf-2", relay)
    row = (await db.fetch("SELECT via, kind, match_status, envelope_to FROM mail.reports"))[0]
    assert (row["via"], row["kind"], row["match_status"]) == ("ingest", "bounce", "matched")
    assert row["envelope_to"] == RP.sender("pf-2")
