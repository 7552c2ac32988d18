"""The bytes one intake batch holds are bounded: a backlog far larger than the batch budget
is taken in by a real daemon process whose peak memory grows by much less than the backlog.

(The issue's case is 500 commands of 16 MiB against a 512 MiB pod with the default 16 MiB
budget: one command per batch. Here the same shape is scaled down: 24 commands of 4 MiB,
a 96 MiB backlog, a budget of one command.)
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from tests.acceptance.test_process import daemon_env, finish, spawn
from tests.support import Db, command, redis_client, wait_for

ENTRY_MB = 4
ENTRIES = 24


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_backlog_of_large_commands_is_taken_in_within_the_batch_budget(
    pg_dsn: str, redis_addr: str
) -> None:
    db = Db(pg_dsn)
    await db.fetch(
        "INSERT INTO mail.sending_pauses (scope, paused_by, reason)"
        " VALUES ('*', 'test', 'intake only') RETURNING scope"
    )
    env = daemon_env(
        pg_dsn,
        redis_addr,
        None,
        MAIL_COMMAND_MAX_BYTES=str(ENTRY_MB * 1024 * 1024 + 4096),
        MAIL_CONSUMER_BATCH_MAX_BYTES=str(ENTRY_MB * 1024 * 1024 + 4096),
    )
    proc = await spawn("run", env=env)
    try:
        await wait_for(lambda: db.fetchval("SELECT 1"), timeout=30)
        await asyncio.sleep(3)  # started, idle
        baseline = _peak_rss_mb(proc.pid)
        client = redis_client(redis_addr)
        try:
            body = "x" * (ENTRY_MB * 1024 * 1024 - 2048)
            pipe = client.pipeline(transaction=False)
            for i in range(ENTRIES):
                doc = command(
                    f"big-{i}",
                    payload_mode="rendered",
                    template_id=None,
                    variables=None,
                    locale=None,
                    subject="s",
                    text=body,
                )
                pipe.xadd("mail:delivery_commands", {"command": json.dumps(doc)})
            await pipe.execute()
        finally:
            await client.aclose()

        async def all_in() -> bool:
            return await db.fetchval("SELECT count(*) FROM mail.deliveries") == ENTRIES

        await wait_for(all_in, timeout=240, interval=0.5)
        peak = _peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        await finish(proc, 30)
    growth = peak - baseline
    print(f"\nintake of {ENTRIES} x {ENTRY_MB} MiB: RSS {baseline:.0f} -> {peak:.0f} MiB")
    # The whole backlog is 96 MiB; parsed, validated and serialised at once it would cost
    # about ten times that. One command per batch keeps the growth well below the backlog.
    assert growth < ENTRIES * ENTRY_MB * 0.75, (baseline, peak)
