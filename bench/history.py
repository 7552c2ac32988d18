"""History at size: the statements an operator and the scheduler run, against a large
history and a small one, and what one day's retention costs (issue 21, item 3).

    python -m bench.history --rows 5000000 --days 30

Two databases are filled server-side (``INSERT ... SELECT generate_series``, one statement
per day and table, the intake triggers filling recipients and return-path references as
they do for real intake): ``--rows`` deliveries spread evenly over ``--days`` days, and
``--small-rows`` (100,000) **at the same daily rate**, so the small one is the newest part
of the large one's shape and the two differ only in how much history lies behind. Each
delivery has its attempt, its payload (the command and ``--rendered-bytes`` of a rendered
message, as compressible as real mail) and its recipient rows; 2 % failed, 1 % bounced,
0.5 % dead-lettered. ``--due`` deliveries are queued and due now in both.

Timed on each (p50/p99 of ``--samples``), with PostgreSQL's own statements:
  claim      the scheduler's claim of 200 (``CLAIM_DUE``), lease released after each
  lookup     the API's delivery view (``DELIVERY`` + ``ATTEMPTS``) of a random delivery
  recipient  the recipient search (``LIST_DELIVERIES_BY_RECIPIENT``, a page of 50) for a
             random recipient (recipients are drawn so that each has ~``--per-recipient``
             deliveries at both sizes)
  stats_1h   the console's time series over the last hour (``STATS_SERIES``; the same
             number of rows per hour at both sizes; 24h is printed too)
then the retention worker's own purge statements run until the oldest day is gone:
seconds, statements, WAL bytes and the dead tuples left behind (today's schema deletes
rows; a partitioned one would drop the day). Bytes per delivery: tables, indexes and
TOAST of schema ``mail`` over the number of deliveries.

Prints a table and one ``BENCH_JSON`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from bench.report import interrupt, table
from maildaemon.devstack.postgres import EmbeddedPostgres, ensure_database
from maildaemon.store.console import statements as console_q
from maildaemon.store.console.records import WINDOWS
from maildaemon.store.migrate import apply_migrations
from maildaemon.store.operator import statements as operator_q
from maildaemon.store.pipeline import statements as q

# A chunk of deliveries, ids h<g> for g in [$2, $3], h<g> created g * $5 seconds before $1
# (now: h0 is the newest), terminal, each with its attempt, its payload and (dead-lettered
# ones) its dead letter, in one statement; the intake triggers fill recipients and
# return-path references. $4 is the number of distinct recipients, $6 the rendered size.
_FILL = """
WITH d AS (
    INSERT INTO mail.deliveries (delivery_id, source, idempotency_key, command_hash, status,
        priority, payload_mode, template_id, locale, to_addrs, attempt_count, message_id,
        content_hash, rendered_at, stream_entry_id, last_reply_code, last_reply_text,
        status_reason, created_at, updated_at, finished_at)
    SELECT 'h' || g, 'notification', 'k' || g, '\\x00'::bytea, s.status, (g % 4)::smallint,
        'template', 'signin_code', 'en',
        ARRAY['user' || (g % $4) || '@d' || ((g % $4) % 997) || '.example'], 1,
        '<h' || g || '@mail.example.com>', md5(g::text), t.at, t.ms || '-' || g,
        CASE s.status WHEN 'sent' THEN 250 WHEN 'dead_letter' THEN 451 ELSE 550 END,
        CASE s.status WHEN 'sent' THEN '2.0.0 Ok: queued as ' || upper(left(md5(g::text), 10))
            ELSE '5.1.1 <user' || (g % $4) || '>: Recipient address rejected' END,
        CASE s.status WHEN 'sent' THEN NULL ELSE 'provider_rejected' END,
        t.at, t.at + interval '2 seconds', t.at + interval '2 seconds'
    FROM generate_series($2::bigint, $3::bigint) AS g,
    LATERAL (SELECT $1::timestamptz - make_interval(secs => g * $5::float8) AS at,
                    (extract(epoch FROM $1::timestamptz) * 1000)::bigint AS ms) AS t,
    LATERAL (SELECT CASE WHEN g % 200 = 7 THEN 'dead_letter' WHEN g % 100 = 3 THEN 'bounced'
                         WHEN g % 50 = 1 THEN 'failed' ELSE 'sent' END AS status) AS s
    RETURNING *
), attempts AS (
    INSERT INTO mail.attempts (delivery_id, attempt_no, status, started_at, finished_at,
        reply_code, reply_text, recipients, worker)
    SELECT d.delivery_id, 1, CASE WHEN d.status IN ('sent', 'bounced') THEN 'sent'
            WHEN d.status = 'dead_letter' THEN 'transport_failed' ELSE 'provider_rejected' END,
        d.created_at + interval '1 second', d.finished_at, d.last_reply_code,
        d.last_reply_text,
        jsonb_build_object(d.to_addrs[1], jsonb_build_object('code', d.last_reply_code,
            'text', d.last_reply_text, 'outcome', 'accepted')), 'bench-1'
    FROM d
), payloads AS (
    -- The command as a producer sends it, and a rendered message: MIME boilerplate that
    -- compresses like real mail, around per-delivery text that does not.
    INSERT INTO mail.delivery_payloads (delivery_id, command, rendered, rendered_size)
    SELECT d.delivery_id,
        jsonb_build_object('delivery_id', d.delivery_id, 'source', d.source,
            'idempotency_key', d.idempotency_key, 'template_id', 'signin_code',
            'locale', 'en', 'to', d.to_addrs,
            'variables', jsonb_build_object('code', right(d.content_hash, 6),
                                            'name', 'User ' || d.delivery_id)),
        r.bytes, length(r.bytes)
    FROM d,
    LATERAL (SELECT convert_to(left(
        'Message-ID: ' || d.message_id || E'\\r\\nFrom: Example <noreply@mail.example.com>'
        || E'\\r\\nTo: ' || d.to_addrs[1] || E'\\r\\nSubject: Your sign-in code\\r\\n'
        || E'MIME-Version: 1.0\\r\\nContent-Type: text/plain; charset=utf-8\\r\\n\\r\\n'
        || repeat('Your code is ' || right(d.content_hash, 6) || '. It expires in ten '
                  || 'minutes. ' || md5(d.delivery_id || 'x') || E'\\r\\n', $6::integer / 90 + 1),
        $6::integer), 'UTF8') AS bytes) AS r
)
INSERT INTO mail.dead_letters (delivery_id, created_at, attempt_count, last_status,
    last_reply_code, last_reply_text)
