"""The webhook benchmark at a tiny size, so that it cannot rot. Figures are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_webhook_benchmark_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.webhooks", "--events", "40"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("BENCH_JSON "))
    result = json.loads(line.removeprefix("BENCH_JSON "))["webhooks"]
    assert result["accepted_attempts"] == result["received"] == 40
    assert result["signatures_verified"] >= 1
