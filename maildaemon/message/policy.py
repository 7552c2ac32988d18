"""What intake accepts, from the settings and the loaded template catalog."""

from __future__ import annotations

from maildaemon.config import Settings
from maildaemon.contract.command import CommandPolicy
from maildaemon.message.render import TemplateCatalog


def command_policy(settings: Settings, catalog: TemplateCatalog) -> CommandPolicy:
    """The intake policy a daemon with ``settings`` and ``catalog`` judges commands by."""
    return CommandPolicy(
        allowed_sources=frozenset(settings.allowed_sources),
        allowed_headers=frozenset(h.lower() for h in settings.allowed_headers),
        known_templates=catalog.template_ids,
        attachment_max_bytes=settings.attachment_max_bytes,
        attachments_total_max_bytes=settings.attachments_total_max_bytes,
        max_recipients=settings.max_recipients,
        command_max_bytes=settings.command_max_bytes,
        template_needs=catalog.needs,
    )