SELECT delivery_id, finished_at, 1, 'transport_failed', last_reply_code, last_reply_text
FROM d WHERE status = 'dead_letter'
"""

_DUE = """
INSERT INTO mail.deliveries (delivery_id, source, idempotency_key, command_hash, priority,
    payload_mode, template_id, locale, to_addrs, next_attempt_at)
SELECT 'due' || g, 'notification', 'due' || g, '\\x00'::bytea, (g % 4)::smallint, 'template',
    'signin_code', 'en', ARRAY['due' || g || '@d1.example'],
    now() - make_interval(secs => 60 + g % 1000)
FROM generate_series(1, $1::integer) AS g
"""

_RELEASE = """
UPDATE mail.deliveries SET status = 'queued', next_attempt_at = now() - interval '1 second',
    attempt_count = attempt_count - 1
WHERE delivery_id = ANY ($1::text[])
"""

_SIZES = """
SELECT coalesce(sum(pg_table_size(c.oid)), 0)::bigint AS tables,
       coalesce(sum(pg_indexes_size(c.oid)), 0)::bigint AS indexes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'mail' AND c.relkind = 'r'
"""

_DEAD_TUPLES = """
SELECT coalesce(sum(n_dead_tup), 0)::bigint FROM pg_stat_user_tables WHERE schemaname = 'mail'
"""

_CHUNK = 200_000  # rows per statement while filling (bounded memory for the triggers)


async def fill(
    conn: asyncpg.Connection,
    rows: int,
    per_day: int,
    per_recipient: int,
    rendered_bytes: int,
    due: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """``rows`` terminal deliveries at ``per_day`` a day ending now, and ``due`` due ones."""
    started = time.perf_counter()
    recipients = max(rows // per_recipient, 1)
    days = -(-rows // per_day)
    now = await conn.fetchval("SELECT now()")
    step = 86400.0 / per_day  # seconds between deliveries: the same rate at every size
    for lo in range(0, rows, _CHUNK):
        hi = min(lo + _CHUNK, rows) - 1
        await conn.execute(_FILL, now, lo, hi, recipients, step, rendered_bytes)
        progress(f"filled {hi + 1:,}/{rows:,} deliveries ({(hi + 1) / per_day:.1f} days)")
    await conn.execute(_DUE, due)
    await conn.execute("VACUUM ANALYZE")
    return {"fill_s": round(time.perf_counter() - started, 1), "days": days}


async def _timed(samples: int, call: Callable[[int], Awaitable[object]]) -> dict[str, float]:
    times = []
    for i in range(samples):
        t0 = time.perf_counter()
        await call(i)
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 3),
        "p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))], 3),
    }


async def measure(
    conn: asyncpg.Connection, rows: int, per_recipient: int, samples: int
) -> dict[str, Any]:
    rng = random.Random(7)
    recipients = max(rows // per_recipient, 1)
    out: dict[str, Any] = {
        "deliveries": await conn.fetchval("SELECT count(*) FROM mail.deliveries")
    }

    # The claim alone is timed (the release that keeps every sample on the same table is not).
    claim_times: list[float] = []
    for _ in range(max(samples // 4, 20)):
        t0 = time.perf_counter()
        leased = await conn.fetch(q.CLAIM_DUE, 200, 60.0, "bench", "bench-claim")
        claim_times.append((time.perf_counter() - t0) * 1000)
        await conn.execute(_RELEASE, [r["delivery_id"] for r in leased])
    claim_times.sort()
    out["claim_200"] = {
        "p50_ms": round(statistics.median(claim_times), 3),
        "p99_ms": round(claim_times[int(0.99 * len(claim_times))], 3),
    }

    async def lookup(_: int) -> None:
        delivery_id = f"h{rng.randrange(rows)}"
        row = await conn.fetchrow(operator_q.DELIVERY, delivery_id)
        assert row is not None, delivery_id
        await conn.fetch(operator_q.ATTEMPTS, delivery_id)

    async def recipient(_: int) -> None:
        user = rng.randrange(recipients)
        address = f"user{user}@d{user % 997}.example"
        await conn.fetch(
            operator_q.LIST_DELIVERIES_BY_RECIPIENT, None, None, address, None, None, None, None, 51
        )

    def stats(window: str) -> Callable[[int], Awaitable[object]]:
        width, count = WINDOWS[window]
        return lambda _: conn.fetch(console_q.STATS_SERIES, width, count)

    out["lookup_by_id"] = await _timed(samples, lookup)
    out["recipient_search"] = await _timed(samples, recipient)
    out["stats_1h"] = await _timed(max(samples // 10, 5), stats("1h"))
    out["stats_24h"] = await _timed(3, stats("24h"))
    sizes = await conn.fetchrow(_SIZES)
    assert sizes is not None
    n = max(out["deliveries"], 1)
    out["table_bytes_per_delivery"] = round(sizes["tables"] / n)
    out["index_bytes_per_delivery"] = round(sizes["indexes"] / n)
    return out


async def _dead_tuples(conn: asyncpg.Connection) -> int:
    """Dead tuples in schema ``mail``, this backend's own counts flushed first (PG 15+)."""
    try:
        await conn.execute("SELECT pg_stat_force_next_flush()")
    except asyncpg.UndefinedFunctionError:
        await asyncio.sleep(1.0)  # before 15: the statistics collector's next report
    return int(await conn.fetchval(_DEAD_TUPLES))


