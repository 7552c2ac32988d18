"""The reports' SQL, one named statement per step."""

from __future__ import annotations

# The delivery a token's reference names, with its recipients.
TARGET = """
SELECT d.delivery_id, d.source, d.status,
       ARRAY(SELECT r.address FROM mail.delivery_recipients r
             WHERE r.delivery_id = d.delivery_id ORDER BY r.address) AS recipients
FROM mail.delivery_refs f JOIN mail.deliveries d USING (delivery_id)
WHERE f.ref = $1
"""

# Record a report; nothing when the same bytes were recorded before (returns no row).
INSERT = """
INSERT INTO mail.reports (via, envelope_from, envelope_to, raw, raw_size, raw_truncated,
    raw_sha256, kind, match_status, delivery_id, detail, subject, remote_mta, recipients)
VALUES ($1, $2, $3, $4, $5, $6, sha256($4), $7, $8, $9, $10, $11, $12, $13::jsonb)
ON CONFLICT (raw_sha256) DO NOTHING
RETURNING report_id
"""

EXISTING = """
SELECT report_id, kind, match_status, delivery_id, detail FROM mail.reports
WHERE raw_sha256 = sha256($1)
"""

_COLUMNS = """
SELECT report_id, received_at, via, envelope_from, envelope_to, raw_size, raw_truncated,
       kind, match_status, delivery_id, detail, subject, remote_mta, recipients::text
FROM mail.reports
"""

# Newest first, keyset-paged by id; optional filters on match status and kind.
RECENT = (
    _COLUMNS
    + """
WHERE ($2::bigint IS NULL OR report_id < $2)
  AND ($3::text IS NULL OR match_status = $3)
  AND ($4::text IS NULL OR kind = $4)
ORDER BY report_id DESC
LIMIT $1
"""
)

FOR_DELIVERY = (
    _COLUMNS
    + """
WHERE delivery_id = $1
ORDER BY report_id
LIMIT $2
"""
)

RAW = "SELECT raw FROM mail.reports WHERE report_id = $1"

LATE_OUTCOMES = """
SELECT address, outcome, status_code, diagnostic, report_id, at
FROM mail.late_outcomes WHERE delivery_id = $1 ORDER BY at, address
"""

# Bounce and complaint rates over the last $1 hours: deliveries (or recipients) that ended
# sent or bounced in the window against the late outcomes recorded in it, per source and
# per recipient domain; the 100 largest by bounces, then complaints.
_RATES = """
WITH sent AS (
    SELECT {key} AS key, count(*) AS sent
    FROM mail.deliveries d {join}
    WHERE d.finished_at >= now() - make_interval(hours => $1)
      AND d.status IN ('sent', 'bounced')
    GROUP BY 1
), late AS (
    SELECT {late_key} AS key,
           count(*) FILTER (WHERE l.outcome = 'bounced') AS bounced,
           count(*) FILTER (WHERE l.outcome = 'complained') AS complained
    FROM mail.late_outcomes l JOIN mail.deliveries d USING (delivery_id)
    WHERE l.at >= now() - make_interval(hours => $1)
    GROUP BY 1
)
SELECT coalesce(s.key, l.key) AS key, coalesce(s.sent, 0) AS sent,
       coalesce(l.bounced, 0) AS bounced, coalesce(l.complained, 0) AS complained
FROM sent s FULL JOIN late l ON s.key = l.key
ORDER BY 3 DESC, 4 DESC, 2 DESC, 1
LIMIT 100
"""
RATES_BY_SOURCE = _RATES.format(key="d.source", join="", late_key="d.source")
RATES_BY_DOMAIN = _RATES.format(
    key="r.domain",
    join="JOIN mail.delivery_recipients r USING (delivery_id)",
    late_key="coalesce(lower(substring(l.address FROM '@([^@]*)$')), '')",
)
