"""Redis Cluster settings and the startup check that each operation's keys share a slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from maildaemon.errors import ConfigError
from maildaemon.redisconn import check_cluster_keys, cluster_key_groups
from tests.unit.settings_env import (
    clean_env,  # noqa: F401  (autouse fixture)
    problem,
    settings,
)


def test_cluster_is_off_by_default_and_names_are_unchanged() -> None:
    s = settings()
    assert s.redis_cluster is False and s.redis_cluster_nodes == ()
    assert s.command_stream == "mail:delivery_commands"
    assert s.event_stream == "mail:delivery_events"
    assert s.command_stream_trim_interval == 60.0


def test_cluster_seed_nodes() -> None:
    s = settings(
        MAIL_REDIS_CLUSTER="true",
        MAIL_REDIS_MASTER_ADDR="r1:7000",
        MAIL_REDIS_CLUSTER_NODES="r2:7001, r3:7002",
    )
    assert s.redis_cluster_nodes == ("r2:7001", "r3:7002")
    assert s.redis_target == "cluster:r1:7000,r2:7001,r3:7002"
    assert not s.redis_tls_enabled


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAIL_REDIS_CLUSTER_NODES": "r2:7001"}, "MAIL_REDIS_CLUSTER is off"),
        (
            {
                "MAIL_REDIS_CLUSTER": "true",
                "MAIL_REDIS_SENTINELS": "s1:26379",
                "MAIL_REDIS_MASTER_NAME": "m",
            },
            "a Cluster has no sentinels",
        ),
        ({"MAIL_REDIS_CLUSTER": "true", "MAIL_REDIS_DB": "3"}, "database 0 only"),
        (
            {"MAIL_REDIS_CLUSTER": "true", "MAIL_REDIS_CLUSTER_NODES": "ftp://x:1"},
            "MAIL_REDIS_CLUSTER_NODES",
        ),
        (
            {"MAIL_REDIS_CLUSTER": "true", "MAIL_REDIS_CLUSTER_NODES": "rediss://r3:7002"},
            "every seed is rediss:// or none is",
        ),
        ({"MAIL_COMMAND_STREAM_TRIM_INTERVAL": "-1s"}, "MAIL_COMMAND_STREAM_TRIM_INTERVAL"),
    ],
)
def test_impossible_cluster_settings_are_refused(env: dict[str, str], message: str) -> None:
    assert message in problem(**env)


def test_every_operation_of_the_defaults_lies_in_one_slot() -> None:
    slots = check_cluster_keys(cluster_key_groups(settings()))
    assert slots["bounded read (stream_reader)"] == key_slot(b"mail:delivery_commands")
    assert slots["event publish (events)"] == key_slot(b"mail:delivery_events")


def test_keys_of_one_operation_in_two_slots_are_refused_with_the_way_out() -> None:
    assert key_slot(b"mail:a") != key_slot(b"mail:b")
    with pytest.raises(ConfigError) as info:
        check_cluster_keys({"a script": ("mail:a", "mail:b")})
    text = str(info.value)
    assert "a script" in text and "mail:a (slot" in text and "{mail}" in text
    # The same keys with a common hash tag are one slot.
    assert check_cluster_keys({"a script": ("{mail}:a", "{mail}:b")}) == {
        "a script": key_slot(b"mail")
    }
