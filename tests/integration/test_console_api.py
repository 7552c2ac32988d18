"""The API reads behind the operator console, against the real daemon: the stats time series,
the pinned message (.eml and parsed), malformed records by delivery id, template preview,
the dev inbox, and the console's own files with their security headers."""

from __future__ import annotations

import email
import email.policy
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.store.pipeline.db import Store
from tests.integration.test_api import TOKEN, MakeSettings, settings_for
from tests.support import Db, command, ingest_one, running_app, wait_for, xadd

P = "/api/v1/internal"


async def _get(session: aiohttp.ClientSession, url: str, **params: str) -> tuple[int, Any]:
    async with session.get(url, params=params) as resp:
        return resp.status, await resp.json()


async def test_stats_series_counts_outcomes_per_interval(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.rcpt_replies["dead@example.com"] = ["452 4.2.2 mailbox full"] * 2
    settings = settings_for(make_settings)
    db = Db(settings.dsn)
    async with running_app(settings) as app, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{app.http_port}{P}"
        await xadd(
            settings,
            command("ok-1"),
            command("ok-2", idempotency_key="k2"),
            command("dead-1", idempotency_key="k3", to=["dead@example.com"]),
            "{not json",
        )
        # Accepted before its template changed (intake now refuses it): fails at render.
        store = await Store.open(settings.dsn, min_size=1, max_size=1)
        try:
            await ingest_one(store, command("broken-1", idempotency_key="k4", variables={}))
        finally:
            await store.close()
        for delivery_id, end in (
            ("ok-1", "sent"),
            ("ok-2", "sent"),
            ("dead-1", "dead_letter"),
            ("broken-1", "failed"),
        ):
            await db.wait_status(delivery_id, end)

        status, plain = await _get(s, f"{base}/stats")
        assert status == 200 and plain["series"] is None  # unchanged without a window

        status, stats = await _get(s, f"{base}/stats", window="1h")
        assert status == 200, stats
        series = stats["series"]
        assert series["window"] == "1h" and series["interval_seconds"] == 60
        points = series["points"]
        assert len(points) == 60
        starts = [datetime.fromisoformat(p["start"]) for p in points]
        assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(starts))
        assert starts[-1] <= datetime.now(UTC) < starts[-1] + timedelta(minutes=1, seconds=5)
        assert series["totals"] == {"sent": 2, "failed": 1, "dead_lettered": 1, "malformed": 1}
        assert sum(p["sent"] for p in points[-2:]) == 2  # in the last minute or two

        status, day = await _get(s, f"{base}/stats", window="24h")
        assert status == 200 and day["series"]["interval_seconds"] == 900
        assert len(day["series"]["points"]) == 96
        assert day["series"]["totals"] == series["totals"]

        status, bad = await _get(s, f"{base}/stats", window="7d")
        assert status == 400 and bad["error"]["field"] == "window"


