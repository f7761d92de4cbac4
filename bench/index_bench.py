"""KeyIndex prefiltered routing against exact routing, side by side in one run, per codebook size.

For each size a ``Codebook`` of synthetic unit keys is built, then a ``KeyIndex`` attached to a
``Router`` over it indexes it (build time). Queries go through the editor's routing with the same
retriever, built from ``HorenConfig()`` as the service builds it (alpha 0.1, beta 20, 2 steps,
threshold 0.8): (a) prefiltered, the index's ``candidates`` then refinement over them; (b) exact,
over all keys. Prints the mean / p50 / p99 ms of single-query routing for both, a ``ratio`` line
(exact mean / prefiltered mean), the agreement of the routed entry (a row, or none) per query kind,
how much keeping the index current after one edit costs (its ``CodebookChange``), and, last, a
one-line JSON summary.

The synthetic keys copy the geometry measured on the real edited layer (SmolLM2-135M, layer 24
down_proj, ZsRE prompts): a shared direction giving unrelated keys a mean cosine of ~0.4, a power
law spectrum (exponent 0.9) around it, and clusters of 64 keys sharing 40% of their residual, like
prompts built from one template. Paraphrase queries sit at cosine U(0.85, 0.95) from a key, their
noise drawn from the same spectrum; unrelated queries come from fresh clusters. ``--real`` also
puts real keys of the bundled model in place of synthetic ones (ZsRE dev questions, CounterFact
prompts, ZsRE training questions; up to half of the codebook, ``--real-fraction``) and asks with the ZsRE ``rephrase``
and CounterFact ``rephrase_prompt`` (should route to their own key) and the ``loc`` /
``locality_prompt`` prompts (should not) (see ``RealSet``). Read agreement on the real kinds:
a synthetic paraphrase has a median of 1 key within 0.1 cosine of its best, a CounterFact rephrase
80 of the 20,640 real keys (ZsRE rephrase 2), and those agree far less under the same index.
By default (``--fill real-shaped``) the other keys of a ``--real`` run are drawn like the real keys
(``RealShapedKeys``: a Gaussian with their mean and covariance, normalised), as a codebook of a
million real edits would be: the index's PCA then sees the real keys' directions, and real queries
meet realistically dense neighbourhoods (the hard case). ``--fill spectrum`` uses ``SyntheticKeys``.
The first ``--real`` run computes the real keys and queries (~24K prompts, about 4 minutes) into
``.horen/``; later runs load them.

Timings are on whatever else the machine runs; compare the two columns of one run only.

    .venv/bin/python bench/index_bench.py --sizes 2000,5000 --dim 256 --queries 300
    .venv/bin/python bench/index_bench.py --sizes 10000,100000,1000000 --real
    .venv/bin/python bench/index_bench.py --sizes 1000000 --real --fill spectrum
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from horen_core.codebook import Codebook  # noqa: E402
from horen_core.config import HorenConfig  # noqa: E402
from horen_core.retrieval import HopfieldRetriever  # noqa: E402
from horen_core.routing import Router  # noqa: E402
from service.index import KeyIndex  # noqa: E402

DATA = REPO.parent / "shared" / "data"  # ../shared beside the checkout
ZSRE = DATA / "zsre" / "zsre_edit_dev.json"
_CHUNK = 65536


def at_cosine(keys: np.ndarray, noise: np.ndarray, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """Unit queries at a cosine drawn from U(lo, hi) from their ``keys``, displaced along ``noise``
    (made orthogonal to each key)."""
    noise = noise - (noise * keys).sum(axis=1, keepdims=True) * keys
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = rng.uniform(lo, hi, (len(keys), 1)).astype(np.float32)
    return (cos * keys + np.sqrt(1 - cos * cos) * noise).astype(np.float32)


class SyntheticKeys:
    """Unit keys shaped like the edited layer's real queries (see the module docstring)."""

    def __init__(self, n: int, dim: int, seed: int = 0, shared: float = 0.40, gamma: float = 0.9) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.seed = dim, seed
        self.cluster_share = 0.4  # of a key's residual direction, shared with its cluster
        self.a, self.b = np.float32(np.sqrt(shared)), np.float32(np.sqrt(1 - shared))
        mu = rng.standard_normal(dim).astype(np.float32)
        self.mu = mu / np.linalg.norm(mu)
        scale = (np.arange(1, dim + 1) ** (-gamma / 2)).astype(np.float32)
        rng.shuffle(scale)
        self.scale = scale
        self.centers = self._residuals(rng, max(1, n // 64))

    def _residuals(self, rng: np.random.Generator, m: int) -> np.ndarray:
        x = rng.standard_normal((m, self.dim), dtype=np.float32)
        x *= self.scale
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def _keys(self, rng: np.random.Generator, m: int, centers: np.ndarray) -> np.ndarray:
        x = self._residuals(rng, m)
        x *= np.float32(np.sqrt(1 - self.cluster_share))
        x += np.float32(np.sqrt(self.cluster_share)) * centers[rng.integers(0, len(centers), m)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x *= self.b
        x += self.a * self.mu
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def fill(self, out: torch.Tensor) -> None:
        """Write len(out) keys in place, chunk by chunk (no full-size temporaries)."""
        for i in range(0, out.shape[0], _CHUNK):
            m = min(_CHUNK, out.shape[0] - i)
            out[i : i + m] = torch.from_numpy(self._keys(np.random.default_rng((self.seed, i)), m, self.centers))

    def paraphrases(self, keys: np.ndarray, rng: np.random.Generator, lo: float = 0.85, hi: float = 0.95) -> np.ndarray:
        return at_cosine(keys, rng.standard_normal(keys.shape, dtype=np.float32) * self.scale, rng, lo, hi)

    def unrelated(self, m: int, rng: np.random.Generator) -> np.ndarray:
        return self._keys(rng, m, self._residuals(rng, max(1, m // 8)))


class RealShapedKeys:
    """Unit keys drawn from a Gaussian with the mean and covariance of the model's real keys, then
    normalised: fillers that share the real keys' principal directions and density, as a codebook of
    a million real edits would (``SyntheticKeys`` put their variance on random axes, so a PCA fitted on
    them misses the real keys' directions). Same interface as ``SyntheticKeys``."""

    def __init__(self, real_keys: torch.Tensor, seed: int = 0) -> None:
        x = real_keys.double()
        mu = x.mean(dim=0)
        x = x - mu
        vals, vecs = torch.linalg.eigh(x.T @ x / len(x))
        self.root = (vecs * vals.clamp(min=0).sqrt()).float()  # cov = root @ root.T
        self.mu = mu.float()
        self.seed = seed

    def _draw(self, gen: torch.Generator, m: int) -> torch.Tensor:
        z = torch.randn(m, self.root.shape[0], generator=gen) @ self.root.T
        return torch.nn.functional.normalize(z + self.mu, dim=1)

    def fill(self, out: torch.Tensor) -> None:
        for i in range(0, out.shape[0], _CHUNK):
            m = min(_CHUNK, out.shape[0] - i)
            out[i : i + m] = self._draw(torch.Generator().manual_seed(self.seed * 1_000_003 + i), m)

    def paraphrases(self, keys: np.ndarray, rng: np.random.Generator, lo: float = 0.85, hi: float = 0.95) -> np.ndarray:
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        noise = (torch.randn(len(keys), self.root.shape[0], generator=gen) @ self.root.T).numpy()
        return at_cosine(keys, noise, rng, lo, hi)

    def unrelated(self, m: int, rng: np.random.Generator) -> np.ndarray:
        return self._draw(torch.Generator().manual_seed(int(rng.integers(2**31))), m).numpy()


class RealSet:
    """Keys and queries of the bundled model on real editing prompts, as the editor computes them.

    Keys, in this order: the ZsRE dev ``src`` questions, CounterFact ``prompt``s, questions of the
    ZsRE training file. Queries: ZsRE ``rephrase`` and CounterFact ``rephrase_prompt`` (each should
    route to its own record's key, ``own`` its index in ``keys``), ZsRE ``loc`` and CounterFact
    ``locality_prompt`` (should route nowhere). The keyed records come first, so any leading
    ``len(keys)`` >= ``min_keys`` holds every key a query asks for."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.keys = tensors["keys"]
        self.queries = {k: v for k, v in tensors.items() if k != "keys" and not k.endswith("_own")}
        self.own = {k[: -len("_own")]: v for k, v in tensors.items() if k.endswith("_own")}
        self.min_keys = int(max(v.max() for v in self.own.values())) + 1

    @classmethod
    def load(cls, cf_records: int, extra_keys: int) -> RealSet:
        """From the cache under .horen, else computed (minutes; batched, right-padded passes give
        the one-prompt queries to 1e-6)."""
        cache = REPO / ".horen" / f"bench_real_v2_{cf_records}_{extra_keys}.pt"
        if cache.exists():
            return cls(torch.load(cache))
        zsre = json.loads(ZSRE.read_text())
        cf = json.loads((DATA / "counterfact" / "counterfact-train.json").read_text())
        train = [
            line.split("\t")[0] for line in (DATA / "zsre" / "zsre_mend_train_en_10000.tsv").read_text().splitlines()
        ]
        asked = cf[:cf_records]
        keyed = [r["src"] for r in zsre] + [r["prompt"] for r in cf]
        keys = (keyed + train)[: len(keyed) + extra_keys] if extra_keys else keyed
        prompts = {
            "keys": keys,
            "zsre_rephrase": [r["rephrase"] for r in zsre],
            "zsre_loc": [r["loc"] for r in zsre],
            "cf_rephrase": [r["rephrase_prompt"] for r in asked],
            "cf_loc": [r["locality_prompt"] for r in asked],
        }
        tensors = {k: unit_queries(v) for k, v in prompts.items()}
        tensors["zsre_rephrase_own"] = torch.arange(len(zsre))
        tensors["cf_rephrase_own"] = torch.arange(len(zsre), len(zsre) + len(asked))
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, cache)
        return cls(tensors)


def unit_queries(prompts: list[str], batch: int = 64) -> torch.Tensor:
    """The editor's unit query of each prompt, computed in right-padded batches of similar length
    (causal attention: padding after a prompt changes nothing before it)."""
    from horen_core.layer import compute_queries

    editor = _editor()
    cfg = editor.config
    encoded = [editor.encode_prompt(p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = torch.empty(len(prompts), editor.codebook.key_dim)
    with torch.no_grad():
        for i in range(0, len(order), batch):
            rows = order[i : i + batch]
            width = max(len(encoded[r]) for r in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(encoded[r])] = torch.tensor(encoded[r])
                mask[j, : len(encoded[r])] = 1
            x = editor.trainer.lower_pass(ids)["x"]
            out[rows] = compute_queries(x, mask, cfg.query_strategy, cfg.query_fraction).float().cpu()
    return out


@functools.cache
def _editor():
    """The bundled model's editor, loaded once per run."""
    from horen_core import HorenEditor, load_model

    model, tokenizer = load_model(None, device="cpu", converted_dir=REPO / ".horen" / "converted")
    return HorenEditor(model, tokenizer, HorenConfig())


def build_codebook(keys: torch.Tensor, device: torch.device | str = "cpu") -> Codebook:
    """A codebook of these keys (1-dim values) on ``device``, in one step."""
    n, d = keys.shape
    cb = Codebook(d, 1, device)
    ids = torch.arange(1, n + 1, dtype=torch.int64)
    cb.load_state_dict(
        {
            "keys": keys,
            "values": torch.zeros(n, 1),
            "entry_ids": ids,
            "answers": ids,
            "answer_offsets": torch.arange(n + 1, dtype=torch.int64),
            "version_entry": ids,
            "version_edit": ids,
            "version_key_index": torch.full((n,), -1, dtype=torch.int64),
            "version_value_index": torch.full((n,), -1, dtype=torch.int64),
            "version_keys": torch.zeros(0, d),
            "version_values": torch.zeros(0, 1),
            "next_entry_id": torch.tensor([n + 1]),
        }
    )
    return cb


def fmt(st: dict[str, float]) -> str:
    return f"mean {st['mean']:.3f} p50 {st['p50']:.3f} p99 {st['p99']:.3f}"


def stats_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def run_size(n: int, args: argparse.Namespace, real: RealSet | None) -> dict:
    d = args.dim
    default_threads = torch.get_num_threads()
    rng = np.random.default_rng(args.seed + 1)
    shaped = real is not None and args.fill == "real-shaped"
    syn = RealShapedKeys(real.keys, seed=args.seed) if shaped else SyntheticKeys(n, d, seed=args.seed)
    n_real = 0 if real is None else min(len(real.keys), int(n * args.real_fraction))
    if real is not None and n_real < real.min_keys:
        raise SystemExit(f"{n} keys leave room for {n_real} real keys; the real queries need {real.min_keys}")
    keys = torch.empty(n, d)
    t = time.perf_counter()
    syn.fill(keys[: n - n_real])
    queries = {"unrelated": torch.from_numpy(syn.unrelated(args.unrelated, rng))}
    if n > n_real:  # synthetic paraphrases of synthetic keys
        src = rng.choice(n - n_real, min(args.queries, n - n_real), replace=False)
        queries = {"paraphrase": torch.from_numpy(syn.paraphrases(keys[src].numpy(), rng)), **queries}
    own_rows: dict[str, torch.Tensor] = {}  # per rephrase kind: the row of each query's own key
    if real is not None:
        keys[n - n_real :] = real.keys[:n_real]
        queries.update(real.queries)
        own_rows = {kind: own + (n - n_real) for kind, own in real.own.items()}
    cb = build_codebook(keys)
    del keys
    fill = "real-shaped" if shaped else "spectrum"
    print(f"\n== {n} keys, dim {d}, {fill} fillers: generated in {time.perf_counter() - t:.1f}s", flush=True)

    index = KeyIndex(
        d,
        top_k=args.top_k,
        min_keys=0,
        reduced_dim=args.reduced_dim,
        pq_min_keys=args.pq_min_keys,
        code_dims=args.code_dims,
        scan_k=args.scan_k,
        scan_threads=args.scan_threads,
        rotate=not args.no_rotate,
    )
    cfg = HorenConfig()
    retriever = HopfieldRetriever(
        cfg.hopfield_alpha, cfg.hopfield_beta, cfg.hopfield_steps, cfg.threshold, support=cfg.hopfield_support
    )
    router = Router(cb, retriever)
    t = time.perf_counter()
    router.attach(index)
    build_s = time.perf_counter() - t
    print(f"build {index.kind}: {build_s:.1f}s", flush=True)
    order = cb.row_entry_ids

    def provide(q: torch.Tensor):
        return index.candidates(q, router.keys, retriever.support)

    def prefiltered(q: torch.Tensor):
        return router.route(q)

    def exact(q: torch.Tensor):
        return retriever.route(q, cb.keys, None, order=order)

    agreement, hits, recall, own = {}, {}, {}, {}
    print(f"{n_real} real keys; queries: " + ", ".join(f"{k} {len(q)}" for k, q in queries.items()))
    t = time.perf_counter()
    for kind, q in queries.items():
        same, hit_e, hit_p, found, own_e, own_p = 0, 0, 0, 0, 0, 0
        for i in range(0, len(q), args.batch):
            qb = q[i : i + args.batch]
            e, p, cand = exact(qb), prefiltered(qb), provide(qb)
            same += int((e.rows == p.rows).sum())
            hit_e += int((e.rows >= 0).sum())
            hit_p += int((p.rows >= 0).sum())
            found += int(((cand == e.rows[:, None]).any(dim=1) | (e.rows < 0)).sum())
            if kind in own_rows:
                mine = own_rows[kind][i : i + len(qb)]
                own_e += int((e.rows == mine).sum())
                own_p += int((p.rows == mine).sum())
        agreement[kind] = same / len(q)
        hits[kind] = {"exact": hit_e / len(q), "prefiltered": hit_p / len(q)}
        recall[kind] = found / len(q)
        print(
            f"  {kind:14s} n={len(q):5d} agreement {agreement[kind]:.4f}  routed exact {hits[kind]['exact']:.3f}"
            f" prefiltered {hits[kind]['prefiltered']:.3f}  exact row among candidates {recall[kind]:.4f}",
            flush=True,
        )
        if kind in own_rows:
            own[kind] = {"exact": own_e / len(q), "prefiltered": own_p / len(q)}
            print(
                f"  {'':14s} routed to its own key: exact {own[kind]['exact']:.4f} prefiltered {own[kind]['prefiltered']:.4f}"
            )
    total = sum(len(q) for q in queries.values())
    agreement["all"] = sum(agreement[k] * len(q) for k, q in queries.items()) / total
    print(f"agreement (all {total} queries): {agreement['all']:.4f}  [{time.perf_counter() - t:.0f}s]", flush=True)

    timed = torch.cat([q[: args.timed] for q in queries.values()])
    timed = timed[torch.randperm(len(timed), generator=torch.Generator().manual_seed(args.seed))][: args.timed]
    torch.set_num_threads(args.threads)
    for q in timed[:5]:  # warm-up
        prefiltered(q[None])
    pre_s, pre_cpu, search_s = [], [], []
    for q in timed:
        t0, c0 = time.perf_counter(), time.thread_time()
        cand = provide(q[None])
        t1 = time.perf_counter()
        retriever.route(q[None], cb.keys, cand, order=order)
        pre_s.append(time.perf_counter() - t0)
        pre_cpu.append(time.thread_time() - c0)
        search_s.append(t1 - t0)
    exact_by_threads = {}
    for threads in sorted({args.threads, default_threads}):
        torch.set_num_threads(threads)
        exact_s: list[float] = []
        start = time.perf_counter()
        for q in timed:  # at least 10 queries, then until the budget runs out
            if len(exact_s) >= 10 and time.perf_counter() - start > args.exact_budget:
                break
            t0 = time.perf_counter()
            exact(q[None])
            exact_s.append(time.perf_counter() - t0)
        exact_by_threads[threads] = stats_ms(exact_s)
        print(
            f"exact       ms/query, {threads} torch threads: "
            + fmt(exact_by_threads[threads])
            + f"  (n={len(exact_s)})"
        )
    torch.set_num_threads(default_threads)
    best = min(exact_by_threads, key=lambda t: exact_by_threads[t]["mean"])
    pre, pre_c, ex = stats_ms(pre_s), stats_ms(pre_cpu), exact_by_threads[best]
    ratio = ex["mean"] / pre["mean"]
    print(f"prefiltered ms/query, {args.threads} torch thread(s): " + fmt(pre) + f"  (n={len(pre_s)})")
    print("prefiltered CPU ms/query (this thread, excludes time other processes took): " + fmt(pre_c))
    search = stats_ms(search_s)
    print("  of which the index's candidates (search, then scoring them against the full keys): " + fmt(search))
    print(f"ratio exact ({best} threads) / prefiltered, mean wall time: {ratio:.1f}x")

    # what keeping the index current costs the editor after one edit
    key = torch.from_numpy(syn.unrelated(1, rng))
    change = cb.add(10**9, key[0], torch.zeros(1), [0])
    t0 = time.perf_counter()
    router.apply([change])
    update = time.perf_counter() - t0
    print(f"index update after one edit (its CodebookChange): {update * 1e3:.1f} ms")
    return {
        "keys": n,
        "fill": fill,
        "index": index.kind,
        "build_s": round(build_s, 2),
        "prefiltered_ms": {k: round(v, 3) for k, v in pre.items()},
        "prefiltered_cpu_ms": {k: round(v, 3) for k, v in pre_c.items()},
        "candidates_ms": {k: round(v, 3) for k, v in search.items()},
        "exact_ms": {k: round(v, 3) for k, v in ex.items()},
        "exact_threads": best,
        "ratio": round(ratio, 1),
        "agreement": {k: round(v, 5) for k, v in agreement.items()},
        "routed": hits,
        "candidate_recall": {k: round(v, 5) for k, v in recall.items()},
        "real_keys": n_real,
        "routed_to_own_key": own,
        "update_ms": round(update * 1e3, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated key counts")
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--queries", type=int, default=2000, help="paraphrase queries per size (agreement)")
    ap.add_argument("--unrelated", type=int, default=500, help="unrelated queries per size (agreement)")
    ap.add_argument("--timed", type=int, default=200, help="single queries timed per size")
    ap.add_argument("--exact-budget", type=float, default=30.0, help="seconds spent timing exact routing")
    ap.add_argument("--batch", type=int, default=64, help="queries per batch in the agreement pass")
    ap.add_argument(
        "--top-k",
        type=int,
        default=512,
        help="candidates scored against the full keys; routing attends their 32 nearest",
    )
    ap.add_argument(
        "--scan-threads", type=int, default=0, help="shards one query's scan is split into (0: cores, <= 4)"
    )
    ap.add_argument("--reduced-dim", type=int, default=256, help="PCA dimensions the index scans in")
    ap.add_argument(
        "--scan-k", type=int, default=2048, help="codes the scan fetches, re-ranked in the PCA space to --top-k"
    )
    ap.add_argument("--code-dims", type=int, default=4, help="PCA dimensions per 4-bit PQ code")
    ap.add_argument("--no-rotate", action="store_true", help="keep the PCA basis unrotated (KeyIndex rotate=False)")
    ap.add_argument("--pq-min-keys", type=int, default=16384, help="exact flat scan below, 4-bit PQ fast scan from")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for prefiltered routing")
    ap.add_argument(
        "--real", action="store_true", help="also index real keys and route real queries of the bundled model"
    )
    ap.add_argument("--real-cf", type=int, default=1000, help="CounterFact records asked with their rephrase/locality")
    ap.add_argument(
        "--real-fraction", type=float, default=0.5, help="most of the codebook that real keys may fill (1: all real)"
    )
    ap.add_argument("--real-extra", type=int, default=10000, help="ZsRE training questions added as keys only")
    ap.add_argument(
        "--fill",
        choices=["real-shaped", "spectrum"],
        default="real-shaped",
        help="with --real, the other keys: drawn like the real keys (mean, covariance) or SyntheticKeys",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    real = None
    if args.real:
        if args.dim != 1536:
            ap.error("--real needs --dim 1536 (the model's key dimension)")
        t = time.perf_counter()
        real = RealSet.load(args.real_cf, args.real_extra)
        print(
            f"real: {len(real.keys)} keys, queries "
            + ", ".join(f"{k} {len(q)}" for k, q in real.queries.items())
            + f" ({time.perf_counter() - t:.0f}s)",
            flush=True,
        )
    results = [run_size(int(s), args, real) for s in args.sizes.split(",")]
    summary = {"bench": "index", "dim": args.dim, "top_k": args.top_k, "scan_k": args.scan_k, "results": results}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
