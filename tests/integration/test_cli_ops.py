"""Operator CLI commands against a real PostgreSQL, configured the daemon's way (MAIL_*)."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from maildaemon.cli import main as cli
from maildaemon.contract.command import Rejection
from maildaemon.contract.parsing import parse_command
from maildaemon.delivery import AttemptResult, IntakeEntry
from maildaemon.store.pipeline.db import Store
from tests.support import command

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(pg_dsn: str, redis_addr: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The daemon's configuration as the CLI reads it: MAIL_* variables only."""
    for name in list(os.environ):
        if name.startswith("MAIL_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("MAIL_POSTGRES_PRIMARY_DSN", pg_dsn)
    monkeypatch.setenv("MAIL_REDIS_MASTER_ADDR", redis_addr)
    monkeypatch.setenv("MAIL_SMTP_MODE", "stub")
    monkeypatch.setenv("MAIL_TEMPLATE_DIR", str(REPO / "templates"))
    monkeypatch.setenv("MAIL_RETRY_LADDER", "30s,2m")
    return pg_dsn


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


async def _seed(dsn: str) -> None:
    """Two dead letters, one queued for later, one malformed command: through the store."""
    store = await Store.open(dsn, min_size=1, max_size=2)
    try:
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        docs = [
            command("d-dead-1"),
            command("d-dead-2", idempotency_key="k2", to=["bob@other.example"]),
            command("d-later", idempotency_key="k3", send_at=later),
        ]
        entries = []
        for n, doc in enumerate(docs, 1):
            parsed = parse_command(json.dumps(doc), None)
            assert not isinstance(parsed, Rejection)
            entries.append(IntakeEntry(f"{n}-0", parsed, None, ""))
        raw = json.dumps(command("d-bad", template_id="welcome"))
        entries.append(
            IntakeEntry(
                "9-0",
                None,
                Rejection("unknown_template", "no template 'welcome'", "d-bad", "authsession"),
                raw,
            )
        )
        await store.ingest(entries, 3600)
        now = datetime.now(UTC)
        claims = await store.claim_due(10, 60, "test")
        assert {c.delivery_id for c in claims} == {"d-dead-1", "d-dead-2"}
        await store.record_results(
            [
                AttemptResult(
                    c.delivery_id,
                    c.source,
                    c.claim_token,
                    c.attempt_no,
                    "transport_failed",
                    "dead_letter",
                    now,
                    now,
                    reply_code=421,
                    reply_text="4.7.0 try later",
                    status_reason="ladder exhausted",
                )
                for c in claims
            ],
            "test",
            3600,
        )
    finally:
        await store.close()


def test_cli_reads_and_repairs_deliveries(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_seed(env))

    shown = run_json(capsys, "deliveries", "show", "d-dead-1")
    assert shown["status"] == "dead_letter" and shown["last_error"]["reply_code"] == 421
    assert [a["status"] for a in shown["attempts"]] == ["transport_failed"]
    later = run_json(capsys, "deliveries", "show", "d-later")
    assert later["retry_plan"]["attempts_remaining"] == 3
    code, out, _ = run(capsys, "deliveries", "show", "d-dead-1")
    assert code == 0 and "dead_letter" in out and "4.7.0 try later" in out

    listed = run_json(capsys, "deliveries", "list", "--status", "dead_letter", "--limit", "1")
    assert len(listed["items"]) == 1 and listed["next_cursor"]
    rest = run_json(
        capsys, "deliveries", "list", "--status", "dead_letter", "--cursor", listed["next_cursor"]
    )
    assert {listed["items"][0]["delivery_id"], rest["items"][0]["delivery_id"]} == {
        "d-dead-1",
        "d-dead-2",
    }
    code, out, _ = run(capsys, "deliveries", "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["DELIVERY", "STATUS", "SOURCE"]
    assert len(out.splitlines()) == 4

    dead = run_json(capsys, "dead-letters", "list", "--recipient-domain", "other.example")
    assert [d["delivery_id"] for d in dead["items"]] == ["d-dead-2"]
    done = run_json(
        capsys,
        "dead-letters",
        "review",
        "d-dead-2",
        "--note",
        "bounced domain",
        "--actor",
        "ops-alice",
    )
    assert done["reviewed_by"] == f"{getpass.getuser()}@cli"  # --actor is only a note
    code, out, _ = run(capsys, "dead-letters", "list", "--unreviewed")
    assert "d-dead-1" in out and "d-dead-2" not in out

    dry = run_json(capsys, "dead-letters", "requeue", "--reply-code", "421", "--dry-run")
    assert (dry["matched"], dry["requeued"], dry["would_requeue"]) == (2, 0, 2)
    assert sorted(dry["delivery_ids"]) == ["d-dead-1", "d-dead-2"] and dry["dry_run"] is True
    change = run_json(capsys, "deliveries", "requeue", "d-dead-1", "--reason", "retry now")
    assert (change["previous_status"], change["status"]) == ("dead_letter", "queued")
    code, out, _ = run(capsys, "dead-letters", "requeue", "--reply-class", "4xx", "--rate", "10")
    assert code == 0 and out.startswith("requeued 1 of 1")
    code, out, _ = run(capsys, "deliveries", "cancel", "d-later", "--reason", "not needed")
    assert code == 0 and "queued -> cancelled" in out

    stats = run_json(capsys, "stats")
    assert stats["deliveries_by_status"]["queued"] == 2
    assert stats["deliveries_by_status"]["cancelled"] == 1
    assert stats["dead_letters"] == {"unreviewed": 1, "open": 0, "total": 2}
    code, out, _ = run(capsys, "stats")
    assert code == 0 and "dead letters" in out

    audit = run_json(capsys, "audit")
    actions = [(a["action"], a["target"]) for a in audit["items"]]
    assert actions == [
        ("delivery.cancel", "d-later"),
        ("dead_letters.requeue", None),
        ("delivery.requeue", "d-dead-1"),
        ("dead_letter.review", "d-dead-2"),
    ]
    assert {a["actor"] for a in audit["items"]} == {f"{getpass.getuser()}@cli"}
    review = audit["items"][3]
    assert review["detail"] == {"note": "bounced domain", "actor_note": "ops-alice"}


def test_cli_pause_suppressions_malformed_and_commands(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_seed(env))

    code, out, _ = run(capsys, "pause", "--source", "authsession", "--reason", "outage")
    assert code == 0 and out.strip() == "sending paused for source authsession"
    code, out, _ = run(capsys, "pause", "--source", "authsession")
    assert "already paused" in out
    stats = run_json(capsys, "stats")
    assert stats["sending"]["paused_sources"] == ["authsession"]
    code, out, _ = run(capsys, "resume", "--source", "authsession")
    assert code == 0 and out.strip() == "sending resumed for source authsession"
    assert run_json(capsys, "stats")["sending"]["pauses"] == []

    added = run_json(capsys, "suppressions", "add", "Dave@Example.com", "--reason", "asked")
    assert added["suppression"]["address"] == "dave@example.com"
    code, out, _ = run(capsys, "suppressions", "list")
    assert "dave@example.com" in out and "asked" in out
    code, out, _ = run(capsys, "suppressions", "remove", "dave@example.com")
    assert code == 0
    code, _, err = run(capsys, "suppressions", "remove", "dave@example.com")
    assert code == 1 and "not on the suppression list" in err

    listed = run_json(capsys, "malformed", "list", "--failure-code", "unknown_template")
    [bad] = listed["items"]
    assert bad["stream_entry_id"] == "9-0" and bad["delivery_id"] == "d-bad"
    dry = run_json(capsys, "malformed", "replay", "--failure-code", "unknown_template", "--dry-run")
    assert (dry["matched"], dry["accepted"], dry["still_invalid"]) == (1, 0, 1)
    code, _, err = run(capsys, "malformed", "replay", str(bad["id"]))
    assert code == 1 and "still invalid" in err and "unknown_template" in err

    trace = run_json(capsys, "commands", "show", "9-0")
    assert trace["outcome"] == "malformed"
    trace = run_json(capsys, "commands", "show", "1-0")
    assert trace["outcome"] == "delivery" and trace["delivery"]["delivery_id"] == "d-dead-1"


def test_cli_refuses_bad_input_and_unknown_ids(
    env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, field in [
        (["deliveries", "show", "has space"], "delivery_id"),
        (["deliveries", "list", "--limit", "0"], "limit"),
        (["deliveries", "list", "--created-after", "yesterday"], "created_after"),
        (["deliveries", "list", "--cursor", "garbage"], "cursor"),
        (["dead-letters", "requeue", "--rate", "0"], "rate"),
        (["dead-letters", "requeue", "--reply-code", "99"], "reply_code"),
        (["pause", "--source", "Bad Source"], "source"),
        (["suppressions", "add", "not-an-address"], "address"),
        (["commands", "show", "latest"], "stream_entry_id"),
        (["malformed", "replay"], "id"),
    ]:
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and field in err, (argv, err)
    for argv in (
        ["deliveries", "show", "nope"],
        ["deliveries", "requeue", "nope"],
        ["dead-letters", "review", "nope", "--note", "n"],
        ["malformed", "replay", "12345"],
    ):
        code, out, err = run(capsys, *argv)
        assert code == 1 and err.startswith("maildaemon: ") and argv[2] in err, (argv, err)
