"""From a raw stream entry to a validated command, or to the reason it is not one.

Never raises for bad input: every way a producer can get an entry wrong ends as a
``Rejection`` with one of the contract's failure codes, with text PostgreSQL can store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from maildaemon.contract import limits
from maildaemon.contract.command import (
    COMMAND_FIELD,
    FAILURE_CODES,
    CommandPolicy,
    DeliveryCommand,
    Rejection,
)

# PostgreSQL stores neither NUL nor unpaired surrogates (text, jsonb).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _first_error(exc: ValidationError) -> tuple[str, str]:
    errors = exc.errors(include_url=False)
    # Prefer our own specific codes over generic ones, in document order.
    for err in errors:
        if err["type"] in FAILURE_CODES:
            return err["type"], _describe(err)
    err = errors[0]
    kind = err["type"]
    if kind == "missing":
        return "missing_field", _describe(err)
    if kind == "extra_forbidden":
        return "unknown_field", _describe(err)
    return "invalid_field", _describe(err)


def _describe(err: Mapping[str, Any]) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    message = str(err["msg"])
    if err["type"] == "missing":
        message = "field required"
    elif err["type"] == "extra_forbidden":
        message = "unknown field"
    return f"{loc}: {message}" if loc else message


def _peek(raw: Any, key: str) -> str | None:
    if isinstance(raw, dict):
        value = raw.get(key)
        if isinstance(value, str):
            return _UNSTORABLE.sub("\ufffd", value[:200])
    return None


def _unstorable(document: Any) -> bool:
    """Whether any key or string value holds a NUL or an unpaired surrogate."""
    stack = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _UNSTORABLE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_command(raw: str | bytes, policy: CommandPolicy | None) -> DeliveryCommand | Rejection:
    """Validate one command document; never raises for bad input."""
    if policy is not None and len(raw) > policy.command_max_bytes:
        return Rejection(
            "too_large", f"command is {len(raw)} bytes, the limit is {policy.command_max_bytes}"
        )
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            return Rejection("invalid_json", f"the command is not UTF-8: {exc}"[:500])
    else:
        text = raw
    try:
        document = json.loads(text, parse_constant=_no_constants, parse_float=limits.finite_number)
    except (ValueError, RecursionError) as exc:
        return Rejection("invalid_json", f"not a JSON document: {exc}"[:500])
    if not isinstance(document, dict):
        return Rejection("invalid_json", "the command must be a JSON object")
    delivery_id, source = _peek(document, "delivery_id"), _peek(document, "source")
    # Deep nesting would make validation, hashing and serialisation recurse: refuse it first.
    if not limits.document_depth_within(document):
        return Rejection(
            "too_deep",
            f"the command nests more than {limits.DOCUMENT_MAX_DEPTH} levels deep",
            delivery_id,
            source,
        )
    # PostgreSQL stores neither NUL nor unpaired surrogates (text, jsonb): refuse them here.
    if _UNSTORABLE.search(text) or ("\\u" in text and _unstorable(document)):
        return Rejection(
            "invalid_field",
            "the command contains a NUL character or an unpaired UTF-16 surrogate",
            delivery_id,
            source,
        )
    try:
        command = DeliveryCommand.model_validate(document, context=policy)
    except ValidationError as exc:
        code, detail = _first_error(exc)
        return Rejection(code, detail, delivery_id, source)
    except Exception as exc:  # hostile input never escapes: whatever it raises is a record
        detail = f"{type(exc).__name__}: {exc}"[:500]
        return Rejection("intake_error", detail, delivery_id, source)
    return command


def parse_entry(
    fields: Mapping[bytes, bytes] | Mapping[str, str], policy: CommandPolicy | None
) -> DeliveryCommand | Rejection:
    """Validate one stream entry (its field map)."""
    raw: str | bytes | None = None
    for key, value in fields.items():
        name = key.decode(errors="replace") if isinstance(key, bytes) else key
        if name == COMMAND_FIELD:
            raw = value
            break
    if raw is None:
        names = sorted(k.decode(errors="replace") if isinstance(k, bytes) else k for k in fields)
        return Rejection("invalid_json", f"entry has no {COMMAND_FIELD!r} field (fields: {names})")
    return parse_command(raw, policy)


def raw_entry_text(fields: Mapping[bytes, bytes] | Mapping[str, str], cap: int) -> tuple[str, bool]:
    """The entry as text for the malformed record, capped at ``cap`` characters."""
    decoded = {
        (k.decode(errors="replace") if isinstance(k, bytes) else k): (
            v.decode(errors="replace") if isinstance(v, bytes) else v
        )
        for k, v in fields.items()
    }
    if set(decoded) == {COMMAND_FIELD}:
        text = decoded[COMMAND_FIELD]
    else:
        text = json.dumps(decoded, ensure_ascii=False)
    text = text.replace("\x00", "\\u0000")
    if len(text) > cap:
        return text[:cap], True
    return text, False
