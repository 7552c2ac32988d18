"""Operator actions do exactly what they say, through the CLI (a real process) and the HTTP
API, against the real daemon, PostgreSQL and an SMTP server whose mail is counted.

A dry run writes nothing (row counts, the audit table) and sends nothing; the CLI judges a
replay as the running daemon does; every replay is audited as given; the attempt counter
agrees with the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from maildaemon.config import Settings
from maildaemon.devstack.smtp_sink import SmtpSink
from maildaemon.message.render import TemplateCatalog
from maildaemon.store.operator.actions import OperatorStore
from maildaemon.store.operator.filters import DeadLetterFilter
from maildaemon.store.operator.records import Actor
from maildaemon.store.pipeline.db import Store
from tests.support import Db, command, redis_client, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
P = "/api/v1/internal"
TOKEN = "operator-token-for-tests"
REPO = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "maildaemon")

# Everything an action could write, counted.
_STATE = """
SELECT json_build_object(
  'deliveries', (SELECT count(*) FROM mail.deliveries),
  'by_status', (SELECT coalesce(json_object_agg(status, n), '{}')
                FROM (SELECT status, count(*) n FROM mail.deliveries GROUP BY status) s),
  'payloads', (SELECT count(*) FROM mail.delivery_payloads),
  'attempts', (SELECT count(*) FROM mail.attempts),
  'actions', (SELECT count(*) FROM mail.operator_actions),
  'requeued', (SELECT count(*) FROM mail.dead_letters WHERE requeued_at IS NOT NULL),
  'reviewed', (SELECT count(*) FROM mail.dead_letters WHERE reviewed_at IS NOT NULL),
  'replayed', (SELECT count(*) FROM mail.malformed_commands WHERE replayed_at IS NOT NULL),
  'reservations', (SELECT count(*) FROM mail.idempotency_reservations),
  'outbox', (SELECT count(*) FROM mail.outbox),
  'updated', (SELECT max(updated_at) FROM mail.deliveries))::text
