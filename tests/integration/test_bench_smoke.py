"""The benchmark at a tiny size, so that it cannot rot. Figures are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_runs_end_to_end() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.e2e",
            "--messages",
            "60",
            "--latency-messages",
            "20",
            "--rate",
            "50",
            "--backlog-rows",
            "3000",
            "--sink-seconds",
            "0.5",
            "--concurrency",
            "4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON "))
    results = json.loads(line.removeprefix("BENCH_JSON "))
    assert results["throughput"]["sent_attempts_recorded"] == 60
    assert results["latency"]["matched"] == 20
    assert results["intake_then_send"]["messages"] == 60
    assert results["sink_alone"]["messages_per_s"] > 0
    assert results["backlog"]["due_3000"]["claimed"] == 200
    assert results["backlog"]["daemon_with_retry_backlog"]["new_messages"] == 1000
    assert "throughput:" in out.stdout  # the human table
