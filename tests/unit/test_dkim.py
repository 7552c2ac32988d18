"""DKIM: the signature covers the headers RFC 8058 one-click unsubscribe needs signed."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from maildaemon.message.dkim import DkimSigner
from maildaemon.message.mime import Mailbox, build_message

UNSUBSCRIBE = "<https://app.example/unsubscribe?u=42>, <mailto:unsub@app.example?subject=u42>"


def _signer(tmp_path: Path) -> tuple[DkimSigner, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DkimSigner("test.example", "s1", key_file), b"v=DKIM1; k=rsa; p=" + base64.b64encode(
        public
    )


def _message(headers: dict[str, str]) -> bytes:
    return build_message(
        sender="News <news@test.example>",
        to=[Mailbox("ada@example.com")],
        cc=[],
        reply_to=None,
        subject="Monthly news",
        text="Hello",
        html=None,
        headers=headers,
        attachments=[],
        message_id="<m1@test.example>",
        date=datetime(2030, 1, 1, tzinfo=UTC),
    )


def test_list_unsubscribe_headers_are_signed(tmp_path: Path) -> None:
    signer, record = _signer(tmp_path)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"s1._domainkey.test.example."
        return record

    signed = signer.sign(
        _message(
            {"List-Unsubscribe": UNSUBSCRIBE, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
        )
    )
    assert dkim.verify(signed, dnsfunc=dns)
    header = signed.split(b"\r\n\r\n", 1)[0].decode()
    tags = re.search(r"\bh=([^;]+)", header.split("\r\nDate:", 1)[0])
    assert tags is not None
    signed_names = {n.strip().lower() for n in re.sub(r"\s", "", tags.group(1)).split(":")}
    assert {"list-unsubscribe", "list-unsubscribe-post"} <= signed_names
    # A relay that rewrites the unsubscribe target breaks the signature.
    tampered = signed.replace(b"u=42", b"u=43", 1)
    assert tampered != signed
    assert not dkim.verify(tampered, dnsfunc=dns)
    dropped = signed.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b"")
    assert not dkim.verify(dropped, dnsfunc=dns)


def test_message_without_list_headers_still_verifies(tmp_path: Path) -> None:
    signer, record = _signer(tmp_path)
    signed = signer.sign(_message({}))
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)
