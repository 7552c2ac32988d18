"""Accepted means sendable: every command parse_command accepts is composed into a
well-formed message (from the form the store keeps), with no render or build error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maildaemon.config import Settings
from maildaemon.contract.command import DeliveryCommand
from maildaemon.contract.parsing import parse_command
from maildaemon.message.compose import Composer
from maildaemon.message.policy import command_policy
from maildaemon.message.render import TemplateCatalog
from maildaemon.store.pipeline.rows import stored_command
from tests import strategies
from tests.wire import assert_well_formed

CATALOG = TemplateCatalog.load(Path(__file__).resolve().parents[2] / "templates", "en")
SETTINGS = Settings(postgres_primary_dsn="postgresql://x@127.0.0.1/x", smtp_mode="stub")
POLICY = command_policy(SETTINGS, CATALOG)
COMPOSER = Composer(CATALOG, "Mail Daemon <noreply@test.example>")
CUSTOM = frozenset(h.lower() for h in SETTINGS.allowed_headers)
accepted: list[str] = []


def _compose(command: DeliveryCommand) -> bytes:
    stored: dict[str, Any] = json.loads(json.dumps(stored_command(command)))  # as jsonb returns it
    _id, _hash, raw = COMPOSER.compose(command.delivery_id, stored)
    return raw


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(strategies.command("d-1"), strategies.mutated("d-1")))
def test_every_accepted_command_is_sendable(document: dict[str, Any]) -> None:
    parsed = parse_command(json.dumps(document), POLICY)
    if not isinstance(parsed, DeliveryCommand):
        return
    accepted.append(parsed.payload_mode)
    raw = _compose(parsed)
    message = assert_well_formed(raw, CUSTOM)
    # Custom headers come out in the producer's order, with the producer's names.
    names = [n for n in message if n.lower() in CUSTOM]
    assert names == list(parsed.headers)
    # The envelope's addresses are the canonical ones the headers show.
    for rcpt in parsed.to:
        assert rcpt.address.encode() in raw.replace(b"\r\n ", b" ")


def test_the_strategy_reaches_accepted_commands_of_both_modes() -> None:
    """Guard against a vacuous property: enough generated commands are accepted."""
    assert accepted.count("template") >= 20 and accepted.count("rendered") >= 10, (
        accepted.count("template"),
        accepted.count("rendered"),
    )
