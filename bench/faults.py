"""Faults against real server processes, and what clients see. Per scenario: requests made (per
server two edit clients, a reader of the listing, one edit and /readyz, and a generator), those the
server died under (no answer), acknowledged edits (201), lost (acknowledged but afterwards not listed
as acknowledged), half-written (in the database, an edit without its event, entry or whole vectors,
or an event without its edit), 503s and any other 5xx (which must be 0), bad bodies (an error without
the stable shape or Retry-After, or naming internals: driver, host, paths), generations not answered
200 (the model serves from memory whatever the database does), the time to recover, and whether each
server's codebook holds as many entries as the database at the end.

Scenarios:
  kill-sqlite, kill-postgres  kill -9 at random moments during edit load, restart, --kills times;
                              recover = restart to /readyz 200
  db                          PostgreSQL crashed (pg_ctl -m immediate) and restarted under two
                              replicas; recover = from the database's return to the first 201 and to
                              /readyz 200 on both, and to both replicas' applied-log digests agreeing
  replica-kill                one of two replicas killed with SIGKILL during edits through both, and
                              restarted, --replica-kills times; recover = to the digests agreeing
  read-only                   the SQLite file and its WAL made immutable (chattr +i: writes fail even
                              for root, through descriptors already open) under load, then writable
  full                        a full disk (a 16 MB tmpfs) under the SQLite file, then space again

PostgreSQL is a cluster of the script's own (initdb/pg_ctl on a free port, bench/scratch_pg.py),
never the machine's. read-only and full need root (chattr on a filesystem that has it, a tmpfs).

    .venv/bin/python bench/faults.py [--kills 10] [--outage 3] [--model PATH] [--only db,full]

Without --model it serves the tiny random model of the tests (fast to start and to edit).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TINY_HOREN, Server, build_tiny_model_dir  # noqa: E402
from bench.scratch_pg import ScratchPostgres, unavailable_reason  # noqa: E402

# what no response body may name: drivers, tracebacks, addresses, file paths
INTERNALS = re.compile(
    r"traceback|sqlalchemy|sqlalche\.me|psycopg|sqlite|operationalerror|127\.0\.0\.1|/tmp/|File \"", re.I
)


class Tally:
    """What the clients of one scenario saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.no_answer = 0  # the server went away mid-request
        self.acked: dict[int, tuple[str, str, float]] = {}  # edit id -> (prompt, target, when answered)
        self.s503 = 0
        self.s5xx = 0
        self.bad: list[str] = []  # error bodies without the stable shape, or naming internals
        self.gen_failed = 0  # generations not answered 200 while the server was up
        self.errors: Counter[str] = Counter()  # "method path status type" of every error answer
        self.edit_answers: list[float] = []  # when each edit got an answer, whatever it was
        self.edit_s: list[float] = []  # how long each 201 took (training, then the commit)

    def add(self, path: str, r: httpx.Response | None, extra: tuple[str, str] | None = None) -> None:
        with self.lock:
            self.requests += 1
            if r is None:
                self.no_answer += 1
                return
            if path == "POST /edits":
                self.edit_answers.append(time.monotonic())
            if r.status_code == 201 and extra:
                self.acked[r.json()["id"]] = (*extra, time.monotonic())
            elif r.status_code == 503:
                self.s503 += 1
            elif r.status_code >= 500:
                self.s5xx += 1
            if path == "POST /generate" and r.status_code != 200:
                self.gen_failed += 1
            if r.status_code >= 400:
                self.errors[f"{path} {r.status_code} {_error_type(path, r)}"] += 1
                if not _good_error(path, r):
                    self.bad.append(f"{path} {r.status_code}: {r.text[:200]}")


