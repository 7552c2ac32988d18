-- maildaemon: outcome events written in the result transaction (transactional outbox).
-- Never edit this file once landed: add a new migration instead.
-- depends: 0001_initial

-- One row per outcome event not yet published to MAIL_EVENT_STREAM. Written by the same
-- transaction that records the outcome, deleted once Redis has the event; published in id
-- order by one replica at a time, so events for a delivery keep their order.
CREATE TABLE mail.outbox (
    id          bigserial   PRIMARY KEY,
    delivery_id text        NOT NULL,
    fields      jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
