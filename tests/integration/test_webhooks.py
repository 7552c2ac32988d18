"""Webhooks against a real HTTP receiver: every outcome event delivered, signed (the
receiver verifies with the published secret), in order per delivery, retried through a
receiver answering 500, resetting, redirecting, slow and down — nothing lost; a slow
endpoint never delays another; an endpoint failing its whole schedule is disabled with its
backlog kept for enable and replay; targets refused unless allowed."""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from standardwebhooks.webhooks import WebhookVerificationError

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.errors import OperatorError
from maildaemon.operator import webhooks as ops
from maildaemon.store.operator.records import Actor
from maildaemon.store.pipeline.db import Store
from maildaemon.store.webhooks.admin import WebhookAdmin
from maildaemon.store.webhooks.records import EndpointSecret
from maildaemon.webhooks import signing
from tests.support import Db, command, ingest_one, running_app, wait_for
from tests.webhook_receiver import Received, Receiver

MakeSettings = Callable[..., Settings]
WHO = Actor("ops@test")
LOOPBACK = ops.TargetRules(True, ("127.0.0.0/8",), 3600.0)


def _settings(make_settings: MakeSettings, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_allow_http": True,
        "webhook_allowed_networks": "127.0.0.0/8",
        "webhook_poll_interval": "0.1s",
        "webhook_retry_ladder": ",".join(["0.2s"] * 30),
        "webhook_retry_jitter": 0,
        "webhook_timeout": "2s",
        "webhook_connect_timeout": "1s",
        "event_publish_interval": "0.1s",
    }
    values.update(overrides)
    return make_settings(**values)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


async def _add(store: Store, receiver: Receiver, **kw: Any) -> EndpointSecret:
    added = await ops.add(
        WebhookAdmin(store.pool), LOOPBACK, receiver.url, kw.get("events"), kw.get("source"),
        WHO, "test",
    )  # fmt: skip
    receiver.secrets.append(added.secret)
    return added


async def _until_accepted(receiver: Receiver, n: int, timeout: float = 20.0) -> None:
    async def enough() -> bool:
        return len(receiver.accepted()) >= n

    await wait_for(enough, timeout)


async def test_events_arrive_signed_and_in_order_per_delivery(
    make_settings: MakeSettings, smtp_sink: SmtpSink, receiver: Receiver
) -> None:
    smtp_sink.behaviour.rcpt_replies["later@example.com"] = ["451 4.7.1 try later"] * 10
    settings = _settings(make_settings, retry_ladder="0.2s,0.2s", retry_jitter=0)
    db = Db(settings.dsn)
    store = await Store.open(settings.dsn)
    try:
        async with running_app(settings):
            added = await _add(store, receiver)
            assert added.secret.startswith("whsec_")
            await ingest_one(store, command("wh-sent"))
            await ingest_one(store, command("wh-dead", to=["later@example.com"]))
            await _until_accepted(receiver, 4)
            listed = await WebhookAdmin(store.pool).webhook_endpoints()
    finally:
        await store.close()
    assert all(r.verified_with == [added.secret] for r in receiver.requests)
    by_delivery: dict[str, list[str]] = {}
    for r in receiver.accepted():
        by_delivery.setdefault(r.body["data"]["delivery_id"], []).append(r.body["type"])
    assert by_delivery == {
        "wh-sent": ["sent"],
        "wh-dead": ["retry_scheduled", "retry_scheduled", "dead_letter"],
    }
    ids = [r.webhook_id for r in receiver.accepted()]
    assert len(set(ids)) == 4 and all(i.startswith("msg_") for i in ids)
    assert "secret" not in repr(listed) and added.secret not in repr(listed)
    _readme_receiver_verifies(receiver.accepted(), added.secret)
    assert await db.fetchval("SELECT count(*) FROM mail.webhook_queue") == 0
    assert await db.fetchval("SELECT count(*) FROM mail.webhook_attempts WHERE ok") == 4


