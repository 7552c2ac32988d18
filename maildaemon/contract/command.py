"""The delivery command contract: what producers put on the stream, and its validation.

The same pydantic model validates stream entries in the consumer, commands given to
``maildaemon enqueue``, and produces the published JSON Schema. The AsyncAPI document in
``docs/api/delivery-commands-asyncapi.yaml`` describes the same fields in prose.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import asdict, dataclass
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
from pydantic_core import PydanticCustomError

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
    "already_expired",
    "idempotency_conflict",
    "delivery_id_conflict",
)

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}$")
_SOURCE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_LOCALE = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$")
_TEMPLATE_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,127}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 ftext
_CONTENT_TYPE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)
# A pragmatic RFC 5321 mailbox: dot-atom local part, a domain of at least two labels
# (IDN domains allowed, they are IDNA-encoded on the wire).
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"(?:[A-Za-z0-9\u00a1-\uffff](?:[A-Za-z0-9\u00a1-\uffff-]{0,61}[A-Za-z0-9\u00a1-\uffff])?)"
_ADDRESS = re.compile(rf"^{_LOCAL}@{_LABEL}(?:\.{_LABEL})+$")
_CRLF = re.compile(r"[\r\n\x00]")
_KEY = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")


def _custom(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, message)


def _no_crlf(value: str, what: str) -> str:
    if _CRLF.search(value):
        raise _custom("header_injection", f"{what} must not contain CR, LF or NUL")
    return value


@dataclass(frozen=True)
class CommandPolicy:
    """What the running daemon accepts, beyond the shape of the command."""

    allowed_sources: frozenset[str]
    allowed_headers: frozenset[str]  # lower-cased
    known_templates: frozenset[str]
    attachment_max_bytes: int
    attachments_total_max_bytes: int
    max_recipients: int
    command_max_bytes: int

    def fingerprint(self) -> str:
        """sha256 over every field: two policies with one fingerprint judge alike."""
        values = {
            name: sorted(value) if isinstance(value, frozenset) else value
            for name, value in sorted(asdict(self).items())
        }
        text = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()


class Recipient(BaseModel):
    """A mailbox: an address and an optional display name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: Annotated[str, Field(min_length=3, max_length=254)]
    name: Annotated[str | None, Field(max_length=200)] = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"address": value}
        return value

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if _CRLF.search(value):
            raise _custom("header_injection", "address must not contain CR, LF or NUL")
        local, _, domain = value.rpartition("@")
        if not _ADDRESS.match(value) or len(local) > 64:
            raise _custom("invalid_address", f"not a valid e-mail address: {value!r}")
        try:
            domain.encode("idna")
        except UnicodeError:
            raise _custom("invalid_address", f"not a valid domain: {domain!r}") from None
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else _no_crlf(value, "display name")


