"""A real HTTP receiver for webhook tests (aiohttp.web on 127.0.0.1): it verifies every
request's Standard Webhooks signature with the published secrets and answers as scripted
(``plan``: a list of answers taken one per request, then ``default``)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

# An answer: an HTTP status; "reset" (the connection dropped without an answer);
# "redirect" (a 307 to elsewhere); ("slow", seconds) (then 200).
Answer = int | str | tuple[str, float]


@dataclass
class Received:
    webhook_id: str
    timestamp: str
    signature: str
    body: dict[str, Any]
    verified_with: list[str]  # which of the secrets verified it
    answered: Answer
    raw: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)
    completed: bool = False  # the answer went out (a slow one: after its wait)


@dataclass
class Receiver:
    secrets: list[str] = field(default_factory=list)
    plan: list[Answer] = field(default_factory=list)
    default: Answer = 200
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    tls: ssl.SSLContext | None = None  # serve https with this context
    in_flight: int = 0
    max_in_flight: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/hook"

    def accepted(self) -> list[Received]:
        """The requests answered 2xx (each one an accepted event)."""
        return [r for r in self.requests if r.completed and r.answered == 200]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        if not self.port:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
            sock.close()
        site = web.TCPSite(
            self._runner, "127.0.0.1", self.port, reuse_address=True, ssl_context=self.tls
        )
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _hook(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        answer = self.plan.pop(0) if self.plan else self.default
        headers = {k: v for k, v in request.headers.items()}
        verified = []
        for secret in self.secrets:
            try:
                Webhook(secret).verify(raw, headers)
                verified.append(secret)
            except WebhookVerificationError:
                pass
        received = Received(
            request.headers.get("webhook-id", ""),
            request.headers.get("webhook-timestamp", ""),
            request.headers.get("webhook-signature", ""),
            json.loads(raw),
            verified,
            answer,
            raw,
            headers,
        )
        self.requests.append(received)
        if answer == "reset":
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError  # the handler ends with the connection
        if answer == "redirect":
            raise web.HTTPTemporaryRedirect("http://127.0.0.1:9/elsewhere")
        if isinstance(answer, tuple):
            await asyncio.sleep(answer[1])
            if request.transport is None or request.transport.is_closing():
                return web.Response(text="the client left")  # never seen: not accepted
            received.answered, received.completed = 200, True
            return web.Response(text="late ok")
        received.completed = True
        return web.Response(status=int(answer), text="x" * 5000 if answer != 200 else "ok")
