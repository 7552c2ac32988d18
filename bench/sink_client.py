"""Drive the bench sink without the daemon: N kept-open STARTTLS connections, pre-built bytes.

Prints the number of messages accepted in ``--seconds``. Used by bench.e2e to measure the
sink's own ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import time

import aiosmtplib

MESSAGE = (
    b"From: a@bench.example\r\nTo: b@example.com\r\nSubject: ceiling\r\n"
    b"Message-ID: <ceiling@bench.example>\r\n\r\n" + b"x" * 1500 + b"\r\n"
)


async def one(port: int, ctx: ssl.SSLContext, until: float) -> int:
    client = aiosmtplib.SMTP(hostname="localhost", port=port, start_tls=True, tls_context=ctx)
    await client.connect()
    sent = 0
    while time.monotonic() < until:
        await client.sendmail("a@bench.example", ["b@example.com"], MESSAGE)
        sent += 1
    await client.quit()
    return sent


async def main_async(args: argparse.Namespace) -> int:
    ctx = ssl.create_default_context(cafile=args.ca)
    until = time.monotonic() + args.seconds
    counts = await asyncio.gather(*(one(args.port, ctx, until) for _ in range(args.connections)))
    return sum(counts)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(asyncio.run(main_async(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
