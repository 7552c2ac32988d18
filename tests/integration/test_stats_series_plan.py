"""The stats time series is answered from indexes on a realistic table size (EXPLAIN)."""

from __future__ import annotations

import json
import time
from typing import Any

import asyncpg

from maildaemon.store.console import statements as q
from maildaemon.store.console.records import WINDOWS

DELIVERIES = 300_000  # three days of ~1 delivery/s, plus what retention keeps


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


async def test_series_query_uses_index_range_scans(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            f"""
            INSERT INTO mail.deliveries (delivery_id, source, idempotency_key, command_hash,
                status, payload_mode, to_addrs, next_attempt_at, created_at, finished_at)
            SELECT 'd-' || i, 'notification', 'k-' || i, '\\x00'::bytea,
                (ARRAY['sent','sent','sent','sent','failed','dead_letter','queued'])[i % 7 + 1],
                'template', ARRAY['a' || i || '@example.com'],
                CASE WHEN i % 7 = 6 THEN now() + interval '1 hour' END,
                now() - make_interval(secs => i * 0.86),
                CASE WHEN i % 7 <> 6 THEN now() - make_interval(secs => i * 0.86) + interval '2 s'
                END
            FROM generate_series(1, {DELIVERIES}) AS i;
            INSERT INTO mail.dead_letters (delivery_id, created_at, attempt_count, last_status)
            SELECT delivery_id, finished_at, 6, 'transport_failed'
            FROM mail.deliveries WHERE status = 'dead_letter';
            INSERT INTO mail.malformed_commands (stream_entry_id, failure_code, failure_detail,
                raw, received_at, delivery_id)
            SELECT i || '-0', 'invalid_field', 'x', '{{', now() - make_interval(secs => i * 9),
                'm-' || i
            FROM generate_series(1, 30000) AS i;
            """
        )
        await conn.execute("VACUUM ANALYZE mail.deliveries, mail.dead_letters")
        await conn.execute("VACUUM ANALYZE mail.malformed_commands")
        for window, (width, count) in WINDOWS.items():
            started = time.perf_counter()
            raw = await conn.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {q.STATS_SERIES}", width, count
            )
            elapsed = time.perf_counter() - started
            plan = json.loads(raw)[0]
            nodes = _nodes(plan["Plan"])
            scans = {
                n.get("Relation Name"): (n["Node Type"], n.get("Index Name"))
                for n in nodes
                if n.get("Relation Name")
            }
            print(f"window {window}: {plan['Execution Time']:.1f} ms in PostgreSQL, {scans}")
            # Deliveries: a range scan on deliveries_finished_idx (the retention worker's
            # index); measured 3-9 ms for 1h and 80-150 ms for 24h at this size. A covering
            # (finished_at, status) index was tried: the planner did not pick it, and it
            # would cost every terminal update on the hot path, so there is none.
            assert scans["deliveries"] == ("Index Scan", "deliveries_finished_idx")
            assert scans["malformed_commands"][0] != "Seq Scan"
            assert elapsed < 5
        raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {q.MALFORMED_BY_DELIVERY}", "m-7", 50)
        by_id = [n.get("Index Name") for n in _nodes(json.loads(raw)[0]["Plan"])]
        assert "malformed_delivery_idx" in by_id, by_id
        rows = await conn.fetch(q.STATS_SERIES, *WINDOWS["24h"])
        assert sum(r["sent"] for r in rows) > 0 and len(rows) == 96
    finally:
        await conn.close()
