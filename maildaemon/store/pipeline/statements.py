"""The delivery pipeline's SQL, one named statement per step. Batches travel as arrays or JSON."""

from __future__ import annotations

# --- intake -------------------------------------------------------------------------------

# Take new commands in, in one statement: reserve (source, idempotency_key) for each; insert
# the delivery and its payload for each key reserved now; wake the schedulers when a
# delivery was inserted (the payload of the notification names this process: see
# ``Store.listen``). Returns one row per key reserved now, with whether its delivery was
# inserted (not: the delivery id exists already). A key taken already returns no row.
# Reservations and inserts are ordered by key and id, so concurrent batches never deadlock.
INGEST_FRESH = """
WITH res AS (
    INSERT INTO mail.idempotency_reservations
        (source, idempotency_key, delivery_id, command_hash, expires_at)
    SELECT r.source, r.key, r.delivery_id, r.hash, now() + make_interval(secs => $5)
    FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])
        AS r(source, key, delivery_id, hash)
    ORDER BY r.source, r.key
    ON CONFLICT (source, idempotency_key) DO NOTHING
    RETURNING delivery_id
), rows AS (
    SELECT r.* FROM jsonb_to_recordset($6::jsonb) AS r(
        delivery_id text, source text, idempotency_key text, command_hash text,
        priority smallint, payload_mode text, template_id text, locale text,
        to_addrs text[], cc_addrs text[], bcc_addrs text[], reply_to text,
        send_at timestamptz, expires_at timestamptz, stream_entry_id text,
        traceparent text, command jsonb)
    JOIN res USING (delivery_id)
), ins AS (
    INSERT INTO mail.deliveries (
        delivery_id, source, idempotency_key, command_hash, priority, payload_mode,
        template_id, locale, to_addrs, cc_addrs, bcc_addrs, reply_to, send_at, expires_at,
        next_attempt_at, stream_entry_id, traceparent)
    SELECT delivery_id, source, idempotency_key, decode(command_hash, 'hex'), priority,
        payload_mode, template_id, locale, to_addrs, cc_addrs, bcc_addrs, reply_to, send_at,
        expires_at, coalesce(send_at, now()), stream_entry_id, traceparent
    FROM rows
    ORDER BY delivery_id
    ON CONFLICT (delivery_id) DO NOTHING
    RETURNING delivery_id
), pay AS (
    INSERT INTO mail.delivery_payloads (delivery_id, command)
    SELECT rows.delivery_id, rows.command FROM rows JOIN ins USING (delivery_id)
)
SELECT res.delivery_id, ins.delivery_id IS NOT NULL AS inserted,
    (SELECT count(pg_notify('mail_due', $7)) FROM (SELECT 1 FROM ins LIMIT 1) AS any_new)
        AS woken
FROM res LEFT JOIN ins USING (delivery_id)
"""

# Existing reservations for keys that were already taken.
EXISTING_RESERVATIONS = """
SELECT r.source, r.idempotency_key, r.delivery_id, r.command_hash
FROM mail.idempotency_reservations r
JOIN unnest($1::text[], $2::text[]) AS k(source, key)
  ON r.source = k.source AND r.idempotency_key = k.key
"""

DROP_RESERVATIONS = """
DELETE FROM mail.idempotency_reservations r
USING unnest($1::text[], $2::text[]) AS k(source, key)
WHERE r.source = k.source AND r.idempotency_key = k.key
"""

EXISTING_DELIVERY_HASHES = """
SELECT delivery_id, command_hash FROM mail.deliveries WHERE delivery_id = ANY($1::text[])
"""

RECORD_REPLAYS = """
INSERT INTO mail.command_replays (stream_entry_id, delivery_id)
SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT DO NOTHING
"""

RECORD_MALFORMED = """
INSERT INTO mail.malformed_commands
    (stream_entry_id, failure_code, failure_detail, delivery_id, source, raw, raw_truncated)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::bool[])
ON CONFLICT (stream_entry_id) DO NOTHING
"""

# The payload names the process that took the batch in: it woke its own scheduler already
# and ignores its own notification (see ``Store.listen``).
NOTIFY_DUE = "SELECT pg_notify('mail_due', $1)"

# --- scheduler ----------------------------------------------------------------------------

