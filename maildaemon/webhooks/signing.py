"""Standard Webhooks signing (https://www.standardwebhooks.com): ``webhook-id`` (stable
across retries and replays: ``msg_<event id>``), ``webhook-timestamp`` (this attempt, Unix
seconds) and ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of id.timestamp.body>``, one
per secret, space-separated: during a rotation the previous secret signs too). The
``standardwebhooks`` package computes the signatures, as a receiver verifies them."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

from maildaemon.errors import InvalidInput

PREFIX = "whsec_"


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` and 32 random bytes in base64."""
    return PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def check_secret(secret: str) -> str:
    """A secret an operator brought (``whsec_<base64>``, 24 to 64 bytes), or InvalidInput."""
    raw = secret.removeprefix(PREFIX)
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not secret.startswith(PREFIX) or not 24 <= len(key) <= 64:
        raise InvalidInput("secret: must be whsec_ and 24-64 bytes in base64")
    return secret


def message_id(event_id: int) -> str:
    return f"msg_{event_id}"


def body(event_type: str, created_at: datetime, fields: str) -> str:
    """The request body: the same bytes on every attempt of one event."""
    try:
        data = json.loads(fields)
    except ValueError:
        data = {"malformed_event": fields[:2000]}
    return json.dumps(
        {"type": event_type, "timestamp": created_at.isoformat(), "data": data},
        ensure_ascii=False,
        separators=(",", ":"),
        sort_keys=True,
    )


def headers(
    msg_id: str, keys: Sequence[str], text: str, now: datetime | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt."""
    when = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    signatures = " ".join(Webhook(k).sign(msg_id, when, text) for k in keys)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
    }
