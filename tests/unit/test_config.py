"""Settings: defaults, parsing, and one readable line for every invalid value."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote, unquote

import pytest

from maildaemon.config import load_settings
from maildaemon.config_values import parse_duration, split_host_port
from maildaemon.errors import ConfigError
from maildaemon.redaction import normalize_dsn, redact_dsn
from tests.unit.settings_env import (
    DSN,
    clean_env,  # noqa: F401  (autouse fixture)
    problem,
    settings,
)


def test_defaults() -> None:
    s = settings()
    assert s.command_stream == "mail:delivery_commands"  # type: ignore[attr-defined]
    assert s.retry_ladder == (30.0, 120.0, 600.0, 1800.0, 7200.0, 21600.0)  # type: ignore[attr-defined]


def test_durations_and_lists() -> None:
    s = settings(
        MAIL_RETRY_LADDER="1s, 2m,1.5h",
        MAIL_SHUTDOWN_TIMEOUT="250ms",
        MAIL_ALLOWED_SOURCES="a,b , c",
    )
    assert s.retry_ladder == (1.0, 120.0, 5400.0)  # type: ignore[attr-defined]
    assert s.shutdown_timeout == 0.25  # type: ignore[attr-defined]
    assert s.allowed_sources == ("a", "b", "c")  # type: ignore[attr-defined]
    assert parse_duration("7d") == 604800.0


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"MAIL_SMTP_MODE": "smtp"}, "MAIL_SMTP_ADDR"),
        ({"MAIL_SMTP_MODE": "smtp", "MAIL_SMTP_ADDR": "smtp.example:587"}, "MAIL_SMTP_FROM"),
        ({"MAIL_SMTP_USERNAME": "u"}, "MAIL_SMTP_PASSWORD"),
        ({"MAIL_SMTP_PASSWORD": "p"}, "MAIL_SMTP_USERNAME"),
        ({"MAIL_REDIS_DB": "x"}, "MAIL_REDIS_DB"),
        ({"MAIL_RETRY_LADDER": "1s,soon"}, "MAIL_RETRY_LADDER"),
        ({"MAIL_SMTP_MODE": "carrier-pigeon"}, "MAIL_SMTP_MODE"),
        ({"MAIL_POSTGRES_PRIMARY_DSN": "mysql://x"}, "MAIL_POSTGRES_PRIMARY_DSN"),
        ({"MAIL_INTERNAL_HTTP_ADDR": "host:99999"}, "MAIL_INTERNAL_HTTP_ADDR"),
        ({"MAIL_LEASE_DURATION": "5s", "MAIL_SMTP_TIMEOUT": "10s"}, "MAIL_LEASE_DURATION"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], names: str) -> None:
    message = problem(**env)
    assert names in message and "\n" not in message


def test_missing_dsn() -> None:
    os.environ["MAIL_SMTP_MODE"] = "stub"
    with pytest.raises(ConfigError, match="MAIL_POSTGRES_PRIMARY_DSN: required"):
        load_settings(_env_file=None)


def test_secrets_never_in_messages_or_redacted_view() -> None:
    message = problem(MAIL_SMTP_PASSWORD="hunter2-secret")
    assert "hunter2-secret" not in message
    s = settings(
        MAIL_SMTP_USERNAME="u",
        MAIL_SMTP_PASSWORD="hunter2-secret",
        MAIL_REDIS_PASSWORD="redis-secret",
    )
    text = repr(s) + str(s.redacted())  # type: ignore[attr-defined]
    assert "hunter2-secret" not in text and "redis-secret" not in text
    assert "s3cret" not in text
    assert redact_dsn(DSN) == "postgresql://mail@db.example:5432/mail"


def test_host_port_forms() -> None:
    assert split_host_port("[::1]:25", 0) == ("::1", 25)
    assert split_host_port("smtp.example", 587) == ("smtp.example", 587)
    with pytest.raises(ValueError):
        split_host_port(":25", 0)


@pytest.mark.parametrize(
    ("dsn", "normal", "shown"),
    [
        (DSN, DSN, "postgresql://mail@db.example:5432/mail"),
        (
            "postgresql://u:p/ss?w#rd@127.0.0.1:1/db",
            "postgresql://u:p%2Fss%3Fw%23rd@127.0.0.1:1/db",
            "postgresql://u@127.0.0.1:1/db",
        ),
        ("postgresql://u:50%off@h/db", "postgresql://u:50%25off@h/db", "postgresql://u@h/db"),
        ("postgresql://u:a%2Fb@h/db?x=1", "postgresql://u:a%2Fb@h/db?x=1", "postgresql://u@h/db"),
        ("postgresql://u:a@b@h/db", "postgresql://u:a%40b@h/db", "postgresql://u@h/db"),
        (
            "postgresql://u@h/db?options=x@y",
            "postgresql://u@h/db?options=x@y",
            "postgresql://u@h/db",
        ),
        ("postgresql://h/db?password=abc", "postgresql://h/db?password=abc", "postgresql://h/db"),
        (
            "postgresql://u:p#/@[::1]:5/db",
            "postgresql://u:p%23%2F@[::1]:5/db",
            "postgresql://u@[::1]:5/db",
        ),
    ],
)
def test_dsn_is_cut_where_the_password_ends(dsn: str, normal: str, shown: str) -> None:
    assert normalize_dsn(dsn) == normal
    assert redact_dsn(dsn) == shown
    s = settings(MAIL_POSTGRES_PRIMARY_DSN=dsn)
    assert s.dsn == normal  # type: ignore[attr-defined]
    secrets = s.secret_values()  # type: ignore[attr-defined]
    for password in ("p/ss?w#rd", "50%off", "a/b", "a@b", "abc", "p#/"):
        if password in unquote(dsn):
            assert password in secrets or quote(password, safe="") in secrets
    assert str(s.redacted()["postgres_primary_dsn"]) == shown  # type: ignore[attr-defined]


def test_batch_budget_holds_a_whole_command() -> None:
    message = problem(MAIL_COMMAND_MAX_BYTES="2000000", MAIL_CONSUMER_BATCH_MAX_BYTES="1000000")
    assert "MAIL_COMMAND_MAX_BYTES" in message and "MAIL_CONSUMER_BATCH_MAX_BYTES" in message
    # Not set: it follows a larger command limit instead of refusing to start.
    del os.environ["MAIL_CONSUMER_BATCH_MAX_BYTES"]
    s = settings(MAIL_COMMAND_MAX_BYTES=str(64 * 1024 * 1024))
    assert s.consumer_batch_max_bytes == 64 * 1024 * 1024  # type: ignore[attr-defined]
    del os.environ["MAIL_COMMAND_MAX_BYTES"]
    assert settings().consumer_batch_max_bytes == 16 * 1024 * 1024  # type: ignore[attr-defined]


def test_redact_dsn_with_several_hosts_keeps_them_and_drops_secrets() -> None:
    dsn = "postgresql://mail:pw@db1:5432,db2:5433/mail?target_session_attrs=read-write&password=x"
    assert redact_dsn(dsn) == "postgresql://mail@db1:5432,db2:5433/mail"


def fresh(**env: str) -> object:
    """Settings from exactly these variables (nothing left from earlier calls)."""
    for key in [k for k in os.environ if k.startswith("MAIL_")]:
        del os.environ[key]
    return settings(**env)


def fresh_problem(**env: str) -> str:
    with pytest.raises(ConfigError) as info:
        fresh(**env)
    return str(info.value)


def test_redis_tls_and_sentinel_fresh() -> None:
    s = fresh(MAIL_REDIS_MASTER_ADDR="rediss://redis.internal:6380")
    assert s.redis_tls_enabled and s.redis_host_port == ("redis.internal", 6380)  # type: ignore[attr-defined]
    assert not fresh().redis_tls_enabled  # type: ignore[attr-defined]
    s = fresh(MAIL_REDIS_SENTINELS="s1:26379, s2", MAIL_REDIS_MASTER_NAME="mail")
    assert s.redis_sentinel_addrs == [("s1", 26379), ("s2", 26379)]  # type: ignore[attr-defined]
    assert "MAIL_REDIS_MASTER_NAME" in fresh_problem(MAIL_REDIS_SENTINELS="s1:26379")
    assert "MAIL_REDIS_SENTINELS" in fresh_problem(MAIL_REDIS_MASTER_NAME="mail")
    assert "MAIL_REDIS_MASTER_ADDR" in fresh_problem(MAIL_REDIS_MASTER_ADDR="http://x:1")
    assert "MAIL_REDIS_MASTER_ADDR" in fresh_problem(MAIL_REDIS_MASTER_ADDR="rediss://u:p@x:1")
    assert "MAIL_REDIS_TLS_CA_FILE" in fresh_problem(MAIL_REDIS_TLS_CA_FILE="/no/such/ca.pem")
    assert "TLS is off" in fresh_problem(MAIL_REDIS_TLS_CA_FILE=__file__)
    assert "go together" in fresh_problem(MAIL_REDIS_TLS="true", MAIL_REDIS_TLS_CERT_FILE=__file__)


def test_pgbouncer_listen_and_session_dsns() -> None:
    direct = "postgresql://mail:pw@db.internal:5432/mail"
    s = fresh()
    assert s.listen_dsn == DSN and s.session_dsn == DSN  # type: ignore[attr-defined]
    s = fresh(MAIL_POSTGRES_PGBOUNCER="true")
    assert s.listen_dsn is None and s.session_dsn == DSN  # type: ignore[attr-defined]
    s = fresh(MAIL_POSTGRES_PGBOUNCER="true", MAIL_POSTGRES_LISTEN_DSN=direct)
    assert s.listen_dsn == direct and s.session_dsn == direct  # type: ignore[attr-defined]
    assert s.redacted()["postgres_listen_dsn"] == "postgresql://mail@db.internal:5432/mail"  # type: ignore[attr-defined]
    assert "MAIL_POSTGRES_LISTEN_DSN" in fresh_problem(MAIL_POSTGRES_LISTEN_DSN="mysql://x/y")


@pytest.mark.parametrize(
    ("addr", "reachable"),
    [
        ("127.0.0.1:8080", False),
        ("127.8.9.10:8080", False),
        ("localhost:8080", False),
        ("[::1]:8080", False),
        ("0.0.0.0:8080", True),
        ("[::]:8080", True),
        ("10.0.0.5:8080", True),
        ("maildaemon.internal:8080", True),
    ],
)
def test_a_reachable_listener_needs_the_read_token(addr: str, reachable: bool) -> None:
    from maildaemon.exposure import check_read_exposure

    for token in (None, ""):  # an empty token is no token
        extra = {} if token is None else {"MAIL_OPERATOR_READ_TOKEN": token}
        bare: Any = settings(MAIL_INTERNAL_HTTP_ADDR=addr, **extra)
        if reachable:
            with pytest.raises(ConfigError) as info:
                check_read_exposure(bare)
            assert "MAIL_OPERATOR_READ_TOKEN: required" in str(info.value)
            assert "MAIL_INTERNAL_HTTP_OPEN_READS=true" in str(info.value)
        else:
            check_read_exposure(bare)
    guarded: Any = settings(MAIL_INTERNAL_HTTP_ADDR=addr, MAIL_OPERATOR_READ_TOKEN="r-token")
    check_read_exposure(guarded)
    del os.environ["MAIL_OPERATOR_READ_TOKEN"]  # settings() adds to the environment
    opened: Any = settings(MAIL_INTERNAL_HTTP_ADDR=addr, MAIL_INTERNAL_HTTP_OPEN_READS="true")
    check_read_exposure(opened)
