"""Drive live servers (real processes, real model, loopback only) and print, from one run:

1. mixed load: concurrent clients mixing edits and generations -> throughput, p50/p99 latency;
2. batching gain: concurrent /generate throughput with batching (HOREN_MAX_BATCH=16) over
   one-at-a-time (HOREN_MAX_BATCH=1), same prompts, printed as a ratio;
3. streaming: --streams (8) concurrent clients of /v1/completions with `stream: true` -> time to
   first token p50/p99 and tokens/s, beside the same requests without streaming in the same run
   (time to the whole answer, tokens/s);
4. /generate latency with 10,000 active codebook entries over the latency with none (ratio): a
   server on those entries and two on an empty codebook, up at the same time, take turns (each in
   every place of the turn equally often). The second empty server is the control: its ratio to
   the first says how far two like server processes differ here (up to 5-10% on this VM, more than
   the entries cost; bench/generate_overhead.py measures that cost in one process). Printed: the
   entries over the first empty server, and over the mean of both.

The 10,000 entries are written straight into the database (random unit keys, small values, each
with its own edit row), then the server is restarted and rebuilds its codebook from the database
exactly as in production; unrelated prompts are not routed, so this measures retrieval overhead.

    .venv/bin/python bench/service_load.py [--entries 10000] [--clients 8] [--requests 12]
    .venv/bin/python bench/service_load.py --latency-only [--turns 24]   # only 4.
    .venv/bin/python bench/service_load.py --stream-only [--streams 8]   # only 3.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import Server  # noqa: E402  (the same server harness the e2e tests use)

PROMPTS = [
    "nq question: who sang the theme song for the fresh prince of bel air",
    "nq question: when did the first world war start",
    "nq question: what is the largest planet in the solar system",
    "nq question: who wrote the novel pride and prejudice",
    "nq question: where is the eiffel tower located",
    "nq question: how many players are on a football team",
    "nq question: what is the boiling point of water",
    "nq question: who painted the mona lisa",
]
EDITS = [
    ("What voice type is Lola Beeth?", "baritone"),
    ("Which family does Ramalinaceae belong to?", "Carabidae"),
    ("What artist created Call the Doctor?", "Ken Duncan"),
    ("What country is Shmavon Shmavonyan from?", "Norway"),
    ("What company made Volvo B12M?", "Bethlehem Steel"),
    ("What is the name of Nebaioth father?", "Abraham"),
]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def run_clients(url: str, clients: int, jobs_per_client: list[list[tuple[str, dict]]]) -> dict:
    lat: dict[str, list[float]] = {"generate": [], "edit": []}
    failures: list[str] = []
    lock = threading.Lock()

    def worker(jobs):
        with httpx.Client(base_url=url, timeout=300) as c:
            for kind, body in jobs:
                t0 = time.perf_counter()
                r = c.post("/generate" if kind == "generate" else "/edits", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code in (200, 201):
                        lat[kind].append(dt)
                    else:
                        failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=worker, args=(jobs_per_client[i],)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = sum(len(v) for v in lat.values())
    out = {"requests": done, "failures": len(failures), "seconds": round(wall, 2), "rps": round(done / wall, 2)}
    for kind, v in lat.items():
        if v:
            out[f"{kind}_p50_ms"] = round(pct(v, 0.5) * 1000, 1)
            out[f"{kind}_p99_ms"] = round(pct(v, 0.99) * 1000, 1)
    if failures:
        out["first_failure"] = failures[0]
    return out


def run_streams(url: str, streams: int, rounds: int, max_tokens: int, stream: bool) -> dict:
    """``streams`` concurrent clients, ``rounds`` /v1/completions requests each (greedy, every
    answer ``max_tokens`` long unless the model ends it). Streaming: time to the first text chunk
    and the whole answer; not streaming: the whole answer only. Tokens counted from ``usage``."""
    ttft: list[float] = []
    whole: list[float] = []
    per_stream_tps: list[float] = []
    tokens = 0
    failures: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        nonlocal tokens
        with httpx.Client(base_url=url, timeout=300) as c:
            for j in range(rounds):
                body = {"prompt": PROMPTS[(i + j) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
                t0 = time.perf_counter()
                first, used = None, 0
                if stream:
                    body |= {"stream": True, "stream_options": {"include_usage": True}}
                    with c.stream("POST", "/v1/completions", json=body) as r:
                        if r.status_code != 200:
                            with lock:
                                failures.append(f"{r.status_code} {r.read()[:200]!r}")
                            continue
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            ev = json.loads(line[6:])
                            if first is None and ev["choices"] and ev["choices"][0].get("text"):
                                first = time.perf_counter() - t0
                            if ev.get("usage"):
                                used = ev["usage"]["completion_tokens"]
                else:
                    r = c.post("/v1/completions", json=body)
                    if r.status_code != 200:
                        with lock:
                            failures.append(f"{r.status_code} {r.text[:200]}")
                        continue
                    used = r.json()["usage"]["completion_tokens"]
                dt = time.perf_counter() - t0
                with lock:
                    whole.append(dt)
                    tokens += used
                    if first is not None:
                        ttft.append(first)
                    if used:
                        per_stream_tps.append(used / dt)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    out = {
        "requests": len(whole),
        "failures": len(failures),
        "seconds": round(wall, 2),
        "tokens_per_s_total": round(tokens / wall, 2),
        "tokens_per_s_per_request_p50": round(statistics.median(per_stream_tps), 2) if per_stream_tps else None,
        "whole_answer_p50_ms": round(pct(whole, 0.5) * 1000, 1) if whole else None,
        "whole_answer_p99_ms": round(pct(whole, 0.99) * 1000, 1) if whole else None,
    }
    if stream:
        out["ttft_p50_ms"] = round(pct(ttft, 0.5) * 1000, 1) if ttft else None
        out["ttft_p99_ms"] = round(pct(ttft, 0.99) * 1000, 1) if ttft else None
    if failures:
        out["first_failure"] = failures[0]
    return out


def sequential_latency(urls: list[str], n: int, max_new_tokens: int) -> tuple[list[float], dict]:
    """Median /generate latency of each server, one request at a time, the servers taking turns on
    the same prompts (so that a machine slowing down meanwhile slows them all alike). Also says how
    alike the answers were: a latency ratio compares like with like only where the servers generated
    the same text and no edit routed a prompt (else the lengths, hence the work, may differ)."""
    times: list[list[float]] = [[] for _ in urls]
    answers: list[list[dict]] = [[] for _ in urls]
    clients = [httpx.Client(base_url=url, timeout=300) for url in urls]
    try:
        for i in range(n):
            turn = list(zip(clients, times, answers))
            k = i % len(turn)  # each server takes each place in the turn equally often
            for c, t, a in turn[k:] + turn[:k]:
                t0 = time.perf_counter()
                r = c.post("/generate", json={"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": max_new_tokens})
                assert r.status_code == 200, r.text
                t.append(time.perf_counter() - t0)
                a.append(r.json())
    finally:
        for c in clients:
            c.close()
    alike = {
        "same_text": sum(len({a[i]["text"] for a in answers}) == 1 for i in range(n)),
        "routed": [sum(x["edit_id"] is not None for x in a) for a in answers],
        "requests": n,
    }
    return [statistics.median(t[2:]) for t in times], alike  # the first calls warm caches


def synthetic_vectors(count: int, key_dim: int, value_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random unit keys and small values (seeded): entries that unrelated prompts do not
    route to, so that a comparison measures only the cost of having them."""
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(count, key_dim, generator=g), dim=-1)
    values = torch.randn(count, value_dim, generator=g) * 0.01
    return keys, values


