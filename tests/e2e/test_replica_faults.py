"""Replicas under faults, on the tiny model and a PostgreSQL cluster of the test's own: a replica
killed with SIGKILL during concurrent edits through both, and the database restarted while both
run. Nothing acknowledged is lost, the database's outage is a 503 database_unavailable without
internals while generation goes on from memory, and the replicas converge (same applied-log
digest) within seconds."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.e2e.test_replicas import eventually, in_sync

pytestmark = [pytest.mark.server, pytest.mark.faults]

CONVERGE_S = 10.0


def load(url: str, tag: str, acked: dict, codes: list, stop: threading.Event, n: int = 1000) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(n):
            if stop.is_set():
                return
            try:
                r = c.post("/edits", json={"prompt": f"Which river flows through {tag} {i}?", "target": f"Nile {i}"})
            except httpx.HTTPError:
                return  # the replica died
            codes.append(r.status_code)
            if r.status_code == 201:
                acked[r.json()["id"]] = r.json()


def listed(c: httpx.Client) -> dict[int, dict]:
    return {e["id"]: e for e in c.get("/edits", params={"limit": 1000}).json()["items"]}


def test_replica_killed_during_concurrent_edits(make_tiny_server, scratch_pg):
    a = make_tiny_server(scratch_pg.url, "a").start(timeout=180)
    b = make_tiny_server(scratch_pg.url, "b").start(timeout=180)
    acked: dict[int, dict] = {}
    codes: list[int] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=load, args=(s.url, s_name, acked, codes, stop)) for s, s_name in ((a, "a"), (b, "b"))
    ]
    for t in threads:
        t.start()
    assert eventually(lambda: len(acked) >= 4, timeout=120, step=0.05)
    a.stop(kill=True)
    assert eventually(lambda: len(acked) >= 8, timeout=120, step=0.05)  # b goes on alone
    stop.set()
    for t in threads:
        t.join(60)
    assert all(code == 201 for code in codes), codes
    a.start(timeout=180)
    with a.client() as ca, b.client() as cb:
        t0 = time.monotonic()
        assert eventually(lambda: in_sync(ca, cb), timeout=CONVERGE_S), "replicas did not converge"
        print(f"converged {time.monotonic() - t0:.2f} s after the killed replica was ready again")
        stored = listed(ca)
        assert set(acked) <= set(stored) and listed(cb) == stored


def test_database_restart_while_both_replicas_run(make_tiny_server, scratch_pg):
    a = make_tiny_server(scratch_pg.url, "a", db_retry_after="3").start(timeout=180)
    b = make_tiny_server(scratch_pg.url, "b").start(timeout=180)
    with a.client() as ca, b.client() as cb:
        first = ca.post("/edits", json={"prompt": "Which river flows through Cairo?", "target": "Paris"})
        assert first.status_code == 201, first.text
        assert eventually(lambda: in_sync(ca, cb))
        scratch_pg.stop("immediate")  # a crash, not a polite shutdown
        r = ca.post("/edits", json={"prompt": "Which river flows through Rome?", "target": "Tiber"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "database_unavailable" and r.headers["Retry-After"] == "3"
        for word in ("psycopg", "5432", str(scratch_pg.port), "127.0.0.1", "sqlalche", "Traceback"):
            assert word not in r.text
        assert cb.get("/edits").status_code == 503
        ready = ca.get("/readyz")
        assert ready.status_code == 503 and ready.json()["detail"]["reason"] == "database unavailable"
        g = cb.post("/generate", json={"prompt": "Which river flows through Cairo?", "max_new_tokens": 2})
        assert g.status_code == 200 and g.json()["edit_id"] == first.json()["id"]  # from memory
        scratch_pg.start()
        t0 = time.monotonic()
        assert eventually(lambda: in_sync(ca, cb), timeout=CONVERGE_S), "no recovery after the database came back"
        print(f"both ready {time.monotonic() - t0:.2f} s after the database came back")
        again = [
            c.post("/edits", json={"prompt": f"Which river flows through {n}?", "target": n})
            for c, n in ((ca, "Oslo"), (cb, "Lima"))
        ]
        assert [r.status_code for r in again] == [201, 201], [r.text for r in again]
        assert eventually(lambda: in_sync(ca, cb), timeout=CONVERGE_S)
        assert set(listed(ca)) == {first.json()["id"], *(r.json()["id"] for r in again)}
