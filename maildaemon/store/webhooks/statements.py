"""Every SQL statement of the webhooks: fan-out from the outbox, claims, results, endpoints."""

from __future__ import annotations

# --- fan-out (inside the outbox publisher's transaction) --------------------------------

# The publisher's last step, once Redis took the batch, in one statement (every part sees
# the rows as they were before it): the outbox rows $1 are deleted and become webhook
# events (while any endpoint exists, so a replay can reach an endpoint added later) with
# one queue row per endpoint whose filter takes them. Disabled endpoints queue too: their
# backlog waits for enable or replay, nothing is lost.
FAN_OUT_AND_DELETE = """
WITH gone AS (
    DELETE FROM mail.outbox WHERE id = ANY ($1::bigint[])
), o AS (
    SELECT id, delivery_id, fields, coalesce(fields->>'status', 'unknown') AS event_type,
           fields->>'source' AS source
    FROM mail.outbox
    WHERE id = ANY ($1::bigint[]) AND EXISTS (SELECT 1 FROM mail.webhook_endpoints)
    ORDER BY id
), ev AS (
    INSERT INTO mail.webhook_events (outbox_id, delivery_id, event_type, source, fields)
    SELECT id, delivery_id, event_type, source, fields FROM o ORDER BY id
    RETURNING id, outbox_id, delivery_id, event_type, source
), q AS (
    INSERT INTO mail.webhook_queue (endpoint_id, event_id, delivery_id)
    SELECT e.id, ev.id, ev.delivery_id
    FROM ev JOIN mail.webhook_endpoints e
      ON (e.events IS NULL OR ev.event_type = ANY (e.events))
     AND (e.source IS NULL OR e.source = ev.source)
    ORDER BY ev.id, e.id
    RETURNING endpoint_id
)
SELECT count(*) FROM q
"""

# --- dispatcher --------------------------------------------------------------------------

# Claims are taken one replica at a time (this lock, for the claim's transaction), so the
# concurrency cap per endpoint holds across replicas.
CLAIM_LOCK = "SELECT pg_advisory_xact_lock(7236276328737255270)"

# Due rows of enabled endpoints, only the oldest of each delivery per endpoint (order per
# delivery), at most $1 in flight per endpoint, $2 in all, none of the endpoints $4 (held
# after a failure); leased for $3 seconds with a fresh fence token.
CLAIM = """
WITH busy AS (
    SELECT endpoint_id, count(*) AS n FROM mail.webhook_queue
    WHERE lease_until IS NOT NULL AND lease_until > now() GROUP BY endpoint_id
), heads AS (
    -- Per enabled endpoint, walk its due rows (index on next_attempt_at: rows waiting for
    -- a later retry are never read) and stop after $1.
    SELECT c.id, c.endpoint_id,
           row_number() OVER (PARTITION BY c.endpoint_id ORDER BY c.event_id) AS rn
    FROM mail.webhook_endpoints e
    CROSS JOIN LATERAL (
        SELECT q.id, q.endpoint_id, q.event_id FROM mail.webhook_queue q
        WHERE q.endpoint_id = e.id AND q.next_attempt_at <= now()
          AND (q.lease_until IS NULL OR q.lease_until <= now())
          AND NOT EXISTS (
              SELECT 1 FROM mail.webhook_queue p
              WHERE p.endpoint_id = q.endpoint_id AND p.delivery_id = q.delivery_id
                AND p.event_id < q.event_id)
        ORDER BY q.next_attempt_at, q.event_id LIMIT $1
    ) c
    WHERE e.enabled AND NOT (e.id = ANY ($4::bigint[]))
), pick AS (
    SELECT h.id FROM heads h LEFT JOIN busy b USING (endpoint_id)
    WHERE h.rn <= $1 - coalesce(b.n, 0)
    ORDER BY h.id LIMIT $2
), upd AS (
    UPDATE mail.webhook_queue q
    SET lease_until = now() + make_interval(secs => $3),
        claim_token = nextval('mail.webhook_claim_seq'), attempts = q.attempts + 1
    FROM pick WHERE q.id = pick.id
    RETURNING q.id, q.endpoint_id, q.event_id, q.attempts, q.claim_token
)
SELECT upd.id, upd.endpoint_id, upd.event_id, upd.attempts, upd.claim_token,
       ev.event_type, ev.fields::text AS fields, ev.created_at,
       e.url, e.secret, CASE WHEN e.previous_until > now() THEN e.previous_secret END
           AS previous_secret
FROM upd JOIN mail.webhook_events ev ON ev.id = upd.event_id
JOIN mail.webhook_endpoints e ON e.id = upd.endpoint_id
ORDER BY upd.endpoint_id, upd.event_id
"""

