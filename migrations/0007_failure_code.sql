-- maildaemon: why the daemon itself ended a delivery when no SMTP reply says why.
-- Never edit this file once landed: add a new migration instead.
-- depends: 0006_attempt_started

-- Set by every outcome the result writer records: one of the daemon's failure codes
-- (store_unreadable, unprocessable, attempt_fault, unrecordable_result, message_too_large)
-- or NULL when the outcome is the server's own (its reply code and text say why).
ALTER TABLE mail.deliveries ADD COLUMN failure_code text;
