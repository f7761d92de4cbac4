"""Routing on a CUDA codebook: exact on the GPU against the key index's prefilter, side by side.

What the engine does when the model and codebook live on a GPU. Per codebook size, synthetic unit
keys shaped like the model's (``SyntheticKeys`` of bench/index_bench.py) go into a ``Codebook`` on
the device, and single queries are routed with the service's retriever (``HorenConfig()``) three
ways: (a) exact, every key on the GPU (what ``KeyIndex(use_gpu=True)`` gives when FAISS has no GPU
support: ``none-exact-on-device``); (b) the CPU index of this host (``KeyIndex(use_gpu=False)``:
PCA + 4-bit PQ fast scan), its candidates then routed on the GPU, which is what a faiss-cpu install
did on a CUDA host before; (c) with FAISS's GPU build only, its flat index on the GPU. Prints the
ms per query (CUDA-synchronised wall time), ratios of (b) and (c) over (a), how often (b) agrees
with (a), batched exact routing (64 queries) per query, the GPU memory, and a JSON summary last.

    python bench/gpu_routing.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from index_bench import SyntheticKeys, build_codebook, fmt, stats_ms  # noqa: E402

from horen_core.config import HorenConfig  # noqa: E402
from horen_core.retrieval import HopfieldRetriever  # noqa: E402
from horen_core.routing import KeysView  # noqa: E402
from service.index import KeyIndex  # noqa: E402


def timed(fn, queries: torch.Tensor, device: torch.device) -> list[float]:
    """Wall seconds of ``fn`` per query row (or per batch when ``queries`` is 3-d), synchronised."""
    for q in queries[:5]:
        fn(q if q.dim() == 2 else q[None])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = []
    for q in queries:
        t0 = time.perf_counter()
        r = fn(q if q.dim() == 2 else q[None])
        r.rows.cpu()  # the routed rows reach the host, as generation needs them
        out.append(time.perf_counter() - t0)
    return out


def synthetic_keys(syn: SyntheticKeys, n: int, device: torch.device, seed: int) -> torch.Tensor:
    """``SyntheticKeys``' geometry (shared direction, spectrum, clusters of 64) drawn by torch on
    ``device``: numpy takes minutes for a million keys on one core."""
    gen = torch.Generator(device).manual_seed(seed)
    mu, scale = (torch.from_numpy(a).to(device) for a in (syn.mu, syn.scale))
    centers = torch.from_numpy(syn.centers).to(device)
    out = torch.empty(n, syn.dim, device=device)
    for i in range(0, n, 65536):
        m = min(65536, n - i)
        x = F.normalize(torch.randn(m, syn.dim, generator=gen, device=device) * scale, dim=1)
        pick = torch.randint(0, len(centers), (m,), generator=gen, device=device)
        x = F.normalize(np.sqrt(1 - syn.cluster_share) * x + np.sqrt(syn.cluster_share) * centers[pick], dim=1)
        out[i : i + m] = F.normalize(float(syn.b) * x + float(syn.a) * mu, dim=1)
    return out


def run_size(n: int, args: argparse.Namespace, device: torch.device) -> dict:
    rng = np.random.default_rng(args.seed + 1)
    syn = SyntheticKeys(n, args.dim, seed=args.seed)
    t = time.perf_counter()
    keys = synthetic_keys(syn, n, device, args.seed)
    src = rng.choice(n, args.queries, replace=False)
    queries = torch.cat(
        [
            torch.from_numpy(syn.paraphrases(keys[src].cpu().numpy(), rng)),
            torch.from_numpy(syn.unrelated(args.queries // 4, rng)),
        ]
    )
    queries = queries[torch.randperm(len(queries), generator=torch.Generator().manual_seed(args.seed))].to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cb = build_codebook(keys, device)
    del keys
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"\n== {n} keys, dim {args.dim} on {device}: generated in {time.perf_counter() - t:.1f}s", flush=True)

    cfg = HorenConfig()
    retriever = HopfieldRetriever(
        cfg.hopfield_alpha, cfg.hopfield_beta, cfg.hopfield_steps, cfg.threshold, support=cfg.hopfield_support
    )
    order = cb.row_entry_ids
    indexes = {"cpu": KeyIndex(args.dim, min_keys=0, use_gpu=False)}
    gpu_index = KeyIndex(args.dim, min_keys=0, use_gpu=True)
    print(f"KeyIndex(use_gpu=True) here: {gpu_index.kind}")
    if gpu_index.on_gpu:
        indexes["faiss-gpu"] = gpu_index
    providers = {}
    view = KeysView(cb)
    for name, index in indexes.items():
        t = time.perf_counter()
        index.reset(view)
        print(f"build {name} {index.kind}: {time.perf_counter() - t:.1f}s", flush=True)
        providers[name] = lambda q, index=index: index.candidates(q, view, 0)

    def exact(q: torch.Tensor):
        return retriever.route(q, cb.keys, None, order=order)

    def prefiltered(name: str):
        provide = providers[name]
        return lambda q: retriever.route(q, cb.keys, provide(q), order=order)

    agreement = {}
    for name in providers:
        same = 0
        for i in range(0, len(queries), 64):
            qb = queries[i : i + 64]
            same += int((exact(qb).rows == prefiltered(name)(qb).rows).sum())
        agreement[name] = same / len(queries)
        print(f"agreement {name} prefilter vs exact: {agreement[name]:.4f} ({len(queries)} queries)")

    one = queries[: args.timed]
    ms = {"exact-gpu": stats_ms(timed(exact, one, device))}
    for name in providers:
        ms[f"{name}-prefilter"] = stats_ms(timed(prefiltered(name), one, device))
    batches = queries[: (len(queries) // 64) * 64].view(-1, 64, args.dim)[:20]
    batch_ms = stats_ms(timed(exact, batches, device))
    per_query_batched = batch_ms["mean"] / 64
    for name, st in ms.items():
        print(f"{name:20s} ms/query: {fmt(st)}")
    print(f"exact-gpu, batches of 64: {fmt(batch_ms)} ms per batch, {per_query_batched:.4f} ms per query")
    ratios = {name: st["mean"] / ms["exact-gpu"]["mean"] for name, st in ms.items() if name != "exact-gpu"}
    for name, r in ratios.items():
        print(f"ratio {name} / exact-gpu, mean wall time: {r:.2f}x")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    print(f"GPU memory peak: {peak:.2f} GiB")
    return {
        "keys": n,
        "ms": {k: {s: round(v, 4) for s, v in st.items()} for k, st in ms.items()},
        "batch64_ms_per_query": round(per_query_batched, 4),
        "ratio_over_exact_gpu": {k: round(v, 2) for k, v in ratios.items()},
        "agreement": {k: round(v, 5) for k, v in agreement.items()},
        "gpu_peak_gib": round(peak, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=1000, help="paraphrase queries (plus a quarter as many unrelated)")
    ap.add_argument("--timed", type=int, default=300, help="single queries timed per way")
    ap.add_argument("--device", default="cuda", help="cuda[:N]; cpu only to try the script")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (a dry run of the script)"
    print(f"device: {name}, torch {torch.__version__}, CPU threads {torch.get_num_threads()}")
    results = [run_size(int(s), args, device) for s in args.sizes.split(",")]
    print(json.dumps({"bench": "gpu_routing", "device": name, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
