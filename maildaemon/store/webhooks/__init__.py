"""PostgreSQL access for the webhooks: fan-out from the outbox, the per-endpoint queues,
attempts and the endpoints the operator manages."""
