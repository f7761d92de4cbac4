"""KeyIndex: an approximate prefilter over the codebook's unit keys, kept as derived state; the
``CandidateIndex`` of ``horen_core.routing``.

Contract: per query, the ``top_k`` entries nearest to it, so that routing refines and thresholds
over those keys only (``HopfieldRetriever.route(..., candidates)``); the index never decides a
route, it only has to contain the key exact routing would pick. With the retriever's support s
given, the candidates are scored against the full keys in place and routing gets the s nearest,
the keys its refinement attends.

How, on the CPU: keys are mapped into 256 dimensions (``Projection``), scanned exhaustively, exactly
(``IndexFlatL2``) below ``pq_min_keys`` and as 4-bit product-quantised fast-scan codes above it
(32 bytes per key, in shards scanned on parallel threads, ``ShardedScan``), each shard re-ranking
its share of ``scan_k`` fetched codes by exact distance in the reduced space. With ``use_gpu`` it is
an exact flat inner-product index on the GPU when FAISS has GPU support (the ``gpu`` extra); without
it the index stays empty and routing is exact on the GPU.

It follows the codebook through the changes the router hands it (``apply``), reading keys only
through the ``KeysView``. Removal leaves a tombstone that searches over-fetch past; past
``rebuild_fraction`` of the live entries (at most ``_MAX_DEAD``) the codes are compacted. FAISS
stores sequential labels; ``_Labels`` maps each to the stable entry id. Not thread-safe: the editor's lock serialises every call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import faiss
import numpy as np
import torch

from horen_core.codebook import CodebookChange
from horen_core.routing import KeysView
from service.index.projection import Projection
from service.index.sharded import ADD_CHUNK, PARALLEL_QUERIES, ShardedScan, default_scan_threads, omp_threads
from service.settings import INDEX_DEFAULTS

log = logging.getLogger(__name__)

_GPU_MAX_K = 2048  # FAISS GPU limit on k
_MAX_DEAD = 256  # tombstones a search over-fetches past at most (CPU); more are compacted away


class _Labels:
    """FAISS's sequential labels and the stable entry ids they stand for (never rows: codebook rows
    move), with the tombstones of removed entries until a compaction drops them."""

    def __init__(self) -> None:
        self._entry = np.empty(0, dtype=np.int64)  # label -> entry id, -1 once removed; grows by appending
        self._n = 0
        self.of_entry: dict[int, int] = {}  # live entry id -> label
        self.dead: list[int] = []  # tombstoned labels

    @property
    def entries(self) -> np.ndarray:
        """[labels] the entry id of each label, -1 where removed."""
        return self._entry[: self._n]

    def append(self, entry_ids: np.ndarray) -> None:
        """Labels for these entries, after the last (amortised: no copy per edit)."""
        start, need = self._n, self._n + len(entry_ids)
        if need > len(self._entry):
            size = max(need + need // 2, 2 * len(self._entry), 1024)  # headroom after a bulk rebuild too
            grown = np.empty(size, dtype=np.int64)
            grown[: self._n] = self._entry[: self._n]
            self._entry = grown
        self._entry[start:need] = entry_ids
        self._n = need
        self.of_entry.update(zip(entry_ids.tolist(), range(start, need)))

    def remove(self, entry_ids: Iterable[int]) -> int:
        """Tombstone these entries' labels (unknown ids are ignored); how many were live."""
        dropped = 0
        for e in np.asarray(entry_ids, dtype=np.int64).reshape(-1).tolist():
            label = self.of_entry.pop(e, None)
            if label is not None:
                self._entry[label] = -1
                self.dead.append(label)
                dropped += 1
        return dropped

    def compact(self) -> np.ndarray:
        """Drop the tombstones, relabelling the survivors in order; their old labels (ascending)."""
        live = np.nonzero(self.entries >= 0)[0]
        self._entry, self._n = self._entry[live], len(live)
        self.of_entry = dict(zip(self._entry.tolist(), range(len(live))))
        self.dead = []
        return live


