"""RUNBOOK.md names only metrics and log events that exist, and every metric the code
defines is in it: an operator grepping for a name from the runbook finds it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
RUNBOOK = (REPO / "RUNBOOK.md").read_text()
PACKAGE = REPO / "maildaemon"

_METRIC = re.compile(r"`(mail\.[a-z0-9_.]+)")
# `mail.<table>` in the runbook is a table of the schema, not a metric.
TABLES = frozenset(
    re.findall(
        r"CREATE TABLE (?:IF NOT EXISTS )?(mail\.[a-z_]+)",
        "".join(p.read_text() for p in (REPO / "migrations").glob("*.sql")),
    )
)
RUNBOOK_METRICS = frozenset(_METRIC.findall(RUNBOOK)) - TABLES
# Backticked lowercase phrases that start with a command or a Redis directive are not
# log events.
COMMANDS = (
    "maildaemon ",
    "kill ",
    "journalctl ",
    "kubectl ",
    "systemd-analyze ",
    "curl ",
    "appendfsync ",
)


def prometheus_name(metric: str) -> str:
    """The stem of a metric's name in Prometheus text (suffixes such as _total follow)."""
    return metric.replace(".", "_")


def code_metrics() -> set[str]:
    """Every instrument the daemon creates (their names are string literals in telemetry)."""
    source = (PACKAGE / "telemetry.py").read_text() + (PACKAGE / "webhook_telemetry.py").read_text()
    pattern = r'(?:counter|histogram|observable_gauge)\(\s*"(mail\.[^"]+)"'
    return set(re.findall(pattern, source))


def code_events() -> list[re.Pattern[str]]:
    """Every event name passed to ``logs.event`` (f-strings become patterns) or as the
    ``message`` of ``pipeline.lifecycle.unavailable``, and the names modules keep in an
    ``_EVENT_NAMES`` table (the result writer's outcomes, the unavailable lines)."""
    found: list[re.Pattern[str]] = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) == "event" and len(node.args) > 1:
                pattern = _pattern(node.args[1])
                if pattern is not None:
                    found.append(pattern)
            elif isinstance(node, ast.Call) and _name(node.func) == "unavailable":
                found += [
                    p for k in node.keywords if k.arg == "message" and (p := _pattern(k.value))
                ]
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_EVENT_NAMES" for t in node.targets
            ):
                assert isinstance(node.value, ast.Dict)
                found += [p for v in node.value.values if (p := _pattern(v)) is not None]
    return found


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else ""


def _pattern(node: ast.expr | None) -> re.Pattern[str] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.compile(re.escape(node.value))
    if isinstance(node, ast.JoinedStr):
        parts = [
            re.escape(v.value) if isinstance(v, ast.Constant) else ".+"
            for v in node.values
            if isinstance(v, ast.Constant | ast.FormattedValue)
        ]
        return re.compile("".join(parts))
    return None


def runbook_phrases() -> set[str]:
    """Backticked lowercase phrases of several words (wrapped lines joined)."""
    found = re.findall(r"`([a-z][a-z0-9 :;,'\n-]*)`", RUNBOOK)
    phrases = {" ".join(p.split()) for p in found}
    return {p for p in phrases if " " in p and not p.startswith(COMMANDS)}


def code_spans() -> set[str]:
    """Span names: first arguments of start_span / start_as_current_span / the SMTP phase
    hook (string literals)."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        names.update(re.findall(r'(?:start_span|start_as_current_span)\(\s*"([^"]+)"', source))
        names.update(re.findall(r'self\.phase\("([^"]+)"\)', source))
    return names


def runbook_events() -> set[str]:
    """Phrases that name log events: not span names, not text the code says otherwise (a
    `reason` value or a refusal message the runbook quotes)."""
    spans = code_spans()
    source = " ".join(" ".join(p.read_text().split()) for p in PACKAGE.rglob("*.py"))
    events = {p.pattern for p in code_events()}
    return {
        p
        for p in runbook_phrases()
        if p not in spans and (re.escape(p) in events or p not in source)
    }


def test_every_metric_in_the_runbook_exists_and_every_metric_is_in_it() -> None:
    defined = code_metrics()
    assert len(defined) >= 20
    assert RUNBOOK_METRICS - defined == set(), "named in RUNBOOK.md but not defined"
    assert defined - RUNBOOK_METRICS == set(), "defined but missing from RUNBOOK.md"


def test_every_event_in_the_runbook_is_logged_somewhere() -> None:
    patterns = code_events()
    assert len(patterns) > 50
    named = runbook_events()
    assert {"delivery sent", "postgres unavailable"} <= named
    missing = sorted(e for e in named if not any(p.fullmatch(e) for p in patterns))
    assert missing == [], "events named in RUNBOOK.md that the code never logs"


def test_the_span_names_in_the_runbook_exist() -> None:
    spans = code_spans()
    for name in ("delivery attempt", "smtp transaction", "smtp connect", "intake command"):
        assert name in spans and name in runbook_phrases(), name


def test_the_runbook_names_the_outcome_lines_and_the_ready_line() -> None:
    for name in (
        "`ready`",
        "`delivery sent`",
        "`delivery retry scheduled`",
        "`delivery dead-lettered`",
        "`delivery suppressed`",
        "`delivery failed`",
        "`delivery expired`",
        "`delivery cancelled`",
    ):
        assert name.strip("`") in runbook_phrases() | {"ready"}, name
    assert "`ready`" in RUNBOOK
