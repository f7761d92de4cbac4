"""KeyIndex: an approximate prefilter over the codebook's unit keys, kept as derived state.

Contract: per query, the ``top_k`` entries nearest to it, so that routing refines and thresholds
over those keys only (``HopfieldRetriever.route(..., candidates)``); the index never decides a
route, it only has to contain the key exact routing would pick.

How, on the CPU: keys are mapped into 256 dimensions (255 principal components plus the norm of the
residual they leave out, the basis randomly rotated; see ``_fit``), scanned exhaustively, exactly
(``IndexFlatL2``) below ``pq_min_keys`` and as 4-bit product-quantised fast-scan codes above it
(32 bytes per key, split into shards scanned on parallel threads, ``_ShardedScan``). A scan fetches
``scan_k`` codes, each shard re-ranks its share by exact distance in the reduced space
(``IndexRefineFlat``) and the best ``top_k`` go on; with the retriever's support given, the provider
scores them against the full keys in place and hands routing the ``support`` nearest, the keys its
refinement attends. Why these choices, with measurements: docs/design.md and docs/benchmarks.md.

Removal leaves a tombstone that searches over-fetch past; past ``rebuild_fraction`` of the live
entries (at most ``_MAX_DEAD``) the codes are compacted. With ``use_gpu`` it is an exact flat
inner-product index on the GPU when FAISS has GPU support (the ``gpu`` extra); without it the index
stays empty and routing is exact on the GPU.

FAISS stores sequential labels; ``_label_entry`` maps each to the stable entry id (never a row,
since codebook rows move). ``candidate_provider`` maps entry ids to the codebook's current rows at
query time. Not thread-safe: the engine thread is the only caller, of ``sync`` and the provider.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import torch

from horen_core import hugepages
from horen_core.codebook import Codebook, CodebookChange
from service.settings import INDEX_DEFAULTS

log = logging.getLogger(__name__)

CandidateProvider = Callable[[torch.Tensor], torch.Tensor | None]

_SIGNATURE_PROBES = 8  # random projections per key that reveal a key changed under the same entry id
_SIGNATURE_TOL = 1e-5  # float noise of recomputing a projection; a changed key moves it ~1e-2
_ADD_CHUNK = 65536  # rows projected and added per FAISS call, to bound temporary memory
_RESIDUAL_PROBES, _RESIDUAL_NEIGHBOURS = 512, 4  # sampled keys and their nearest others that estimate lam
_GPU_MAX_K = 2048  # FAISS GPU limit on k
_MAX_DEAD = 256  # tombstones a search over-fetches past at most (CPU); more are compacted away
# FAISS parallelises a search over its queries; for a few queries waking OpenMP threads costs more
# than it saves (and a lot when the cores are busy), so small searches run on the calling thread
_PARALLEL_QUERIES = 32


@contextlib.contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads (0: unchanged); the setting is per calling thread."""
    prev = faiss.omp_get_max_threads()
    if n:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev)