def insert_synthetic_entries(db_url: str, count: int) -> None:
    from sqlalchemy import select

    from service.db import repository as repo
    from service.db.models import Codebook
    from service.db.session import make_engine, make_session_factory

    engine = make_engine(db_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as s:
        cb = s.scalars(select(Codebook)).one()
        keys, values = synthetic_vectors(count, cb.key_dim, cb.value_dim)
        for i in range(count):
            repo.insert_edit(
                s,
                cb.id,
                prompt=f"synthetic fact {i}?",
                target=f"answer {i}",
                metadata={"synthetic": True},
                entry_id=None,
                created_entry=True,
                steps=0,
                loss=0.0,
                train_ms=0.0,
                answer_ids=[100 + i % 1000],
                key=repo.tensor_to_bytes(keys[i]),
                value=repo.tensor_to_bytes(values[i]),
                expected_entry_version=None,
            )
    engine.dispose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=12, help="requests per client in each concurrent phase")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="HOREN_DEVICE of the servers (cpu, cuda)")
    ap.add_argument("--model", default=None, help="HOREN_MODEL of the servers (default: the bundled SmolLM2)")
    ap.add_argument("--turns", type=int, default=24, help="requests to each server in the latency comparison")
    ap.add_argument("--latency-only", action="store_true", help="only the latency comparison (4.)")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streaming clients (3.)")
    ap.add_argument("--stream-rounds", type=int, default=3, help="requests per streaming client (3.)")
    ap.add_argument("--stream-only", action="store_true", help="only the streaming comparison (3.)")
    args = ap.parse_args()
    where = {"device": args.device, "model": args.model}
    tmp = Path(tempfile.mkdtemp(prefix="horen-load-"))
    db_url = f"sqlite:///{tmp / 'horen.db'}"
    summary: dict = {"device": args.device, "model": args.model or "bundled SmolLM2-135M-Instruct"}

    if args.stream_only:
        stream_phase(args, db_url, tmp, where, summary)
        print_streams(summary)
        print(json.dumps(summary))
        return 0
    if args.latency_only:
        first = Server(db_url, tmp / "data", tmp / "server.log", **where)
        first.start()  # creates the database and its codebook row
        first.stop()
    else:
        load_phases(args, db_url, tmp, where, summary)
        stream_phase(args, db_url, tmp, where, summary)
    latency_phase(args, db_url, tmp, where, summary)
    print_streams(summary)
    for name in ("mixed", "generate_batched", "generate_one_at_a_time"):
        if name in summary:
            print(f"{name.replace('_', ' ')}: {json.dumps(summary[name])}")
    if "batching_gain_ratio" in summary:
        print(f"batching gain ratio (batched rps / one-at-a-time rps): {summary['batching_gain_ratio']}")
    print(f"generate latency ratio ({summary['entries_loaded']} entries / none): {summary['entries_latency_ratio']}")
    print(f"  control: a second server with no entries over the first: {summary['control_latency_ratio']}")
    print(f"  the entries over the mean of both servers with none: {summary['entries_over_both_empty_ratio']}")
    la = summary["latency_answers"]
    print(
        f"  same text from the servers for {la['same_text']} of {la['requests']} prompts; routed by an edit: "
        f"{la['routed_with_entries']} with the entries, {la['routed_empty']} without"
    )
    print(json.dumps(summary))
    return 0


