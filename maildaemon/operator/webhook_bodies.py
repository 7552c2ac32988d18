"""The webhook actions' request bodies (strict, as the OpenAPI document says)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, ConfigDict, Field

from maildaemon.operator.bodies import Body, DryRun, Source, Time, _integral
from maildaemon.operator.webhooks import EVENT_NAMES
from maildaemon.webhooks.targets import MAX_URL

# What the API takes as a URL; whether the daemon may send there (https unless
# MAIL_WEBHOOK_ALLOW_HTTP, where the host resolves to) is judged on add: 409 when refused.
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
URL_PATTERN = r"^https?://[A-Za-z0-9]([A-Za-z0-9-]{0,62}\.?){0,40}(:" + _PORT + r")?(/[!-\"$-~]*)?$"
EventName = Annotated[str, Field(pattern="^(" + "|".join(EVENT_NAMES) + ")$")]


class WebhookAddBody(Body):
    """Add an endpoint; the answer shows its signing secret, once."""

    url: Annotated[str, Field(min_length=8, max_length=MAX_URL, pattern=URL_PATTERN)]
    events: Annotated[list[EventName], Field(max_length=len(EVENT_NAMES))] | None = None
    source: Source | None = None


class WebhookActionBody(Body):
    """Disable, enable, remove, rotate the secret of, or ping one endpoint."""


class WebhookReplayBody(Body):
    """Queue one event (``event_id``) or a time range again for the endpoint (both: the
    event if it is in the range)."""

    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                for name in ("event_id", "after", "before")
            ]
        }
    )

    event_id: Annotated[int, Field(ge=1, le=2**63 - 1), BeforeValidator(_integral)] | None = None
    after: Time | None = None
    before: Time | None = None
    dry_run: DryRun = False
