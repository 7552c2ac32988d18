"""Settings: the one place that reads the environment (prefix ``MAIL_``, or a ``.env`` file)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from maildaemon.errors import ConfigError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float:
    """``"30s"``, ``"2m"``, ``"1.5h"``, ``"7d"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 2m, 2h, 7d)")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def _parse_ladder(value: object) -> tuple[float, ...]:
    if isinstance(value, list | tuple):
        steps = [parse_duration(v) for v in value]
    else:
        steps = [parse_duration(part) for part in str(value).split(",") if part.strip()]
    if any(step <= 0 for step in steps):
        raise ValueError("every retry step must be longer than zero")
    return tuple(steps)


def _parse_csv(value: object) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(part.strip() for part in str(value).split(",") if part.strip())


Duration = Annotated[float, BeforeValidator(parse_duration)]
Ladder = Annotated[tuple[float, ...], NoDecode, BeforeValidator(_parse_ladder)]
CsvList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_parse_csv)]


def split_host_port(addr: str, default_port: int) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``host`` alone."""
    addr = addr.strip()
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port_text = rest.lstrip(":")
    elif addr.count(":") == 1:
        host, _, port_text = addr.partition(":")
    else:
        host, port_text = addr, ""
    if not host:
        raise ValueError(f"no host in {addr!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {addr!r}")
    return host, int(port_text)


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def packaged_template_dir() -> Path:
    """The catalog shipped inside the package (the top-level ``templates/`` in a checkout)."""
    return (Path(__file__).resolve().parent / "templates").resolve()


def _default_template_dir() -> Path:
    local = Path("templates")
    return local if local.is_dir() else packaged_template_dir()


class Settings(BaseSettings):
    """Every setting of the daemon. Built once in the entry point and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="MAIL_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # Redis: the command stream, its consumer group (the persisted offset), outcome events.
    redis_master_addr: str = "127.0.0.1:6379"
    redis_password: SecretStr | None = None
    redis_db: int = Field(default=0, ge=0, le=1024)
    command_stream: str = Field(default="mail:delivery_commands", min_length=1)
    consumer_group: str = Field(default="maildaemon", min_length=1)
    consumer_name: str = Field(default_factory=_default_consumer_name, min_length=1)
    consumer_batch_size: int = Field(default=500, ge=1, le=10_000)
    consumer_block: Duration = 1.0
    consumer_reclaim_idle: Duration = 60.0
    consumer_forget_idle: Duration = 86400.0
    event_stream: str = Field(default="mail:delivery_events", min_length=1)
    event_stream_maxlen: int = Field(default=100_000, ge=0)
    # How often the outbox is checked for events when no result wakes the publisher.
    event_publish_interval: Duration = 1.0

    # PostgreSQL: the durable state, schema `mail`.
    postgres_primary_dsn: SecretStr
    postgres_pool_min: int = Field(default=2, ge=1)
    postgres_pool_max: int = Field(default=10, ge=2)

    # Templates.
    # ./templates when it exists, else the catalog shipped in the package.
    template_dir: Path = Field(default_factory=_default_template_dir)
    default_locale: str = "en"

    # SMTP transport.
    smtp_mode: Literal["smtp", "stub"] = "smtp"
    smtp_addr: str | None = None
    smtp_security: Literal["starttls", "tls"] = "starttls"
    smtp_from: str | None = None
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_timeout: Duration = 30.0
    smtp_ca_file: Path | None = None
    smtp_tls_verify: bool = True
    smtp_helo_name: str | None = None
    smtp_pipelining: Literal["auto", "off"] = "auto"

    # Delivery.
    attempt_worker_concurrency: int = Field(default=8, ge=1, le=512)
    scheduler_batch_size: int = Field(default=200, ge=1, le=5_000)
    scheduler_poll_interval: Duration = 1.0
    lease_duration: Duration = 120.0
    retry_ladder: Ladder = (30.0, 120.0, 600.0, 1800.0, 7200.0, 21600.0)
    retry_jitter: float = Field(default=0.1, ge=0.0, lt=1.0)
    unknown_outcome_policy: Literal["retry", "hold"] = "retry"
    global_rate_limit: float = Field(default=0.0, ge=0.0)
    domain_rate_limit: float = Field(default=0.0, ge=0.0)
    domain_backoff: Duration = 60.0

    # Intake contract limits.
    allowed_sources: CsvList = ("authsession", "notification")
    allowed_headers: CsvList = (
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "List-Id",
        "Auto-Submitted",
        "Precedence",
        "X-Entity-Ref-ID",
        "X-Campaign-ID",
    )
    command_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    attachment_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1)
    attachments_total_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_recipients: int = Field(default=100, ge=1)

    # Retention.
    idempotency_window: Duration = 7 * 86400.0
    delivery_retention: Duration = 30 * 86400.0
    malformed_retention: Duration = 30 * 86400.0
    suppression_ttl: Duration = 30 * 86400.0
    retention_interval: Duration = 300.0
    retention_batch_size: int = Field(default=1000, ge=1)

    # DKIM (optional).
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_private_key_file: Path | None = None

    # Process.
    internal_http_addr: str = "127.0.0.1:8080"
    operator_token: SecretStr | None = None
    # Named operator tokens, "name:secret,name:secret": the audit records the name.
    operator_tokens: SecretStr | None = None
    # When set, the operator API's reads need this token (or an operator token).
    operator_read_token: SecretStr | None = None
    # The operator API's own PostgreSQL pool, so it cannot take the pipeline's connections.
    api_pool_max: int = Field(default=4, ge=1, le=100)
    api_statement_timeout: Duration = 5.0
    shutdown_timeout: Duration = 30.0
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Recipients in the delivery outcome lines: their domains, or the full addresses.
    log_recipients: Literal["domain", "full"] = "domain"
    # `/metrics` (Prometheus text format) on the internal HTTP listener.
    metrics_prometheus: bool = False

    @field_validator("redis_master_addr", "internal_http_addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        split_host_port(value, 0)
        return value

    @field_validator("postgres_primary_dsn")
    @classmethod
    def _dsn(cls, value: SecretStr) -> SecretStr:
        parts = urlsplit(value.get_secret_value())
        if parts.scheme not in ("postgres", "postgresql"):
            raise ValueError("must be a postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _combinations(self) -> Settings:
        if self.smtp_mode == "smtp":
            if not self.smtp_addr:
                raise ValueError("MAIL_SMTP_ADDR: required when MAIL_SMTP_MODE=smtp")
            if not self.smtp_from:
                raise ValueError("MAIL_SMTP_FROM: required when MAIL_SMTP_MODE=smtp")
        if self.smtp_addr:
            split_host_port(self.smtp_addr, 25)
        if self.smtp_from is not None and "@" not in self.smtp_from:
            raise ValueError("MAIL_SMTP_FROM: must contain an e-mail address")
        if bool(self.smtp_username) != bool(self.smtp_password):
            missing = "MAIL_SMTP_PASSWORD" if self.smtp_username else "MAIL_SMTP_USERNAME"
            raise ValueError(f"{missing}: MAIL_SMTP_USERNAME and MAIL_SMTP_PASSWORD go together")
        if self.smtp_ca_file is not None and not self.smtp_ca_file.is_file():
            raise ValueError(f"MAIL_SMTP_CA_FILE: no such file: {self.smtp_ca_file}")
        if self.api_statement_timeout <= 0:
            raise ValueError("MAIL_API_STATEMENT_TIMEOUT: must be longer than zero")
        self.operator_identities()  # refuses a malformed MAIL_OPERATOR_TOKENS
        if self.postgres_pool_min > self.postgres_pool_max:
            raise ValueError("MAIL_POSTGRES_POOL_MIN: larger than MAIL_POSTGRES_POOL_MAX")
        if self.lease_duration <= self.smtp_timeout:
            raise ValueError("MAIL_LEASE_DURATION: must be longer than MAIL_SMTP_TIMEOUT")
        if not self.retry_ladder:
            raise ValueError("MAIL_RETRY_LADDER: needs at least one step")
        if self.attachment_max_bytes > self.attachments_total_max_bytes:
            raise ValueError(
                "MAIL_ATTACHMENT_MAX_BYTES: larger than MAIL_ATTACHMENTS_TOTAL_MAX_BYTES"
            )
        dkim = (self.dkim_domain, self.dkim_selector, self.dkim_private_key_file)
        if any(dkim) and not all(dkim):
            raise ValueError(
                "MAIL_DKIM_DOMAIN: MAIL_DKIM_DOMAIN, MAIL_DKIM_SELECTOR and "
                "MAIL_DKIM_PRIVATE_KEY_FILE go together"
            )
        if self.dkim_private_key_file is not None and not self.dkim_private_key_file.is_file():
            raise ValueError(
                f"MAIL_DKIM_PRIVATE_KEY_FILE: no such file: {self.dkim_private_key_file}"
            )
        return self

    # Derived views -------------------------------------------------------------

    @property
    def redis_host_port(self) -> tuple[str, int]:
        return split_host_port(self.redis_master_addr, 6379)

    @property
    def smtp_host_port(self) -> tuple[str, int]:
        assert self.smtp_addr is not None
        return split_host_port(self.smtp_addr, 465 if self.smtp_security == "tls" else 587)

    @property
    def http_host_port(self) -> tuple[str, int]:
        return split_host_port(self.internal_http_addr, 8080)

    def operator_identities(self) -> dict[str, str]:
        """Operator token -> the identity recorded in the audit trail.

        ``MAIL_OPERATOR_TOKEN`` acts as ``operator``; each ``name:secret`` of
        ``MAIL_OPERATOR_TOKENS`` as its name. Empty tokens are ignored.
        """
        out: dict[str, str] = {}
        if self.operator_token is not None and self.operator_token.get_secret_value():
            out[self.operator_token.get_secret_value()] = "operator"
        raw = self.operator_tokens.get_secret_value() if self.operator_tokens else ""
        for part in (p.strip() for p in raw.split(",")):
            if not part:
                continue
            name, sep, secret = part.partition(":")
            if not sep or not _TOKEN_NAME.match(name) or len(secret) < 8:
                raise ValueError(
                    "MAIL_OPERATOR_TOKENS: each entry is name:secret (a name of letters, "
                    "digits and ._@-, a secret of at least 8 characters)"
                )
            if secret in out:
                raise ValueError("MAIL_OPERATOR_TOKENS: a secret is used twice")
            out[secret] = name
        return out

    @property
    def read_token(self) -> str | None:
        token = self.operator_read_token
        return token.get_secret_value() if token and token.get_secret_value() else None

    @property
    def dsn(self) -> str:
        return self.postgres_primary_dsn.get_secret_value()

    def redacted(self) -> dict[str, Any]:
        """The settings as they may be logged: secrets and DSN passwords removed."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                value = "***" if name != "postgres_primary_dsn" else redact_dsn(value)
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out


def redact_dsn(dsn: SecretStr | str) -> str:
    text = dsn.get_secret_value() if isinstance(dsn, SecretStr) else dsn
    parts = urlsplit(text)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def _field_env_name(loc: tuple[int | str, ...]) -> str:
    return "MAIL_" + str(loc[0]).upper() if loc else ""


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning every validation problem into one readable line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = _field_env_name(err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        if name and err["type"] == "missing":
            message = "required but not set"
        text = f"{name}: {message}" if name else message
        raise ConfigError(f"invalid configuration: {text}") from None
