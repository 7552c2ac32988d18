-- maildaemon: indexes for the operator console's reads.
-- Never edit this file once landed: add a new migration instead.
-- depends: 0002_outbox

-- The stats time series (GET /api/v1/internal/stats?window=…) counts deliveries that
-- ended per interval by status: an index-only range scan on finished_at.
CREATE INDEX deliveries_finished_status_idx ON mail.deliveries (finished_at, status)
    WHERE finished_at IS NOT NULL;

-- "What became of delivery_id X" when X was refused at intake.
CREATE INDEX malformed_delivery_idx ON mail.malformed_commands (delivery_id)
    WHERE delivery_id IS NOT NULL;
