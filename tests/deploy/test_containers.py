"""The container files pass scripts/validate_containers.py, and each of its checks fails on a copy of the
repository broken in the way it guards against. The entrypoint runs against stand-ins for alembic and
horen, so its control flow is tested without an image."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_validator():
    spec = importlib.util.spec_from_file_location("validate_containers", ROOT / "scripts" / "validate_containers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


vc = _load_validator()

# what the checks read: the container files and the build context the Dockerfiles copy from
COPIED_PATHS = (
    "docker",
    "docker-compose.yml",
    ".dockerignore",
    "docs/containers.md",
    "pyproject.toml",
    "README.md",
    "alembic.ini",
    "migrations",
    "horen_core",
    "service",
)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A copy of the parts of the repository that the validator reads (not a git repository)."""
    for name in COPIED_PATHS:
        source = ROOT / name
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


# ------------------------------------------------------------------------------------------- the real files


def test_real_container_files_pass():
    report = vc.validate(ROOT)
    assert report.errors == []


def test_copy_passes_before_it_is_broken(repo: Path):
    # the broken-copy tests below mean something only if the unbroken copy is clean
    assert vc.validate(repo, external=False).errors == []


def test_main_exit_codes(repo: Path, capsys: pytest.CaptureFixture[str]):
    assert vc.main(["--root", str(repo), "--no-external"]) == 0
    (repo / "docker-compose.yml").write_text("services: [\n")
    assert vc.main(["--root", str(repo), "--no-external"]) == 1
    assert "not valid YAML" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ each check can fail

COMPOSE = "docker-compose.yml"
CPU = "docker/Dockerfile"
ENTRY = "docker/entrypoint.sh"

BREAKAGES: list[tuple[str, Callable[[Path], None], str]] = [
    (
        "db without a healthcheck",
        lambda r: _edit(r / COMPOSE, "pg_isready", "true"),
        "services.db.healthcheck: should run pg_isready",
    ),
    (
        "admin token with a default instead of required",
        lambda r: _edit(r / COMPOSE, "${HOREN_ADMIN_TOKEN:?", "${HOREN_ADMIN_TOKEN:-x"),
        "HOREN_ADMIN_TOKEN must be",
    ),
    (
        "no way to give the api its API keys",
        lambda r: _edit(r / COMPOSE, "  HOREN_API_KEYS: ${HOREN_API_KEYS:-[]}\n", ""),
        "no HOREN_API_KEYS",
    ),
    (
        "api starts before the database is healthy",
        lambda r: _edit(r / COMPOSE, "condition: service_healthy", "condition: service_started"),
        "db with `condition: service_healthy` is required",
    ),
    (
        "a named volume that is not declared",
        lambda r: _edit(r / COMPOSE, "- horen-pg:/var/lib", "- horen-pgdata:/var/lib"),
        "named volume 'horen-pgdata' is not declared",
    ),
    (
        "a variable missing from the docs",
        lambda r: _edit(r / COMPOSE, "HOREN_DATA_DIR: /data", "HOREN_DATA_DIR: ${HOREN_UNDOCUMENTED_DIR:-/data}"),
        "variable HOREN_UNDOCUMENTED_DIR is not documented",
    ),
    (
        "no api service",
        lambda r: _edit(r / COMPOSE, "\n  api:\n", "\n  web:\n"),
        "no `api` service",
    ),
    (
        "COPY of a file that does not exist",
        lambda r: (r / "alembic.ini").unlink(),
        "COPY source 'alembic.ini' does not exist",
    ),
    (
        "COPY of a file the .dockerignore leaves out",
        lambda r: _edit(r / ".dockerignore", "!alembic.ini\n", ""),
        "COPY source 'alembic.ini' is excluded by .dockerignore",
    ),
    (
        "an instruction before FROM",
        lambda r: (r / CPU).write_text("RUN true\n" + (r / CPU).read_text()),
        "RUN before the first FROM",
    ),
    (
        "a misspelt instruction",
        lambda r: _edit(r / CPU, "COPY alembic.ini ./", "COPPY alembic.ini ./"),
        "unknown instruction 'COPPY'",
    ),
    (
        "an image that runs as root",
        lambda r: _edit(r / CPU, "USER 10001:10001", "USER root"),
        "the image runs as root",
    ),
    (
        "an image without the migrations",
        lambda r: _edit(r / CPU, "COPY migrations/ migrations/\n", ""),
        "does not COPY migrations",
    ),
    (
        "exec-form CMD that is not JSON",
        lambda r: _edit(r / CPU, 'CMD ["serve"]', "CMD ['serve']"),
        "not a JSON string array",
    ),
    (
        "an entrypoint that does not parse",
        lambda r: _edit(r / ENTRY, "esac", "esca"),
        "bash -n failed",
    ),
    (
        "an entrypoint that is not executable",
        lambda r: os.chmod(r / ENTRY, 0o644),
        "not executable",
    ),
    (
        "an entrypoint passing a flag horen serve does not know",
        lambda r: _edit(r / ENTRY, '8000}" --no-migrate', '8000}" --skip-migrations'),
        "passes --skip-migrations to `horen serve`",
    ),
    (
        "a .dockerignore that lets the venv in",
        lambda r: (r / ".dockerignore").write_text("**/__pycache__\n"),
        ".venv/ is not excluded",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), [b[1:] for b in BREAKAGES], ids=[b[0] for b in BREAKAGES])
