-- maildaemon: recipient and recipient-domain searches through an index, not a scan.
-- Never edit this file once landed: add a new migration instead.
-- depends: 0003_operator_replicas

-- On a large mail.deliveries the index builds block writes for a while (and count against
-- the startup's migration step): build them beforehand without blocking, as the RUNBOOK
-- shows (the functions below, then CREATE INDEX CONCURRENTLY ... with the same names); this
-- migration then finds them in place.

-- Every recipient of a delivery (to, cc, bcc), lower-cased; and their domains.
CREATE OR REPLACE FUNCTION mail.recipient_keys(to_addrs text[], cc_addrs text[], bcc_addrs text[])
RETURNS text[] LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT coalesce(array_agg(DISTINCT lower(a)), '{}')
    FROM unnest(to_addrs || cc_addrs || bcc_addrs) AS t(a)
$$;

CREATE OR REPLACE FUNCTION mail.recipient_domains(to_addrs text[], cc_addrs text[], bcc_addrs text[])
RETURNS text[] LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT coalesce(array_agg(DISTINCT lower(substring(a FROM '@([^@]*)$'))), '{}')
    FROM unnest(to_addrs || cc_addrs || bcc_addrs) AS t(a)
$$;

CREATE INDEX IF NOT EXISTS deliveries_recipients_idx ON mail.deliveries
    USING gin (mail.recipient_keys(to_addrs, cc_addrs, bcc_addrs));
CREATE INDEX IF NOT EXISTS deliveries_recipient_domains_idx ON mail.deliveries
    USING gin (mail.recipient_domains(to_addrs, cc_addrs, bcc_addrs));
