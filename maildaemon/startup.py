"""The daemon's startup steps: each one logged once, bounded, and any failure a
``StartupError`` that names it; the configuration logged first (redacted); Redis opened
and checked (ping, the cluster's layout, persistence) before anything else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisClusterException, RedisError

from maildaemon.config import Settings
from maildaemon.errors import MailDaemonError, StartupError
from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import RedisClient
from maildaemon.pipeline.persistence import check_redis_persistence
from maildaemon.redisconn import cluster_layout, redis_client
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.app")
T = TypeVar("T")


def log_configuration(s: Settings) -> None:
    # secrets and DSN passwords removed; in text format one setting a line
    event(log, "configuration", _block=True, **s.redacted())
    if s.smtp_mode == "smtp" and not s.smtp_tls_verify:
        event(
            log,
            "smtp certificate verification is OFF (MAIL_SMTP_TLS_VERIFY=false)",
            logging.WARNING,
        )
    if s.smtp_mode == "stub":
        event(
            log,
            "stub mode: deliveries are rendered and recorded, nothing is sent",
            logging.WARNING,
        )


async def step(name: str, action: Callable[[], Awaitable[T]], timeout: float, **fields: Any) -> T:
    """Run one startup step: logged once, bounded, any failure a StartupError naming it."""
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(action(), timeout)
    except StartupError as exc:
        raise StartupError(f"{name}: {exc}") from None
    except TimeoutError:
        raise StartupError(f"{name}: no answer within {timeout:.0f}s") from None
    except (MailDaemonError, RedisError, RedisClusterException, OSError) as exc:
        raise StartupError(f"{name}: {exc}") from None
    except Exception as exc:
        log.exception("startup step failed", extra={"step": name})
        raise StartupError(f"{name}: {type(exc).__name__}: {exc}") from None
    event(
        log, f"startup: {name}", duration_ms=round((time.monotonic() - started) * 1000, 1), **fields
    )
    return result


async def open_redis(
    stack: contextlib.AsyncExitStack, s: Settings, instruments: Instruments
) -> RedisClient:
    """The Redis client, closed with ``stack``: answering, and on a cluster its layout
    logged; persistence checked (a warning, not a refusal)."""
    redis = redis_client(s)
    stack.push_async_callback(redis.aclose)
    await step("redis ping", redis.ping, 10, addr=s.redis_target, tls=s.redis_tls_enabled)
    if isinstance(redis, aioredis.RedisCluster):
        layout = await step("redis cluster", lambda: cluster_layout(redis, s), 10)
        event(log, "redis cluster", **layout)
    await check_redis_persistence(redis, instruments)
    return redis
