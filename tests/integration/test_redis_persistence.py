"""Startup warns when Redis keeps no append-only file (the command stream would not
survive a Redis restart), and says so in a gauge."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ResponseError

from maildaemon.config import Settings
from maildaemon.devstack.redis import EmbeddedRedis
from maildaemon.pipeline.persistence import redis_persistence
from tests.support import running_app

MakeSettings = Callable[..., Settings]


async def test_redis_without_aof_is_reported(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with running_app(make_settings(smtp_mode="stub")) as app:  # test Redis: no AOF
        assert app.telemetry.instruments.redis_persistence == 0
    assert "redis has no append-only file" in [r.getMessage() for r in caplog.records]


async def test_redis_with_aof_is_reported(
    make_settings: MakeSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with EmbeddedRedis(tmp_path / "redis", persistent=True) as server:
        async with running_app(
            make_settings(smtp_mode="stub", redis_master_addr=server.addr)
        ) as app:
            assert app.telemetry.instruments.redis_persistence == 1
    messages = [r.getMessage() for r in caplog.records]
    assert "redis persistence" in messages and "redis has no append-only file" not in messages


class _NoConfig:
    """A Redis whose CONFIG command is disabled (as managed services do)."""

    def __init__(self, info: dict[str, Any] | Exception) -> None:
        self._info = info

    async def config_get(self, pattern: str) -> dict[str, str]:
        raise ResponseError("unknown command 'CONFIG'")

    async def info(self, section: str) -> dict[str, Any]:
        if isinstance(self._info, Exception):
            raise self._info
        return self._info


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"aof_enabled": 1}, True),
        ({"aof_enabled": 0}, False),
        ({}, None),
        (ResponseError("unknown command 'INFO'"), None),
    ],
)
async def test_disabled_config_falls_back_to_info(
    info: dict[str, Any] | Exception, expected: bool | None
) -> None:
    aof, _ = await redis_persistence(_NoConfig(info))  # type: ignore[arg-type]
    assert aof is expected