def _error_type(path: str, r: httpx.Response) -> str:
    try:
        body = r.json()
        return body["detail"]["reason"] if path == "GET /readyz" else body["error"]["type"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return "?"


def _good_error(path: str, r: httpx.Response) -> bool:
    if INTERNALS.search(r.text):
        return False
    try:
        body = r.json()
    except json.JSONDecodeError:
        return False
    if path == "GET /readyz":
        return isinstance(body.get("detail", {}).get("reason"), str) and "Retry-After" in r.headers
    err = body.get("error") if isinstance(body, dict) else None
    ok = isinstance(err, dict) and isinstance(err.get("type"), str) and isinstance(err.get("message"), str)
    return ok and (r.status_code != 503 or "Retry-After" in r.headers)


def edit_load(url: str, tag: str, tally: Tally, stop: threading.Event, pause: float = 0.0) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        i = 0
        while not stop.is_set():
            i += 1
            prompt, target = f"Which river flows through {tag} {i}?", f"Nile {tag} {i}"
            t0 = time.monotonic()
            try:
                r = c.post("/edits", json={"prompt": prompt, "target": target})
            except httpx.HTTPError:
                tally.add("POST /edits", None)  # the server went away mid-request: not acknowledged
                return
            tally.add("POST /edits", r, (prompt, target))
            if r.status_code == 201:
                with tally.lock:
                    tally.edit_s.append(time.monotonic() - t0)
            if pause:
                stop.wait(pause)


def probe(url: str, tally: Tally, stop: threading.Event, generate: bool) -> None:
    """Requests beside the edits, round robin: reads that need the database (a listing, one edit,
    /readyz), or generations, which go through the engine's queue and are served from memory."""
    gen = {"prompt": "Which river flows through Cairo?", "max_new_tokens": 2}
    with httpx.Client(base_url=url, timeout=60) as c:
        k = 0
        while not stop.is_set():
            k += 1
            with tally.lock:
                some = next(reversed(tally.acked), None)  # the newest acknowledged edit: must be found
            path = "/generate" if generate else ["/edits", f"/edits/{some}" if some else "/edits", "/readyz"][k % 3]
            try:
                if generate:
                    r = c.post(path, json=gen)
                else:
                    r = c.get(path, params={"limit": 5} if path == "/edits" else None)
            except httpx.HTTPError:
                tally.add(("POST " if generate else "GET ") + path, None)
                return  # the server went away
            tally.add(("POST " if generate else "GET ") + ("/edits/{id}" if path.startswith("/edits/") else path), r)
            stop.wait(0.1)


class Load:
    """Per server: two edit clients, a reader and a generator, until stopped."""

    def __init__(self, urls: list[str], tally: Tally, tag: str, pause: float = 0.0) -> None:
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=edit_load, args=(u, f"{tag}{n}{t}", tally, self.stop, pause))
            for n, u in enumerate(urls)
            for t in "ab"
        ] + [threading.Thread(target=probe, args=(u, tally, self.stop, g)) for u in urls for g in (False, True)]
        for t in self.threads:
            t.start()

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)


