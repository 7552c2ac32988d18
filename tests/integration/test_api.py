"""The operator HTTP API against the real daemon: its listener, PostgreSQL, Redis and SMTP sink."""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.store.operator.filters import encode_cursor
from tests.support import Db, command, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
P = "/api/v1/internal"
TOKEN = "operator-token-for-tests"
BOB_TOKEN = "bob-has-his-own-token"
REPO = Path(__file__).resolve().parents[2]


class Api:
    """A small client for the daemon's internal listener."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        query = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()}
        async with self.session.get(self.base + path, params=query) as resp:
            return resp.status, await resp.json()

    async def post(
        self,
        path: str,
        body: Any = None,
        *,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
        data: Any = None,
    ) -> tuple[int, Any]:
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {token}")
        kwargs: dict[str, Any] = {"data": data} if data is not None else {"json": body}
        async with self.session.post(self.base + path, headers=sent, **kwargs) as resp:
            return resp.status, await resp.json()

    async def delivery(self, delivery_id: str) -> dict[str, Any]:
        status, body = await self.get(f"{P}/deliveries/{delivery_id.replace('/', '%2F')}")
        assert status == 200, body
        return dict(body)


@contextlib.asynccontextmanager
async def daemon(settings: Settings) -> AsyncIterator[Api]:
    async with running_app(settings) as app, aiohttp.ClientSession() as session:
        assert app.http_port is not None
        yield Api(session, app.http_port)


def settings_for(make_settings: MakeSettings, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "operator_token": TOKEN,
        "internal_http_addr": "127.0.0.1:0",
        "retry_jitter": 0,
        "retry_ladder": "0.1s",
    }
    values.update(overrides)
    return make_settings(**values)


def at(text: str | None) -> datetime:
    assert text is not None and text.endswith("Z"), text
    return datetime.fromisoformat(text)


def error_field(body: Any) -> str | None:
    field: str | None = body["error"]["field"]
    return field


async def test_lookup_shows_attempts_retry_plan_and_refuses_bad_ids(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.rcpt_replies["alice@example.com"] = ["451 4.3.0 try again later"]
    settings = settings_for(make_settings, retry_ladder="0.2s,0.5s")
    later = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    async with daemon(settings) as api:
        status, ready = await api.get("/readyz")
        assert status == 200 and ready["status"] == "ready"
        await xadd(
            settings,
            command("d-1"),
            command("d/later", idempotency_key="k-later", send_at=later.isoformat()),
        )
        await Db(settings.dsn).wait_status("d-1", "sent")

        sent = await api.delivery("d-1")
        assert sent["status"] == "sent" and sent["source"] == "authsession"
        assert sent["template_id"] == "signin_code" and sent["priority"] == "normal"
        assert sent["recipients"]["to"] == ["alice@example.com"]
        assert [(a["attempt_no"], a["status"], a["reply_code"]) for a in sent["attempts"]] == [
            (1, "transport_failed", 451),
            (2, "sent", 250),
        ]
        assert "try again later" in sent["attempts"][0]["reply_text"]
        assert sent["attempts"][0]["recipients"]["alice@example.com"]["outcome"] == "deferred"
        assert at(sent["attempts"][0]["started_at"]) <= at(sent["attempts"][1]["started_at"])
        assert sent["last_error"] is None and sent["dead_letter"] is None
        assert sent["retry_plan"] == {
            "next_attempt_at": None,
            "attempts_remaining": 0,
            "gives_up_at": None,
            "ladder_step": 2,
            "in_flight": False,
            "paused": False,
        }
        assert at(sent["finished_at"]) >= at(sent["created_at"])

        waiting = await api.delivery("d/later")
        assert waiting["status"] == "queued" and waiting["attempts"] == []
        plan = waiting["retry_plan"]
        assert at(plan["next_attempt_at"]) == later
        assert plan["attempts_remaining"] == 3  # the first attempt, then one per rung
        assert at(plan["gives_up_at"]) == later + timedelta(seconds=0.7)

        status, body = await api.get(f"{P}/deliveries/no-such-delivery")
        assert status == 404 and body["error"]["code"] == "not_found"
        assert error_field(body) == "delivery_id"
        for bad in ("-starts-with-dash", "has%20space", "x" * 129):
            status, body = await api.get(f"{P}/deliveries/{bad}")
            assert status == 400 and error_field(body) == "delivery_id", bad
        status, body = await api.get(f"{P}/deliveries/d-1", verbose="yes")
        assert status == 400 and error_field(body) == "verbose"


async def test_the_detail_shows_the_locale_the_message_was_rendered_in(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(make_settings)
    async with daemon(settings) as api:
        await xadd(
            settings,
            command("d-no-locale", locale=None),  # the default locale (en)
            command("d-fallback", idempotency_key="k-at", locale="de-AT"),  # de-AT -> de
            command("d-unknown", idempotency_key="k-fr", locale="fr"),  # none: the default
            command(
                "d-rendered",
                idempotency_key="k-r",
                payload_mode="rendered",
                template_id=None,
                locale=None,
                variables=None,
                subject="Hi",
                text="Hello",
            ),
        )
        for delivery_id in ("d-no-locale", "d-fallback", "d-unknown", "d-rendered"):
            await Db(settings.dsn).wait_status(delivery_id, "sent")
        locales = {d: (await api.delivery(d))["locale"] for d in ("d-no-locale", "d-fallback")}
        assert locales == {"d-no-locale": "en", "d-fallback": "de"}
        assert (await api.delivery("d-unknown"))["locale"] == "en"
        assert (await api.delivery("d-rendered"))["locale"] is None


async def test_listing_filters_and_keyset_pagination(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(make_settings)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    docs = [
        command(
            f"d-{n}",
            send_at=later,
            idempotency_key=f"k{n}",
            source="notification" if n % 2 else "authsession",
            to=["Bob@Example.com"] if n == 3 else ["alice@example.com"],
        )
        for n in range(1, 6)
    ]
    async with daemon(settings) as api:
        await xadd(settings, *docs)
        await wait_for(
            lambda: Db(settings.dsn).fetchval("SELECT count(*) = 5 FROM mail.deliveries")
        )

        seen: list[str] = []
        cursor = None
        for _ in range(3):
            params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            status, page = await api.get(f"{P}/deliveries", **params)
            assert status == 200
            seen += [d["delivery_id"] for d in page["items"]]
            cursor = page["next_cursor"]
        assert seen == ["d-5", "d-4", "d-3", "d-2", "d-1"] and cursor is None

        async def ids(**params: Any) -> list[str]:
            status, page = await api.get(f"{P}/deliveries", **params)
            assert status == 200, page
            return [d["delivery_id"] for d in page["items"]]

        assert await ids(source="notification") == ["d-5", "d-3", "d-1"]
        assert await ids(status="queued", source="authsession") == ["d-4", "d-2"]
        assert await ids(status="sent") == []
        assert await ids(recipient="bob@EXAMPLE.com") == ["d-3"]
        assert await ids(created_after=later) == []
        assert len(await ids(created_before=later, created_after="2000-01-01T00:00:00Z")) == 5

        other = encode_cursor("dl", False, datetime.now(UTC), "d-1")
        bad: list[tuple[dict[str, Any], str]] = [
            ({"limit": 0}, "limit"),
            ({"limit": 501}, "limit"),
            ({"limit": "ten"}, "limit"),
            ({"status": "lost"}, "status"),
            ({"source": "Not A Source"}, "source"),
            ({"created_after": "yesterday"}, "created_after"),
            ({"created_before": "2024-01-01T00:00:00"}, "created_before"),
            ({"created_after": "2024-02-30T00:00:00Z"}, "created_after"),
            ({"cursor": "!!"}, "cursor"),
            ({"cursor": "bm90LWpzb24"}, "cursor"),
            ({"cursor": other}, "cursor"),
        ]
        for query, field in bad:
            status, body = await api.get(f"{P}/deliveries", **query)
            assert status == 400 and error_field(body) == field, (query, body)
        async with api.session.get(f"{api.base}{P}/deliveries?limit=1&limit=2") as resp:
            assert resp.status == 400 and error_field(await resp.json()) == "limit"


async def test_dead_letters_review_requeue_and_stats(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    smtp_sink.behaviour.rcpt_replies["alice@example.com"] = ["452 4.2.2 mailbox full"] * 2
    smtp_sink.behaviour.rcpt_replies["bob@example.com"] = ["421 4.7.0 try later"] * 2
    settings = settings_for(make_settings, operator_tokens=f"bob:{BOB_TOKEN}")
    db = Db(settings.dsn)
    async with daemon(settings) as api:
        await xadd(
            settings, command("d-a"), command("d-b", idempotency_key="k-b", to=["bob@example.com"])
        )
        await db.wait_status("d-a", "dead_letter")
        await db.wait_status("d-b", "dead_letter")

        status, page = await api.get(f"{P}/dead-letters")
        assert status == 200 and {d["delivery_id"] for d in page["items"]} == {"d-a", "d-b"}
        assert all(d["reviewed_at"] is None and d["attempt_count"] == 2 for d in page["items"])

        status, done = await api.post(
            f"{P}/dead-letters/d-b/review",
            {"note": "provider throttles us"},
            headers={"X-Operator": "alice-oncall"},
        )
        assert status == 200 and done["reviewed_by"] == "operator"  # the token's identity
        status, page = await api.get(f"{P}/dead-letters")
        assert [d["delivery_id"] for d in page["items"]] == ["d-a", "d-b"]  # unreviewed first
        assert page["items"][1]["review_note"] == "provider throttles us"
        filters: list[tuple[dict[str, Any], list[str]]] = [
            ({"reviewed": False}, ["d-a"]),
            ({"reply_code": 452}, ["d-a"]),
            ({"reply_class": "4xx"}, ["d-a", "d-b"]),
            ({"recipient_domain": "EXAMPLE.com"}, ["d-a", "d-b"]),
            ({"limit": 1}, ["d-a"]),
        ]
        for query, expected in filters:
            status, page = await api.get(f"{P}/dead-letters", **query)
            assert [d["delivery_id"] for d in page["items"]] == expected, query
        status, page = await api.get(f"{P}/dead-letters", limit=1)
        status, rest = await api.get(f"{P}/dead-letters", limit=1, cursor=page["next_cursor"])
        assert [d["delivery_id"] for d in rest["items"]] == ["d-b"] and not rest["next_cursor"]

        status, stats = await api.get(f"{P}/stats")
        assert status == 200
        assert stats["deliveries_by_status"]["dead_letter"] == 2
        assert stats["dead_letters"] == {"unreviewed": 1, "open": 2, "total": 2}
        assert stats["attempts_last_hour"]["transport_failed"] == 4
        assert stats["sending"]["paused_globally"] is False

        dead = await api.delivery("d-a")
        assert dead["status"] == "dead_letter" and dead["dead_letter"]["last_reply_code"] == 452
        assert dead["last_error"]["reply_code"] == 452
        assert dead["retry_plan"]["attempts_remaining"] == 0

        # A named token: the audit records its name, whatever the body claims.
        status, change = await api.post(
            f"{P}/deliveries/d-a/requeue",
            {"reason": "mailbox emptied", "actor": "mallory"},
            token=BOB_TOKEN,
        )
        assert status == 200, change
        assert change["previous_status"] == "dead_letter" and change["status"] == "queued"
        await db.wait_status("d-a", "sent")
        again = await api.delivery("d-a")
        assert [a["status"] for a in again["attempts"]] == ["transport_failed"] * 2 + ["sent"]
        assert again["dead_letter"]["requeued_by"] == "bob"

        status, body = await api.post(f"{P}/deliveries/d-a/requeue")
        assert status == 409 and body["error"]["code"] == "conflict"
        status, body = await api.post(f"{P}/deliveries/unknown/requeue")
        assert status == 404
        status, body = await api.post(f"{P}/dead-letters/d-a/review", {})
        assert status == 400 and error_field(body) == "note"
        status, body = await api.post(f"{P}/dead-letters/unknown/review", {"note": "x"})
        assert status == 404

        status, audit = await api.get(f"{P}/operator-actions", target="d-a")
        assert [(a["action"], a["actor"], a["reason"]) for a in audit["items"]] == [
            ("delivery.requeue", "bob", "mailbox emptied")
        ]
        assert audit["items"][0]["detail"] == {
            "previous_status": "dead_letter",
            "actor_note": "mallory",
        }


async def test_bulk_requeue_dry_run_then_spread_release(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    for rcpt, reply in [
        ("alice@example.com", "452 4.2.2 mailbox full"),
        ("bob@example.com", "452 4.2.2 mailbox full"),
        ("carol@other.example", "421 4.7.0 try later"),
    ]:
        smtp_sink.behaviour.rcpt_replies[rcpt] = [reply] * 2
    settings = settings_for(make_settings)
    db = Db(settings.dsn)
    async with daemon(settings) as api:
        await xadd(
            settings,
            command("d-a"),
            command("d-b", idempotency_key="k-b", to=["bob@example.com"]),
            command("d-c", idempotency_key="k-c", to=["carol@other.example"]),
        )
        for delivery_id in ("d-a", "d-b", "d-c"):
            await db.wait_status(delivery_id, "dead_letter")

        status, dry = await api.post(
            f"{P}/dead-letters/requeue", {"reply_code": 452, "dry_run": True, "rate_per_second": 2}
        )
        assert status == 200, dry
        assert (dry["dry_run"], dry["matched"], dry["requeued"], dry["action_id"]) == (
            True,
            2,
            0,
            None,
        )
        assert (at(dry["last_due_at"]) - at(dry["first_due_at"])).total_seconds() == 0.5
        status, dry = await api.post(
            f"{P}/dead-letters/requeue", {"recipient_domain": "other.example", "dry_run": True}
        )
        assert dry["matched"] == 1
        assert await db.status("d-a") == "dead_letter"

        # Hold sending so the spread can be seen before the scheduler claims them.
        status, _ = await api.post(f"{P}/sending/pause", {"reason": "bulk requeue"})
        assert status == 200
        status, done = await api.post(
            f"{P}/dead-letters/requeue",
            {
                "reply_class": "4xx",
                "source": "authsession",
                "reply_code": 452,
                "rate_per_second": 2,
                "reason": "provider recovered",
            },
            headers={"X-Operator": "carol"},
        )
        assert status == 200, done
        assert done["requeued"] == 2 and sorted(done["delivery_ids"]) == ["d-a", "d-b"]
        due = sorted(
            [
                at((await api.delivery(d))["retry_plan"]["next_attempt_at"])
                for d in done["delivery_ids"]
            ]
        )
        assert (due[1] - due[0]).total_seconds() == pytest.approx(0.5, abs=0.01)
        status, audit = await api.get(f"{P}/operator-actions", action="dead_letters.requeue")
        entry = audit["items"][0]
        assert entry["actor"] == "operator" and entry["reason"] == "provider recovered"
        assert entry["detail"]["actor_note"] == "carol"  # the header is only a note
        assert sorted(entry["detail"]["delivery_ids"]) == ["d-a", "d-b"]
        assert entry["detail"]["filter"] == {
            "source": "authsession",
            "reply_code": 452,
            "reply_class": "4xx",
        }
        status, again = await api.post(f"{P}/dead-letters/requeue", {"reply_code": 452})
        assert again["requeued"] == 0 and again["action_id"] is None

        await api.post(f"{P}/sending/resume", {})
        await db.wait_status("d-a", "sent")
        await db.wait_status("d-b", "sent")
        assert await db.status("d-c") == "dead_letter"

        for body, field in [
            ({"rate_per_second": 0}, "rate_per_second"),
            ({"limit": 0}, "limit"),
            ({"reply_class": "4"}, "reply_class"),
            ({"created_after": "now"}, "created_after"),
            ({"dry_run": "yes"}, "dry_run"),
            ({"colour": "red"}, "colour"),
        ]:
            status, err = await api.post(f"{P}/dead-letters/requeue", body)
            assert status == 400 and error_field(err) == field, (body, err)


async def test_cancel_a_queued_delivery_and_it_is_never_sent(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(make_settings)
    db = Db(settings.dsn)
    # Due soon, but not before d-now has gone out and the cancel is in, even on a loaded
    # machine; the test then waits past it to see that the cancelled one stays unsent.
    soon = datetime.now(UTC) + timedelta(seconds=3)
    async with daemon(settings) as api:
        await xadd(
            settings,
            command("d-soon", send_at=soon.isoformat()),
            command("d-now", idempotency_key="k-now"),
        )
        await db.wait_status("d-now", "sent")
        await db.wait_status("d-soon", "queued")
        status, change = await api.post(
            f"{P}/deliveries/d-soon/cancel", {"reason": "customer asked"}
        )
        assert status == 200, change
        assert (change["previous_status"], change["status"]) == ("queued", "cancelled")
        status, body = await api.post(f"{P}/deliveries/d-soon/cancel")
        assert status == 409
        status, body = await api.post(f"{P}/deliveries/d-now/cancel")
        assert status == 409 and "sent" in body["error"]["message"]
        await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.4)
        cancelled = await api.delivery("d-soon")
        assert cancelled["status"] == "cancelled" and cancelled["attempts"] == []
        assert cancelled["retry_plan"]["next_attempt_at"] is None
        assert cancelled["finished_at"] is not None
    assert [m.rcpt_tos for m in smtp_sink.messages] == [["alice@example.com"]]


async def test_pause_holds_claiming_per_source_and_survives_a_restart(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(make_settings)
    db = Db(settings.dsn)
    async with daemon(settings) as api:
        status, change = await api.post(
            f"{P}/sending/pause", {"source": "authsession", "reason": "provider outage"}
        )
        assert status == 200 and change["changed"] is True and change["scope"] == "authsession"
        await xadd(
            settings,
            command("d-held"),
            command("d-free", idempotency_key="k-free", source="notification"),
        )
        await db.wait_status("d-free", "sent")
        held = await api.delivery("d-held")
        assert held["status"] == "queued" and held["retry_plan"]["paused"] is True
        status, stats = await api.get(f"{P}/stats")
        assert stats["sending"]["paused_sources"] == ["authsession"]
        assert stats["backlog"]["due"] == 1
    async with daemon(settings) as api:  # a new process: the pause is in PostgreSQL
        status, state = await api.get(f"{P}/sending")
        assert status == 200 and state["paused_sources"] == ["authsession"]
        assert state["pauses"][0]["reason"] == "provider outage"
        # "Not sent while paused", known rather than waited for: a delivery of another
        # source, due after d-held, is sent, so a claim pass went over d-held and left it.
        await xadd(
            settings, command("d-control", idempotency_key="k-control", source="notification")
        )
        await db.wait_status("d-control", "sent")
        assert await db.status("d-held") == "queued"
        status, change = await api.post(f"{P}/sending/resume", {"source": "authsession"})
        assert status == 200 and change["changed"] is True
        await db.wait_status("d-held", "sent")
        status, change = await api.post(f"{P}/sending/resume", {"source": "authsession"})
        assert change["changed"] is False

        status, change = await api.post(f"{P}/sending/pause", None)
        assert status == 200 and change["scope"] == "*"
        await xadd(settings, command("d-global", idempotency_key="k-global", source="notification"))
        await wait_for(lambda: db.status("d-global"))
        await asyncio.sleep(0.3)  # one claim pass at least, as above
        assert await db.status("d-global") == "queued"
        await api.post(f"{P}/sending/resume")
        await db.wait_status("d-global", "sent")
        status, audit = await api.get(f"{P}/operator-actions", action="sending.pause")
        assert [a["target"] for a in audit["items"]] == ["*", "authsession"]


async def test_malformed_commands_are_listed_traced_and_replayed_after_deploy(
    make_settings: MakeSettings, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    settings = settings_for(make_settings, template_dir=templates)
    db = Db(settings.dsn)
    async with daemon(settings) as api:
        entries = await xadd(
            settings,
            command("d-w1", template_id="welcome"),
            command("d-w2", idempotency_key="k-w2", template_id="welcome"),
            "this is not json",
            command("d-dup", idempotency_key="k-dup"),
        )
        dup = await xadd(settings, command("d-dup", idempotency_key="k-dup"))
        await db.wait_status("d-dup", "sent")
        await wait_for(lambda: db.fetchval("SELECT count(*) = 3 FROM mail.malformed_commands"))
        await wait_for(lambda: db.fetchval("SELECT count(*) = 1 FROM mail.command_replays"))

        status, page = await api.get(f"{P}/malformed-commands", failure_code="unknown_template")
        assert status == 200
        assert [m["delivery_id"] for m in page["items"]] == ["d-w2", "d-w1"]  # newest first
        w1 = page["items"][1]
        assert w1["stream_entry_id"] == entries[0] and w1["replayed_at"] is None

        status, trace = await api.get(f"{P}/commands/{entries[0]}")
        assert status == 200 and trace["outcome"] == "malformed"
        assert trace["malformed"]["failure_code"] == "unknown_template"
        status, trace = await api.get(f"{P}/commands/{dup[0]}")
        assert (trace["outcome"], trace["duplicate_of"]) == ("duplicate", "d-dup")
        status, trace = await api.get(f"{P}/commands/{entries[3]}")
        assert trace["outcome"] == "delivery" and trace["delivery"]["delivery_id"] == "d-dup"
        status, body = await api.get(f"{P}/commands/1-1")
        assert status == 404
        status, body = await api.get(f"{P}/commands/latest")
        assert status == 400 and error_field(body) == "stream_entry_id"

        status, body = await api.post(f"{P}/malformed-commands/{w1['id']}/replay")
        assert status == 409 and body["error"]["code"] == "still_invalid"
        status, dry = await api.post(
            f"{P}/malformed-commands/replay", {"failure_code": "unknown_template", "dry_run": True}
        )
        assert (dry["matched"], dry["accepted"], dry["still_invalid"]) == (2, 0, 2)

    # Deploy the missing template and restart the daemon, as a release would.
    shutil.copytree(templates / "signin_code", templates / "welcome")
    async with daemon(settings) as api:
        status, result = await api.post(
            f"{P}/malformed-commands/{w1['id']}/replay", {"reason": "welcome template deployed"}
        )
        assert status == 200, result
        assert result["items"] == [
            {
                "id": w1["id"],
                "stream_entry_id": entries[0],
                "outcome": "accepted",
                "delivery_id": "d-w1",
                "failure_code": None,
                "failure_detail": None,
            }
        ]
        await db.wait_status("d-w1", "sent")
        status, trace = await api.get(f"{P}/commands/{entries[0]}")
        assert trace["outcome"] == "delivery" and trace["delivery"]["status"] == "sent"
        assert trace["malformed"]["replayed_delivery_id"] == "d-w1"
        status, body = await api.post(f"{P}/malformed-commands/{w1['id']}/replay")
        assert status == 409 and body["error"]["code"] == "already_replayed"

        status, dry = await api.post(
            f"{P}/malformed-commands/replay", {"failure_code": "unknown_template", "dry_run": True}
        )
        assert (dry["matched"], dry["accepted"], dry["action_id"]) == (1, 1, None)
        assert await db.status("d-w2") is None
        status, done = await api.post(
            f"{P}/malformed-commands/replay", {"failure_code": "unknown_template"}
        )
        assert (done["accepted"], done["items"][0]["delivery_id"]) == (1, "d-w2")
        assert done["action_id"] is not None
        await db.wait_status("d-w2", "sent")

        status, page = await api.get(f"{P}/malformed-commands", failure_code="invalid_json")
        bad = page["items"][0]
        status, body = await api.post(f"{P}/malformed-commands/{bad['id']}/replay")
        assert status == 409 and body["error"]["code"] == "still_invalid"
        status, page = await api.get(f"{P}/malformed-commands", replayed=True)
        assert {m["delivery_id"] for m in page["items"]} == {"d-w1", "d-w2"}
        status, stats = await api.get(f"{P}/stats")
        assert stats["malformed_commands_last_hour"] == 3
        for bad_id, code in (("abc", 400), ("0", 400), ("999999", 404)):
            status, body = await api.post(f"{P}/malformed-commands/{bad_id}/replay")
            assert status == code, (bad_id, body)
        status, body = await api.post(f"{P}/malformed-commands/replay", {})
        assert status == 400 and error_field(body) == "failure_code"


async def test_suppression_list_add_list_remove(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(make_settings)
    db = Db(settings.dsn)
    async with daemon(settings) as api:
        status, change = await api.post(
            f"{P}/suppressions", {"address": "Carol@Example.com", "reason": "asked us"}
        )
        assert status == 200 and change["suppression"]["address"] == "carol@example.com"
        assert change["suppression"]["created_by"] == "operator"
        await xadd(settings, command("d-carol", to=["carol@example.com"]))
        await db.wait_status("d-carol", "suppressed")
        status, page = await api.get(f"{P}/suppressions", domain="example.com")
        assert [(s["address"], s["reason"]) for s in page["items"]] == [
            ("carol@example.com", "asked us")
        ]
        status, page = await api.get(f"{P}/suppressions", address="nobody@example.com")
        assert page["items"] == []
        status, change = await api.post(
            f"{P}/suppressions/remove", {"address": "carol@example.com"}
        )
        assert status == 200 and change["suppressed"] is False
        status, body = await api.post(f"{P}/suppressions/remove", {"address": "carol@example.com"})
        assert status == 404 and error_field(body) == "address"
        for body, field in [
            ({"address": "no-at-sign"}, "address"),
            ({}, "address"),
            ({"address": "a@b.example", "expires_at": "soon"}, "expires_at"),
        ]:
            status, err = await api.post(f"{P}/suppressions", body)
            assert status == 400 and error_field(err) == field, body
    assert smtp_sink.messages == []


async def test_actions_are_disabled_without_a_configured_token(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(make_settings, operator_token=None)
    async with daemon(settings) as api:
        status, body = await api.post(f"{P}/sending/pause", {})
        assert status == 403 and body["error"]["code"] == "actions_disabled"
        status, body = await api.post(f"{P}/deliveries/d-1/requeue", token=None)
        assert status == 403
        status, body = await api.get(f"{P}/stats")
        assert status == 200 and body["sending"]["paused_globally"] is False


async def test_bad_credentials_and_bad_bodies_are_refused(
    make_settings: MakeSettings, smtp_sink: SmtpSink
) -> None:
    settings = settings_for(make_settings)
    async with daemon(settings) as api:
        path = f"{P}/sending/pause"
        for token, headers in [
            (None, {}),
            ("wrong", {}),
            (None, {"Authorization": f"Basic {TOKEN}"}),
            (None, {"Authorization": "Bearer"}),
        ]:
            status, body = await api.post(path, {}, token=token, headers=headers)
            assert status == 401 and body["error"]["code"] == "unauthorized", headers
        async with api.session.post(api.base + path) as resp:
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        status, state = await api.get(f"{P}/sending")
        assert state["pauses"] == []  # nothing happened

        for data, field in [
            (b"{not json", "body"),
            (b"[1, 2]", "body"),
            (b'"text"', "body"),
            (b'{"source": 5}', "source"),
            (b'{"source": "A B"}', "source"),
            (b'{"actor": ""}', "actor"),
            (b'{"reason": "a\\u0000b"}', "reason"),
            (b'{"extra": 1}', "extra"),
        ]:
            status, body = await api.post(path, data=data)
            assert status == 400 and error_field(body) == field, (data, body)
        status, body = await api.post(path, {}, headers={"X-Operator": "tab\there"})
        assert status == 400 and error_field(body) == "X-Operator"
        status, body = await api.post(path, data=io.BytesIO(b"x" * (1024 * 1024 + 10)))
        assert status == 413 and body["error"]["code"] == "body_too_large"
        async with api.session.delete(f"{api.base}{P}/stats") as resp:
            assert resp.status == 405 and (await resp.json())["error"]["code"]
        async with api.session.get(f"{api.base}{P}/nothing-here") as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
        status, state = await api.get(f"{P}/sending")
        assert state["pauses"] == []


def _schemathesis_config(path: Path) -> Path:
    """Pin each listing's cursor to a real one: an opaque server-issued value cannot be
    generated, so it would only ever exercise the 400 path (unit-tested on its own)."""
    now = datetime.now(UTC)
    cursors = {
        "get_deliveries": encode_cursor("d", now, "zz"),
        "get_dead_letters": encode_cursor("dl", True, now, "zz"),
        "get_malformed_commands": encode_cursor("m", now, 2**40),
        "get_suppressions": encode_cursor("s", "a"),
        "get_operator_actions": encode_cursor("a", 2**40),
    }
    path.write_text(
        "".join(
            f'[[operations]]\ninclude-operation-id = "{op}"\nparameters = {{ cursor = "{c}" }}\n\n'
            for op, c in cursors.items()
        )
    )
    return path


async def test_openapi_document_holds_against_the_live_server(
    make_settings: MakeSettings, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    smtp_sink.behaviour.rcpt_replies["bob@example.com"] = ["452 4.2.2 mailbox full"] * 2
    settings = settings_for(make_settings)
    async with daemon(settings) as api:
        await xadd(
            settings,
            command("d-1"),
            command("d-2", idempotency_key="k-2", to=["bob@example.com"]),
            "{}",
        )
        await Db(settings.dsn).wait_status("d-2", "dead_letter")
        status, document = await api.get(f"{P}/openapi.json")
        assert status == 200 and document["openapi"].startswith("3.")
        assert f"{P}/deliveries/{{delivery_id}}" in document["paths"]

        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(_schemathesis_config(tmp_path / "schemathesis.toml")),
            "run",
            f"{api.base}{P}/openapi.json",
            "--url",
            api.base,
            "--checks",
            "all",
            "--max-examples",
            "8",
            "--seed",
            "5",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--no-color",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        # A bound against a hang (a request that never ends), not a speed target: the run
        # takes ~25 s on a quiet machine and over a minute on a loaded one.
        output, _ = await asyncio.wait_for(proc.communicate(), 240)
        report = output.decode(errors="replace")
        assert proc.returncode == 0, report[-6000:]
        assert "passed" in report
