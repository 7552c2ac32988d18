"""Operator API routes under /api/v1/internal."""

from __future__ import annotations

from aiohttp import web


def register(app: web.Application) -> None:
    """Add the operator API's routes to ``app``."""
    del app
