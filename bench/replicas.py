"""Scale-out phase: the same run through 1, 2 and 3 daemon processes on one Redis consumer
group and one database, with the total number of SMTP connections kept the same.

Besides throughput and daemon CPU it reads what a large deployment runs out of first, from
PostgreSQL's own counters over the run: transactions committed, WAL flushes (fsyncs) and
WAL bytes, each per delivery, and the connections the replicas held.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from bench import harness
from maildaemon.devstack.postgres import pick_free_port

_WAL = """
SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()) AS commits,
       wal_sync, wal_write, wal_bytes
FROM pg_stat_wal
"""
_CONNECTIONS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'maildaemon%'
"""

# Everything a delivery leaves in schema mail (tables, indexes, TOAST): what retention holds.
_STORED_BYTES = """
SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'mail' AND c.relkind = 'r'
"""


async def _counters(dsn: str) -> dict[str, float]:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_stat_force_next_flush()")
        row = await conn.fetchrow(_WAL)
        assert row is not None
        return {k: float(row[k]) for k in ("commits", "wal_sync", "wal_write", "wal_bytes")}
    finally:
        await conn.close()


async def _peak_connections(dsn: str, stop: asyncio.Event) -> int:
    conn = await asyncpg.connect(dsn)
    peak = 0
    try:
        while not stop.is_set():
            peak = max(peak, int(await conn.fetchval(_CONNECTIONS)))
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    return peak


async def phase_replicas(
    servers: harness.Servers, n: int, concurrency: int, replicas: int
) -> dict[str, Any]:
    dsn = await servers.fresh_database()
    per_replica = max(1, concurrency // replicas)
    procs = []
    for index in range(replicas):
        port = pick_free_port()
        env = harness.daemon_env(dsn, servers, port, per_replica)
        env["MAIL_CONSUMER_NAME"] = f"bench-replica-{index}"
        procs.append(await harness.start_daemon(env, port))
    cpu0 = [p.cpu_seconds() for p in procs]
    before = await _counters(dsn)
    stop = asyncio.Event()
    watcher = asyncio.ensure_future(_peak_connections(dsn, stop))
    docs = [harness.command(i, f"r{replicas}") for i in range(n)]
    first = await harness.xadd_all(servers.redis_addr, docs)
    done = await harness.wait_count(dsn, harness.SENT, n, procs[0])
    cpu = sum(p.cpu_seconds() - c for p, c in zip(procs, cpu0, strict=True))
    stop.set()
    peak_connections = await watcher
    after = await _counters(dsn)
    for proc in procs:
        harness.stop_daemon(proc)
    attempts = await harness.count(dsn, "SELECT count(*) FROM mail.attempts")
    stored = await harness.count(dsn, _STORED_BYTES)
    workers = await harness.count(dsn, "SELECT count(DISTINCT worker) FROM mail.attempts")
    elapsed = done - first
    delta = {k: after[k] - before[k] for k in after}
    return {
        "replicas": replicas,
        "smtp_connections_per_replica": per_replica,
        "messages": n,
        "elapsed_s": round(elapsed, 3),
        "deliveries_per_s": round(n / elapsed, 1),
        "daemon_cpu_ms_per_delivery": round(cpu * 1000 / n, 3),
        "attempts": attempts,
        "replicas_that_sent": workers,
        "pg_commits_per_delivery": round(delta["commits"] / n, 3),
        "pg_wal_fsyncs_per_delivery": round(delta["wal_sync"] / n, 3),
        "pg_wal_bytes_per_delivery": round(delta["wal_bytes"] / n),
        "pg_connections_peak": peak_connections,
        "pg_stored_bytes_per_delivery": round(stored / n),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


async def phase_scaling(
    servers: harness.Servers, n: int, concurrency: int, counts: list[int]
) -> dict[str, Any]:
    return {f"replicas_{r}": await phase_replicas(servers, n, concurrency, r) for r in counts}
