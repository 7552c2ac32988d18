"""The operator console's PostgreSQL reads: stats series, pinned message bytes, recent
malformed commands; their statements and records."""
