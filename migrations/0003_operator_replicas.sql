-- maildaemon: what each running daemon judges commands by, so the CLI judges alike.
-- Never edit this file once landed: add a new migration instead.
-- depends: 0002_outbox

-- One row per running replica (its consumer name), written at startup and refreshed by a
-- heartbeat; removed on a clean stop. `catalog_hash` is the content hash of the template
-- catalog the replica loaded; `policy_hash` covers everything intake validates against (the
-- catalog's template ids and the MAIL_* limits). The CLI refuses to judge a replay
-- differently from a live replica.
CREATE TABLE mail.replicas (
    consumer_name text        PRIMARY KEY,
    catalog_hash  text        NOT NULL,
    policy_hash   text        NOT NULL,
    template_ids  text[]      NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