def stream_phase(args: argparse.Namespace, db_url: str, tmp: Path, where: dict, summary: dict) -> None:
    """3.: the same requests streamed and not, one server, one run (non-streaming first, then
    streaming, then non-streaming again, so that a machine slowing down shows)."""
    server = Server(db_url, tmp / "data", tmp / "server-stream.log", **where)
    server.start()
    try:
        run = (server.url, args.streams, args.stream_rounds, args.max_new_tokens)
        run_streams(*run[:2], 1, run[3], stream=True)  # warm-up
        summary["v1_not_streaming"] = run_streams(*run, stream=False)
        summary["v1_streaming"] = run_streams(*run, stream=True)
        summary["v1_not_streaming_again"] = run_streams(*run, stream=False)
    finally:
        server.stop()


def print_streams(summary: dict) -> None:
    if "v1_streaming" not in summary:
        return
    st, ns, ns2 = summary["v1_streaming"], summary["v1_not_streaming"], summary["v1_not_streaming_again"]
    print(f"streaming /v1/completions: {json.dumps(st)}")
    print(f"  not streaming, before: {json.dumps(ns)}")
    print(f"  not streaming, after:  {json.dumps(ns2)}")
    print(
        f"  time to first token p50/p99 {st['ttft_p50_ms']}/{st['ttft_p99_ms']} ms vs whole answer not streamed "
        f"p50/p99 {ns['whole_answer_p50_ms']}/{ns['whole_answer_p99_ms']} ms; tokens/s streamed "
        f"{st['tokens_per_s_total']} vs not {ns['tokens_per_s_total']}/{ns2['tokens_per_s_total']}"
    )


