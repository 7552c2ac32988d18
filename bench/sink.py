"""A fast SMTP sink for benchmarks: STARTTLS, accepts and counts, stores nothing.

Runs ``--procs`` processes that share one port with SO_REUSEPORT (the kernel spreads the
connections), each an asyncio protocol that speaks just enough ESMTP: EHLO/HELO,
STARTTLS, MAIL, RCPT, DATA, BDAT (CHUNKING, unless turned off), RSET, NOOP, QUIT. Every
accepted message's arrival time is appended to ``--log`` (one line per message:
monotonic-ns and Message-ID) for latency.

The replies to the commands of one received segment go out in one write, as a
pipelining server does; each such write that answers a transaction command is a
"flight", so flights per accepted message is the round trips a message costs.
The sink may run inside a network namespace (``netns``), behind a delayed link.

Why this is not the dev stack's SMTP server (maildaemon/devstack/smtp_server.py, aiosmtpd),
measured 2026-12-03 on the shared 2-core machine (load average 5.5 from other work): two
aiosmtplib client processes, 8 kept-open STARTTLS connections each, 2.5 KB messages in
76-character lines, one command at a time, 5 s, three runs each:

    this sink, 2 processes            720 / 959 / 1,053 messages/s, 0.36-0.50 ms CPU each
    dev SmtpSink, one process, uvloop 393 / 546 / 478 messages/s, 1.06-1.31 ms CPU each
    dev SmtpSink, one process         271 / 618 / 446 messages/s, 0.89-1.51 ms CPU each

(the clients are the limit of the first row). The benchmark needs ≥ 1,150 deliveries/s
(bench/RESULTS.md) with the sink on the same two cores as the daemon, PostgreSQL and
Redis: the in-process server reaches half of that and takes 2.5-3x the CPU per message,
so the figures would measure the sink. It is also the one SMTP server besides the dev
stack's (tests/unit/test_architecture.py scans maildaemon/ and tests/, not bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import cast

CRLF = b"\r\n"
CLONE_NEWNET = 0x40000000


class Stats:
    """Per process: reply flights that answered transaction commands, messages accepted."""

    flights = 0
    messages = 0


class SinkProtocol(asyncio.Protocol):
    def __init__(
        self, ctx: ssl.SSLContext, log: list[bytes], require_tls: bool, chunking: bool = True
    ) -> None:
        self._ctx = ctx
        self._log = log
        self._require_tls = require_tls
        self._chunking = chunking
        self._buf = bytearray()
        self._in_data = False
        self._bdat_left = -1  # bytes of a BDAT chunk still to come; -1: none
        self._bdat_last = False
        self._bdat = bytearray()
        self._tls = False
        self._transport: asyncio.Transport | None = None
        self._upgrade: asyncio.Future[None] | None = None
        self._out: list[bytes] = []
        self._answers_transaction = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not isinstance: uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(b"220 bench-sink ESMTP ready\r\n")

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._upgrade is not None and not self._upgrade.done():
            return  # decrypted data during the handshake's last step: after it
        self._process()
        self._flush()

    def _flush(self) -> None:
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
            self._out.clear()
            if self._answers_transaction:
                Stats.flights += 1
        self._answers_transaction = False

    def _process(self) -> None:
        while True:
            if self._bdat_left >= 0:
                take = min(self._bdat_left, len(self._buf))
                if self._bdat_last:
                    self._bdat += self._buf[:take]
                del self._buf[:take]
                self._bdat_left -= take
                if self._bdat_left:
                    return
                self._bdat_left = -1
                self._answers_transaction = True
                if self._bdat_last:
                    message, self._bdat = bytes(self._bdat), bytearray()
                    self._accept(message)
                else:
                    self._write(b"250 2.0.0 chunk received\r\n")
                continue
            if self._in_data:
                end = self._buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                message = bytes(self._buf[: end + 2])
                del self._buf[: end + 5]
                self._in_data = False
                self._accept(message)
                continue
            nl = self._buf.find(CRLF)
            if nl < 0:
                return
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 2]
            if self._command(line):
                return

    def _accept(self, message: bytes) -> None:
        start = message.find(b"Message-ID:")
        if start < 0:
            start = message.find(b"Message-Id:")
        mid = b"-"
        if start >= 0:
            stop = message.find(CRLF, start)
            mid = message[start + 11 : stop].strip()
        self._log.append(b"%d %s\n" % (time.monotonic_ns(), mid))
        Stats.messages += 1
        self._answers_transaction = True
        self._write(b"250 2.0.0 queued\r\n")

    def _write(self, data: bytes) -> None:
        self._out.append(data)

    def _command(self, line: bytes) -> bool:
        verb = line[:4].upper()
        if verb in (b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"NOOP"):
            self._answers_transaction = True
        if verb in (b"EHLO", b"HELO"):
            ext = b"" if self._tls else b"250-STARTTLS\r\n"
            chunking = b"250-CHUNKING\r\n" if self._chunking else b""
            self._write(
                b"250-bench-sink\r\n250-PIPELINING\r\n" + chunking + ext + b"250 8BITMIME\r\n"
            )
        elif verb == b"STAR":
            self._write(b"220 2.0.0 go ahead\r\n")
            self._flush()
            self._upgrade = asyncio.ensure_future(self._starttls())
            return True
        elif verb == b"BDAT" and self._chunking:
            size, _, last = line[5:].partition(b" ")
            self._bdat_left, self._bdat_last = int(size), last.strip().upper() == b"LAST"
        elif verb == b"MAIL":
            if self._require_tls and not self._tls:
                self._write(b"530 5.7.0 STARTTLS first\r\n")
            else:
                self._write(b"250 2.1.0 OK\r\n")
        elif verb == b"RCPT":
            self._write(b"250 2.1.5 OK\r\n")
        elif verb == b"DATA":
            self._in_data = True
            self._write(b"354 go on\r\n")
        elif verb in (b"RSET", b"NOOP"):
            self._write(b"250 OK\r\n")
        elif verb == b"QUIT":
            self._write(b"221 bye\r\n")
            self._flush()
            assert self._transport is not None
            self._transport.close()
        else:
            self._write(b"502 5.5.2 not implemented\r\n")
        return False

    async def _starttls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._transport is not None
        self._transport = await loop.start_tls(self._transport, self, self._ctx, server_side=True)
        self._tls = True
        self._process()
        self._flush()


def _enter_netns(name: str) -> None:
    """Move this process into the network namespace ``ip netns`` calls ``name``."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{name}") as fh:
        if libc.setns(fh.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name}) failed")


