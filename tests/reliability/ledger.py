"""The daemon as a process under faults, and the ledger that checks what came of it.

``Daemon`` runs ``python -m maildaemon.cli.main run`` with its log in a file. ``Ledger``
compares what producers put on the stream with what the SMTP server received and what
PostgreSQL recorded: lost (a delivery not sent, or sent but never received), unexpected (a
message nobody asked for), duplicates (and whether each is flagged), copies without an
attempt on record, and attempts still open.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path

from tests.acceptance.test_process import REPO
from tests.support import Db, wait_for


class Daemon:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def port(self) -> int:
        return int(self.env["MAIL_INTERNAL_HTTP_ADDR"].rsplit(":", 1)[1])

    async def start(self, timeout: float = 60) -> None:
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "maildaemon.cli.main",
                "run",
                env=self.env,
                cwd=str(REPO),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        await wait_for(self._workers_running, timeout=timeout, interval=0.1)

    async def _workers_running(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"the daemon exited: {self.proc.returncode}; see {self.log_path}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.write(b"GET /readyz HTTP/1.0\r\n\r\n")
        data = await reader.read()
        writer.close()
        body = data.split(b"\r\n\r\n", 1)[-1]
        try:
            return bool(json.loads(body)["checks"]["workers"] == "ok")
        except (ValueError, KeyError):
            return False

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def sigterm(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def events(self) -> list[dict[str, object]]:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]


@dataclass
class Figures:
    expected: int
    sent: int
    lost: int
    unexpected: int
    duplicates: int
    unflagged_duplicates: int
    copies_without_attempt: int
    open_attempts: int
    unknown_attempts: int
    flagged: int

    def line(self, name: str) -> str:
        return (
            f"{name}: expected {self.expected}, sent {self.sent}, lost {self.lost}, "
            f"unexpected {self.unexpected}, duplicates {self.duplicates} "
            f"(unflagged {self.unflagged_duplicates}), flagged possible_duplicate "
            f"{self.flagged}, attempts unknown {self.unknown_attempts}, copies without an "
            f"attempt {self.copies_without_attempt}, attempts left open {self.open_attempts}"
        )

    def assert_sound(self, max_duplicates: int) -> None:
        assert self.lost == 0, self
        assert self.unexpected == 0, self
        assert self.unflagged_duplicates == 0, self
        assert self.copies_without_attempt == 0, self
        assert self.open_attempts == 0, self
        assert self.duplicates <= max_duplicates, self


async def settle(db: Db, expected: int, timeout: float) -> None:
    """Wait until every expected delivery is sent."""
    await wait_for(
        lambda: db.fetchval(
            "SELECT count(*) >= $1 FROM mail.deliveries WHERE status = 'sent'", expected
        ),
        timeout=timeout,
        interval=0.2,
    )


async def ledger(db: Db, expected_ids: set[str], received: list[bytes]) -> Figures:
    parser = BytesHeaderParser()
    copies = Counter(str(parser.parsebytes(data)["Message-ID"]) for data in received)
    rows = await db.fetch(
        "SELECT d.delivery_id, d.status, d.message_id, d.possible_duplicate, "
        "(SELECT count(*) FROM mail.attempts a WHERE a.delivery_id = d.delivery_id "
        " AND a.status IN ('sent', 'unknown')) AS tries "
        "FROM mail.deliveries d"
    )
    by_mid = {r["message_id"]: r for r in rows if r["message_id"]}
    known = {r["delivery_id"]: r for r in rows}
    lost = sum(
        1
        for did in expected_ids
        if did not in known
        or known[did]["status"] != "sent"
        or copies.get(known[did]["message_id"], 0) == 0
    )
    unexpected = sum(n for mid, n in copies.items() if mid not in by_mid)
    dup = {mid: n for mid, n in copies.items() if n > 1 and mid in by_mid}
    open_attempts = await db.fetchval("SELECT count(*) FROM mail.attempts WHERE status='started'")
    unknown = await db.fetchval("SELECT count(*) FROM mail.attempts WHERE status = 'unknown'")
    return Figures(
        expected=len(expected_ids),
        sent=sum(1 for r in rows if r["status"] == "sent"),
        lost=lost,
        unexpected=unexpected,
        duplicates=sum(n - 1 for n in dup.values()),
        unflagged_duplicates=sum(1 for mid in dup if not by_mid[mid]["possible_duplicate"]),
        copies_without_attempt=sum(
            max(0, n - by_mid[mid]["tries"]) for mid, n in copies.items() if mid in by_mid
        ),
        open_attempts=int(open_attempts),
        unknown_attempts=int(unknown),
        flagged=sum(1 for r in rows if r["possible_duplicate"]),
    )


def elapsed(since: float) -> str:
    return f"{time.monotonic() - since:.1f} s"


def environ_without_mail() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