"""


class Api:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def get(self, path: str, token: str | None = None, **params: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.get(self.base + path, params=params, headers=headers) as resp:
            return resp.status, await resp.json()

    async def post(self, path: str, body: Any = None, token: str = TOKEN) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        async with self.session.post(self.base + path, json=body, headers=headers) as resp:
            return resp.status, await resp.json()


@contextlib.asynccontextmanager
async def daemon(settings: Settings) -> AsyncIterator[Api]:
    async with running_app(settings) as app, aiohttp.ClientSession() as session:
        assert app.http_port is not None
        yield Api(session, app.http_port)


def settings_for(make_settings: MakeSettings, templates: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "operator_token": TOKEN,
        "internal_http_addr": "127.0.0.1:0",
        "retry_jitter": 0,
        "retry_ladder": "0.1s",
        "template_dir": templates,
    }
    values.update(overrides)
    return make_settings(**values)


async def cli(settings: Settings, cwd: Path, *argv: str) -> tuple[int, str, str]:
    """``maildaemon …`` as an operator runs it: its own process, configured by MAIL_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    env.update(
        MAIL_POSTGRES_PRIMARY_DSN=settings.dsn,
        MAIL_REDIS_MASTER_ADDR=settings.redis_master_addr,
        MAIL_SMTP_MODE="stub",
        MAIL_TEMPLATE_DIR=str(settings.template_dir),
    )
    proc = await asyncio.create_subprocess_exec(
        CLI,
        *argv,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def cli_json(settings: Settings, cwd: Path, *argv: str) -> Any:
    code, out, err = await cli(settings, cwd, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    folder = tmp_path / "templates"
    shutil.copytree(REPO / "templates", folder)
    return folder


def deploy_welcome(templates: Path) -> None:
    shutil.copytree(templates / "signin_code", templates / "welcome")


async def _malformed_ids(db: Db) -> dict[str, int]:
    rows = await db.fetch("SELECT id, delivery_id FROM mail.malformed_commands")
    return {r["delivery_id"]: r["id"] for r in rows}


async def test_dry_runs_write_nothing_and_send_nothing(
    make_settings: MakeSettings, smtp_sink: SmtpSink, templates: Path, tmp_path: Path
) -> None:
    smtp_sink.behaviour.rcpt_replies["full@example.com"] = ["452 4.2.2 mailbox full"] * 2
    settings = settings_for(make_settings, templates)
    db = Db(settings.dsn)
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    async with daemon(settings):
        await xadd(
            settings,
            command("d-dead", to=["full@example.com"]),
            command("d-later", idempotency_key="k-later", send_at=later),
            command("d-w1", idempotency_key="k-w1", template_id="welcome"),
            command("d-w2", idempotency_key="k-w2", template_id="welcome"),
        )
        await db.wait_status("d-dead", "dead_letter")
        await db.wait_status("d-later", "queued")
        await wait_for(lambda: db.fetchval("SELECT count(*) = 2 FROM mail.malformed_commands"))
    deploy_welcome(templates)  # now the replays would pass, and the requeue would send
    smtp_sink.behaviour.rcpt_replies.clear()
    ids = await _malformed_ids(db)
    sent_before = len(smtp_sink.messages)

    async with daemon(settings) as api:
        before = await db.fetchval(_STATE)
        for path, body in [
            (f"{P}/deliveries/d-dead/requeue", {"dry_run": True}),
            (f"{P}/deliveries/d-later/cancel", {"dry_run": True, "reason": "test"}),
            (f"{P}/malformed-commands/{ids['d-w1']}/replay", {"dry_run": True}),
            (
                f"{P}/malformed-commands/replay",
                {"failure_code": "unknown_template", "dry_run": True},
            ),
            (f"{P}/dead-letters/requeue", {"reply_code": 452, "dry_run": True}),
        ]:
            status, result = await api.post(path, body)
            assert status == 200, (path, result)
            assert result["dry_run"] is True and result["action_id"] is None, (path, result)
        status, one = await api.post(
            f"{P}/malformed-commands/{ids['d-w1']}/replay", {"dry_run": True}
        )
        assert (one["matched"], one["accepted"], one["items"][0]["delivery_id"]) == (1, 1, "d-w1")
        status, bulk = await api.post(
            f"{P}/dead-letters/requeue", {"reply_code": 452, "dry_run": True}
        )
        assert (bulk["matched"], bulk["would_requeue"], bulk["delivery_ids"]) == (1, 1, ["d-dead"])

        code, out, err = await cli(
            settings, tmp_path, "malformed", "replay", str(ids["d-w1"]), "--dry-run"
        )
        assert code == 0, err
        assert out.startswith("dry run, nothing changed: 1 matching, 1 would be accepted"), out
        dry = await cli_json(
            settings, tmp_path, "malformed", "replay", str(ids["d-w2"]), "--dry-run"
        )
        assert (dry["dry_run"], dry["accepted"], dry["action_id"]) == (True, 1, None)
        dry = await cli_json(
            settings,
            tmp_path,
            "malformed",
            "replay",
            "--failure-code",
            "unknown_template",
            "--dry-run",
        )
        assert (dry["dry_run"], dry["matched"], dry["accepted"]) == (True, 2, 2)
        code, out, _ = await cli(settings, tmp_path, "deliveries", "requeue", "d-dead", "--dry-run")
        assert code == 0 and out.startswith("dry run, nothing changed: d-dead is dead_letter")
        dry = await cli_json(settings, tmp_path, "deliveries", "cancel", "d-later", "--dry-run")
        assert (dry["dry_run"], dry["previous_status"], dry["status"]) == (
            True,
            "queued",
            "cancelled",
        )
        code, out, _ = await cli(settings, tmp_path, "dead-letters", "requeue", "--dry-run")
        assert code == 0 and out.startswith("dry run, nothing changed: 1 dead letter(s) match")
        assert "would requeue: d-dead" in out
        # A dry run judges like the real action: a delivery that cannot be cancelled is refused.
        code, _, err = await cli(settings, tmp_path, "deliveries", "cancel", "d-dead", "--dry-run")
        assert code == 1 and "dead_letter" in err

        await asyncio.sleep(0.5)  # the scheduler had time to send anything made due
        assert await db.fetchval(_STATE) == before
        assert len(smtp_sink.messages) == sent_before

        # The real thing, for contrast: the CLI replay creates the delivery and it goes out.
        code, out, err = await cli(settings, tmp_path, "malformed", "replay", str(ids["d-w1"]))
        assert code == 0, err
        assert out.startswith("1 matching, 1 accepted, 0 still invalid (action "), out
        await db.wait_status("d-w1", "sent")
        status, page = await api.get(f"{P}/operator-actions", action="malformed.replay")
        [entry] = page["items"]
        assert entry["actor"] == f"{getpass.getuser()}@cli"
        assert entry["detail"]["replayed"] == [{"id": ids["d-w1"], "delivery_id": "d-w1"}]
    assert [m.rcpt_tos for m in smtp_sink.messages[sent_before:]] == [["alice@example.com"]]


async def test_the_cli_judges_a_replay_as_the_running_daemon_does(
    make_settings: MakeSettings, smtp_sink: SmtpSink, templates: Path, tmp_path: Path
) -> None:
    settings = settings_for(make_settings, templates)
    db = Db(settings.dsn)
    async with daemon(settings) as api:
        status, ready = await api.get("/readyz")
        loaded = TemplateCatalog.load(templates, "en").content_hash
        assert status == 200 and ready["catalog_hash"] == loaded
        await xadd(settings, command("d-w1", template_id="welcome"))
        await wait_for(lambda: db.fetchval("SELECT count(*) = 1 FROM mail.malformed_commands"))
        [malformed_id] = (await _malformed_ids(db)).values()

        # The template lands on disk, but the daemon still renders from what it loaded.
        deploy_welcome(templates)
        before = await db.fetchval(_STATE)
        for dry in ((), ("--dry-run",)):
            code, out, err = await cli(
                settings, tmp_path, "malformed", "replay", str(malformed_id), *dry
            )
            assert code == 1 and out == "", err
            assert "loaded template catalog" in err and loaded[:12] in err, err
            assert "restart the daemon" in err
        code, _, err = await cli(
            settings, tmp_path, "malformed", "replay", "--failure-code", "unknown_template"
        )
        assert code == 1 and "loaded template catalog" in err
        # enqueue validates too, and is judged the same way: nothing reaches the stream.
        client = redis_client(settings.redis_master_addr)
        try:
            length = await client.xlen(settings.command_stream)
            code, out, err = await cli(
                settings,
                tmp_path,
                "enqueue",
                "--source",
                "authsession",
                "--template",
                "welcome",
                "--to",
                "ada@example.com",
                "--var",
                "code=1",
                "--var",
                "expires_minutes=5",
            )
            assert code == 1 and "loaded template catalog" in err, (out, err)
            assert await client.xlen(settings.command_stream) == length
        finally:
            await client.aclose()
        # The daemon's API judges with its own catalog, so it agrees: still invalid.
        status, body = await api.post(f"{P}/malformed-commands/{malformed_id}/replay")
        assert status == 409 and body["error"]["code"] == "still_invalid"
        after = await db.fetchval(_STATE)
        assert json.loads(after)["replayed"] == 0 and json.loads(after)["deliveries"] == 0
        assert json.loads(after)["actions"] == json.loads(before)["actions"] + 1  # the API's try

    # Once the daemon runs with the new catalog, CLI and daemon agree again.
    async with daemon(settings) as api:
        status, ready = await api.get("/readyz")
        assert ready["catalog_hash"] == TemplateCatalog.load(templates, "en").content_hash != loaded
        code, out, err = await cli(settings, tmp_path, "malformed", "replay", str(malformed_id))
        assert code == 0, err
        await db.wait_status("d-w1", "sent")
    # No daemon runs: its row is gone, and the CLI judges by the catalog on disk.
    assert await db.fetchval("SELECT count(*) FROM mail.replicas") == 0


async def test_every_replay_and_review_is_audited_as_given(
    make_settings: MakeSettings, smtp_sink: SmtpSink, templates: Path, tmp_path: Path
) -> None:
    smtp_sink.behaviour.rcpt_replies["full@example.com"] = ["452 4.2.2 mailbox full"] * 2
    settings = settings_for(make_settings, templates)
    db = Db(settings.dsn)
    async with daemon(settings) as api:
        await xadd(
            settings,
            command("d-w1", template_id="welcome"),
            command("d-dead", idempotency_key="k-dead", to=["full@example.com"]),
        )
        await db.wait_status("d-dead", "dead_letter")
        await wait_for(lambda: db.fetchval("SELECT count(*) = 1 FROM mail.malformed_commands"))

        # A bulk replay that takes nothing in is recorded all the same.
        status, result = await api.post(
            f"{P}/malformed-commands/replay",
            {"failure_code": "unknown_template", "reason": "checking"},
        )
        assert status == 200 and (result["accepted"], result["still_invalid"]) == (0, 1)
        assert result["action_id"] is not None and result["dry_run"] is False
        status, result = await api.post(
            f"{P}/malformed-commands/replay", {"failure_code": "invalid_json"}
        )
        assert status == 200 and result["matched"] == 0 and result["action_id"] is not None
        status, page = await api.get(f"{P}/operator-actions", action="malformed.replay")
        nothing, checking = page["items"]
        assert checking["reason"] == "checking" and checking["actor"] == "operator"
        assert checking["detail"]["still_invalid"] == [(await _malformed_ids(db))["d-w1"]]
        assert checking["detail"]["replayed"] == [] and checking["detail"]["matched"] == 1
        assert nothing["detail"]["matched"] == 0

        # The CLI's review keeps both: the note on the dead letter, the reason in the audit.
        done = await cli_json(
            settings,
            tmp_path,
            "dead-letters",
            "review",
            "d-dead",
            "--note",
            "mailbox of a departed user",
            "--reason",
            "ticket OPS-17",
        )
        assert done["review_note"] == "mailbox of a departed user" and done["dry_run"] is False
        status, page = await api.get(f"{P}/operator-actions", action="dead_letter.review")
        [review] = page["items"]
        assert review["reason"] == "ticket OPS-17"
        assert review["detail"] == {"note": "mailbox of a departed user"}
        # And through the API.
        status, done = await api.post(
            f"{P}/dead-letters/d-dead/review", {"note": "second look", "reason": "OPS-18"}
        )
        assert status == 200 and done["dry_run"] is False
        status, page = await api.get(f"{P}/operator-actions", action="dead_letter.review")
        assert (page["items"][0]["reason"], page["items"][0]["detail"]) == (
            "OPS-18",
            {"note": "second look"},
        )


async def test_attempt_counter_agrees_with_the_records(
    make_settings: MakeSettings,
    smtp_sink: SmtpSink,
    templates: Path,
    redis_addr: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="maildaemon")
    settings = settings_for(make_settings, templates)
    db = Db(settings.dsn)
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    async with daemon(settings) as api:
        await xadd(settings, command("d-expired", expires_at=past))
        await db.wait_status("d-expired", "expired")
        status, detail = await api.get(f"{P}/deliveries/d-expired")
        assert status == 200 and detail["attempt_count"] == 0 and detail["attempts"] == []

        async def event() -> dict[str, str] | None:
            client = redis_client(redis_addr)
            try:
                entries = await client.xrange(settings.event_stream)
            finally:
                await client.aclose()
            found = [{k.decode(): v.decode() for k, v in f.items()} for _, f in entries]
            return next((e for e in found if e["delivery_id"] == "d-expired"), None)

        published = await wait_for(event)
        assert (published["status"], published["attempt"]) == ("expired", "0")
    [line] = [r for r in caplog.records if r.getMessage() == "delivery expired"]
    assert line.__dict__["attempt"] == 0 and line.__dict__["attempt_recorded"] is False


async def test_the_api_refuses_a_replay_while_replicas_run_different_catalogs(
    make_settings: MakeSettings, smtp_sink: SmtpSink, templates: Path, tmp_path: Path
) -> None:
    """A rollout in progress: the new replica could take the replay in, but an old one may
    claim the delivery and cannot render it; the replay waits until they agree."""
    old = settings_for(make_settings, templates, consumer_name="replica-old")
    db = Db(old.dsn)
    new_templates = tmp_path / "new-templates"
    shutil.copytree(templates, new_templates)
    deploy_welcome(new_templates)
    new = settings_for(make_settings, new_templates, consumer_name="replica-new")
    async with daemon(old):
        await xadd(old, command("d-w1", template_id="welcome"))
        await wait_for(lambda: db.fetchval("SELECT count(*) = 1 FROM mail.malformed_commands"))
        [malformed_id] = (await _malformed_ids(db)).values()
        async with daemon(new) as api:
            await wait_for(lambda: db.fetchval("SELECT count(*) = 2 FROM mail.replicas"))
            before = await db.fetchval(_STATE)
            for body in ({"dry_run": True}, {}):
                status, result = await api.post(
                    f"{P}/malformed-commands/{malformed_id}/replay", body
                )
                assert status == 409 and result["error"]["code"] == "judgement_differs"
                assert "replica-old" in result["error"]["message"]
            assert await db.fetchval(_STATE) == before
    async with daemon(new) as api:  # the old replica is gone: one judgement again
        status, result = await api.post(f"{P}/malformed-commands/{malformed_id}/replay")
        assert status == 200 and result["accepted"] == 1, result
        await db.wait_status("d-w1", "sent")


async def test_a_bulk_requeue_dry_run_lists_the_first_100_ids_in_release_order(
    pg_dsn: str, tmp_path: Path
) -> None:
    db = Db(pg_dsn)
    setup = await asyncpg.connect(pg_dsn)
    await setup.execute(
        """
        INSERT INTO mail.deliveries (delivery_id, source, idempotency_key, command_hash,
            status, payload_mode, to_addrs)
        SELECT 'd-' || lpad(n::text, 3, '0'), 'authsession', 'k-' || n, '\\x00',
            'dead_letter', 'template', ARRAY['a' || n || '@example.com']
        FROM generate_series(1, 120) AS n;
        INSERT INTO mail.dead_letters (delivery_id, attempt_count, last_status, created_at)
        SELECT delivery_id, 2, 'transport_failed',
            now() - make_interval(secs => 1000 - substring(delivery_id FROM 3)::int)
        FROM mail.deliveries;
        """
    )
    await setup.close()
    before = await db.fetchval(_STATE)
    store = await Store.open(pg_dsn, min_size=1, max_size=1)
    try:
        ops = OperatorStore(store.pool)
        who = Actor("tester")
        dry = await ops.bulk_requeue(DeadLetterFilter(), 1000, 10.0, who, None, True)
        assert (dry.dry_run, dry.matched, dry.requeued, dry.would_requeue) == (True, 120, 0, 120)
        assert dry.delivery_ids == [f"d-{n:03d}" for n in range(1, 101)]
        assert dry.action_id is None
        assert dry.first_due_at and dry.last_due_at
        assert (dry.last_due_at - dry.first_due_at).total_seconds() == pytest.approx(11.9)
        small = await ops.bulk_requeue(DeadLetterFilter(), 3, None, who, None, True)
        assert (small.would_requeue, small.delivery_ids) == (3, ["d-001", "d-002", "d-003"])
        assert await db.fetchval(_STATE) == before
        done = await ops.bulk_requeue(DeadLetterFilter(), 3, None, who, "go", False)
        assert done.delivery_ids == small.delivery_ids  # the dry run showed what moved
    finally:
        await store.close()
