"""Embedded PostgreSQL for ``maildaemon dev`` and the tests: no root, no Docker, no service.

The binaries come from the ``pgserver`` wheel (PostgreSQL 16), else from ``pg_config`` or
``/usr/lib/postgresql/*/bin``. PostgreSQL refuses to run as root, so when we are root the
server runs as ``nobody``, with its own data directory and binaries it can reach.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from maildaemon.devstack.managed import Managed
from maildaemon.errors import StartupError

log = logging.getLogger("maildaemon.devstack.postgres")

UNPRIVILEGED_USER = "nobody"
LOG_NAME = "postgres.log"
CONF_NAME = "maildaemon.conf"
NOTE_NAME = "WHERE-IS-THE-DATA.txt"
_START_TIMEOUT = 30
_TAIL_LINES = 30
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes on Linux).
_MAX_SOCKET_DIR = 90


@dataclass(frozen=True)
class _Identity:
    """The unprivileged account the server runs as when we are root."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def find_bindir() -> Path:
    """pgserver's bundled binaries, else ``pg_config --bindir``, else the newest Debian install."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec("pgserver")  # located, not imported (its import is noisy)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(location) / "pginstall" / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(Path(out.stdout.strip()))
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates.extend(sorted(debian, key=_version_key, reverse=True))
    for bindir in candidates:
        if all((bindir / exe).is_file() for exe in ("postgres", "initdb", "pg_ctl")):
            return bindir
    raise StartupError("no PostgreSQL binaries found (install pgserver or postgresql)")


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (free again when this returns; a small race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def database_dsn(dsn: str, dbname: str) -> str:
    """``dsn`` with its database name replaced by ``dbname``."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


