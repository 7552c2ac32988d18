"""The delivery pipeline's PostgreSQL access: intake, claims, the one terminal-outcome
writer, the outbox; its statements and rows."""
