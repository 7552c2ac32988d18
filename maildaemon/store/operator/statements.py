"""The operator surface's SQL, one named statement per step.

Optional filters are ``($n IS NULL OR ...)`` so each listing is one statement (the API's
pool plans each call for its own parameters, so a filter that was given can use its index);
a recipient search has its own statement that starts from ``mail.delivery_recipients``
(migration 0009: one row per recipient, by address and by domain), which the dead-letter
domain filter uses too. Listings are keyset-paginated on the same
order as their index and fetch one row more than the page to know whether another follows.
"""

from __future__ import annotations

# --- deliveries ---------------------------------------------------------------------------

DELIVERY = """
SELECT d.delivery_id, d.source, d.idempotency_key, d.status, d.status_reason, d.failure_code,
    d.priority,
    d.payload_mode, d.template_id, d.locale, d.to_addrs, d.cc_addrs, d.bcc_addrs, d.reply_to,
    d.pending_rcpts, d.rcpts_accepted, d.send_at, d.expires_at, d.next_attempt_at,
    d.attempt_count, d.ladder_base, d.possible_duplicate, d.last_reply_code, d.last_reply_text,
    d.message_id, d.rendered_at, d.stream_entry_id, d.created_at, d.updated_at, d.finished_at,
    EXISTS (SELECT 1 FROM mail.sending_pauses s WHERE s.scope IN ('*', d.source)) AS paused
FROM mail.deliveries d
WHERE d.delivery_id = $1
"""

ATTEMPTS = """
SELECT attempt_no, status, started_at, finished_at, reply_code, reply_text,
    recipients::text AS recipients, worker
FROM mail.attempts
WHERE delivery_id = $1
ORDER BY attempt_no
"""

DEAD_LETTER = """
SELECT delivery_id, created_at, attempt_count, last_status, last_reply_code, last_reply_text,
    reviewed_at, reviewed_by, review_note, requeued_at, requeued_by
FROM mail.dead_letters
WHERE delivery_id = $1
"""

# The reports matched to a delivery and what they did (bounded: a flood of reports for one
# delivery shows its first 50).
DELIVERY_REPORTS = """
SELECT report_id, received_at, via, kind, match_status, detail, recipients::text AS recipients
FROM mail.reports WHERE delivery_id = $1 ORDER BY report_id LIMIT 50
"""

DELIVERY_LATE_OUTCOMES = """
SELECT address, outcome, status_code, diagnostic, report_id, at
FROM mail.late_outcomes WHERE delivery_id = $1 ORDER BY at, address, outcome
"""

_SUMMARY = """d.delivery_id, d.status, d.status_reason, d.source, d.priority, d.template_id,
    d.to_addrs, d.attempt_count, d.last_reply_code, d.last_reply_text, d.next_attempt_at,
    d.created_at, d.updated_at, d.finished_at"""

# $1 status, $2 source, $3 recipient (lower-case), $4/$5 created window, $6/$7 cursor, $8 limit.
LIST_DELIVERIES = f"""
SELECT {_SUMMARY}
FROM mail.deliveries d
WHERE ($1::text IS NULL OR d.status = $1)
  AND ($2::text IS NULL OR d.source = $2)
  AND $3::text IS NULL  -- with a recipient: LIST_DELIVERIES_BY_RECIPIENT
  AND ($4::timestamptz IS NULL OR d.created_at >= $4)
  AND ($5::timestamptz IS NULL OR d.created_at < $5)
  AND ($6::timestamptz IS NULL OR (d.created_at, d.delivery_id) < ($6, $7::text))
ORDER BY d.created_at DESC, d.delivery_id DESC
LIMIT $8
"""

# The same listing for one recipient ($3, required, lower-cased): the recipient's deliveries
# are found through mail.delivery_recipients first (materialized, so the planner cannot
# instead walk the created_at index and probe every row), then filtered and ordered.
LIST_DELIVERIES_BY_RECIPIENT = f"""
WITH hits AS MATERIALIZED (
    SELECT {_SUMMARY}
    FROM mail.delivery_recipients r
    JOIN mail.deliveries d ON d.delivery_id = r.delivery_id
    WHERE r.address = $3::text
)
SELECT * FROM hits d
WHERE ($1::text IS NULL OR d.status = $1)
  AND ($2::text IS NULL OR d.source = $2)
  AND ($4::timestamptz IS NULL OR d.created_at >= $4)
  AND ($5::timestamptz IS NULL OR d.created_at < $5)
  AND ($6::timestamptz IS NULL OR (d.created_at, d.delivery_id) < ($6, $7::text))
ORDER BY d.created_at DESC, d.delivery_id DESC
LIMIT $8
"""

