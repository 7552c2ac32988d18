"""End-to-end benchmark: the real daemon process, durable PostgreSQL, Redis, a STARTTLS sink.

    python -m bench.e2e --messages 20000

Phases (each on a fresh database and stream):
  sink       the sink's own ceiling, driven by client processes without the daemon
  throughput N template commands XADDed as fast as a producer can; first XADD → last
             acceptance, every delivery `sent` and every attempt committed
  latency    commands at a fixed rate; XADD → SMTP acceptance per message
  intake     sending paused: commands/s into PostgreSQL; then the paused backlog
             released: deliveries/s out of PostgreSQL; opt-in
  backlog    claim latency with 10k vs --backlog-rows queued rows, and with a large
             retry backlog that is not yet due (see bench/claims.py); opt-in
  matrix     RTT x connections x MAIL_SMTP_PIPELINING over a delayed link (bench/link.py,
             root only; see bench/matrix.py); opt-in
  history    the claim, a lookup by id, a recipient search and the console's stats
             against --history-rows deliveries over --history-days days and against
             100,000 at the same daily rate; one day's retention (see bench/history.py);
             opt-in
  replicas   the throughput run through 1, 2 and 3 daemon processes on one consumer
             group and one database, with PostgreSQL's commits, WAL fsyncs and bytes
             per delivery and the connections held (see bench/replicas.py); opt-in

Default phases: sink,throughput,latency (30-45 s at --messages 2000 on the shared 2-core
machine, most of it starting PostgreSQL and the daemon). ``--modes off,auto,auto,off``
runs throughput and latency once per MAIL_SMTP_PIPELINING value, side by side in one run
(an ABBA order cancels the drift from one phase to the next).

Prints a short table and one JSON line (`BENCH_JSON {...}`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from bench.harness import (
    ALL,
    DAEMONS,
    REPO,
    SENDER_DOMAIN,
    SENT,
    Servers,
    command,
    count,
    daemon_env,
    start_daemon,
    statement_transactions,
    stop_daemon,
    wait_count,
    write_counters,
    xadd_all,
)
from bench.history import history
from bench.report import interrupt, table
from bench.sink import SinkCluster
from maildaemon.devstack.postgres import EmbeddedPostgres, ensure_database, pick_free_port
from maildaemon.devstack.redis import EmbeddedRedis
from maildaemon.message.mime import make_message_id


async def phase_throughput(
    servers: Servers, n: int, concurrency: int, pipelining: str = "auto"
) -> dict[str, Any]:
    dsn = await servers.fresh_database()
    port = pick_free_port()
    proc = await start_daemon(daemon_env(dsn, servers, port, concurrency, pipelining), port)
    flights0, messages0 = servers.sink.flights()
    cpu0 = proc.cpu_seconds()
    xid0, syncs0 = await write_counters(dsn)
    docs = [command(i, "tp") for i in range(n)]
    first = await xadd_all(servers.redis_addr, docs)
    produced = time.monotonic()
    done = await wait_count(dsn, SENT, n, proc)
    cpu = proc.cpu_seconds() - cpu0
    xid1, syncs1 = await write_counters(dsn)
    stop_daemon(proc)
    attempts = await count(dsn, "SELECT count(*) FROM mail.attempts WHERE status = 'sent'")
    elapsed = done - first
    await asyncio.sleep(1.1)  # the sink writes its counters every 0.5 s
    flights1, messages1 = servers.sink.flights()
    return {
        "pipelining": pipelining,
        "messages": n,
        "round_trips_per_message": round((flights1 - flights0) / max(messages1 - messages0, 1), 2),
        "elapsed_s": round(elapsed, 3),
        "deliveries_per_s": round(n / elapsed, 1),
        "producer_per_s": round(n / (produced - first), 1),
        "daemon_cpu_s": round(cpu, 2),
        "daemon_cpu_ms_per_delivery": round(cpu * 1000 / n, 3),
        "daemon_peak_rss_mb": round(proc.peak_rss_kb / 1024, 1),
        "write_transactions_per_delivery": round((xid1 - xid0) / n, 3),
        "wal_syncs_per_delivery": round((syncs1 - syncs0) / n, 3),
        "sent_attempts_recorded": attempts,
    }


async def phase_latency(
    servers: Servers,
    n: int,
    rate: float,
    concurrency: int,
    pipelining: str = "auto",
    tag: str = "",
) -> dict[str, Any]:
    """``tag`` keeps Message-IDs unique across runs against the same sink."""
    dsn = await servers.fresh_database()
    port = pick_free_port()
    proc = await start_daemon(daemon_env(dsn, servers, port, concurrency, pipelining), port)
    host, rport = servers.redis_addr.split(":")
    client = aioredis.Redis(host=host, port=int(rport))
    sent_at: dict[str, int] = {}
    xacts0 = await statement_transactions(dsn)
    cpu0 = proc.cpu_seconds()
    start = time.monotonic()
    for i in range(n):
        target = start + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        run = f"lat{pipelining}{tag}"
        sent_at[make_message_id(f"{run}-{i}", SENDER_DOMAIN)] = time.monotonic_ns()
        await client.xadd("mail:delivery_commands", {"command": command(i, run)})
    await client.aclose()
    await wait_count(dsn, SENT, n, proc)
    cpu = proc.cpu_seconds() - cpu0
    stop_daemon(proc)
    await asyncio.sleep(1.0)  # let the sink flush its arrival log (and PostgreSQL its counts)
    xacts = await statement_transactions(dsn) - xacts0
    arrivals = servers.sink.arrivals()
    lat = sorted((arrivals[m] - t) / 1e6 for m, t in sent_at.items() if m in arrivals)
    if not lat:
        raise RuntimeError("no arrivals matched")
    stages = await latency_stages(dsn, sent_at, arrivals)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2)

    return {
        "stages_p50_p99_ms": stages,
        "pipelining": pipelining,
        "messages": n,
        "rate_per_s": rate,
        "matched": len(lat),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": round(lat[-1], 2),
        "mean_ms": round(statistics.fmean(lat), 2),
        "daemon_cpu_ms_per_delivery": round(cpu * 1000 / n, 3),
        "pg_transactions_per_delivery": round(xacts / n, 2),
    }


STAGES_SQL = """
SELECT d.message_id,
       extract(epoch FROM d.created_at) AS created,
       extract(epoch FROM d.rendered_at) AS rendered,
       extract(epoch FROM a.started_at) AS started
  FROM mail.deliveries d JOIN mail.attempts a USING (delivery_id)