def wait_acked(tally: Tally, more_than: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(tally.acked) <= more_than and time.monotonic() < deadline:
        time.sleep(0.02)


def listed(url: str) -> dict[int, tuple[str, str]]:
    out, offset = {}, 0
    with httpx.Client(base_url=url, timeout=60) as c:
        while True:
            page = c.get("/edits", params={"limit": 1000, "offset": offset}).json()
            out |= {e["id"]: (e["prompt"], e["target"]) for e in page["items"]}
            offset += 1000
            if offset >= page["total"]:
                return out


def lost(tally: Tally, url: str) -> int:
    stored = listed(url)
    return sum(stored.get(i) != (p, t) for i, (p, t, _) in tally.acked.items())


def codebook_matches(url: str, db_url: str) -> bool:
    """The server's codebook holds as many entries as the database after the faults."""
    entries = httpx.get(f"{url}/readyz", timeout=30).json()["detail"]["entries"]
    eng = create_engine(db_url)
    with eng.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM codebook_entries")).scalar()
    eng.dispose()
    return entries == stored


def half_written(db_url: str) -> int:
    """Edits without their event, entry or whole vectors, and events without their edit."""
    eng = create_engine(db_url)
    with eng.connect() as conn:
        k, v = conn.execute(text("SELECT key_dim, value_dim FROM codebooks")).one()
        half = conn.execute(
            text(
                "SELECT count(*) FROM edits e LEFT JOIN events ev ON ev.edit_id = e.id AND ev.kind = 'edit' "
                "LEFT JOIN codebook_entries n ON n.codebook_id = e.codebook_id AND n.entry_id = e.entry_id "
                "WHERE ev.id IS NULL OR n.entry_id IS NULL OR length(e.key) != :k OR length(e.value) != :v"
            ),
            {"k": 4 * k, "v": 4 * v},
        ).scalar()
        orphans = conn.execute(
            text("SELECT count(*) FROM events ev LEFT JOIN edits e ON e.id = ev.edit_id WHERE e.id IS NULL")
        ).scalar()
    eng.dispose()
    return half + orphans


def ready(urls: list[str]) -> bool:
    try:
        return all(httpx.get(f"{u}/readyz", timeout=5).status_code == 200 for u in urls)
    except httpx.HTTPError:
        return False


def digests_agree(urls: list[str]) -> bool:
    try:
        details = [httpx.get(f"{u}/readyz", timeout=5) for u in urls]
    except httpx.HTTPError:
        return False
    if any(r.status_code != 200 for r in details):
        return False
    return len({(r.json()["detail"]["last_event_applied"], r.json()["detail"]["log_digest"]) for r in details}) == 1


def until(check, timeout: float = 60) -> float:
    """Seconds until check() holds (polled every 50 ms), or nan."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(0.05)
    return float("nan")


def hold_fault(tally: Tally, t_fault: float, seconds: float) -> int:
    """Keep a fault for ``seconds`` and until an edit was answered under it (an edit trains for
    seconds before it writes, so a short fault can pass unseen); the 201s answered meanwhile, after
    a half-second grace for a commit that was already under way."""
    time.sleep(seconds)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(t > t_fault + 0.5 for t in tally.edit_answers):
        time.sleep(0.02)
    return sum(t > t_fault + 0.5 for *_, t in tally.acked.values())


def first_201_after(tally: Tally, t_end: float, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(t > t_end for *_, t in tally.acked.values()):
        time.sleep(0.02)
    after = [t - t_end for *_, t in tally.acked.values() if t > t_end]
    median = sorted(tally.edit_s)[len(tally.edit_s) // 2] if tally.edit_s else float("nan")
    return f"{min(after):.2f} s (a 201 took {median:.2f} s median)" if after else "never"


def make_server(args, db_url: str, root: Path, name: str) -> Server:
    env = {"HOREN_SYNC_INTERVAL": "0.5"}
    if args.tiny:
        env["HOREN_HOREN"] = TINY_HOREN
    return Server(db_url, root / f"data-{name}", root / f"{name}.log", model=args.model, env=env)


def row(name: str, tally: Tally, lost_n: int, half: int | str, recover: str, **more: str) -> dict:
    return {
        "scenario": name,
        "requests": tally.requests,
        "acknowledged": len(tally.acked),
        "lost": lost_n,
        "half-written": half,
        "503": tally.s503,
        "other 5xx": tally.s5xx,
        "no answer": tally.no_answer,
        "generate not 200": tally.gen_failed,
        "bad bodies": len(tally.bad),
        "recover": recover,
        "bad": tally.bad[:3],
        "errors": ", ".join(f"{k}: {n}" for k, n in sorted(tally.errors.items())),
        **more,
    }


def kill_loop(args, name: str, db_url: str, root: Path) -> dict:
    rng = random.Random(18)
    server = make_server(args, db_url, root, name.split(",")[1].strip())
    tally = Tally()
    restarts = []
    server.start(timeout=300)
    for k in range(args.kills):
        load = Load([server.url], tally, f"k{k}")
        wait_acked(tally, len(tally.acked), 60)  # kill during load, not before it
        time.sleep(rng.uniform(0.0, 0.8))
        server.stop(kill=True)
        t_kill = time.monotonic()
        load.end()
        server.start(timeout=300)
        restarts.append(time.monotonic() - t_kill)
    lost_n, same = lost(tally, server.url), codebook_matches(server.url, db_url)
    server.stop()
    recover = f"restart to ready {min(restarts):.1f}-{max(restarts):.1f} s ({args.kills} kills)"
    return row(name, tally, lost_n, half_written(db_url), recover, codebook=same)


@contextlib.contextmanager
def two_replicas(args, root: Path, name: str) -> Iterator[tuple[ScratchPostgres, list[Server]]]:
    """A scratch PostgreSQL and two ready servers on it; both killed and the cluster removed after."""
    pg = ScratchPostgres().init()
    pg.start()
    servers = []
    try:
        servers = [make_server(args, pg.url, root, f"{name}-{n}") for n in "ab"]
        for s in servers:
            s.start(timeout=300)
        yield pg, servers
    finally:
        for s in servers:
            s.stop(kill=True)
        pg.destroy()


def replicas_outcome(tally: Tally, servers: list[Server], pg: ScratchPostgres) -> tuple[float, int, bool, bool]:
    """After the load: seconds until the replicas' digests agree, acknowledged edits lost, whether
    both list the same edits and whether each codebook matches the database; stops the servers."""
    urls = [s.url for s in servers]
    agree = until(lambda: digests_agree(urls))
    lost_n = lost(tally, urls[0])
    same = listed(urls[0]) == listed(urls[1])
    matches = all(codebook_matches(u, pg.url) for u in urls)
    for s in servers:
        s.stop()
    return agree, lost_n, same, matches


def db_outage(args, root: Path) -> dict:
    with two_replicas(args, root, "pg-outage") as (pg, servers):
        urls = [s.url for s in servers]
        tally = Tally()
        load = Load(urls, tally, "o", pause=0.05)
        wait_acked(tally, 1)
        time.sleep(args.outage)
        pg.stop("immediate")  # a crash, not a polite shutdown
        during = hold_fault(tally, time.monotonic(), args.outage)
        pg.start()
        t_end = time.monotonic()
        ready_s = until(lambda: ready(urls))
        first = first_201_after(tally, t_end)
        time.sleep(1.0)
        load.end()
        agree, lost_n, same, matches = replicas_outcome(tally, servers, pg)
        recover = (
            f"first 201 {first}, both /readyz 200 {ready_s:.2f} s; 201s while down: {during}; "
            f"digests agree {agree:.2f} s after the load, same listing: {same}"
        )
        return row("postgres crash/restart, 2 replicas", tally, lost_n, half_written(pg.url), recover, codebook=matches)


def replica_kill(args, root: Path) -> dict:
    with two_replicas(args, root, "replica") as (pg, servers):
        tally = Tally()
        rng = random.Random(18)
        restarts = []
        for k in range(args.replica_kills):
            load = Load([s.url for s in servers], tally, f"r{k}")
            wait_acked(tally, len(tally.acked) + 1)
            time.sleep(rng.uniform(0.0, 0.8))
            servers[0].stop(kill=True)
            wait_acked(tally, len(tally.acked), 60)  # the survivor goes on alone
            load.end()
            t_start = time.monotonic()
            servers[0].start(timeout=300)  # ready = its model loaded and the survivor's edits applied
            restarts.append(time.monotonic() - t_start)
        agree, lost_n, same, matches = replicas_outcome(tally, servers, pg)
        recover = (
            f"killed replica restart to ready {min(restarts):.1f}-{max(restarts):.1f} s ({args.replica_kills} kills); "
            f"digests agree {agree:.2f} s after, same listing: {same}"
        )
        return row("replica kill -9, 2 replicas", tally, lost_n, half_written(pg.url), recover, codebook=matches)


def sqlite_fault(args, root: Path, kind: str) -> dict:
    name = "read-only SQLite file" if kind == "read-only" else "full disk under SQLite"
    if os.geteuid() != 0:
        return {"scenario": name, "skipped": "needs root"}
    data = root / f"sqlite-{kind}"
    data.mkdir()
    db = data / "horen.db"
    mounted = False
    if kind == "full":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(data)]).returncode == 0
        if not mounted:
            return {"scenario": name, "skipped": "cannot mount a tmpfs here"}
    server = make_server(args, f"sqlite:///{db}", root, f"sqlite-{kind}")
    files: list[str] = []
    try:
        server.start(timeout=300)
        tally = Tally()
        load = Load([server.url], tally, kind[0], pause=0.05)
        wait_acked(tally, 1)
        time.sleep(args.outage)
        if kind == "read-only":
            files = [str(p) for p in (db, data / "horen.db-wal") if p.exists()]
            r = subprocess.run(["chattr", "+i", *files], capture_output=True, text=True)
            if r.returncode != 0:
                load.end()
                return {"scenario": name, "skipped": f"chattr +i failed here: {r.stderr.strip()}"}
        else:
            with open(data / "filler", "wb", buffering=0) as f:
                try:
                    while f.write(b"\1" * 65536):
                        pass
                except OSError:
                    pass  # the disk is full
        during = hold_fault(tally, time.monotonic(), args.outage)
        if kind == "read-only":
            subprocess.run(["chattr", "-i", *files], check=True)
            files = []
        else:
            (data / "filler").unlink()
        t_end = time.monotonic()
        ready_s = until(lambda: ready([server.url]))
        first = first_201_after(tally, t_end)
        time.sleep(0.5)
        load.end()
        lost_n, same = lost(tally, server.url), codebook_matches(server.url, f"sqlite:///{db}")
        server.stop()
        recover = f"first 201 {first}, /readyz 200 {ready_s:.2f} s; 201s while faulted: {during}"
        return row(name, tally, lost_n, half_written(f"sqlite:///{db}"), recover, codebook=same)
    finally:
        server.stop(kill=True)
        if files:
            subprocess.run(["chattr", "-i", *files])
        if mounted:
            subprocess.run(["umount", "-l", str(data)])


SCENARIOS = ["kill-sqlite", "kill-postgres", "db", "replica-kill", "read-only", "full"]
COLS = ["requests", "no answer", "acknowledged", "lost", "half-written", "503", "other 5xx", "bad bodies"]
COLS += ["generate not 200", "recover"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10, help="kill -9 rounds per database (kill-sqlite, kill-postgres)")
    ap.add_argument("--replica-kills", type=int, default=3, help="rounds of replica-kill")
    ap.add_argument("--outage", type=float, default=3.0, help="seconds of load before, and length of, each fault")
    ap.add_argument("--model", default=None, help="a model folder or GGUF; default: the tests' tiny random model")
    ap.add_argument("--only", default="", help="comma-separated, of: " + ", ".join(SCENARIOS))
    args = ap.parse_args()
    want = [s for s in SCENARIOS if s in set(filter(None, args.only.split(",")))] or SCENARIOS
    if unknown := set(filter(None, args.only.split(","))) - set(SCENARIOS):
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    root = Path(tempfile.mkdtemp(prefix="horen-faults-"))
    args.tiny = args.model is None
    if args.tiny:
        args.model = str(build_tiny_model_dir(root / "tiny", max_positions=256, chat=True))
    pg_missing = unavailable_reason()
    rows = []
    for scenario in want:
        t0 = time.monotonic()
        if scenario in ("kill-postgres", "db", "replica-kill") and pg_missing:
            rows.append({"scenario": scenario, "skipped": pg_missing})
        elif scenario == "kill-sqlite":
            rows.append(kill_loop(args, "kill -9 loop, SQLite", f"sqlite:///{root / 'kill.db'}", root))
        elif scenario == "kill-postgres":
            pg = ScratchPostgres().init()
            pg.start()
            try:
                rows.append(kill_loop(args, "kill -9 loop, PostgreSQL", pg.url, root))
            finally:
                pg.destroy()
        elif scenario == "db":
            rows.append(db_outage(args, root))
        elif scenario == "replica-kill":
            rows.append(replica_kill(args, root))
        else:
            rows.append(sqlite_fault(args, root, scenario))
        rows[-1]["wall"] = f"{time.monotonic() - t0:.0f} s"
    model = "tiny random" if args.tiny else args.model
    print(f"\nfaults, model {model}, outage {args.outage} s; logs in {root}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['scenario']}: skipped ({r['skipped']})")
            continue
        cells = " | ".join(f"{c}: {r[c]}" for c in COLS)
        print(f"{r['scenario']}: {cells} | codebook = database: {r['codebook']} | wall {r['wall']}")
        if r["errors"]:
            print(f"    errors: {r['errors']}")
        for b in r["bad"]:
            print(f"    bad body: {b}")


if __name__ == "__main__":
    main()
