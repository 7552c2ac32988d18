"""A discarding OTLP/HTTP receiver for the benchmark: measures the daemon with its spans
and metrics exported (serialisation and HTTP included), without a collector.

    python -m bench.otlp_sink --port 4318 &
    BENCH_DAEMON_ENV=OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318,\\
OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf python -m bench.e2e --phases throughput

It prints how many requests and bytes it took when stopped (SIGTERM or Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections import Counter

from aiohttp import web


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_sink")
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    received: Counter[str] = Counter()

    async def take(request: web.Request) -> web.Response:
        body = await request.read()
        received[request.path] += 1
        received[f"{request.path} bytes"] += len(body)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def serve() -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", take)
        app.router.add_post("/v1/metrics", take)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())
    print(dict(received), flush=True)


if __name__ == "__main__":
    main()