# A batch of attempt results, fenced by claim token: delivered rows leave the queue,
# failed ones wait for their next attempt; one that failed its whole schedule starts the
# schedule over (for enable or replay) and disables its endpoint. Returns the endpoints
# disabled by this batch.
RECORD = """
WITH r AS (
    SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::boolean[], $4::integer[],
                         $5::integer[], $6::text[], $7::text[], $8::float8[], $9::boolean[],
                         $10::integer[])
        AS r(id, token, ok, http_status, duration_ms, error, response, retry_in, exhausted,
             attempt_no)
), done AS (
    DELETE FROM mail.webhook_queue q USING r
    WHERE q.id = r.id AND q.claim_token = r.token AND r.ok
    RETURNING q.id, q.endpoint_id, q.event_id
), again AS (
    UPDATE mail.webhook_queue q
    SET lease_until = NULL, claim_token = NULL,
        next_attempt_at = now() + make_interval(secs => r.retry_in),
        attempts = CASE WHEN r.exhausted THEN 0 ELSE q.attempts END
    FROM r WHERE q.id = r.id AND q.claim_token = r.token AND NOT r.ok
    RETURNING q.id, q.endpoint_id, q.event_id
), x AS (
    SELECT * FROM done UNION ALL SELECT * FROM again
), att AS (
    INSERT INTO mail.webhook_attempts (endpoint_id, event_id, attempt_no, ok, http_status,
                                       duration_ms, error, response)
    SELECT x.endpoint_id, x.event_id, r.attempt_no, r.ok, r.http_status, r.duration_ms,
           r.error, r.response
    FROM x JOIN r USING (id)
), off AS (
    UPDATE mail.webhook_endpoints e
    SET enabled = false, updated_at = now(),
        disabled_reason = 'every attempt of its retry schedule failed (event '
                          || x.event_id || ')'
    FROM x JOIN r USING (id)
    WHERE r.exhausted AND e.id = x.endpoint_id AND e.enabled
    RETURNING e.id, e.url
)
SELECT id, url, (SELECT count(*) FROM x) AS recorded FROM off
"""

# Per endpoint: rows waiting and the oldest one's age (seconds), for the gauges.
BACKLOG = """
SELECT e.id, e.enabled, count(q.id) AS waiting,
       coalesce(extract(epoch FROM now() - min(q.created_at)), 0)::float8 AS oldest_age_s
FROM mail.webhook_endpoints e LEFT JOIN mail.webhook_queue q ON q.endpoint_id = e.id
GROUP BY e.id, e.enabled
"""

# Retention: events no queue row needs any more, older than $2 seconds, $1 at a time.
PURGE_EVENTS = """
DELETE FROM mail.webhook_events WHERE id = ANY (ARRAY(
    SELECT ev.id FROM mail.webhook_events ev
    WHERE ev.created_at < now() - make_interval(secs => $2)
      AND NOT EXISTS (SELECT 1 FROM mail.webhook_queue q WHERE q.event_id = ev.id)
    LIMIT $1))
"""

# `maildaemon dev`: the receiver of this run ($1, secret $2) replaces earlier runs' ones.
ENSURE_DEV_ENDPOINT = """
WITH gone AS (
    DELETE FROM mail.webhook_endpoints
    WHERE url LIKE 'http://127.0.0.1:%/dev/webhooks' AND url <> $1
), upd AS (
    UPDATE mail.webhook_endpoints
    SET secret = $2, enabled = true, disabled_reason = NULL, updated_at = now()
    WHERE url = $1 RETURNING id
)
INSERT INTO mail.webhook_endpoints (url, secret)
SELECT $1, $2 WHERE NOT EXISTS (SELECT 1 FROM upd)
"""

# --- endpoints (operator) ----------------------------------------------------------------

