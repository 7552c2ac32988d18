-- maildaemon: an index for the operator console's reads.
-- Never edit this file once landed: add a new migration instead.
-- depends: 0004_recipient_search

-- "What became of delivery_id X" when X was refused at intake (no delivery row exists).
CREATE INDEX malformed_delivery_idx ON mail.malformed_commands (delivery_id)
    WHERE delivery_id IS NOT NULL;
