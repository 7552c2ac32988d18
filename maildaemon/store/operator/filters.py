"""What the operator surface asks the store for: filters, pages and cursors, and the rules
of which statuses an action may touch.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, get_args

from maildaemon.delivery import AttemptStatus, DeliveryStatus
from maildaemon.errors import InvalidInput

DELIVERY_STATUSES: tuple[str, ...] = get_args(DeliveryStatus)


ATTEMPT_STATUSES: tuple[str, ...] = get_args(AttemptStatus)


REQUEUEABLE = frozenset({"dead_letter", "failed"})


CANCELLABLE = frozenset({"queued"})


GLOBAL_SCOPE = "*"


@dataclass(frozen=True, slots=True)
class PageRequest:
    limit: int = 50
    after: tuple[Any, ...] | None = None  # the decoded cursor: the last key already seen


@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    status: str | None = None
    source: str | None = None
    recipient: str | None = None  # lower-cased address
    created_after: datetime | None = None
    created_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    source: str | None = None
    recipient_domain: str | None = None  # lower-cased
    reply_code: int | None = None
    reply_class: int | None = None  # 4 for 4xx
    created_after: datetime | None = None
    created_before: datetime | None = None
    reviewed: bool | None = None
    requeued: bool | None = None

    def describe(self) -> dict[str, Any]:
        """The filter as recorded in the audit trail (only the fields given)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif f.name == "reply_class" and value is not None:
                value = f"{value}xx"
            if value is not None:
                out[f.name] = value
        return out


@dataclass(frozen=True, slots=True)
class MalformedFilter:
    failure_code: str | None = None
    source: str | None = None
    replayed: bool | None = None


@dataclass(frozen=True, slots=True)
class SuppressionFilter:
    address: str | None = None  # lower-cased
    domain: str | None = None  # lower-cased


@dataclass(frozen=True, slots=True)
class ActionFilter:
    action: str | None = None
    actor: str | None = None
    target: str | None = None


def encode_cursor(kind: str, *key: Any) -> str:
    """An opaque, URL-safe cursor naming the last row of a page."""
    values = [v.isoformat() if isinstance(v, datetime) else v for v in key]
    text = json.dumps([kind, *values], separators=(",", ":"), ensure_ascii=True)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(text: str, kind: str, shape: tuple[type, ...]) -> tuple[Any, ...]:
    """The key of ``text``; InvalidInput (field ``cursor``) unless it is a ``kind`` cursor."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        values = json.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidInput("not a cursor returned by this listing", field="cursor") from None
    if not isinstance(values, list) or len(values) != len(shape) + 1 or values[0] != kind:
        raise InvalidInput("not a cursor returned by this listing", field="cursor")
    key: list[Any] = []
    for value, kind_of in zip(values[1:], shape, strict=True):
        if kind_of is datetime:
            value = _cursor_time(value)
        if not _fits(value, kind_of):
            raise InvalidInput("not a cursor returned by this listing", field="cursor")
        key.append(value)
    return tuple(key)


def _cursor_time(value: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return parsed if parsed is not None and parsed.tzinfo is not None else None


def _fits(value: Any, kind: type) -> bool:
    if kind is int:
        return type(value) is int and abs(value) < 2**63
    if kind is str:
        return type(value) is str and "\x00" not in value
    return type(value) is kind


def priority_name(rank: int) -> str:
    return {0: "critical", 1: "high", 2: "normal", 3: "low"}.get(rank, str(rank))


def spread_due_times(
    count: int, rate_per_second: float | None, start: datetime
) -> tuple[datetime | None, datetime | None]:
    """First and last due time of ``count`` requeued deliveries released at the rate."""
    if count == 0:
        return None, None
    gap = 1.0 / rate_per_second if rate_per_second else 0.0
    return start, start + timedelta(seconds=gap * (count - 1))
