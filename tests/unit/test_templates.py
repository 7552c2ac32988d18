"""The shipped catalog: every template renders in both locales; links are only http(s)."""

from __future__ import annotations

import html as html_lib
import json
import re
from pathlib import Path

import pytest

from maildaemon.config import Settings
from maildaemon.contract.command import Rejection
from maildaemon.contract.parsing import parse_command
from maildaemon.errors import RenderError
from maildaemon.message.policy import command_policy
from maildaemon.message.render import TemplateCatalog

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
CATALOG = TemplateCatalog.load(TEMPLATES, "en")
POLICY = command_policy(
    Settings(postgres_primary_dsn="postgresql://x@127.0.0.1/x", smtp_mode="stub"), CATALOG
)
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
@pytest.mark.parametrize(
    ("template_id", "name", "variables"),
    [
        ("notification", "action_url", {"title": "t", "body": "b"}),
        ("password_reset", "reset_url", {"expires_minutes": 5}),
    ],
)
def test_link_variables_only_http(
    url: str, template_id: str, name: str, variables: dict[str, object]
) -> None:
    """Every template with a link variable refuses other schemes, at render and at intake."""
    with pytest.raises(RenderError, match="http"):
        CATALOG.render(template_id, "en", {**variables, name: url})
    command = {
        "delivery_id": "d-1",
        "source": "notification",
        "idempotency_key": "k-1",
        "to": ["ada@example.com"],
        "payload_mode": "template",
        "template_id": template_id,
        "variables": {**variables, name: url},
    }
    parsed = parse_command(json.dumps(command), POLICY)
    assert isinstance(parsed, Rejection) and parsed.failure_code == "invalid_link"


def test_every_href_is_a_link_variable() -> None:
    """An href is filled only from a variable named *_url (or the button's, set from one)."""
    sources = "".join(p.read_text() for p in TEMPLATES.rglob("*.html"))
    filled = set(re.findall(r'href="\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}"', sources))
    assert filled and all(name.endswith("_url") for name in filled), filled
    assert not re.search(r'href="[^"{]*\{\{(?!\s*[A-Za-z_]+_url\s*\}\})', sources)
    for template_id in CATALOG.template_ids:
        for locale in CATALOG.locales(template_id):
            required, links = CATALOG.needs(template_id, locale)
            used = required | links
            assert {n for n in used if n.endswith("_url")} <= links


def _visible_words(html: str) -> list[str]:
    """The words a reader sees in the HTML part (no head, no tags, entities decoded)."""
    body = re.sub(r"(?s)<head>.*?</head>", " ", html)
    text = html_lib.unescape(re.sub(r"<[^>]+>", " ", body))
    return re.findall(r"[\w'-]+", text.lower())


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


@pytest.mark.parametrize("template_id", sorted(VARIABLES))
@pytest.mark.parametrize("locale", ["en", "de"])
@pytest.mark.parametrize("with_name", [False, True])
def test_text_and_html_say_the_same(template_id: str, locale: str, with_name: bool) -> None:
    """Content filters compare the alternatives: the HTML shows what the text says (the
    button's label and link appear in both), nothing more, and hides nothing."""
    variables = {**VARIABLES[template_id], **({"user_name": "Ada"} if with_name else {})}
    content = CATALOG.render(template_id, locale, variables)
    assert content.text is not None and content.html is not None
    assert _visible_words(content.html) == _words(content.text)
    hidden = re.compile(r"display\s*:\s*none|max-height\s*:\s*0|font-size\s*:\s*0|mso-hide")
    assert not hidden.search(content.html)


def test_button_colour_is_declared_in_css_too() -> None:
    content = CATALOG.render("notification", "en", VARIABLES["notification"])
    assert content.html is not None
    cell = re.search(r'<td[^>]*bgcolor="(#[0-9a-f]{6})"[^>]*>', content.html)
    assert cell is not None and f"background-color:{cell.group(1)}" in cell.group(0)
    link = re.search(r"<a [^>]*>View</a>", content.html)
    assert link is not None and f"background-color:{cell.group(1)}" in link.group(0)
