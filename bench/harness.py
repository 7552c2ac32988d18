"""What every benchmark phase stands on: the servers, the daemon process, commands and counts.

Shared by ``bench.e2e`` (the phases and the command line), ``bench.matrix`` and
``bench.replicas``; it imports none of them, so the benchmark has no import cycle.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench.sink import SinkCluster
from maildaemon.devstack.postgres import ensure_database

REPO = Path(__file__).resolve().parent.parent
SENDER_DOMAIN = "bench.example"


@dataclass
class Proc:
    """A daemon process and its resource figures (from /proc)."""

    popen: subprocess.Popen[bytes]
    peak_rss_kb: int = 0
    log_path: Path | None = None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def sample_rss(self) -> None:
        for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))


# Every daemon started, so that the command line can stop what a failed phase left running.
DAEMONS: list[Proc] = []


@dataclass
class Servers:
    pg_admin: str
    redis_addr: str
    sink: SinkCluster
    workdir: Path
    databases: int = 0
    results: dict[str, Any] = field(default_factory=dict)

    async def fresh_database(self) -> str:
        self.databases += 1
        dsn = ensure_database(self.pg_admin, f"bench_{self.databases}")
        host, port = self.redis_addr.split(":")
        client = aioredis.Redis(host=host, port=int(port))
        await client.flushall()
        await client.aclose()
        return dsn


def command(i: int, run: str) -> str:
    return json.dumps(
        {
            "delivery_id": f"{run}-{i}",
            "source": "notification",
            "idempotency_key": f"{run}-{i}",
            "to": [f"user{i % 1000}@example.com"],
            "payload_mode": "template",
            "template_id": "signin_code",
            "locale": "en" if i % 2 else "de",
            "variables": {"code": f"{i % 1000000:06d}", "expires_minutes": 10},
        },
        separators=(",", ":"),
    )


def daemon_env(
    dsn: str, servers: Servers, http_port: int, concurrency: int, pipelining: str = "auto"
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAIL_", "OTEL_"))}
    env.update(
        {
            "MAIL_POSTGRES_PRIMARY_DSN": dsn,
            "MAIL_REDIS_MASTER_ADDR": servers.redis_addr,
            "MAIL_SMTP_MODE": "smtp",
            "MAIL_SMTP_ADDR": f"localhost:{servers.sink.port}",
            "MAIL_SMTP_FROM": f"Bench <noreply@{SENDER_DOMAIN}>",
            "MAIL_SMTP_CA_FILE": str(servers.sink.ca_file),
            "MAIL_TEMPLATE_DIR": str(REPO / "templates"),
            "MAIL_INTERNAL_HTTP_ADDR": f"127.0.0.1:{http_port}",
            "MAIL_ATTEMPT_WORKER_CONCURRENCY": str(concurrency),
            "MAIL_ALLOWED_SOURCES": "notification,authsession",
            "MAIL_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "INFO"),
            "MAIL_SHUTDOWN_TIMEOUT": "10s",
            "MAIL_SMTP_PIPELINING": pipelining,
        }
    )
    # BENCH_DAEMON_ENV="OTEL_TRACES_SAMPLER=always_off,OTEL_…=…" reaches the daemon as is
    # (assignments separated by spaces or by commas before the next NAME=).
    extra = os.environ.get("BENCH_DAEMON_ENV", "")
    pairs = re.split(r"[\s,]+(?=[A-Z][A-Z0-9_]*=)", extra.strip())
    env.update(dict(pair.split("=", 1) for pair in pairs if "=" in pair))
    return env


async def start_daemon(env: dict[str, str], http_port: int) -> Proc:
    """Start `maildaemon run`; its log goes to a file (a pipe nobody reads would fill)."""
    profile = os.environ.get("BENCH_PROFILE")  # a path: run the daemon under cProfile
    prefix = ["-m", "cProfile", "-o", profile] if profile else []
    extra = ["--no-uvloop"] if os.environ.get("BENCH_NO_UVLOOP") else []
    log_path = Path(tempfile.mkstemp(prefix="maildaemon-bench-daemon-", suffix=".log")[1])
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            [sys.executable, *prefix, "-m", "maildaemon.cli.main", "run", *extra],
            env=env,
            cwd=str(REPO),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"daemon exited: {log_path.read_text()[-2000:]}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
            writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
            status = await reader.readline()
            writer.close()
            if b" 200 " in status:
                proc = Proc(popen, log_path=log_path)
                DAEMONS.append(proc)
                return proc
        except OSError:
            pass
        await asyncio.sleep(0.1)
    popen.kill()
    raise RuntimeError("daemon did not become ready")


def stop_daemon(proc: Proc) -> None:
    proc.sample_rss()
    proc.popen.send_signal(signal.SIGTERM)
    try:
        proc.popen.wait(30)
    except subprocess.TimeoutExpired:
        proc.popen.kill()
    if proc.log_path is not None:
        proc.log_path.unlink(missing_ok=True)


async def xadd_all(
    redis_addr: str, docs: list[str], stream: str = "mail:delivery_commands", chunk: int = 500
) -> float:
    """XADD as fast as one producer can (pipelined); returns the first XADD's time."""
    host, port = redis_addr.split(":")
    client = aioredis.Redis(host=host, port=int(port))
    first = time.monotonic()
    for start in range(0, len(docs), chunk):
        async with client.pipeline(transaction=False) as pipe:
            for doc in docs[start : start + chunk]:
                pipe.xadd(stream, {"command": doc})
            await pipe.execute()
    await client.aclose()
    return first


async def count(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def wait_count(
    dsn: str, sql: str, target: int, proc: Proc | None, timeout: float = 600
) -> float:
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(dsn)
    try:
        while True:
            n = int(await conn.fetchval(sql))
            if proc is not None:
                proc.sample_rss()
            if n >= target:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {n}/{target} after {timeout}s: {sql}")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def write_counters(dsn: str) -> tuple[int, int]:
    """(next transaction id, WAL syncs so far): their growth over a run is the number of
    transactions that wrote (read-only ones take no id) and of WAL fsyncs, server-wide."""
    conn = await asyncpg.connect(dsn)
    try:
        xid = int(await conn.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text"))
        syncs = int(await conn.fetchval("SELECT wal_sync FROM pg_stat_wal"))
        return xid, syncs
    finally:
        await conn.close()


async def statement_transactions(dsn: str) -> int:
    """Transactions the database's backends ended so far, read-only ones included: with
    the daemon's statements each in its own transaction or in a few explicit ones, their
    growth over a run follows its round trips to PostgreSQL."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database"
                " WHERE datname = current_database()"
            )
        )
    finally:
        await conn.close()


SENT = "SELECT count(*) FROM mail.deliveries WHERE status = 'sent'"
ALL = "SELECT count(*) FROM mail.deliveries"
