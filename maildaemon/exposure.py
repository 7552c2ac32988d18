"""What the internal HTTP listener may expose: open operator reads only on loopback."""

from __future__ import annotations

from maildaemon.config import Settings
from maildaemon.config_values import is_loopback_host
from maildaemon.errors import ConfigError


def check_read_exposure(s: Settings) -> None:
    """Refuse open operator reads (deliveries, recipients, bodies) on a reachable listener.

    A listener on a non-loopback address needs ``MAIL_OPERATOR_READ_TOKEN`` unless
    ``MAIL_INTERNAL_HTTP_OPEN_READS=true`` says the reads are meant to be open (a network
    policy or proxy in front of the port guards them).
    """
    host, _ = s.http_host_port
    if s.read_token is None and not s.internal_http_open_reads and not is_loopback_host(host):
        raise ConfigError(
            "invalid configuration: MAIL_OPERATOR_READ_TOKEN: required when "
            f"MAIL_INTERNAL_HTTP_ADDR ({s.internal_http_addr}) is not a loopback address, "
            "or anyone who reaches the port reads deliveries and their recipients; set it, "
            "or set MAIL_INTERNAL_HTTP_OPEN_READS=true if the reads are meant to be open"
        )