def _serve(
    port: int,
    cert: str,
    key: str,
    log_path: str | None,
    ready: object,
    host: str = "127.0.0.1",
    netns: str | None = None,
    chunking: bool = True,
) -> None:
    if netns:
        _enter_netns(netns)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    log: list[bytes] = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(512)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = await loop.create_server(lambda: SinkProtocol(ctx, log, True, chunking), sock=sock)
        ready.set()  # type: ignore[attr-defined]
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if log_path and log:
                with open(log_path, "ab") as fh:
                    fh.write(b"".join(log))
                log.clear()
            if log_path:  # atomically: the harness reads it at any time
                Path(f"{log_path}.stats.tmp").write_text(f"{Stats.flights} {Stats.messages}\n")
                os.replace(f"{log_path}.stats.tmp", f"{log_path}.stats")
            if stop.is_set():
                break
        server.close()

    asyncio.run(main())


class SinkCluster:
    """N sink processes on one port; ``stop()`` ends them. The CA file verifies them."""

    def __init__(
        self,
        cert_dir: Path,
        procs: int = 2,
        log: Path | None = None,
        *,
        host: str = "127.0.0.1",
        netns: str | None = None,
        chunking: bool = True,
    ) -> None:
        import trustme

        self.cert_dir = cert_dir
        self.procs = procs
        self.log = log
        self.host = host
        self.netns = netns
        self.chunking = chunking
        cert_dir.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1", host)
        self.ca_file = cert_dir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self._cert = cert_dir / "cert.pem"
        self._key = cert_dir / "key.pem"
        leaf.cert_chain_pems[0].write_to_path(str(self._cert))
        leaf.private_key_pem.write_to_path(str(self._key))
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._processes: list[multiprocessing.process.BaseProcess] = []

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        for i in range(self.procs):
            ready = ctx.Event()
            log = f"{self.log}.{i}" if self.log else None
            p = ctx.Process(
                target=_serve,
                args=(
                    self.port,
                    str(self._cert),
                    str(self._key),
                    log,
                    ready,
                    self.host,
                    self.netns,
                    self.chunking,
                ),
                daemon=True,
            )
            p.start()
            if not ready.wait(20):
                raise RuntimeError("bench sink did not start")
            self._processes.append(p)

    def stop(self) -> None:
        for p in self._processes:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in self._processes:
            p.join(5)
            if p.is_alive():
                p.kill()
        self._processes.clear()

    def arrivals(self) -> dict[str, int]:
        """Message-ID → arrival time (monotonic ns) across all processes."""
        out: dict[str, int] = {}
        if self.log is None:
            return out
        for i in range(self.procs):
            path = Path(f"{self.log}.{i}")
            if not path.exists():
                continue
            for line in path.read_bytes().splitlines():
                ts, _, mid = line.partition(b" ")
                out.setdefault(mid.decode(), int(ts))
        return out

    def flights(self) -> tuple[int, int]:
        """(reply flights answering transaction commands, messages) so far, all processes;
        the figures lag by up to the 0.5 s the processes take to write them."""
        flights = messages = 0
        for i in range(self.procs):
            path = Path(f"{self.log}.{i}.stats")
            if self.log is not None and path.exists():
                f, m = path.read_text().split()
                flights, messages = flights + int(f), messages + int(m)
        return flights, messages

    def count(self) -> int:
        """Messages accepted so far (lines in the arrival logs)."""
        if self.log is None:
            return 0
        total = 0
        for i in range(self.procs):
            path = Path(f"{self.log}.{i}")
            if path.exists():
                total += path.read_bytes().count(b"\n")
        return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("bench/out/sink"))
    args = parser.parse_args(argv)
    cluster = SinkCluster(args.dir, args.procs)
    cluster.start()
    print(
        f"sink on 127.0.0.1:{cluster.port} ({args.procs} processes), CA {cluster.ca_file}",
        flush=True,
    )
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
