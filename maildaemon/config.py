"""Settings: the one place that reads the environment (prefix ``MAIL_``, or a ``.env`` file)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from maildaemon.config_bounces import BounceSettings
from maildaemon.config_listener import ListenerSettings
from maildaemon.config_values import (
    CsvList,
    Duration,
    Ladder,
    split_host_port,
    split_redis_addr,
)
from maildaemon.config_webhooks import WebhookSettings
from maildaemon.errors import ConfigError
from maildaemon.redaction import dsn_secrets, normalize_dsn, redact_dsn, spellings

_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def packaged_template_dir() -> Path:
    """The catalog shipped inside the package (the top-level ``templates/`` in a checkout)."""
    return (Path(__file__).resolve().parent / "templates").resolve()


def _default_template_dir() -> Path:
    local = Path("templates")
    return local if local.is_dir() else packaged_template_dir()


class Settings(ListenerSettings, BounceSettings, WebhookSettings):
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
    # TLS (also on with a rediss:// MAIL_REDIS_MASTER_ADDR); the CA defaults to the system store.
    redis_tls: bool = False
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = None
    # Sentinel: the master is looked up by name at these sentinels (host:port,host:port).
    redis_sentinels: CsvList = ()
    redis_master_name: str | None = None
    redis_sentinel_password: SecretStr | None = None
    # Redis Cluster: MAIL_REDIS_MASTER_ADDR (and these further host:port) are seed nodes;
    # each key's master is learnt from the cluster and followed through failovers.
    redis_cluster: bool = False
    redis_cluster_nodes: CsvList = ()
    command_stream: str = Field(default="mail:delivery_commands", min_length=1)
    consumer_group: str = Field(default="maildaemon", min_length=1)
    consumer_name: str = Field(default_factory=_default_consumer_name, min_length=1)
    consumer_batch_size: int = Field(default=500, ge=1, le=10_000)
    # Bytes of stream entries one batch may hold (read by a Lua script that measures them).
    consumer_batch_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    consumer_block: Duration = 1.0
    # How an idle consumer learns of a new command: keyspace notifications (turned on when
    # off: auto; only if already on: existing) or polling alone (off).
    redis_stream_wakeup: Literal["auto", "existing", "off"] = "auto"
    consumer_reclaim_idle: Duration = 60.0
    consumer_forget_idle: Duration = 86400.0
    # How often the command stream is trimmed to its oldest entry not yet acknowledged by
    # every consumer group (entries are acknowledged once durable in PostgreSQL); 0: never.
    command_stream_trim_interval: Duration = Field(default=60.0, ge=0.0)
    event_stream: str = Field(default="mail:delivery_events", min_length=1)
    event_stream_maxlen: int = Field(default=100_000, ge=0)
    # How often the outbox is checked for events when no result wakes the publisher.
    event_publish_interval: Duration = 1.0

    # PostgreSQL: the durable state, schema `mail`.
    postgres_primary_dsn: SecretStr
    postgres_pool_min: int = Field(default=2, ge=1)
    postgres_pool_max: int = Field(default=10, ge=2)
    # Behind PgBouncer in transaction pooling: no prepared-statement cache, no LISTEN on
    # the pool. LISTEN (and migrations) then use MAIL_POSTGRES_LISTEN_DSN, a direct
    # session; without it the scheduler only polls.
    postgres_pgbouncer: bool = False
    postgres_listen_dsn: SecretStr | None = None

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
    # Accepted messages per connection whose results may still be uncommitted: a worker
    # goes on sending while the writer commits, up to this many (the crash-duplicate bound).
    result_window: int = Field(default=4, ge=1, le=64)
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

    # Process (the internal listener's settings: config_listener).
    operator_token: SecretStr | None = None
    # Named operator tokens, "name:secret,name:secret": the audit records the name.
    operator_tokens: SecretStr | None = None
    # When set, the operator API's reads need this token (or an operator token).
    operator_read_token: SecretStr | None = None
    # Without a read token the daemon refuses a non-loopback listener unless this says yes.
    internal_http_open_reads: bool = False
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

    @field_validator("redis_master_addr")
    @classmethod
    def _redis_addr(cls, value: str) -> str:
        split_redis_addr(value)
        return value

    @field_validator("redis_cluster_nodes")
    @classmethod
    def _cluster_nodes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for addr in value:
            split_redis_addr(addr)
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for addr in value:
            split_host_port(addr, 26379)
        return value

    @field_validator("postgres_primary_dsn", "postgres_listen_dsn")
    @classmethod
    def _dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        if not value.get_secret_value().startswith(("postgres://", "postgresql://")):
            raise ValueError("must be a postgresql:// URL")
        return value

    @model_validator(mode="before")
    @classmethod
    def _batch_holds_a_command(cls, data: Any) -> Any:
        """Unless set, the batch budget grows with MAIL_COMMAND_MAX_BYTES (one must fit)."""
        if isinstance(data, dict) and "consumer_batch_max_bytes" not in data:
            try:
                command_max = int(data.get("command_max_bytes", 0))
            except (TypeError, ValueError):
                return data  # the field's own validation reports it
            default = cls.model_fields["consumer_batch_max_bytes"].default
            if command_max > default:
                return {**data, "consumer_batch_max_bytes": command_max}
        return data

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
        self._check_redis()
        if self.api_statement_timeout <= 0:
            raise ValueError("MAIL_API_STATEMENT_TIMEOUT: must be longer than zero")
        self._check_listener()
        self.operator_identities()  # refuses a malformed MAIL_OPERATOR_TOKENS
        if self.postgres_pool_min > self.postgres_pool_max:
            raise ValueError("MAIL_POSTGRES_POOL_MIN: larger than MAIL_POSTGRES_POOL_MAX")
        if self.lease_duration <= self.smtp_timeout:
            raise ValueError("MAIL_LEASE_DURATION: must be longer than MAIL_SMTP_TIMEOUT")
        if not self.retry_ladder:
            raise ValueError("MAIL_RETRY_LADDER: needs at least one step")
        if self.command_max_bytes > self.consumer_batch_max_bytes:
            raise ValueError(
                "MAIL_COMMAND_MAX_BYTES: larger than MAIL_CONSUMER_BATCH_MAX_BYTES "
                "(one command must fit in a batch)"
            )
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

    def _check_redis(self) -> None:
        for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file"):
            path: Path | None = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"MAIL_{name.upper()}: no such file: {path}")
        if (self.redis_tls_cert_file is None) != (self.redis_tls_key_file is None):
            raise ValueError(
                "MAIL_REDIS_TLS_CERT_FILE: MAIL_REDIS_TLS_CERT_FILE and "
                "MAIL_REDIS_TLS_KEY_FILE go together"
            )
        files = (self.redis_tls_ca_file, self.redis_tls_cert_file)
        if any(f is not None for f in files) and not self.redis_tls_enabled:
            raise ValueError(
                "MAIL_REDIS_TLS_CA_FILE: TLS files are set but TLS is off "
                "(MAIL_REDIS_TLS=true or a rediss:// MAIL_REDIS_MASTER_ADDR)"
            )
        if self.redis_sentinels and not self.redis_master_name:
            raise ValueError("MAIL_REDIS_MASTER_NAME: required with MAIL_REDIS_SENTINELS")
        if self.redis_master_name and not self.redis_sentinels:
            raise ValueError("MAIL_REDIS_SENTINELS: required with MAIL_REDIS_MASTER_NAME")
        if self.redis_cluster_nodes and not self.redis_cluster:
            raise ValueError("MAIL_REDIS_CLUSTER_NODES: set, but MAIL_REDIS_CLUSTER is off")
        if self.redis_cluster and self.redis_sentinels:
            raise ValueError(
                "MAIL_REDIS_CLUSTER: a Cluster has no sentinels (unset MAIL_REDIS_SENTINELS)"
            )
        if self.redis_cluster and self.redis_db != 0:
            raise ValueError("MAIL_REDIS_DB: a Redis Cluster has database 0 only")
        seeds_tls = {
            split_redis_addr(a)[0] for a in (self.redis_master_addr, *self.redis_cluster_nodes)
        }
        if len(seeds_tls) > 1 and not self.redis_tls:
            raise ValueError(
                "MAIL_REDIS_CLUSTER_NODES: every seed is rediss:// or none is "
                "(or set MAIL_REDIS_TLS=true)"
            )

    # Derived views -------------------------------------------------------------

    @property
    def redis_tls_enabled(self) -> bool:
        return self.redis_tls or split_redis_addr(self.redis_master_addr)[0]

    @property
    def redis_sentinel_addrs(self) -> list[tuple[str, int]]:
        return [split_host_port(a, 26379) for a in self.redis_sentinels]

    @property
    def redis_target(self) -> str:
        """Where Redis is, as logged: the address, or the master name at its sentinels."""
        if self.redis_sentinels:
            return f"sentinel:{self.redis_master_name}@{','.join(self.redis_sentinels)}"
        if self.redis_cluster:
            return f"cluster:{','.join((self.redis_master_addr, *self.redis_cluster_nodes))}"
        return self.redis_master_addr

    @property
    def listen_dsn(self) -> str | None:
        """The DSN for LISTEN: the direct one, else the pool's unless behind PgBouncer."""
        if self.postgres_listen_dsn is not None:
            return normalize_dsn(self.postgres_listen_dsn.get_secret_value())
        return None if self.postgres_pgbouncer else self.dsn

    @property
    def session_dsn(self) -> str:
        """A DSN with a real session (migrations): the direct one when set."""
        return self.listen_dsn or self.dsn

    @property
    def redis_host_port(self) -> tuple[str, int]:
        _tls, host, port = split_redis_addr(self.redis_master_addr)
        return host, port

    @property
    def smtp_host_port(self) -> tuple[str, int]:
        assert self.smtp_addr is not None
        return split_host_port(self.smtp_addr, 465 if self.smtp_security == "tls" else 587)

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
        """The DSN as the drivers get it: the password percent-encoded (see ``normalize_dsn``)."""
        return normalize_dsn(self.postgres_primary_dsn.get_secret_value())

    def secret_values(self) -> list[str]:
        """Every form in which a secret of these settings could be printed (for scrubbing)."""
        values: list[str] = []
        secrets = (
            self.redis_password,
            self.redis_sentinel_password,
            self.smtp_password,
            self.operator_token,
            self.operator_read_token,
            self.bounce_secret,
        )
        for secret in secrets:
            if secret is not None:
                values += spellings(secret.get_secret_value())
        if self.operator_tokens is not None:
            for pair in self.operator_tokens.get_secret_value().split(","):
                token = pair.partition(":")[2].strip()
                values += spellings(token) if token else []
        values += dsn_secrets(self.postgres_primary_dsn.get_secret_value())
        if self.postgres_listen_dsn is not None:
            values += dsn_secrets(self.postgres_listen_dsn.get_secret_value())
        return sorted({v for v in values if v}, key=len, reverse=True)

    def redacted(self) -> dict[str, Any]:
        """The settings as they may be logged: secrets and DSN passwords removed."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                value = "***" if not name.endswith("_dsn") else redact_dsn(value)
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out


# The authority of a DSN ends at the first "/", "?" or "#" after its last plausible "@";
# a password may hold "/", "?", "#", "@" or "%" unencoded, a host list never holds "@".
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
