"""The benchmark at a tiny size, so that it cannot rot. Figures are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.link import available

REPO = Path(__file__).resolve().parents[2]
MATRIX = available() is None  # the delayed link needs root, iproute2 and /dev/net/tun


@pytest.mark.timeout(300)
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
            "--history-rows",
            "3000",
            "--history-days",
            "3",
            "--sink-seconds",
            "0.5",
            "--concurrency",
            "4",
            "--phases",
            "sink,throughput,latency,intake,backlog,history,replicas"
            + (",matrix" if MATRIX else ""),
            "--modes",
            "auto,off",
            # matrix: one small cell per mode over the delayed link (root only)
            "--rtts",
            "5",
            "--conns",
            "2",
            "--matrix-seconds",
            "0.5",
            "--matrix-rate",
            "20",
            "--matrix-latency-seconds",
            "1",
            "--replicas",
            "1,2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON "))
    results = json.loads(line.removeprefix("BENCH_JSON "))
    assert results["throughput"]["sent_attempts_recorded"] == 60
    assert results["throughput"]["round_trips_per_message"] == 1.0  # pipelined, BDAT
    assert results["throughput[off]"]["round_trips_per_message"] == 4.0
    assert set(results["latency"]["stages_p50_p99_ms"]) == {"intake", "claim", "queue", "smtp"}
    if MATRIX:
        cells = {c["mode"]: c for c in results["matrix"]}
        assert cells["auto"]["round_trips_per_message"] == 1.0
        assert cells["off"]["round_trips_per_message"] == 4.0
        assert cells["auto"]["latency"]["matched"] == 20
    assert results["latency"]["matched"] == 20
    assert results["intake_then_send"]["messages"] == 60
    assert results["sink_alone"]["messages_per_s"] > 0
    assert results["backlog"]["due_3000"]["claimed"] == 200
    assert results["backlog"]["daemon_with_retry_backlog"]["new_messages"] == 1000
    history = results["history"]
    assert history["large"]["deliveries"] == 3000 + history["due"]
    assert history["large"]["retention_of_oldest_day"]["deleted"] > 0
    assert history["large"]["claim_200"]["p50_ms"] > 0
    for replicas in (1, 2):
        run = results["replicas"][f"replicas_{replicas}"]
        assert run["attempts"] == 60
        assert run["replicas_that_sent"] >= 1
        assert run["pg_commits_per_delivery"] > 0
    assert "throughput:" in out.stdout  # the human table