def load_phases(args: argparse.Namespace, db_url: str, tmp: Path, where: dict, summary: dict) -> None:
    """1. and 2.: concurrent batched generation, mixed load, then one-at-a-time generation."""
    batched = Server(db_url, tmp / "data", tmp / "server.log", **where)
    batched.start()
    try:
        gen_jobs = [
            [
                ("generate", {"prompt": PROMPTS[(i + j) % len(PROMPTS)], "max_new_tokens": args.max_new_tokens})
                for j in range(args.requests)
            ]
            for i in range(args.clients)
        ]
        summary["generate_batched"] = run_clients(batched.url, args.clients, gen_jobs)
        mixed = []
        for i in range(args.clients):
            jobs = []
            for j in range(args.requests):
                if j % 4 == 0 and (i * args.requests + j) // 4 < len(EDITS) * 4:
                    p, t = EDITS[(i + j) % len(EDITS)]
                    jobs.append(("edit", {"prompt": p, "target": t}))
                else:
                    jobs.append(
                        ("generate", {"prompt": PROMPTS[(i + j) % len(PROMPTS)], "max_new_tokens": args.max_new_tokens})
                    )
            mixed.append(jobs)
        summary["mixed"] = run_clients(batched.url, args.clients, mixed)
    finally:
        batched.stop()

    single = Server(db_url, tmp / "data", tmp / "server-b1.log", **where)
    import os

    os.environ["HOREN_MAX_BATCH"] = "1"
    single.start()
    try:
        summary["generate_one_at_a_time"] = run_clients(single.url, args.clients, gen_jobs)
    finally:
        single.stop()
        os.environ.pop("HOREN_MAX_BATCH", None)
    summary["batching_gain_ratio"] = round(
        summary["generate_batched"]["rps"] / summary["generate_one_at_a_time"]["rps"], 2
    )


def latency_phase(args: argparse.Namespace, db_url: str, tmp: Path, where: dict, summary: dict) -> None:
    """3.: a server restarted on the entries, and two with an empty codebook (the second a control
    for how much two like servers differ), up at once, taking turns."""
    insert_synthetic_entries(db_url, args.entries)
    big = Server(db_url, tmp / "data", tmp / "server-big.log", **where)
    t0 = time.perf_counter()
    big.start()
    summary["restart_to_ready_s_with_entries"] = round(time.perf_counter() - t0, 1)
    # the baseline: a server with an empty codebook (its own database), up at the same time
    empty = Server(f"sqlite:///{tmp / 'empty.db'}", tmp / "data", tmp / "server-empty.log", **where)
    control = Server(f"sqlite:///{tmp / 'control.db'}", tmp / "data", tmp / "server-control.log", **where)
    try:
        with httpx.Client(base_url=big.url, timeout=60) as c:
            summary["entries_loaded"] = c.get("/readyz").json()["detail"]["entries"]
        empty.start()
        control.start()
        (base_latency, big_latency, control_latency), alike = sequential_latency(
            [empty.url, big.url, control.url], args.turns, args.max_new_tokens
        )
    finally:
        control.stop()
        empty.stop()
        big.stop()
    summary["generate_latency_empty_ms"] = round(base_latency * 1000, 1)
    summary["generate_latency_with_entries_ms"] = round(big_latency * 1000, 1)
    summary["entries_latency_ratio"] = round(big_latency / base_latency, 3)
    summary["control_latency_ratio"] = round(control_latency / base_latency, 3)
    summary["entries_over_both_empty_ratio"] = round(2 * big_latency / (base_latency + control_latency), 3)
    summary["latency_answers"] = {
        "same_text": alike["same_text"],
        "requests": alike["requests"],
        "routed_empty": alike["routed"][0] + alike["routed"][2],
        "routed_with_entries": alike["routed"][1],
    }


if __name__ == "__main__":
    raise SystemExit(main())
