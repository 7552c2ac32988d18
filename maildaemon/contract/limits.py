"""The contract's fixed bounds on the work one command can cause, and how they are checked.

Each bound has a failure code (see ``command.FAILURE_CODES``) and is written in the
AsyncAPI document and the JSON Schema. The byte limits that depend on the deployment
(command, attachments, batch) are settings; the structural ones here are fixed.

Every check walks producer data iteratively, in one pass, and stops at the first bound
crossed: nothing here recurses or takes more than linear time.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

# Containers (objects, arrays) nested inside the whole command document.
DOCUMENT_MAX_DEPTH = 16
# Containers nested inside one template variable: {"a": {"b": 1}} is depth 1 for "a".
VARIABLES_MAX_DEPTH = 8
# Top-level template variables, and values (scalars and containers) in all of them.
VARIABLES_MAX_COUNT = 64
VARIABLES_MAX_VALUES = 5_000
# Characters of all keys and string values in `variables` together.
VARIABLES_MAX_CHARS = 256 * 1024
VARIABLE_NAME_MAX_CHARS = 128
ATTACHMENTS_MAX_COUNT = 20
# RFC 5322: a header line is at most 998 characters; "Name: value" must fit on one.
HEADER_LINE_MAX = 998
# Link variables (names ending in "_url") fill href attributes: absolute http(s) URLs only.
LINK_SUFFIX = "_url"
LINK_MAX_CHARS = 2048
# Instants (send_at, expires_at), as UTC: every one PostgreSQL stores must read back into
# Python (whose datetime ends at 9999-12-31 in UTC; "9999-12-31T23:00:00-05:00" is past it).
INSTANT_MIN = datetime(1970, 1, 1, tzinfo=UTC)
INSTANT_MAX = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)

# Headers the message builder writes itself; a command may not set them.
RESERVED_HEADERS = frozenset(
    {
        "bcc",
        "cc",
        "content-disposition",
        "content-transfer-encoding",
        "content-type",
        "date",
        "from",
        "message-id",
        "mime-version",
        "reply-to",
        "sender",
        "subject",
        "to",
        "x-maildaemon-ref",  # the signed tracking header (maildaemon/returnpath.py)
    }
)


class LimitExceeded(ValueError):
    """A bound crossed: ``code`` is the failure code, the message says which bound."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def document_depth_within(document: Any, limit: int = DOCUMENT_MAX_DEPTH) -> bool:
    """Whether no container in ``document`` is nested more than ``limit`` deep."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children)
    return True


def check_variables(variables: Any) -> None:
    """Raise LimitExceeded if ``variables`` crosses a bound (count, names, depth, size)."""
    if not isinstance(variables, dict):
        return  # the model reports the wrong type
    if len(variables) > VARIABLES_MAX_COUNT:
        raise LimitExceeded(
            "too_many_variables",
            f"{len(variables)} variables, the limit is {VARIABLES_MAX_COUNT}",
        )
    chars = 0
    values = 0
    for name in variables:
        if not isinstance(name, str) or len(name) > VARIABLE_NAME_MAX_CHARS:
            raise LimitExceeded(
                "variables_too_large",
                f"variable names are at most {VARIABLE_NAME_MAX_CHARS} characters",
            )
        chars += len(name)
    stack: list[tuple[Any, int]] = [(value, 0) for value in variables.values()]
    while stack:
        item, depth = stack.pop()
        values += 1
        if values > VARIABLES_MAX_VALUES:
            raise LimitExceeded(
                "too_many_variables",
                f"more than {VARIABLES_MAX_VALUES} values in variables",
            )
        if isinstance(item, str):
            chars += len(item)
        elif isinstance(item, dict | list):
            if depth >= VARIABLES_MAX_DEPTH:
                raise LimitExceeded(
                    "too_deep",
                    f"variables nest more than {VARIABLES_MAX_DEPTH} levels deep",
                )
            if isinstance(item, dict):
                chars += sum(len(k) for k in item if isinstance(k, str))
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
        else:
            chars += 8
        if chars > VARIABLES_MAX_CHARS:
            raise LimitExceeded(
                "variables_too_large",
                f"variables hold more than {VARIABLES_MAX_CHARS} characters",
            )


def is_link_variable(name: str) -> bool:
    return name.endswith(LINK_SUFFIX)


def check_link(name: str, value: Any) -> None:
    """A link variable must be an absolute http(s) URL without spaces, controls or userinfo."""
    if value is None or value == "":
        return  # no link: the templates leave it out
    if not isinstance(value, str):
        raise LimitExceeded("invalid_link", f"variable {name!r} must be an http(s) URL string")
    lowered = value[:8].lower()
    if (
        len(value) > LINK_MAX_CHARS
        or not (lowered.startswith("https://") or lowered.startswith("http://"))
        or len(value) <= len("http://")
        or any(ch.isspace() or not ch.isprintable() for ch in value)
        or _has_userinfo(value)
    ):
        raise LimitExceeded(
            "invalid_link",
            f"variable {name!r} must be an absolute http:// or https:// URL "
            f"(at most {LINK_MAX_CHARS} characters, no spaces, no user@ before the host)",
        )


def _has_userinfo(url: str) -> bool:
    """An ``@`` (or a ``\\``) in the authority: ``https://bank.example@evil.example/``.

    The authority ends at the first ``/``, ``?`` or ``#`` (RFC 3986); browsers also end it
    at ``\\``, other parsers do not, so a backslash there is refused as well: the host a
    reader sees is then the host every client opens.
    """
    rest = url.split("://", 1)[1]
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    return "@" in authority or "\\" in authority


def check_instant(value: datetime) -> None:
    """An instant within [INSTANT_MIN, INSTANT_MAX] once turned into UTC."""
    try:
        utc = value.astimezone(UTC)
    except (OverflowError, ValueError):
        utc = None
    if utc is None or not INSTANT_MIN <= utc <= INSTANT_MAX:
        raise LimitExceeded(
            "invalid_field",
            f"must lie between {INSTANT_MIN:%Y-%m-%dT%H:%M:%SZ} and "
            f"{INSTANT_MAX:%Y-%m-%dT%H:%M:%SZ} (UTC)",
        )


def finite_number(text: str) -> float:
    """A JSON number as a float, refused when it does not fit one (1e400 is no number
    PostgreSQL's jsonb takes back as written: Python reads it as infinity)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]!r} is out of range")
    return value
