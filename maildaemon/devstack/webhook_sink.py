"""``maildaemon dev``'s webhook receiver: a local endpoint (http://127.0.0.1:<port>/dev/
webhooks) that verifies every request's Standard Webhooks signature with its secret, as a
real receiver would, logs it and appends it to ``webhooks.jsonl`` in the state folder."""

from __future__ import annotations

import base64
import json
import logging
import secrets
from pathlib import Path

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from maildaemon.logs import event

log = logging.getLogger("maildaemon.dev.webhooks")
PATH = "/dev/webhooks"


class DevWebhookSink:
    def __init__(self, out: Path, port: int) -> None:
        self.secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        self.out = out
        self.port = port
        self.url = f"http://127.0.0.1:{port}{PATH}"
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post(PATH, self._hook)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = Webhook(self.secret).verify(raw, dict(request.headers))
        except (WebhookVerificationError, ValueError) as exc:
            event(log, "dev webhook refused", logging.WARNING, error=str(exc))
            return web.Response(status=400, text="bad signature")
        webhook_id = request.headers.get("webhook-id", "")
        data = body.get("data", {}) if isinstance(body, dict) else {}
        event(
            log,
            "dev webhook received",
            webhook_id=webhook_id,
            type=body.get("type") if isinstance(body, dict) else None,
            delivery_id=data.get("delivery_id") if isinstance(data, dict) else None,
        )
        with self.out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"webhook_id": webhook_id, "verified": True, "body": body}) + "\n")
        return web.Response(text="ok")
