"""Optional DKIM signing (dkimpy). The signature is computed once over the pinned bytes,
so every retry carries the same signed message."""

from __future__ import annotations

from pathlib import Path

import dkim

from maildaemon.errors import StartupError

_SIGNED_HEADERS = (
    b"from",
    b"to",
    b"cc",
    b"reply-to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    # RFC 8058 one-click unsubscribe: both must be covered by the signature when present.
    b"list-unsubscribe",
    b"list-unsubscribe-post",
)


class DkimSigner:
    def __init__(self, domain: str, selector: str, key_file: Path) -> None:
        self._domain = domain.encode()
        self._selector = selector.encode()
        try:
            self._key = key_file.read_bytes()
        except OSError as exc:
            raise StartupError(f"MAIL_DKIM_PRIVATE_KEY_FILE: cannot read: {exc}") from None
        try:  # fail at startup, not on the first message
            self.sign(b"From: a@b.example\r\nSubject: x\r\n\r\nx\r\n")
        except dkim.DKIMException as exc:
            raise StartupError(f"MAIL_DKIM_PRIVATE_KEY_FILE: unusable key: {exc}") from None

    def sign(self, message: bytes) -> bytes:
        header: bytes = dkim.sign(
            message,
            self._selector,
            self._domain,
            self._key,
            include_headers=list(_SIGNED_HEADERS),
            linesep=b"\r\n",
        )
        return header + message
