"""What an operator may ask: identifiers, times and query parameters (bodies: ``operator_bodies``).

Everything here validates exactly what the OpenAPI document promises (``openapi.py`` reads
the same patterns and ``Param`` specs), and refuses anything else with ``InvalidInput``
naming the field. Pure: shared by the HTTP API and the CLI.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from maildaemon.addresses import domain_key, lookup_key
from maildaemon.contract.command import FAILURE_CODES
from maildaemon.errors import InvalidInput
from maildaemon.store.operator.filters import (
    DELIVERY_STATUSES,
    ActionFilter,
    DeadLetterFilter,
    DeliveryFilter,
    MalformedFilter,
    PageRequest,
    SuppressionFilter,
    decode_cursor,
)

DEFAULT_LIMIT = 50
MAX_LIMIT = 500

# Patterns are written for both Python (fullmatch) and ECMA-262 (the OpenAPI document).
DELIVERY_ID = r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}$"
STREAM_ENTRY_ID = r"^[0-9]{1,20}-[0-9]{1,20}$"
SOURCE = r"^[a-z][a-z0-9_.-]{0,63}$"
ACTOR = r"^[^\x00-\x1f\x7f]{1,200}$"
HEADER_ACTOR = r"^[\x20-\x7e]{1,200}$"
FREE_TEXT = r"^[^\x00]*$"
WORD = r"^[^\x00-\x20\x7f]{1,254}$"  # no spaces or control characters
DOMAIN = r"^[^\x00-\x20\x7f@]{1,253}$"
ADDRESS = r"^[^\x00-\x20\x7f@]{1,64}@[^\x00-\x20\x7f@]{1,252}$"
CURSOR = r"^[A-Za-z0-9_-]{1,512}$"
ACTION_NAME = r"^[a-z][a-z0-9_.-]{0,63}$"

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,32}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


def _fullmatch(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern.removeprefix("^").removesuffix("$"))


def parse_time(text: str, name: str) -> datetime:
    """An RFC 3339 date-time with an offset (``Z`` or ``±hh:mm``), as UTC."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise InvalidInput(
            f"{name}: not an RFC 3339 date-time with a UTC offset, e.g. 2024-05-01T12:00:00Z",
            field=name,
        )
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    micro = int((match.group(7) or "0")[:6].ljust(6, "0"))
    try:
        if match.group(8):
            tz: timezone = UTC
        else:
            hours, minutes = int(match.group(10)), int(match.group(11))
            if hours > 23 or minutes > 59:
                raise ValueError("bad offset")
            offset = timedelta(hours=hours, minutes=minutes)
            tz = timezone(-offset if match.group(9) == "-" else offset)
        # A leap second (:60) is read as the last microsecond before it.
        leap = second == 60
        value = datetime(
            year,
            month,
            day,
            hour,
            minute,
            59 if leap else second,
            999999 if leap else micro,
            tzinfo=tz,
        )
        return value.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidInput(f"{name}: not a valid date-time", field=name) from None


def check(pattern: str, value: str, name: str, what: str) -> str:
    if not _fullmatch(pattern).fullmatch(value):
        raise InvalidInput(f"{name}: {what}", field=name)
    return value


def delivery_id(value: str) -> str:
    return check(
        DELIVERY_ID,
        value,
        "delivery_id",
        "must be 1-128 letters, digits and ._:@/+=- starting with a letter or digit",
    )


def stream_entry_id(value: str) -> str:
    return check(
        STREAM_ENTRY_ID,
        value,
        "stream_entry_id",
        "must be a stream entry id such as 1700000000000-0",
    )


def malformed_id(value: str) -> int:
    check(r"^[0-9]{1,19}$", value, "id", "must be a positive integer")
    number = int(value)
    if not 1 <= number < 2**63:
        raise InvalidInput("id: must be a positive integer", field="id")
    return number


def email_address(value: str, name: str = "address") -> str:
    """An address as the suppression list keys it: lower-cased, no spaces or controls."""
    if len(value) > 254:
        raise InvalidInput(f"{name}: longer than 254 characters", field=name)
    return lookup_key(check(ADDRESS, value, name, "not an e-mail address (local@domain)"))