def ensure_database(dsn: str, dbname: str) -> str:
    """Create ``dbname`` on the server of ``dsn`` unless it exists; returns its DSN."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
        if row is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    return database_dsn(dsn, dbname)


def _tail(path: Path, start: int = 0) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(start)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-_TAIL_LINES:]) or "(empty log)"


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class EmbeddedPostgres(Managed):
    """A private PostgreSQL server on 127.0.0.1 with trust auth, for development and tests.

    ``fast=True`` turns durability off (``fsync``, ``synchronous_commit``,
    ``full_page_writes``) for the test suite; the default keeps it on. An initialised data
    directory is reused. ``port=0`` picks a free port; ``port_fallback=True`` does so too when
    ``port`` is taken. ``stop_stale=True`` first stops a server left running on the same data
    directory by an earlier process that died.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        *,
        fast: bool = False,
        bin_dir: Path | None = None,
        stop_stale: bool = False,
        port_fallback: bool = False,
    ) -> None:
        self._requested_dir = Path(data_dir).absolute()
        self._requested_port = port
        self._port_fallback = port_fallback
        self._fast = fast
        self._stop_stale = stop_stale
        self._bin_dir = bin_dir
        self._identity = _unprivileged_identity() if os.geteuid() == 0 else None
        self._data_dir: Path | None = None
        self._port: int | None = None
        self._running = False

    # Public view -----------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """The data directory in use (may differ from the requested one when run as root)."""
        return self._data_dir or self._requested_dir

    @property
    def log_file(self) -> Path:
        return self.data_dir / LOG_NAME

    @property
    def bin_dir(self) -> Path:
        return self._bin_dir or find_bindir()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("EmbeddedPostgres is not started")
        return self._port

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def running(self) -> bool:
        return self._running

    # Lifecycle -------------------------------------------------------------------

    def start(self) -> str:
        """Initialise (first time) and start the server; returns the ``postgres`` DSN."""
        if self._running:
            return self.dsn
        started = time.monotonic()
        self._bin_dir = self._reachable_bindir(self.bin_dir)
        self._data_dir = self._prepare_data_dir()
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb()
        if self._stop_stale:
            self._stop_leftover()
        fixed = self._requested_port
        if fixed and self._port_fallback and not port_is_free(fixed):
            fixed = 0
        attempts = 1 if fixed else 3  # a free port may be taken meanwhile
        for attempt in range(1, attempts + 1):
            port = fixed or pick_free_port()
            offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            self._write_conf(port)
            result = self._pg_ctl(
                "start", "-l", str(self.log_file), "-w", "-t", str(_START_TIMEOUT)
            )
            if result.returncode == 0:
                break
            if self._is_running():  # pg_ctl gave up waiting; do not leave it behind
                self._pg_ctl("stop", "-m", "immediate", "-w", "-t", str(_START_TIMEOUT))
            tail = _tail(self.log_file, offset)
            if attempt == attempts or "Address already in use" not in tail:
                raise StartupError(
                    f"PostgreSQL did not start (data dir {self.data_dir}): "
                    f"{result.stdout.strip()}\n{tail}"
                )
        self._port = port
        self._running = True
        log.info(
            "postgres_started",
            extra={"port": port, "seconds": round(time.monotonic() - started, 3)},
        )
        return self.dsn

    def stop(self) -> None:
        """Fast shutdown (``pg_ctl -m fast``); does nothing when not running."""
        if not self._running:
            return
        self._running = False
        result = self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(_START_TIMEOUT))
        if result.returncode != 0 and self._is_running():
            self._pg_ctl("stop", "-m", "immediate", "-w", "-t", str(_START_TIMEOUT))

    # Steps -----------------------------------------------------------------------

    def _run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        kwargs = self._identity.popen_kwargs() if self._identity else {}
        try:
            return subprocess.run(
                argv,
                cwd="/",
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
                **kwargs,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise StartupError(f"could not run {argv[0]}: {exc}") from None

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / "pg_ctl"), *args[:1], "-D", str(self.data_dir), *args[1:]]
        return self._run(argv, _START_TIMEOUT + 10)

    def _is_running(self) -> bool:
        return self._pg_ctl("status").returncode == 0

    def _stop_leftover(self) -> None:
        if (self.data_dir / "postmaster.pid").exists() and self._is_running():
            log.warning("postgres_stale_server_stopped", extra={"data_dir": str(self.data_dir)})
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(_START_TIMEOUT))

    def _initdb(self) -> None:
        argv = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
        ]
        if self._fast:
            argv.append("--no-sync")
        result = self._run(argv, 120)
        if result.returncode != 0:
            raise StartupError(f"initdb failed in {self.data_dir}:\n{result.stdout[-3000:]}")
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(f"\n# maildaemon's embedded server\ninclude_if_exists = '{CONF_NAME}'\n")

    def _write_conf(self, port: int) -> None:
        onoff = "off" if self._fast else "on"
        socket_dir = str(self.data_dir) if len(str(self.data_dir)) <= _MAX_SOCKET_DIR else ""
        lines = [
            "# Written by maildaemon.devstack.postgres at every start; edits are lost.",
            "listen_addresses = '127.0.0.1'",
            f"port = {port}",
            f"unix_socket_directories = {_conf_quote(socket_dir)}",
            "max_connections = 200",
            f"fsync = {onoff}",
            f"synchronous_commit = {onoff}",
            f"full_page_writes = {onoff}",
            "logging_collector = off",
        ]
        path = self.data_dir / CONF_NAME
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._give(path)

    def _give(self, path: Path) -> None:
        if self._identity is not None:
            os.chown(path, self._identity.uid, self._identity.gid)

    # Root: an account, binaries and a data directory that account can reach -------

    def _prepare_data_dir(self) -> Path:
        requested = self._requested_dir
        if self._identity is None:
            requested.mkdir(parents=True, exist_ok=True)
            return requested
        requested.parent.mkdir(parents=True, exist_ok=True)
        if self._can_enter(requested.parent) and not (requested / NOTE_NAME).exists():
            data_dir = requested
        else:
            digest = hashlib.sha256(str(requested).encode()).hexdigest()[:16]
            data_dir = Path(tempfile.gettempdir()) / f"maildaemon-pgdata-{digest}"
            requested.mkdir(parents=True, exist_ok=True)
            (requested / NOTE_NAME).write_text(
                f"PostgreSQL runs as {self._identity.name!r}, who cannot reach this directory,\n"
                f"so its data lives in {data_dir}\n",
                encoding="utf-8",
            )
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if data_dir.is_symlink() or not data_dir.is_dir():
            raise StartupError(f"not a directory: {data_dir}")
        self._give(data_dir)
        data_dir.chmod(0o700)
        return data_dir

    def _can_enter(self, directory: Path) -> bool:
        argv = ["/bin/sh", "-c", 'cd -- "$1"', "sh", str(directory)]
        try:
            return self._run(argv, 10).returncode == 0
        except StartupError:
            return False

    def _can_execute(self, bindir: Path) -> bool:
        for exe in ("postgres", "initdb", "pg_ctl"):  # each has its own shared libraries
            try:
                if self._run([str(bindir / exe), "--version"], 10).returncode != 0:
                    return False
            except StartupError:
                return False
        return True

    def _reachable_bindir(self, bindir: Path) -> Path:
        if self._identity is None or self._can_execute(bindir):
            return bindir
        tree = bindir.parent
        if not ((tree / "share").is_dir() and (tree / "lib").is_dir()):
            raise StartupError(f"{self._identity.name!r} cannot run the binaries in {bindir}")
        binary = bindir / "postgres"
        key = f"{binary.resolve()}:{binary.stat().st_mtime_ns}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        cache = Path(tempfile.gettempdir()) / f"maildaemon-pginstall-{digest}"
        # Wheels (auditwheel) find their shared libraries through an RPATH such as
        # $ORIGIN/../../../pgserver.libs: keep the two levels above the tree as they are.
        cached_bindir = cache / tree.parent.name / tree.name / "bin"
        if not (cached_bindir / "postgres").is_file():
            _copy_world_readable(tree, cache)
            log.info("postgres_binaries_copied", extra={"path": str(cache)})
        if not self._can_execute(cached_bindir):
            raise StartupError(
                f"{self._identity.name!r} cannot run the binaries in {cached_bindir}"
            )
        return cached_bindir


def _unprivileged_identity() -> _Identity:
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise StartupError(
            f"running as root, and there is no {UNPRIVILEGED_USER!r} account to run PostgreSQL"
        ) from None
    return _Identity(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _copy_world_readable(tree: Path, target: Path) -> None:
    """Copy an install tree (and its wheel's ``*.libs``) once, readable by every account."""
    package = tree.parent
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        shutil.copytree(tree, staging / package.name / tree.name, symlinks=True)
        for libs in package.parent.glob(f"{package.name}.libs"):
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for root, _dirs, files in os.walk(staging):
            os.chmod(root, 0o755)
            for name in files:
                path = os.path.join(root, name)
                mode = os.lstat(path).st_mode
                if stat.S_ISREG(mode):
                    os.chmod(path, 0o755 if mode & stat.S_IXUSR else 0o644)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():  # not a concurrent copy that won the race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
