"""The shipped catalog: every template renders in both locales; links are only http(s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildaemon.message.render import TemplateCatalog

CATALOG = TemplateCatalog.load(Path(__file__).resolve().parents[2] / "templates", "en")
VARIABLES = {
    "signin_code": {"code": "493817", "expires_minutes": 10},
    "password_reset": {"reset_url": "https://app.example/reset?t=abc", "expires_minutes": 30},
    "notification": {
        "title": "Invoice ready",
        "body": "Your invoice is ready.",
        "action_url": "https://app.example/invoices/7",
        "action_label": "View",
    },
}


@pytest.mark.parametrize("template_id", sorted(VARIABLES))
@pytest.mark.parametrize("locale", ["en", "de"])
def test_shipped_templates_render(template_id: str, locale: str) -> None:
    assert CATALOG.locales(template_id) >= {"en", "de"}
    content = CATALOG.render(template_id, locale, VARIABLES[template_id])
    assert content.subject and content.text and content.html
    assert content.locale == locale


@pytest.mark.parametrize("url", ["javascript:alert(1)", "data:text/html,x", " JAVASCRIPT:x"])
def test_notification_links_only_http(url: str) -> None:
    content = CATALOG.render("notification", "en", {"title": "t", "body": "b", "action_url": url})
    assert url.strip().lower() not in (content.html or "").lower()
    assert url.strip().lower() not in (content.text or "").lower()
