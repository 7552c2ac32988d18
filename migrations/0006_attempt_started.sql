-- maildaemon: an attempt is on record before its bytes go out.
-- Never edit this file once landed: add a new migration instead.
-- depends: 0005_console_indexes

-- The claim statement inserts the attempt row as 'started' (finished_at = the claim time
-- until the result arrives); the result writer completes it. A 'started' row whose lease is
-- taken over by another claim (the process died) becomes 'unknown'.
ALTER TABLE mail.attempts DROP CONSTRAINT attempts_status_check;
ALTER TABLE mail.attempts ADD CONSTRAINT attempts_status_check
    CHECK (status IN ('started', 'sent', 'transport_failed', 'timed_out', 'provider_rejected',
                      'unknown', 'suppressed', 'failed', 'expired'));
