"""The webhooks' settings (``MAIL_WEBHOOK_*``): safety, timeouts, caps, the retry schedule.
``Settings`` inherits them."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from maildaemon.config_values import CsvList, Duration, Ladder

# seconds, then minutes, then hours: 15 attempts over about 3.2 days
DEFAULT_WEBHOOK_LADDER = (
    5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
    43200.0, 43200.0, 43200.0, 43200.0, 43200.0,
)  # fmt: skip


class WebhookSettings(BaseSettings):
    # Plain http:// endpoints are refused unless this says yes.
    webhook_allow_http: bool = False
    # CIDR ranges allowed although loopback, link-local or a metadata address (refused
    # otherwise, when the endpoint is added and at every connect).
    webhook_allowed_networks: CsvList = ()
    webhook_connect_timeout: Duration = 5.0
    webhook_timeout: Duration = 15.0  # one attempt, connect to the end of the answer
    webhook_concurrency: int = Field(default=4, ge=1, le=256)  # in flight per endpoint
    webhook_batch_size: int = Field(default=100, ge=1, le=5000)  # claimed per pass
    webhook_poll_interval: Duration = 1.0
    webhook_retry_ladder: Ladder = DEFAULT_WEBHOOK_LADDER
    webhook_retry_jitter: float = Field(default=0.2, ge=0.0, lt=1.0)
    # How long the previous secret signs too after a rotation.
    webhook_secret_grace: Duration = 86400.0
    # CA bundle for https endpoints with a private CA (default: the system store).
    webhook_ca_file: Path | None = None
    webhook_response_max_bytes: int = Field(default=4096, ge=0, le=1024 * 1024)

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for net in value:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad one
        return value

    @property
    def webhook_lease(self) -> float:
        """A claim outlives its attempt's longest run."""
        return self.webhook_timeout * 2 + 10.0