class EntryIndex:
    """The FAISS index over keys under stable entry ids: build, add, remove, search (below)."""

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
        self.min_keys = min_keys  # no candidates (exact routing) below this many keys
        self.reduced_dim = min(reduced_dim, dim)  # PCA dimensions the index works in
        self.pq_min_keys = pq_min_keys  # from this many keys, 4-bit PQ fast scan instead of an exact flat scan
        # the quantised scan fetches this many, re-ranked by exact distance in the reduced space down to
        # top_k (the projected keys are kept beside the codes: 4 bytes per dimension); <= top_k: none
        self.scan_k = max(scan_k, top_k)
        self.code_dims = code_dims  # reduced dimensions per 4-bit PQ code (bytes per key: reduced_dim / 2 / code_dims)
        self.scan_threads = scan_threads or default_scan_threads()  # shards one PQ scan is split into
        self.rebuild_fraction = rebuild_fraction  # tombstones per live entry that trigger a rebuild
        self.pca_sample = pca_sample  # keys the PCA is fitted on; refits stop once this many were seen
        self.rotate = rotate  # randomly rotate the PCA basis (see Projection)
        self.on_gpu = bool(use_gpu) and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        self.exact_on_device = bool(use_gpu) and not self.on_gpu  # never built: no candidates
        self._seed = seed
        self._gpu_res = faiss.StandardGpuResources() if self.on_gpu else None
        self._clear()

    def _clear(self) -> None:
        self._index: faiss.Index | ShardedScan | None = None
        self.projection: Projection | None = None  # None: the index searches the keys themselves
        self._fit_count = 0  # keys the projection was fitted on
        self._labels = _Labels()

    # ---- state ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._labels.of_entry)

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
        r = self.reduced_dim if self.projection is not None else self.dim
        if isinstance(self._index, ShardedScan):
            refine = f"-refine{self.scan_k}" if self._index.refine else ""
            return f"pca{r}-pq{self._index.M}x4fs{refine}"
        return f"pca{r}-flat"

    def tombstones(self) -> int:
        return len(self._labels.dead)

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
        self.remove(entry_ids[np.fromiter((int(e) in self._labels.of_entry for e in entry_ids), bool, len(entry_ids))])
        self._append(entry_ids, keys)

    def remove(self, entry_ids: Iterable[int]) -> None:
        """Hide these entries from search (unknown ids are ignored)."""
        if self._labels.remove(entry_ids) and len(self._labels.dead) > self._max_dead():
            self._compact()

    def search(self, queries: np.ndarray) -> np.ndarray:
        """[B, d] unit queries -> [B, top_k] entry ids, nearest first, -1 where fewer were found."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        out = np.full((q.shape[0], self.top_k), -1, dtype=np.int64)
        dead = len(self._labels.dead)
        if self._index is None or not len(self):
            return out
        x = self._project(q, queries=True)
        k = min(self._index.ntotal, self.top_k + dead)  # over-fetch past the tombstones
        if self.on_gpu:
            _, labels = self._index.search(x, min(k, _GPU_MAX_K))
        else:
            with omp_threads(1 if len(x) < PARALLEL_QUERIES else 0):
                if isinstance(self._index, ShardedScan):
                    _, labels = self._index.search(x, k, self.scan_k + dead)
                else:
                    _, labels = self._index.search(x, k)
        found = labels >= 0
        entries = np.where(found, self._labels.entries[np.where(found, labels, 0)], -1)
        if dead:  # keep the survivors' order, padding at the end
            order = np.argsort(entries < 0, axis=1, kind="stable")
            entries = np.take_along_axis(entries, order, axis=1)
        out[:, : min(self.top_k, entries.shape[1])] = entries[:, : self.top_k]
        return out

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
        """Fit the projection on a sample of the keys (returned); too few keys (or the GPU's exact
        index) use none."""
        n = keys.shape[0]
        self._fit_count = min(n, self.pca_sample)
        rng = np.random.default_rng(self._seed)
        sample = keys[np.sort(rng.choice(n, self._fit_count, replace=False))] if n > self.pca_sample else keys
        self.projection = None
        if not (self.on_gpu or self.reduced_dim >= self.dim or self.reduced_dim < 2 or n < 2 * self.reduced_dim):
            self.projection = Projection(sample, self.reduced_dim, self._seed, self.rotate)
        return sample

    def _project(self, x: np.ndarray, queries: bool = False) -> np.ndarray:
        """Keys (or queries) [n, d] -> the index's space."""
        if self.projection is None:
            return np.ascontiguousarray(x, dtype=np.float32)
        return self.projection(x, queries)

    def _new_index(self, sample: np.ndarray, n: int) -> faiss.Index | ShardedScan:
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
        return ShardedScan(index, self.scan_threads, refine=self.scan_k > self.top_k)

    def _append(self, entry_ids: np.ndarray, keys: np.ndarray) -> None:
        assert self._index is not None
        start = self._index.ntotal
        for i in range(0, len(entry_ids), ADD_CHUNK):
            self._index.add(self._project(keys[i : i + ADD_CHUNK]))
        if isinstance(self._index, ShardedScan):
            self._index.advise_huge_pages()
        assert start == len(self._labels.entries)
        self._labels.append(entry_ids)

    def _max_dead(self) -> int:
        limit = max(int(self.rebuild_fraction * len(self)), self.top_k)
        return min(limit, _GPU_MAX_K - self.top_k if self.on_gpu else _MAX_DEAD)

    def _compact(self) -> None:
        """Drop the tombstoned vectors, keeping the projection, the quantizer and the survivors' order.

        The survivors are decoded and re-added to an empty copy of the index: re-encoding a decoded
        PQ code gives the same code. (``IndexPQFastScan.remove_ids`` is not used: codes added after
        it were measured wrong for ~2% of keys in FAISS 1.15, its packed blocks keep stale bits.)"""
        assert self._index is not None
        dead = len(self._labels.dead)
        live = self._labels.compact()
        log.info("key index: compacting %d entries to drop %d tombstones", len(live), dead)
        if isinstance(self._index, ShardedScan):
            fresh = self._index.compacted(live)
        else:  # flat (CPU or GPU): keep the survivors' vectors, refill in place
            fresh = self._index
            vectors = fresh.reconstruct_n(0, fresh.ntotal)[live]
            fresh.reset()
            for i in range(0, len(live), ADD_CHUNK):
                fresh.add(np.ascontiguousarray(vectors[i : i + ADD_CHUNK]))
        self._index = fresh


