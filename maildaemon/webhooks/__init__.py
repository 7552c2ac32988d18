"""Webhooks: outcome events to HTTP endpoints, signed per Standard Webhooks, with the
target checks (scheme, refused address ranges) and the HTTP client one endpoint uses."""
