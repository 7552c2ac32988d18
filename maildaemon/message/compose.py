"""Turn a delivery's command into the exact bytes that will go on the wire (once)."""

from __future__ import annotations

import base64
import binascii
import hashlib
from datetime import UTC, datetime
from email.utils import parseaddr
from typing import Any

from maildaemon.errors import RenderError
from maildaemon.message.dkim import DkimSigner
from maildaemon.message.mime import AttachmentPart, Mailbox, build_message, make_message_id
from maildaemon.message.render import TemplateCatalog
from maildaemon.returnpath import HEADER as REF_HEADER
from maildaemon.returnpath import ReturnPath

_OCTETS = "application/octet-stream"


class Composer:
    """Renders templates and builds MIME messages for one sender identity."""

    def __init__(
        self,
        catalog: TemplateCatalog,
        sender: str,
        signer: DkimSigner | None = None,
        return_path: ReturnPath | None = None,
    ) -> None:
        self._catalog = catalog
        # Adds the signed X-Maildaemon-Ref to every message (before DKIM signs it and the
        # bytes are pinned), so a complaint that lost the envelope still finds its delivery.
        self._return_path = return_path
        self._sender = sender
        self._signer = signer
        address = parseaddr(sender)[1]
        self.sender_address = address
        self._domain = address.rpartition("@")[2] or "maildaemon.localhost"

    def compose(
        self, delivery_id: str, command: dict[str, Any], now: datetime | None = None
    ) -> tuple[str, str, bytes]:
        """Return (message_id, content_hash, message bytes); RenderError if it cannot be.

        ``command`` is the command as stored at intake (validated then): it is read as
        plain data here, which costs a fraction of validating it again.
        """
        try:
            return self._compose(delivery_id, command, now)
        except (KeyError, TypeError, AttributeError, binascii.Error) as exc:
            raise RenderError(f"stored command is not usable: {exc!r}") from None

    def locale_of(self, command: dict[str, Any]) -> str | None:
        """The locale a stored command renders in (its own, a fallback or the default);
        None for a rendered command. Read it after ``compose`` succeeded."""
        if command["payload_mode"] != "template":
            return None
        return self._catalog.locale_for(command["template_id"], command.get("locale"))

    def _compose(
        self, delivery_id: str, cmd: dict[str, Any], now: datetime | None
    ) -> tuple[str, str, bytes]:
        if cmd["payload_mode"] == "template":
            content = self._catalog.render(
                cmd["template_id"], cmd.get("locale"), cmd.get("variables", {})
            )
            subject, text, html = content.subject, content.text, content.html
            content_hash = content.content_hash
        else:
            subject, text, html = cmd.get("subject") or "", cmd.get("text"), cmd.get("html")
            digest = hashlib.sha256()
            for part in (subject, text or "", html or ""):
                digest.update(part.encode())
                digest.update(b"\0")
            content_hash = digest.hexdigest()
        message_id = make_message_id(delivery_id, self._domain)
        reply_to = cmd.get("reply_to")
        try:
            message = build_message(
                sender=self._sender,
                to=[_mailbox(r) for r in cmd["to"]],
                cc=[_mailbox(r) for r in cmd.get("cc", ())],
                reply_to=_mailbox(reply_to) if reply_to else None,
                subject=subject,
                text=text,
                html=html,
                headers=self._headers(delivery_id, cmd.get("headers")),
                attachments=[
                    AttachmentPart(
                        a["filename"],
                        a.get("content_type", _OCTETS),
                        base64.b64decode(a["content"]),
                    )
                    for a in cmd.get("attachments", ())
                ],
                message_id=message_id,
                date=now or datetime.now(UTC),
            )
        except ValueError as exc:  # content the builder cannot encode correctly
            raise RenderError(f"cannot build the message: {exc}") from None
        if self._signer is not None:
            message = self._signer.sign(message)
        return message_id, content_hash, message

    def _headers(self, delivery_id: str, stored: Any) -> list[tuple[str, str]]:
        headers = _headers(stored)
        if self._return_path is None:
            return headers
        # The daemon's own tracking header: a producer's header of that name is dropped.
        kept = [(n, v) for n, v in headers if n.lower() != REF_HEADER.lower()]
        return [*kept, (REF_HEADER, self._return_path.token(delivery_id))]


def _headers(stored: Any) -> list[tuple[str, str]]:
    """Custom headers in the producer's order: stored as name/value pairs (jsonb would
    reorder an object's keys); rows written before that hold an object."""
    if not stored:
        return []
    if isinstance(stored, dict):
        return [(str(k), str(v)) for k, v in stored.items()]
    return [(str(name), str(value)) for name, value in stored]


def _mailbox(r: dict[str, Any]) -> Mailbox:
    return Mailbox(r["address"], r.get("name"))