class KeyIndex(EntryIndex):
    """The ``EntryIndex`` that follows a codebook: the ``CandidateIndex`` of ``horen_core.routing``."""

    def reset(self, keys: KeysView) -> None:
        """Index exactly what ``keys`` holds (nothing below ``min_keys`` keys)."""
        self._clear()
        if len(keys) >= self.min_keys and not self.exact_on_device:
            self._rebuild_from(keys)

    def apply(self, changes: Sequence[CodebookChange], keys: KeysView) -> None:
        """Follow these codebook changes: O(changes), unless the codebook has grown enough to build
        the index, refit its projection (doubled since the fit) or quantise it (past ``pq_min_keys``)."""
        if self.exact_on_device:
            return
        if self._index is None:
            if len(keys) >= self.min_keys:
                self._rebuild_from(keys)
            return
        self._reconcile({c.entry_id for c in changes}, keys)
        if self.projection is not None and self._fit_count < self.pca_sample and len(self) >= 2 * self._fit_count:
            self._rebuild_from(keys)
        elif isinstance(self._index, faiss.IndexFlatL2) and len(self) >= self.pq_min_keys:
            self._rebuild_from(keys)

    def candidates(self, queries: torch.Tensor, keys: KeysView, support: int = 0) -> torch.Tensor | None:
        """Unit queries [B, d] -> rows of ``keys`` [B, top_k] (-1 padded), or None for exact routing
        (small codebook, or no candidate for some query).

        With the retriever's ``support`` s (< top_k) and the keys in host memory, each query gets its s
        nearest candidates by exact inner product with the full keys instead, the rows routing would
        attend anyway (``HopfieldRetriever._nearest``), scored in place by FAISS rather than gathered
        by torch (the same routes, in less time)."""
        if self.exact_on_device or self._index is None or len(keys) < self.min_keys:
            return None
        ids = self.search(queries.detach().to(torch.float32).cpu().numpy())
        rows = keys.rows_of(torch.from_numpy(ids))  # -1 padding stays -1
        if (rows.numpy() < 0).all(axis=1).any():
            return None
        if 0 < support < rows.shape[1]:
            nearest = _nearest_rows(keys.matrix, queries, rows, support)
            if nearest is not None:
                rows = nearest
        return rows.to(queries.device)

    def _rebuild_from(self, keys: KeysView) -> None:
        log.info("key index: building over %d keys", len(keys))
        self.rebuild(keys.entry_ids.cpu().numpy(), keys.matrix.detach().to(torch.float32).cpu().numpy())

    def _reconcile(self, entry_ids: set[int], keys: KeysView) -> None:
        """Make the index agree with ``keys`` on these entries: gone, or indexed under their key now."""
        ids = np.fromiter(entry_ids, dtype=np.int64, count=len(entry_ids))
        rows = keys.rows_of(torch.from_numpy(ids)).numpy()
        self.remove(ids[rows < 0])
        present = rows >= 0
        if present.any():
            at = torch.from_numpy(rows[present]).to(keys.matrix.device)
            self.add(ids[present], keys.matrix[at].detach().to(torch.float32).cpu().numpy())


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
    with omp_threads(1 if len(q) < PARALLEL_QUERIES else 0):
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(ip), faiss.swig_ptr(q), faiss.swig_ptr(k), faiss.swig_ptr(safe), k.shape[1], *ids.shape
        )
    ip[ids < 0] = -np.inf
    pick = np.argpartition(-ip, s - 1, axis=1)[:, :s]
    kept = np.take_along_axis(ids, pick, axis=1)
    kept[np.take_along_axis(ip, pick, axis=1) == -np.inf] = -1
    return torch.from_numpy(kept)
