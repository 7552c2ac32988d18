"""One canonical form per address: two spellings of one mailbox are one address on the
wire, on the suppression list and in operator searches."""

from __future__ import annotations

from collections.abc import Callable

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from tests.integration.test_api import P, daemon, settings_for
from tests.support import Db, command, xadd

MakeSettings = Callable[..., Settings]


async def test_spellings_of_one_mailbox_are_one_address(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(make_settings)
    db = Db(settings.dsn)
    async with daemon(settings) as api:
        # Suppressed in Unicode, upper-case spelling ...
        status, change = await api.post(
            f"{P}/suppressions", {"address": "carol@STRAßE.de", "reason": "asked us"}
        )
        assert status == 200, change
        assert change["suppression"]["address"] == "carol@xn--strae-oqa.de"
        # ... a command to the punycode spelling and one to the Unicode spelling hit it.
        await xadd(
            settings,
            command("d-puny", to=["carol@xn--strae-oqa.de"]),
            command("d-unicode", to=["carol@Straße.DE"]),
            command("d-dave", to=["dave@Straße.de"], bcc=["erin@BÜCHER.example"]),
        )
        assert await db.wait_status("d-puny", "suppressed") == "suppressed"
        assert await db.wait_status("d-unicode", "suppressed") == "suppressed"
        await db.wait_status("d-dave", "sent")
        # Searches find deliveries under either spelling.
        for spelling in ("dave@straße.de", "dave@XN--STRAE-OQA.DE"):
            status, page = await api.get(f"{P}/deliveries", recipient=spelling)
            assert status == 200 and [d["delivery_id"] for d in page["items"]] == ["d-dave"]
        status, page = await api.get(f"{P}/suppressions", domain="Straße.de")
        assert [s["address"] for s in page["items"]] == ["carol@xn--strae-oqa.de"]
    # The envelope (bcc included) and the headers carry the IDNA 2008 form, never strasse.de.
    [message] = smtp_sink.messages
    assert message.rcpt_tos == ["dave@xn--strae-oqa.de", "erin@xn--bcher-kva.example"]
    assert b"To: dave@xn--strae-oqa.de\r\n" in message.data
    assert b"strasse" not in message.data.lower() and b"erin" not in message.data
    stored = await db.fetch("SELECT to_addrs, bcc_addrs FROM mail.deliveries ORDER BY 1")
    assert ["carol@xn--strae-oqa.de"] in [list(r["to_addrs"]) for r in stored]