def default_scan_threads() -> int:
    """Shards scanned in parallel for one query: the cores this process may use, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


_WORKERS: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    """Threads that search the shards after the first, shared by every index (the engine thread
    searches one index at a time)."""
    global _WORKERS
    if _WORKERS is None:
        _WORKERS = ThreadPoolExecutor(max_workers=3, thread_name_prefix="key-index")
    return _WORKERS


def _search_alone(index: faiss.Index, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    with _omp_threads(1):  # per thread: a few queries are not worth waking OpenMP's threads
        return index.search(x, k)


class _ShardedScan:
    """A trained ``IndexPQFastScan`` split into shards that one search scans in parallel: the calling
    thread the first, ``_workers`` the others (FAISS releases the GIL). The scan is bound by compute,
    not memory, so shards on separate cores shorten it; FAISS's ``IndexShards`` does the same with
    more overhead per search.
    With ``refine`` each shard keeps the (reduced) vectors beside its codes (``IndexRefineFlat``, 4
    bytes per dimension) and re-ranks its share of the codes a search fetches by exact distance, in
    C++ on its own thread; the shards' best merge into one exact order.
    Labels are sequential in add order, as in a plain FAISS index; adds keep the shards equal (a
    whole add went to the smaller shard before, so one shard held every key of a bulk build under
    65,536).
    """

    def __init__(self, trained: faiss.IndexPQFastScan, shards: int, refine: bool) -> None:
        self.d, self.M = trained.d, trained.M
        self._trained = trained  # empty; cloned for every shard
        self._refiners: list[faiss.IndexRefineFlat] = []
        self._parts = []
        for _ in range(shards):
            inner = faiss.clone_index(trained)
            if refine:
                inner = faiss.IndexRefineFlat(inner)
                self._refiners.append(inner)
            self._parts.append(faiss.IndexIDMap(inner))
        self.ntotal = 0
        self._advised: list[tuple[int, int]] = [(0, 0)] * len(self._refiners)

    @property
    def refine(self) -> bool:
        return bool(self._refiners)

    def add(self, x: np.ndarray) -> None:
        """Append vectors, labelled in order, spread so that the shards stay as equal as they can."""
        target = -(-(self.ntotal + len(x)) // len(self._parts))
        start = 0
        for part in sorted(self._parts, key=lambda p: p.ntotal):
            m = min(max(target - part.ntotal, 0), len(x) - start)
            if m:
                labels = np.arange(self.ntotal + start, self.ntotal + start + m, dtype=np.int64)
                part.add_with_ids(x[start : start + m], labels)
                start += m
        self.ntotal += len(x)

    def refine_vectors(self) -> list[np.ndarray]:
        """Each shard's re-rank vectors as they lie in FAISS's memory (bytes, a view, no copy)."""
        out = []
        for refiner in self._refiners:
            flat = faiss.downcast_index(refiner.refine_index)
            nbytes = flat.ntotal * flat.code_size
            out.append(faiss.rev_swig_ptr(flat.codes.data(), nbytes) if nbytes else np.empty(0, np.uint8))
        return out

    def advise_huge_pages(self) -> None:
        """Put each shard's re-rank vectors (1 KB per key, read at the thousands of rows a search
        fetches) on huge pages, when they have moved (a growing FAISS vector reallocates) or grown
        by half since last time (``horen_core.hugepages``; about 0.7 s per GB, so rarely)."""
        for i, vectors in enumerate(self.refine_vectors()):
            if not vectors.nbytes:
                continue
            address = vectors.ctypes.data
            done_at, done_bytes = self._advised[i]
            if address != done_at or vectors.nbytes > done_bytes * 3 // 2:
                hugepages.advise(address, vectors.nbytes, collapse=True)
                self._advised[i] = (address, vectors.nbytes)

    def search(self, x: np.ndarray, k: int, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest; with ``refine``, of about ``fetch`` codes in all re-ranked exactly."""
        factor = max(1.0, fetch / len(self._parts) / k)
        for refiner in self._refiners:
            refiner.k_factor = factor
        if len(x) >= _PARALLEL_QUERIES:  # FAISS parallelises over the queries: the shards in turn
            found = [part.search(x, k) for part in self._parts]
        else:  # this thread scans the first shard, workers the others (FAISS releases the GIL)
            pending = [_workers().submit(_search_alone, part, x, k) for part in self._parts[1:]]
            found = [_search_alone(self._parts[0], x, k)] + [p.result() for p in pending]
        if len(found) == 1:
            return found[0]
        dist, labels = (np.concatenate(a, axis=1) for a in zip(*found))
        nearest = np.argsort(np.where(labels >= 0, dist, np.inf), axis=1, kind="stable")[:, :k]
        return np.take_along_axis(dist, nearest, axis=1), np.take_along_axis(labels, nearest, axis=1)

    def compacted(self, live: np.ndarray) -> _ShardedScan:
        """A copy holding only the ``live`` labels (sorted), renumbered 0..len(live)-1 in their order.
        What a shard reconstructs (the kept vectors, else the decoded codes) encodes to the same codes."""
        fresh = _ShardedScan(self._trained, len(self._parts), self.refine)
        for old, new in zip(self._parts, fresh._parts):
            ids = faiss.vector_to_array(old.id_map)
            keep = np.isin(ids, live, assume_unique=True)
            for i in range(0, len(ids), _ADD_CHUNK):
                rows = np.nonzero(keep[i : i + _ADD_CHUNK])[0] + i
                if len(rows):
                    new.add_with_ids(old.index.reconstruct_batch(rows), np.searchsorted(live, ids[rows]))
        fresh.ntotal = len(live)
        fresh.advise_huge_pages()
        return fresh


