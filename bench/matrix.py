"""The round-trip matrix: RTT x SMTP connections x transport mode, over a delayed link.

For each cell a fresh database and a daemon with ``MAIL_ATTEMPT_WORKER_CONCURRENCY`` =
connections and ``MAIL_SMTP_PIPELINING`` = mode; the sink runs in the link's namespace.
Per cell: a warm-up (every connection opened), then commands at a fixed rate
(XADD → SMTP acceptance latency; skipped when the rate is beyond what the cell can carry),
then a burst of commands (first XADD → last delivery committed `sent`): deliveries/s,
per-connection messages/s, round trips per message (reply flights the sink wrote for
transaction commands, per message accepted), daemon CPU per delivery, and the forwarder's
CPU (the link itself).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.harness import (
    SENDER_DOMAIN,
    SENT,
    Servers,
    command,
    daemon_env,
    start_daemon,
    stop_daemon,
    wait_count,
    xadd_all,
)
from bench.link import SINK_IP, DelayedLink
from bench.sink import SinkCluster
from maildaemon.devstack.postgres import pick_free_port
from maildaemon.message.mime import make_message_id


def _expected_round_trips(mode: str, chunking: bool) -> int:
    if mode == "off":
        return 4  # MAIL, RCPT, DATA, the message
    return 1 if chunking else 2


async def _at_rate(
    servers: Servers, sink: SinkCluster, run: str, n: int, rate: float
) -> dict[str, Any]:
    host, port = servers.redis_addr.split(":")
    client = aioredis.Redis(host=host, port=int(port))
    sent_at: dict[str, int] = {}
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at[make_message_id(f"{run}-{i}", SENDER_DOMAIN)] = time.monotonic_ns()
        await client.xadd("mail:delivery_commands", {"command": command(i, run)})
    await client.aclose()
    return sent_at


def _percentiles(sent_at: dict[str, int], arrivals: dict[str, int]) -> dict[str, Any]:
    lat = sorted((arrivals[m] - t) / 1e6 for m, t in sent_at.items() if m in arrivals)
    if not lat:
        return {"matched": 0}

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 1)

    return {"matched": len(lat), "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


async def _cell(
    servers: Servers,
    sink: SinkCluster,
    link: DelayedLink,
    mode: str,
    rtt: float,
    conns: int,
    args: Any,
    tag: str,
) -> dict[str, Any]:
    link.set_rtt(rtt)
    per_message_s = (rtt * _expected_round_trips(mode, sink.chunking) + 2.0) / 1000
    capacity = min(conns / per_message_s, 1000.0)  # a guess, to size the runs
    n = max(50, min(args.matrix_messages, int(capacity * args.matrix_seconds)))
    dsn = await servers.fresh_database()
    http = pick_free_port()
    env = daemon_env(dsn, servers, http, conns)
    env.update(
        MAIL_SMTP_ADDR=f"{SINK_IP}:{sink.port}",
        MAIL_SMTP_CA_FILE=str(sink.ca_file),
        MAIL_SMTP_PIPELINING=mode,
    )
    proc = await start_daemon(env, http)
    done = 0
    try:
        # Warm-up: every connection opened (STARTTLS at this RTT), not counted.
        warm = [command(i, f"{tag}w") for i in range(conns * 2)]
        await xadd_all(servers.redis_addr, warm)
        done += len(warm)
        await wait_count(dsn, SENT, done, proc)
        result: dict[str, Any] = {"mode": mode, "rtt_ms": rtt, "connections": conns}
        rate = args.matrix_rate
        if rate <= 0.7 * capacity:
            count = int(rate * args.matrix_latency_seconds)
            sent_at = await _at_rate(servers, sink, f"{tag}l", count, rate)
            done += count
            await wait_count(dsn, SENT, done, proc)
            await asyncio.sleep(0.6)  # the sink writes its arrival log every 0.5 s
            result["latency"] = {"rate_per_s": rate, **_percentiles(sent_at, sink.arrivals())}
        else:
            result["latency"] = {"rate_per_s": rate, "skipped": "beyond the cell's capacity"}
        await asyncio.sleep(0.6)
        flights0, messages0 = sink.flights()
        cpu0, link_cpu0 = proc.cpu_seconds(), link.cpu_seconds()
        first = await xadd_all(servers.redis_addr, [command(i, f"{tag}t") for i in range(n)])
        done += n
        end = await wait_count(dsn, SENT, done, proc)
        cpu, link_cpu = proc.cpu_seconds() - cpu0, link.cpu_seconds() - link_cpu0
        await asyncio.sleep(1.1)
        flights1, messages1 = sink.flights()
        elapsed = end - first
        result.update(
            messages=n,
            deliveries_per_s=round(n / elapsed, 1),
            per_connection_per_s=round(n / elapsed / conns, 2),
            round_trips_per_message=round((flights1 - flights0) / max(messages1 - messages0, 1), 2),
            daemon_cpu_ms_per_delivery=round(cpu * 1000 / n, 3),
            link_cpu_ms_per_delivery=round(link_cpu * 1000 / n, 3),
        )
        return result
    finally:
        stop_daemon(proc)


async def phase_matrix(servers: Servers, workdir: Path, args: Any) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    with DelayedLink() as link:
        sink = SinkCluster(
            workdir / "matrix-sink",
            procs=args.sink_procs,
            log=workdir / "matrix-arrivals",
            host=SINK_IP,
            netns=link.netns,
            chunking=not args.sink_no_chunking,
        )
        sink.start()
        try:
            for rtt in args.rtts:
                for conns in args.conns:
                    for mode in args.modes:
                        tag = f"c{len(cells)}"
                        cell = await _cell(servers, sink, link, mode, rtt, conns, args, tag)
                        print(_row(cell), flush=True)
                        cells.append(cell)
        finally:
            sink.stop()
    return cells


HEADER = (
    "| RTT | conns | mode | deliveries/s | per conn/s | RT/msg | CPU ms/delivery "
    "| link CPU ms | p50 / p99 ms (rate) |\n|---|---|---|---|---|---|---|---|---|"
)


def _row(c: dict[str, Any]) -> str:
    lat = c["latency"]
    if "p99_ms" in lat:
        latency = f"{lat['p50_ms']} / {lat['p99_ms']} ({lat['rate_per_s']:g}/s)"
    else:
        latency = f"- (> capacity at {lat['rate_per_s']:g}/s)"
    return (
        f"| {c['rtt_ms']:g} ms | {c['connections']} | {c['mode']} | {c['deliveries_per_s']} "
        f"| {c['per_connection_per_s']} | {c['round_trips_per_message']} "
        f"| {c['daemon_cpu_ms_per_delivery']} | {c['link_cpu_ms_per_delivery']} | {latency} |"
    )


def table(cells: list[dict[str, Any]]) -> str:
    return "\n".join([HEADER, *(_row(c) for c in cells)])