DELIVERY_BY_ENTRY = f"""
SELECT {_SUMMARY}
FROM mail.deliveries d
WHERE d.stream_entry_id = $1
ORDER BY d.created_at
LIMIT 1
"""

REPLAY_OF_ENTRY = """
SELECT delivery_id FROM mail.command_replays WHERE stream_entry_id = $1
ORDER BY received_at LIMIT 1
"""

# Lock one delivery for an action; the caller checks its status.
LOCK_DELIVERY = """
SELECT status, source, claim_token, attempt_count, to_addrs, cc_addrs, bcc_addrs
FROM mail.deliveries
WHERE delivery_id = $1 FOR UPDATE
"""

# The same, unlocked (a dry run's judgement).
DELIVERY_STATE = """
SELECT status, source, claim_token, attempt_count FROM mail.deliveries WHERE delivery_id = $1
"""

# Back to the start of the retry ladder, due now; attempts and pending recipients are kept.
# A `failed` delivery was never rendered (rendered_at is NULL), so it is rendered again.
REQUEUE = """
UPDATE mail.deliveries d
SET status = 'queued', next_attempt_at = now(), finished_at = NULL, claimed_by = NULL,
    ladder_base = d.attempt_count, status_reason = $2, failure_code = NULL,
    updated_at = now()
WHERE d.delivery_id = $1
RETURNING d.next_attempt_at
"""

MARK_REQUEUED = """
UPDATE mail.dead_letters SET requeued_at = now(), requeued_by = $2 WHERE delivery_id = $1
"""


# --- dead letters -------------------------------------------------------------------------

# Parameters $1..$8 of every dead-letter filter (see DeadLetterFilter).
_DEAD_LETTER_FILTER = """
    ($1::text IS NULL OR d.source = $1)
AND ($2::text IS NULL OR EXISTS (
     SELECT 1 FROM mail.delivery_recipients r
     WHERE r.delivery_id = d.delivery_id AND r.domain = $2::text))
AND ($3::integer IS NULL OR dl.last_reply_code = $3)
AND ($4::integer IS NULL OR dl.last_reply_code / 100 = $4)
AND ($5::timestamptz IS NULL OR dl.created_at >= $5)
AND ($6::timestamptz IS NULL OR dl.created_at < $6)
AND ($7::boolean IS NULL OR (dl.reviewed_at IS NOT NULL) = $7)
AND ($8::boolean IS NULL OR (dl.requeued_at IS NOT NULL) = $8)
"""

# Unreviewed first, then newest first; $9/$10/$11 cursor, $12 limit.
LIST_DEAD_LETTERS = f"""
SELECT dl.delivery_id, d.source, d.status AS delivery_status, d.template_id, d.to_addrs,
    dl.created_at, dl.attempt_count, dl.last_status, dl.last_reply_code, dl.last_reply_text,
    dl.reviewed_at, dl.reviewed_by, dl.review_note, dl.requeued_at, dl.requeued_by
FROM mail.dead_letters dl
JOIN mail.deliveries d USING (delivery_id)
WHERE {_DEAD_LETTER_FILTER}
  AND ($9::boolean IS NULL
       OR (dl.reviewed_at IS NOT NULL) > $9
       OR ((dl.reviewed_at IS NOT NULL) = $9
           AND (dl.created_at, dl.delivery_id) < ($10::timestamptz, $11::text)))
ORDER BY (dl.reviewed_at IS NOT NULL), dl.created_at DESC, dl.delivery_id DESC
LIMIT $12
"""

REVIEW = """
UPDATE mail.dead_letters
SET reviewed_at = now(), reviewed_by = $2, review_note = $3
WHERE delivery_id = $1
RETURNING delivery_id, reviewed_at, reviewed_by, review_note
"""

# How many dead letters (still dead-lettered) a bulk requeue with this filter would take.
COUNT_REQUEUEABLE = f"""
SELECT count(*)
FROM mail.dead_letters dl
JOIN mail.deliveries d USING (delivery_id)
WHERE d.status = 'dead_letter' AND {_DEAD_LETTER_FILTER}
"""

