"""Every Lua script of the daemon names its keys in KEYS[] (a Cluster routes a script by
them, and refuses one that touches a key it was not given): one key, the stream, bound once
from KEYS[1], used as given, never a name built inside the script. The startup check
(``redisconn.cluster_key_groups``) declares the same one key for each script."""

from __future__ import annotations

import re

import pytest

from maildaemon.config import Settings
from maildaemon.pipeline import stream_reader, stream_trim
from maildaemon.redisconn import cluster_key_groups

SCRIPTS = {
    "bounded read (stream_reader)": stream_reader._READ_BOUNDED,
    "lag count (stream_reader)": stream_reader._COUNT_AFTER,
    "stream trim (stream_trim)": stream_trim._TRIM,
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_a_script_touches_only_the_key_it_is_given(name: str) -> None:
    source = SCRIPTS[name]
    assert re.findall(r"KEYS\[(\d+)\]", source) == ["1"]
    assert re.search(r"local stream[, \w]* = KEYS\[1\]", source)
    calls = re.findall(r"redis\.call\(([^)]*)", source)
    assert calls
    for call in calls:
        assert re.search(r"\bstream\b", call), f"{name}: a call without the stream key: {call}"
    assert not re.search(r"\bstream\s*=[^=]", source.split("KEYS[1]", 1)[1]), "rebound"
    assert not re.search(r"\.\.\s*stream|stream\s*\.\.", source), "a key name built in Lua"
    assert not re.search(r"'[^']*:[^']*'", source), "a literal key name"


def test_the_startup_check_declares_each_script_with_its_one_key() -> None:
    groups = cluster_key_groups(
        Settings(postgres_primary_dsn="postgresql://x@h/d", smtp_mode="stub", _env_file=None)
    )
    for name in SCRIPTS:
        assert len(groups[name]) == 1
