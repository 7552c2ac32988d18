"""A real Postfix for the tests, started in a temporary directory (its daemons run as
``postfix`` and ``nobody``, so starting it needs root), with STARTTLS required on its
listener (``smtpd_tls_security_level = encrypt``) and a log and maildir to read back."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from maildaemon.devstack.postgres import pick_free_port

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
# Test modules that start Postfix: ``pytestmark = postfix.NEEDED``.
NEEDED = [
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


@contextmanager
def running_postfix(
    main_cf: str, master_cf: str, files: dict[str, str] | None = None, extensions: str = ""
) -> Iterator[Postfix]:
    """Postfix with ``MAIN_CF`` plus ``main_cf`` (a later line overrides an earlier one),
    its SMTP listener on a free port ahead of ``master_cf``, and ``files`` written into its
    directory (``{d}`` in any of them is the directory); stopped and removed afterwards.
    ``extensions`` names the variant (which ESMTP keywords are taken away)."""
    d = Path(tempfile.mkdtemp(prefix="maildaemon-postfix-"))
    d.chmod(0o755)  # reachable for Postfix's unprivileged daemons (not root-only tmp_path)
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
        discard = VARIANTS.get(extensions, "")
        base = MAIN_CF.format(d=d, nobody=NOBODY, discard=discard, size_limit=SIZE_LIMIT)
        (d / "main.cf").write_text(base + main_cf.replace("{d}", str(d)))
        listener = f"127.0.0.1:{port} inet n - n - - smtpd\n"
        (d / "master.cf").write_text(listener + SERVICES + master_cf.replace("{d}", str(d)))
        (d / "rcpt_access").write_text(RCPT_ACCESS)
        for name, text in (files or {}).items():
            (d / name).write_text(text.replace("{d}", str(d)))
        started = subprocess.run(
            [POSTFIX, "-c", str(d), "start"], capture_output=True, text=True, check=False
        )
        log = (d / "maillog").read_text() if (d / "maillog").exists() else ""
        assert started.returncode == 0, f"postfix did not start: {started.stderr}\n{log}"
        yield Postfix(d, port, d / "ca.pem", extensions)
    finally:
        subprocess.run([POSTFIX, "-c", str(d), "stop"], capture_output=True, check=False)
        shutil.rmtree(d, ignore_errors=True)
