-- maildaemon: the durable mail state, schema `mail`.
-- Never edit this file once landed: add a new migration instead.

CREATE SCHEMA IF NOT EXISTS mail;

-- One row per accepted delivery command. Narrow on purpose: the claim path
-- rewrites it on every attempt, so bulky content lives in delivery_payloads.
CREATE TABLE mail.deliveries (
    delivery_id        text PRIMARY KEY,
    source             text        NOT NULL,
    idempotency_key    text        NOT NULL,
    command_hash       bytea       NOT NULL,
    status             text        NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'rendered', 'sending', 'sent', 'suppressed',
                          'failed', 'dead_letter', 'expired', 'cancelled')),
    priority           smallint    NOT NULL DEFAULT 2,          -- 0 critical .. 3 low
    payload_mode       text        NOT NULL CHECK (payload_mode IN ('template', 'rendered')),
    template_id        text,
    locale             text,
    to_addrs           text[]      NOT NULL,
    cc_addrs           text[]      NOT NULL DEFAULT '{}',
    bcc_addrs          text[]      NOT NULL DEFAULT '{}',
    reply_to           text,
    -- Recipients still owed the message: NULL means all of them. Shrinks as
    -- the server accepts or permanently refuses recipients.
    pending_rcpts      text[],
    rcpts_accepted     integer     NOT NULL DEFAULT 0,          -- accepted by the server so far
    send_at            timestamptz,
    expires_at         timestamptz,
    -- When the delivery may next be claimed. NULL once it can never be attempted
    -- again (terminal). While claimed it holds the lease expiry, so a claim held
    -- by a process that died becomes claimable again by itself.
    next_attempt_at    timestamptz,
    claim_token        bigint      NOT NULL DEFAULT 0,          -- fence for result writes
    claimed_by         text,
    attempt_count      integer     NOT NULL DEFAULT 0,
    -- attempt_count when the retry ladder last started over (an operator requeue).
    ladder_base        integer     NOT NULL DEFAULT 0,
    possible_duplicate boolean     NOT NULL DEFAULT false,
    status_reason      text,
    last_reply_code    integer,
    last_reply_text    text,
    message_id         text,
    content_hash       text,
    rendered_at        timestamptz,
    stream_entry_id    text,
    traceparent        text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz
);

-- The claim path: only deliveries that can be attempted are in this index.
CREATE INDEX deliveries_due_idx ON mail.deliveries (priority, next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX deliveries_due_time_idx ON mail.deliveries (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX deliveries_created_idx ON mail.deliveries (created_at DESC, delivery_id DESC);
CREATE INDEX deliveries_status_created_idx ON mail.deliveries (status, created_at DESC);
CREATE INDEX deliveries_source_created_idx ON mail.deliveries (source, created_at DESC);
CREATE INDEX deliveries_stream_entry_idx ON mail.deliveries (stream_entry_id);
CREATE INDEX deliveries_finished_idx ON mail.deliveries (finished_at) WHERE finished_at IS NOT NULL;

-- The command as received, and the message as rendered (pinned once, sent on every retry).
CREATE TABLE mail.delivery_payloads (
    delivery_id   text PRIMARY KEY REFERENCES mail.deliveries (delivery_id) ON DELETE CASCADE,
    command       jsonb       NOT NULL,
    rendered      bytea,
    rendered_size integer
);

-- Idempotency reservations on (source, idempotency_key); expired by the retention worker.
CREATE TABLE mail.idempotency_reservations (
    source          text        NOT NULL,
    idempotency_key text        NOT NULL,
    delivery_id     text        NOT NULL,
    command_hash    bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (source, idempotency_key)
);
CREATE INDEX idempotency_expires_idx ON mail.idempotency_reservations (expires_at);

-- Stream entries that were a replay of an already accepted command.
CREATE TABLE mail.command_replays (
    stream_entry_id text        NOT NULL,
    delivery_id     text        NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_entry_id, delivery_id)
);
CREATE INDEX command_replays_received_idx ON mail.command_replays (received_at);

-- Every stream entry that could not become a delivery.
CREATE TABLE mail.malformed_commands (
    id              bigserial PRIMARY KEY,
    stream_entry_id text        NOT NULL,
    failure_code    text        NOT NULL,
    failure_detail  text        NOT NULL,
    delivery_id     text,
    source          text,
    raw             text        NOT NULL,
    raw_truncated   boolean     NOT NULL DEFAULT false,
    received_at     timestamptz NOT NULL DEFAULT now(),
    replayed_at     timestamptz,
    replayed_delivery_id text
);
CREATE UNIQUE INDEX malformed_stream_entry_idx ON mail.malformed_commands (stream_entry_id);
CREATE INDEX malformed_received_idx ON mail.malformed_commands (received_at DESC, id DESC);
CREATE INDEX malformed_code_idx ON mail.malformed_commands (failure_code, received_at DESC);

-- One row per SMTP attempt.
CREATE TABLE mail.attempts (
    delivery_id   text        NOT NULL REFERENCES mail.deliveries (delivery_id) ON DELETE CASCADE,
    attempt_no    integer     NOT NULL,
    status        text        NOT NULL
        CHECK (status IN ('sent', 'transport_failed', 'timed_out', 'provider_rejected',
                          'unknown', 'suppressed', 'failed', 'expired')),
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    reply_code    integer,
    reply_text    text,
    -- Per-recipient outcome: {"addr": {"code": 250, "text": "...", "outcome": "accepted"}}
    recipients    jsonb,
    worker        text,
    PRIMARY KEY (delivery_id, attempt_no)
);
CREATE INDEX attempts_finished_idx ON mail.attempts (finished_at DESC);

CREATE TABLE mail.dead_letters (
    delivery_id     text PRIMARY KEY REFERENCES mail.deliveries (delivery_id) ON DELETE CASCADE,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempt_count   integer     NOT NULL,
    last_status     text        NOT NULL,
    last_reply_code integer,
    last_reply_text text,
    reviewed_at     timestamptz,
    reviewed_by     text,
    review_note     text,
    requeued_at     timestamptz,
    requeued_by     text
);
CREATE INDEX dead_letters_created_idx ON mail.dead_letters (created_at DESC, delivery_id DESC);

-- Addresses not to send to (hard bounces, operator entries).
CREATE TABLE mail.suppressions (
    address            text PRIMARY KEY,              -- lower-cased
    reason             text        NOT NULL,
    reply_code         integer,
    source_delivery_id text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    expires_at         timestamptz,
    created_by         text        NOT NULL DEFAULT 'maildaemon'
);

-- Pause state shared by all replicas: scope '*' is global, otherwise a source.
CREATE TABLE mail.sending_pauses (
    scope      text PRIMARY KEY,
    paused_at  timestamptz NOT NULL DEFAULT now(),
    paused_by  text        NOT NULL,
    reason     text
);

-- Every operator action: who, what, when, why.
CREATE TABLE mail.operator_actions (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    actor      text        NOT NULL,
    action     text        NOT NULL,
    target     text,
    reason     text,
    detail     jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX operator_actions_at_idx ON mail.operator_actions (at DESC);