_ENDPOINT_COLUMNS = """
e.id, e.url, e.events, e.source, e.enabled, e.disabled_reason, e.created_at, e.updated_at,
e.previous_until,
(SELECT count(*) FROM mail.webhook_queue q WHERE q.endpoint_id = e.id) AS backlog
"""

ADD_ENDPOINT = f"""
WITH e AS (
    INSERT INTO mail.webhook_endpoints (url, events, source, secret)
    VALUES ($1, $2, $3, $4) RETURNING *
)
SELECT {_ENDPOINT_COLUMNS} FROM e
"""

LIST_ENDPOINTS = f"SELECT {_ENDPOINT_COLUMNS} FROM mail.webhook_endpoints e ORDER BY e.id"

GET_ENDPOINT = f"SELECT {_ENDPOINT_COLUMNS} FROM mail.webhook_endpoints e WHERE e.id = $1"

# Enabling starts every waiting row's schedule over, due now.
SET_ENABLED = """
WITH e AS (
    UPDATE mail.webhook_endpoints
    SET enabled = $2, updated_at = now(),
        disabled_reason = CASE WHEN $2 THEN NULL ELSE $3 END
    WHERE id = $1 RETURNING id
), q AS (
    UPDATE mail.webhook_queue q SET attempts = 0, next_attempt_at = now()
    FROM e WHERE $2 AND q.endpoint_id = e.id
)
SELECT id FROM e
"""

REMOVE_ENDPOINT = "DELETE FROM mail.webhook_endpoints WHERE id = $1 RETURNING id"

# The new secret signs from now on; the old one as well until $3 seconds from now.
ROTATE_SECRET = """
UPDATE mail.webhook_endpoints
SET previous_secret = secret, previous_until = now() + make_interval(secs => $3),
    secret = $2, updated_at = now()
WHERE id = $1 RETURNING id
"""

# A signed ping, queued for one endpoint (its own delivery id: no ordering wait).
PING = """
WITH ev AS (
    INSERT INTO mail.webhook_events (delivery_id, event_type, source, fields)
    SELECT 'ping-' || $1::bigint || '-' || nextval('mail.webhook_claim_seq'), 'ping', NULL,
           jsonb_build_object('endpoint_id', $1::bigint, 'at', now())
    WHERE EXISTS (SELECT 1 FROM mail.webhook_endpoints WHERE id = $1)
    RETURNING id, delivery_id
), q AS (
    INSERT INTO mail.webhook_queue (endpoint_id, event_id, delivery_id)
    SELECT $1, id, delivery_id FROM ev
)
SELECT id FROM ev
"""

# Events for a replay to endpoint $1: one event ($2), or a time range ($3..$4), matching
# the endpoint's filter and not waiting for it already.
_REPLAY_MATCH = """
FROM mail.webhook_events ev JOIN mail.webhook_endpoints e ON e.id = $1
WHERE ($2::bigint IS NULL OR ev.id = $2)
  AND ($3::timestamptz IS NULL OR ev.created_at >= $3)
  AND ($4::timestamptz IS NULL OR ev.created_at < $4)
  AND ev.event_type <> 'ping'
  AND ($2::bigint IS NOT NULL OR e.events IS NULL OR ev.event_type = ANY (e.events))
  AND ($2::bigint IS NOT NULL OR e.source IS NULL OR e.source = ev.source)
  AND NOT EXISTS (SELECT 1 FROM mail.webhook_queue q
                  WHERE q.endpoint_id = $1 AND q.event_id = ev.id)
"""

REPLAY_COUNT = f"SELECT count(*) {_REPLAY_MATCH}"

REPLAY = f"""
WITH q AS (
    INSERT INTO mail.webhook_queue (endpoint_id, event_id, delivery_id)
    SELECT $1, ev.id, ev.delivery_id {_REPLAY_MATCH}
    ORDER BY ev.id
    RETURNING 1
)
SELECT count(*) FROM q
"""

RECENT_ATTEMPTS = """
SELECT a.id, a.endpoint_id, a.event_id, ev.event_type, ev.delivery_id, a.attempt_no, a.ok,
       a.http_status, a.duration_ms, a.error, a.response, a.at
FROM mail.webhook_attempts a JOIN mail.webhook_events ev ON ev.id = a.event_id
WHERE ($1::bigint IS NULL OR a.endpoint_id = $1)
ORDER BY a.id DESC LIMIT $2
"""
