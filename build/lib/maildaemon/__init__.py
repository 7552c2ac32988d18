"""maildaemon: durable mail delivery from a Redis Stream to SMTP, recorded in PostgreSQL."""

__version__ = "0.1.0"
