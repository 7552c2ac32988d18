"""A delayed link for the benchmark: the sink in its own network namespace, reached over a
pair of TUN devices whose packets a forwarder process holds for half the round-trip time
in each direction.

Every IP packet that crosses pays the delay: TCP and TLS handshakes, every SMTP flight and
every ACK, as across a real network (this kernel has no ``sch_netem``, so ``tc netem`` is
not available; the forwarder does what netem's ``delay`` does, in user space, at real-time
priority as netem would run in the kernel, and its CPU is reported). Timers have 1 ms
resolution: a delayed packet arrives up to 1 ms late. PostgreSQL and Redis stay on the
loopback, undelayed. Needs root.

    python -m bench.link   # a smoke check: TCP connect (refused) round trips at 0 and 20 ms
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import time

HOST_IP = "10.231.0.1"
SINK_IP = "10.231.0.2"
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def available() -> str | None:
    """None when a delayed link can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TUN devices)"
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as exc:
        return f"/dev/net/tun: {exc}"
    probe = f"mdbprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    return None


def setns(name: str) -> None:
    """Move this process into the network namespace ``ip netns`` calls ``name``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{name}") as fh:
        if libc.setns(fh.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name}) failed")


def _tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


async def _forward(host_dev: str, ns_dev: str, netns: str) -> None:
    """The forwarder: creates both devices, then moves packets, each after the delay."""
    loop = asyncio.get_running_loop()
    # netem would move packets in the kernel's softirq context, ahead of every process:
    # the forwarder runs real-time so that it too stays out of the CPU contention it
    # measures (it sleeps between packets; its CPU time is reported per delivery).
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    a = _tun(host_dev)
    setns(netns)
    b = _tun(ns_dev)
    half = [0.0]

    def put(dst: int, packet: bytes) -> None:
        with contextlib.suppress(OSError):  # the device is not up yet: dropped, as a link would
            os.write(dst, packet)

    def pump(src: int, dst: int) -> None:
        while True:
            try:
                packet = os.read(src, 65536)
            except BlockingIOError:
                return
            if half[0] <= 0:
                put(dst, packet)
            else:
                loop.call_at(loop.time() + half[0], put, dst, packet)

    loop.add_reader(a, pump, a, b)
    loop.add_reader(b, pump, b, a)
    print("ready", flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():  # one RTT in ms per line; EOF ends it
        half[0] = float(line) / 2000
        print(f"rtt {float(line):g}", flush=True)


class DelayedLink:
    """``with DelayedLink() as link: link.set_rtt(25)``; the sink binds ``SINK_IP`` inside
    namespace ``link.netns``."""

    def __init__(self) -> None:
        tag = os.getpid() % 100000
        self.netns = f"mdbench{tag}"
        self._host_dev = f"mdb{tag}h"
        self._ns_dev = f"mdb{tag}n"
        self._proc: subprocess.Popen[str] | None = None
        self.rtt_ms = 0.0
        self._cpu0 = 0.0

    def __enter__(self) -> DelayedLink:
        why = available()
        if why:
            raise RuntimeError(f"cannot make a delayed link: {why}")
        _ip("netns", "add", self.netns)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "bench.link", "--forward", self._host_dev, self._ns_dev,
                 self.netns],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert self._proc.stdout is not None
            if self._proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the link forwarder did not start")
            _ip("addr", "add", HOST_IP, "peer", SINK_IP, "dev", self._host_dev)
            _ip("link", "set", self._host_dev, "up")
            _ip("-n", self.netns, "addr", "add", SINK_IP, "peer", HOST_IP, "dev", self._ns_dev)
            _ip("-n", self.netns, "link", "set", self._ns_dev, "up")
            _ip("-n", self.netns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def set_rtt(self, rtt_ms: float) -> None:
        assert self._proc is not None and self._proc.stdin and self._proc.stdout
        self._proc.stdin.write(f"{rtt_ms}\n")
        self._proc.stdin.flush()
        self._proc.stdout.readline()
        self.rtt_ms = rtt_ms

    def cpu_seconds(self) -> float:
        """The forwarder's CPU time so far."""
        assert self._proc is not None
        with open(f"/proc/{self._proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            if self._proc.stdin:
                self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)


def _smoke() -> None:
    import socket

    with DelayedLink() as link:
        for rtt in (0, 20):
            link.set_rtt(rtt)
            t0 = time.monotonic()
            for _ in range(5):
                with socket.socket() as sock, contextlib.suppress(ConnectionRefusedError):
                    sock.connect((SINK_IP, 9))  # SYN → RST: one round trip
            print(f"rtt {rtt} ms: TCP round trip {(time.monotonic() - t0) / 5 * 1000:.2f} ms")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--forward"]:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        asyncio.run(_forward(*sys.argv[2:5]))
    else:
        _smoke()