"""


async def latency_stages(
    dsn: str, sent_at: dict[str, int], arrivals: dict[str, int]
) -> dict[str, list[float]]:
    """Where the latency goes, per message (p50 and p99 of each stage, ms):
    intake (XADD → its intake transaction began), claim (→ rendered by the scheduler: intake
    commit, XACK, wake-up, claim statement, render), queue (→ a worker began the attempt:
    pin commit, queue wait), smtp (→ the sink accepted it)."""
    offset = time.time() - time.monotonic()  # wall clock of the database vs monotonic here
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(STAGES_SQL)
    finally:
        await conn.close()
    parts: dict[str, list[float]] = {"intake": [], "claim": [], "queue": [], "smtp": []}
    for row in rows:
        mid = row["message_id"]
        if mid not in sent_at or mid not in arrivals or row["rendered"] is None:
            continue
        xadd = sent_at[mid] / 1e9 + offset
        created, rendered, started = (float(row[k]) for k in ("created", "rendered", "started"))
        arrived = arrivals[mid] / 1e9 + offset
        parts["intake"].append(created - xadd)
        parts["claim"].append(rendered - created)
        parts["queue"].append(started - rendered)
        parts["smtp"].append(arrived - started)
    out = {}
    for name, values in parts.items():
        values.sort()
        if values:
            out[name] = [
                round(values[len(values) // 2] * 1000, 2),
                round(values[min(len(values) - 1, int(0.99 * len(values)))] * 1000, 2),
            ]
    return out


async def phase_intake_then_send(servers: Servers, n: int, concurrency: int) -> dict[str, Any]:
    dsn = await servers.fresh_database()
    port = pick_free_port()
    proc = await start_daemon(daemon_env(dsn, servers, port, concurrency), port)
    conn = await asyncpg.connect(dsn)
    await conn.execute("INSERT INTO mail.sending_pauses (scope, paused_by) VALUES ('*', 'bench')")
    await conn.close()
    cpu0 = proc.cpu_seconds()
    first = await xadd_all(servers.redis_addr, [command(i, "in") for i in range(n)])
    taken = await wait_count(dsn, ALL, n, proc)
    intake_cpu = proc.cpu_seconds() - cpu0
    conn = await asyncpg.connect(dsn)
    cpu1 = proc.cpu_seconds()
    released = time.monotonic()
    await conn.execute("DELETE FROM mail.sending_pauses; SELECT pg_notify('mail_due', '')")
    await conn.close()
    done = await wait_count(dsn, SENT, n, proc)
    send_cpu = proc.cpu_seconds() - cpu1
    stop_daemon(proc)
    return {
        "messages": n,
        "intake_per_s": round(n / (taken - first), 1),
        "intake_cpu_ms_per_command": round(intake_cpu * 1000 / n, 3),
        "send_per_s": round(n / (done - released), 1),
        "send_cpu_ms_per_delivery": round(send_cpu * 1000 / n, 3),
    }


async def phase_behind_backlog(
    servers: Servers, dsn: str, n: int, concurrency: int
) -> dict[str, Any]:
    """New mail through the daemon while the table holds a large retry backlog not yet
    due: it must go out at full speed, and the daemon's memory must not grow with it."""
    conn = await asyncpg.connect(dsn)
    await conn.execute("DELETE FROM mail.deliveries WHERE next_attempt_at <= now()")
    backlog = int(await conn.fetchval(ALL))
    await conn.close()
    host, port = servers.redis_addr.split(":")
    client = aioredis.Redis(host=host, port=int(port))
    await client.flushall()
    await client.aclose()
    http = pick_free_port()
    proc = await start_daemon(daemon_env(dsn, servers, http, concurrency), http)
    first = await xadd_all(servers.redis_addr, [command(i, "new") for i in range(n)])
    done = await wait_count(dsn, SENT, n, proc)
    stop_daemon(proc)
    return {
        "backlog_rows_not_due": backlog,
        "new_messages": n,
        "new_deliveries_per_s": round(n / (done - first), 1),
        "daemon_peak_rss_mb": round(proc.peak_rss_kb / 1024, 1),
    }


