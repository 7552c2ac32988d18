"""The development stack: Redis, PostgreSQL and an SMTP sink, kept in one state directory.

``DevStack(state_dir).start()`` returns the ``MAIL_*`` environment for the daemon. Ports
are stable between runs where free (Redis 6390, PostgreSQL 5440, SMTP 2525, HTTP 8080).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from maildaemon.config import packaged_template_dir
from maildaemon.devstack.managed import Managed
from maildaemon.devstack.postgres import (
    EmbeddedPostgres,
    ensure_database,
    pick_free_port,
    port_is_free,
)
from maildaemon.devstack.redis import EmbeddedRedis
from maildaemon.devstack.smtp_sink import CA_FILE, READY_PREFIX
from maildaemon.errors import StartupError

log = logging.getLogger("maildaemon.devstack")

REDIS_PORT = 6390
POSTGRES_PORT = 5440
SMTP_PORT = 2525
HTTP_PORT = 8080
DATABASE = "maildaemon"
SMTP_FROM = "maildaemon dev <noreply@maildaemon.localhost>"
BOUNCE_DOMAIN = "bounces.maildaemon.localhost"
_SINK_MODULE = "maildaemon.devstack.smtp_sink"
_SINK_READY_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0


def choose_port(preferred: int) -> int:
    """``preferred`` when it is free (so printed settings stay valid), else 0 (any port)."""
    return preferred if preferred and port_is_free(preferred) else 0


def templates_dir() -> Path:
    return packaged_template_dir()


class DevStack(Managed):
    """Redis, PostgreSQL (database ``maildaemon``) and the SMTP sink for ``maildaemon dev``.

    State lives in ``state_dir/{redis,postgres,smtp/maildir,smtp/certs}`` and survives
    restarts. One stack per state directory (a lock file); servers left behind by a stack
    that was killed are stopped first. ``stop()`` stops what ``start()`` started.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        redis_port: int = REDIS_PORT,
        postgres_port: int = POSTGRES_PORT,
        smtp_port: int = SMTP_PORT,
        http_port: int = HTTP_PORT,
    ) -> None:
        self.state_dir = Path(state_dir).absolute()
        self._ports = {"redis": redis_port, "postgres": postgres_port, "smtp": smtp_port}
        self._http_port = http_port
        self.redis: EmbeddedRedis | None = None
        self.postgres: EmbeddedPostgres | None = None
        self._sink: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        self.env: dict[str, str] = {}

    @property
    def maildir(self) -> Path:
        return self.state_dir / "smtp" / "maildir"

    @property
    def cert_dir(self) -> Path:
        return self.state_dir / "smtp" / "certs"

    @property
    def sink_pid(self) -> int | None:
        return self._sink.pid if self._sink is not None else None

    def start(self) -> dict[str, str]:
        """Start everything; returns the ``MAIL_*`` settings for the daemon."""
        if self.env:
            return dict(self.env)
        self._take_lock()
        atexit.register(self.stop)
        try:
            report_port = pick_free_port()  # the daemon's report listener (bounces)
            sink_port = self._spawn_sink(report_port)  # boots while Redis, PostgreSQL start
            self.redis = EmbeddedRedis(
                self.state_dir / "redis",
                self._ports["redis"],
                persistent=True,
                stop_stale=True,
                port_fallback=True,
            )
            redis_addr = self.redis.start()
            self.postgres = EmbeddedPostgres(
                self.state_dir / "postgres",
                self._ports["postgres"],
                stop_stale=True,
                port_fallback=True,
            )
            dsn = ensure_database(self.postgres.start(), DATABASE)
            smtp_port = self._wait_sink_ready(sink_port)
        except BaseException:
            self.stop()
            raise
        http_port = choose_port(self._http_port) or pick_free_port()
        self.env = {
            "MAIL_REDIS_MASTER_ADDR": redis_addr,
            "MAIL_POSTGRES_PRIMARY_DSN": dsn,
            "MAIL_SMTP_MODE": "smtp",
            "MAIL_SMTP_ADDR": f"127.0.0.1:{smtp_port}",
            "MAIL_SMTP_FROM": SMTP_FROM,
            "MAIL_SMTP_CA_FILE": str(self.cert_dir / CA_FILE),
            "MAIL_SMTP_SECURITY": "starttls",
            "MAIL_TEMPLATE_DIR": str(templates_dir()),
            "MAIL_INTERNAL_HTTP_ADDR": f"127.0.0.1:{http_port}",
            # Actions in the API and console answer 403 without a token: the dev stack has
            # its own, generated once and kept in the state directory.
            "MAIL_OPERATOR_TOKEN": self.operator_token(),
            # The bounce loop: signed envelope senders, the report listener the sink's
            # bounce@, delay@ and complaint@ addresses report to a moment later.
            "MAIL_BOUNCE_DOMAIN": BOUNCE_DOMAIN,
            "MAIL_BOUNCE_SECRET": self.secret("bounce-secret"),
            "MAIL_BOUNCE_LISTEN_ADDR": f"127.0.0.1:{report_port}",
        }
        return dict(self.env)

    def operator_token(self) -> str:
        """The dev stack's operator token (generated on first use, kept mode 0600)."""
        return self.secret("operator-token")

    def secret(self, name: str) -> str:
        """A secret of the dev stack, generated on first use and kept (mode 0600)."""
        path = self.state_dir / name
        try:
            token = path.read_text().strip()
        except FileNotFoundError:
            token = ""
        if not token:
            token = secrets.token_urlsafe(24)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token + "\n")
        return token

    def stop(self) -> None:
        """Stop the sink, Redis and PostgreSQL (each even if another fails); idempotent."""
        atexit.unregister(self.stop)
        errors: list[BaseException] = []
        for step in (self._stop_sink, self._stop_redis, self._stop_postgres):
            try:
                step()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        self.env = {}
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        if errors:
            raise errors[0]

    # Steps -----------------------------------------------------------------------

    def _take_lock(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = (self.state_dir / ".devstack.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StartupError(f"another dev stack is running in {self.state_dir}") from None
        self._lock = lock

    def _stop_redis(self) -> None:
        redis, self.redis = self.redis, None
        if redis is not None:
            redis.stop()

    def _stop_postgres(self) -> None:
        postgres, self.postgres = self.postgres, None
        if postgres is not None:
            postgres.stop()

    def _spawn_sink(self, report_port: int) -> int:
        self.maildir.mkdir(parents=True, exist_ok=True)
        self.cert_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale_sink()
        port = choose_port(self._ports["smtp"])
        argv = [
            sys.executable, "-m", _SINK_MODULE,
            "--dir", str(self.maildir),
            "--cert-dir", str(self.cert_dir),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--report-to", f"127.0.0.1:{report_port}",
        ]  # fmt: skip
        with (self.state_dir / "smtp" / "sink.log").open("ab") as log_fh:
            self._sink = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_fh,
                start_new_session=True,  # a Ctrl-C in the terminal is ours to handle
            )
        self._sink_pid_file.write_text(f"{self._sink.pid}\n")
        return port

    @property
    def _sink_pid_file(self) -> Path:
        return self.state_dir / "smtp" / "sink.pid"

    def _wait_sink_ready(self, requested_port: int) -> int:
        """Read the sink's ready line; returns the port it listens on."""
        proc = self._sink
        assert proc is not None and proc.stdout is not None
        deadline = time.monotonic() + _SINK_READY_TIMEOUT
        line = b""
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            line += chunk
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith(READY_PREFIX):
            tail = (self.state_dir / "smtp" / "sink.log").read_text(errors="replace")[-3000:]
            raise StartupError(f"the SMTP sink did not start: {text or 'no ready line'}\n{tail}")
        fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
        return int(fields.get("port", requested_port))

    def _stop_sink(self) -> None:
        proc, self._sink = self._sink, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            self._sink_pid_file.unlink(missing_ok=True)

    def _stop_stale_sink(self) -> None:
        """Stop a sink left running by a stack that was killed (we hold the lock now)."""
        try:
            pid = int(self._sink_pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if _SINK_MODULE.encode() not in cmdline or str(self.maildir).encode() not in cmdline:
            return
        log.warning("smtp_sink_stale_process_stopped", extra={"pid": pid})
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.05)