# What BULK_REQUEUE would take, in its order (a dry run): at most $9 ids.
BULK_REQUEUE_PREVIEW = f"""
SELECT d.delivery_id
FROM mail.dead_letters dl
JOIN mail.deliveries d USING (delivery_id)
WHERE d.status = 'dead_letter' AND {_DEAD_LETTER_FILTER}
ORDER BY dl.created_at, d.delivery_id
LIMIT $9
"""

# Requeue up to $9 matching dead letters, oldest first, the n-th due n * $10 seconds from
# now (the release rate), all in one statement. $11 status reason, $12 actor.
BULK_REQUEUE = f"""
WITH picked AS (
    SELECT d.delivery_id, dl.created_at
    FROM mail.dead_letters dl
    JOIN mail.deliveries d USING (delivery_id)
    WHERE d.status = 'dead_letter' AND {_DEAD_LETTER_FILTER}
    ORDER BY dl.created_at, d.delivery_id
    LIMIT $9
    FOR UPDATE OF d
), numbered AS (
    SELECT delivery_id, row_number() OVER (ORDER BY created_at, delivery_id) - 1 AS n
    FROM picked
), upd AS (
    UPDATE mail.deliveries d
    SET status = 'queued',
        next_attempt_at = now() + make_interval(secs => numbered.n * $10::float8),
        finished_at = NULL, claimed_by = NULL, ladder_base = d.attempt_count,
        status_reason = $11, failure_code = NULL, updated_at = now()
    FROM numbered
    WHERE d.delivery_id = numbered.delivery_id
    RETURNING d.delivery_id, d.next_attempt_at
), marked AS (
    UPDATE mail.dead_letters dl
    SET requeued_at = now(), requeued_by = $12
    FROM upd
    WHERE dl.delivery_id = upd.delivery_id
)
SELECT delivery_id, next_attempt_at FROM upd ORDER BY next_attempt_at, delivery_id
"""

# --- malformed commands -------------------------------------------------------------------

_MALFORMED = """m.id, m.stream_entry_id, m.failure_code, m.failure_detail, m.delivery_id,
    m.source, m.raw, m.raw_truncated, m.received_at, m.replayed_at, m.replayed_delivery_id"""

# $1 failure code, $2 source, $3 replayed, $4/$5 cursor, $6 limit.
LIST_MALFORMED = f"""
SELECT {_MALFORMED}
FROM mail.malformed_commands m
WHERE ($1::text IS NULL OR m.failure_code = $1)
  AND ($2::text IS NULL OR m.source = $2)
  AND ($3::boolean IS NULL OR (m.replayed_at IS NOT NULL) = $3)
  AND ($4::timestamptz IS NULL OR (m.received_at, m.id) < ($4, $5::bigint))
ORDER BY m.received_at DESC, m.id DESC
LIMIT $6
"""

MALFORMED_BY_ID = f"""
SELECT {_MALFORMED} FROM mail.malformed_commands m WHERE m.id = $1
"""

MALFORMED_BY_ENTRY = f"""
SELECT {_MALFORMED} FROM mail.malformed_commands m WHERE m.stream_entry_id = $1
"""

COUNT_REPLAYABLE = """
SELECT count(*) FROM mail.malformed_commands m
WHERE m.replayed_at IS NULL AND m.failure_code = $1 AND ($2::text IS NULL OR m.source = $2)
"""

# Oldest first, so repeated bulk replays work through the backlog in order.
REPLAYABLE = f"""
SELECT {_MALFORMED}
FROM mail.malformed_commands m
WHERE m.replayed_at IS NULL AND m.failure_code = $1 AND ($2::text IS NULL OR m.source = $2)
ORDER BY m.received_at, m.id
LIMIT $3
"""

# Lock the records about to be replayed; those replayed meanwhile drop out.
LOCK_REPLAYABLE = """
SELECT id FROM mail.malformed_commands
WHERE id = ANY($1::bigint[]) AND replayed_at IS NULL
ORDER BY id
FOR UPDATE
"""

MARK_REPLAYED = """
UPDATE mail.malformed_commands m
SET replayed_at = now(), replayed_delivery_id = r.delivery_id
FROM unnest($1::bigint[], $2::text[]) AS r(id, delivery_id)
WHERE m.id = r.id
"""