class _Rows:
    """A numpy array that grows by appending rows, amortised O(rows appended) (no copy per edit)."""

    def __init__(self, width: int | None, dtype: type) -> None:
        shape = (0,) if width is None else (0, width)
        self._buf = np.empty(shape, dtype=dtype)
        self._n = 0

    @property
    def view(self) -> np.ndarray:
        return self._buf[: self._n]

    def append(self, rows: np.ndarray) -> None:
        need = self._n + len(rows)
        if need > len(self._buf):
            size = max(need + need // 2, 2 * len(self._buf), 1024)  # headroom after a bulk rebuild too
            grown = np.empty((size,) + self._buf.shape[1:], dtype=self._buf.dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : need] = rows
        self._n = need

    def keep(self, rows: np.ndarray) -> None:
        """Keep only these rows (indices, ascending), in their order."""
        kept = self._buf[rows]
        self._buf, self._n = kept, len(kept)


class KeyIndex:
    def __init__(
        self,
        dim: int,
        top_k: int = INDEX_DEFAULTS["top_k"],
        min_keys: int = INDEX_DEFAULTS["min_keys"],
        use_gpu: bool = False,
        *,
        reduced_dim: int = 256,
        pq_min_keys: int = 16384,
        code_dims: int = INDEX_DEFAULTS["code_dims"],
        scan_k: int = INDEX_DEFAULTS["scan_k"],
        scan_threads: int = INDEX_DEFAULTS["scan_threads"],
        rebuild_fraction: float = 0.2,
        pca_sample: int = 20000,
        rotate: bool = True,
        seed: int = 0,
    ) -> None:
        if top_k < 1 or dim < 1:
            raise ValueError("dim and top_k must be positive")
        self.dim = dim
        self.top_k = top_k
        self.min_keys = min_keys  # the provider answers None (exact routing) below this many keys
        self.reduced_dim = min(reduced_dim, dim)  # PCA dimensions the index works in
        self.pq_min_keys = pq_min_keys  # from this many keys, 4-bit PQ fast scan instead of an exact flat scan
        # the quantised scan fetches this many, re-ranked by exact distance in the reduced space down to
        # top_k (the projected keys are kept beside the codes: 4 bytes per dimension); <= top_k: none
        self.scan_k = max(scan_k, top_k)
        self.code_dims = code_dims  # reduced dimensions per 4-bit PQ code (bytes per key: reduced_dim / 2 / code_dims)
        self.scan_threads = scan_threads or default_scan_threads()  # shards one PQ scan is split into
        self.rebuild_fraction = rebuild_fraction  # tombstones per live entry that trigger a rebuild
        self.pca_sample = pca_sample  # keys the PCA is fitted on; refits stop once this many were seen
        self.rotate = rotate  # randomly rotate the PCA basis (see _fit)
        self.on_gpu = bool(use_gpu) and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        self.exact_on_device = bool(use_gpu) and not self.on_gpu  # never built: the provider answers None
        rng = np.random.default_rng(seed)
        self._seed = seed
        self._probes = rng.standard_normal((dim, _SIGNATURE_PROBES)).astype(np.float32)
        self._probes_t: dict[str, torch.Tensor] = {}
        self._gpu_res = faiss.StandardGpuResources() if self.on_gpu else None
        self._generation: int | None = None  # codebook generation this index reflects
        self._clear()

    def _clear(self) -> None:
        self._index: faiss.Index | _ShardedScan | None = None
        self._mean: np.ndarray | None = None  # [d] PCA centre
        self._proj: np.ndarray | None = None  # [d, r] PCA basis; None searches the keys themselves
        self._norm_axis: np.ndarray | None = None  # [r] where a key's residual norm goes (see _fit)
        self._query_residual = 0.0  # lam of _fit: the weight of a query's residual norm there
        self._fit_count = 0  # keys the projection was fitted on
        self._label_entry = _Rows(None, np.int64)  # FAISS label -> entry id, -1 once removed
        self._label_sig = _Rows(_SIGNATURE_PROBES, np.float32)
        self._entry_label: dict[int, int] = {}  # live entry id -> FAISS label
        self._dead: list[int] = []  # tombstoned labels

    # ---- state ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entry_label)

    @property
    def built(self) -> bool:
        return self._index is not None

    @property
    def kind(self) -> str:
        if self.exact_on_device:
            return "none-exact-on-device"
        if self.on_gpu:
            return "gpu-flat-ip"
        if self._index is None:
            return f"none-exact-below-{self.min_keys}"  # not built yet: routing is exhaustive
        r = self.reduced_dim if self._proj is not None else self.dim
        if isinstance(self._index, _ShardedScan):
            refine = f"-refine{self.scan_k}" if self._index.refine else ""
            return f"pca{r}-pq{self._index.M}x4fs{refine}"
        return f"pca{r}-flat"

    def tombstones(self) -> int:
        return len(self._dead)

    # ---- low-level API (entry ids + keys) --------------------------------------------------
    def rebuild(self, entry_ids: np.ndarray, keys: np.ndarray) -> None:
        """Replace the whole index with these entries (refits the PCA on a sample of ``keys``)."""
        entry_ids, keys = self._check(entry_ids, keys)
        self._clear()
        sample = self._fit(keys)
        self._index = self._new_index(self._project(sample), len(keys))
        self._append(entry_ids, keys)

    def add(self, entry_ids: np.ndarray, keys: np.ndarray) -> None:
        """Index these entries; an id already present has its old vector replaced."""
        entry_ids, keys = self._check(entry_ids, keys)
        if self._index is None:
            self.rebuild(entry_ids, keys)
            return
        self.remove(entry_ids[np.fromiter((int(e) in self._entry_label for e in entry_ids), bool, len(entry_ids))])
        self._append(entry_ids, keys)

    def remove(self, entry_ids: Iterable[int]) -> None:
        """Hide these entries from search (unknown ids are ignored)."""
        dropped = 0
        for e in np.asarray(entry_ids, dtype=np.int64).reshape(-1).tolist():
            label = self._entry_label.pop(e, None)
            if label is not None:
                self._label_entry.view[label] = -1
                self._dead.append(label)
                dropped += 1
        if dropped and len(self._dead) > self._max_dead():
            self._compact()

    def search(self, queries: np.ndarray) -> np.ndarray:
        """[B, d] unit queries -> [B, top_k] entry ids, nearest first, -1 where fewer were found."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        out = np.full((q.shape[0], self.top_k), -1, dtype=np.int64)
        if self._index is None or not self._entry_label:
            return out
        x = self._project(q, queries=True)
        k = min(self._index.ntotal, self.top_k + len(self._dead))  # over-fetch past the tombstones
        if self.on_gpu:
            _, labels = self._index.search(x, min(k, _GPU_MAX_K))
        else:
            with _omp_threads(1 if len(x) < _PARALLEL_QUERIES else 0):
                if isinstance(self._index, _ShardedScan):
                    _, labels = self._index.search(x, k, self.scan_k + len(self._dead))
                else:
                    _, labels = self._index.search(x, k)
        found = labels >= 0
        entries = np.where(found, self._label_entry.view[np.where(found, labels, 0)], -1)
        if self._dead:  # keep the survivors' order, padding at the end
            order = np.argsort(entries < 0, axis=1, kind="stable")
            entries = np.take_along_axis(entries, order, axis=1)
        out[:, : min(self.top_k, entries.shape[1])] = entries[:, : self.top_k]
        return out

    # ---- codebook-facing API ---------------------------------------------------------------
    def sync(self, codebook: Codebook, changes: Sequence[CodebookChange] | None = None) -> None:
        """Bring the index up to date with ``codebook``. Free when ``codebook.generation`` is
        unchanged. ``changes`` (every change since the last sync, in any order) makes it cost
        O(changes); without it the entry ids and a key signature of every row are compared."""
        gen = codebook.generation
        n = len(codebook)
        if self._index is None:
            if n >= self.min_keys and not self.exact_on_device:
                self._rebuild_from(codebook)
            self._generation = gen
            return
        if gen == self._generation:
            return
        if changes is not None and self._generation is not None and self._generation + len(changes) == gen:
            self._reconcile(codebook, {c.entry_id for c in changes if c.kind != "retrained"})
        else:
            self._reconcile_all(codebook)
        self._generation = gen
        if self._proj is not None and self._fit_count < self.pca_sample and len(self) >= 2 * self._fit_count:
            self._rebuild_from(codebook)  # the codebook doubled since the PCA saw it: refit
        elif isinstance(self._index, faiss.IndexFlatL2) and len(self) >= self.pq_min_keys:
            self._rebuild_from(codebook)  # grown past the exact scan's size: quantise

    def candidate_provider(self, codebook: Codebook, support: int = 0) -> CandidateProvider:
        """The editor's ``candidate_provider``: unit queries [B, d] -> codebook rows [B, top_k]
        (-1 padded), or None for exact routing (small codebook, or no candidate for some query).

        With the retriever's ``support`` s (< top_k) and the keys in host memory, the provider hands
        over each query's s nearest candidates by exact inner product with the full keys instead,
        the rows routing would attend anyway (``HopfieldRetriever._nearest``), scored in place by
        FAISS rather than gathered by torch (the same routes, in less time)."""

        def provide(queries: torch.Tensor) -> torch.Tensor | None:
            if self.exact_on_device or len(codebook) < self.min_keys:
                return None
            if codebook.generation != self._generation:
                self.sync(codebook)
            if self._index is None:
                return None
            ids = self.search(queries.detach().to(torch.float32).cpu().numpy())
            # -1 padding and entries removed since the index saw them map to -1
            rows = codebook.rows_of(torch.from_numpy(ids))
            if (rows.numpy() < 0).all(axis=1).any():
                return None
            if 0 < support < rows.shape[1]:
                nearest = self._nearest_rows(codebook.keys, queries, rows, support)
                if nearest is not None:
                    rows = nearest
            return rows.to(queries.device)

        return provide

    @staticmethod
    def _nearest_rows(keys: torch.Tensor, queries: torch.Tensor, rows: torch.Tensor, s: int) -> torch.Tensor | None:
        """Per query, its ``s`` candidate ``rows`` (-1 padded) of largest inner product with ``keys``,
        read in place; None where the keys are not a contiguous float32 host tensor."""
        if keys.device.type != "cpu" or keys.dtype != torch.float32 or not keys.is_contiguous():
            return None
        k = keys.detach().numpy()
        q = np.ascontiguousarray(queries.detach().to(torch.float32).cpu().numpy())
        ids = rows.numpy()
        safe = np.ascontiguousarray(np.maximum(ids, 0))  # padding reads row 0, then scores -inf
        ip = np.empty(ids.shape, dtype=np.float32)
        with _omp_threads(1 if len(q) < _PARALLEL_QUERIES else 0):
            faiss.fvec_inner_products_by_idx(
                faiss.swig_ptr(ip), faiss.swig_ptr(q), faiss.swig_ptr(k), faiss.swig_ptr(safe), k.shape[1], *ids.shape
            )
        ip[ids < 0] = -np.inf
        pick = np.argpartition(-ip, s - 1, axis=1)[:, :s]
        kept = np.take_along_axis(ids, pick, axis=1)
        kept[np.take_along_axis(ip, pick, axis=1) == -np.inf] = -1
        return torch.from_numpy(kept)

    # ---- internals -------------------------------------------------------------------------
    def _check(self, entry_ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(entry_ids, dtype=np.int64).reshape(-1)
        k = np.asarray(keys, dtype=np.float32)
        if k.ndim != 2 or k.shape != (ids.shape[0], self.dim):
            raise ValueError(f"expected {ids.shape[0]} keys of dimension {self.dim}, got shape {k.shape}")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("entry ids must be unique")
        return ids, k

    def _fit(self, keys: np.ndarray) -> np.ndarray:
        """PCA on a sample of the keys (returned); too few keys (or the GPU's exact index) use no projection."""
        n = keys.shape[0]
        self._fit_count = min(n, self.pca_sample)
        rng = np.random.default_rng(self._seed)
        sample = keys[np.sort(rng.choice(n, self._fit_count, replace=False))] if n > self.pca_sample else keys
        if self.on_gpu or self.reduced_dim >= self.dim or self.reduced_dim < 2 or n < 2 * self.reduced_dim:
            self._mean = self._proj = self._norm_axis = None
            return sample
        x = torch.from_numpy(np.ascontiguousarray(sample))
        mean = x.double().mean(dim=0).float()
        x = x - mean
        _, vecs = torch.linalg.eigh((x.T @ x).double())  # ascending eigenvalues
        # r - 1 principal components and one coordinate for the norm of the rest of the key (its
        # residual r_k); a query puts lam * |r_q| there. The squared distance is then the true
        # |q - k|^2 up to a per-query constant and 2 |r_q| |r_k| (cos(r_q, r_k) - lam), small where
        # lam is the residuals' typical cosine between a query and its near keys, estimated here
        # between sampled keys and their nearest others. Plain PCA distances (no such coordinate)
        # are off by |r_q - r_k|^2, which ranks the keys the components describe worst too near.
        # (measured agreement for lam 0 to 1 and the estimate's values: docs/benchmarks.md)
        r = self.reduced_dim
        basis = vecs[:, -(r - 1) :].flip(1)
        self._query_residual = self._residual_cosine(x, basis.float())
        # a random rotation spreads the variance evenly over the PQ codes (in PCA order the first
        # codes would carry most of it, and the norm coordinate one code alone); distances are
        # unchanged. But where the keys the PCA saw are mostly foreign to the queried ones (1M
        # --fill spectrum) the rotation costs the latter resolution (see README)
        rot = torch.eye(r, dtype=torch.float64)
        if self.rotate:
            gen = torch.Generator().manual_seed(self._seed)
            rot = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))[0]
        self._mean = mean.float().numpy()
        self._proj = np.ascontiguousarray((basis @ rot[: r - 1]).float().numpy())  # [d, r]
        self._norm_axis = np.ascontiguousarray(rot[r - 1].float().numpy())  # [r]: the residual norm's direction
        return sample

    @staticmethod
    def _residual_cosine(x: torch.Tensor, basis: torch.Tensor) -> float:
        """Mean cosine between the residuals (beyond ``basis``) of centred keys ``x`` and of their
        nearest others (by the components), in [0, 1]."""
        comp = x @ basis
        residual = torch.nn.functional.normalize(x - comp @ basis.T, dim=1)
        probes = min(_RESIDUAL_PROBES, len(x))
        dist = torch.cdist(comp[:probes], comp)
        dist[torch.arange(probes), torch.arange(probes)] = float("inf")
        near = dist.topk(min(_RESIDUAL_NEIGHBOURS, len(x) - 1), dim=1, largest=False).indices
        cos = (residual[:probes, None, :] * residual[near]).sum(dim=-1)
        return float(cos.mean().clamp(0.0, 1.0))

    def _project(self, x: np.ndarray, queries: bool = False) -> np.ndarray:
        """Keys (or queries) [n, d] -> the index's space: the rotated components and residual norm."""
        if self._proj is None:
            return np.ascontiguousarray(x, dtype=np.float32)
        c = np.asarray(x, dtype=np.float32) - self._mean
        y = c @ self._proj
        # the rotation keeps |y| = |components|: the residual is what c has beyond
        residual = np.sqrt(np.maximum(np.einsum("ij,ij->i", c, c) - np.einsum("ij,ij->i", y, y), 0.0))
        y += (self._query_residual * residual if queries else residual)[:, None] * self._norm_axis
        return np.ascontiguousarray(y, dtype=np.float32)

    def _new_index(self, sample: np.ndarray, n: int) -> faiss.Index | _ShardedScan:
        """An empty index for ``n`` vectors like ``sample`` (projected), which trains its quantizer."""
        if self.on_gpu:
            return faiss.GpuIndexFlatIP(self._gpu_res, self.dim)
        d = sample.shape[1]
        if n < self.pq_min_keys:
            return faiss.IndexFlatL2(d)
        # at one scan cost (32 bytes per key), 256 dimensions four to a code rank real keys better
        # than 128 two to a code (bench: 0.9913 vs 0.9838 agreement at 100K keys)
        index = faiss.IndexPQFastScan(d, d // self.code_dims if d % self.code_dims == 0 else d, 4)
        index.train(np.ascontiguousarray(sample))
        return _ShardedScan(index, self.scan_threads, refine=self.scan_k > self.top_k)

    def _append(self, entry_ids: np.ndarray, keys: np.ndarray) -> None:
        assert self._index is not None
        start = self._index.ntotal
        for i in range(0, len(entry_ids), _ADD_CHUNK):
            self._index.add(self._project(keys[i : i + _ADD_CHUNK]))
        if isinstance(self._index, _ShardedScan):
            self._index.advise_huge_pages()
        self._label_entry.append(entry_ids)
        self._label_sig.append(keys @ self._probes)
        self._entry_label.update(zip(entry_ids.tolist(), range(start, start + len(entry_ids))))

    def _max_dead(self) -> int:
        limit = max(int(self.rebuild_fraction * len(self._entry_label)), self.top_k)
        return min(limit, _GPU_MAX_K - self.top_k if self.on_gpu else _MAX_DEAD)

    def _compact(self) -> None:
        """Drop the tombstoned vectors, keeping the projection, the quantizer and the survivors' order.

        The survivors are decoded and re-added to an empty copy of the index: re-encoding a decoded
        PQ code gives the same code. (``IndexPQFastScan.remove_ids`` is not used: codes added after
        it were measured wrong for ~2% of keys in FAISS 1.15, its packed blocks keep stale bits.)"""
        assert self._index is not None
        live = np.nonzero(self._label_entry.view >= 0)[0]
        log.info("key index: compacting %d entries to drop %d tombstones", len(live), len(self._dead))
        if isinstance(self._index, _ShardedScan):
            fresh = self._index.compacted(live)
        else:  # flat (CPU or GPU): keep the survivors' vectors, refill in place
            fresh = self._index
            vectors = fresh.reconstruct_n(0, fresh.ntotal)[live]
            fresh.reset()
            for i in range(0, len(live), _ADD_CHUNK):
                fresh.add(np.ascontiguousarray(vectors[i : i + _ADD_CHUNK]))
        self._index = fresh
        for rows in (self._label_entry, self._label_sig):
            rows.keep(live)
        self._entry_label = dict(zip(self._label_entry.view.tolist(), range(len(live))))
        self._dead = []

    def _signature(self, keys: torch.Tensor) -> np.ndarray:
        dev = str(keys.device)
        if dev not in self._probes_t:
            self._probes_t[dev] = torch.from_numpy(self._probes).to(keys.device)
        return (keys.to(torch.float32) @ self._probes_t[dev]).cpu().numpy()

    def _rebuild_from(self, codebook: Codebook) -> None:
        ids = codebook.row_entry_ids.cpu().numpy()
        keys = codebook.keys.detach().to(torch.float32).cpu().numpy()
        log.info("key index: building over %d keys", len(ids))
        self.rebuild(ids, keys)

    def _reconcile(self, codebook: Codebook, entry_ids: Iterable[int]) -> None:
        """Make the index agree with the codebook on these entries only."""
        gone, present, rows = [], [], []
        for e in entry_ids:
            try:
                rows.append(codebook.row_of(e))
                present.append(e)
            except KeyError:
                gone.append(e)
        self.remove(gone)
        if rows:
            self._add_rows(codebook, np.asarray(rows, dtype=np.int64), np.asarray(present, dtype=np.int64), True)

    def _reconcile_all(self, codebook: Codebook) -> None:
        """Compare every row's entry id and key signature with what the index holds."""
        ids = codebook.row_entry_ids.cpu().numpy()
        live = np.nonzero(self._label_entry.view >= 0)[0]
        indexed = self._label_entry.view[live]
        self.remove(np.setdiff1d(indexed, ids, assume_unique=True))
        known = np.isin(ids, indexed, assume_unique=True)
        changed = np.zeros(len(ids), dtype=bool)
        if known.any():
            order = np.argsort(indexed)
            labels = live[order[np.searchsorted(indexed[order], ids[known])]]
            now = self._signature(codebook.keys)[known]
            changed[known] = np.abs(now - self._label_sig.view[labels]).max(axis=1) > _SIGNATURE_TOL
        rows = np.nonzero(~known | changed)[0]
        if len(rows):
            self._add_rows(codebook, rows, ids[rows], check_keys=False)

    def _add_rows(self, codebook: Codebook, rows: np.ndarray, ids: np.ndarray, check_keys: bool) -> None:
        keys = codebook.keys[torch.from_numpy(rows).to(codebook.device)].detach().to(torch.float32).cpu().numpy()
        if check_keys:  # an entry already indexed under the same key needs nothing
            labels = [self._entry_label.get(int(e), -1) for e in ids]
            sig = keys @ self._probes
            keep = np.array(
                [
                    lab < 0 or np.abs(sig[i] - self._label_sig.view[lab]).max() > _SIGNATURE_TOL
                    for i, lab in enumerate(labels)
                ]
            )
            ids, keys = ids[keep], keys[keep]
        if len(ids):
            self.add(ids, keys)
