"""The pipelined transaction against a real MTA: Postfix, started by the test in a
temporary directory with STARTTLS required (``smtpd_tls_security_level = encrypt``),
delivering to a maildir; PIPELINING and CHUNKING offered or taken away with
``smtpd_discard_ehlo_keywords``. Skipped (with the reason) without root or Postfix."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from maildaemon.devstack.postgres import pick_free_port
from maildaemon.errors import InsecureTransportError, MessageTooLarge
from maildaemon.sending.pipelined import PipeliningConnection
from maildaemon.sending.reply import SendReport
from maildaemon.sending.smtp import tls_context
from tests.integration.test_pipelining import MESSAGE, settings_for
from tests.integration.test_pipelining_ahead import Worker

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
pytestmark = [
    pytest.mark.skipif(not Path(POSTFIX).exists(), reason="postfix is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="starting postfix needs root"),
]
NOBODY = 65534

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
maillog_file_prefixes = {d}
maillog_file = {d}/maillog
myhostname = mx.test.example
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtputf8_enable = no
virtual_mailbox_domains = example.com
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = static:box/
virtual_uid_maps = static:{nobody}
virtual_gid_maps = static:{nobody}
virtual_minimum_uid = 100
smtpd_tls_security_level = encrypt
smtpd_tls_loglevel = 1
smtpd_timeout = 2s
smtpd_tls_received_header = yes
smtpd_tls_cert_file = {d}/cert.pem
smtpd_tls_key_file = {d}/key.pem
smtpd_recipient_restrictions = check_recipient_access texthash:{d}/rcpt_access,
    permit_mynetworks, reject
smtpd_discard_ehlo_keywords = {discard}
message_size_limit = {size_limit}
"""
SIZE_LIMIT = 200_000  # Postfix offers SIZE with it; the test messages are far smaller
SERVICES = """\
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
virtual unix - n n - - virtual
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
smtp unix - - n - - smtp
relay unix - - n - - smtp
local unix - n n - - local
"""
RCPT_ACCESS = """\
gone@example.com 550 5.1.1 no such user
later@example.com 450 4.2.1 try later
"""


@dataclass
class Postfix:
    directory: Path
    port: int
    ca_file: Path
    extensions: str
    _log_mark: int = 0
    _delivered_mark: int = 0

    def mark(self) -> None:
        """From here on, ``log()`` and ``delivered()`` show only what is new."""
        self._log_mark, self._delivered_mark = 0, 0
        self._log_mark, self._delivered_mark = len(self.log()), len(self.delivered())

    def log(self) -> str:
        path = self.directory / "maillog"
        return path.read_text()[self._log_mark :] if path.exists() else ""

    def delivered(self) -> list[bytes]:
        new = self.directory / "mail" / "box" / "new"
        if not new.exists():
            return []
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        return [p.read_bytes() for p in files][self._delivered_mark :]

    async def wait_delivered(self, count: int, timeout: float = 20) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while len(found := self.delivered()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)}/{count} delivered\n{self.log()[-3000:]}")
            await asyncio.sleep(0.1)
        return found


VARIANTS = {
    "pipelining+chunking": "",
    "pipelining": "chunking",
    "neither": "pipelining, chunking",
}


@pytest.fixture
def postfix(postfix_server: Postfix) -> Postfix:
    postfix_server.mark()
    return postfix_server


@pytest.fixture(scope="module", params=list(VARIANTS))
def postfix_server(request: pytest.FixtureRequest) -> Iterator[Postfix]:
    # Postfix's daemons run as `postfix` and `nobody`: the directory must be reachable
    # for them, so not under pytest's root-only tmp_path.
    d = Path(tempfile.mkdtemp(prefix="maildaemon-postfix-"))
    d.chmod(0o755)
    port = pick_free_port()
    try:
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
        leaf.private_key_pem.write_to_path(str(d / "key.pem"))
        ca.cert_pem.write_to_path(str(d / "ca.pem"))
        (d / "queue").mkdir()
        (d / "data").mkdir()
        shutil.chown(d / "data", "postfix")
        (d / "mail").mkdir()
        os.chown(d / "mail", NOBODY, NOBODY)
        discard = VARIANTS[request.param]
        (d / "main.cf").write_text(
            MAIN_CF.format(d=d, nobody=NOBODY, discard=discard, size_limit=SIZE_LIMIT)
        )
        (d / "master.cf").write_text(f"127.0.0.1:{port} inet n - n - - smtpd\n{SERVICES}")
        (d / "rcpt_access").write_text(RCPT_ACCESS)
        started = subprocess.run(
            [POSTFIX, "-c", str(d), "start"], capture_output=True, text=True, check=False
        )
        log = (d / "maillog").read_text() if (d / "maillog").exists() else ""
        assert started.returncode == 0, f"postfix did not start: {started.stderr}\n{log}"
        yield Postfix(d, port, d / "ca.pem", request.param)
    finally:
        subprocess.run([POSTFIX, "-c", str(d), "stop"], capture_output=True, check=False)
        shutil.rmtree(d, ignore_errors=True)


def connection(postfix: Postfix, **overrides: object) -> PipeliningConnection:
    settings = settings_for(postfix.port, postfix.ca_file, **overrides)
    return PipeliningConnection(settings, tls_context(settings))


async def _send_with_retry(
    conn: PipeliningConnection, rcpts: list[str], message: bytes
) -> SendReport:
    # Postfix's master may take a moment to accept after `postfix start` returns.
    for _ in range(50):
        try:
            return await conn.send("noreply@test.example", rcpts, message)
        except OSError:
            await asyncio.sleep(0.1)
    return await conn.send("noreply@test.example", rcpts, message)


