"""SQL behind the operator console's reads: the stats time series, the pinned message
bytes, the malformed records that carried a delivery id. One named statement per step.
"""

from __future__ import annotations

# Counts per interval: $1 bucket width (seconds), $2 number of buckets. The buckets are
# aligned to the width on the database clock and the last one holds now; generate_series
# makes quiet intervals read as zeros. Each count is one range scan: deliveries_finished_idx,
# malformed_received_idx, dead_letters_created_idx (or a scan of that small table). EXPLAIN
# on 300,000 deliveries: 3-9 ms for 1h, 80-150 ms for 24h (tests/integration/
# test_stats_series_plan.py).
STATS_SERIES = """
WITH w AS (
    SELECT to_timestamp((floor(extract(epoch FROM now()) / $1::float8) - ($2::integer - 1))
                        * $1::float8) AS t0
), buckets AS (
    SELECT i, (SELECT t0 FROM w) + make_interval(secs => i * $1::float8) AS start
    FROM generate_series(0, $2::integer - 1) AS i
), ended AS (
    SELECT floor(extract(epoch FROM finished_at - (SELECT t0 FROM w)) / $1::float8)::integer
            AS i,
        count(*) FILTER (WHERE status = 'sent') AS sent,
        count(*) FILTER (WHERE status = 'failed') AS failed
    FROM mail.deliveries
    WHERE finished_at >= (SELECT t0 FROM w) AND finished_at IS NOT NULL
      AND status IN ('sent', 'failed')
    GROUP BY 1
), dead AS (
    SELECT floor(extract(epoch FROM created_at - (SELECT t0 FROM w)) / $1::float8)::integer
            AS i,
        count(*) AS n
    FROM mail.dead_letters
    WHERE created_at >= (SELECT t0 FROM w)
    GROUP BY 1
), bad AS (
    SELECT floor(extract(epoch FROM received_at - (SELECT t0 FROM w)) / $1::float8)::integer
            AS i,
        count(*) AS n
    FROM mail.malformed_commands
    WHERE received_at >= (SELECT t0 FROM w)
    GROUP BY 1
)
SELECT b.start, coalesce(e.sent, 0) AS sent, coalesce(e.failed, 0) AS failed,
    coalesce(d.n, 0) AS dead_lettered, coalesce(m.n, 0) AS malformed
FROM buckets b
LEFT JOIN ended e USING (i)
LEFT JOIN dead d USING (i)
LEFT JOIN bad m USING (i)
ORDER BY b.i
"""

# The exact bytes rendered once and sent on every attempt (NULL until the first claim).
RENDERED_MESSAGE = """
SELECT d.status, d.rendered_at, p.rendered
FROM mail.deliveries d
JOIN mail.delivery_payloads p USING (delivery_id)
WHERE d.delivery_id = $1
"""

# Stream entries refused at intake that named this delivery id, newest first.
MALFORMED_BY_DELIVERY = """
SELECT m.id, m.stream_entry_id, m.failure_code, m.failure_detail, m.delivery_id,
    m.source, m.raw, m.raw_truncated, m.received_at, m.replayed_at, m.replayed_delivery_id
FROM mail.malformed_commands m
WHERE m.delivery_id = $1
ORDER BY m.received_at DESC, m.id DESC
LIMIT $2
"""
