"""A fast SMTP sink for benchmarks: STARTTLS, accepts and counts, stores nothing.

Runs ``--procs`` processes that share one port with SO_REUSEPORT (the kernel spreads the
connections), each an asyncio protocol that speaks just enough ESMTP: EHLO/HELO,
STARTTLS, MAIL, RCPT, DATA, RSET, NOOP, QUIT. Every accepted message's arrival time is
appended to ``--log`` (one line per message: monotonic-ns and Message-ID) for latency.
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

CRLF = b"\r\n"


class SinkProtocol(asyncio.Protocol):
    def __init__(self, ctx: ssl.SSLContext, log: list[bytes], require_tls: bool) -> None:
        self._ctx = ctx
        self._log = log
        self._require_tls = require_tls
        self._buf = bytearray()
        self._in_data = False
        self._tls = False
        self._transport: asyncio.Transport | None = None
        self._upgrade: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        transport.write(b"220 bench-sink ESMTP ready\r\n")

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
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
        self._write(b"250 2.0.0 queued\r\n")

    def _write(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def _command(self, line: bytes) -> bool:
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            ext = b"" if self._tls else b"250-STARTTLS\r\n"
            self._write(b"250-bench-sink\r\n250-PIPELINING\r\n" + ext + b"250 8BITMIME\r\n")
        elif verb == b"STAR":
            self._write(b"220 2.0.0 go ahead\r\n")
            self._upgrade = asyncio.ensure_future(self._starttls())
            return True
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
        if self._buf:
            pending, self._buf = bytes(self._buf), bytearray()
            self.data_received(pending)


def _serve(port: int, cert: str, key: str, log_path: str | None, ready: object) -> None:
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
    sock.bind(("127.0.0.1", port))
    sock.listen(512)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = await loop.create_server(lambda: SinkProtocol(ctx, log, True), sock=sock)
        ready.set()  # type: ignore[attr-defined]
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if log_path and log:
                with open(log_path, "ab") as fh:
                    fh.write(b"".join(log))
                log.clear()
        server.close()
        if log_path and log:
            with open(log_path, "ab") as fh:
                fh.write(b"".join(log))

    asyncio.run(main())


class SinkCluster:
    """N sink processes on one port; ``stop()`` ends them. The CA file verifies them."""

    def __init__(self, cert_dir: Path, procs: int = 2, log: Path | None = None) -> None:
        import trustme

        self.cert_dir = cert_dir
        self.procs = procs
        self.log = log
        cert_dir.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
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
                args=(self.port, str(self._cert), str(self._key), log, ready),
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