async def test_a_new_event_goes_out_at_once_not_at_the_next_poll(
    make_settings: MakeSettings, smtp_sink: SmtpSink, receiver: Receiver
) -> None:
    """The outbox publisher wakes the dispatcher when it queued webhooks: with a 30 s poll
    interval the event still arrives within a few seconds of the mail being sent."""
    settings = _settings(make_settings, webhook_poll_interval="30s")
    db = Db(settings.dsn)
    store = await Store.open(settings.dsn)
    try:
        async with running_app(settings):
            await asyncio.sleep(0.5)  # the dispatcher's first pass is over: it sleeps 30 s
            await _add(store, receiver)
            await ingest_one(store, command("wh-prompt"))
            await db.wait_status("wh-prompt", "sent")
            sent = asyncio.get_running_loop().time()
            await _until_accepted(receiver, 1, timeout=5)
            waited = asyncio.get_running_loop().time() - sent
    finally:
        await store.close()
    assert [r.body["type"] for r in receiver.accepted()] == ["sent"]
    assert waited < 3, waited


def _readme_receiver_verifies(got: list[Received], secret: str) -> None:
    """The README's five-line receiver, run as written on what arrived: it takes each
    event once, and refuses a forged body and a foreign secret."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("## Webhooks", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), scope)
    receive, seen = scope["receive"], set[str]()
    events = [receive(r.raw, r.headers, secret, seen) for r in got]
    assert [e["type"] for e in events] == [r.body["type"] for r in got]
    assert receive(got[0].raw, got[0].headers, secret, seen) is None, "a repeat"
    with pytest.raises(WebhookVerificationError):
        receive(got[0].raw.replace(b"delivery_id", b"delivery_iD"), got[0].headers, secret, set())
    with pytest.raises(WebhookVerificationError):
        receive(got[0].raw, got[0].headers, signing.new_secret(), set())


async def test_a_hostile_receiver_loses_nothing_and_keeps_the_order(
    make_settings: MakeSettings, smtp_sink: SmtpSink, receiver: Receiver
) -> None:
    """500, a reset, a redirect, a slow answer past the timeout, then down for a while:
    every event arrives, each accepted once, the same webhook-id on every try."""
    smtp_sink.behaviour.rcpt_replies["later@example.com"] = ["451 4.7.1 try later"] * 10
    receiver.plan = [500, "reset", "redirect", ("slow", 3.0), 503]
    settings = _settings(make_settings, retry_ladder="0.3s,0.3s", retry_jitter=0)
    db = Db(settings.dsn)
    store = await Store.open(settings.dsn)
    try:
        async with running_app(settings):
            await _add(store, receiver, events=["retry_scheduled", "dead_letter", "sent"])
            await ingest_one(store, command("wh-h1", to=["later@example.com"]))
            await ingest_one(store, command("wh-h2"))

            await wait_for(  # every scripted failure answered and on record
                lambda: db.fetchval("SELECT count(*) >= 5 FROM mail.webhook_attempts WHERE NOT ok"),
                20,
            )
            await receiver.stop()  # down
            down_since = len(receiver.requests)
            await wait_for(
                lambda: db.fetchval(
                    "SELECT count(*) >= 3 FROM mail.webhook_attempts WHERE error LIKE '%Connect%'"
                ),
                20,
            )
            assert len(receiver.requests) == down_since
            await receiver.start()  # back on the same port
            await _until_accepted(receiver, 4, 30)
            attempts = await db.fetch(
                "SELECT * FROM mail.webhook_attempts WHERE NOT ok ORDER BY id"
            )
    finally:
        await store.close()
    accepted = receiver.accepted()
    kinds = [(r.body["data"]["delivery_id"], r.body["type"], r.webhook_id) for r in accepted]
    assert len(kinds) == len(set(kinds)) == 4, "each event accepted once"
    h1 = [t for d, t, _ in kinds if d == "wh-h1"]
    assert h1 == ["retry_scheduled", "retry_scheduled", "dead_letter"], "in order"
    by_id: dict[str, set[str]] = {}
    for r in receiver.requests:
        by_id.setdefault(r.webhook_id, set()).add(r.body["type"])
    assert all(len(types) == 1 for types in by_id.values()), "one id, one event"
    reasons = {a["http_status"] for a in attempts}
    assert {500, 503, 307} <= reasons, reasons
    assert any("redirect" in (a["error"] or "") for a in attempts)
    assert any(a["response"] and len(a["response"]) <= 1000 for a in attempts)
    assert any(a["http_status"] is None and a["duration_ms"] >= 1900 for a in attempts), (
        "the slow answer ended by the total timeout"
    )


async def test_a_slow_endpoint_does_not_delay_another(
    make_settings: MakeSettings, receiver: Receiver
) -> None:
    slow = Receiver(default=("slow", 30.0))
    await slow.start()
    settings = _settings(make_settings, smtp_mode="stub", webhook_timeout="20s")
    store = await Store.open(settings.dsn)
    try:
        async with running_app(settings):
            await _add(store, slow)
            await _add(store, receiver)
            for i in range(12):
                await ingest_one(store, command(f"wh-iso-{i}"))
            await _until_accepted(receiver, 12, 10)
            assert slow.accepted() == [], "the slow one is still on its first answers"
            assert 0 < len(slow.requests) <= 4, "at most MAIL_WEBHOOK_CONCURRENCY in flight"
    finally:
        await store.close()
        await slow.stop()


async def test_a_whole_failed_schedule_disables_and_keeps_the_backlog(
    make_settings: MakeSettings, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.default = 500
    settings = _settings(make_settings, smtp_mode="stub", webhook_retry_ladder="0.1s,0.1s")
    db = Db(settings.dsn)
    store = await Store.open(settings.dsn)
    admin = WebhookAdmin(store.pool)
    try:
        async with running_app(settings):
            added = await _add(store, receiver)
            await ingest_one(store, command("wh-off"))

            async def disabled() -> bool:
                return not (await admin.webhook_endpoint(added.endpoint.id)).enabled

            await wait_for(disabled, 20)
            assert len(receiver.requests) == 3, "three attempts: the first and two retries"
            assert await db.fetchval("SELECT count(*) FROM mail.webhook_queue") == 1
            await ingest_one(store, command("wh-off-2"))  # queued while disabled
            await wait_for(lambda: db.fetchval("SELECT count(*) = 2 FROM mail.webhook_queue"), 10)
            receiver.default = 200
            await admin.set_enabled(added.endpoint.id, True, WHO, "fixed")
            await _until_accepted(receiver, 2)
            await wait_for(  # and their results written: nothing waits for the endpoint
                lambda: db.fetchval("SELECT count(*) = 0 FROM mail.webhook_queue"), 10
            )
            dry = await ops.replay(admin, added.endpoint.id, 10**9, None, None, True, WHO, None)
            assert dry.matched == 0
            everything = await ops.replay(
                admin, added.endpoint.id, None, added.endpoint.created_at, None, False, WHO, None
            )
            assert everything.queued == 2
            await _until_accepted(receiver, 4)
    finally:
        await store.close()
    assert "webhook endpoint disabled" in caplog.text
    assert added.secret not in caplog.text
    ids = [r.webhook_id for r in receiver.accepted()]
    assert sorted(ids[:2]) == sorted(ids[2:]), "a replay keeps the webhook-id"


@pytest.mark.parametrize(
    ("url", "rules", "why"),
    [
        ("http://example.com/hook", ops.TargetRules(False, (), 0), "must be https"),
        ("https://127.0.0.1/hook", ops.TargetRules(False, (), 0), "loopback"),
        ("https://localhost/hook", ops.TargetRules(False, (), 0), "loopback"),
        ("https://169.254.169.254/latest", ops.TargetRules(False, (), 0), "metadata"),
        ("https://[fd00:ec2::254]/", ops.TargetRules(False, ("fd00::/8",), 0), None),
        ("https://[fd00:ec2::254]/", ops.TargetRules(False, (), 0), "metadata"),
        ("https://[fe80::1]/", ops.TargetRules(False, (), 0), "link-local"),
        ("https://[::ffff:127.0.0.1]/", ops.TargetRules(False, (), 0), "loopback"),
        ("https://user:pw@example.com/", ops.TargetRules(False, (), 0), "no user"),
        ("https://no-such-host.invalid/", ops.TargetRules(False, (), 0), "does not resolve"),
        ("https://x/" + "a" * 3000, ops.TargetRules(False, (), 0), "at most"),
    ],
)
async def test_refused_targets_at_add_time(
    make_settings: MakeSettings, url: str, rules: ops.TargetRules, why: str | None
) -> None:
    settings = make_settings(smtp_mode="stub")
    store = await Store.open(settings.dsn)
    try:
        async with running_app(settings):
            admin = WebhookAdmin(store.pool)
            if why is None:
                added = await ops.add(admin, rules, url, None, None, WHO, None)
                assert added.endpoint.url == url
                return
            with pytest.raises(OperatorError, match=why):
                await ops.add(admin, rules, url, None, None, WHO, None)
            assert (await admin.webhook_endpoints()).items == []
    finally:
        await store.close()


async def test_a_name_that_resolves_to_loopback_later_is_refused_at_connect(
    make_settings: MakeSettings, receiver: Receiver
) -> None:
    """DNS rebinding: added while allowed, the daemon then runs without the allowance —
    the resolver refuses the address at connect time; nothing reaches the receiver."""
    settings = _settings(make_settings, smtp_mode="stub", webhook_allowed_networks="")
    db = Db(settings.dsn)
    store = await Store.open(settings.dsn)
    try:
        async with running_app(settings):
            await ops.add(
                WebhookAdmin(store.pool), LOOPBACK, f"http://localhost:{receiver.port}/hook",
                None, None, WHO, None,
            )  # fmt: skip
            await ingest_one(store, command("wh-rebind"))
            await wait_for(
                lambda: db.fetchval(
                    "SELECT count(*) >= 2 FROM mail.webhook_attempts WHERE NOT ok "
                    "AND error LIKE '%loopback%'"
                )
            )
    finally:
        await store.close()
    assert receiver.requests == []


async def test_rotation_signs_with_both_secrets_and_a_ping_arrives(
    make_settings: MakeSettings, receiver: Receiver
) -> None:
    settings = _settings(make_settings, smtp_mode="stub")
    store = await Store.open(settings.dsn)
    admin = WebhookAdmin(store.pool)
    try:
        async with running_app(settings):
            added = await _add(store, receiver)
            rotated = await ops.rotate(admin, LOOPBACK, added.endpoint.id, WHO, "leaked")
            receiver.secrets.append(rotated.secret)
            assert rotated.secret != added.secret
            assert rotated.endpoint.rotation_ends_at is not None
            ping = await admin.ping(added.endpoint.id, WHO, None)
            await _until_accepted(receiver, 1)
    finally:
        await store.close()
    (got,) = receiver.requests
    assert got.webhook_id == f"msg_{ping.event_id}" and got.body["type"] == "ping"
    assert got.verified_with == [added.secret, rotated.secret]
    assert len(got.signature.split(" ")) == 2


async def test_the_dev_stack_receiver_gets_signed_webhooks(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    """`maildaemon dev`: its local receiver is the endpoint (one, even across restarts)
    and verifies what arrives with its secret."""
    from maildaemon.app import App
    from maildaemon.devstack.postgres import pick_free_port
    from maildaemon.devstack.webhook_sink import DevWebhookSink

    settings = _settings(make_settings, smtp_mode="stub")
    out = tmp_path / "webhooks.jsonl"
    store = await Store.open(settings.dsn)
    try:
        for run in range(2):  # a second run replaces the first run's endpoint
            sink = DevWebhookSink(out, pick_free_port())
            await sink.start()
            app = App(settings, dev_webhook=(sink.url, sink.secret))
            task = asyncio.create_task(app.run())
            try:
                await wait_for(lambda app=app: asyncio.sleep(0, app.readiness.workers_running))
                await ingest_one(store, command(f"wh-dev-{run}"))
                await wait_for(
                    lambda run=run: asyncio.sleep(
                        0, out.exists() and f"wh-dev-{run}" in out.read_text()
                    )
                )
            finally:
                app.request_stop()
                assert await asyncio.wait_for(task, 30) == 0
                await sink.stop()
        listed = await WebhookAdmin(store.pool).webhook_endpoints()
    finally:
        await store.close()
    assert [e.url for e in listed.items] == [sink.url]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["body"]["data"]["delivery_id"] for x in lines] == ["wh-dev-0", "wh-dev-1"]
    assert all(x["verified"] for x in lines)


async def test_a_failing_endpoint_is_held_not_hammered(
    make_settings: MakeSettings, receiver: Receiver
) -> None:
    """A receiver answering 503: rounds of at most MAIL_WEBHOOK_CONCURRENCY probes, one
    retry step apart — not every waiting event tried at once."""
    receiver.default = 503
    settings = _settings(
        make_settings, smtp_mode="stub", webhook_retry_ladder=",".join(["0.6s"] * 10)
    )
    store = await Store.open(settings.dsn)
    try:
        async with running_app(settings):
            admin = WebhookAdmin(store.pool)
            added = await _add(store, receiver)
            await admin.set_enabled(added.endpoint.id, False, WHO, "fill its queue first")
            for i in range(12):
                await ingest_one(store, command(f"wh-held-{i}"))
            await wait_for(
                lambda: Db(settings.dsn).fetchval("SELECT count(*) = 12 FROM mail.webhook_queue")
            )
            await admin.set_enabled(added.endpoint.id, True, WHO, None)

            async def two_rounds() -> bool:
                return len(receiver.requests) >= 8

            await wait_for(two_rounds, 20)
            got = list(receiver.requests)
    finally:
        await store.close()
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert max(gaps[:3]) < 0.3, "the first round goes out together"
    assert gaps[3] >= 0.5, f"then the endpoint is held for a retry step: {gaps}"


async def test_https_endpoints_with_a_private_ca(
    make_settings: MakeSettings, smtp_ca: trustme.CA, tmp_path: Path
) -> None:
    """The default: https, verified against MAIL_WEBHOOK_CA_FILE (a private CA); a
    receiver whose certificate that CA did not sign gets nothing."""
    good = Receiver(tls=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    smtp_ca.issue_cert("127.0.0.1").configure_cert(good.tls)
    rogue = Receiver(tls=ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
    trustme.CA().issue_cert("127.0.0.1").configure_cert(rogue.tls)
    ca_file = tmp_path / "ca.pem"
    smtp_ca.cert_pem.write_to_path(str(ca_file))
    await good.start()
    await rogue.start()
    settings = _settings(
        make_settings, smtp_mode="stub", webhook_allow_http=False, webhook_ca_file=ca_file
    )
    db = Db(settings.dsn)
    store = await Store.open(settings.dsn)
    https = ops.TargetRules(False, ("127.0.0.0/8",), 60.0)
    try:
        async with running_app(settings):
            for r in (good, rogue):
                added = await ops.add(WebhookAdmin(store.pool), https, r.url, None, None, WHO, None)
                r.secrets.append(added.secret)
            await ingest_one(store, command("wh-tls"))
            await _until_accepted(good, 1)
            await wait_for(
                lambda: db.fetchval(
                    "SELECT count(*) >= 1 FROM mail.webhook_attempts "
                    "WHERE NOT ok AND error LIKE '%certificate%'"
                )
            )
    finally:
        await store.close()
        await good.stop()
        await rogue.stop()
    assert good.accepted()[0].verified_with == good.secrets
    assert rogue.requests == []
