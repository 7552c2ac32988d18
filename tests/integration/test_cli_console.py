"""CLI fixes found by a new user, against a real PostgreSQL and Redis: empty lists,
``--version``, ``enqueue`` with Redis only (and --header/--reply-to/--attach), ``preview``,
a refused delivery id explained, and what "still owed" says for an ended delivery."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from maildaemon.cli import main as cli
from maildaemon.config_values import split_host_port
from maildaemon.contract.parsing import parse_command
from maildaemon.delivery import AttemptResult, IntakeEntry
from maildaemon.store.pipeline.db import Store
from tests.integration.test_cli_ops import _seed, env, run, run_json
from tests.support import command

__all__ = ["env"]  # the fixture, shared with test_cli_ops


def test_every_list_prints_none_when_empty(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["deliveries", "list"],
        ["dead-letters", "list"],
        ["malformed", "list"],
        ["suppressions", "list"],
        ["audit"],
    ):
        code, out, err = run(capsys, *argv)
        assert (code, out.strip(), err) == (0, "(none)", ""), argv


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == "maildaemon 0.1.0"


def test_a_refused_delivery_id_is_explained(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_seed(env))
    code, out, err = run(capsys, "deliveries", "show", "d-bad")
    assert code == 1 and out == ""
    assert "no delivery 'd-bad': refused at intake" in err
    assert "unknown_template: no template 'welcome'" in err
    assert "malformed list --delivery-id d-bad" in err
    page = run_json(capsys, "malformed", "list", "--delivery-id", "d-bad")
    assert [m["failure_code"] for m in page["items"]] == ["unknown_template"]
    code, _, err = run(capsys, "deliveries", "show", "never-seen")
    assert code == 1 and "no refused stream entry named it" in err


async def _sent(dsn: str) -> None:
    store = await Store.open(dsn, min_size=1, max_size=1)
    try:
        parsed = parse_command(json.dumps(command("d-sent")), None)
        await store.ingest([IntakeEntry("1-0", parsed, None, "")], 3600)  # type: ignore[arg-type]
        [claim] = await store.claim_due(10, 60, "test")
        now = datetime.now(UTC)
        result = AttemptResult(
            claim.delivery_id, claim.source, claim.claim_token, claim.attempt_no, "sent", "sent",
            now, now, reply_code=250, reply_text="2.0.0 OK",
        )  # fmt: skip
        await store.record_results([result], "test", 3600)
    finally:
        await store.close()


def test_a_sent_delivery_owes_nobody(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(_sent(env))
    code, out, _ = run(capsys, "deliveries", "show", "d-sent")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("still owed"))
    assert line.split(None, 2)[2] == "none"
    assert "pending" not in out


@pytest.fixture
def redis_only(env: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """What a producer host has: Redis and the templates, no PostgreSQL, no SMTP."""
    monkeypatch.delenv("MAIL_POSTGRES_PRIMARY_DSN")
    monkeypatch.delenv("MAIL_SMTP_MODE")
    return env


def test_enqueue_needs_redis_only_and_takes_headers_and_files(
    redis_only: str,
    redis_addr: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    invoice = tmp_path / "invoice.pdf"
    invoice.write_bytes(b"%PDF-1.4 tiny")
    code, out, err = run(
        capsys,
        "enqueue",
        "--to", "ada@example.com",
        "--template", "signin_code",
        "--var", "code=1", "--var", "expires_minutes=5",
        "--reply-to", "help@example.com",
        "--header", "List-Id: <news.example.com>",
        "--attach", str(invoice),
        "--attach", f"{invoice};application/x-custom",
    )  # fmt: skip
    assert code == 0, err
    added = json.loads(out)
    host, port = split_host_port(redis_addr, 6379)
    client = redis.Redis(host=host, port=port)
    try:
        [(_, fields)] = client.xrange("mail:delivery_commands", added["stream_entry_id"], "+")
    finally:
        client.close()
    sent = json.loads(fields[b"command"])
    assert sent["reply_to"] == {"address": "help@example.com"}
    assert sent["headers"] == {"List-Id": "<news.example.com>"}
    assert [(a["filename"], a["content_type"]) for a in sent["attachments"]] == [
        ("invoice.pdf", "application/pdf"),
        ("invoice.pdf", "application/x-custom"),
    ]
    assert base64.b64decode(sent["attachments"][0]["content"]) == b"%PDF-1.4 tiny"

    for bad, message in (
        (["--header", "no colon"], "--header wants 'Name: value'"),
        (["--attach", str(tmp_path / "missing.pdf")], "missing.pdf"),
        (["--header", "X-Not-Allowed: 1"], "header_not_allowed"),
    ):
        code, _, err = run(capsys, "enqueue", "--to", "ada@example.com", "--subject", "s", *bad)
        assert code == 2 and message in err, err


def test_preview_renders_without_sending(
    redis_only: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["preview", "--template", "signin_code", "--var", "code=493817"]
    args += ["--var", "expires_minutes=10"]
    code, german, err = run(capsys, *args, "--locale", "de")
    assert code == 0, err
    assert german.startswith("Subject: ") and "493817" in german
    code, english, _ = run(capsys, *args, "--locale", "en")
    assert code == 0 and english.splitlines()[0] != german.splitlines()[0]
    code, html, _ = run(capsys, *args, "--html")
    assert code == 0 and "<" in html and "493817" in html
    code, eml, _ = run(capsys, *args, "--eml")
    assert code == 0 and "Message-ID: " in eml and "preview@example.invalid" in eml
    code, _, err = run(capsys, "preview", "--template", "signin_code")
    assert code == 2 and "needs variable(s) code" in err
    code, _, err = run(capsys, "preview", "--template", "nope")
    assert code == 2 and "no template 'nope'" in err
