"""The published stream contract (docs/api) agrees with the code that enforces it.

* ``docs/api/delivery-command.schema.json`` is exactly
  ``maildaemon.contract.command.json_schema()``.
* ``docs/api/delivery-commands-asyncapi.yaml`` names every command field, every failure code
  and every limit the code has, and its examples are accepted by ``parse_command``.
* The JSON Schema and the pydantic model agree on the shape of a command.
* ``parse_command`` never raises, whatever arrives on the stream.

PyYAML is not a declared dependency, so the AsyncAPI document is read with a tiny reader that
knows its layout: block mappings indented with spaces, and JSON flow collections (valid YAML)
for the parts a test has to read (examples, ``x-failure-codes``, ``x-limits``, event payload).
Where PyYAML is importable, one more test parses the whole document and compares.

Hostile text (NUL, unpaired surrogates, UTF-16/32 input) must be rejected with a clean
``Rejection`` whose every field PostgreSQL can store.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import typing
from collections.abc import Callable
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import maildaemon
from maildaemon.cli import main as cli
from maildaemon.config import Settings
from maildaemon.config_values import parse_duration
from maildaemon.contract.command import (
    FAILURE_CODES,
    Attachment,
    CommandPolicy,
    DeliveryCommand,
    Recipient,
    Rejection,
    json_schema,
)
from maildaemon.contract.parsing import parse_command, parse_entry
from maildaemon.delivery import AttemptResult, AttemptStatus
from maildaemon.message.policy import command_policy
from maildaemon.message.render import TemplateCatalog
from maildaemon.pipeline import results
from maildaemon.store.pipeline.rows import event_fields

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = REPO / "docs" / "api" / "delivery-command.schema.json"
ASYNCAPI_FILE = REPO / "docs" / "api" / "delivery-commands-asyncapi.yaml"
REGENERATE = "maildaemon schema > docs/api/delivery-command.schema.json"

ASYNCAPI = ASYNCAPI_FILE.read_text(encoding="utf-8")
DEFAULTS = Settings.model_construct()  # every setting at its default, no environment
CATALOG = TemplateCatalog.load(REPO / "templates", DEFAULTS.default_locale)
POLICY = command_policy(DEFAULTS, CATALOG)  # what a daemon with default settings accepts
SCHEMA = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
SCHEMA_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

# Codes by where they are produced (the `stage` of x-failure-codes in the document).
# maildaemon.store (intake_error: a command that fails while being hashed or written)
INTAKE_CODES = {"idempotency_conflict", "delivery_id_conflict", "intake_error"}
RESERVED_CODES = {"already_expired"}  # defined, never produced
PARSE_CODES = set(FAILURE_CODES) - INTAKE_CODES - RESERVED_CODES
SHAPE_CODES = {"missing_field", "unknown_field", "invalid_field", "unknown_payload_mode"}


# --- reading the AsyncAPI document without a YAML parser ---------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _node(*path: str) -> str:
    """The text of a block-mapping entry, from its key line to the next sibling key."""
    lines = ASYNCAPI.splitlines()
    lo, hi, at = 0, len(lines), -1
    for key in path:
        body = [i for i in range(lo, hi) if lines[i].strip() and lines[i].lstrip()[0] != "#"]
        level = min(_indent(lines[i]) for i in body)
        siblings = [i for i in body if _indent(lines[i]) == level]
        hits = [i for i in siblings if lines[i].lstrip().startswith(f"{key}:")]
        assert len(hits) == 1, f"{'.'.join(path)}: no single {key!r} in {ASYNCAPI_FILE.name}"
        at = hits[0]
        later = [i for i in siblings if i > at]
        lo, hi = at + 1, later[0] if later else hi
    return "\n".join(lines[at:hi])


def _scalar(*path: str) -> str:
    first = _node(*path).splitlines()[0]
    return first.split(":", 1)[1].strip().strip("'\"")


def _json(*path: str) -> Any:
    text = _node(*path)
    value, _ = json.JSONDecoder().raw_decode(text.split(":", 1)[1].lstrip())
    return value


def _examples(message: str) -> list[tuple[str, dict[str, Any]]]:
    text = _node("components", "messages", message, "examples")
    names = re.findall(r"^\s*- name: (\S+)$", text, re.MULTILINE)
    decoder = json.JSONDecoder()
    payloads = [
        decoder.raw_decode(text, m.end())[0]
        for m in re.finditer(r"^\s*payload: (?=\{)", text, re.MULTILINE)
    ]
    assert len(names) == len(payloads) > 0, f"{message}: every example needs a JSON payload"
    return list(zip(names, payloads, strict=True))


COMMAND_DOC = _node("components", "messages", "DeliveryCommand", "description")
COMMAND_EXAMPLES = _examples("DeliveryCommand")
EVENT_EXAMPLES = _examples("DeliveryEvent")
EVENT_SCHEMA = _json("components", "messages", "DeliveryEvent", "payload")
DOCUMENTED_CODES: dict[str, dict[str, str]] = _json(
    "components", "messages", "DeliveryCommand", "x-failure-codes"
)


# --- (a) the JSON Schema file -----------------------------------------------------------


def test_schema_file_is_the_generated_schema() -> None:
    expected = json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
    actual = SCHEMA_FILE.read_text(encoding="utf-8")
    if actual != expected:
        pytest.fail(
            f"{SCHEMA_FILE.relative_to(REPO)} differs from "
            "maildaemon.contract.command.json_schema(); "
            f"regenerate it with: {REGENERATE}",
            pytrace=False,
        )


def test_schema_cli_prints_the_schema_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["schema"]) == 0
    assert capsys.readouterr().out == SCHEMA_FILE.read_text(encoding="utf-8")


def _keywords(node: Any) -> set[str]:
    """Every keyword used in a schema (property names are not keywords)."""
    found: set[str] = set()
    if isinstance(node, dict):
        found.update(node)
        for key, value in node.items():
            if key in ("properties", "$defs"):
                for sub in value.values():
                    found |= _keywords(sub)
            elif key in ("items", "additionalProperties", "not"):
                found |= _keywords(value)
            elif key in ("anyOf", "oneOf", "allOf"):
                for sub in value:
                    found |= _keywords(sub)
    return found


def test_schema_is_valid_and_draft07_compatible() -> None:
    # The AsyncAPI document declares the schema as draft-07 (the format every AsyncAPI 3
    # tool supports); it must not use keywords whose meaning differs in draft-07.
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    # fmt: off
    same_in_draft07 = {
        "$schema", "$id", "$ref", "$defs", "title", "description", "type", "properties",
        "required", "additionalProperties", "items", "minItems", "maxItems", "minLength",
        "maxLength", "pattern", "enum", "const", "anyOf", "oneOf", "allOf", "not", "format",
        "default", "examples", "minimum", "maximum", "maxProperties",
    }
    # fmt: on
    assert _keywords(SCHEMA) <= same_in_draft07, _keywords(SCHEMA) - same_in_draft07


# --- (b) the AsyncAPI document ----------------------------------------------------------


def test_asyncapi_structure() -> None:
    assert "\t" not in ASYNCAPI
    assert _scalar("asyncapi") == "3.0.0"
    assert _scalar("channels", "deliveryCommands", "address") == DEFAULTS.command_stream
    assert _scalar("channels", "deliveryEvents", "address") == DEFAULTS.event_stream
    # The document describes the daemon: it receives commands and sends events.
    receive = ("operations", "receiveDeliveryCommand")
    assert _scalar(*receive, "action") == "receive"
    assert _scalar(*receive, "channel", "$ref") == "#/channels/deliveryCommands"
    send = ("operations", "sendDeliveryEvent")
    assert _scalar(*send, "action") == "send"
    assert _scalar(*send, "channel", "$ref") == "#/channels/deliveryEvents"
    # The command payload is the schema file itself, by reference: nothing to drift.
    payload = ("components", "messages", "DeliveryCommand", "payload")
    assert _scalar(*payload, "schemaFormat") == "application/schema+json;version=draft-07"
    ref = _scalar(*payload, "schema", "$ref")
    assert (ASYNCAPI_FILE.parent / ref).resolve() == SCHEMA_FILE


def test_asyncapi_documents_every_field() -> None:
    for model in (DeliveryCommand, Recipient, Attachment):
        for name in model.model_fields:
            assert f"| `{name}` |" in COMMAND_DOC, f"{model.__name__}.{name} is not documented"


def test_asyncapi_documents_every_failure_code() -> None:
    assert list(DOCUMENTED_CODES) == list(FAILURE_CODES)
    stages = {code: entry["stage"] for code, entry in DOCUMENTED_CODES.items()}
    assert {c for c, s in stages.items() if s == "validation"} == PARSE_CODES
    assert {c for c, s in stages.items() if s == "intake"} == INTAKE_CODES
    assert {c for c, s in stages.items() if s == "reserved"} == RESERVED_CODES
    for code in FAILURE_CODES:
        assert f"`{code}`" in COMMAND_DOC, f"{code} is not in the DeliveryCommand description"
    assert set(TRIGGERS) == PARSE_CODES  # each validation code is shown to be produced below


def _package_sources() -> dict[Path, str]:
    root = Path(maildaemon.__file__).parent
    return {path: path.read_text(encoding="utf-8") for path in root.rglob("*.py")}


def test_intake_and_reserved_codes_are_where_the_document_says() -> None:
    sources = _package_sources()
    store = "".join(text for path, text in sources.items() if "store" in path.parts)
    for code in INTAKE_CODES:
        assert f'"{code}"' in store, f"{code} is no longer produced by the store"
    for code in RESERVED_CODES:
        users = [p.name for p, text in sources.items() if f'"{code}"' in text]
        assert users == ["command.py"], f"{code} is produced now: document it as such"


def test_asyncapi_limits_are_the_setting_defaults() -> None:
    limits = _json("components", "messages", "DeliveryCommand", "x-limits")
    policy_settings = {f"MAIL_{f.name.upper()}" for f in fields(CommandPolicy)}
    assert policy_settings - {"MAIL_KNOWN_TEMPLATES", "MAIL_TEMPLATE_NEEDS"} <= set(limits)
    for env, documented in limits.items():
        default = Settings.model_fields[env.removeprefix("MAIL_").lower()].default
        if env == "MAIL_IDEMPOTENCY_WINDOW":
            assert parse_duration(documented) == default
        elif isinstance(default, tuple):
            assert documented == list(default), env
        else:
            assert documented == default, env
        if isinstance(default, int):
            assert f"`{env}` (default {default}" in COMMAND_DOC, f"{env} default in the prose"


def test_asyncapi_parses_as_yaml_when_pyyaml_is_there() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed; the tiny reader is used")
    doc = yaml.safe_load(ASYNCAPI)
    message = doc["components"]["messages"]["DeliveryCommand"]
    assert [(e["name"], e["payload"]) for e in message["examples"]] == COMMAND_EXAMPLES
    assert message["x-failure-codes"] == DOCUMENTED_CODES
    assert doc["components"]["messages"]["DeliveryEvent"]["payload"] == EVENT_SCHEMA


# --- (c) the examples are accepted -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "command"), COMMAND_EXAMPLES, ids=[n for n, _ in COMMAND_EXAMPLES]
)
def test_command_example_is_accepted(name: str, command: dict[str, Any]) -> None:
    raw = json.dumps(command, ensure_ascii=False)
    parsed = parse_command(raw, POLICY)
    assert isinstance(parsed, DeliveryCommand), parsed
    assert parse_entry({b"command": raw.encode()}, POLICY) == parsed
    SCHEMA_VALIDATOR.validate(command)
    if parsed.template_id is not None:  # and the template has what it needs
        CATALOG.render(parsed.template_id, parsed.locale, parsed.variables)


def test_examples_cover_both_payload_modes_and_every_shipped_template() -> None:
    commands = [c for _, c in COMMAND_EXAMPLES]
    assert {c["payload_mode"] for c in commands} == {"template", "rendered"}
    assert {c.get("template_id") for c in commands} - {None} == CATALOG.template_ids
    assert CATALOG.template_ids == {"signin_code", "password_reset", "notification"}


def test_xadd_example_is_accepted() -> None:
    description = _node("channels", "deliveryCommands", "description")
    match = re.search(r"XADD (\S+) \* command '(\{.*\})'", description)
    assert match is not None
    assert match.group(1) == DEFAULTS.command_stream
    parsed = parse_entry({"command": match.group(2)}, POLICY)
    assert isinstance(parsed, DeliveryCommand), parsed
    assert parsed.template_id is not None
    CATALOG.render(parsed.template_id, parsed.locale, parsed.variables)


def test_event_examples_match_the_event_payload() -> None:
    jsonschema.Draft7Validator.check_schema(EVENT_SCHEMA)
    validator = jsonschema.Draft7Validator(EVENT_SCHEMA)
    for _, event in EVENT_EXAMPLES:
        validator.validate(event)
        datetime.fromisoformat(event["at"])
    statuses = {event["status"] for _, event in EVENT_EXAMPLES}
    assert {"retry_scheduled", "sent"} <= statuses


def test_event_status_values_are_the_published_ones() -> None:
    props = EVENT_SCHEMA["properties"]
    published = {"retry_scheduled" if s == "queued" else s for s in results._EVENT_NAMES}
    assert set(props["status"]["enum"]) == published
    assert set(props["attempt_status"]["enum"]) == {*typing.get_args(AttemptStatus), "cancelled"}


def test_published_events_match_the_event_payload() -> None:
    now = datetime.now(UTC)
    common: dict[str, Any] = {
        "delivery_id": "d-1",
        "source": "authsession",
        "claim_token": 1,
        "attempt_no": 1,
        "started_at": now,
        "finished_at": now,
    }
    outcomes = [
        AttemptResult(
            **common,
            attempt_status="transport_failed",
            delivery_status="queued",
            reply_code=451,
            reply_text="4.7.1 later" * 100,
            next_attempt_at=now + timedelta(seconds=30),
        ),
        AttemptResult(
            **common,
            attempt_status="sent",
            delivery_status="sent",
            reply_code=250,
            reply_text="2.0.0 Ok",
        ),
        AttemptResult(
            **common, attempt_status="expired", delivery_status="expired", record_attempt=False
        ),
    ]
    validator = jsonschema.Draft7Validator(EVENT_SCHEMA)
    for outcome in outcomes:
        event = event_fields(outcome)
        assert set(event) == set(EVENT_SCHEMA["properties"])
        validator.validate({k: str(v) for k, v in event.items()})  # Redis stores strings


# --- one input per failure code: parse_command produces every documented code ------------

RENDERED: dict[str, Any] = {
    "delivery_id": "notification-0001",
    "source": "notification",
    "idempotency_key": "contract-test:0001",
    "to": [{"address": "ada@example.com"}],
    "payload_mode": "rendered",
    "subject": "Hello",
    "text": "Hello Ada",
}
TEMPLATE: dict[str, Any] = {
    **{k: v for k, v in RENDERED.items() if k not in ("subject", "text")},
    "payload_mode": "template",
    "template_id": "notification",
    "variables": {"title": "Hello", "body": "Hello Ada"},
}


def _with(base: dict[str, Any], drop: tuple[str, ...] = (), **changes: Any) -> str:
    doc = copy.deepcopy(base)
    for key in drop:
        del doc[key]
    doc.update(changes)
    return json.dumps(doc)


def _b64(size: int) -> str:
    return base64.b64encode(b"x" * size).decode()


def _file(size: int) -> dict[str, str]:
    return {"filename": "a.bin", "content": _b64(size)}


MAX_ATTACHMENT = POLICY.attachment_max_bytes
R, T = RENDERED, TEMPLATE
Maker = Callable[[], str | bytes]
TRIGGERS: dict[str, dict[str, Maker]] = {
    "invalid_json": {
        "not-json": lambda: "please deliver",
        "trailing-comma": lambda: '{"delivery_id": "a",}',
        "array": lambda: "[1, 2]",
        "string": lambda: '"hello"',
        "invalid-utf8": lambda: b'{"delivery_id": "\xff"}',
        "too-deep": lambda: '{"variables": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "integer-too-long": lambda: '{"variables": {"n": ' + "9" * 5000 + "}}",
    },
    "missing_field": {
        "delivery_id": lambda: _with(R, drop=("delivery_id",)),
        "source": lambda: _with(R, drop=("source",)),
        "idempotency_key": lambda: _with(R, drop=("idempotency_key",)),
        "to": lambda: _with(R, drop=("to",)),
        "payload_mode": lambda: _with(R, drop=("payload_mode",)),
        "template_id": lambda: _with(T, drop=("template_id",)),
        "template_id-empty": lambda: _with(T, template_id=""),
        "subject": lambda: _with(R, drop=("subject",)),
        "text-and-html": lambda: _with(R, text="", html=None),
        "address": lambda: _with(R, to=[{"name": "Ada"}]),
        "attachment-content": lambda: _with(R, attachments=[{"filename": "a.txt"}]),
    },
    "invalid_field": {
        "delivery_id-syntax": lambda: _with(R, delivery_id="-starts-with-dash"),
        "delivery_id-too-long": lambda: _with(R, delivery_id="d" * 129),
        "delivery_id-type": lambda: _with(R, delivery_id=42),
        "idempotency_key-over-200": lambda: _with(R, idempotency_key="k" * 201),
        "source-syntax": lambda: _with(R, source="Notification"),
        "to-empty": lambda: _with(R, to=[]),
        "cc-null": lambda: _with(R, cc=None),
        "payload_mode-null": lambda: _with(R, payload_mode=None),
        "template_id-syntax": lambda: _with(T, template_id="Notification"),
        "template_id-with-rendered": lambda: _with(R, template_id="notification"),
        "variables-with-rendered": lambda: _with(R, variables={"a": 1}),
        "subject-with-template": lambda: _with(T, subject="Hello"),
        "subject-too-long": lambda: _with(R, subject="s" * 999),
        "locale": lambda: _with(R, locale="english!"),
        "priority": lambda: _with(R, priority="urgent"),
        "send_at-without-offset": lambda: _with(R, send_at="2030-01-01T08:00:00"),
        "expires_at-not-after-send_at": lambda: _with(
            R, send_at="2030-01-01T08:00:00Z", expires_at="2030-01-01T09:00:00+01:00"
        ),
        "header-name": lambda: _with(R, headers={"List Id": "x"}),
        "header-twice": lambda: _with(R, headers={"List-Id": "a", "list-id": "b"}),
        "locale-trailing-newline": lambda: _with(R, locale="en\n"),
        "traceparent-trailing-newline": lambda: _with(
            R, traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n"
        ),
        "header-value-type": lambda: _with(R, headers={"List-Id": 5}),
        "traceparent": lambda: _with(R, traceparent="00-4BF92F35-00f067aa0ba902b7-01"),
        "nul": lambda: _with(R, text="a\x00b"),
        "lone-surrogate": lambda: _with(R, text="a\ud800b"),
        "name-too-long": lambda: _with(R, to=[{"address": "ada@example.com", "name": "n" * 201}]),
        "address-too-short": lambda: _with(R, to=["a@"]),
    },
    "unknown_field": {
        "top-level": lambda: _with(R, from_address="x@example.com"),
        "recipient": lambda: _with(R, to=[{"address": "ada@example.com", "email": "x"}]),
        "attachment": lambda: _with(R, attachments=[{**_file(1), "size": 1}]),
    },
    "unknown_payload_mode": {
        "string": lambda: _with(R, payload_mode="mjml"),
        "array": lambda: _with(R, payload_mode=["template"]),
    },
    "unknown_source": {"billing": lambda: _with(R, source="billing")},
    "unknown_template": {"invoice": lambda: _with(T, template_id="invoice")},
    "invalid_address": {
        "no-at": lambda: _with(R, to=["ada"]),
        "single-label-domain": lambda: _with(R, to=["ada@localhost"]),
        "quoted-local-part": lambda: _with(R, cc=['"ada lovelace"@example.com']),
        "local-part-over-64": lambda: _with(R, bcc=["a" * 65 + "@example.com"]),
        "idna-2008-disallowed": lambda: _with(R, to=["ada@a\u2488b.example"]),
        "underscore-label": lambda: _with(R, to=["ada@a_b.example"]),
        "bad-a-label": lambda: _with(R, to=["ada@xn--zz.example"]),
    },
    "header_injection": {
        "subject": lambda: _with(R, subject="Hi\r\nBcc: eve@example.net"),
        "address": lambda: _with(R, to=["ada@example.com\nBcc: eve@example.net"]),
        "name": lambda: _with(R, reply_to={"address": "a@example.com", "name": "A\r\nB: c"}),
        "header-value": lambda: _with(R, headers={"List-Id": "x\r\nBcc: eve@example.net"}),
        "filename": lambda: _with(R, attachments=[{**_file(1), "filename": "a\r\n.txt"}]),
        "delivery_id": lambda: _with(R, delivery_id="d-1\r\n"),
    },
    "header_not_allowed": {
        "x-mailer": lambda: _with(R, headers={"X-Mailer": "maildaemon"}),
        "reserved": lambda: _with(R, headers={"Subject": "x"}),
    },
    "too_large": {
        "command": lambda: _with(R, text="x" * POLICY.command_max_bytes),
        "header-value": lambda: _with(R, headers={"List-Id": "x" * 999}),
        "header-line": lambda: _with(R, headers={"List-Id": "x" * 995}),
    },
    "attachment_too_large": {
        "one": lambda: _with(R, attachments=[_file(MAX_ATTACHMENT + 1)]),
        "total": lambda: _with(R, attachments=[_file(MAX_ATTACHMENT)] * 2 + [_file(3)]),
    },
    "invalid_attachment": {
        "not-base64": lambda: _with(R, attachments=[{"filename": "a", "content": "no way!"}]),
        "base64-line-breaks": lambda: _with(R, attachments=[{**_file(90), "content": "eHh4\n"}]),
        "content-type-parameters": lambda: _with(
            R, attachments=[{**_file(1), "content_type": "text/plain; charset=utf-8"}]
        ),
        "path": lambda: _with(R, attachments=[{**_file(1), "filename": "../etc/passwd"}]),
        "multipart": lambda: _with(
            R, attachments=[{**_file(1), "content_type": "multipart/mixed"}]
        ),
        "blank-name": lambda: _with(R, attachments=[{**_file(1), "filename": "  "}]),
    },
    "too_many_recipients": {
        "101": lambda: _with(R, to=["a@example.com"] * 50, cc=["b@example.com"] * 51),
    },
    "too_deep": {
        "variables-9": lambda: _with(T, variables={**T["variables"], "x": _nest(9)}),
        "document-17": lambda: _with(R, extra=_nest(17)),
        "hundreds": lambda: _with(T, variables={**T["variables"], "x": _nest(400)}),
    },
    "too_many_variables": {
        "names": lambda: _with(T, variables={f"v{i}": i for i in range(65)} | T["variables"]),
        "values": lambda: _with(T, variables={**T["variables"], "x": list(range(5001))}),
    },
    "variables_too_large": {
        "chars": lambda: _with(T, variables={**T["variables"], "x": "x" * (256 * 1024 + 1)}),
        "name": lambda: _with(T, variables={**T["variables"], "n" * 129: 1}),
    },
    "too_many_attachments": {"21": lambda: _with(R, attachments=[_file(1)] * 21)},
    "missing_variable": {
        "body": lambda: _with(T, variables={"title": "Hello"}),
        "reset_url": lambda: _with(
            T, template_id="password_reset", variables={"expires_minutes": 30}
        ),
    },
    "invalid_link": {
        "javascript": lambda: _with(
            T,
            template_id="password_reset",
            variables={"expires_minutes": 30, "reset_url": "javascript:alert(1)"},
        ),
        "action_url-data": lambda: _with(
            T, variables={**T["variables"], "action_url": "data:text/html,x"}
        ),
        "space": lambda: _with(
            T, variables={**T["variables"], "action_url": "https://a.example/ x"}
        ),
        "userinfo-host": lambda: _with(
            T, variables={**T["variables"], "action_url": "https://app.example.com@evil.example/"}
        ),
        "userinfo-password": lambda: _with(
            T, variables={**T["variables"], "action_url": "https://user:pw@app.example.com/"}
        ),
        "userinfo-no-path": lambda: _with(
            T, variables={**T["variables"], "action_url": "http://a.example@evil.example"}
        ),
        "backslash-authority": lambda: _with(
            T, variables={**T["variables"], "action_url": "https://evil.example\\@a.example/"}
        ),
    },
}


def _nest(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("code", "make"),
    [
        pytest.param(code, make, id=f"{code}-{label}")
        for code, cases in TRIGGERS.items()
        for label, make in cases.items()
    ],
)
def test_failure_code(code: str, make: Maker) -> None:
    parsed = parse_command(make(), POLICY)
    assert isinstance(parsed, Rejection), parsed
    assert parsed.failure_code == code, parsed.failure_detail


def test_valid_bases_are_accepted() -> None:
    for doc in (RENDERED, TEMPLATE):
        assert isinstance(parse_command(json.dumps(doc), POLICY), DeliveryCommand)


@pytest.mark.parametrize(
    "url",
    [
        "https://a.example/u/@ada",
        "https://a.example?to=a@b.example",
        "http://a.example#x@y",
        "https://a.example:8443/p\\q@r",
    ],
)
def test_an_at_sign_after_the_host_is_a_valid_link(url: str) -> None:
    doc = _with(T, variables={**T["variables"], "action_url": url})
    assert isinstance(parse_command(doc, POLICY), DeliveryCommand)


def test_entry_without_command_field() -> None:
    parsed = parse_entry({b"payload": json.dumps(RENDERED).encode()}, POLICY)
    assert isinstance(parsed, Rejection)
    assert parsed.failure_code == "invalid_json"


def test_already_expired_command_is_accepted() -> None:
    # `already_expired` is not produced: the delivery expires at its first claim instead.
    raw = _with(R, send_at="2000-01-01T00:00:00Z", expires_at="2000-01-01T00:10:00Z")
    assert isinstance(parse_command(raw, POLICY), DeliveryCommand)


def test_rejection_carries_what_could_be_read() -> None:
    parsed = parse_command(_with(R, source="billing"), POLICY)
    assert isinstance(parsed, Rejection)
    assert (parsed.delivery_id, parsed.source) == ("notification-0001", "billing")


# --- (d) the JSON Schema and the model agree on shape ------------------------------------

SHAPE_INVALID = {
    "no-delivery_id": _with(R, drop=("delivery_id",)),
    "no-source": _with(R, drop=("source",)),
    "no-idempotency_key": _with(R, drop=("idempotency_key",)),
    "no-to": _with(R, drop=("to",)),
    "no-payload_mode": _with(R, drop=("payload_mode",)),
    "unknown-field": _with(R, bounce_to="x@example.com"),
    "unknown-recipient-field": _with(R, to=[{"address": "ada@example.com", "x": 1}]),
    "unknown-attachment-field": _with(R, attachments=[{**_file(1), "x": 1}]),
    "to-empty": _with(R, to=[]),
    "to-object": _with(R, to={"address": "ada@example.com"}),
    "cc-null": _with(R, cc=None),
    "reply_to-number": _with(R, reply_to=42),
    "payload_mode-other": _with(R, payload_mode="mjml"),
    "priority-other": _with(R, priority="urgent"),
    "delivery_id-129": _with(R, delivery_id="d" * 129),
    "delivery_id-number": _with(R, delivery_id=42),
    "subject-999": _with(R, subject="s" * 999),
    "name-201": _with(R, to=[{"address": "ada@example.com", "name": "n" * 201}]),
    "address-2": _with(R, to=[{"address": "a@"}]),
    "headers-number": _with(R, headers={"List-Id": 5}),
    "variables-array": _with(T, variables=[]),
    "attachment-no-content": _with(R, attachments=[{"filename": "a"}]),
    "attachment-empty-filename": _with(R, attachments=[{**_file(1), "filename": ""}]),
    "send_at-boolean": _with(R, send_at=True),
    "traceparent-number": _with(R, traceparent=1),
}
SHAPE_VALID = {
    **{name: json.dumps(command) for name, command in COMMAND_EXAMPLES},
    "rendered": json.dumps(RENDERED),
    "template": json.dumps(TEMPLATE),
    "explicit-nulls": _with(
        R,
        reply_to=None,
        template_id=None,
        locale=None,
        html=None,
        send_at=None,
        expires_at=None,
        traceparent=None,
        cc=[],
        bcc=[],
        headers={},
        attachments=[],
    ),
}


@pytest.mark.parametrize("raw", SHAPE_INVALID.values(), ids=SHAPE_INVALID.keys())
def test_schema_and_model_reject_the_same_shapes(raw: str) -> None:
    assert not SCHEMA_VALIDATOR.is_valid(json.loads(raw))
    parsed = parse_command(raw, POLICY)
    assert isinstance(parsed, Rejection)
    assert parsed.failure_code in SHAPE_CODES


@pytest.mark.parametrize("raw", SHAPE_VALID.values(), ids=SHAPE_VALID.keys())
def test_schema_and_model_accept_the_same_shapes(raw: str) -> None:
    SCHEMA_VALIDATOR.validate(json.loads(raw))
    assert isinstance(parse_command(raw, POLICY), DeliveryCommand)


SHAPE_GAPS = {
    # Once gaps between the JSON Schema and the model; they must stay closed.
    # A bare address string is a recipient for both.
    "recipient-string": _with(R, to=["ada@example.com"]),
    "reply_to-string": _with(R, reply_to="support@example.com"),
    # A Unix timestamp is refused by both: times are ISO-8601 strings.
    "send_at-number": _with(R, send_at=1906012800),
    "idempotency_key-150": _with(R, idempotency_key="k" * 150),
}


@pytest.mark.parametrize("raw", SHAPE_GAPS.values(), ids=SHAPE_GAPS.keys())
def test_former_gap_schema_and_model_agree(raw: str) -> None:
    schema_accepts = SCHEMA_VALIDATOR.is_valid(json.loads(raw))
    model_accepts = isinstance(parse_command(raw, POLICY), DeliveryCommand)
    assert schema_accepts == model_accepts


# --- (e) parse_command never raises -------------------------------------------------------


def _assert_storable(data: Any) -> None:
    """PostgreSQL text and jsonb take neither NUL nor unpaired surrogates, at any depth."""
    if isinstance(data, str):
        data.encode("utf-8")  # raises on an unpaired surrogate
        assert "\x00" not in data, "NUL character"
    elif isinstance(data, dict):
        for key, value in data.items():
            _assert_storable(key)
            _assert_storable(value)
    elif isinstance(data, list):
        for value in data:
            _assert_storable(value)


def _assert_result_is_sound(result: DeliveryCommand | Rejection) -> None:
    if isinstance(result, Rejection):
        assert result.failure_code in PARSE_CODES
        assert isinstance(result.failure_detail, str) and result.failure_detail
        _assert_storable(result.failure_detail)
        return
    assert isinstance(result, DeliveryCommand)
    canonical = result.canonical_json()
    canonical.encode("utf-8")
    assert json.loads(canonical) == result.model_dump(mode="json")
    _assert_storable(result.model_dump(mode="json"))
    assert len(result.fingerprint()) == 32
    # What the store keeps must validate again (compose.py re-validates it) to the same command.
    stored = result.model_dump(mode="json", exclude_defaults=True)
    assert DeliveryCommand.model_validate(stored).fingerprint() == result.fingerprint()


TIGHT = CommandPolicy(
    allowed_sources=POLICY.allowed_sources,
    allowed_headers=POLICY.allowed_headers,
    known_templates=POLICY.known_templates,
    attachment_max_bytes=8,
    attachments_total_max_bytes=12,
    max_recipients=2,
    command_max_bytes=4096,
)
HUGE = "x" * 300_000
# fmt: off
SPECIAL_STRINGS = [
    "", " ", "\x00", "a\x00b", "\ud800", "\udfff", "x\udc00y", "\ud83d\ude00", "\r\n", "\n",
    "Bcc: eve@example.net", "\u2028", "\ufeff", "\U0001f48c", "\\u0000", "\\ud800", HUGE,
    "ada@example.com", "a@b", "template", "rendered", "notification", "authsession",
    "signin_code", "critical", "List-Id", "2030-01-01T00:00:00Z", "2030-01-01T00:00:00",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "eHh4", "de_AT",
]
# fmt: on
FIELD_NAMES = sorted(
    set(DeliveryCommand.model_fields) | set(Recipient.model_fields) | set(Attachment.model_fields)
)
ANY_CHAR = st.characters(exclude_categories=())  # surrogates and control characters included
STRINGS = st.one_of(st.text(ANY_CHAR, max_size=30), st.sampled_from(SPECIAL_STRINGS))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    STRINGS,
    st.sampled_from([10**30, -(2**63), 1e308, 0.1]),
)
KEYS = st.one_of(st.sampled_from(FIELD_NAMES), STRINGS)
JSONISH = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(KEYS, kids, max_size=5),
    max_leaves=12,
)
VALID_DOCS = [RENDERED, TEMPLATE, *(command for _, command in COMMAND_EXAMPLES)]


BORROWABLE = sorted(
    {(k, json.dumps(v, sort_keys=True)) for doc in VALID_DOCS for k, v in doc.items()}
)


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A valid command with a few fields replaced, borrowed, removed or added, at any depth."""
    doc = copy.deepcopy(draw(st.sampled_from(VALID_DOCS)))
    for _ in range(draw(st.integers(0, 3))):
        mutation = draw(st.sampled_from(["borrow", "replace", "replace", "drop", "add"]))
        if mutation == "borrow":  # another example's value: mixes payload modes and limits
            key, value = draw(st.sampled_from(BORROWABLE))
            doc[key] = json.loads(value)
            continue
        target: dict[str, Any] = doc
        nested = [v for k in ("to", "attachments") if type(doc.get(k)) is list for v in doc[k]]
        nested += [doc[k] for k in ("headers", "variables", "reply_to") if k in doc]
        nested = [v for v in nested if type(v) is dict]
        if nested and draw(st.booleans()):
            target = draw(st.sampled_from(nested))
        if mutation == "drop" and target:
            del target[draw(st.sampled_from(sorted(target)))]
        elif mutation == "add":
            target[draw(KEYS)] = draw(JSONISH)
        else:
            target[draw(st.sampled_from(FIELD_NAMES))] = draw(JSONISH)
    return doc


