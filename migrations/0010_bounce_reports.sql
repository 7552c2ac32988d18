-- maildaemon: bounces, complaints and delays that arrive after the relay's 250.
-- Never edit this file once landed: add a new migration instead.
-- depends: 0009_recipient_table

-- A delivery may end `bounced` (every recipient bounced after the relay accepted it).
-- NOT VALID first, then VALIDATE: the check is added under a brief lock and the table is
-- scanned without blocking intake or claims.
ALTER TABLE mail.deliveries DROP CONSTRAINT IF EXISTS deliveries_status_check;
ALTER TABLE mail.deliveries ADD CONSTRAINT deliveries_status_check
    CHECK (status IN ('queued', 'rendered', 'sending', 'sent', 'suppressed', 'failed',
                      'dead_letter', 'expired', 'cancelled', 'bounced')) NOT VALID;
ALTER TABLE mail.deliveries VALIDATE CONSTRAINT deliveries_status_check;

-- The reference a return-path token carries (maildaemon/returnpath.py: the first 10 bytes
-- of SHA-256 over the delivery id), written once at intake by a statement trigger, so a
-- report finds its delivery by an index lookup and the hot tables gain no index.
CREATE TABLE IF NOT EXISTS mail.delivery_refs (
    ref         bytea PRIMARY KEY,
    delivery_id text  NOT NULL REFERENCES mail.deliveries (delivery_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS delivery_refs_delivery_idx ON mail.delivery_refs (delivery_id);

CREATE FUNCTION mail.record_delivery_refs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mail.delivery_refs (ref, delivery_id)
    SELECT substring(sha256(convert_to(n.delivery_id, 'UTF8')) FROM 1 FOR 10), n.delivery_id
    FROM new_rows n
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER deliveries_record_refs AFTER INSERT ON mail.deliveries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mail.record_delivery_refs();

INSERT INTO mail.delivery_refs (ref, delivery_id)
SELECT substring(sha256(convert_to(d.delivery_id, 'UTF8')) FROM 1 FOR 10), d.delivery_id
FROM mail.deliveries d
ON CONFLICT DO NOTHING;

-- Every report received (listener or `maildaemon bounces ingest`), kept raw (bounded by
-- MAIL_BOUNCE_MAX_BYTES) with what it was matched to, or why not. Deleted by retention
-- after MAIL_BOUNCE_REPORT_RETENTION. delivery_id is no foreign key: a report outlives
-- the delivery it names, and a report for a purged delivery is still kept.
CREATE TABLE IF NOT EXISTS mail.reports (
    report_id     bigserial   PRIMARY KEY,
    received_at   timestamptz NOT NULL DEFAULT now(),
    via           text        NOT NULL CHECK (via IN ('listener', 'ingest')),
    envelope_from text,
    envelope_to   text,
    raw           bytea       NOT NULL,
    raw_size      integer     NOT NULL,  -- octets received (raw may be cut to the bound)
    raw_truncated boolean     NOT NULL DEFAULT false,
    raw_sha256    bytea       NOT NULL,
    kind          text        NOT NULL
        CHECK (kind IN ('bounce', 'delay', 'complaint', 'auto_reply', 'unknown')),
    match_status  text        NOT NULL
        CHECK (match_status IN ('matched', 'unmatched', 'bad_token', 'unparseable')),
    delivery_id   text,
    detail        text,      -- why it is unmatched / unparseable, or what it did
    subject       text,
    remote_mta    text,
    recipients    jsonb       NOT NULL DEFAULT '[]'  -- [{address, action, status, diagnostic, effect}]
);
-- The same report twice (the MTA retried after a lost reply) is recorded once.
CREATE UNIQUE INDEX IF NOT EXISTS reports_raw_sha256_idx ON mail.reports (raw_sha256);
CREATE INDEX IF NOT EXISTS reports_received_idx ON mail.reports (received_at DESC, report_id DESC);
CREATE INDEX IF NOT EXISTS reports_delivery_idx ON mail.reports (delivery_id)
    WHERE delivery_id IS NOT NULL;

-- What reports did to a delivery's recipients after the relay accepted them: one row per
-- (delivery, recipient, outcome), so the same effect is applied (and its event written)
-- once, whatever number of reports say it.
CREATE TABLE IF NOT EXISTS mail.late_outcomes (
    delivery_id text        NOT NULL REFERENCES mail.deliveries (delivery_id) ON DELETE CASCADE,
    address     text        NOT NULL,  -- lower-cased, as mail.delivery_recipients holds it
    outcome     text        NOT NULL CHECK (outcome IN ('bounced', 'complained', 'delayed')),
    status_code text,
    diagnostic  text,
    report_id   bigint      NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (delivery_id, address, outcome)
);