async def retention_of_oldest_day(conn: asyncpg.Connection, batch: int = 1000) -> dict[str, Any]:
    """The retention worker's purge, its age set so that the oldest 24 hours of history
    (everything, when there is less than a day) are past it."""
    oldest = await conn.fetchval("SELECT min(finished_at) FROM mail.deliveries")
    age = await conn.fetchval(
        "SELECT extract(epoch FROM now() - $1::timestamptz) - 86400",
        oldest,
    )
    day_rows = await conn.fetchval(
        "SELECT count(*) FROM mail.deliveries"
        " WHERE finished_at < now() - make_interval(secs => $1)",
        age,
    )
    wal0 = await conn.fetchval("SELECT pg_current_wal_lsn()")
    dead0 = await _dead_tuples(conn)
    statements = 0
    deleted = 0
    t0 = time.perf_counter()
    while True:
        status = await conn.execute(q.PURGE_DELIVERIES, batch, float(age))
        statements += 1
        done = int(status.split()[-1])
        deleted += done
        if done < batch:
            break
    elapsed = time.perf_counter() - t0
    wal = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", wal0)
    dead = await _dead_tuples(conn)
    return {
        "day_deliveries": day_rows,
        "deleted": deleted,
        "seconds": round(elapsed, 2),
        "statements": statements,
        "wal_mb": round(float(wal) / 1e6, 1),
        "dead_tuples_left": dead - dead0,
    }


