"""The package's layout holds: imports point one way, no cycles, and every module imports.

``ALLOWED`` is the code map of docs/ARCHITECTURE.md as data: what each subpackage (or
top-level module) may import from the rest of ``maildaemon``. Imports inside functions
count too, so a cycle cannot hide behind a lazy import.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import maildaemon

PACKAGE = Path(maildaemon.__file__).resolve().parent
REPO = PACKAGE.parent

# unit -> the units it may import. A unit is a subpackage or a top-level module.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "logs": set(),
    "retry": set(),
    "addresses": set(),
    "redaction": set(),
    "config_values": set(),
    "config_listener": {"config_values"},
    "config_bounces": {"config_values"},
    "config_webhooks": {"config_values"},
    "config": {
        "config_bounces",
        "config_listener",
        "config_values",
        "config_webhooks",
        "errors",
        "redaction",
    },
    "returnpath": {"config_bounces"},
    "tracing": set(),
    "telemetry_export": set(),
    "webhook_telemetry": set(),
    "telemetry": {"__init__", "telemetry_export", "webhook_telemetry"},
    "redisconn": {"config", "config_values", "errors"},
    "contract": {"addresses", "errors"},
    "delivery": {"contract"},
    "message": {"addresses", "config", "contract", "errors", "returnpath"},
    "sending": {"addresses", "config", "delivery", "errors", "logs", "retry", "returnpath"},
    "store": {"addresses", "contract", "delivery", "errors", "logs", "reports"},
    "reports": {"addresses", "delivery", "returnpath", "sending"},
    "webhooks": {"config", "config_values", "errors"},
    "pipeline": {
        "addresses",
        "config",
        "contract",
        "delivery",
        "errors",
        "logs",
        "message",
        "reports",
        "retry",
        "returnpath",
        "sending",
        "store",
        "telemetry",
        "tracing",
        "webhooks",
    },
    "operator": {
        "addresses",
        "contract",
        "delivery",
        "errors",
        "reports",
        "retry",
        "store",
        "webhooks",
    },
    "http": {
        "__init__",
        "config",
        "config_values",
        "contract",
        "errors",
        "logs",
        "message",
        "operator",
        "reports",
        "retry",
        "store",
        "webhooks",
    },
    "exposure": {"config", "config_values", "errors"},
    "startup": {"config", "errors", "logs", "pipeline", "redisconn", "telemetry"},
    "app": {
        "config",
        "contract",
        "errors",
        "exposure",
        "http",
        "logs",
        "message",
        "pipeline",
        "redaction",
        "redisconn",
        "reports",
        "retry",
        "returnpath",
        "sending",
        "startup",
        "store",
        "telemetry",
        "tracing",
    },
    "cli": {
        "__init__",
        "app",
        "config",
        "contract",
        "devstack",
        "errors",
        "exposure",
        "logs",
        "message",
        "operator",
        "pipeline",
        "redaction",
        "redisconn",
        "reports",
        "retry",
        "returnpath",
        "store",
        "webhooks",
    },
    # The embedded dev servers are their own world; only the CLI starts them.
    "devstack": {"__init__", "app", "config", "errors", "logs"},
    "__init__": set(),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def _imports(path: Path, module: str) -> set[str]:
    """Every module of this file's own package (maildaemon, bench) that it imports, at any
    depth of the code."""
    root = module.split(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == root)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            if base.split(".")[0] != root:
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if _is_module(candidate) else base)
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path)
        graph[module] = {m for m in _imports(path, module) if m != module}
    return graph


def test_every_module_imports() -> None:
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="maildaemon."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)


def test_imports_point_one_way() -> None:
    wrong: list[str] = []
    for module, targets in _graph().items():
        unit = _unit(module)
        assert unit in ALLOWED, f"{module}: unit {unit!r} is not in the code map (ALLOWED)"
        for target in sorted(targets):
            other = _unit(target)
            if other != unit and other not in ALLOWED[unit]:
                wrong.append(f"{module} imports {target} ({unit} may not import {other})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", [PACKAGE, REPO / "bench"], ids=["maildaemon", "bench"])
def test_no_import_cycles(package: Path) -> None:
    graph = _graph(package)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


# The PostgreSQL drivers and the migration tool: only these units may import them. Every
# other unit sees the store's domain objects and the project's errors (errors.py).
DRIVERS: dict[str, set[str]] = {
    "asyncpg": {"store"},
    "psycopg": {"store", "devstack"},  # the embedded dev server creates its database
    "yoyo": {"store"},
}


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of the packages this file imports, at any depth of the code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_only_the_store_sees_the_database_driver() -> None:
    wrong: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        unit = _unit(module)
        for driver in sorted(_third_party_imports(path) & set(DRIVERS)):
            if unit not in DRIVERS[driver]:
                wrong.append(f"{module} imports {driver} (only {sorted(DRIVERS[driver])} may)")
    assert not wrong, "\n".join(wrong)


def test_lazy_imports_are_seen(tmp_path: Path) -> None:
    """The static reader sees a lazy import inside a function (what hid the old cycle)."""
    fake = PACKAGE / "store" / "pipeline" / "db.py"
    source = fake.read_text(encoding="utf-8") + "\n\ndef _x() -> None:\n"
    source += "    from maildaemon.http import app  # noqa\n"
    copy = tmp_path / "db.py"
    copy.write_text(source, encoding="utf-8")
    assert "maildaemon.http.app" in _imports(copy, "maildaemon.store.pipeline.db")


def test_the_code_map_in_the_docs_names_every_unit() -> None:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    units = {u for u in ALLOWED if u != "__init__"}
    missing = [u for u in sorted(units) if not re.search(rf"`{u}/?`", text)]
    assert not missing, f"docs/ARCHITECTURE.md does not describe {missing}"


@pytest.mark.parametrize("limit", [450])
def test_modules_stay_small(limit: int) -> None:
    big = [
        f"{p.relative_to(REPO)} ({n} lines)"
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > limit
    ]
    assert not big, f"modules over {limit} lines: {big}"


def _long_functions(limit: int) -> list[str]:
    out: list[str] = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit:
                    out.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length})")
    return out


# Functions allowed past 60 lines, and why. Shrink this list; never grow it silently.
LONG_FUNCTIONS: dict[str, str] = {
    "telemetry.py _instruments": "one declaration per instrument, nothing else",
    "cli/tables.py _": "one table layout per view (a dispatch table)",
    "store/pipeline/db.py _insert_fresh": "one multi-row INSERT: a column list and its arguments",
    "sending/smtp.py _send_once": "one SMTP transaction with its error mapping",
}


def test_functions_stay_short() -> None:
    long = []
    for entry in _long_functions(60):
        where, _, rest = entry.partition(":")
        key = f"{where.removeprefix('maildaemon/')} {rest.split()[1]}"
        if key not in LONG_FUNCTIONS:
            long.append(entry)
    assert not long, f"functions over 60 lines (split them, or say why in LONG_FUNCTIONS): {long}"


def test_no_stale_long_function_entries() -> None:
    """An allowance outlives its function only by mistake: every entry names a long one."""
    present = set()
    for entry in _long_functions(60):
        where, _, rest = entry.partition(":")
        present.add(f"{where.removeprefix('maildaemon/')} {rest.split()[1]}")
    stale = sorted(set(LONG_FUNCTIONS) - present)
    assert not stale, f"LONG_FUNCTIONS entries for functions no longer long (drop them): {stale}"


def test_one_loop_shape_and_one_unavailable_line() -> None:
    """Stop events, interruptible sleeps and the "postgres/redis unavailable" warning are
    written once, in pipeline/lifecycle.py; every component uses them from there."""
    shape = PACKAGE / "pipeline" / "lifecycle.py"
    patterns = {
        "a stop event of its own": re.compile(r"_stopping\s*=\s*asyncio\.Event\(\)"),
        "a hand-written stop wait": re.compile(r"wait_for\(self\._stopping\.wait\(\)"),
        "its own unavailable line": re.compile(r"\"(postgres|redis) unavailable\""),
    }
    found = [
        f"{path.relative_to(PACKAGE)}: {what}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != shape
        for what, pattern in patterns.items()
        if pattern.search(path.read_text())
    ]
    assert found == []
    assert all(p.search(shape.read_text()) for p in list(patterns.values())[::2])


# The one SMTP server of the project (dev stack, integration and reliability suites), and
# the daemon's report listener (bounces and complaints come in over SMTP).
SMTP_SERVER = PACKAGE / "devstack" / "smtp_server.py"
REPORT_LISTENER = PACKAGE / "pipeline" / "report_listener.py"
_SERVER_CALLS = {"start_server", "create_server"}
_PROTOCOL_BASES = {"Protocol", "BufferedProtocol", "StreamReaderProtocol", "SMTP"}
_SMTP_REPLY = re.compile(r"^(220|250|354)[ -]")


def _name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    return [node.module or ""] if isinstance(node, ast.ImportFrom) else []


def _speaks_smtp_as_a_server(tree: ast.AST) -> list[str]:
    """Why a module looks like an SMTP server: it imports aiosmtpd, or it listens (or is
    an asyncio protocol) and has an SMTP greeting or reply among its literals."""
    why: list[str] = []
    listens = replies = False
    for node in ast.walk(tree):
        if any(name.startswith("aiosmtpd") for name in _imported(node)):
            why.append("imports aiosmtpd")
        elif isinstance(node, ast.ClassDef):
            listens |= bool({_name(b) for b in node.bases} & _PROTOCOL_BASES)
        elif isinstance(node, ast.Call):
            listens |= _name(node.func) in _SERVER_CALLS
        elif isinstance(node, ast.Constant) and isinstance(node.value, str | bytes):
            text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
            replies |= bool(_SMTP_REPLY.match(text))
    if listens and replies:
        why.append("listens or is a protocol, and writes SMTP replies")
    return why


def test_one_smtp_server() -> None:
    """devstack/smtp_server.py is the only SMTP server under maildaemon/ and tests/: a
    test that needs a server behaving in some way scripts that one (smtp_script)."""
    found = []
    for path in sorted([*PACKAGE.rglob("*.py"), *(REPO / "tests").rglob("*.py")]):
        if path in (SMTP_SERVER, REPORT_LISTENER):
            continue
        why = _speaks_smtp_as_a_server(ast.parse(path.read_text(encoding="utf-8")))
        if why:
            found.append(f"{path.relative_to(REPO)}: {', '.join(sorted(set(why)))}")
    assert not found, "SMTP servers besides devstack/smtp_server.py:\n" + "\n".join(found)


def test_the_smtp_server_rule_sees_a_hand_written_server() -> None:
    source = """
import asyncio

class Fake(asyncio.Protocol):
    def connection_made(self, transport):
        transport.write(b"220 fake ESMTP\\r\\n")
"""
    assert _speaks_smtp_as_a_server(ast.parse(source))
    assert _speaks_smtp_as_a_server(ast.parse("from aiosmtpd.smtp import SMTP"))
    assert _speaks_smtp_as_a_server(ast.parse(SMTP_SERVER.read_text(encoding="utf-8")))
    client = "import asyncio\nasync def f():\n    await asyncio.open_connection('h', 25)\n"
    assert not _speaks_smtp_as_a_server(ast.parse(client + "X = '250 ok'\n"))