# Claim up to $1 due deliveries: highest priority first, then the longest due. Each
# priority is a bounded range scan of the partial index, so the claim costs O(batch)
# whatever the size of the table or of a not-yet-due retry backlog. Sources in $4 are
# paused and skipped (a global pause never gets here). The lease is the new
# next_attempt_at: a claim whose holder died becomes due again when it expires.
# A delivery still `sending` when claimed again was interrupted mid-attempt: it may
# already have reached the recipient, so the new attempt counts as a possible duplicate,
# and the attempt its dead holder left open is closed as `unknown`. The same statement
# puts the new attempt on record as `started` before any byte goes out (the result writer
# completes the row), so an attempt is never invisible, at no extra round trip.
CLAIM_DUE = """
WITH paused AS MATERIALIZED (
    SELECT coalesce(array_agg(scope), '{}') AS scopes FROM mail.sending_pauses
), due AS (
    SELECT c.delivery_id, c.status AS was
    FROM paused, unnest('{0,1,2,3}'::smallint[]) AS p(prio)
    CROSS JOIN LATERAL (
        SELECT d.delivery_id, d.status
        FROM mail.deliveries d
        WHERE d.priority = p.prio
          AND d.next_attempt_at <= now()
          -- Not `d.source <> ALL (paused.scopes)`: with few distinct sources the planner
          -- estimates that to match ~1 row (1 - 1/n_distinct per scope) and plans a bitmap
          -- scan plus a sort of every due row of the priority (25,000 of 100,000 due: 2x the
          -- claim's time). An expression it has no statistics for is estimated at 1/3, which
          -- keeps the ordered index scan that stops after LIMIT rows
          -- (tests/integration/test_claim_plan.py).
          AND coalesce(array_position(paused.scopes, d.source), 0) < 1
          AND NOT '*' = ANY (paused.scopes)
        ORDER BY d.next_attempt_at
        LIMIT $1
        FOR UPDATE OF d SKIP LOCKED
    ) c
    LIMIT $1
), claimed AS (
    UPDATE mail.deliveries d
    SET status = 'sending',
        claim_token = d.claim_token + 1,
        claimed_by = $3,
        claim_ref = $4,
        attempt_count = d.attempt_count + 1,
        possible_duplicate = d.possible_duplicate OR d.status = 'sending',
        next_attempt_at = now() + make_interval(secs => $2),
        updated_at = now()
    WHERE d.delivery_id = ANY (ARRAY(SELECT delivery_id FROM due))
    RETURNING d.delivery_id, d.source, d.claim_token, d.attempt_count, d.priority, d.to_addrs,
        d.rcpts_accepted, d.attempt_count - d.ladder_base AS ladder_rung,
        d.cc_addrs, d.bcc_addrs, d.pending_rcpts, d.expires_at, d.message_id, d.traceparent,
        d.possible_duplicate, d.rendered_at, d.stream_entry_id
), abandoned AS (
    UPDATE mail.attempts a
    SET status = 'unknown', finished_at = now(),
        reply_text = 'the process holding the lease stopped before recording a result '
                     || '(lease expired, claim taken over): outcome unknown'
    FROM due
    WHERE a.delivery_id = due.delivery_id AND due.was = 'sending' AND a.status = 'started'
), opened AS (
    INSERT INTO mail.attempts (delivery_id, attempt_no, status, started_at, finished_at, worker)
    SELECT delivery_id, attempt_count, 'started', now(), now(), $3 FROM claimed
    ON CONFLICT (delivery_id, attempt_no) DO NOTHING
)
SELECT c.delivery_id, c.source, c.claim_token, c.attempt_count, c.priority, c.to_addrs,
    c.rcpts_accepted, c.ladder_rung, c.cc_addrs, c.bcc_addrs, c.pending_rcpts, c.expires_at,
    c.message_id, c.traceparent, c.possible_duplicate, c.stream_entry_id,
    CASE WHEN c.rendered_at IS NULL THEN (
        SELECT p.command::text FROM mail.delivery_payloads p WHERE p.delivery_id = c.delivery_id
    ) END AS command,
    CASE WHEN c.rendered_at IS NOT NULL THEN (
        SELECT p.rendered FROM mail.delivery_payloads p WHERE p.delivery_id = c.delivery_id
    ) END AS rendered
FROM claimed c
"""

