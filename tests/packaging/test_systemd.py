"""deploy/systemd: the unit, its sysusers.d / tmpfiles.d snippets and the example settings.

`systemd-analyze verify` catches unknown or malformed directives; `systemd-analyze security
--offline=yes` rates the sandbox (the unit needs no running systemd for either).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest

from maildaemon.config import Settings
from maildaemon.config_values import parse_duration
from maildaemon.exposure import check_read_exposure

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
UNIT = SYSTEMD / "maildaemon.service"
ENV_EXAMPLE = SYSTEMD / "maildaemon.env.example"
SETTING_NAMES = {f"MAIL_{name.upper()}" for name in Settings.model_fields}
# Highest accepted `systemd-analyze security` exposure (0 = locked down, 10 = unprotected).
MAX_EXPOSURE = 2.0


def _unit() -> dict[str, list[str]]:
    """[Service] directives; repeated ones keep every value."""
    section = ""
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section == "[Service]":
            out.setdefault(key, []).append(value)
    return out


def _env_file() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line}"
            env[key.strip()] = value
    return env


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is not installed (.ci/run installs systemd)")
        pytest.skip("systemd-analyze is not installed")
    return found


def test_unit_verifies_cleanly() -> None:
    proc = subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # The venv is not installed here; anything else verify says is a fault of the unit.
    missing = re.compile(r"Command /opt/maildaemon/venv/bin/maildaemon is not executable")
    problems = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and not missing.search(line)
    ]
    assert not problems, "\n".join(problems)


def test_sandbox_exposure_is_low() -> None:
    proc = subprocess.run(
        [_systemd_analyze(), "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    assert float(match[1]) <= MAX_EXPOSURE, proc.stdout


def test_unit_hardening_directives() -> None:
    unit = _unit()

    def one(key: str) -> str:
        assert key in unit, f"{key}= missing"
        return unit[key][-1]

    assert one("CapabilityBoundingSet") == ""
    assert "@system-service" in unit["SystemCallFilter"]
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectHome",
        "RestrictNamespaces",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert one("UMask") == "0077"
    assert set(one("RestrictAddressFamilies").split()) <= {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert one("User") not in ("", "root", "0")
    assert one("ExecStart").split() == ["/opt/maildaemon/venv/bin/maildaemon", "run"]


def test_stop_timeout_exceeds_the_shutdown_timeout() -> None:
    env = _env_file()
    shutdown = parse_duration(env.get("MAIL_SHUTDOWN_TIMEOUT", "30s"))
    assert parse_duration(_unit()["TimeoutStopSec"][-1]) >= shutdown + 10


def test_example_settings_are_real_and_valid_together() -> None:
    env = _env_file()
    unknown = set(env) - SETTING_NAMES
    assert not unknown, f"not settings in maildaemon/config.py: {sorted(unknown)}"
    commented = re.findall(r"^#\s*(MAIL_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M)
    assert set(commented) <= SETTING_NAMES
    with mock.patch.dict(os.environ, env, clear=True):
        settings = Settings(_env_file=None)  # raises on a bad value or combination
    check_read_exposure(settings)
    # The reads are guarded even when an operator moves the listener off loopback.
    assert settings.read_token is not None
    with mock.patch.dict(
        os.environ, {**env, "MAIL_INTERNAL_HTTP_ADDR": "0.0.0.0:8080"}, clear=True
    ):
        check_read_exposure(Settings(_env_file=None))


def test_sysusers_and_tmpfiles_fit_the_unit() -> None:
    unit = _unit()
    user = unit["User"][-1]
    entries = [
        line.split(None, 4)
        for line in (SYSTEMD / "maildaemon.sysusers").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    [[kind, name, uid, _gecos, rest]] = entries
    assert (kind, name, uid) == ("u", user, "-")
    assert rest.split()[-1] == "/usr/sbin/nologin"
    assert unit["Group"][-1] == user  # `u` creates the group of the same name

    tmpfiles = {
        fields[1]: fields
        for fields in (
            line.split()
            for line in (SYSTEMD / "maildaemon.tmpfiles").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        )
    }
    env_file = unit["EnvironmentFile"][-1].lstrip("-")
    # The settings hold secrets: root only (systemd reads the file before dropping privileges).
    assert tmpfiles[env_file][:5] == ["z", env_file, "0600", "root", "root"]
    folder = tmpfiles[str(Path(env_file).parent)]
    assert folder[0] == "d" and folder[2] == "0750" and folder[4] == user