def phase_sink(servers: Servers, seconds: float, procs: int, connections: int) -> dict[str, Any]:
    """The sink alone, driven by ``procs`` client processes with ``connections`` each."""
    before = servers.sink.count()
    args = [
        sys.executable,
        "-m",
        "bench.sink_client",
        "--port",
        str(servers.sink.port),
        "--ca",
        str(servers.sink.ca_file),
        "--seconds",
        str(seconds),
        "--connections",
        str(connections),
    ]
    clients = [subprocess.Popen(args, cwd=str(REPO), stdout=subprocess.PIPE) for _ in range(procs)]
    sent = sum(int(c.communicate()[0].decode().strip() or 0) for c in clients)
    time.sleep(1.0)
    received = servers.sink.count() - before
    return {
        "seconds": seconds,
        "client_procs": procs,
        "connections": procs * connections,
        "messages_per_s": round(sent / seconds, 1),
        "received": received,
    }


def machine() -> dict[str, Any]:
    import aiosmtplib
    import asyncpg as apg
    import redis as rp

    return {
        "cores": os.cpu_count(),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        ),
        "python": platform.python_version(),
        "asyncpg": apg.__version__,
        "redis_py": rp.__version__,
        "aiosmtplib": aiosmtplib.__version__,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="maildaemon-bench-"))
    pg = EmbeddedPostgres(workdir / "pg", fast=False)  # fsync on: every commit is durable
    rd = EmbeddedRedis(workdir / "redis")
    sink = SinkCluster(
        workdir / "sink",
        procs=args.sink_procs,
        log=workdir / "arrivals",
        chunking=not args.sink_no_chunking,
    )
    results: dict[str, Any] = {"machine": machine()}
    try:
        admin = pg.start()
        redis_addr = rd.start()
        sink.start()
        servers = Servers(admin, redis_addr, sink, workdir)
        if "sink" in args.phases:
            results["sink_alone"] = phase_sink(servers, args.sink_seconds, 2, 8)
        for i, mode in enumerate(args.modes):
            # ABBA orders (off,auto,auto,off) cancel the drift from one phase to the next.
            again = args.modes[:i].count(mode)
            key = "" if i == 0 else f"[{mode}{'#' + str(again + 1) if again else ''}]"
            if "throughput" in args.phases:
                results[f"throughput{key}"] = await phase_throughput(
                    servers, args.messages, args.concurrency, mode
                )
            if "latency" in args.phases:
                results[f"latency{key}"] = await phase_latency(
                    servers, args.latency_messages, args.rate, args.concurrency, mode, str(i)
                )
        if "intake" in args.phases:
            results["intake_then_send"] = await phase_intake_then_send(
                servers, args.messages, args.concurrency
            )
        if "backlog" in args.phases:
            from bench.claims import claim_scaling

            claims_dsn = ensure_database(admin, "bench_claims")
            results["backlog"] = await claim_scaling(claims_dsn, args.backlog_rows)
            results["backlog"]["daemon_with_retry_backlog"] = await phase_behind_backlog(
                servers, claims_dsn, 1000, args.concurrency
            )
        if "history" in args.phases:
            results["history"] = await history(
                admin, args.history_rows, args.history_days, min(100_000, args.history_rows // 10)
            )
        if "matrix" in args.phases:
            from bench.matrix import phase_matrix
            from bench.matrix import table as matrix_table

            results["matrix"] = await phase_matrix(servers, workdir, args)
            results["matrix_table"] = matrix_table(results["matrix"])
        if "replicas" in args.phases:
            from bench.replicas import phase_scaling

            results["replicas"] = await phase_scaling(
                servers, args.messages, args.concurrency, args.replicas
            )
    finally:
        sink.stop()
        rd.stop()
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if pg.data_dir != workdir / "pg":
            shutil.rmtree(pg.data_dir, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--latency-messages", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=32,
        help="MAIL_ATTEMPT_WORKER_CONCURRENCY (SMTP connections)",
    )
    parser.add_argument("--sink-procs", type=int, default=2)
    parser.add_argument("--sink-seconds", type=float, default=2.0)
    parser.add_argument("--backlog-rows", type=int, default=1_000_000)
    parser.add_argument("--history-rows", type=int, default=1_000_000)
    parser.add_argument("--history-days", type=int, default=30)
    parser.add_argument(
        "--phases",
        default="sink,throughput,latency",
        type=lambda s: set(s.split(",")),
        help="also: intake (intake only, then send only), backlog, history, matrix, replicas",
    )
    parser.add_argument(
        "--modes",
        default=["auto"],
        type=lambda s: s.split(","),
        help="MAIL_SMTP_PIPELINING values, e.g. auto,off (matrix and throughput/latency)",
    )
    parser.add_argument("--sink-no-chunking", action="store_true", help="sink without BDAT")
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--rtts", default=[0, 5, 25, 50], type=floats, help="matrix RTTs, ms")
    parser.add_argument(
        "--conns", default=[1, 8, 32], type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument("--matrix-seconds", type=float, default=4.0, help="burst size, s")
    parser.add_argument("--matrix-messages", type=int, default=2000, help="burst size cap")
    parser.add_argument("--matrix-rate", type=float, default=50.0, help="latency rate, /s")
    parser.add_argument("--matrix-latency-seconds", type=float, default=4.0)
    parser.add_argument(
        "--replicas",
        default=[1, 2, 3],
        type=lambda s: [int(x) for x in s.split(",")],
        help="replica counts of the replicas phase",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        results = asyncio.run(run(args))
    finally:
        for proc in DAEMONS:  # a phase that failed may have left its daemon running
            if proc.popen.poll() is None:
                proc.popen.kill()
    print(table(results))
    print("BENCH_JSON " + json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
