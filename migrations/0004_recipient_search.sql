-- maildaemon: recipient and recipient-domain searches through an index, not a scan.
-- Never edit this file once landed: add a new migration instead.
-- depends: 0003_operator_replicas

-- Every recipient of a delivery (to, cc, bcc), lower-cased; and their domains.
CREATE FUNCTION mail.recipient_keys(to_addrs text[], cc_addrs text[], bcc_addrs text[])
RETURNS text[] LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT coalesce(array_agg(DISTINCT lower(a)), '{}')
    FROM unnest(to_addrs || cc_addrs || bcc_addrs) AS t(a)
$$;

CREATE FUNCTION mail.recipient_domains(to_addrs text[], cc_addrs text[], bcc_addrs text[])
RETURNS text[] LANGUAGE sql IMMUTABLE PARALLEL SAFE STRICT AS $$
    SELECT coalesce(array_agg(DISTINCT lower(substring(a FROM '@([^@]*)$'))), '{}')
    FROM unnest(to_addrs || cc_addrs || bcc_addrs) AS t(a)
$$;

CREATE INDEX deliveries_recipients_idx ON mail.deliveries
    USING gin (mail.recipient_keys(to_addrs, cc_addrs, bcc_addrs));
CREATE INDEX deliveries_recipient_domains_idx ON mail.deliveries
    USING gin (mail.recipient_domains(to_addrs, cc_addrs, bcc_addrs));
