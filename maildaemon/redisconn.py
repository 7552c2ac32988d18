"""Every Redis client of the daemon and the CLI is built here: plain, TLS or Sentinel.

``MAIL_REDIS_MASTER_ADDR`` (``host:port`` or ``rediss://host:port`` for TLS) names the
master directly; with ``MAIL_REDIS_SENTINELS`` and ``MAIL_REDIS_MASTER_NAME`` the master is
looked up at the sentinels instead, and looked up again whenever its connection fails or
it answers as a replica (after a failover). TLS (``MAIL_REDIS_TLS``, or the ``rediss://``
form) verifies the server's certificate and host name against ``MAIL_REDIS_TLS_CA_FILE``
(else the system store) and presents ``MAIL_REDIS_TLS_CERT_FILE``/``_KEY_FILE`` when set;
it applies to the sentinels and to the master alike.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from maildaemon.config import Settings
from maildaemon.config_values import split_redis_addr

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


def redis_client(settings: Settings) -> aioredis.Redis:
    """The one way to a Redis client: the master, directly or through the sentinels."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    common: dict[str, Any] = {
        "socket_connect_timeout": _CONNECT_TIMEOUT,
        "socket_keepalive": True,
        **tls_kwargs(settings),
    }
    if settings.redis_sentinels:
        assert settings.redis_master_name is not None  # the settings require it
        sentinel_password = (
            settings.redis_sentinel_password.get_secret_value()
            if settings.redis_sentinel_password
            else None
        )
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
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


class SentinelRedis(aioredis.Redis):
    """The master's client; closing it closes the connections to the sentinels too."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for client in self.sentinel_manager.sentinels:
                await client.aclose()
