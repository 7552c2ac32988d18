"""Turn a delivery's command into the exact bytes that will go on the wire (once)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from email.utils import parseaddr

from pydantic import ValidationError

from maildaemon.commands import DeliveryCommand, Recipient
from maildaemon.dkim import DkimSigner
from maildaemon.errors import RenderError
from maildaemon.mime import AttachmentPart, Mailbox, build_message, make_message_id
from maildaemon.render import TemplateCatalog


class Composer:
    """Renders templates and builds MIME messages for one sender identity."""

    def __init__(
        self, catalog: TemplateCatalog, sender: str, signer: DkimSigner | None = None
    ) -> None:
        self._catalog = catalog
        self._sender = sender
        self._signer = signer
        address = parseaddr(sender)[1]
        self.sender_address = address
        self._domain = address.rpartition("@")[2] or "maildaemon.localhost"

    def compose(
        self, delivery_id: str, command: dict[str, object], now: datetime | None = None
    ) -> tuple[str, str, bytes]:
        """Return (message_id, content_hash, message bytes); RenderError if it cannot be."""
        try:
            cmd = DeliveryCommand.model_validate(command)
        except ValidationError as exc:
            raise RenderError(f"stored command no longer valid: {exc.errors()[0]['msg']}") from None
        if cmd.payload_mode == "template":
            assert cmd.template_id is not None
            content = self._catalog.render(cmd.template_id, cmd.locale, cmd.variables)
            subject, text, html = content.subject, content.text, content.html
            content_hash = content.content_hash
        else:
            subject, text, html = cmd.subject or "", cmd.text, cmd.html
            digest = hashlib.sha256()
            for part in (subject, text or "", html or ""):
                digest.update(part.encode())
                digest.update(b"\0")
            content_hash = digest.hexdigest()
        message_id = make_message_id(delivery_id, self._domain)
        message = build_message(
            sender=self._sender,
            to=[_mailbox(r) for r in cmd.to],
            cc=[_mailbox(r) for r in cmd.cc],
            reply_to=_mailbox(cmd.reply_to) if cmd.reply_to else None,
            subject=subject,
            text=text,
            html=html,
            headers=cmd.headers,
            attachments=[
                AttachmentPart(a.filename, a.content_type, a.decoded()) for a in cmd.attachments
            ],
            message_id=message_id,
            date=now or datetime.now(UTC),
        )
        if self._signer is not None:
            message = self._signer.sign(message)
        return message_id, content_hash, message


def _mailbox(r: Recipient) -> Mailbox:
    return Mailbox(r.address, r.name)
