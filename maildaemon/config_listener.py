"""The internal HTTP listener's settings: where it listens and what it holds out against
(deadlines, caps, paces, the Host allow-list). ``Settings`` inherits them."""

from __future__ import annotations

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings

from maildaemon.config_values import CsvList, Duration, host_name, split_host_port


class ListenerSettings(BaseSettings):
    internal_http_addr: str = "127.0.0.1:8080"
    # The listener under abuse (RUNBOOK): head / body deadlines, caps, rates.
    internal_http_header_timeout: Duration = 10.0
    internal_http_body_timeout: Duration = 10.0
    internal_http_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Open connections at most; beyond, a new one is answered 503 and closed at once.
    internal_http_max_connections: int = Field(default=256, ge=1, le=65_536)
    # Host names (any port) the listener answers besides its own address, localhost,
    # 127.0.0.1 and [::1]; "*" answers any (DNS rebinding is then possible).
    internal_http_allowed_hosts: CsvList = ()
    # Refused connections, accept errors and timeouts: one log line per interval at most.
    internal_http_log_interval: Duration = 10.0
    # Template previews per second and burst, for the whole listener (429 beyond).
    internal_http_preview_rate: float = Field(default=2.0, gt=0.0, le=1000.0)
    internal_http_preview_burst: int = Field(default=5, ge=1, le=1000)
    # Requests/s and burst (an address: half); over it wait up to max_wait, then 503.
    internal_http_request_rate: float = Field(default=100.0, gt=0.0, le=100_000.0)
    internal_http_request_burst: int = Field(default=50, ge=1, le=100_000)
    internal_http_request_max_wait: Duration = 1.0

    @field_validator("internal_http_addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        split_host_port(value, 0)
        return value

    @property
    def http_host_port(self) -> tuple[str, int]:
        return split_host_port(self.internal_http_addr, 8080)

    @property
    def http_allowed_hosts(self) -> frozenset[str]:
        """The Host names the listener answers (lowercase, without port, IPv6 in
        brackets): its own address unless a wildcard, the loopback names and
        MAIL_INTERNAL_HTTP_ALLOWED_HOSTS ("*" answers any)."""
        own, _ = self.http_host_port
        names = {"localhost", "127.0.0.1", "[::1]"}
        if own not in ("0.0.0.0", "::", ""):
            names.add(f"[{own}]" if ":" in own else own)
        for entry in self.internal_http_allowed_hosts:
            names.add(host_name(entry))
        return frozenset(n.lower() for n in names)

    def _check_listener(self) -> None:
        timeouts = ("header_timeout", "body_timeout", "request_max_wait")
        for name in (f"internal_http_{t}" for t in timeouts):
            if getattr(self, name) <= 0:
                raise ValueError(f"MAIL_{name.upper()}: must be longer than zero")
        try:
            _ = self.http_allowed_hosts
        except ValueError as exc:
            raise ValueError(f"MAIL_INTERNAL_HTTP_ALLOWED_HOSTS: {exc}") from None
