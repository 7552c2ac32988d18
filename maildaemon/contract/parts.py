"""The parts of a delivery command: recipients, attachments, and the daemon's policy.

Validation errors carry the contract's failure codes (PydanticCustomError types).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from maildaemon.addresses import AddressError, canonical_address

_CRLF = re.compile(r"[\r\n\x00]")
_CONTENT_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)


def custom_error(code: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(code, message)


def no_crlf(value: str, what: str) -> str:
    if _CRLF.search(value):
        raise custom_error("header_injection", f"{what} must not contain CR, LF or NUL")
    return value


# What a template needs from a command: (variables it requires, link variables it uses),
# for a template id and the command's locale (see message.render.TemplateCatalog).
TemplateNeeds = Callable[[str, str | None], tuple[frozenset[str], frozenset[str]]]


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
    template_needs: TemplateNeeds | None = None

    def fingerprint(self) -> str:
        """sha256 over every field: two policies with one fingerprint judge alike.

        ``template_needs`` is left out: it is the catalog's knowledge, which the catalog
        hash covers (and a bound method prints differently in every process).
        """
        values = {}
        for field in fields(self):
            if field.name != "template_needs":  # not asdict(): it would deep-copy the catalog
                value = getattr(self, field.name)
                values[field.name] = sorted(value) if isinstance(value, frozenset) else value
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
            raise custom_error("header_injection", "address must not contain CR, LF or NUL")
        try:
            return canonical_address(value)
        except AddressError as exc:
            raise custom_error("invalid_address", str(exc)) from None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else no_crlf(value, "display name")


class Attachment(BaseModel):
    """A file attached to the message; ``content`` is base64."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    filename: Annotated[str, Field(min_length=1, max_length=255)]
    content_type: Annotated[str, Field(min_length=3, max_length=255)] = "application/octet-stream"
    content: str

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str) -> str:
        no_crlf(value, "attachment filename")
        if "/" in value or "\\" in value:
            raise custom_error("invalid_attachment", "attachment filename must not contain a path")
        if not value.strip():
            raise custom_error("invalid_attachment", "attachment filename must not be blank")
        return value

    @field_validator("content_type")
    @classmethod
    def _content_type(cls, value: str) -> str:
        if not _CONTENT_TYPE.fullmatch(value):
            raise custom_error("invalid_attachment", f"not a MIME type: {value!r}")
        if value.lower().startswith(("multipart/", "message/")):
            raise custom_error(
                "invalid_attachment", f"{value!r} cannot be attached as base64 (RFC 2046)"
            )
        return value.lower()

    @field_validator("content")
    @classmethod
    def _content(cls, value: str, info: ValidationInfo) -> str:
        try:
            size = len(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise custom_error(
                "invalid_attachment", "attachment content is not valid base64"
            ) from None
        policy = policy_of(info)
        if policy is not None and size > policy.attachment_max_bytes:
            raise custom_error(
                "attachment_too_large",
                f"attachment is {size} bytes, the limit is {policy.attachment_max_bytes}",
            )
        return value

    def decoded(self) -> bytes:
        return base64.b64decode(self.content)


def policy_of(info: ValidationInfo) -> CommandPolicy | None:
    context = info.context
    if isinstance(context, CommandPolicy):
        return context
    return None
