"""In-process cost of routing over a full codebook during /generate, without the server around it.

One editor, one model: its codebook holds ``--entries`` random unit keys (unrelated prompts do not
clear the threshold against them, so every generation is the same text either way). Single prompts
are generated alternately with routing (over every key) and without it
(``editor.unedited()``: the layer passes through), and the routing call alone is timed over the same
queries; the ratio of the medians is the latency cost of the entries where nothing is routed.
Routing goes through the service's ``KeyIndex`` with its defaults, as ``horen serve`` routes (from
4,096 keys on the CPU; none on a GPU without FAISS's GPU build); ``--no-index`` routes exhaustively.

    .venv/bin/python bench/generate_overhead.py [--entries 10000] [--device cpu]
    python3 bench/generate_overhead.py --random-init llama-135m --device cuda   # a GPU host
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from edit_speed import RANDOM_SHAPES, bench_model  # noqa: E402
from service_load import PROMPTS, synthetic_vectors  # noqa: E402

from horen_core.editor import HorenEditor  # noqa: E402
from service.index import KeyIndex  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=10000)
    p.add_argument("--rounds", type=int, default=24, help="generations of each kind, alternating")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--model", default=None, help="local HF folder or GGUF file (default: bundled SmolLM2)")
    p.add_argument("--random-init", choices=sorted(RANDOM_SHAPES), default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--converted-dir", default=str(REPO / ".horen" / "converted"))
    p.add_argument("--no-index", action="store_true", help="route exhaustively, without the service's KeyIndex")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    model, tokenizer = bench_model(args.random_init, args.model, device, args.converted_dir)
    editor = HorenEditor(model, tokenizer)
    cb = editor.codebook
    keys, values = synthetic_vectors(args.entries, cb.key_dim, cb.value_dim)
    ids = list(range(1, args.entries + 1))
    cb.add_many(ids, keys, values, [[100]] * args.entries, ids)
    index_kind = "none (--no-index)"
    if not args.no_index:
        index = KeyIndex(cb.key_dim, use_gpu=device.type == "cuda")
        editor.attach_index(index)
        index_kind = index.kind

    times: dict[str, list[float]] = {"routed": [], "pass_through": []}
    same, routed_any = 0, 0
    for i in range(args.rounds + 2):  # the first two of each warm caches and are dropped
        prompt = PROMPTS[i % len(PROMPTS)]
        out = {}
        for kind, edited in (
            (("routed", True), ("pass_through", False)) if i % 2 else (("pass_through", False), ("routed", True))
        ):
            _sync(device)
            t0 = time.perf_counter()
            with contextlib.nullcontext() if edited else editor.unedited():
                out[kind] = editor.generate([prompt], args.max_new_tokens)[0]
            _sync(device)
            if i >= 2:
                times[kind].append(time.perf_counter() - t0)
        if i >= 2:
            same += out["routed"].text == out["pass_through"].text
            routed_any += out["routed"].entry_id is not None

    g = torch.Generator().manual_seed(1)
    queries = torch.nn.functional.normalize(torch.randn(32, cb.key_dim, generator=g), dim=-1).to(cb.device)
    route_ms = []
    for q in queries:
        _sync(device)
        t0 = time.perf_counter()
        editor.routing.route(q[None])
        _sync(device)
        route_ms.append((time.perf_counter() - t0) * 1000)

    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    result = {
        "device": str(device),
        "model": args.random_init or args.model or "bundled SmolLM2-135M-Instruct",
        "entries": len(cb),
        "index": index_kind,
        "max_new_tokens": args.max_new_tokens,
        "generate_ms_median": {k: round(v, 1) for k, v in med.items()},
        "ratio_routed_over_pass_through": round(med["routed"] / med["pass_through"], 3),
        "route_one_query_ms_median": round(statistics.median(route_ms[4:]), 3),
        "same_text": f"{same}/{args.rounds}",
        "routed_by_an_entry": routed_any,
    }
    print(
        f"{result['entries']} entries on {device} (index {index_kind}): generate {med['routed']:.1f} ms routed vs "
        f"{med['pass_through']:.1f} ms passing through (ratio {result['ratio_routed_over_pass_through']}); "
        f"routing one query {result['route_one_query_ms_median']} ms; same text {result['same_text']}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