# The end of both releases: the attempt each claim opened is withdrawn (nothing was sent).
_WITHDRAW_OPENED = """
), withdrawn AS (
    DELETE FROM mail.attempts a USING upd
    WHERE a.delivery_id = upd.delivery_id AND a.attempt_no = upd.attempt_no
      AND a.status = 'started'
)
SELECT count(*) FROM upd
"""

# Give unstarted claims back (shutdown, destination down): due again at once, fenced by
# the claim token; the attempt opened by the claim is withdrawn (nothing was sent).
RELEASE_CLAIMS = (
    """
WITH r AS (
    SELECT * FROM unnest($1::text[], $2::bigint[]) AS r(delivery_id, claim_token)
), upd AS (
    UPDATE mail.deliveries d
    SET status = 'queued',
        next_attempt_at = now(), claimed_by = NULL, attempt_count = d.attempt_count - 1,
        updated_at = now()
    FROM r
    WHERE d.delivery_id = r.delivery_id AND d.claim_token = r.claim_token
      AND d.status = 'sending'
    RETURNING d.delivery_id, d.attempt_count + 1 AS attempt_no"""
    + _WITHDRAW_OPENED
)

# Give back the deliveries one claim statement leased when the daemon never learnt that it
# committed (its reply was lost with the connection): found by the statement's claim_ref,
# still 'sending' under it (so nobody took them over since), and never handed to a worker.
RELEASE_LOST_CLAIMS = (
    """
WITH upd AS (
    UPDATE mail.deliveries d
    SET status = 'queued',
        next_attempt_at = now(), claimed_by = NULL, claim_ref = NULL,
        attempt_count = d.attempt_count - 1, updated_at = now()
    WHERE d.status = 'sending' AND d.claim_ref = ANY ($1::text[])
    RETURNING d.delivery_id, d.attempt_count + 1 AS attempt_no"""
    + _WITHDRAW_OPENED
)

# Pin the rendered message before the first send (fenced).
PIN_RENDERED = """
WITH r AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bytea[],
                         $6::text[])
        AS r(delivery_id, claim_token, message_id, content_hash, rendered, locale)
), upd AS (
    -- locale: the one the template was rendered in (a command without one, or with one
    -- the catalog lacks, falls back), so the record says what the recipient got.
    UPDATE mail.deliveries d
    SET rendered_at = now(), message_id = r.message_id, content_hash = r.content_hash,
        locale = coalesce(r.locale, d.locale), updated_at = now()
    FROM r
    WHERE d.delivery_id = r.delivery_id AND d.claim_token = r.claim_token
    RETURNING d.delivery_id
), pay AS (
    UPDATE mail.delivery_payloads p
    SET rendered = r.rendered, rendered_size = length(r.rendered)
    FROM r JOIN upd USING (delivery_id)
    WHERE p.delivery_id = r.delivery_id
)
SELECT delivery_id FROM upd
"""


ACTIVE_SUPPRESSIONS = """
SELECT address, reason FROM mail.suppressions
WHERE address = ANY($1::text[]) AND (expires_at IS NULL OR expires_at > now())
"""

# --- results ------------------------------------------------------------------------------

