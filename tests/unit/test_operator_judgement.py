"""One judgement for CLI and daemon: catalog content hash, policy fingerprint, the refusal
when a running replica judges otherwise; and operator tokens with identities."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import pytest

from maildaemon.config import Settings, load_settings
from maildaemon.contract.command import CommandPolicy
from maildaemon.errors import ConfigError, Conflict
from maildaemon.message.render import TemplateCatalog
from maildaemon.operator.replay import judge_alike
from maildaemon.store.replicas import Replica

REPO = Path(__file__).resolve().parents[2]
POLICY = CommandPolicy(
    allowed_sources=frozenset({"authsession"}),
    allowed_headers=frozenset({"list-id"}),
    known_templates=frozenset({"signin_code"}),
    attachment_max_bytes=1,
    attachments_total_max_bytes=2,
    max_recipients=3,
    command_max_bytes=4,
)


def test_catalog_hash_follows_the_content_only(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(REPO / "templates", one)
    shutil.copytree(REPO / "templates", two)
    first = TemplateCatalog.load(one, "en").content_hash
    assert len(first) == 64 and TemplateCatalog.load(two, "en").content_hash == first
    assert TemplateCatalog.load(one, "de").content_hash != first  # the default locale counts
    subject = two / "signin_code" / "en" / "subject.txt"
    subject.write_text(subject.read_text() + " ")
    assert TemplateCatalog.load(two, "en").content_hash != first
    shutil.copytree(one / "signin_code", one / "welcome")
    assert TemplateCatalog.load(one, "en").content_hash != first


def test_policy_fingerprint_covers_every_field() -> None:
    assert POLICY.fingerprint() == dataclasses.replace(POLICY).fingerprint()
    for change in (
        {"known_templates": frozenset({"signin_code", "welcome"})},
        {"allowed_sources": frozenset({"notification"})},
        {"max_recipients": 4},
    ):
        assert dataclasses.replace(POLICY, **change).fingerprint() != POLICY.fingerprint()  # type: ignore[arg-type]


def _replica(name: str, catalog: str, policy: str) -> Replica:
    now = datetime.now(UTC)
    return Replica(name, catalog, policy, ["signin_code"], now, now)


def test_replays_are_refused_while_a_live_replica_judges_otherwise() -> None:
    judge_alike([], "c1", "p1", "templates")  # nothing runs: the disk is what loads next
    judge_alike([_replica("a", "c1", "p1"), _replica("b", "c1", "p1")], "c1", "p1", "t")
    cases = [
        ([_replica("a", "c0", "p1")], "loaded template catalog c0"),
        ([_replica("a", "c1", "p0")], "other settings"),
        ([_replica("a", "c1", "p1"), _replica("b", "c2", "p1")], "judge commands differently"),
    ]
    for live, text in cases:
        with pytest.raises(Conflict) as info:
            judge_alike(live, "c1", "p1", "templates")
        assert info.value.code == "judgement_differs" and text in str(info.value)


@pytest.fixture
def clean_env() -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    env.update(MAIL_POSTGRES_PRIMARY_DSN="postgresql://u:p@h/db", MAIL_SMTP_MODE="stub")
    with mock.patch.dict(os.environ, env, clear=True):
        yield


def _settings(**values: str) -> Settings:
    return load_settings(_env_file=None, **values)


def test_operator_tokens_carry_identities(clean_env: None) -> None:
    assert _settings().operator_identities() == {}
    s = _settings(
        operator_token="shared-secret",
        operator_tokens="alice:alice-secret-1, bob.ops:bob-secret-22",
        operator_read_token="reader-secret",
    )
    assert s.operator_identities() == {
        "shared-secret": "operator",
        "alice-secret-1": "alice",
        "bob-secret-22": "bob.ops",
    }
    assert s.read_token == "reader-secret"
    assert (s.api_pool_max, s.api_statement_timeout) == (4, 5.0)
    for bad in ("alice", "alice:short", ":no-name-secret", "a:same-secret,b:same-secret"):
        with pytest.raises(ConfigError) as info:
            _settings(operator_tokens=bad)
        assert "MAIL_OPERATOR_TOKENS" in str(info.value)
        assert bad.rpartition(":")[2] not in str(info.value)  # the secret is never shown
    with pytest.raises(ConfigError) as info:
        _settings(api_statement_timeout="0s")
    assert "MAIL_API_STATEMENT_TIMEOUT" in str(info.value)
