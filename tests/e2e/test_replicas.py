"""Several replicas on one PostgreSQL database: edits and rollbacks made through one replica are
served by the others without retraining, concurrent edits all survive in one agreed order, and a
replica killed with SIGKILL under load loses nothing that was acknowledged."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from bench.common import TOKEN

pytestmark = [pytest.mark.server, pytest.mark.postgres, pytest.mark.real_model]

FACTS = [
    ("What voice type is Lola Beeth?", "baritone"),
    ("Which family does Ramalinaceae belong to?", "Carabidae"),
    ("What artist created Call the Doctor?", "Ken Duncan"),
    ("What country is Shmavon Shmavonyan from?", "Norway"),
    ("What company made Volvo B12M?", "Bethlehem Steel"),
    ("Which fictional universe is Chlorophyll Kid part of?", "Marvel Universe"),
    ("What is the name of Nebaioth father?", "Abraham"),
    ("Which corporation created USS Leedstown (APA-56)?", "Volvo Buses"),
]


def routed(c: httpx.Client, prompt: str) -> int | None:
    r = c.post("/generate", json={"prompt": prompt, "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()["edit_id"]


def eventually(check, timeout: float = 10.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def in_sync(*clients: httpx.Client) -> bool:
    infos = [c.get("/readyz") for c in clients]
    if any(r.status_code != 200 for r in infos):
        return False
    details = [r.json()["detail"] for r in infos]
    return len({(d["last_event_applied"], d["log_digest"], d["entries"]) for d in details}) == 1


def test_edit_and_rollback_propagate(make_server, pg_database_url):
    a = make_server(pg_database_url, "a").start()
    b = make_server(pg_database_url, "b").start()
    with a.client() as ca, b.client() as cb:
        prompt, target = FACTS[0]
        edit = ca.post("/edits", json={"prompt": prompt, "target": target}).json()
        assert eventually(lambda: routed(cb, prompt) == edit["id"]), "replica b never served the edit"
        r = cb.post(f"/admin/edits/{edit['id']}/rollback", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert eventually(lambda: routed(ca, prompt) is None), "replica a never saw the rollback"
        assert eventually(lambda: in_sync(ca, cb))


def test_concurrent_edits_survive_in_one_order(make_server, pg_database_url):
    a = make_server(pg_database_url, "a").start()
    b = make_server(pg_database_url, "b").start()
    acked: dict[int, str] = {}
    errors: list[str] = []

    def worker(server, facts):
        with server.client() as c:
            for p, t in facts:
                r = c.post("/edits", json={"prompt": p, "target": t})
                if r.status_code == 201:
                    acked[r.json()["id"]] = p
                else:
                    errors.append(r.text)

    threads = [
        threading.Thread(target=worker, args=(a, FACTS[0::2])),
        threading.Thread(target=worker, args=(b, FACTS[1::2])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(acked) == len(FACTS)
    with a.client() as ca, b.client() as cb:
        assert eventually(lambda: in_sync(ca, cb)), "replicas did not converge"
        listed = [e["id"] for e in ca.get("/edits", params={"limit": 100}).json()["items"]]
        assert sorted(acked) == listed
        answers = {p: (routed(ca, p), routed(cb, p)) for p in acked.values()}
        for edit_id, p in acked.items():
            assert answers[p] == (edit_id, edit_id)
        digest = ca.get("/readyz").json()["detail"]["log_digest"]
    a.stop()
    b.stop()
    a.start()
    b.start()
    with a.client() as ca, b.client() as cb:
        assert eventually(lambda: in_sync(ca, cb))
        assert ca.get("/readyz").json()["detail"]["log_digest"] == digest
        for edit_id, p in acked.items():
            assert routed(ca, p) == edit_id and routed(cb, p) == edit_id


def test_kill_9_under_load_loses_nothing_acknowledged(make_server, pg_database_url):
    a = make_server(pg_database_url, "a").start()
    b = make_server(pg_database_url, "b").start()
    acked: dict[int, str] = {}
    stop = threading.Event()

    def load():
        with httpx.Client(base_url=a.url, timeout=60) as c:
            for p, t in FACTS:
                if stop.is_set():
                    return
                try:
                    r = c.post("/edits", json={"prompt": p, "target": t})
                except httpx.HTTPError:
                    return  # the replica died mid-request: not acknowledged
                if r.status_code == 201:
                    acked[r.json()["id"]] = p

    th = threading.Thread(target=load)
    th.start()
    assert eventually(lambda: len(acked) >= 2, timeout=120, step=0.05)
    a.stop(kill=True)
    stop.set()
    th.join()
    with b.client() as cb:
        stored = {e["id"] for e in cb.get("/edits", params={"limit": 100}).json()["items"]}
        assert set(acked) <= stored
        assert eventually(lambda: cb.get("/readyz").status_code == 200)
        for edit_id, p in acked.items():
            assert eventually(lambda p=p, edit_id=edit_id: routed(cb, p) == edit_id)
    a.start()
    with a.client() as ca, b.client() as cb:
        assert eventually(lambda: in_sync(ca, cb))
        for edit_id, p in acked.items():
            assert routed(ca, p) == edit_id