def actor_note(body_actor: str | None, header: str | None) -> str | None:
    """A caller's note on who acts: the body's ``actor``, else the ``X-Operator`` header.

    Only a note (kept in the audit detail): the recorded actor is the token's identity."""
    if header is not None:
        check(HEADER_ACTOR, header, "X-Operator", "must be 1-200 printable ASCII characters")
    return body_actor or header


# --- query parameters --------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One query parameter: its JSON Schema, and how its text becomes a value."""

    name: str
    schema: dict[str, Any]
    description: str
    convert: Callable[[str, str], Any]


def _text(pattern: str, what: str) -> Callable[[str, str], Any]:
    return lambda value, name: check(pattern, value, name, what)


def _address_key(value: str, name: str) -> str:
    """An address as deliveries and the suppression list store it (one canonical form)."""
    return lookup_key(check(WORD, value, name, "must be an address without spaces"))


def _domain_key(value: str, name: str) -> str:
    return domain_key(check(DOMAIN, value, name, "must be a domain name"))


def _enum(values: Sequence[str]) -> Callable[[str, str], Any]:
    def convert(value: str, name: str) -> str:
        if value not in values:
            raise InvalidInput(f"{name}: must be one of {', '.join(values)}", field=name)
        return value

    return convert


def _int(low: int, high: int) -> Callable[[str, str], Any]:
    def convert(value: str, name: str) -> int:
        if not re.fullmatch(r"-?[0-9]{1,20}", value) or not low <= int(value) <= high:
            raise InvalidInput(f"{name}: must be an integer from {low} to {high}", field=name)
        return int(value)

    return convert


enum_of, int_between = _enum, _int  # for query parameters declared beside their handler


def _bool(value: str, name: str) -> bool:
    if value not in ("true", "false"):
        raise InvalidInput(f"{name}: must be true or false", field=name)
    return value == "true"


def _time(value: str, name: str) -> datetime:
    return parse_time(value, name)


def _string(pattern: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "pattern": pattern, **extra}


TIME_SCHEMA = {"type": "string", "format": "date-time"}
P_LIMIT = Param(
    "limit",
    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
    "Page size.",
    _int(1, MAX_LIMIT),
)
P_CURSOR = Param(
    "cursor",
    _string(CURSOR),
    "The next_cursor of the previous page.",
    _text(CURSOR, "not a cursor"),
)
P_SOURCE = Param(
    "source",
    _string(SOURCE),
    "Only this source.",
    _text(SOURCE, "must be a source name (lower-case letters, digits, _.-)"),
)


def _after(what: str) -> Param:
    return Param("created_after", TIME_SCHEMA, f"Only {what} created at or after this time.", _time)


def _before(what: str) -> Param:
    return Param("created_before", TIME_SCHEMA, f"Only {what} created before this time.", _time)


DELIVERY_PARAMS = (
    Param(
        "status",
        {"type": "string", "enum": list(DELIVERY_STATUSES)},
        "Only this status.",
        _enum(DELIVERY_STATUSES),
    ),
    P_SOURCE,
    Param(
        "recipient",
        _string(WORD),
        "Only deliveries to this address (to, cc or bcc; case-insensitive).",
        _address_key,
    ),
    _after("deliveries"),
    _before("deliveries"),
    P_LIMIT,
    P_CURSOR,
)
DEAD_LETTER_PARAMS = (
    P_SOURCE,
    Param(
        "recipient_domain",
        _string(DOMAIN),
        "Only deliveries with a recipient at this domain.",
        _domain_key,
    ),
    Param(
        "reply_code",
        {"type": "integer", "minimum": 200, "maximum": 599},
        "Only this last SMTP reply code.",
        _int(200, 599),
    ),
    Param(
        "reply_class",
        {"type": "string", "enum": ["2xx", "3xx", "4xx", "5xx"]},
        "Only last SMTP replies of this class.",
        _enum(("2xx", "3xx", "4xx", "5xx")),
    ),
    _after("dead letters"),
    _before("dead letters"),
    Param("reviewed", {"type": "boolean"}, "Only reviewed (true) or unreviewed (false).", _bool),
    Param("requeued", {"type": "boolean"}, "Only requeued (true) or not (false).", _bool),
    P_LIMIT,
    P_CURSOR,
)
MALFORMED_PARAMS = (
    Param(
        "failure_code",
        {"type": "string", "enum": list(FAILURE_CODES)},
        "Only this failure code.",
        _enum(FAILURE_CODES),
    ),
    Param(
        "source",
        _string(r"^[^\x00]{1,200}$"),
        "Only entries naming this source.",
        _text(r"^[^\x00]{1,200}$", "must be 1-200 characters"),
    ),
    Param("replayed", {"type": "boolean"}, "Only replayed (true) or not (false).", _bool),
    P_LIMIT,
    P_CURSOR,
)
SUPPRESSION_PARAMS = (
    Param(
        "address",
        _string(WORD),
        "Only this address (case-insensitive).",
        _address_key,
    ),
    Param(
        "domain",
        _string(DOMAIN),
        "Only addresses at this domain.",
        _domain_key,
    ),
    P_LIMIT,
    P_CURSOR,
)
ACTION_PARAMS = (
    Param(
        "action",
        _string(ACTION_NAME),
        "Only this action, e.g. delivery.requeue.",
        _text(ACTION_NAME, "must be an action name"),
    ),
    Param(
        "actor",
        _string(ACTOR),
        "Only actions by this actor.",
        _text(ACTOR, "must be 1-200 characters without control characters"),
    ),
    Param(
        "target",
        _string(r"^[^\x00]{1,300}$"),
        "Only actions on this target.",
        _text(r"^[^\x00]{1,300}$", "must be 1-300 characters"),
    ),
    P_LIMIT,
    P_CURSOR,
)


