"""Where a webhook may go: https (http only with ``MAIL_WEBHOOK_ALLOW_HTTP``), and never to
a loopback, link-local, metadata or otherwise unroutable address unless one of
``MAIL_WEBHOOK_ALLOWED_NETWORKS`` contains it. Checked when an endpoint is added and at
every connect (``GuardedResolver``: a name that resolves elsewhere later — DNS rebinding —
is refused then), and for an address written in the URL itself before each request.
Private ranges (10/8, 172.16/12, 192.168/16, fc00::/7) are normal internal targets."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from maildaemon.errors import InvalidInput

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
MAX_URL = 2000


class RefusedTarget(OSError):
    """The endpoint's address is in a refused range."""


def networks(cidrs: Sequence[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def refusal(ip: IP, allowed: Sequence[Network]) -> str | None:
    """Why ``ip`` is no webhook target, or None when it may be one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == n.version and ip in n for n in allowed):
        return None
    if ip in METADATA:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        return "not a unicast address"
    return None


def check_url(url: str) -> URL:
    """The endpoint URL as given, or InvalidInput saying what is wrong with it."""
    if len(url) > MAX_URL or any(ord(c) < 33 for c in url):
        raise InvalidInput(f"url: at most {MAX_URL} characters, no spaces or controls")
    try:
        parsed = URL(url)
    except ValueError as exc:
        raise InvalidInput(f"url: not a URL: {exc}") from None
    if parsed.scheme not in ("https", "http"):
        raise InvalidInput("url: must be https://")
    if not parsed.host:
        raise InvalidInput("url: no host")
    if parsed.user or parsed.password:
        raise InvalidInput("url: no user or password in the URL (they would be logged)")
    if parsed.fragment:
        raise InvalidInput("url: no #fragment")
    return parsed


def check_scheme(url: URL, allow_http: bool) -> None:
    if url.scheme != "https" and not allow_http:
        raise InvalidInput("url: must be https:// (http:// only with MAIL_WEBHOOK_ALLOW_HTTP=true)")


def literal(host: str) -> IP | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_literal(url: URL, allowed: Sequence[Network]) -> None:
    """An address written in the URL goes past the resolver: refused here."""
    ip = literal(url.host or "")
    if ip is not None and (why := refusal(ip, allowed)) is not None:
        raise RefusedTarget(f"{url.host} is {why} (MAIL_WEBHOOK_ALLOWED_NETWORKS)")


async def check_target(url: URL, allowed: Sequence[Network]) -> None:
    """At add time: the host resolves, and to no refused address (InvalidInput)."""
    host = url.host or ""
    ip = literal(host)
    if ip is not None:
        found: list[IP] = [ip]
    else:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, url.port or 443, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise InvalidInput(f"url: {host} does not resolve: {exc}") from None
        found = [ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos]
    for address in found:
        why = refusal(address, allowed)
        if why is not None:
            raise InvalidInput(
                f"url: {host} resolves to {address}, {why}; allow it with "
                "MAIL_WEBHOOK_ALLOWED_NETWORKS"
            )


class GuardedResolver(AbstractResolver):
    """The default resolver, without the refused addresses; none left: RefusedTarget."""

    def __init__(self, allowed: Sequence[Network]) -> None:
        self._inner = DefaultResolver()
        self._allowed = tuple(allowed)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        kept, why = [], ""
        for r in results:
            reason = refusal(ipaddress.ip_address(r["host"].split("%")[0]), self._allowed)
            if reason is None:
                kept.append(r)
            else:
                why = f"{host} resolves to {r['host']}, {reason}"
        if not kept:
            raise RefusedTarget(f"{why} (MAIL_WEBHOOK_ALLOWED_NETWORKS)")
        return kept

    async def close(self) -> None:
        await self._inner.close()
