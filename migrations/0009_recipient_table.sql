-- maildaemon: recipients in a table of their own, written once, so that the updates every
-- claim and every result make to mail.deliveries no longer rebuild index entries for them.
-- Never edit this file once landed: add a new migration instead.
-- depends: 0008_claim_ref

-- The GIN indexes of 0004 were expression indexes on mail.deliveries: every claim and
-- every result is a non-HOT update there (status and next_attempt_at are indexed), and
-- each one evaluated both recipient functions again and inserted their GIN entries anew
-- (about 40 % of a claim's cost). Recipients never change after intake: one row each here,
-- filled by a statement trigger on intake's insert (so a release that predates this table
-- fills it too), looked up by address or by domain.
CREATE TABLE IF NOT EXISTS mail.delivery_recipients (
    address     text NOT NULL,  -- lower-cased, as mail.recipient_keys gave it
    delivery_id text NOT NULL REFERENCES mail.deliveries (delivery_id) ON DELETE CASCADE,
    domain      text NOT NULL,  -- lower-cased, as mail.recipient_domains gave it
    PRIMARY KEY (address, delivery_id)
);
CREATE INDEX IF NOT EXISTS delivery_recipients_domain_idx ON mail.delivery_recipients (domain);
CREATE INDEX IF NOT EXISTS delivery_recipients_delivery_idx
    ON mail.delivery_recipients (delivery_id);

CREATE FUNCTION mail.record_recipients() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mail.delivery_recipients (address, delivery_id, domain)
    SELECT DISTINCT lower(t.a), n.delivery_id, coalesce(lower(substring(t.a FROM '@([^@]*)$')), '')
    FROM new_rows n, unnest(n.to_addrs || n.cc_addrs || n.bcc_addrs) AS t(a)
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER deliveries_record_recipients AFTER INSERT ON mail.deliveries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mail.record_recipients();

-- Deliveries that exist already and are not in the table yet (on a large table, fill it
-- beforehand: RUNBOOK, "Migrations on a large database"; intake waits while this runs).
INSERT INTO mail.delivery_recipients (address, delivery_id, domain)
SELECT DISTINCT lower(t.a), d.delivery_id, coalesce(lower(substring(t.a FROM '@([^@]*)$')), '')
FROM mail.deliveries d, unnest(d.to_addrs || d.cc_addrs || d.bcc_addrs) AS t(a)
WHERE NOT EXISTS (SELECT 1 FROM mail.delivery_recipients r WHERE r.delivery_id = d.delivery_id)
ON CONFLICT DO NOTHING;

-- The functions stay (a release before this one still calls them while an upgrade rolls).
DROP INDEX IF EXISTS mail.deliveries_recipients_idx;
DROP INDEX IF EXISTS mail.deliveries_recipient_domains_idx;