async def history(
    admin_dsn: str,
    rows: int,
    days: int,
    small_rows: int = 100_000,
    per_recipient: int = 50,
    rendered_bytes: int = 2500,
    due: int = 10_000,
    samples: int = 200,
    progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    per_day = -(-rows // days)
    out: dict[str, Any] = {"per_day": per_day, "rendered_bytes": rendered_bytes, "due": due}
    for label, n in (("small", min(small_rows, rows)), ("large", rows)):
        dsn = ensure_database(admin_dsn, f"bench_history_{label}")
        apply_migrations(dsn)
        conn = await asyncpg.connect(dsn, server_settings={"jit": "off"})
        try:
            progress(f"{label}: filling {n:,} deliveries at {per_day:,} a day")
            result = await fill(conn, n, per_day, per_recipient, rendered_bytes, due, progress)
            result.update(await measure(conn, n, per_recipient, samples))
            result["retention_of_oldest_day"] = await retention_of_oldest_day(conn)
            out[label] = result
        finally:
            await conn.close()
    for key in ("claim_200", "lookup_by_id", "recipient_search", "stats_1h"):
        small, large = out["small"][key]["p50_ms"], out["large"][key]["p50_ms"]
        out.setdefault("ratio_large_small_p50", {})[key] = (
            round(large / small, 2) if small else None
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--small-rows", type=int, default=100_000)
    parser.add_argument("--per-recipient", type=int, default=50)
    parser.add_argument("--rendered-bytes", type=int, default=2500)
    parser.add_argument("--due", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument(
        "--data-dir", type=Path, help="PostgreSQL data directory (kept; default: a temporary one)"
    )
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, interrupt)  # a killed run stops its PostgreSQL too
    workdir = Path(tempfile.mkdtemp(prefix="maildaemon-history-"))
    pg = EmbeddedPostgres(args.data_dir or workdir / "pg", fast=False)
    try:
        admin = pg.start()
        results = asyncio.run(
            history(
                admin,
                args.rows,
                args.days,
                args.small_rows,
                args.per_recipient,
                args.rendered_bytes,
                args.due,
                args.samples,
            )
        )
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if args.data_dir is None and pg.data_dir != workdir / "pg":  # a copy run as root
            shutil.rmtree(pg.data_dir, ignore_errors=True)
    print(table({"history": results}))
    print("BENCH_JSON " + json.dumps({"history": results}, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
