"""Is the command stream durable? Redis must keep an append-only file (AOF).

Entries are acknowledged only after PostgreSQL has them, but an entry a producer added is
only as durable as Redis: without AOF a Redis restart loses the stream, the consumer group
and every entry not yet taken in. Checked once at startup: ``CONFIG GET appendonly``, or
``INFO persistence`` where CONFIG is disabled (managed Redis services rename it).
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from maildaemon.logs import event
from maildaemon.pipeline.lifecycle import REDIS_DOWN, RedisClient
from maildaemon.telemetry import Instruments

log = logging.getLogger("maildaemon.redis")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def redis_persistence(redis: RedisClient) -> tuple[bool | None, str | None]:
    """(AOF on?, appendfsync) — (None, None) when Redis will not say. In a Cluster every
    master is asked: AOF counts as on only when it is on for all of them."""
    try:
        if isinstance(redis, aioredis.RedisCluster):
            return await _cluster_persistence(redis)
        conf = {_text(k): _text(v) for k, v in (await redis.config_get("append*")).items()}
        return conf.get("appendonly") == "yes", conf.get("appendfsync")
    except REDIS_DOWN:
        pass
    try:
        info = await redis.info("persistence")
    except RedisError:
        return None, None
    if "aof_enabled" not in info:
        return None, None
    return bool(int(info["aof_enabled"])), None


async def _cluster_persistence(redis: aioredis.RedisCluster) -> tuple[bool, str | None]:
    answers: dict[Any, Any] = await redis.config_get(
        "append*", target_nodes=aioredis.RedisCluster.PRIMARIES
    )
    # {node name: its answer} from each master (one master: its answer alone).
    per_node = [v for v in answers.values() if isinstance(v, dict)] or [answers]
    confs = [{_text(k): _text(v) for k, v in conf.items()} for conf in per_node]
    fsyncs = sorted({c.get("appendfsync", "") for c in confs} - {""})
    return all(c.get("appendonly") == "yes" for c in confs), ",".join(fsyncs) or None


async def check_redis_persistence(redis: RedisClient, instruments: Instruments) -> None:
    """Log (and count) a Redis that would lose the command stream on a restart."""
    aof, fsync = await redis_persistence(redis)
    if aof is None:
        instruments.redis_persistence = -1
        event(
            log,
            "redis persistence unknown",
            logging.WARNING,
            hint="CONFIG and INFO persistence refused; make sure appendonly is yes",
        )
        return
    instruments.redis_persistence = int(aof)
    if aof:
        event(log, "redis persistence", appendonly="yes", appendfsync=fsync)
        return
    instruments.redis_unpersisted.add(1)
    event(
        log,
        "redis has no append-only file",
        logging.WARNING,
        appendonly="no",
        hint="a Redis restart loses the command stream and its consumer group: "
        "set appendonly yes (appendfsync everysec or always)",
    )
