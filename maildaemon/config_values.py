"""The value types of the settings: durations, retry ladders, comma lists, host:port and
Redis addresses — parsed the same way wherever a setting is read."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import BeforeValidator
from pydantic_settings import NoDecode

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
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


def parse_ladder(value: object) -> tuple[float, ...]:
    if isinstance(value, list | tuple):
        steps = [parse_duration(v) for v in value]
    else:
        steps = [parse_duration(part) for part in str(value).split(",") if part.strip()]
    if any(step <= 0 for step in steps):
        raise ValueError("every retry step must be longer than zero")
    return tuple(steps)


def parse_csv(value: object) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(part.strip() for part in str(value).split(",") if part.strip())


Duration = Annotated[float, BeforeValidator(parse_duration)]
Ladder = Annotated[tuple[float, ...], NoDecode, BeforeValidator(parse_ladder)]
CsvList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(parse_csv)]


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


def is_loopback_host(host: str) -> bool:
    """Whether a listener on ``host`` is reachable from this machine only.

    ``localhost`` and loopback addresses are; any other name is not (what it resolves to
    can change), nor are ``0.0.0.0`` and ``::``.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_redis_addr(addr: str) -> tuple[bool, str, int]:
    """``host:port``, ``redis://host:port`` or ``rediss://host:port`` (TLS) →
    (tls, host, port). A URL may carry nothing but the host and port."""
    scheme, sep, rest = addr.strip().partition("://")
    if not sep:
        host, port = split_host_port(addr, 6379)
        return False, host, port
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"scheme must be redis:// or rediss://, not {scheme}://")
    if "@" in rest or rest.rstrip("/").count("/") or "?" in rest:
        raise ValueError(
            "only redis[s]://host:port (password: MAIL_REDIS_PASSWORD, database: MAIL_REDIS_DB)"
        )
    host, port = split_host_port(rest.rstrip("/"), 6379)
    return scheme == "rediss", host, port


_HOST_NAME = re.compile(r"^(\*|[a-z0-9_]([a-z0-9_.-]{0,252})|\[[0-9a-f:.]{2,45}\])$")


def host_name(value: str) -> str:
    """A Host header or an allowed-host entry as compared: lowercase, no port, an IPv6
    address in brackets (``"Example.COM:8080"`` → ``example.com``, ``::1`` → ``[::1]``).
    Raises ``ValueError`` for anything else (empty, spaces, a userinfo, a bad port)."""
    text = value.strip().lower()
    if text.count(":") > 1 and not text.startswith("["):
        text = f"[{text}]"  # a bare IPv6 address (a configured entry)
    if text.startswith("["):
        name, sep, port = text.partition("]")
        name += sep
        port = port.removeprefix(":") if port.startswith(":") else port
    else:
        name, _, port = text.partition(":")
    if port and not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
        raise ValueError(f"bad port in host {value!r}")
    if text.endswith(":") or not _HOST_NAME.match(name):
        raise ValueError(f"not a host name: {value!r}")
    return name
