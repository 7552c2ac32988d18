"""Production-shaped servers for the tests, from Debian's packages: Redis with TLS, Redis
Sentinel, PgBouncer. Each runs as a child process on 127.0.0.1 in a temporary directory
and is stopped when its context ends. A missing binary skips the test on a workstation
and fails it under CI (env ``CI``), where ``.ci/run`` installs the packages.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from maildaemon.devstack.postgres import pick_free_port


def debian_binary(name: str, package: str, dirs: Iterable[Path] = ()) -> str:
    """The path of ``name`` (in ``dirs``, newest last, else on the PATH); skip
    (workstation) or fail (CI) when it is not installed."""
    in_dirs = sorted((d / name for d in dirs if (d / name).is_file()), key=str)
    found = (
        (str(in_dirs[-1]) if in_dirs else None)
        or shutil.which(name)
        or next(
            (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.is_file()),
            None,
        )
    )
    if found:
        return found
    message = f"{name} is not installed (Debian package {package}; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited ({proc.returncode}):\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"server did not listen on {port}:\n{_tail(log)}")


def _tail(path: Path) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def process(argv: list[str], log: Path, port: int, **kwargs: Any) -> Iterator[int]:
    """Run ``argv`` until the block ends; yields its pid once ``port`` accepts."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, **kwargs
        )
    try:
        wait_port(port, proc, log)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def shared_dir(prefix: str) -> Iterator[Path]:
    """A temporary directory that ``nobody`` (servers that refuse root) may write."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_nobody() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def _redis_base(directory: Path, port: int) -> list[str]:
    return [
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--protected-mode", "no",
    ] + (["--port", str(port)] if port else [])  # fmt: skip


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


@contextlib.contextmanager
def redis_tls_server(directory: Path, server: TlsFiles) -> Iterator[int]:
    """Debian's redis-server serving TLS only (client certificates required); its port."""
    binary = debian_binary("redis-server", "redis-server")
    port = pick_free_port()
    argv = [
        binary,
        *_redis_base(directory, 0),
        "--port", "0",
        "--tls-port", str(port),
        "--tls-cert-file", str(server.cert),
        "--tls-key-file", str(server.key),
        "--tls-ca-cert-file", str(server.ca),
        "--tls-auth-clients", "yes",
    ]  # fmt: skip
    with process(argv, directory / "redis.log", port):
        yield port


@contextlib.contextmanager
def redis_server(directory: Path, replica_of: int | None = None) -> Iterator[int]:
    binary = debian_binary("redis-server", "redis-server")
    port = pick_free_port()
    argv = [binary, *_redis_base(directory, port)]
    if replica_of is not None:
        argv += ["--replicaof", "127.0.0.1", str(replica_of)]
    directory.mkdir(parents=True, exist_ok=True)
    with process(argv, directory / "redis.log", port):
        yield port


@contextlib.contextmanager
def redis_sentinel(
    directory: Path, master_name: str, master_port: int, tls: TlsFiles | None = None
) -> Iterator[int]:
    """A redis-sentinel (quorum 1, fast failure detection) watching the master; with
    ``tls`` it serves TLS only and talks TLS to the master (client certificates required)."""
    binary = debian_binary("redis-sentinel", "redis-sentinel")
    port = pick_free_port()
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "sentinel.conf"  # sentinel rewrites its file: a private copy
    listen = f"port {port}\n"
    if tls is not None:
        listen = (
            f"port 0\ntls-port {port}\ntls-cert-file {tls.cert}\ntls-key-file {tls.key}\n"
            f"tls-ca-cert-file {tls.ca}\ntls-auth-clients yes\ntls-replication yes\n"
        )
    conf.write_text(
        f"{listen}bind 127.0.0.1\ndaemonize no\ndir {directory}\n"
        "protected-mode no\n"
        f"sentinel monitor {master_name} 127.0.0.1 {master_port} 1\n"
        f"sentinel down-after-milliseconds {master_name} 1000\n"
        f"sentinel failover-timeout {master_name} 10000\n"
        f"sentinel parallel-syncs {master_name} 1\n"
    )
    with process([binary, str(conf)], directory / "sentinel.log", port):
        yield port


@contextlib.contextmanager
def pgbouncer(directory: Path, pg_port: int, pool_size: int = 2) -> Iterator[int]:
    """PgBouncer in transaction pooling in front of the PostgreSQL on ``pg_port`` (trust
    auth, as the test server); run as ``nobody`` when we are root (it refuses root)."""
    binary = debian_binary("pgbouncer", "pgbouncer")
    port = pick_free_port()
    (directory / "users.txt").write_text('"postgres" ""\n')
    (directory / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host=127.0.0.1 port={pg_port}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {directory / 'users.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {pool_size}\n"
        "max_client_conn = 500\n"
        "server_reset_query =\n"
        f"logfile = {directory / 'pgbouncer.log'}\n"
        f"pidfile = {directory / 'pgbouncer.pid'}\n"
    )
    for path in directory.iterdir():
        path.chmod(0o644)
    argv = [binary, str(directory / "pgbouncer.ini")]
    with process(argv, directory / "pgbouncer.out", port, **_as_nobody()):
        yield port