# Record a batch of attempt results. Every write is fenced by the claim token: a worker
# whose lease expired and was reclaimed changes nothing. Returns the ids recorded.
RECORD_RESULTS = """
WITH r AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(
        delivery_id text, claim_token bigint, attempt_no integer, attempt_status text,
        delivery_status text, started_at timestamptz, finished_at timestamptz,
        reply_code integer, reply_text text, recipients jsonb, next_attempt_at timestamptz,
        pending_rcpts text[], keep_pending boolean, status_reason text, failure_code text,
        terminal boolean,
        possible_duplicate boolean, record_attempt boolean, claimed boolean,
        accepted_now integer, worker text, event jsonb)
), upd AS (
    UPDATE mail.deliveries d
    SET status = r.delivery_status,
        next_attempt_at = r.next_attempt_at,
        pending_rcpts = CASE WHEN r.keep_pending THEN d.pending_rcpts ELSE r.pending_rcpts END,
        last_reply_code = coalesce(r.reply_code, d.last_reply_code),
        last_reply_text = coalesce(r.reply_text, d.last_reply_text),
        status_reason = r.status_reason,
        failure_code = r.failure_code,
        rcpts_accepted = d.rcpts_accepted + r.accepted_now,
        possible_duplicate = d.possible_duplicate OR r.possible_duplicate,
        attempt_count = CASE WHEN r.record_attempt OR NOT r.claimed THEN d.attempt_count
                             ELSE d.attempt_count - 1 END,
        claimed_by = NULL,
        finished_at = CASE WHEN r.terminal THEN now() END,
        updated_at = now()
    FROM r
    WHERE d.delivery_id = r.delivery_id AND d.claim_token = r.claim_token
    RETURNING d.delivery_id, d.attempt_count
), att AS (
    INSERT INTO mail.attempts (delivery_id, attempt_no, status, started_at, finished_at,
                               reply_code, reply_text, recipients, worker)
    SELECT r.delivery_id, r.attempt_no, r.attempt_status, r.started_at, r.finished_at,
           r.reply_code, r.reply_text, r.recipients, r.worker
    FROM r JOIN upd USING (delivery_id)
    WHERE r.record_attempt
    ON CONFLICT (delivery_id, attempt_no) DO UPDATE
    SET status = excluded.status, started_at = excluded.started_at,
        finished_at = excluded.finished_at, reply_code = excluded.reply_code,
        reply_text = excluded.reply_text, recipients = excluded.recipients,
        worker = excluded.worker
), withdrawn AS (
    -- Nothing was tried (expired, every recipient suppressed, stub mode): the attempt the
    -- claim opened is withdrawn.
    DELETE FROM mail.attempts a USING r JOIN upd USING (delivery_id)
    WHERE NOT r.record_attempt AND r.claimed AND a.delivery_id = r.delivery_id
      AND a.attempt_no = r.attempt_no AND a.status = 'started'
), dl AS (
    INSERT INTO mail.dead_letters (delivery_id, attempt_count, last_status, last_reply_code,
                                   last_reply_text)
    SELECT r.delivery_id, upd.attempt_count, r.attempt_status, r.reply_code, r.reply_text
    FROM r JOIN upd USING (delivery_id)
    WHERE r.delivery_status = 'dead_letter'
    ON CONFLICT (delivery_id) DO UPDATE
    SET created_at = now(), attempt_count = excluded.attempt_count,
        last_status = excluded.last_status, last_reply_code = excluded.last_reply_code,
        last_reply_text = excluded.last_reply_text,
        reviewed_at = NULL, reviewed_by = NULL, review_note = NULL,
        requeued_at = NULL, requeued_by = NULL
), ev AS (
    INSERT INTO mail.outbox (delivery_id, fields)
    SELECT r.delivery_id, r.event FROM r JOIN upd USING (delivery_id)
)
SELECT delivery_id FROM upd
"""

SUPPRESS_ADDRESSES = """
INSERT INTO mail.suppressions (address, reason, reply_code, source_delivery_id, expires_at)
SELECT lower(a.address), a.reason, a.code, a.delivery_id, now() + make_interval(secs => $5)
FROM unnest($1::text[], $2::text[], $3::integer[], $4::text[]) AS a(address, reason, code,
                                                                     delivery_id)
ON CONFLICT (address) DO UPDATE
SET reason = excluded.reason, reply_code = excluded.reply_code,
    source_delivery_id = excluded.source_delivery_id, created_at = now(),
    expires_at = excluded.expires_at
"""

# --- late outcomes (reports after the relay's 250) ----------------------------------------

# A report's effects, once per (delivery, recipient, outcome): only for deliveries that
# exist and addresses that are their recipients. Returns what is new.
RECORD_LATE_OUTCOMES = """
WITH r AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(
        delivery_id text, address text, outcome text, status_code text, diagnostic text)
)
INSERT INTO mail.late_outcomes (delivery_id, address, outcome, status_code, diagnostic,
                                report_id)
SELECT r.delivery_id, r.address, r.outcome, r.status_code, r.diagnostic, $2
FROM r JOIN mail.delivery_recipients dr
    ON dr.delivery_id = r.delivery_id AND dr.address = r.address
ON CONFLICT DO NOTHING
RETURNING delivery_id, address, outcome
"""

