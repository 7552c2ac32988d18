"""One endpoint's HTTP client: a kept-open session (its own connection pool, at most
``MAIL_WEBHOOK_CONCURRENCY`` connections), connect and total timeouts, no redirect
followed (a 3xx is a failure), the answer read up to a small bound."""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass

import aiohttp
from yarl import URL

from maildaemon.config import Settings
from maildaemon.webhooks import targets


@dataclass(frozen=True, slots=True)
class Reply:
    ok: bool
    http_status: int | None
    duration_ms: int
    reason: str | None  # status, redirect, timeout, connect, refused_target
    error: str | None
    response: str | None


class EndpointClient:
    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self._target = URL(url)
        self._allowed = targets.networks(settings.webhook_allowed_networks)
        self._max = settings.webhook_response_max_bytes
        tls = ssl.create_default_context(
            cafile=str(settings.webhook_ca_file) if settings.webhook_ca_file else None
        )
        connector = aiohttp.TCPConnector(
            ssl=tls,
            limit=settings.webhook_concurrency,
            resolver=targets.GuardedResolver(self._allowed),
            keepalive_timeout=30.0,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=settings.webhook_timeout, sock_connect=settings.webhook_connect_timeout
            ),
            auto_decompress=False,
            headers={"user-agent": "maildaemon-webhooks"},
        )

    async def close(self) -> None:
        await self._session.close()

    async def post(self, body: str, headers: dict[str, str]) -> Reply:
        started = time.monotonic()

        def reply(ok: bool, status: int | None, reason: str | None, error: str | None,
                  response: str | None = None) -> Reply:  # fmt: skip
            ms = int((time.monotonic() - started) * 1000)
            return Reply(ok, status, ms, reason, error, response)

        try:
            targets.check_literal(self._target, self._allowed)
            async with self._session.post(
                self._target, data=body.encode(), headers=headers, allow_redirects=False
            ) as resp:
                raw = await resp.content.read(self._max) if self._max else b""
                text = raw.decode("utf-8", "replace")
                if 200 <= resp.status < 300:
                    return reply(True, resp.status, None, None, text)
                if 300 <= resp.status < 400:
                    where = resp.headers.get("location", "")[:200]
                    return reply(
                        False, resp.status, "redirect", f"redirect to {where!r} not followed", text
                    )
                return reply(False, resp.status, "status", f"HTTP {resp.status}", text)
        except targets.RefusedTarget as exc:
            return reply(False, None, "refused_target", str(exc))
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, targets.RefusedTarget):
                return reply(False, None, "refused_target", str(exc.os_error))
            return reply(False, None, "connect", f"{type(exc).__name__}: {exc}")
        except TimeoutError:
            return reply(False, None, "timeout", "no complete answer within MAIL_WEBHOOK_TIMEOUT")
        except (aiohttp.ClientError, OSError) as exc:
            return reply(False, None, "connect", f"{type(exc).__name__}: {exc}")