def _encode(doc: Any, how: str) -> str | bytes:
    """JSON text as producers may send it (always valid Unicode / UTF-8)."""
    ascii_text = json.dumps(doc)
    if how == "ascii-str":
        return ascii_text
    if how == "ascii-bytes":
        return ascii_text.encode()
    text = json.dumps(doc, ensure_ascii=False)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only its escaped form is valid UTF-8
        return ascii_text
    return text if how == "utf8-str" else data


@st.composite
def raw_commands(draw: st.DrawFn) -> str | bytes:
    kinds = ["near-valid"] * 6 + ["jsonish", "text", "bytes", "broken-utf8"]
    kind = draw(st.sampled_from(kinds))
    if kind == "text":
        return draw(st.one_of(st.text(ANY_CHAR).filter(_is_unicode), st.sampled_from(RAW_JUNK)))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    doc = draw(near_valid()) if kind != "jsonish" else draw(JSONISH)
    how = draw(st.sampled_from(["ascii-str", "ascii-bytes", "utf8-str", "utf8-bytes"]))
    raw = _encode(doc, how)
    if kind == "broken-utf8":
        data = raw.encode() if isinstance(raw, str) else raw
        at = draw(st.integers(0, len(data)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\xf0\x28\x8c\xbc"]))
        return data[:at] + bad + data[at:]
    return raw


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# fmt: off
RAW_JUNK = [
    "", " ", "null", "[]", "{}", "0", "NaN", "-Infinity", '"\\ud800"', "\ufeff{}",
    '{"a": ' * 5000, "[" * 100_000, '{"variables": {"n": ' + "9" * 5000 + "}}",
    '{"delivery_id": "\\ud800", "source": "\\udfff"}', '{"text": "\\u0000"}',
    '{"delivery_id": "a", "delivery_id": "b"}', '{"to": "' + HUGE + '"}',
]
# fmt: on


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(raw=raw_commands(), policy=st.sampled_from([POLICY, TIGHT, None]))
@example(raw=b"\xef\xbb\xbf" + json.dumps(RENDERED).encode(), policy=POLICY)
@example(
    raw=_with(
        R,
        variables={"x": 1},
        payload_mode="template",
        template_id="notification",
        subject=None,
        text=None,
    ),
    policy=POLICY,
)
@example(raw=_with(T, variables={"nan": float("nan"), "inf": float("-inf")}), policy=POLICY)
@example(raw=_with(R, text="\ud83d\ude00 \\u0000 \\ud800"), policy=POLICY)
@example(raw=_with(R, to=[" Ada@Example.COM "], locale="de_AT"), policy=POLICY)
@example(  # pydantic refuses a surrogate in a key with a storable message
    raw=json.dumps({**RENDERED, "\ud800": 1}, ensure_ascii=False).encode("utf-8", "surrogatepass"),
    policy=POLICY,
)
def test_parse_command_never_raises(raw: str | bytes, policy: CommandPolicy | None) -> None:
    # Rejection.delivery_id / .source are not checked here: see test_known_bug_*.
    _assert_result_is_sound(parse_command(raw, policy))


# --- hostile text that PostgreSQL could not store ----------------------------------------

_CESU_TEXT = json.dumps({**RENDERED, "text": "x\ud800y"}, ensure_ascii=False)
_UTF16_NUL = json.dumps({**RENDERED, "text": "a\x00b"})
_UTF16_SURROGATE = json.dumps({**RENDERED, "text": "a\ud800b"})
UNSTORABLE = {
    # json.loads decodes bytes with errors="surrogatepass": UTF-8-encoded surrogates pass,
    # and the "\\ud" / "\\u0000" checks only look for escapes.
    "cesu8-surrogate-in-text": _CESU_TEXT.encode("utf-8", "surrogatepass"),
    "str-with-lone-surrogate": _CESU_TEXT,
    # json.loads also accepts UTF-16/32; the NUL/surrogate checks decode the raw as UTF-8.
    "utf16-nul": _UTF16_NUL.encode("utf-16"),
    "utf32-nul": _UTF16_NUL.encode("utf-32"),
    "utf16-surrogate": _UTF16_SURROGATE.encode("utf-16-le"),
    # _peek copies delivery_id / source into the Rejection without removing surrogates.
    "escaped-surrogate-delivery_id": json.dumps({**RENDERED, "delivery_id": "\ud800"}),
    "escaped-surrogate-source": json.dumps({**RENDERED, "source": "x\udfff"}),
}


@pytest.mark.parametrize("raw", UNSTORABLE.values(), ids=UNSTORABLE.keys())
def test_unstorable_text_is_rejected_cleanly(raw: str | bytes) -> None:
    result = parse_command(raw, POLICY)
    _assert_result_is_sound(result)
    if isinstance(result, Rejection):
        _assert_storable(result.delivery_id)
        _assert_storable(result.source)


def test_literal_backslash_u0000_is_accepted() -> None:
    # A text about JSON escapes, e.g. "write NUL as \u0000", holds no NUL at all.
    raw = _with(R, text="write NUL as \\u0000")
    assert isinstance(parse_command(raw, POLICY), DeliveryCommand)
