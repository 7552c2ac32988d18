"""Template preview: the message a template command would send, rendered without sending."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maildaemon.message.compose import Composer

DEFAULT_SENDER = "maildaemon <noreply@maildaemon.localhost>"
PREVIEW_RECIPIENT = "preview@example.invalid"


def render_preview(
    composer: Composer, template_id: str, locale: str | None, variables: Mapping[str, Any]
) -> bytes:
    """The bytes a template command with these values would send, to a placeholder
    recipient. ``RenderError`` names what is wrong (unknown template, missing variable)."""
    command: dict[str, Any] = {
        "payload_mode": "template",
        "template_id": template_id,
        "locale": locale,
        "variables": dict(variables),
        "to": [{"address": PREVIEW_RECIPIENT}],
    }
    _, _, data = composer.compose("preview", command)
    return data