class Attachment(BaseModel):
    """A file attached to the message; ``content`` is base64."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    filename: Annotated[str, Field(min_length=1, max_length=255)]
    content_type: Annotated[str, Field(min_length=3, max_length=255)] = "application/octet-stream"
    content: str

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str) -> str:
        _no_crlf(value, "attachment filename")
        if "/" in value or "\\" in value:
            raise _custom("invalid_attachment", "attachment filename must not contain a path")
        return value

    @field_validator("content_type")
    @classmethod
    def _content_type(cls, value: str) -> str:
        if not _CONTENT_TYPE.match(value):
            raise _custom("invalid_attachment", f"not a MIME type: {value!r}")
        return value.lower()

    @field_validator("content")
    @classmethod
    def _content(cls, value: str, info: ValidationInfo) -> str:
        try:
            size = len(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise _custom("invalid_attachment", "attachment content is not valid base64") from None
        policy = _policy(info)
        if policy is not None and size > policy.attachment_max_bytes:
            raise _custom(
                "attachment_too_large",
                f"attachment is {size} bytes, the limit is {policy.attachment_max_bytes}",
            )
        return value

    def decoded(self) -> bytes:
        return base64.b64decode(self.content)


def _policy(info: ValidationInfo) -> CommandPolicy | None:
    context = info.context
    if isinstance(context, CommandPolicy):
        return context
    return None


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
    variables: dict[str, Any] = Field(default_factory=dict)
    subject: Annotated[str | None, Field(max_length=998)] = None
    text: str | None = None
    html: str | None = None
    priority: Literal["critical", "high", "normal", "low"] = "normal"
    send_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    attachments: list[Attachment] = Field(default_factory=list)
    traceparent: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _payload_mode_known(cls, value: Any) -> Any:
        if isinstance(value, dict):
            mode = value.get("payload_mode")
            if mode is not None and mode not in ("template", "rendered"):
                raise _custom(
                    "unknown_payload_mode",
                    f"payload_mode must be 'template' or 'rendered', not {mode!r}",
                )
        return value

    @field_validator("idempotency_key")
    @classmethod
    def _key(cls, value: str) -> str:
        _no_crlf(value, "idempotency_key")
        if not _KEY.match(value):
            raise _custom("invalid_field", "must be 1-200 printable characters")
        return value

    @field_validator("send_at", "expires_at", mode="before")
    @classmethod
    def _timestamp_text(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise _custom("invalid_field", "must be an ISO-8601 date-time string with a zone")
        return value

    @field_validator("delivery_id")
    @classmethod
    def _identifier(cls, value: str) -> str:
        _no_crlf(value, "identifier")
        if not _ID.match(value):
            raise _custom(
                "invalid_field",
                "must be 1-128 characters of letters, digits and ._:@/+=- "
                "starting with a letter or digit",
            )
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str, info: ValidationInfo) -> str:
        if not _SOURCE.match(value):
            raise _custom("invalid_field", "source must be lower-case letters, digits and _.-")
        policy = _policy(info)
        if policy is not None and value not in policy.allowed_sources:
            raise _custom("unknown_source", f"source {value!r} is not one of the allowed sources")
        return value

    @field_validator("locale")
    @classmethod
    def _locale(cls, value: str | None) -> str | None:
        if value is not None and not _LOCALE.match(value):
            raise _custom("invalid_field", f"not a locale tag: {value!r}")
        return None if value is None else value.replace("_", "-")

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        return None if value is None else _no_crlf(value, "subject")

    @field_validator("traceparent")
    @classmethod
    def _traceparent(cls, value: str | None) -> str | None:
        if value is not None and not _TRACEPARENT.match(value):
            raise _custom("invalid_field", "traceparent must be a W3C trace context header")
        return value

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        policy = _policy(info)
        for name, content in value.items():
            _no_crlf(name, f"header name {name!r}")
            _no_crlf(content, f"header {name!r}")
            if not _HEADER_NAME.match(name):
                raise _custom("invalid_field", f"not a header name: {name!r}")
            if policy is not None and name.lower() not in policy.allowed_headers:
                raise _custom("header_not_allowed", f"header {name!r} is not on the allow-list")
            if len(content) > 998:
                raise _custom("too_large", f"header {name!r} is longer than 998 characters")
        return value

    @model_validator(mode="after")
    def _whole(self, info: ValidationInfo) -> DeliveryCommand:
        policy = _policy(info)
        if self.payload_mode == "template":
            if not self.template_id:
                raise _custom("missing_field", "template_id is required when payload_mode=template")
            if not _TEMPLATE_ID.match(self.template_id):
                raise _custom("invalid_field", f"not a template id: {self.template_id!r}")
            if policy is not None and self.template_id not in policy.known_templates:
                raise _custom(
                    "unknown_template", f"no template {self.template_id!r} in the catalog"
                )
            if self.subject is not None or self.text is not None or self.html is not None:
                raise _custom("invalid_field", "subject/text/html belong to payload_mode=rendered")
        else:
            if self.template_id is not None or self.variables:
                raise _custom(
                    "invalid_field", "template_id/variables belong to payload_mode=template"
                )
            if not self.subject:
                raise _custom("missing_field", "subject is required when payload_mode=rendered")
            if not self.text and not self.html:
                raise _custom(
                    "missing_field", "text or html is required when payload_mode=rendered"
                )
        if policy is not None:
            count = len(self.to) + len(self.cc) + len(self.bcc)
            if count > policy.max_recipients:
                raise _custom(
                    "too_many_recipients",
                    f"{count} recipients, the limit is {policy.max_recipients}",
                )
            total = sum(len(a.content) * 3 // 4 for a in self.attachments)
            if total > policy.attachments_total_max_bytes:
                raise _custom(
                    "attachment_too_large",
                    f"attachments total about {total} bytes, "
                    f"the limit is {policy.attachments_total_max_bytes}",
                )
        if self.send_at and self.expires_at and self.expires_at <= self.send_at:
            raise _custom("invalid_field", "expires_at must be later than send_at")
        return self

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
