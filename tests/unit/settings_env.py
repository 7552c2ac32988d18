"""Settings built from a clean environment, as the entry point builds them: a test module
imports ``clean_env`` (an autouse fixture: no MAIL_* variable of the caller leaks in),
``settings(**env)`` and ``problem(**env)`` (the ConfigError text a bad value gives)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from unittest import mock

import pytest

from maildaemon.config import Settings, load_settings
from maildaemon.errors import ConfigError

DSN = "postgresql://mail:s3cret@db.example:5432/mail"


@pytest.fixture(autouse=True)
def clean_env() -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    with mock.patch.dict(os.environ, env, clear=True):
        yield


def settings(**env: str) -> Settings:
    os.environ.update({"MAIL_POSTGRES_PRIMARY_DSN": DSN, "MAIL_SMTP_MODE": "stub", **env})
    return load_settings(_env_file=None)


def problem(**env: str) -> str:
    with pytest.raises(ConfigError) as info:
        settings(**env)
    return str(info.value)
