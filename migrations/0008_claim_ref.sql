-- maildaemon: which claim statement leased a delivery, so that a claim whose commit
-- reply was lost (PostgreSQL went away mid-statement) can be found and given back.
-- Never edit this file once landed: add a new migration instead.
-- depends: 0007_failure_code

-- A fresh value per claim statement, set with the lease; NULL before this release and
-- once the delivery is released or finished is irrelevant (only 'sending' rows are read).
ALTER TABLE mail.deliveries ADD COLUMN claim_ref text;