async def test_postfix_delivers_pipelined_messages_intact(postfix: Postfix) -> None:
    conn = connection(postfix)
    try:
        for i in range(3):
            message = MESSAGE.replace(b"<m1@", b"<m%d@" % i)
            report = await _send_with_retry(conn, ["ok@example.com"], message)
            assert report.data_reply is not None and report.data_reply.code == 250
            assert "queued as" in report.data_reply.text
        assert conn.pipelining == (postfix.extensions != "neither")
    finally:
        await conn.close()
    delivered = await postfix.wait_delivered(3)
    for raw in delivered:
        assert raw.endswith(MESSAGE.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
        assert b"(using TLS" in raw  # Postfix's Received header: it came over TLS
    log = postfix.log()
    assert log.count("TLS connection established") == 1 and log.count(" connect from ") == 1


async def test_postfix_partial_and_total_refusal(postfix: Postfix) -> None:
    conn = connection(postfix)
    try:
        report = await _send_with_retry(
            conn, ["gone@example.com", "ok@example.com", "later@example.com"], MESSAGE
        )
        assert list(report.accepted) == ["ok@example.com"]
        assert report.refused["gone@example.com"].code == 550
        assert report.deferred["later@example.com"].code == 450
        assert report.data_reply is not None
        report = await conn.send("noreply@test.example", ["gone@example.com"], MESSAGE)
        assert report.accepted == {} and report.data_reply is None
        assert report.refused["gone@example.com"].code == 550
        report = await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)
        assert report.data_reply is not None  # the same connection, after RSET
    finally:
        await conn.close()
    assert len(await postfix.wait_delivered(2)) == 2
    assert postfix.log().count("TLS connection established") == 1


async def test_postfix_reconnects_after_it_closed_the_connection(postfix: Postfix) -> None:
    conn = connection(postfix)
    try:
        assert (await _send_with_retry(conn, ["ok@example.com"], MESSAGE)).data_reply
        await asyncio.sleep(3)  # smtpd_timeout: Postfix says 421 and closes the idle link
        assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply
    finally:
        await conn.close()
    assert len(await postfix.wait_delivered(2)) == 2
    log = postfix.log()
    assert "timeout after" in log and log.count(" connect from ") == 2


async def test_postfix_certificate_not_trusted_nothing_sent(
    postfix: Postfix, tmp_path: Path
) -> None:
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    conn = connection(postfix, smtp_ca_file=other)
    with pytest.raises(InsecureTransportError):
        await _send_with_retry(conn, ["ok@example.com"], MESSAGE)
    await asyncio.sleep(0.5)
    assert postfix.delivered() == []


async def test_postfix_size_limit_refused_before_sending(postfix: Postfix) -> None:
    """Postfix offers SIZE 200000: a message over it is refused here, before MAIL FROM, and
    the connection goes on; a smaller one goes out with SIZE= declared and is delivered.
    (Postfix counts the headers it adds against its limit too, so "fits" is well under.)"""
    fits = MESSAGE + b"x" * (SIZE_LIMIT // 2) + b"\r\n"
    conn = connection(postfix)
    try:
        assert (await _send_with_retry(conn, ["ok@example.com"], fits)).data_reply
        with pytest.raises(MessageTooLarge) as info:
            await conn.send("noreply@test.example", ["ok@example.com"], b"x" * (SIZE_LIMIT + 1))
        assert (info.value.size, info.value.limit) == (SIZE_LIMIT + 1, SIZE_LIMIT)
        assert (await conn.send("noreply@test.example", ["ok@example.com"], MESSAGE)).data_reply
    finally:
        await conn.close()
    assert len(await postfix.wait_delivered(2)) == 2
    assert postfix.log().count(" connect from ") == 1  # the refusal kept the session


async def test_postfix_takes_each_envelope_sent_behind_the_previous_data(
    postfix: Postfix,
) -> None:
    """Back to back with the next envelope behind each message's data (on the PIPELINING
    variants; one command at a time without): each message arrives once, intact, and a
    refusal in the middle stays with its own message."""
    conn = connection(postfix)
    rcpts = [["ok@example.com"]] * 3 + [["gone@example.com"]] + [["ok@example.com"]] * 3
    messages = [MESSAGE.replace(b"<m1@", b"<ahead%d@" % i) for i in range(len(rcpts))]
    await _send_with_retry(conn, ["ok@example.com"], MESSAGE)  # connected, Postfix ready
    envelopes = [("noreply@test.example", r, m) for r, m in zip(rcpts, messages, strict=True)]
    worker = Worker(conn, envelopes)
    try:
        outcomes = await worker.run()
    finally:
        await conn.close()
    assert all(isinstance(o, SendReport) for o in outcomes)
    reports = [o for o in outcomes if isinstance(o, SendReport)]
    assert [r.data_reply is not None for r in reports] == [True] * 3 + [False] + [True] * 3
    assert reports[3].refused["gone@example.com"].code == 550
    if postfix.extensions == "pipelining":
        assert worker.taken_ahead >= 5  # no successor for the refused one nor the last
    delivered = await postfix.wait_delivered(7)
    ids = sorted(
        line for raw in delivered for line in raw.split(b"\n") if line.startswith(b"Message-ID: <")
    )
    assert ids == sorted(
        [b"Message-ID: <m1@test.example>"]
        + [b"Message-ID: <ahead%d@test.example>" % i for i in (0, 1, 2, 4, 5, 6)]
    )