# sent -> bounced once every recipient of the delivery has bounced.
BOUNCE_DELIVERIES = """
UPDATE mail.deliveries d
SET status = 'bounced', status_reason = $2, updated_at = now(), finished_at = now()
WHERE d.delivery_id = ANY ($1::text[]) AND d.status = 'sent'
  AND NOT EXISTS (
    SELECT 1 FROM mail.delivery_recipients dr
    WHERE dr.delivery_id = d.delivery_id
      AND NOT EXISTS (SELECT 1 FROM mail.late_outcomes l
                      WHERE l.delivery_id = dr.delivery_id AND l.address = dr.address
                        AND l.outcome = 'bounced'))
RETURNING d.delivery_id
"""

# One outcome event per new effect, with the delivery's status after it.
LATE_EVENTS = """
INSERT INTO mail.outbox (delivery_id, fields)
SELECT e.delivery_id, e.event || jsonb_build_object('delivery_status', d.status)
FROM jsonb_to_recordset($1::jsonb) AS e(delivery_id text, event jsonb)
JOIN mail.deliveries d USING (delivery_id)
"""

# --- outcome events (outbox) -------------------------------------------------------------

# One replica publishes at a time (a transaction-scoped advisory lock), so events leave in
# id order and a delivery's events keep their order on the stream.
# The lock and the batch in one statement: no rows unless this transaction got the lock.
OUTBOX_BATCH = """
WITH lock AS MATERIALIZED (SELECT pg_try_advisory_xact_lock(7236276328737255269) AS held)
SELECT o.id, o.fields FROM lock, mail.outbox o WHERE lock.held ORDER BY o.id LIMIT $1
"""

OUTBOX_DEPTH = """
SELECT count(*) FROM mail.outbox
"""

# --- scheduler figures --------------------------------------------------------------------

NEXT_DUE_AT = """
SELECT min(next_attempt_at) FROM mail.deliveries WHERE next_attempt_at IS NOT NULL
"""

# The backlog gauges, read every few seconds (never per scrape). Unreviewed dead letters
# are counted up to a cap so the statement stays bounded.
SCHEDULE_DEPTH = """
SELECT count(*) AS depth,
       coalesce(extract(epoch FROM now() - min(next_attempt_at)) * 1000, 0)::bigint
           AS oldest_age_ms,
       (SELECT count(*) FROM (SELECT 1 FROM mail.dead_letters WHERE reviewed_at IS NULL
                              LIMIT 100000) u) AS dead_letters_unreviewed
FROM mail.deliveries
WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= now()
"""

# --- retention ----------------------------------------------------------------------------
# Each statement deletes at most $1 rows, so a pass never holds long locks.

PURGE_RESERVATIONS = """
DELETE FROM mail.idempotency_reservations WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM mail.idempotency_reservations WHERE expires_at < now() LIMIT $1))
"""

# Only terminal deliveries are ever removed (attempts, payloads, dead letters cascade).
PURGE_DELIVERIES = """
DELETE FROM mail.deliveries WHERE delivery_id = ANY (ARRAY(
    SELECT delivery_id FROM mail.deliveries
    WHERE finished_at < now() - make_interval(secs => $2)
      AND next_attempt_at IS NULL
      AND status IN ('sent', 'suppressed', 'failed', 'dead_letter', 'expired', 'cancelled',
                     'bounced')
    LIMIT $1))
"""

PURGE_MALFORMED = """
DELETE FROM mail.malformed_commands WHERE id = ANY (ARRAY(
    SELECT id FROM mail.malformed_commands
    WHERE received_at < now() - make_interval(secs => $2) LIMIT $1))
"""

PURGE_REPLAYS = """
DELETE FROM mail.command_replays WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM mail.command_replays
    WHERE received_at < now() - make_interval(secs => $2) LIMIT $1))
"""

PURGE_REPORTS = """
DELETE FROM mail.reports WHERE report_id = ANY (ARRAY(
    SELECT report_id FROM mail.reports
    WHERE received_at < now() - make_interval(secs => $2) LIMIT $1))
"""

PURGE_SUPPRESSIONS = """
DELETE FROM mail.suppressions WHERE address = ANY (ARRAY(
    SELECT address FROM mail.suppressions WHERE expires_at < now() LIMIT $1))
"""

# Which migrations yoyo recorded (behind PgBouncer, where yoyo itself cannot run).
APPLIED_MIGRATIONS = "SELECT migration_id FROM mail._yoyo_migration"

# Readiness: would a write be refused? (a standby, or default_transaction_read_only on)
READ_ONLY = "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'"
