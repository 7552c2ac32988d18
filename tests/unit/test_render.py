"""The template catalog: loading, locale fallback, escaping, errors and content hashes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from maildaemon.errors import CatalogError, RenderError
from maildaemon.message.render import TemplateCatalog

SHIPPED = Path(__file__).resolve().parents[2] / "templates"

SHIPPED_VARIABLES: dict[str, dict[str, object]] = {
    "signin_code": {"code": "482913", "expires_minutes": 10},
    "password_reset": {"reset_url": "https://app.example/reset?t=abc&u=1", "expires_minutes": 30},
    "notification": {"title": "Build finished", "body": "All 42 checks passed."},
}


def write(root: Path, files: dict[str, str]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return root


def simple(root: Path, **extra: str) -> Path:
    """A one-template catalog (``greeting`` in en and de) plus ``extra`` files."""
    return write(
        root,
        {
            "greeting/en/subject.txt": "Hello {{ name }}\n",
            "greeting/en/body.txt": "Hello {{ name }}!\n",
            "greeting/en/body.html": "<p>Hello {{ name }}!</p>\n",
            "greeting/de/subject.txt": "Hallo {{ name }}\n",
            "greeting/de/body.txt": "Hallo {{ name }}!\n",
            **extra,
        },
    )


@pytest.fixture(scope="module")
def shipped() -> TemplateCatalog:
    return TemplateCatalog.load(SHIPPED, "en")


# The shipped catalog ---------------------------------------------------------------------


def test_shipped_catalog_loads_every_template_in_en_and_de(shipped: TemplateCatalog) -> None:
    assert shipped.template_ids == {"signin_code", "password_reset", "notification"}
    for template_id in shipped.template_ids:
        assert shipped.locales(template_id) == {"en", "de"}


@pytest.mark.parametrize("locale", ["en", "de"])
@pytest.mark.parametrize("template_id", sorted(SHIPPED_VARIABLES))
def test_shipped_templates_render_with_only_required_variables(
    shipped: TemplateCatalog, template_id: str, locale: str
) -> None:
    content = shipped.render(template_id, locale, SHIPPED_VARIABLES[template_id])
    assert content.locale == locale
    assert content.subject and "\n" not in content.subject
    assert content.text and content.html
    assert content.html.lstrip().startswith("<!DOCTYPE html>")
    assert f'<html lang="{locale}">' in content.html
    for value in SHIPPED_VARIABLES[template_id].values():
        assert str(value) in content.text


def test_signin_code_greets_by_name_and_counts_minutes(shipped: TemplateCatalog) -> None:
    one = shipped.render("signin_code", "de", {"code": "1234", "expires_minutes": 1})
    assert one.subject == "Ihr Anmeldecode: 1234"
    assert one.text is not None and one.text.startswith("Ihr Anmeldecode\n\nHallo,\n")
    assert "1 Minute lang" in one.text
    named = shipped.render(
        "signin_code", "en", {"code": "1234", "expires_minutes": 15, "user_name": "Ada"}
    )
    assert named.text is not None and named.text.startswith("Your sign-in code\n\nHi Ada,\n")
    assert "15 minutes" in named.text
    assert named.html is not None and "Hi Ada," in named.html


def test_notification_action_is_optional(shipped: TemplateCatalog) -> None:
    plain = shipped.render("notification", "en", {"title": "T", "body": "B"})
    assert plain.html is not None and "<a href" not in plain.html
    action = shipped.render(
        "notification",
        "de",
        {
            "title": "T",
            "body": "Absatz eins\nZeile zwei\n\nAbsatz zwei",
            "action_url": "https://x.example/a",
        },
    )
    assert action.text is not None and "Öffnen: https://x.example/a" in action.text
    assert action.html is not None
    assert 'href="https://x.example/a"' in action.html
    assert "Absatz eins<br>Zeile zwei</p>" in action.html
    assert ">Absatz zwei</p>" in action.html


# Locale fallback -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "used"),
    [("de-AT", "de"), ("de_AT", "de"), ("DE", "de"), ("de", "de"), ("fr-CA", "en"), (None, "en")],
)
def test_locale_falls_back_to_language_then_default(
    shipped: TemplateCatalog, asked: str | None, used: str
) -> None:
    content = shipped.render("signin_code", asked, SHIPPED_VARIABLES["signin_code"])
    assert content.locale == used
    assert content.subject.startswith("Ihr" if used == "de" else "Your")


def test_exact_regional_locale_wins(tmp_path: Path) -> None:
    regional = {
        "greeting/de-AT/subject.txt": "Servus {{ name }}",
        "greeting/de-AT/body.txt": "Servus {{ name }}!",
    }
    catalog = TemplateCatalog.load(simple(tmp_path, **regional), "en")
    assert catalog.locales("greeting") == {"en", "de", "de-AT"}
    assert catalog.render("greeting", "de-at", {"name": "Xaver"}).subject == "Servus Xaver"
    assert catalog.render("greeting", "de-CH", {"name": "Xaver"}).subject == "Hallo Xaver"
    assert catalog.render("greeting", "de-AT", {"name": "Xaver"}).html is None


def test_unknown_template_is_a_render_error(shipped: TemplateCatalog) -> None:
    with pytest.raises(RenderError, match="no template 'nope'"):
        shipped.render("nope", "en", {})
    with pytest.raises(KeyError):
        shipped.locales("nope")


# Rendering -------------------------------------------------------------------------------


def test_missing_variable_names_template_file_and_variable(shipped: TemplateCatalog) -> None:
    # Checked against what the catalog knows the template needs, before rendering.
    with pytest.raises(RenderError) as caught:
        shipped.render("signin_code", "en", {"code": "1234"})
    assert str(caught.value) == "template signin_code needs variable(s) expires_minutes"
    with pytest.raises(
        RenderError, match=r"^template signin_code needs variable\(s\) code, expires_minutes$"
    ):
        shipped.render("signin_code", "de-AT", {})


def test_html_is_autoescaped_and_text_is_not(shipped: TemplateCatalog) -> None:
    title = '<script>alert("x")</script> Tom & Jerry'
    content = shipped.render("notification", "en", {"title": title, "body": "a < b"})
    assert content.subject == title
    assert content.text is not None and title in content.text and "a < b" in content.text
    assert content.html is not None
    assert "<script>" not in content.html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; Tom &amp; Jerry" in content.html
    assert "a &lt; b" in content.html


def test_subject_is_stripped_and_single_line(tmp_path: Path) -> None:
    catalog = TemplateCatalog.load(
        write(tmp_path, {"t/en/subject.txt": "\n  {{ a }}\n\n  {{ b }}  \n", "t/en/body.txt": "x"}),
        "en",
    )
    assert catalog.render("t", "en", {"a": "One", "b": "Two\r\nThree"}).subject == "One Two Three"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ n + 'x' }}", "TypeError"),
        ("{{ n.nope }}", "has no attribute 'nope'"),
        ("{{ 1 // 0 }}", "ZeroDivisionError"),
    ],
)
def test_any_render_failure_is_a_render_error(tmp_path: Path, body: str, message: str) -> None:
    catalog = TemplateCatalog.load(
        write(tmp_path, {"t/en/subject.txt": "s", "t/en/body.txt": body}), "en"
    )
    with pytest.raises(RenderError, match=rf"^template t/en body.txt: .*{message}"):
        catalog.render("t", "en", {"n": 1})


def test_render_does_not_touch_the_file_system(tmp_path: Path) -> None:
    root = simple(
        tmp_path / "catalog",
        **{
            "_shared/footer.txt": "-- {{ name }}",
            "greeting/en/body.txt": 'Hello!\n{% include "_shared/footer.txt" %}',
        },
    )
    catalog = TemplateCatalog.load(root, "en")
    shutil.rmtree(root)
    content = catalog.render("greeting", "en", {"name": "Ada"})
    assert content.text == "Hello!\n-- Ada"
    assert content.html == "<p>Hello Ada!</p>\n"


# Catalog errors --------------------------------------------------------------------------


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    simple(tmp_path, **{"greeting/de/body.html": "<p>\n{% if name %}\n{{ name }\n</p>"})
    with pytest.raises(CatalogError) as caught:
        TemplateCatalog.load(tmp_path, "en")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'greeting' / 'de' / 'body.html'}:3: ")
    assert "\n" not in message


def test_unknown_filter_is_found_at_load(tmp_path: Path) -> None:
    simple(tmp_path, **{"greeting/en/body.txt": "{{ name | shout }}"})
    with pytest.raises(CatalogError, match=r"greeting/en/body\.txt:1: .*shout"):
        TemplateCatalog.load(tmp_path, "en")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "holds no templates"),
        ({"README.md": "templates live here"}, "holds no templates"),
        ({"t/en/body.txt": "x"}, r"t/en/subject\.txt: missing"),
        ({"t/en/subject.txt": "x"}, r"t/en: needs body\.txt or body\.html"),
        ({"t/de/subject.txt": "x", "t/de/body.txt": "x"}, "no folder for the default locale 'en'"),
        ({"t/README.md": "x"}, "has no locale folders"),
        (
            {
                "t/en/subject.txt": "x",
                "t/en/body.txt": "x",
                "t/EN/subject.txt": "x",
                "t/EN/body.txt": "x",
            },
            "same locale",
        ),
    ],
)
def test_broken_layout_is_a_catalog_error(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    with pytest.raises(CatalogError, match=message):
        TemplateCatalog.load(write(tmp_path, files), "en")


def test_missing_directory_is_a_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="does not exist"):
        TemplateCatalog.load(tmp_path / "nope", "en")


def test_non_utf8_source_is_a_catalog_error(tmp_path: Path) -> None:
    simple(tmp_path)
    (tmp_path / "greeting" / "en" / "body.txt").write_bytes(b"Gr\xfc\xdfe")
    with pytest.raises(CatalogError, match=r"body\.txt: not UTF-8"):
        TemplateCatalog.load(tmp_path, "en")


@pytest.mark.parametrize(
    "statement",
    [
        '{% include "../../etc/passwd" %}',
        '{% include "../secret.txt" %}',
        '{% include "/etc/passwd" %}',
        '{% extends "greeting/en/../../../secret.txt" %}',
        '{% import "greeting/../../secret.txt" as s %}',
        "{% include name %}",
    ],
)
def test_templates_cannot_reach_outside_the_catalog(tmp_path: Path, statement: str) -> None:
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    root = simple(tmp_path / "catalog", **{"greeting/en/body.txt": statement})
    with pytest.raises(CatalogError, match=r"greeting/en/body\.txt: ") as caught:
        TemplateCatalog.load(root, "en")
    assert "TOP SECRET" not in str(caught.value)


def test_symlink_out_of_the_catalog_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    root = simple(tmp_path / "catalog")
    (root / "greeting" / "en" / "body.txt").unlink()
    (root / "greeting" / "en" / "body.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(CatalogError, match="links outside the template directory"):
        TemplateCatalog.load(root, "en")


def test_shared_partials_are_not_template_ids(tmp_path: Path) -> None:
    root = simple(
        tmp_path,
        **{
            "_layout/base.html": "<main>{% block content %}{% endblock %}</main>",
            "greeting/en/body.html": (
                '{% extends "_layout/base.html" %}{% block content %}Hi {{ name }}{% endblock %}'
            ),
        },
    )
    catalog = TemplateCatalog.load(root, "en")
    assert catalog.template_ids == {"greeting"}
    assert catalog.render("greeting", "en", {"name": "<Ada>"}).html == "<main>Hi &lt;Ada&gt;</main>"


# Content hash ----------------------------------------------------------------------------


def test_content_hash_identifies_the_template_version(tmp_path: Path) -> None:
    root = simple(
        tmp_path,
        **{
            "_shared/sig.txt": "-- team",
            "greeting/en/body.txt": 'Hello!\n{% include "_shared/sig.txt" %}',
        },
    )

    def hashes() -> dict[str, str]:
        catalog = TemplateCatalog.load(root, "en")
        return {
            locale: catalog.render("greeting", locale, {"name": "x"}).content_hash
            for locale in ("en", "de")
        }

    first = hashes()
    assert first == hashes()  # stable across loads
    assert first["en"] != first["de"]
    assert all(len(value) == 64 and int(value, 16) >= 0 for value in first.values())
    # Variables do not change it.
    catalog = TemplateCatalog.load(root, "en")
    assert (
        catalog.render("greeting", "en", {"name": "a"}).content_hash
        == catalog.render("greeting", "en", {"name": "b"}).content_hash
    )

    (root / "greeting" / "de" / "body.txt").write_text("Hallo {{ name }}!!\n")
    second = hashes()
    assert second["en"] == first["en"] and second["de"] != first["de"]

    (root / "_shared" / "sig.txt").write_text("-- the team")
    third = hashes()
    assert third["en"] != second["en"] and third["de"] == second["de"]

    (root / "greeting" / "en" / "subject.txt").write_text("Hello {{ name }}")  # no newline
    assert hashes()["en"] != third["en"]


def test_shipped_hashes_cover_the_shared_layout(shipped: TemplateCatalog) -> None:
    values = {
        (template_id, locale): shipped.render(
            template_id, locale, SHIPPED_VARIABLES[template_id]
        ).content_hash
        for template_id in shipped.template_ids
        for locale in ("en", "de")
    }
    assert len(set(values.values())) == len(values)
