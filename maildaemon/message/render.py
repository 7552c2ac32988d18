"""The template catalog: every template parsed at startup, rendered without touching the disk.

Layout of ``MAIL_TEMPLATE_DIR``::

    <template_id>/<locale>/subject.txt   required
    <template_id>/<locale>/body.txt      at least one of body.txt / body.html
    <template_id>/<locale>/body.html
    _<shared>/...                        partials for {% extends %} / {% include %};
                                         a folder starting with "_" is not a template id

Hidden entries (``.name``) and files other than ``*.txt`` / ``*.html`` are ignored. Other
``.txt`` / ``.html`` files inside a locale folder are partials too. Templates reference each
other by catalog-relative name (``{% extends "_layout/base.html" %}``); the names must be
literal strings, so that the set of files behind a rendering is known at startup and goes
into its ``content_hash``.

Rendering uses Jinja2's sandbox with ``StrictUndefined``; HTML files are autoescaped, text
files are not. The loader serves the sources read at startup from memory, so a template can
reach no file outside the catalog and rendering never touches the file system.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.meta
import jinja2.nodes
import jinja2.sandbox

from maildaemon.contract import limits
from maildaemon.errors import CatalogError, RenderError

SUBJECT = "subject.txt"
BODY_TEXT = "body.txt"
BODY_HTML = "body.html"
_SUFFIXES = frozenset({".txt", ".html"})
# Line breaks in a rendered subject become single spaces (with the white space around
# them). Split, strip, join: linear, where one regex with "\s*" on both sides of the
# breaks backtracks quadratically over a long run of spaces.
_SUBJECT_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]")


def _one_line(subject: str) -> str:
    parts = [part.strip() for part in _SUBJECT_BREAKS.split(subject)]
    return " ".join(part for part in parts if part)


@dataclass(frozen=True, slots=True)
class RenderedContent:
    """A rendered message body, ready for the MIME builder."""

    subject: str
    text: str | None
    html: str | None
    template_id: str
    locale: str
    # sha256 of the sources behind this rendering (see _hash_sources): the template version.
    content_hash: str


@dataclass(frozen=True, slots=True)
class _Variant:
    """One template in one locale: its compiled files and the hash of their sources."""

    template_id: str
    locale: str
    subject: jinja2.Template
    text: jinja2.Template | None
    html: jinja2.Template | None
    content_hash: str
    # Variables the template cannot render without, and the link variables it uses.
    required: frozenset[str] = frozenset()
    links: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class _Source:
    name: str  # catalog-relative, "/"-separated: the name templates use for each other
    path: Path
    raw: bytes
    text: str


class _MemoryLoader(jinja2.BaseLoader):
    """Serves the sources read at load time; any other name does not exist."""

    def __init__(self, sources: Mapping[str, _Source]) -> None:
        self._sources = dict(sources)

    def get_source(
        self, environment: jinja2.Environment, template: str
    ) -> tuple[str, str | None, Callable[[], bool] | None]:
        source = self._sources.get(template)
        if source is None:
            raise jinja2.TemplateNotFound(template)
        return source.text, str(source.path), _always_current

    def list_templates(self) -> list[str]:
        return sorted(self._sources)


def _always_current() -> bool:
    return True


def _autoescape(name: str | None) -> bool:
    return name is not None and name.endswith(".html")


def locale_key(locale: str) -> str:
    """The form locales are compared in: ``de_AT`` and ``de-at`` are both ``de-at``."""
    return locale.replace("_", "-").lower()


class TemplateCatalog:
    """Every template of the catalog, compiled once; see the module docstring for the layout."""

    def __init__(
        self,
        variants: Mapping[str, Mapping[str, _Variant]],
        default_locale: str,
        content_hash: str = "",
    ) -> None:
        # template_id -> locale_key -> variant
        self._variants = {tid: dict(by_locale) for tid, by_locale in variants.items()}
        self._default_key = locale_key(default_locale)
        self._template_ids = frozenset(self._variants)
        self._content_hash = content_hash

    @classmethod
    def load(cls, template_dir: Path, default_locale: str) -> TemplateCatalog:
        """Read, parse and compile the whole catalog; the first problem raises CatalogError."""
        sources, layout = _read_catalog(template_dir)
        env = _environment(sources)
        compiled, references, asts = _compile_all(env, sources)
        default_key = locale_key(default_locale)
        variants: dict[str, dict[str, _Variant]] = {}
        for template_id, locales in sorted(layout.items()):
            if default_key not in locales:
                raise CatalogError(
                    f"template {template_id} ({template_dir / template_id}) has no folder "
                    f"for the default locale {default_locale!r}"
                )
            variants[template_id] = {}
            for key, locale in locales.items():
                prefix = f"{template_id}/{locale}/"
                entry = [prefix + SUBJECT, prefix + BODY_TEXT, prefix + BODY_HTML]
                used = _closure((name for name in entry if name in compiled), references)
                required, links = _needs(env, [asts[name] for name in sorted(used)])
                variants[template_id][key] = _Variant(
                    template_id=template_id,
                    locale=locale,
                    subject=compiled[prefix + SUBJECT],
                    text=compiled.get(prefix + BODY_TEXT),
                    html=compiled.get(prefix + BODY_HTML),
                    content_hash=_hash_sources(sources[name] for name in sorted(used)),
                    required=required,
                    links=links,
                )
        files = _hash_sources(sources[name] for name in sorted(sources))
        whole = hashlib.sha256(f"{files}\0{default_key}".encode()).hexdigest()
        return cls(variants, default_locale, whole)

    @property
    def template_ids(self) -> frozenset[str]:
        return self._template_ids

    @property
    def content_hash(self) -> str:
        """sha256 over every file of the catalog (name, length, bytes; in name order) and
        the default locale: two catalogs with one hash render alike."""
        return self._content_hash

    def locales(self, template_id: str) -> frozenset[str]:
        """The locale folders of a template, as named on disk; KeyError for an unknown id."""
        return frozenset(variant.locale for variant in self._variants[template_id].values())

    def needs(self, template_id: str, locale: str | None) -> tuple[frozenset[str], frozenset[str]]:
        """(required variables, link variables) of the variant a command would render."""
        variant = self._select(template_id, locale)
        return variant.required, variant.links

    def locale_for(self, template_id: str, locale: str | None) -> str:
        """The locale folder a command asking for ``locale`` renders from (after fallback)."""
        return self._select(template_id, locale).locale

    def render(
        self, template_id: str, locale: str | None, variables: Mapping[str, object]
    ) -> RenderedContent:
        """Render a template; the locale falls back to its language, then the default locale.

        A missing required variable or a link variable that is not an http(s) URL is a
        RenderError before anything is rendered (intake checks the same).
        """
        variant = self._select(template_id, locale)
        missing = sorted(variant.required.difference(variables))
        if missing:
            raise RenderError(f"template {template_id} needs variable(s) {', '.join(missing)}")
        for name in sorted(variant.links.intersection(variables)):
            try:
                limits.check_link(name, variables[name])
            except limits.LimitExceeded as exc:
                raise RenderError(f"template {template_id}: {exc}") from None
        subject = _run(variant, SUBJECT, variant.subject, variables)
        text = None if variant.text is None else _run(variant, BODY_TEXT, variant.text, variables)
        html = None if variant.html is None else _run(variant, BODY_HTML, variant.html, variables)
        return RenderedContent(
            subject=_one_line(subject),
            text=text,
            html=html,
            template_id=template_id,
            locale=variant.locale,
            content_hash=variant.content_hash,
        )

    def _select(self, template_id: str, locale: str | None) -> _Variant:
        by_locale = self._variants.get(template_id)
        if by_locale is None:
            raise RenderError(f"no template {template_id!r} in the catalog")
        if locale:
            key = locale_key(locale)
            variant = by_locale.get(key) or by_locale.get(key.split("-", 1)[0])
            if variant is not None:
                return variant
        return by_locale[self._default_key]


def _run(
    variant: _Variant, part: str, template: jinja2.Template, variables: Mapping[str, object]
) -> str:
    try:
        return template.render(variables)
    except jinja2.TemplateError as exc:
        detail = exc.message or type(exc).__name__
    except Exception as exc:  # a template can make any operation raise; all are permanent
        detail = f"{type(exc).__name__}: {exc}"
    detail = " ".join(detail.split())
    raise RenderError(f"template {variant.template_id}/{variant.locale} {part}: {detail}")


# Loading -----------------------------------------------------------------------------


def _read_catalog(root: Path) -> tuple[dict[str, _Source], dict[str, dict[str, str]]]:
    """All template sources by name, and template_id -> locale_key -> locale folder name."""
    if not root.is_dir():
        raise CatalogError(f"template directory {root} does not exist or is not a directory")
    real_root = root.resolve()
    sources: dict[str, _Source] = {}
    layout: dict[str, dict[str, str]] = {}
    for top in _visible(root):
        if not top.is_dir():
            continue
        if top.name.startswith("_"):
            _read_tree(top, root, real_root, sources)
            continue
        locales: dict[str, str] = {}
        for folder in _visible(top):
            if not folder.is_dir():
                continue
            key = locale_key(folder.name)
            if key in locales:
                raise CatalogError(
                    f"{folder}: same locale as {top / locales[key]} (locales ignore case and -/_)"
                )
            _read_tree(folder, root, real_root, sources)
            prefix = f"{top.name}/{folder.name}/"
            if prefix + SUBJECT not in sources:
                raise CatalogError(f"{folder / SUBJECT}: missing (every locale needs a subject)")
            if prefix + BODY_TEXT not in sources and prefix + BODY_HTML not in sources:
                raise CatalogError(f"{folder}: needs {BODY_TEXT} or {BODY_HTML}")
            locales[key] = folder.name
        if not locales:
            raise CatalogError(f"{top}: template {top.name} has no locale folders")
        layout[top.name] = locales
    if not layout:
        raise CatalogError(f"template directory {root} holds no templates")
    return sources, layout


def _visible(folder: Path) -> list[Path]:
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))


def _read_tree(folder: Path, root: Path, real_root: Path, sources: dict[str, _Source]) -> None:
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or path.suffix not in _SUFFIXES:
            continue
        if not path.is_file():
            continue
        if not path.resolve().is_relative_to(real_root):
            raise CatalogError(f"{path}: links outside the template directory")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CatalogError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        name = relative.as_posix()
        sources[name] = _Source(name=name, path=path, raw=raw, text=text)


def _environment(sources: Mapping[str, _Source]) -> jinja2.sandbox.SandboxedEnvironment:
    return jinja2.sandbox.SandboxedEnvironment(
        loader=_MemoryLoader(sources),
        undefined=jinja2.StrictUndefined,
        autoescape=_autoescape,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
        cache_size=-1,  # unbounded: every template stays compiled, includes included
    )


def _compile_all(
    env: jinja2.Environment, sources: Mapping[str, _Source]
) -> tuple[dict[str, jinja2.Template], dict[str, frozenset[str]], dict[str, jinja2.nodes.Template]]:
    """Compile every source; also return the templates each one references, and its AST."""
    compiled: dict[str, jinja2.Template] = {}
    references: dict[str, frozenset[str]] = {}
    asts: dict[str, jinja2.nodes.Template] = {}
    for name, source in sources.items():
        try:
            ast = env.parse(source.text, name, str(source.path))
            asts[name] = ast
            refs = list(jinja2.meta.find_referenced_templates(ast))
            compiled[name] = env.get_template(name)
        except jinja2.TemplateSyntaxError as exc:
            message = " ".join((exc.message or "syntax error").split())
            raise CatalogError(f"{source.path}:{exc.lineno}: {message}") from None
        for ref in refs:
            if ref is None:
                raise CatalogError(
                    f"{source.path}: template names in extends/include/import must be "
                    f"literal strings"
                )
            if ref not in sources:
                raise CatalogError(
                    f"{source.path}: refers to {ref!r}, which is not a template in the catalog "
                    f"(names are relative to the template directory)"
                )
        references[name] = frozenset(str(ref) for ref in refs)
    return compiled, references, asts


def _needs(
    env: jinja2.Environment, asts: Iterable[jinja2.nodes.Template]
) -> tuple[frozenset[str], frozenset[str]]:
    """(required, link) variables of the templates behind one rendering.

    A variable is required when a template reads it and no template of the set assigns it
    or tests it with ``is defined``; link variables are those named ``*_url``.
    """
    read: set[str] = set()
    optional: set[str] = set()
    assigned: set[str] = set()
    for ast in asts:
        read |= jinja2.meta.find_undeclared_variables(ast)
        for test in ast.find_all(jinja2.nodes.Test):
            if test.name in ("defined", "undefined") and isinstance(test.node, jinja2.nodes.Name):
                optional.add(test.node.name)
        for node in ast.find_all(jinja2.nodes.Name):
            if node.ctx in ("store", "param"):
                assigned.add(node.name)
    read -= assigned | set(env.globals)
    links = frozenset(name for name in read if limits.is_link_variable(name))
    return frozenset(read - optional), links


def _closure(names: Iterable[str], references: Mapping[str, frozenset[str]]) -> set[str]:
    seen: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name not in seen:
            seen.add(name)
            pending.extend(references[name])
    return seen


def _hash_sources(sources: Iterable[_Source]) -> str:
    """sha256 over (name, length, bytes) of each file, in name order."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + len(source.raw).to_bytes(8, "big"))
        digest.update(source.raw)
    return digest.hexdigest()
