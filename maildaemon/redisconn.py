"""Every Redis client of the daemon and the CLI is built here: plain, TLS or Sentinel.

``MAIL_REDIS_MASTER_ADDR`` (``host:port`` or ``rediss://host:port`` for TLS) names the
master directly; with ``MAIL_REDIS_SENTINELS`` and ``MAIL_REDIS_MASTER_NAME`` the master is
looked up at the sentinels instead, and looked up again whenever its connection fails or
it answers as a replica (after a failover). TLS (``MAIL_REDIS_TLS``, or the ``rediss://``
form) verifies the server's certificate and host name against ``MAIL_REDIS_TLS_CA_FILE``
(else the system store) and presents ``MAIL_REDIS_TLS_CERT_FILE``/``_KEY_FILE`` when set;
it applies to the sentinels and to the master alike.

With ``MAIL_REDIS_CLUSTER=true`` the client is a Redis Cluster client: ``MAIL_REDIS_MASTER_ADDR``
and ``MAIL_REDIS_CLUSTER_NODES`` are seed nodes, each key goes to the master of its slot,
MOVED/ASK redirections are followed and the slot map is read again after a failover.
Every script and pipeline of the daemon touches one key, so the default stream names work
unchanged in a Cluster; ``check_cluster_keys`` refuses, at startup, any operation declared
with keys in more than one slot (a Cluster would refuse it with CROSSSLOT mid-run).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot

from maildaemon.config import Settings
from maildaemon.config_values import split_redis_addr
from maildaemon.errors import ConfigError

# Bounds shared by every connection: a dead peer is noticed, never waited on forever.
_CONNECT_TIMEOUT = 5.0
_HEALTH_CHECK_INTERVAL = 30


def tls_kwargs(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS arguments for the settings (empty when TLS is off)."""
    if not settings.redis_tls_enabled:
        return {}
    s = settings
    return {
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_certs": str(s.redis_tls_ca_file) if s.redis_tls_ca_file else None,
        "ssl_certfile": str(s.redis_tls_cert_file) if s.redis_tls_cert_file else None,
        "ssl_keyfile": str(s.redis_tls_key_file) if s.redis_tls_key_file else None,
    }


def redis_client(settings: Settings) -> aioredis.Redis | aioredis.RedisCluster:
    """The one way to a Redis client: the master, directly or through the sentinels, or
    the masters of a Cluster."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    common: dict[str, Any] = {
        "socket_connect_timeout": _CONNECT_TIMEOUT,
        "socket_keepalive": True,
        **tls_kwargs(settings),
    }
    if settings.redis_cluster:
        return cluster_client(settings, password, common)
    if settings.redis_sentinels:
        assert settings.redis_master_name is not None  # the settings require it
        sentinel_password = (
            settings.redis_sentinel_password.get_secret_value()
            if settings.redis_sentinel_password
            else None
        )
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            settings.redis_sentinel_addrs,
            sentinel_kwargs={**common, "password": sentinel_password},
            **common,
        )
        # Sentinel-managed connections ask the sentinels again after every connection
        # failure and when the old master answers READONLY (it was demoted).
        client = sentinel.master_for(
            settings.redis_master_name,
            redis_class=SentinelRedis,
            db=settings.redis_db,
            password=password,
            health_check_interval=_HEALTH_CHECK_INTERVAL,
        )
        assert isinstance(client, SentinelRedis)
        client.sentinel_manager = sentinel
        return client
    _tls, host, port = split_redis_addr(settings.redis_master_addr)
    return aioredis.Redis(
        host=host,
        port=port,
        db=settings.redis_db,
        password=password,
        health_check_interval=_HEALTH_CHECK_INTERVAL,
        **common,
    )


def cluster_client(
    settings: Settings, password: str | None, common: dict[str, Any]
) -> aioredis.RedisCluster:
    """A Cluster client seeded with the configured nodes.

    A slot whose master is down is not the whole cluster down (``require_full_coverage``
    off): the other slots' keys stay usable while a replica takes over."""
    seeds = []
    for addr in (settings.redis_master_addr, *settings.redis_cluster_nodes):
        _tls, host, port = split_redis_addr(addr)
        seeds.append(ClusterNode(host, port))
    client = IntakeCluster(
        startup_nodes=seeds,
        require_full_coverage=False,
        password=password,
        health_check_interval=_HEALTH_CHECK_INTERVAL,
        **common,
    )
    client.intake_key = settings.command_stream
    return client


def cluster_key_groups(settings: Settings) -> dict[str, tuple[str, ...]]:
    """Every Redis operation of the daemon by name, with all the keys it touches (a Lua
    script's KEYS, a transaction's keys). In a Cluster each group must lie in one slot."""
    return {
        "bounded read (stream_reader)": (settings.command_stream,),
        "lag count (stream_reader)": (settings.command_stream,),
        "stream trim (stream_trim)": (settings.command_stream,),
        "event publish (events)": (settings.event_stream,),
    }


def check_cluster_keys(groups: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """The slot of each operation's keys; a ConfigError naming the operation and its keys'
    slots when they lie in more than one (give them a common hash tag: ``{mail}:...``)."""
    slots: dict[str, int] = {}
    for operation, keys in groups.items():
        found = {key: key_slot(key.encode()) for key in keys}
        if len(set(found.values())) > 1:
            spread = ", ".join(f"{k} (slot {s})" for k, s in found.items())
            raise ConfigError(
                f"redis cluster: the keys of {operation} lie in different slots: {spread}; "
                "name them with a common hash tag, e.g. {mail}:delivery_commands"
            )
        slots[operation] = next(iter(found.values()))
    return slots


async def cluster_layout(client: aioredis.RedisCluster, settings: Settings) -> dict[str, Any]:
    """Where the daemon's keys live in the Cluster (for the startup line), after refusing
    any operation whose keys lie in more than one slot."""
    check_cluster_keys(cluster_key_groups(settings))
    layout: dict[str, Any] = {"masters": len(client.get_primaries())}
    for name, key in (
        ("command_stream", settings.command_stream),
        ("event_stream", settings.event_stream),
    ):
        node = client.get_node_from_key(key)
        layout[f"{name}_slot"] = key_slot(key.encode())
        layout[f"{name}_node"] = node.name if node else None
    return layout


class IntakeCluster(aioredis.RedisCluster):
    """A Cluster client whose plain ``ping()`` (the startup ping, the readiness probe)
    asks the master that holds the command stream: a cluster whose other masters answer
    cannot take commands without it."""

    intake_key: str = ""

    async def ping(self, **kwargs: Any) -> Any:
        if "target_nodes" not in kwargs and self.intake_key:
            await self.initialize()  # the slot map (read once, on the first call)
            kwargs["target_nodes"] = self.get_node_from_key(self.intake_key)
        return await super().ping(**kwargs)


class SentinelRedis(aioredis.Redis):
    """The master's client; closing it closes the connections to the sentinels too."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for client in self.sentinel_manager.sentinels:
                await client.aclose()
