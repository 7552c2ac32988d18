"""`maildaemon webhooks …` against a real PostgreSQL, configured the daemon's way."""

from __future__ import annotations

import getpass
import json
from typing import Any

import pytest

from tests.integration.test_cli_ops import env, run, run_json

__all__ = ["env"]


def test_the_webhook_commands(
    env: str, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    assert run(capsys, "migrate")[0] == 0
    code, _, err = run(capsys, "webhooks", "add", "--url", "http://127.0.0.1:9/hook")
    assert code == 1 and "must be https" in err
    monkeypatch.setenv("MAIL_WEBHOOK_ALLOW_HTTP", "true")
    code, _, err = run(capsys, "webhooks", "add", "--url", "http://127.0.0.1:9/hook")
    assert code == 1 and "loopback" in err and "MAIL_WEBHOOK_ALLOWED_NETWORKS" in err
    monkeypatch.setenv("MAIL_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    code, _, err = run(
        capsys, "webhooks", "add", "--url", "http://127.0.0.1:9/h", "--events", "sent,nope"
    )
    assert code == 2 and "unknown nope" in err

    code, out, _ = run(
        capsys, "webhooks", "add", "--url", "http://127.0.0.1:9/hook", "--events",
        "sent,bounced,complained,delayed", "--reason", "crm",
    )  # fmt: skip
    assert code == 0 and "whsec_" in out and "shown this once" in out
    secret = next(w for w in out.split() if w.startswith("whsec_"))
    listed = run_json(capsys, "webhooks", "list")
    (endpoint,) = listed["items"]
    assert endpoint["events"] == ["bounced", "complained", "delayed", "sent"]
    assert secret not in json.dumps(listed) and "secret" not in endpoint
    eid = str(endpoint["id"])

    ping = run_json(capsys, "webhooks", "test", eid)
    assert ping["change"] == "ping_queued" and ping["event_id"] >= 1
    assert run_json(capsys, "webhooks", "disable", eid)["change"] == "disabled"
    assert run_json(capsys, "webhooks", "list")["items"][0]["enabled"] is False
    assert run_json(capsys, "webhooks", "enable", eid)["change"] == "enabled"
    rotated = run_json(capsys, "webhooks", "rotate-secret", eid)
    assert rotated["secret"] != secret and rotated["endpoint"]["rotation_ends_at"]
    dry = run_json(
        capsys, "webhooks", "replay", eid, "--after", "2000-01-01T00:00:00Z", "--dry-run"
    )
    assert dry == {**dry, "dry_run": True, "queued": 0}
    code, _, err = run(capsys, "webhooks", "replay", eid)
    assert code == 2 and "name an event" in err
    assert run(capsys, "webhooks", "disable", "999")[0] == 1
    audit = run_json(capsys, "audit", "--target", eid)
    assert {a["action"] for a in audit["items"]} >= {
        "webhook.add", "webhook.test", "webhook.disable", "webhook.enable",
        "webhook.rotate_secret",
    }  # fmt: skip
    assert all(a["actor"] == f"{getpass.getuser()}@cli" for a in audit["items"])
    assert secret not in json.dumps(audit)
    assert run_json(capsys, "webhooks", "remove", eid)["change"] == "removed"
    assert run_json(capsys, "webhooks", "list")["items"] == []