# --- sending pauses -----------------------------------------------------------------------

PAUSES = """
SELECT scope, paused_at, paused_by, reason FROM mail.sending_pauses ORDER BY scope
"""

# No row back: the scope was paused already (PAUSE_OF reads that pause).
PAUSE = """
INSERT INTO mail.sending_pauses (scope, paused_by, reason)
VALUES ($1, $2, $3)
ON CONFLICT (scope) DO NOTHING
RETURNING scope, paused_at, paused_by, reason
"""

PAUSE_OF = """
SELECT scope, paused_at, paused_by, reason FROM mail.sending_pauses WHERE scope = $1
"""

RESUME = """
DELETE FROM mail.sending_pauses WHERE scope = $1 RETURNING scope
"""

# --- suppressions -------------------------------------------------------------------------

_SUPPRESSION = """address, reason, reply_code, source_delivery_id, created_at, expires_at,
    created_by"""

# $1 address, $2 domain, $3 cursor (address), $4 limit. Ordered by address (the key).
LIST_SUPPRESSIONS = f"""
SELECT {_SUPPRESSION}
FROM mail.suppressions
WHERE ($1::text IS NULL OR address = $1)
  AND ($2::text IS NULL OR substring(address FROM '@([^@]*)$') = $2)
  AND ($3::text IS NULL OR address > $3)
ORDER BY address
LIMIT $4
"""

ADD_SUPPRESSION = f"""
INSERT INTO mail.suppressions (address, reason, expires_at, created_by)
VALUES ($1, $2, $3, $4)
ON CONFLICT (address) DO UPDATE
SET reason = excluded.reason, reply_code = NULL, source_delivery_id = NULL,
    created_at = now(), expires_at = excluded.expires_at, created_by = excluded.created_by
RETURNING {_SUPPRESSION}
"""

REMOVE_SUPPRESSION = """
DELETE FROM mail.suppressions WHERE address = $1 RETURNING address
"""

# --- audit trail --------------------------------------------------------------------------

RECORD_ACTION = """
INSERT INTO mail.operator_actions (actor, action, target, reason, detail)
VALUES ($1, $2, $3, $4, $5::jsonb)
RETURNING id
"""

# $1 action, $2 actor, $3 target, $4 cursor (id), $5 limit.
LIST_ACTIONS = """
SELECT id, at, actor, action, target, reason, detail::text AS detail
FROM mail.operator_actions
WHERE ($1::text IS NULL OR action = $1)
  AND ($2::text IS NULL OR actor = $2)
  AND ($3::text IS NULL OR target = $3)
  AND ($4::bigint IS NULL OR id < $4)
ORDER BY id DESC
LIMIT $5
"""

NOTIFY_DUE = "SELECT pg_notify('mail_due', '')"

# --- figures ------------------------------------------------------------------------------

STATS = """
SELECT now() AS generated_at,
    (SELECT coalesce(jsonb_object_agg(status, n), '{}'::jsonb)::text
     FROM (SELECT status, count(*) AS n FROM mail.deliveries GROUP BY status) s) AS by_status,
    (SELECT count(*) FROM mail.deliveries WHERE next_attempt_at <= now()) AS due,
    (SELECT coalesce(extract(epoch FROM now() - min(next_attempt_at)), 0)::float8
     FROM mail.deliveries WHERE next_attempt_at <= now()) AS oldest_due_s,
    (SELECT count(*) FROM mail.deliveries
     WHERE next_attempt_at > now() AND status <> 'sending') AS scheduled,
    (SELECT count(*) FROM mail.deliveries
     WHERE next_attempt_at > now() AND status = 'sending') AS in_flight,
    (SELECT count(*) FROM mail.dead_letters WHERE reviewed_at IS NULL) AS dl_unreviewed,
    (SELECT count(*) FROM mail.deliveries WHERE status = 'dead_letter') AS dl_open,
    (SELECT count(*) FROM mail.dead_letters) AS dl_total,
    (SELECT count(*) FROM mail.malformed_commands
     WHERE received_at > now() - interval '1 hour') AS malformed_1h,
    (SELECT coalesce(jsonb_object_agg(status, n), '{}'::jsonb)::text
     FROM (SELECT status, count(*) AS n FROM mail.attempts
           WHERE finished_at > now() - interval '1 hour' GROUP BY status) a) AS attempts_1h
"""
