"""Side-by-side runs of this tree's benchmark and an older commit's, interleaved.

    python -m bench.ab --base 12c0581 --runs 3 -- --messages 10000 --phases throughput,latency

Each side runs its *own* ``bench.e2e`` (the harness of its commit, so figures mean what
they meant then) in its own checkout: the base is a temporary ``git worktree`` of
``--base``, the other side is this working tree (or ``--head REV``, also a worktree). Runs
alternate A B B A A B … so that a slow drift of the machine falls on both sides alike; the
load average is taken before every run and printed with the figures, because a figure
taken while something else runs on the same cores is not evidence. Prints, per numeric
figure that both sides report, the median of each side and the ratio head/base, then one
``AB_JSON {...}`` line. Both sides use this interpreter and its installed packages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PREFIX = "BENCH_JSON "


def figures(document: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of one BENCH_JSON document, by dotted path (lists skipped)."""
    out: dict[str, float] = {}
    for key, value in document.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(figures(value, path + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[path] = float(value)
    return out


def bench_json(output: str) -> dict[str, Any]:
    """The BENCH_JSON document in one run's output."""
    for line in reversed(output.splitlines()):
        if line.startswith(PREFIX):
            document = json.loads(line[len(PREFIX) :])
            if isinstance(document, dict):
                return document
    raise ValueError("the run printed no BENCH_JSON line")


def order(runs: int) -> list[str]:
    """A B B A A B …: each side leads as often as it follows."""
    pairs = [("base", "head") if i % 2 == 0 else ("head", "base") for i in range(runs)]
    return [side for pair in pairs for side in pair]


def compare(
    samples: Mapping[str, Sequence[dict[str, float]]],
) -> list[tuple[str, float, float, float | None]]:
    """(figure, base median, head median, head/base) for every figure both sides have."""
    base, head = samples["base"], samples["head"]
    names = set.intersection(*(set(s) for s in [*base, *head])) if base and head else set()
    rows = []
    for name in sorted(names):
        a = statistics.median(s[name] for s in base)
        b = statistics.median(s[name] for s in head)
        rows.append((name, a, b, b / a if a else None))
    return rows


def table(rows: Sequence[tuple[str, float, float, float | None]], loads: Sequence[float]) -> str:
    width = max((len(r[0]) for r in rows), default=10)
    lines = [
        f"load average (1 min) before each run: {', '.join(f'{x:.2f}' for x in loads)}",
        f"{'figure':<{width}}  {'base':>10}  {'head':>10}  {'head/base':>9}",
    ]
    for name, a, b, ratio in rows:
        shown = f"{ratio:9.2f}" if ratio is not None else f"{'-':>9}"
        lines.append(f"{name:<{width}}  {a:10.3f}  {b:10.3f}  {shown}")
    return "\n".join(lines)


@contextlib.contextmanager
def checkout(rev: str | None) -> Iterator[Path]:
    """This tree for None; otherwise a temporary detached worktree of ``rev``."""
    if rev is None:
        yield REPO
        return
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        path = Path(tmp) / "tree"
        git = ["git", "-C", str(REPO)]
        subprocess.run([*git, "worktree", "add", "--detach", str(path), rev], check=True)
        try:
            yield path
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)


def run_once(tree: Path, bench_args: Sequence[str], timeout: float) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.e2e", *bench_args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.e2e in {tree} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return figures(bench_json(done.stdout))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the older commit (any git revision)")
    parser.add_argument("--head", default=None, help="default: this working tree")
    parser.add_argument("--runs", type=int, default=3, help="runs per side")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    parser.add_argument("bench_args", nargs="*", help="after --: arguments for bench.e2e")
    args = parser.parse_args(argv)
    samples: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
    loads: list[float] = []
    with checkout(args.base) as base, checkout(args.head) as head:
        trees = {"base": base, "head": head}
        for side in order(args.runs):
            loads.append(os.getloadavg()[0])
            print(f"run {len(loads)}: {side} (load {loads[-1]:.2f})", file=sys.stderr)
            samples[side].append(run_once(trees[side], args.bench_args, args.timeout))
    rows = compare(samples)
    print(table(rows, loads))
    print("AB_JSON " + json.dumps({"loads": loads, "samples": samples}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