async def test_pinned_message_is_served_as_sent_and_parsed(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(make_settings)
    db = Db(settings.dsn)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    html = '<p style="color:red">Hi</p><script>alert(1)</script>'
    async with running_app(settings) as app, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{app.http_port}{P}"
        await xadd(
            settings,
            command(
                "rendered-1",
                payload_mode="rendered",
                template_id=None,
                locale=None,
                variables=None,
                subject="<script>alert(1)</script>",
                text="plain body",
                html=html,
            ),
            command("later-1", idempotency_key="k-later", send_at=later),
        )
        await db.wait_status("rendered-1", "sent")
        await db.wait_status("later-1", "queued")
        [received_message] = await smtp_sink.wait_for(1)
        received = received_message.data

        async with s.get(f"{base}/deliveries/rendered-1/message") as resp:
            assert resp.status == 200
            assert resp.content_type == "message/rfc822"
            assert 'filename="rendered-1.eml"' in resp.headers["Content-Disposition"]
            body = await resp.read()
        pinned = await db.fetchval(
            "SELECT rendered FROM mail.delivery_payloads WHERE delivery_id = $1", "rendered-1"
        )
        assert body == bytes(pinned)
        # The sink got these bytes (DKIM off; dot-stuffing and line endings aside).
        assert body.replace(b"\r\n", b"\n").strip() == received.replace(b"\r\n", b"\n").strip()

        status, view = await _get(s, f"{base}/deliveries/rendered-1/rendered")
        assert status == 200, view
        assert view["subject"] == "<script>alert(1)</script>"
        assert view["text"].strip() == "plain body"
        assert view["html"].strip() == html
        parsed = email.message_from_bytes(body, policy=email.policy.default)
        assert {h["name"] for h in view["headers"]} >= {"From", "To", "Subject", "Message-ID"}
        assert view["message_id"] == parsed["Message-ID"]

        for path, code, expected in (
            ("/deliveries/later-1/message", 409, "not_rendered"),
            ("/deliveries/later-1/rendered", 409, "not_rendered"),
            ("/deliveries/nope/message", 404, "not_found"),
            ("/deliveries/bad%20id/message", 400, "invalid_input"),
        ):
            status, err = await _get(s, base + path)
            assert (status, err["error"]["code"]) == (code, expected), (path, err)


async def test_refused_delivery_id_is_found_among_malformed_records(
    make_settings: MakeSettings,
) -> None:
    settings = settings_for(make_settings)
    db = Db(settings.dsn)
    async with running_app(settings) as app, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{app.http_port}{P}"
        await xadd(settings, command("refused-1", source="nobody-knows"))

        async def refused() -> int:
            n: int = await db.fetchval("SELECT count(*) FROM mail.malformed_commands")
            return n

        await wait_for(refused)
        status, _ = await _get(s, f"{base}/deliveries/refused-1")
        assert status == 404
        status, page = await _get(s, f"{base}/deliveries/refused-1/malformed")
        assert status == 200
        [record] = page["items"]
        assert record["delivery_id"] == "refused-1"
        assert record["failure_code"] == "unknown_source"
        status, page = await _get(s, f"{base}/deliveries/other/malformed")
        assert status == 200 and page["items"] == []


async def test_template_preview_renders_with_the_loaded_catalog(
    make_settings: MakeSettings,
) -> None:
    settings = settings_for(make_settings)
    async with running_app(settings) as app, aiohttp.ClientSession() as s:
        templates = f"http://127.0.0.1:{app.http_port}{P}/templates"
        url = f"{templates}/signin_code/preview"
        query = [
            ("locale", "de"),
            ("var", "code=493817"),
            ("var", "expires_minutes=10"),
        ]
        async with s.get(url, params=query) as resp:
            assert resp.status == 200
            preview = await resp.json()
        assert preview["error"] is None
        message = preview["message"]
        assert "493817" in message["text"] and "493817" in (message["html"] or "")
        assert message["to"] == "preview@example.invalid"
        english = [q if q[0] != "locale" else ("locale", "en") for q in query]
        async with s.get(url, params=english) as resp:
            assert (await resp.json())["message"]["subject"] != message["subject"]

        async with s.get(f"{templates}/no_such_template/preview") as resp:
            body = await resp.json()
            assert resp.status == 404 and body["error"]["field"] == "template_id"
        for name, params, field in (
            ("Bad Id", [], "template_id"),
            ("signin_code", [("var", "no equals sign")], "var"),
            ("signin_code", [("bogus", "1")], "bogus"),
            ("signin_code", [("locale", "d e")], "locale"),
        ):
            async with s.get(f"{templates}/{name}/preview", params=params) as resp:
                body = await resp.json()
                assert resp.status == 400, body
                assert body["error"]["field"] == field
        # A template needing a variable that was not given: a clear 400, no 500.
        async with s.get(url) as resp:
            body = await resp.json()
            assert resp.status == 200 and body["message"] is None, body
            assert "needs variable(s) code" in body["error"]  # names the missing variable


async def test_dev_inbox_lists_and_serves_caught_mail_only_in_dev(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(make_settings)
    db = Db(settings.dsn)
    maildir = smtp_sink.maildir
    assert maildir is not None
    (maildir.parent / "secret.eml").write_bytes(b"Subject: outside the maildir\r\n\r\nx")
    async with running_app(settings, dev_maildir=maildir) as app, aiohttp.ClientSession() as s:
        base = f"http://127.0.0.1:{app.http_port}{P}/dev/inbox"
        await xadd(settings, command("inbox-1"))
        await db.wait_status("inbox-1", "sent")
        status, page = await _get(s, base)
        assert status == 200 and page["total"] == 1
        [item] = page["items"]
        assert item["to"] and "alice@example.com" in item["to"]
        status, caught = await _get(s, f"{base}/{item['name']}")
        assert status == 200 and caught["message"]["subject"] == item["subject"]
        async with s.get(f"{base}/{item['name']}/raw") as resp:
            assert resp.status == 200 and resp.content_type == "message/rfc822"
            assert await resp.read() == (maildir / item["name"]).read_bytes()
        for name, code in (
            ("..%2Fsecret.eml", 400),
            ("%2E%2E%2Fsecret.eml", 400),
            ("secret.eml", 404),
            ("nothing.txt", 400),
        ):
            status, err = await _get(s, f"{base}/{name}")
            assert status == code, (name, err)
    async with running_app(settings) as app, aiohttp.ClientSession() as s:
        status, err = await _get(s, f"http://127.0.0.1:{app.http_port}{P}/dev/inbox")
        assert status == 404 and err["error"]["code"] == "dev_inbox_off"


async def test_console_files_redirect_and_security_headers(make_settings: MakeSettings) -> None:
    settings = settings_for(make_settings)
    async with running_app(settings) as app, aiohttp.ClientSession() as s:
        root = f"http://127.0.0.1:{app.http_port}"
        async with s.get(root + "/", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/console/"
        async with s.get(root + "/console/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            page = await resp.text()
            csp = resp.headers["Content-Security-Policy"]
            etag = resp.headers["ETag"]
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Cache-Control"] == "no-cache"
        directives = dict(d.strip().partition(" ")[::2] for d in csp.split(";"))
        assert directives["script-src"] == "'self'"  # no inline script, no eval
        assert directives["default-src"] == "'none'" and directives["img-src"] == "data:"
        assert "<script>" not in page and 'src="/console/console.js"' in page
        async with s.get(root + "/console/", headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304
        async with s.get(root + "/console/console.js") as resp:
            assert resp.status == 200 and resp.content_type == "text/javascript"
            script = await resp.text()
        assert "innerHTML" not in script.replace("never innerHTML", "")
        for path in ("/console/../pyproject.toml", "/console/%2e%2e/app.py", "/console/nope.js"):
            async with s.get(root + path) as resp:
                assert resp.status == 404, path
        async with s.post(root + "/console/", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 405