class Query(Mapping[str, Any]):
    """Query parameters parsed against their specs; a missing one reads as None."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values.get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def parse_query(pairs: Sequence[tuple[str, str]], params: Sequence[Param]) -> Query:
    specs = {p.name: p for p in params}
    values: dict[str, Any] = {}
    for name, text in pairs:
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(specs) or "none"
            raise InvalidInput(
                f"{name[:100]}: unknown query parameter (known: {known})", field=name[:100]
            )
        if name in values:
            raise InvalidInput(f"{name}: given more than once", field=name)
        values[name] = spec.convert(text, name)
    return Query(values)


def page(query: Query, kind: str, shape: tuple[type, ...]) -> PageRequest:
    cursor = query["cursor"]
    after = decode_cursor(cursor, kind, shape) if cursor is not None else None
    return PageRequest(limit=query["limit"] or DEFAULT_LIMIT, after=after)


def delivery_query(pairs: Sequence[tuple[str, str]]) -> tuple[DeliveryFilter, PageRequest]:
    q = parse_query(pairs, DELIVERY_PARAMS)
    flt = DeliveryFilter(
        status=q["status"],
        source=q["source"],
        recipient=q["recipient"],
        created_after=q["created_after"],
        created_before=q["created_before"],
    )
    return flt, page(q, "d", (datetime, str))


def dead_letter_filter(q: Mapping[str, Any]) -> DeadLetterFilter:
    rc = q.get("reply_class")
    return DeadLetterFilter(
        source=q.get("source"),
        recipient_domain=q.get("recipient_domain"),
        reply_code=q.get("reply_code"),
        reply_class=int(rc[0]) if rc else None,
        created_after=q.get("created_after"),
        created_before=q.get("created_before"),
        reviewed=q.get("reviewed"),
        requeued=q.get("requeued"),
    )


def dead_letter_query(pairs: Sequence[tuple[str, str]]) -> tuple[DeadLetterFilter, PageRequest]:
    q = parse_query(pairs, DEAD_LETTER_PARAMS)
    return dead_letter_filter(q), page(q, "dl", (bool, datetime, str))


def malformed_query(pairs: Sequence[tuple[str, str]]) -> tuple[MalformedFilter, PageRequest]:
    q = parse_query(pairs, MALFORMED_PARAMS)
    flt = MalformedFilter(
        failure_code=q["failure_code"], source=q["source"], replayed=q["replayed"]
    )
    return flt, page(q, "m", (datetime, int))


def suppression_query(pairs: Sequence[tuple[str, str]]) -> tuple[SuppressionFilter, PageRequest]:
    q = parse_query(pairs, SUPPRESSION_PARAMS)
    return SuppressionFilter(address=q["address"], domain=q["domain"]), page(q, "s", (str,))


def action_query(pairs: Sequence[tuple[str, str]]) -> tuple[ActionFilter, PageRequest]:
    q = parse_query(pairs, ACTION_PARAMS)
    flt = ActionFilter(action=q["action"], actor=q["actor"], target=q["target"])
    return flt, page(q, "a", (int,))
