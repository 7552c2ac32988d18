"""The claim reads only the rows it leases: an ordered index scan that stops at LIMIT, not a
sort of every due row, with a large backlog due at once and one source (EXPLAIN)."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from maildaemon.store.pipeline import statements as q

DUE = 100_000  # an outage's backlog, all due now, in one source (the planner's worst case)


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


async def test_the_claim_stops_after_its_batch_in_index_order(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(
            f"""
            INSERT INTO mail.deliveries (delivery_id, source, idempotency_key, command_hash,
                priority, payload_mode, to_addrs, next_attempt_at)
            SELECT 'd-' || g, 'notification', 'k-' || g, '\\x00'::bytea, (g % 4)::smallint,
                'template', ARRAY['u' || g || '@example.com'],
                now() - make_interval(secs => 3600 + g % 1000)
            FROM generate_series(1, {DUE}) AS g;
            INSERT INTO mail.sending_pauses (scope, paused_by) VALUES ('billing', 'test');
            """
        )
        await conn.execute("VACUUM ANALYZE mail.deliveries")
        raw = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {q.CLAIM_DUE}", 200, 60.0, "test", "ref-1"
        )
        plan = json.loads(raw)[0]
        nodes = _nodes(plan["Plan"])
        due_scans = [
            n
            for n in nodes
            if n.get("Relation Name") == "deliveries"
            and n.get("Alias") == "d"
            and n["Node Type"] != "ModifyTable"
        ]
        print(f"claim of 200 with {DUE} due: {plan['Execution Time']:.1f} ms", due_scans)
        assert due_scans, nodes
        for scan in due_scans:
            assert (scan["Node Type"], scan.get("Index Name")) == (
                "Index Scan",
                "deliveries_due_idx",
            ), scan
            # It read what it leased (a sort would read all 25,000 of the priority).
            assert scan["Actual Rows"] <= 200, scan
        assert not [n for n in nodes if n["Node Type"] == "Sort"], nodes
        claimed = await conn.fetchval(
            "SELECT count(*) FROM mail.deliveries WHERE status = 'sending'"
        )
        assert claimed == 200
    finally:
        await conn.close()
