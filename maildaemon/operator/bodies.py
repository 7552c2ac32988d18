"""Operator action bodies: strict JSON objects, validated exactly as the OpenAPI document says.

Unknown fields, wrong JSON types and out-of-range values are refused with ``InvalidInput``
naming the field; JSON Schema's integral numbers (``5.0``) count as integers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)

from maildaemon.addresses import domain_key
from maildaemon.contract.command import FAILURE_CODES
from maildaemon.errors import InvalidInput
from maildaemon.operator.inputs import (
    ACTOR,
    ADDRESS,
    DOMAIN,
    FREE_TEXT,
    SOURCE,
    TIME_SCHEMA,
    email_address,
    parse_time,
)


def _rfc3339(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return parse_time(value, "date-time")
        except InvalidInput as exc:
            raise ValueError(str(exc).split(": ", 1)[-1]) from None
    return value


def _address(value: str) -> str:
    try:
        return email_address(value)
    except InvalidInput as exc:
        raise ValueError(str(exc).split(": ", 1)[-1]) from None


def _integral(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer; so do we."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


Time = Annotated[datetime, BeforeValidator(_rfc3339), WithJsonSchema(TIME_SCHEMA)]
Actor = Annotated[
    str,
    Field(
        min_length=1,
        max_length=200,
        pattern=ACTOR,
        description="A note on who acts (default: the X-Operator header), kept in the "
        "audit detail as `actor_note`. The recorded actor is the identity of the token used.",
    ),
]
Reason = Annotated[
    str, Field(max_length=2000, pattern=FREE_TEXT, description="Why; kept in the audit trail.")
]
Source = Annotated[str, Field(min_length=1, max_length=64, pattern=SOURCE)]
Address = Annotated[
    str, Field(min_length=3, max_length=254, pattern=ADDRESS), AfterValidator(_address)
]


class Body(BaseModel):
    """Every action body: who acts and why (both optional)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    actor: Actor | None = None
    reason: Reason | None = None


DryRun = Annotated[bool, Field(description="Judge and report what would happen; write nothing.")]


class DeliveryActionBody(Body):
    """Requeue or cancel one delivery."""

    dry_run: DryRun = False


class ReviewBody(Body):
    """Mark a dead letter reviewed (the note stays on it; the reason goes to the audit)."""

    note: Annotated[str, Field(min_length=1, max_length=2000, pattern=FREE_TEXT)]


class BulkRequeueBody(Body):
    """Requeue the dead letters that match every filter given."""

    source: Source | None = None
    recipient_domain: (
        Annotated[
            str, Field(min_length=1, max_length=253, pattern=DOMAIN), AfterValidator(domain_key)
        ]
        | None
    ) = None
    reply_code: Annotated[int, Field(ge=200, le=599), BeforeValidator(_integral)] | None = None
    reply_class: Literal["2xx", "3xx", "4xx", "5xx"] | None = None
    created_after: Time | None = None
    created_before: Time | None = None
    dry_run: DryRun = False
    rate_per_second: Annotated[float, Field(ge=0.001, le=100_000)] | None = Field(
        default=None,
        description="Release the requeued deliveries at this rate (default: all due now).",
    )
    limit: Annotated[int, Field(ge=1, le=10_000), BeforeValidator(_integral)] = 1000


class ReplayBody(Body):
    """Replay one malformed command."""

    dry_run: DryRun = False


class BulkReplayBody(Body):
    """Replay the malformed commands with this failure code."""

    failure_code: Literal[FAILURE_CODES]  # type: ignore[valid-type]
    source: (
        Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00]{1,200}$")] | None
    ) = None
    dry_run: DryRun = False
    limit: Annotated[int, Field(ge=1, le=1000), BeforeValidator(_integral)] = 100


class PauseBody(Body):
    """Pause or resume sending, for one source or (without ``source``) for all."""

    source: Source | None = None


class SuppressionAddBody(Body):
    """Put an address on the suppression list (``reason`` is the suppression's reason)."""

    address: Address
    expires_at: Time | None = None


class SuppressionRemoveBody(Body):
    """Take an address off the suppression list."""

    address: Address


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], raw: bytes) -> M:
    """Validate a JSON body; an empty body is ``{}``."""
    if not raw.strip():
        raw = b"{}"
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = [str(part) for part in err["loc"]]
        if err["type"] == "json_invalid":
            raise InvalidInput(
                f"body: not a JSON document: {err['msg']}"[:300], field="body"
            ) from None
        if err["type"] in ("model_type", "model_attributes_type") or not loc:
            raise InvalidInput("body: must be a JSON object", field="body") from None
        name = loc[0]
        message = (
            "unknown field"
            if err["type"] == "extra_forbidden"
            else "field required"
            if err["type"] == "missing"
            else str(err["msg"]).removeprefix("Value error, ")
        )
        raise InvalidInput(f"{name}: {message}"[:300], field=name) from None
