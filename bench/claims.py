"""Claim scaling: the claim statement's latency with 10k vs 1M queued rows, and with a
large retry backlog that is not yet due (new mail must not wait behind it).

Rows are generated in SQL (generate_series), then the scheduler's own claim statement
(maildaemon.store.queries.CLAIM_DUE) is timed, batch of 200, lease released after each
claim so every sample sees the same table.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import asyncpg

from maildaemon.store.migrate import apply_migrations
from maildaemon.store.pipeline import statements as q

_FILL = """
INSERT INTO mail.deliveries (delivery_id, source, idempotency_key, command_hash, priority,
    payload_mode, template_id, locale, to_addrs, next_attempt_at, created_at)
SELECT $1 || g, 'notification', $1 || g, '\\x00', (g % 4)::smallint, 'template',
    'signin_code', 'en', ARRAY['user' || (g % 1000) || '@example.com'],
    now() + make_interval(secs => $3) - make_interval(secs => (g % 1000)), now()
FROM generate_series(1, $2) AS g
"""
_RELEASE = """
UPDATE mail.deliveries SET status = 'queued', next_attempt_at = now() - interval '1 second',
    attempt_count = attempt_count - 1
WHERE delivery_id = ANY($1::text[])
"""


async def _time_claims(
    conn: asyncpg.Connection, samples: int = 30, batch: int = 200
) -> dict[str, float]:
    times: list[float] = []
    got = 0
    for _ in range(samples):
        start = time.perf_counter()
        rows = await conn.fetch(q.CLAIM_DUE, batch, 60.0, "bench", "bench-claim")
        times.append((time.perf_counter() - start) * 1000)
        got = len(rows)
        await conn.execute(_RELEASE, [r["delivery_id"] for r in rows])
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 3),
        "p95_ms": round(times[int(0.95 * len(times)) - 1], 3),
        "claimed": got,
    }


async def claim_scaling(dsn: str, big: int = 1_000_000) -> dict[str, Any]:
    apply_migrations(dsn)
    conn = await asyncpg.connect(dsn, server_settings={"jit": "off"})
    out: dict[str, Any] = {}
    try:
        for rows in (10_000, big):
            await conn.execute("TRUNCATE mail.deliveries CASCADE")
            await conn.execute(_FILL, f"due{rows}-", rows, -3600.0)  # all due
            await conn.execute("VACUUM ANALYZE mail.deliveries")
            out[f"due_{rows}"] = await _time_claims(conn)
        # A big retry backlog not yet due, plus a little new mail that is due now.
        await conn.execute("TRUNCATE mail.deliveries CASCADE")
        await conn.execute(_FILL, "retry-", big, 3600.0)
        await conn.execute(_FILL, "new-", 1000, -1.0)
        await conn.execute("VACUUM ANALYZE mail.deliveries")
        out[f"due_1000_behind_{big}_not_due"] = await _time_claims(conn)
        small = out["due_10000"]["median_ms"]
        out["ratio_big_vs_10k"] = round(out[f"due_{big}"]["median_ms"] / small, 2)
        out["rss_note"] = "claim memory is O(batch): rows are never loaded beyond the batch"
    finally:
        await conn.close()
    return out
