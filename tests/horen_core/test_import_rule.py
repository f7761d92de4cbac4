"""horen_core is the method library: torch + transformers only, no web, no database, no environment.
Checked statically (every import statement and every os.environ / getenv use, parsed with ast) and at
runtime (importing horen_core pulls in none of the service's packages)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "horen_core"

# third-party top-level packages horen_core may import; everything else must be stdlib or horen_core
ALLOWED_THIRD_PARTY = {"torch", "transformers", "safetensors", "tokenizers", "gguf", "tqdm", "numpy", "accelerate"}
# drawing only, imported inside plotting.plot_checkpoints: an optional extra, not a service dependency
ALLOWED_THIRD_PARTY |= {"matplotlib"}
# named explicitly so the failure message says why, even if one of them ever became "allowed" by accident
FORBIDDEN = {
    "service",
    "fastapi",
    "starlette",
    "uvicorn",
    "pydantic",
    "pydantic_settings",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "psycopg2",
    "faiss",
    "prometheus_client",
    "httpx",
    "requests",
    "dotenv",
    "redis",
}
# what the service brings in; transformers itself may import e.g. httpx or pydantic, so only these are
# checked in sys.modules at runtime
SERVICE_STACK = {"service", "fastapi", "starlette", "uvicorn", "pydantic_settings", "sqlalchemy", "alembic", "psycopg"}
SERVICE_STACK |= {"faiss", "prometheus_client"}
ENV_NAMES = {"environ", "getenv", "putenv", "unsetenv", "environb", "getenvb"}


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Every import or environment access in ``source`` that breaks the rule."""
    tree = ast.parse(source, filename)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "os":
                found += [
                    f"{filename}:{node.lineno} from os import {a.name}" for a in node.names if a.name in ENV_NAMES
                ]
        elif isinstance(node, ast.Attribute) and node.attr in ENV_NAMES:
            found.append(f"{filename}:{node.lineno} uses .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            found.append(f"{filename}:{node.lineno} calls __import__")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module":
            found.append(f"{filename}:{node.lineno} calls import_module")
        for name in names:
            top = name.split(".")[0]
            if top in FORBIDDEN:
                found.append(f"{filename}:{node.lineno} imports {name} (forbidden)")
            elif top != "horen_core" and top not in sys.stdlib_module_names and top not in ALLOWED_THIRD_PARTY:
                found.append(f"{filename}:{node.lineno} imports {name} (not torch/transformers/stdlib)")
    return found


def test_package_has_modules():
    assert len(list(PACKAGE.glob("*.py"))) >= 5


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_module_follows_import_rule(path: Path):
    assert violations(path.read_text(), path.name) == []


@pytest.mark.parametrize(
    "source",
    [
        "import fastapi",
        "from sqlalchemy.orm import Session",
        "import service.settings",
        "from service import engine",
        "def f():\n    import pydantic_settings",
        "import os\nx = os.environ['HOREN_X']",
        "import os\nx = os.getenv('HOREN_X')",
        "from os import environ",
        "from os import getenv as g",
        "import some_unknown_package",
        "import importlib\nm = importlib.import_module('service')",
    ],
)
def test_checker_catches_violations(source: str):
    assert violations(source), f"the checker missed: {source!r}"


def test_checker_accepts_the_allowed_stack():
    ok = "import json\nimport torch\nfrom transformers import AutoTokenizer\nfrom horen_core.errors import HorenError\n"
    assert violations(ok) == []


def test_importing_horen_core_loads_no_service_package():
    code = (
        "import sys, horen_core, horen_core.cli, horen_core.evaluate\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(SERVICE_STACK)!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"horen_core imported {out.stdout.strip()}"
