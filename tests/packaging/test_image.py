"""deploy/Containerfile and the locks it installs from.

No container engine runs in the test environment, so the image is checked where it can be
without one: hadolint, the invariants of each stage, the HEALTHCHECK command run against a
real HTTP listener, and the locks against pyproject.toml.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from maildaemon.cli.main import EMBEDDED_MODULES
from maildaemon.config import Settings

REPO = Path(__file__).resolve().parents[2]
CONTAINERFILE = REPO / "deploy" / "Containerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETTING_NAMES = {f"MAIL_{name.upper()}" for name in Settings.model_fields}


def _tool(name: str) -> str:
    """A tool from the dev extra (next to this interpreter) or PATH; CI must have it."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (it comes with the dev extra)")
        pytest.skip(f"{name} is not installed")
    return found


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in text.splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        logical += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, rest = logical.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            logical = ""
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions(CONTAINERFILE.read_text()):
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def test_hadolint_finds_nothing() -> None:
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_base_is_pinned_and_matches_the_locks_python() -> None:
    args = [rest for keyword, rest in _instructions(CONTAINERFILE.read_text()) if keyword == "ARG"]
    [base] = [a.split("=", 1)[1] for a in args if a.startswith("PYTHON_IMAGE=")]
    pinned = re.search(r":(\d+)\.(\d+)\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?$", base)
    assert pinned, f"base image not pinned to an exact tag or digest: {base}"
    lock_script = (REPO / "scripts" / "lock").read_text()
    assert f"--python-version {pinned[1]}.{pinned[2]}" in lock_script

    stages = _stages()
    assert len(stages) >= 2, "multi-stage: build, then a runtime stage"
    assert all(stage[0][1].split()[0] == "${PYTHON_IMAGE}" for stage in stages)


def test_runtime_stage_is_non_root_without_compilers_and_listens_everywhere() -> None:
    build, *_, final = _stages()
    final_text = "\n".join(rest for _, rest in final)
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) > 0
    assert not re.search(r"apt-get|apk add|gcc|g\+\+|build-essential|\bmake\b", final_text)
    # Dependencies come from the hash-checked lock only.
    build_runs = " ".join(rest for keyword, rest in build if keyword == "RUN")
    assert "--require-hashes" in build_runs and "-r requirements.lock" in build_runs
    assert "--no-index" in build_runs

    env = _env(final)
    assert set(k for k in env if k.startswith("MAIL_")) <= SETTING_NAMES
    host, _, port = env["MAIL_INTERNAL_HTTP_ADDR"].rpartition(":")
    assert host == "0.0.0.0"
    assert [rest for keyword, rest in final if keyword == "EXPOSE"] == [port]
    assert "MAIL_TEMPLATE_DIR" not in env  # the packaged catalog is the default

    copied = [rest.split()[0] for keyword, rest in build if keyword == "COPY"]
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_probes_healthz(
    health_server: HTTPServer, status: int, healthy: bool
) -> None:
    *_, final = _stages()
    [check] = [rest for keyword, rest in final if keyword == "HEALTHCHECK"]
    assert "curl" not in check and "wget" not in check
    argv = _json_cmd(check)
    assert argv[0] == "python"
    _Health.status = status
    port = health_server.server_address[1]
    env = {**_env(final), "PATH": os.environ["PATH"], "MAIL_INTERNAL_HTTP_ADDR": f"0.0.0.0:{port}"}
    proc = subprocess.run(
        [sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30, check=False
    )
    assert (proc.returncode == 0) is healthy, proc.stderr


def _json_cmd(healthcheck: str) -> list[str]:
    _, _, cmd = healthcheck.partition(" CMD ")
    argv = json.loads(cmd)
    assert isinstance(argv, list)
    return [str(a) for a in argv]


# The locks -----------------------------------------------------------------------------


def _lock(name: str) -> dict[str, str]:
    """{canonical name: pinned version}; every entry must be pinned and hashed."""
    pins: dict[str, str] = {}
    text = (REPO / name).read_text()
    for entry in re.split(r"\n(?=\S)", text):
        if entry.startswith("#") or not entry.strip():
            continue
        match = re.match(r"([A-Za-z0-9._-]+)==([^\s\\;]+)", entry)
        assert match, f"{name}: not an exact pin: {entry.splitlines()[0]}"
        assert "--hash=sha256:" in entry, f"{name}: {match[1]} has no hash"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def _check_covers(pins: dict[str, str], requirements: list[str]) -> None:
    env: dict[str, str] = {str(k): str(v) for k, v in default_environment().items()}
    env.update(sys_platform="linux", python_version="3.11")
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in the lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} vs {pins[name]}"


def test_runtime_lock_pins_every_runtime_dependency_and_nothing_embedded() -> None:
    pins = _lock("requirements.lock")
    _check_covers(pins, PYPROJECT["project"]["dependencies"])
    # Extras of runtime dependencies are locked too.
    assert "hiredis" in pins and "psycopg-binary" in pins
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module in EMBEDDED_MODULES:
        assert canonicalize_name(module) not in pins
    for text in extras["dev"]:
        name = canonicalize_name(Requirement(text).name)
        if name != canonicalize_name(PYPROJECT["project"]["name"]):
            assert name not in pins, f"dev tool {name} in the runtime lock"


def test_build_lock_pins_the_build_backend() -> None:
    _check_covers(_lock("requirements-build.lock"), PYPROJECT["build-system"]["requires"])
