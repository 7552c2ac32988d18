"""A real Redis Cluster for the tests: Debian's redis-server, N masters (and replicas), no Docker.

Each node is a ``redis-server --cluster-enabled yes`` on free 127.0.0.1 ports (client port
and cluster bus port both picked), its files in a temporary directory; ``redis-cli
--cluster create`` assigns the 16,384 slots (and replicas), and the cluster is ready when
every node says ``cluster_state:ok`` and every replica is in sync. A node can be killed
(SIGKILL) to make its replica take over.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.crc import key_slot

from maildaemon.devstack.managed import Managed
from maildaemon.devstack.postgres import pick_free_port
from tests.prod_servers import TlsFiles

REDIS_SERVER = Path("/usr/bin/redis-server")
REDIS_CLI = Path("/usr/bin/redis-cli")


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(pick_free_port())
    return sorted(ports)


class RedisCluster(Managed):
    """``masters`` masters, each with ``replicas`` replicas, on 127.0.0.1."""

    def __init__(
        self, dir: Path, masters: int = 3, replicas: int = 0, tls: TlsFiles | None = None
    ) -> None:
        """With ``tls`` every node serves TLS only, on the cluster bus and between master and
        replica too, and wants a client certificate (``tls`` is the server's files; the
        fixture's own clients present them too)."""
        self.tls = tls
        self.dir = dir
        self.masters = masters
        self.replicas = replicas
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def addrs(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def start(self) -> None:
        count = self.masters * (1 + self.replicas)
        ports = _free_ports(2 * count)
        self.ports, bus = ports[:count], ports[count:]
        for port, bus_port in zip(self.ports, bus, strict=True):
            node_dir = self.dir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            self.procs[port] = subprocess.Popen(
                [
                    str(REDIS_SERVER),
                    *self._ports_args(port),
                    "--cluster-port", str(bus_port),
                    "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", "1000",
                    "--cluster-replica-validity-factor", "0",
                    "--cluster-require-full-coverage", "no",
                    "--dir", str(node_dir),
                    "--save", "",
                    "--appendonly", "no",
                    "--logfile", str(node_dir / "redis.log"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for port in self.ports:
            self._wait(lambda p=port: self._ping(p), f"node {port} answers")
        subprocess.run(
            [
                str(REDIS_CLI),
                *self._cli_tls(),
                "--cluster", "create", *self.addrs,
                "--cluster-replicas", str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        self.wait_ok()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait(timeout=10)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _ports_args(self, port: int) -> list[str]:
        if self.tls is None:
            return ["--port", str(port)]
        t = self.tls
        return [
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(t.cert), "--tls-key-file", str(t.key),
            "--tls-ca-cert-file", str(t.ca), "--tls-auth-clients", "yes",
            "--tls-cluster", "yes", "--tls-replication", "yes",
        ]  # fmt: skip

    def _cli_tls(self) -> list[str]:
        if self.tls is None:
            return []
        t = self.tls
        return ["--tls", "--cacert", str(t.ca), "--cert", str(t.cert), "--key", str(t.key)]

    def client(self, port: int) -> redis.Redis:
        tls: dict[str, object] = {}
        if self.tls is not None:
            tls = {
                "ssl": True,
                "ssl_ca_certs": str(self.tls.ca),
                "ssl_certfile": str(self.tls.cert),
                "ssl_keyfile": str(self.tls.key),
            }
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, **tls)  # type: ignore[arg-type]

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def info(self, port: int, section: str) -> dict[str, str]:
        """``CLUSTER INFO`` (section ``cluster``) or an ``INFO`` section of one node."""
        with self.client(port) as c:
            raw = c.execute_command("CLUSTER INFO") if section == "cluster" else c.info(section)
        if isinstance(raw, bytes | str):
            text = raw.decode() if isinstance(raw, bytes) else raw
            return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in raw.items()}

    def owner(self, key: str) -> int:
        """The port of the master that serves ``key``'s slot (asked of a live node)."""
        slot = key_slot(key.encode())
        with self.client(self.alive()[0]) as c:
            for start, end, master, *_ in c.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"slot {slot} is not served")

    def masters_ports(self) -> list[int]:
        return [p for p in self.alive() if self.info(p, "replication").get("role") == "master"]

    def migrate_slot(self, key: str, to_port: int) -> None:
        """Move ``key``'s slot, with its keys, to the master at ``to_port`` (as a reshard
        does: IMPORTING/MIGRATING, MIGRATE key by key, then the new owner announced)."""
        slot = key_slot(key.encode())
        src_port = self.owner(key)
        with self.client(src_port) as src, self.client(to_port) as dst:
            src_id, dst_id = (
                src.execute_command("CLUSTER MYID"),
                dst.execute_command("CLUSTER MYID"),
            )
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
        for port in self.masters_ports():
            with self.client(port) as c:
                c.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def flush(self) -> None:
        for port in self.alive():
            with self.client(port) as c:
                if self.info(port, "replication").get("role") == "master":
                    c.flushall()
                    c.config_set("notify-keyspace-events", "")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every live node sees the cluster ok; every replica's link to its master is up."""

        def ok() -> bool:
            for port in self.alive():
                if self.info(port, "cluster").get("cluster_state") != "ok":
                    return False
                repl = self.info(port, "replication")
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    return False
            return True

        self._wait(ok, "cluster_state:ok on every node", timeout)

    def _ping(self, port: int) -> bool:
        try:
            with self.client(port) as c:
                return bool(c.ping())
        except (redis.RedisError, OSError):
            return False

    @staticmethod
    def _wait(check: object, what: str, timeout: float = 15.0) -> None:
        assert callable(check)
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"redis cluster: {what} not within {timeout}s")
            time.sleep(0.05)