def test_each_breakage_is_reported(repo: Path, mutate: Callable[[Path], None], expected: str):
    mutate(repo)
    errors = vc.validate(repo, external=False).errors
    assert any(expected in e for e in errors), errors


# ----------------------------------------------------------------------------------------- the parsers


def test_parse_dockerfile_joins_continuations_and_skips_comments():
    text = "# syntax=docker/dockerfile:1\nFROM python:3.11\nRUN a \\\n    # a comment inside\n    && b\nCMD x\n"
    parsed = vc.parse_dockerfile(text)
    assert [(i.keyword, i.args, i.line) for i in parsed] == [
        ("FROM", "python:3.11", 2),
        ("RUN", "a && b", 3),
        ("CMD", "x", 6),
    ]


def test_parse_dockerfile_escape_directive():
    parsed = vc.parse_dockerfile("# escape=`\nFROM x\nRUN a `\n  b\n")
    assert parsed[1].args == "a b"


def test_dockerignore_allow_list():
    patterns = ["*", "!service/", "!alembic.ini", "**/__pycache__"]
    assert vc.is_dockerignored(".venv/bin/python", patterns)
    assert vc.is_dockerignored("README.md", patterns)
    assert not vc.is_dockerignored("service/app.py", patterns)
    assert not vc.is_dockerignored("alembic.ini", patterns)
    assert vc.is_dockerignored("service/__pycache__/app.cpython-311.pyc", patterns)


def test_compose_variables_skip_escapes_and_comments():
    text = 'a: ${ONE:-1}\n# b: ${COMMENTED}\nc: "$${NOT_A_VARIABLE} $TWO ${THREE:?x}"\n'
    assert vc.compose_variables(text) == {"ONE", "TWO", "THREE"}


# -------------------------------------------------------------------------------------------- entrypoint


@pytest.fixture
def fake_tools(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Stand-ins for alembic, horen and sleep that append their argv to a log; alembic fails while
    FAKE_ALEMBIC_FAIL is set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    scripts = {
        "alembic": '[ -z "${FAKE_ALEMBIC_FAIL:-}" ] || { echo "alembic $*" >> "$LOG"; exit 1; }\necho "alembic $*" >> "$LOG"',
        "horen": 'echo "horen $*" >> "$LOG"',
        "sleep": 'echo "sleep $*" >> "$LOG"',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LOG": str(log)}
    return log, env


def _run_entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / ENTRY), *args], env=env, capture_output=True, text=True, timeout=30)


def test_entrypoint_migrates_then_serves(fake_tools):
    log, env = fake_tools
    result = _run_entrypoint({**env, "HOREN_PORT": "9001"})
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == [
        "alembic -c /app/alembic.ini upgrade head",
        "horen serve --host 0.0.0.0 --port 9001 --no-migrate",
    ]


def test_entrypoint_skips_migrations_when_asked(fake_tools):
    log, env = fake_tools
    result = _run_entrypoint({**env, "HOREN_MIGRATE": "0"}, "serve", "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines() == ["horen serve --host 0.0.0.0 --port 8000 --no-migrate --log-level debug"]


def test_entrypoint_gives_up_after_failed_migrations(fake_tools):
    log, env = fake_tools
    result = _run_entrypoint({**env, "FAKE_ALEMBIC_FAIL": "1"})
    assert result.returncode != 0
    calls = log.read_text().splitlines()
    assert sum(c.startswith("alembic") for c in calls) == 5
    assert not any(c.startswith("horen") for c in calls)
    assert "giving up on migrations" in result.stderr


def test_entrypoint_migrate_only_and_passthrough(fake_tools):
    log, env = fake_tools
    assert _run_entrypoint(env, "migrate").returncode == 0
    assert _run_entrypoint(env, "horen", "eval", "--help").returncode == 0
    assert log.read_text().splitlines() == ["alembic -c /app/alembic.ini upgrade head", "horen eval --help"]
