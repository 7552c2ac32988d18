"""The bounce loop's settings: the signed envelope sender (``MAIL_BOUNCE_DOMAIN``,
``MAIL_BOUNCE_SECRET``) and the report listener. ``Settings`` inherits them."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings

from maildaemon.config_values import Duration, split_host_port


class BounceSettings(BaseSettings):
    # Both set: each delivery's envelope sender is <local>+<token>@<domain>, a token
    # signed with the secret, and each message carries it in X-Maildaemon-Ref.
    bounce_domain: str | None = None
    bounce_secret: SecretStr | None = None
    bounce_local_part: str = Field(default="bounces", pattern=r"^[a-z0-9][a-z0-9.-]{0,15}$")
    # The built-in report listener (SMTP, host:port); off when unset.
    bounce_listen_addr: str | None = None
    bounce_tls_cert_file: Path | None = None
    bounce_tls_key_file: Path | None = None
    # A report larger than this is refused (552) by the listener; `bounces ingest` keeps
    # its first bytes, marked truncated. Raw reports are kept this long.
    bounce_max_bytes: int = Field(default=1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    bounce_max_connections: int = Field(default=64, ge=1, le=10_000)
    bounce_session_timeout: Duration = 60.0
    bounce_report_retention: Duration = 30 * 86400.0

    @property
    def bounce_host_port(self) -> tuple[str, int] | None:
        """The report listener's address, or None when it is off."""
        if self.bounce_listen_addr is None:
            return None
        return split_host_port(self.bounce_listen_addr, 25)

    @field_validator("bounce_domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower().rstrip(".")
        if not value or "@" in value or " " in value:
            raise ValueError("must be a domain name, like bounces.example.com")
        return value

    @model_validator(mode="after")
    def _bounce_combinations(self) -> BounceSettings:
        if bool(self.bounce_domain) != bool(self.bounce_secret):
            raise ValueError(
                "MAIL_BOUNCE_DOMAIN: MAIL_BOUNCE_DOMAIN and MAIL_BOUNCE_SECRET go together"
            )
        secret = self.bounce_secret.get_secret_value() if self.bounce_secret else ""
        if self.bounce_secret is not None and len(secret) < 16:
            raise ValueError("MAIL_BOUNCE_SECRET: at least 16 characters")
        if self.bounce_listen_addr is not None:
            split_host_port(self.bounce_listen_addr, 25)
            if not self.bounce_domain:
                raise ValueError("MAIL_BOUNCE_LISTEN_ADDR: needs MAIL_BOUNCE_DOMAIN")
        tls = (self.bounce_tls_cert_file, self.bounce_tls_key_file)
        if any(tls) and not all(tls):
            raise ValueError(
                "MAIL_BOUNCE_TLS_CERT_FILE: MAIL_BOUNCE_TLS_CERT_FILE and "
                "MAIL_BOUNCE_TLS_KEY_FILE go together"
            )
        for path in tls:
            if path is not None and not path.is_file():
                raise ValueError(f"MAIL_BOUNCE_TLS_CERT_FILE: no such file: {path}")
        return self
