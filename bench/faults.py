"""Faults against real server processes, and what clients see. Per scenario: requests made,
acknowledged (201), lost (acknowledged but not listed afterwards), 5xx answers (503s counted apart
from any other 5xx, which must be 0), and the time to recover (from the fault's end to the first
acknowledged edit, and to /readyz 200 on every server).

Scenarios: kill -9 loops on SQLite and on PostgreSQL; a database stop/start under two replicas;
a read-only SQLite file; a full disk under the SQLite file. PostgreSQL is a cluster of the
script's own (initdb/pg_ctl on a free port, tests/e2e/scratch_pg.py), never the machine's. The
read-only and full-disk scenarios need root (a read-only bind mount, a small tmpfs).

    .venv/bin/python bench/faults.py [--kills 10] [--outage 3] [--model PATH]

Without --model it serves the tiny random model of the tests (fast to start and to edit).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.conftest import TINY_HOREN, Server  # noqa: E402
from tests.e2e.scratch_pg import ScratchPostgres, unavailable_reason  # noqa: E402


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.acked: dict[int, float] = {}  # edit id -> when acknowledged
        self.s503 = 0
        self.s5xx = 0
        self.other: dict[int, int] = {}

    def add(self, r: httpx.Response | None) -> None:
        with self.lock:
            self.requests += 1
            if r is None:
                return
            if r.status_code == 201:
                self.acked[r.json()["id"]] = time.monotonic()
            elif r.status_code == 503:
                self.s503 += 1
            elif r.status_code >= 500:
                self.s5xx += 1
            else:
                self.other[r.status_code] = self.other.get(r.status_code, 0) + 1


def edit_load(url: str, tag: str, tally: Tally, stop: threading.Event, pause: float = 0.0) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = c.post("/edits", json={"prompt": f"Which river flows through {tag} {i}?", "target": f"Nile {i}"})
            except httpx.HTTPError:
                tally.add(None)  # the server went away mid-request: not acknowledged
                if stop.wait(0.2):
                    return
                continue
            tally.add(r)
            if pause:
                stop.wait(pause)


def listed_ids(url: str) -> set[int]:
    ids, offset = set(), 0
    with httpx.Client(base_url=url, timeout=30) as c:
        while True:
            page = c.get("/edits", params={"limit": 1000, "offset": offset}).json()
            ids |= {e["id"] for e in page["items"]}
            offset += 1000
            if offset >= page["total"]:
                return ids


def wait_ready(urls: list[str], timeout: float = 120) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if all(httpx.get(f"{u}/readyz", timeout=2).status_code == 200 for u in urls):
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return float("nan")


def make_server(args, db_url: str, root: Path, name: str) -> Server:
    env = {"HOREN_SYNC_INTERVAL": "0.5"}
    if args.tiny:
        env["HOREN_HOREN"] = TINY_HOREN
    return Server(db_url, root / f"data-{name}", root / f"{name}.log", model=args.model, env=env)


def row(name: str, tally: Tally, lost: int, recover: str) -> dict:
    return {
        "scenario": name,
        "requests": tally.requests,
        "acknowledged": len(tally.acked),
        "lost": lost,
        "503": tally.s503,
        "other 5xx": tally.s5xx,
        "recover": recover,
    }


def kill_loop(args, name: str, db_url: str, root: Path) -> dict:
    rng = random.Random(18)
    server = make_server(args, db_url, root, name)
    tally = Tally()
    restarts = []
    server.start(timeout=300)
    for k in range(args.kills):
        stop = threading.Event()
        threads = [threading.Thread(target=edit_load, args=(server.url, f"{k}{t}", tally, stop)) for t in "ab"]
        for t in threads:
            t.start()
        n = len(tally.acked)
        deadline = time.monotonic() + 60
        while len(tally.acked) == n and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.8))
        server.stop(kill=True)
        t_kill = time.monotonic()
        stop.set()
        for t in threads:
            t.join(30)
        server.start(timeout=300)
        restarts.append(time.monotonic() - t_kill)
    lost = len(set(tally.acked) - listed_ids(server.url))
    server.stop()
    return row(name, tally, lost, f"restart to ready {min(restarts):.1f}-{max(restarts):.1f} s ({args.kills} kills)")


def recovery_after(tally: Tally, t_end: float, urls: list[str]) -> str:
    ready = wait_ready(urls)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(t > t_end for t in tally.acked.values()):
        time.sleep(0.02)
    after = [t - t_end for t in tally.acked.values() if t > t_end]
    first = f"{min(after):.2f} s" if after else "never"
    return f"first 201 {first}, all /readyz 200 {ready:.2f} s"


def db_outage(args, root: Path) -> dict:
    pg = ScratchPostgres().init()
    pg.start()
    try:
        servers = [make_server(args, pg.url, root, f"pg-outage-{n}") for n in "ab"]
        for s in servers:
            s.start(timeout=300)
        tally, stop = Tally(), threading.Event()
        threads = [threading.Thread(target=edit_load, args=(s.url, s.url[-5:], tally, stop, 0.05)) for s in servers]
        for t in threads:
            t.start()
        time.sleep(args.outage)
        pg.stop("immediate")
        time.sleep(args.outage)
        pg.start()
        t_end = time.monotonic()
        recover = recovery_after(tally, t_end, [s.url for s in servers])
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        lost = len(set(tally.acked) - listed_ids(servers[0].url))
        digests = {httpx.get(f"{s.url}/readyz").json()["detail"].get("log_digest") for s in servers}
        for s in servers:
            s.stop()
        return row("postgres stop/start, 2 replicas", tally, lost, f"{recover}; digests agree: {len(digests) == 1}")
    finally:
        pg.destroy()


def sqlite_fault(args, root: Path, kind: str) -> dict:
    data = root / f"sqlite-{kind}"
    data.mkdir()
    mounted = False
    if kind == "full":
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(data)]).returncode == 0
        if not mounted:
            return {"scenario": "full disk (SQLite)", "skipped": "cannot mount a tmpfs here"}
    server = make_server(args, f"sqlite:///{data / 'horen.db'}", root, f"sqlite-{kind}")
    try:
        server.start(timeout=300)
        tally, stop = Tally(), threading.Event()
        th = threading.Thread(target=edit_load, args=(server.url, kind, tally, stop, 0.05))
        th.start()
        time.sleep(args.outage)
        before = set(tally.acked)
        if kind == "read-only":
            ok = subprocess.run(["mount", "--bind", str(data), str(data)]).returncode == 0
            ok = ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(data)]).returncode == 0
            if not ok:
                stop.set()
                th.join()
                return {"scenario": "read-only SQLite", "skipped": "cannot remount read-only here"}
        else:
            with open(data / "filler", "wb", buffering=0) as f:
                try:
                    while f.write(b"\1" * 65536):
                        pass
                except OSError:
                    pass
        t_fault = time.monotonic()
        time.sleep(args.outage)
        during = {i for i, t in tally.acked.items() if t > t_fault + 0.5}  # after in-flight commits settle
        if kind == "read-only":
            subprocess.run(["umount", str(data)], check=True)
        else:
            (data / "filler").unlink()
        t_end = time.monotonic()
        recover = recovery_after(tally, t_end, [server.url])
        time.sleep(0.5)
        stop.set()
        th.join(30)
        lost = len(set(tally.acked) - listed_ids(server.url))
        server.stop()
        name = "read-only SQLite file" if kind == "read-only" else "full disk under SQLite"
        return row(name, tally, lost, f"{recover}; 201s while faulted: {len(during)} (of {len(before)} before)")
    finally:
        server.stop(kill=True)
        if mounted:
            subprocess.run(["umount", "-l", str(data)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--outage", type=float, default=3.0, help="seconds of load before, and length of, each fault")
    ap.add_argument("--model", default=None, help="a model folder or GGUF; default: the tests' tiny random model")
    ap.add_argument("--only", default="", help="comma-separated: kill-sqlite, kill-postgres, db, read-only, full")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="horen-faults-"))
    args.tiny = args.model is None
    if args.tiny:
        from tests.service.conftest import build_tiny_model_dir

        args.model = str(build_tiny_model_dir(root / "tiny", max_positions=256, chat=True))
    want = set(filter(None, args.only.split(","))) or {"kill-sqlite", "kill-postgres", "db", "read-only", "full"}
    rows = []
    if "kill-sqlite" in want:
        rows.append(kill_loop(args, "kill -9 loop, SQLite", f"sqlite:///{root / 'kill.db'}", root))
    pg_missing = unavailable_reason()
    for scenario in ("kill-postgres", "db"):
        if scenario in want and pg_missing:
            rows.append({"scenario": scenario, "skipped": pg_missing})
    if "kill-postgres" in want and not pg_missing:
        pg = ScratchPostgres().init()
        pg.start()
        try:
            rows.append(kill_loop(args, "kill -9 loop, PostgreSQL", pg.url, root))
        finally:
            pg.destroy()
    if "db" in want and not pg_missing:
        rows.append(db_outage(args, root))
    for kind in ("read-only", "full"):
        if kind in want:
            rows.append(sqlite_fault(args, root, kind) if os.geteuid() == 0 else {"scenario": kind, "skipped": "root"})
    print(f"\nfaults, model {'tiny random' if args.tiny else args.model}, outage {args.outage} s; logs in {root}")
    cols = ["scenario", "requests", "acknowledged", "lost", "503", "other 5xx", "recover"]
    for r in rows:
        if "skipped" in r:
            print(f"{r['scenario']}: skipped ({r['skipped']})")
        else:
            print(" | ".join(f"{c}: {r[c]}" for c in cols))


if __name__ == "__main__":
    main()
