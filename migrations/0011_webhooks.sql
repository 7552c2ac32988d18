-- maildaemon: webhooks — outcome events delivered to HTTP endpoints, signed, retried.
-- Never edit this file once landed: add a new migration instead.
-- depends: 0009_recipient_table

-- One row per endpoint. `events` NULL takes every event; `source` NULL every source. The
-- secret signs (Standard Webhooks, whsec_<base64>); during a rotation the previous one
-- signs too until `previous_until`. `disabled_reason` says why a disabled endpoint stopped.
CREATE TABLE mail.webhook_endpoints (
    id              bigserial   PRIMARY KEY,
    url             text        NOT NULL,
    events          text[],
    source          text,
    secret          text        NOT NULL,
    previous_secret text,
    previous_until  timestamptz,
    enabled         boolean     NOT NULL DEFAULT true,
    disabled_reason text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Every outcome event that left the outbox while any endpoint existed, kept (for replay,
-- also to an endpoint added later) until retention removes it. Its id is the stable `webhook-id`.
-- `outbox_id` is the outbox row it came from (NULL for a test ping).
CREATE TABLE mail.webhook_events (
    id          bigserial   PRIMARY KEY,
    outbox_id   bigint,
    delivery_id text        NOT NULL,
    event_type  text        NOT NULL,
    source      text,
    fields      jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_events_created_idx ON mail.webhook_events (created_at);

-- One row per (endpoint, event) still to deliver: a queue per endpoint over the outbox.
-- Only the oldest row of a delivery for an endpoint is claimable, so a delivery's events
-- arrive in order; a leased row (lease_until in the future) is in flight.
CREATE TABLE mail.webhook_queue (
    id              bigserial   PRIMARY KEY,
    endpoint_id     bigint      NOT NULL REFERENCES mail.webhook_endpoints (id) ON DELETE CASCADE,
    event_id        bigint      NOT NULL REFERENCES mail.webhook_events (id) ON DELETE CASCADE,
    delivery_id     text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_until     timestamptz,
    claim_token     bigint,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_queue_due_idx ON mail.webhook_queue (endpoint_id, next_attempt_at, event_id);
CREATE INDEX webhook_queue_order_idx ON mail.webhook_queue (endpoint_id, delivery_id, event_id);
CREATE SEQUENCE mail.webhook_claim_seq;
CREATE INDEX webhook_queue_event_idx ON mail.webhook_queue (event_id);
-- The rows in flight (a claim counts them per endpoint without reading the backlog).
CREATE INDEX webhook_queue_leased_idx ON mail.webhook_queue (endpoint_id)
    WHERE lease_until IS NOT NULL;

-- Every attempt: HTTP status (NULL when no answer), duration, error, the answer's start.
CREATE TABLE mail.webhook_attempts (
    id          bigserial   PRIMARY KEY,
    endpoint_id bigint      NOT NULL REFERENCES mail.webhook_endpoints (id) ON DELETE CASCADE,
    event_id    bigint      NOT NULL REFERENCES mail.webhook_events (id) ON DELETE CASCADE,
    attempt_no  integer     NOT NULL,
    ok          boolean     NOT NULL,
    http_status integer,
    duration_ms integer     NOT NULL,
    error       text,
    response    text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_attempts_endpoint_idx ON mail.webhook_attempts (endpoint_id, id);
CREATE INDEX webhook_attempts_event_idx ON mail.webhook_attempts (event_id);
