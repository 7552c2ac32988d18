"""The delivery command contract: what producers put on the stream, and its validation.

The same pydantic model validates stream entries in the consumer, commands given to
``maildaemon enqueue``, and produces the published JSON Schema. The AsyncAPI document in
``docs/api/delivery-commands-asyncapi.yaml`` describes the same fields in prose.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from maildaemon.contract import limits
from maildaemon.contract.parts import (
    Attachment,
    CommandPolicy,
    Recipient,
    TemplateNeeds,
    custom_error,
    no_crlf,
    policy_of,
)

__all__ = ["Attachment", "CommandPolicy", "DeliveryCommand", "Recipient", "Rejection"]

# Stream entry field that carries the command as a JSON document.
COMMAND_FIELD = "command"

PRIORITIES: dict[str, int] = {"critical": 0, "high": 1, "normal": 2, "low": 3}

# Failure codes a rejected command can carry (documented in the AsyncAPI document).
FAILURE_CODES = (
    "invalid_json",
    "missing_field",
    "invalid_field",
    "unknown_field",
    "unknown_payload_mode",
    "unknown_source",
    "unknown_template",
    "invalid_address",
    "header_injection",
    "header_not_allowed",
    "too_large",
    "attachment_too_large",
    "invalid_attachment",
    "too_many_recipients",
    "too_deep",
    "too_many_variables",
    "variables_too_large",
    "too_many_attachments",
    "missing_variable",
    "invalid_link",
    "intake_error",
    "already_expired",
    "idempotency_conflict",
    "delivery_id_conflict",
)

# Every pattern is applied with fullmatch (a "$" would let a trailing newline through).
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}")
_SOURCE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8}){0,4}")
_TEMPLATE_ID = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext
_KEY = re.compile(r"[^\x00-\x1f\x7f]{1,200}")
_INSTANT = (
    "An RFC 3339 date-time with a UTC offset, between "
    f"{limits.INSTANT_MIN:%Y-%m-%dT%H:%M:%SZ} and {limits.INSTANT_MAX:%Y-%m-%dT%H:%M:%SZ} "
    "once turned into UTC."
)


class DeliveryCommand(BaseModel):
    """One e-mail to deliver, as a producer describes it."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="DeliveryCommand")

    delivery_id: Annotated[str, Field(min_length=1, max_length=128)]
    source: Annotated[str, Field(min_length=1, max_length=64)]
    idempotency_key: Annotated[str, Field(min_length=1, max_length=200)]
    to: Annotated[list[Recipient], Field(min_length=1)]
    cc: list[Recipient] = Field(default_factory=list)
    bcc: list[Recipient] = Field(default_factory=list)
    reply_to: Recipient | None = None
    payload_mode: Literal["template", "rendered"]
    template_id: str | None = None
    locale: str | None = None
    variables: Annotated[
        dict[str, Any],
        Field(
            max_length=limits.VARIABLES_MAX_COUNT,
            description=(
                f"Template variables: at most {limits.VARIABLES_MAX_COUNT} names of at most "
                f"{limits.VARIABLE_NAME_MAX_CHARS} characters, {limits.VARIABLES_MAX_VALUES} "
                f"values in all, containers nested at most {limits.VARIABLES_MAX_DEPTH} deep, "
                f"{limits.VARIABLES_MAX_CHARS} characters of keys and strings in all. "
                f"Variables named *{limits.LINK_SUFFIX} are links: absolute http(s) URLs "
                "without user@ before the host."
            ),
        ),
    ] = Field(default_factory=dict)
    subject: Annotated[str | None, Field(max_length=998)] = None
    text: str | None = None
    html: str | None = None
    priority: Literal["critical", "high", "normal", "low"] = "normal"
    send_at: Annotated[AwareDatetime | None, Field(description=_INSTANT)] = None
    expires_at: Annotated[AwareDatetime | None, Field(description=_INSTANT)] = None
    headers: dict[str, str] = Field(default_factory=dict)
    attachments: Annotated[list[Attachment], Field(max_length=limits.ATTACHMENTS_MAX_COUNT)] = (
        Field(default_factory=list)
    )
    traceparent: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _payload_mode_known(cls, value: Any) -> Any:
        if isinstance(value, dict):
            mode = value.get("payload_mode")
            if mode is not None and mode not in ("template", "rendered"):
                raise custom_error(
                    "unknown_payload_mode",
                    f"payload_mode must be 'template' or 'rendered', not {mode!r}",
                )
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, value: str) -> str:
        no_crlf(value, "idempotency_key")
        if not _KEY.fullmatch(value):
            raise custom_error("invalid_field", "must be 1-200 printable characters")
        return value

    @field_validator("send_at", "expires_at", mode="before")
    @classmethod
    def _timestamp_text(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise custom_error("invalid_field", "must be an ISO-8601 date-time string with a zone")
        return value

    @field_validator("send_at", "expires_at")
    @classmethod
    def _instant_in_range(cls, value: datetime | None) -> datetime | None:
        if value is not None:
            try:
                limits.check_instant(value)
            except limits.LimitExceeded as exc:
                raise custom_error(exc.code, str(exc)) from None
        return value

    @field_validator("delivery_id")
    @classmethod
    def _identifier(cls, value: str) -> str:
        no_crlf(value, "identifier")
        if not _ID.fullmatch(value):
            raise custom_error(
                "invalid_field",
                "must be 1-128 characters of letters, digits and ._:@/+=- "
                "starting with a letter or digit",
            )
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str, info: ValidationInfo) -> str:
        if not _SOURCE.fullmatch(value):
            raise custom_error("invalid_field", "source must be lower-case letters, digits and _.-")
        policy = policy_of(info)
        if policy is not None and value not in policy.allowed_sources:
            raise custom_error(
                "unknown_source", f"source {value!r} is not one of the allowed sources"
            )
        return value

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str | None) -> str | None:
        if value is not None and not _LOCALE.fullmatch(value):
            raise custom_error("invalid_field", f"not a locale tag: {value!r}")
        return None if value is None else value.replace("_", "-")

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        return None if value is None else no_crlf(value, "subject")

    @field_validator("traceparent")
    @classmethod
    def _traceparent(cls, value: str | None) -> str | None:
        if value is not None and not _TRACEPARENT.fullmatch(value):
            raise custom_error("invalid_field", "traceparent must be a W3C trace context header")
        return value

    @field_validator("variables", mode="before")
    @classmethod
    def _variables_bounded(cls, value: Any) -> Any:
        try:
            limits.check_variables(value)
        except limits.LimitExceeded as exc:
            raise custom_error(exc.code, str(exc)) from None
        return value

    @field_validator("attachments", mode="before")
    @classmethod
    def _attachments_counted(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > limits.ATTACHMENTS_MAX_COUNT:
            raise custom_error(
                "too_many_attachments",
                f"{len(value)} attachments, the limit is {limits.ATTACHMENTS_MAX_COUNT}",
            )
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        policy = policy_of(info)
        seen: set[str] = set()
        for name, content in value.items():
            no_crlf(name, f"header name {name!r}")
            no_crlf(content, f"header {name!r}")
            if not _HEADER_NAME.fullmatch(name):
                raise custom_error("invalid_field", f"not a header name: {name!r}")
            lowered = name.lower()
            if lowered in limits.RESERVED_HEADERS:
                raise custom_error("header_not_allowed", f"header {name!r} is set by the daemon")
            if policy is not None and lowered not in policy.allowed_headers:
                raise custom_error(
                    "header_not_allowed", f"header {name!r} is not on the allow-list"
                )
            if lowered in seen:
                raise custom_error(
                    "invalid_field", f"header {name!r} is given twice (names ignore case)"
                )
            seen.add(lowered)
            if len(name) + 2 + len(content.strip()) > limits.HEADER_LINE_MAX:
                raise custom_error(
                    "too_large",
                    f"header {name!r}: the line 'name: value' is longer than "
                    f"{limits.HEADER_LINE_MAX} characters",
                )
        return value

    @model_validator(mode="after")
    def _whole(self, info: ValidationInfo) -> DeliveryCommand:
        policy = policy_of(info)
        if self.payload_mode == "template":
            if not self.template_id:
                raise custom_error(
                    "missing_field", "template_id is required when payload_mode=template"
                )
            if not _TEMPLATE_ID.fullmatch(self.template_id):
                raise custom_error("invalid_field", f"not a template id: {self.template_id!r}")
            if policy is not None and self.template_id not in policy.known_templates:
                raise custom_error(
                    "unknown_template", f"no template {self.template_id!r} in the catalog"
                )
            if self.subject is not None or self.text is not None or self.html is not None:
                raise custom_error(
                    "invalid_field", "subject/text/html belong to payload_mode=rendered"
                )
            if policy is not None and policy.template_needs is not None:
                self._template_needs_met(policy.template_needs)
        else:
            if self.template_id is not None or self.variables:
                raise custom_error(
                    "invalid_field", "template_id/variables belong to payload_mode=template"
                )
            if not self.subject:
                raise custom_error(
                    "missing_field", "subject is required when payload_mode=rendered"
                )
            if not self.text and not self.html:
                raise custom_error(
                    "missing_field", "text or html is required when payload_mode=rendered"
                )
        if policy is not None:
            count = len(self.to) + len(self.cc) + len(self.bcc)
            if count > policy.max_recipients:
                raise custom_error(
                    "too_many_recipients",
                    f"{count} recipients, the limit is {policy.max_recipients}",
                )
            total = sum(len(a.content) * 3 // 4 for a in self.attachments)
            if total > policy.attachments_total_max_bytes:
                raise custom_error(
                    "attachment_too_large",
                    f"attachments total about {total} bytes, "
                    f"the limit is {policy.attachments_total_max_bytes}",
                )
        if self.send_at and self.expires_at and self.expires_at <= self.send_at:
            raise custom_error("invalid_field", "expires_at must be later than send_at")
        return self

    def _template_needs_met(self, needs: TemplateNeeds) -> None:
        assert self.template_id is not None
        required, links = needs(self.template_id, self.locale)
        missing = sorted(required.difference(self.variables))
        if missing:
            raise custom_error(
                "missing_variable",
                f"template {self.template_id!r} needs variable(s) {', '.join(missing)}",
            )
        for name in sorted(links.intersection(self.variables)):
            try:
                limits.check_link(name, self.variables[name])
            except limits.LimitExceeded as exc:
                raise custom_error(exc.code, str(exc)) from None

    # Derived views ---------------------------------------------------------------

    @property
    def priority_rank(self) -> int:
        return PRIORITIES[self.priority]

    def envelope_recipients(self) -> list[str]:
        """Every address the message goes to, each once, in order (to, cc, bcc)."""
        seen: dict[str, None] = {}
        for rcpt in (*self.to, *self.cc, *self.bcc):
            seen.setdefault(rcpt.address, None)
        return list(seen)

    def canonical_json(self) -> str:
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )

    def fingerprint(self) -> bytes:
        """Identity of the command for idempotency: everything but trace context."""
        body = self.model_dump(mode="json", exclude={"traceparent"})
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).digest()


def json_schema() -> dict[str, Any]:
    """The JSON Schema producers can validate against before sending."""
    schema = DeliveryCommand.model_json_schema()
    # A recipient may also be given as a bare address string (the model accepts both).
    schema["$defs"]["Recipient"] = {
        "anyOf": [
            {"type": "string", "minLength": 3, "maxLength": 254, "description": "an address"},
            {**schema["$defs"]["Recipient"], "title": "RecipientObject"},
        ],
        "title": "Recipient",
    }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://maildaemon.invalid/schemas/delivery-command.json"
    schema["description"] = (
        "A delivery command: the JSON document carried in the `command` field of an entry "
        "on the maildaemon command stream."
    )
    return schema


@dataclass(frozen=True)
class Rejection:
    """Why a stream entry is not a delivery."""

    failure_code: str
    failure_detail: str
    delivery_id: str | None = None
    source: str | None = None
