"""Hypothesis strategies for delivery commands: valid ones, nearly valid ones, hostile ones.

Used by the stream fuzzing suite (tests/reliability) and by the unit test that everything
``parse_command`` accepts can be composed (tests/unit/test_sendable.py).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import strategies as st

# Strings an attacker puts into every text field: header injection, template injection,
# encoded-word and Unicode line-break tricks, controls, NUL, lone surrogates.
INJECTIONS = [
    "\r\nBcc: eve@evil.example",
    "\nX-Injected: yes",
    "\rSubject: hijacked",
    "\r\n\r\n<html>body injection</html>",
    "{{ 7 * 7 }}",
    "{% for x in range(10**9) %}x{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ self._TemplateReference__context }}",
    "=?utf-8?b?QmNjOiBldmVAZXZpbC5leGFtcGxl?=",
    "\u2028X-Unicode-Break: 1",
    "\x0bvertical\x0ctab",
    "\x00",
    "\ud800",
    "a" * 1200,
    " " * 3000,
    "javascript:alert(1)",
]
TEXT = st.one_of(
    st.text(max_size=60),
    st.sampled_from(INJECTIONS),
    st.tuples(st.text(max_size=20), st.sampled_from(INJECTIONS)).map("".join),
)
SAFE_TEXT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60
).filter(str.strip)
VALID_ADDRESS = st.sampled_from(
    ["ada@example.com", "Bob.Smith@Example.COM", "carol@straße.de", "dave@xn--strae-oqa.de"]
)
ADDRESS = st.one_of(
    VALID_ADDRESS,
    VALID_ADDRESS,
    st.sampled_from(
        [
            "ada@example.com",
            "Bob.Smith@Example.COM",
            "carol@straße.de",
            "dave@xn--strae-oqa.de",
            "eve@bücher.example",
            "frank+tag@sub.example.org",
            "ü@example.com",
            "a@b",
            "x@-bad.example",
            "x@a_b.example",
        ]
    ),
    TEXT,
)
FIELD_TEXT = st.one_of(SAFE_TEXT, SAFE_TEXT, TEXT)  # mostly clean, often hostile
RECIPIENT = st.one_of(
    ADDRESS,
    st.fixed_dictionaries({"address": ADDRESS}, optional={"name": FIELD_TEXT}),
)
WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    TEXT,
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)
FIELDS = [
    "delivery_id", "source", "idempotency_key", "to", "cc", "bcc", "reply_to",
    "payload_mode", "template_id", "locale", "variables", "subject", "text", "html",
    "priority", "send_at", "expires_at", "headers", "attachments", "traceparent",
]  # fmt: skip


def _recipients(draw: st.DrawFn, clean: bool, min_size: int, max_size: int) -> list[Any]:
    one = (
        st.one_of(
            VALID_ADDRESS, st.fixed_dictionaries({"address": VALID_ADDRESS, "name": SAFE_TEXT})
        )
        if clean
        else RECIPIENT
    )
    return draw(st.lists(one, min_size=min_size, max_size=max_size))


@st.composite
def template_command(draw: st.DrawFn, ident: str) -> dict[str, Any]:
    clean = draw(st.booleans())
    text = SAFE_TEXT if clean else FIELD_TEXT
    template_id = draw(st.sampled_from(["signin_code", "password_reset", "notification"]))
    variables: dict[str, Any] = {
        "signin_code": {"code": draw(text), "expires_minutes": draw(st.integers(1, 60))},
        "password_reset": {
            "reset_url": draw(
                st.one_of(
                    st.just("https://app.example/r?t=1"),
                    TEXT.map("https://x.example/".__add__),
                    TEXT,
                )
            ),
            "expires_minutes": draw(st.one_of(st.integers(1, 60), TEXT)),
        },
        "notification": {"title": draw(text), "body": draw(text)},
    }[template_id]
    extra = draw(
        st.dictionaries(
            st.sampled_from(["user_name", "action_url", "action_label", "x"]), TEXT, max_size=3
        )
    )
    return {
        "delivery_id": ident,
        "source": draw(st.sampled_from(["authsession", "notification"])),
        "idempotency_key": f"k-{ident}",
        "to": _recipients(draw, clean, 1, 3),
        "cc": _recipients(draw, clean, 0, 2),
        "bcc": _recipients(draw, clean, 0, 2),
        "payload_mode": "template",
        "template_id": template_id,
        "locale": draw(st.sampled_from(["en", "de", "de-AT", "fr", "en_GB"])),
        "variables": {**variables, **extra},
        "headers": draw(
            st.dictionaries(
                st.sampled_from(
                    ["List-Id", "list-id", "List-Unsubscribe", "X-Campaign-ID", "Subject"]
                ),
                FIELD_TEXT,
                max_size=2,
            )
        ),
        "priority": draw(st.sampled_from(["critical", "high", "normal", "low"])),
    }


@st.composite
def rendered_command(draw: st.DrawFn, ident: str) -> dict[str, Any]:
    clean = draw(st.booleans())
    text = SAFE_TEXT if clean else FIELD_TEXT
    doc: dict[str, Any] = {
        "delivery_id": ident,
        "source": "notification",
        "idempotency_key": f"k-{ident}",
        "to": _recipients(draw, clean, 1, 3),
        "reply_to": draw(st.one_of(st.none(), VALID_ADDRESS if clean else RECIPIENT)),
        "payload_mode": "rendered",
        "subject": draw(text),
        "text": draw(st.one_of(st.none(), text)),
        "html": draw(st.one_of(st.none(), text)),
    }
    if draw(st.booleans()):
        doc["attachments"] = [
            {
                "filename": draw(st.one_of(SAFE_TEXT, TEXT)),
                "content_type": draw(
                    st.sampled_from(["application/pdf", "text/csv", "message/rfc822"])
                ),
                "content": base64.b64encode(draw(st.binary(max_size=300))).decode(),
            }
        ]
    return {k: v for k, v in doc.items() if v is not None}


def command(ident: str) -> st.SearchStrategy[dict[str, Any]]:
    """A command that may or may not be valid: every text field can carry an injection."""
    return st.one_of(template_command(ident), rendered_command(ident))


@st.composite
def mutated(draw: st.DrawFn, ident: str) -> dict[str, Any]:
    """A command with one field given a value of the wrong type (or dropped)."""
    doc = draw(command(ident))
    field = draw(st.sampled_from(FIELDS))
    if draw(st.booleans()):
        doc[field] = draw(WRONG)
    else:
        doc.pop(field, None)
    return doc


def _nest(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"a":' * depth + "1" + "}" * depth)


@st.composite
def stream_entry(draw: st.DrawFn, ident: str) -> dict[str, bytes | str]:
    """One stream entry's field map, from valid to hostile."""
    kind = draw(
        st.sampled_from(
            ["valid", "valid", "valid", "mutated", "json", "deep", "huge", "binary", "fields"]
        )
    )
    if kind == "valid":
        return {"command": json.dumps(draw(command(ident)))}
    if kind == "mutated":
        return {"command": json.dumps(draw(mutated(ident)))}
    if kind == "json":
        return {"command": json.dumps(draw(JSON))}
    if kind == "deep":
        depth = draw(st.integers(min_value=9, max_value=3000))
        doc = json.dumps(draw(template_command(ident)))
        nested = _nest(depth, draw(st.sampled_from(["list", "dict"])))
        where = draw(st.sampled_from(["variables", "top"]))
        if where == "variables":
            return {
                "command": doc.replace('"variables": {', f'"variables": {{"deep": {nested}, ', 1)
            }
        return {"command": doc[:-1] + f', "deep": {nested}}}'}
    if kind == "huge":
        doc = draw(command(ident))
        size = draw(st.integers(min_value=100_000, max_value=400_000))
        if doc["payload_mode"] == "rendered":
            doc["text"] = draw(st.sampled_from(["x", " ", "\n", "ü", "a b"])) * size
        else:
            doc["variables"]["huge"] = "y" * size
        return {"command": json.dumps(doc)}
    if kind == "binary":
        raw = draw(st.binary(min_size=1, max_size=200))
        prefix = json.dumps(draw(command(ident))).encode()
        return {
            "command": draw(st.sampled_from([raw, prefix[:-2] + raw + b"}", b"\xff\xfe" + prefix]))
        }
    entry: dict[str, bytes | str] = {draw(st.sampled_from(["payload", "cmd", "COMMAND"])): "x"}
    if draw(st.booleans()):
        entry["command"] = json.dumps(draw(command(ident)))
        entry["extra"] = draw(st.text(max_size=10))
    return entry
