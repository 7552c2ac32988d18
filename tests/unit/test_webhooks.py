"""Webhook rules as pure logic: refused address ranges, URL checks, signatures as a
Standard Webhooks receiver verifies them, event filters, ids."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from maildaemon.errors import InvalidInput
from maildaemon.operator import webhooks as ops
from maildaemon.webhooks import signing, targets


@pytest.mark.parametrize(
    ("address", "allowed", "refused"),
    [
        ("127.0.0.1", (), "loopback"),
        ("::1", (), "loopback"),
        ("169.254.169.254", (), "metadata"),
        ("fd00:ec2::254", (), "metadata"),
        ("169.254.10.1", (), "link-local"),
        ("fe80::1", (), "link-local"),
        ("::ffff:127.0.0.1", (), "loopback"),
        ("0.0.0.0", (), "unicast"),
        ("224.0.0.1", (), "unicast"),
        ("10.1.2.3", (), None),  # private ranges are normal internal targets
        ("192.168.1.1", (), None),
        ("fd12::1", (), None),
        ("127.0.0.1", ("127.0.0.0/8",), None),
        ("169.254.169.254", ("169.254.169.254/32",), None),
        ("::1", ("127.0.0.0/8",), "loopback"),  # another family's network allows nothing
    ],
)
def test_refused_ranges(address: str, allowed: tuple[str, ...], refused: str | None) -> None:
    why = targets.refusal(ipaddress.ip_address(address), targets.networks(allowed))
    assert (why is None) if refused is None else (refused in (why or ""))


@pytest.mark.parametrize(
    "url", ["ftp://x/", "https://", "https://a b/", "https://u:p@x/", "https://x/#f", "x" * 3000]
)
def test_malformed_urls(url: str) -> None:
    with pytest.raises(InvalidInput):
        targets.check_url(url)


def test_http_needs_the_setting() -> None:
    url = targets.check_url("http://hooks.internal/x")
    with pytest.raises(InvalidInput, match="MAIL_WEBHOOK_ALLOW_HTTP"):
        targets.check_scheme(url, allow_http=False)
    targets.check_scheme(url, allow_http=True)


def test_signatures_verify_as_a_receiver_does_with_either_secret_during_rotation() -> None:
    old, new = signing.new_secret(), signing.new_secret()
    body = signing.body("sent", datetime(2026, 1, 1, tzinfo=UTC), '{"delivery_id": "d-1"}')
    headers = signing.headers("msg_7", [new, old], body)
    assert headers["webhook-id"] == "msg_7"
    assert headers["webhook-signature"].count("v1,") == 2
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers)["data"] == {"delivery_id": "d-1"}
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body.replace("d-1", "d-2"), headers)


def test_the_body_is_the_same_on_every_attempt_and_survives_a_malformed_event() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    assert signing.body("sent", at, '{"a": 1}') == signing.body("sent", at, '{"a": 1}')
    assert "malformed_event" in signing.body("sent", at, "not json")


def test_secrets() -> None:
    secret = signing.new_secret()
    assert signing.check_secret(secret) == secret
    for bad in ("whsec_", "whsec_!!!", "abc", "whsec_" + "QQ==" * 2):
        with pytest.raises(InvalidInput):
            signing.check_secret(bad)


def test_event_filters_and_ids() -> None:
    assert ops.events(None) is None and ops.events("") is None
    assert ops.events("sent, bounced,sent") == ["bounced", "sent"]
    assert ops.events(["complained", "delayed"]) == ["complained", "delayed"]
    with pytest.raises(InvalidInput, match="unknown bogus"):
        ops.events("sent,bogus")
    assert ops.event_id("msg_12") == ops.event_id("12") == 12
    for bad in ("0", "-1", "msg_x", str(2**63)):
        with pytest.raises(InvalidInput):
            ops.event_id(bad)
