"""Webhook benchmark: the real daemon process delivering signed webhooks to a local
receiver (aiohttp on 127.0.0.1, every request answered 200; one in 50 verified with the
published secret).

    python -m bench.webhooks --events 5000

N deliveries are run in stub mode while the endpoint is disabled, so N events wait in its
queue; then the endpoint is enabled and the queue drained. Printed: webhooks/s (enable →
queue empty) and the daemon's CPU per webhook over that window (claim, sign, POST, record),
as a table and one JSON line (`BENCH_JSON {...}`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook

from bench.harness import REPO, command, count, start_daemon, stop_daemon, wait_count, xadd_all
from maildaemon.devstack.postgres import EmbeddedPostgres, ensure_database, pick_free_port
from maildaemon.devstack.redis import EmbeddedRedis
from maildaemon.operator import webhooks as ops
from maildaemon.store.operator.records import Actor
from maildaemon.store.pipeline.db import Store
from maildaemon.store.webhooks.admin import WebhookAdmin

WHO = Actor("bench")


class Receiver:
    def __init__(self) -> None:
        self.received = 0
        self.verified = 0
        self.secret = ""

    async def hook(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.received += 1
        if self.received % 50 == 1:
            Webhook(self.secret).verify(raw, dict(request.headers))
            self.verified += 1
        return web.Response(text="ok")


def _env(dsn: str, redis_addr: str, http_port: int, concurrency: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAIL_", "OTEL_"))}
    env.update(
        {
            "MAIL_POSTGRES_PRIMARY_DSN": dsn,
            "MAIL_REDIS_MASTER_ADDR": redis_addr,
            "MAIL_SMTP_MODE": "stub",
            "MAIL_TEMPLATE_DIR": str(REPO / "templates"),
            "MAIL_INTERNAL_HTTP_ADDR": f"127.0.0.1:{http_port}",
            "MAIL_ALLOWED_SOURCES": "notification,authsession",
            "MAIL_LOG_LEVEL": "WARNING",
            "MAIL_WEBHOOK_ALLOW_HTTP": "true",
            "MAIL_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
            "MAIL_WEBHOOK_CONCURRENCY": str(concurrency),
            "MAIL_WEBHOOK_POLL_INTERVAL": "0.05s",
        }
    )
    return env


async def phase_webhooks(admin_dsn: str, redis_addr: str, n: int, conc: int) -> dict[str, Any]:
    dsn = ensure_database(admin_dsn, "bench_webhooks")
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = pick_free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    http_port = pick_free_port()
    proc = await start_daemon(_env(dsn, redis_addr, http_port, conc), http_port)
    store = await Store.open(dsn, min_size=1, max_size=2)
    try:
        admin = WebhookAdmin(store.pool)
        rules = ops.TargetRules(True, ("127.0.0.0/8",), 60.0)
        added = await ops.add(admin, rules, f"http://127.0.0.1:{port}/hook", None, None, WHO, None)
        receiver.secret = added.secret
        await admin.set_enabled(added.endpoint.id, False, WHO, "bench: fill the queue")
        await xadd_all(redis_addr, [command(i, "wh") for i in range(n)])
        queued = "SELECT count(*) FROM mail.webhook_queue"
        await wait_count(dsn, queued, n, proc)
        cpu0, t0 = proc.cpu_seconds(), time.monotonic()
        await admin.set_enabled(added.endpoint.id, True, WHO, "bench: drain")
        await wait_count(dsn, "SELECT (count(*) = 0)::int FROM mail.webhook_queue", 1, proc)
        elapsed, cpu = time.monotonic() - t0, proc.cpu_seconds() - cpu0
        attempts = await count(dsn, "SELECT count(*) FROM mail.webhook_attempts WHERE ok")
    finally:
        await store.close()
        stop_daemon(proc)
        await runner.cleanup()
    return {
        "events": n,
        "concurrency_per_endpoint": conc,
        "webhooks_per_s": round(n / elapsed, 1),
        "daemon_cpu_ms_per_webhook": round(cpu * 1000 / n, 3),
        "drain_s": round(elapsed, 2),
        "accepted_attempts": attempts,
        "received": receiver.received,
        "signatures_verified": receiver.verified,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="maildaemon-bench-wh-"))
    pg = EmbeddedPostgres(workdir / "pg", fast=False)
    rd = EmbeddedRedis(workdir / "redis")
    try:
        admin = pg.start()
        redis_addr = rd.start()
        return await phase_webhooks(admin, redis_addr, args.events, args.concurrency)
    finally:
        rd.stop()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if pg.data_dir != workdir / "pg":
            shutil.rmtree(pg.data_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=4, help="MAIL_WEBHOOK_CONCURRENCY")
    result = asyncio.run(run(parser.parse_args(argv)))
    for key, value in result.items():
        print(f"  {key:28} {value}")
    print("BENCH_JSON " + json.dumps({"webhooks": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
