"""KeyIndex: an approximate prefilter over the codebook's unit keys, kept as derived state.

Routing compares a query with every key; at a million keys that is seconds per query on a CPU. The
index returns, per query, the ``top_k`` entries nearest to it, and the editor then refines and
thresholds over those keys only (``HopfieldRetriever.route(..., candidates)``), so the index only
has to contain the key exact routing would pick, not decide anything itself.

On the CPU it is an HNSW graph (FAISS ``IndexHNSWFlat``, L2) over a PCA-reduced copy of the keys:
on unit vectors L2 order is cosine order, PCA keeps the directions the keys differ along, and the
graph over 128 instead of 1536 dimensions is ~10x cheaper to build and search at the same recall
(measured in ``bench/index_bench.py``). HNSW cannot delete, so a removed entry becomes a tombstone
that searches skip, and the graph is rebuilt when tombstones pass ``rebuild_fraction`` of the live
entries. With ``use_gpu`` on a CUDA host it is an exact flat inner-product index on the GPU instead.

FAISS stores sequential labels; ``_label_entry`` maps each to the stable entry id (never a row,
since codebook rows move), so a removed vector and the re-added key of the same entry differ.
``candidate_provider`` maps entry ids to the codebook's current rows at query time.

Not thread-safe: the engine thread is the only caller, of ``sync`` and of the provider alike.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import faiss
import numpy as np
import torch

from horen_core.codebook import Codebook, CodebookChange

log = logging.getLogger(__name__)

CandidateProvider = Callable[[torch.Tensor], torch.Tensor | None]

# Below this many keys exact routing is as fast as index search + routing over candidates, and
# exact (bench/index_bench.py: at 1536 dims the two cross between 10K and 20K keys on this 2-core CPU)
DEFAULT_MIN_KEYS = 16384
_SIGNATURE_PROBES = 8  # random projections per key that reveal a key changed under the same entry id
_SIGNATURE_TOL = 1e-5  # float noise of recomputing a projection; a changed key moves it ~1e-2
_ADD_CHUNK = 65536  # rows projected and added per FAISS call, to bound temporary memory
_GPU_MAX_K = 2048  # FAISS GPU limit on k; tombstones are over-fetched within it
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


class KeyIndex:
    def __init__(
        self,
        dim: int,
        top_k: int = 32,
        min_keys: int = DEFAULT_MIN_KEYS,
        use_gpu: bool = False,
        *,
        reduced_dim: int = 128,
        hnsw_m: int = 32,
        storage: str = "sq8",
        ef_construction: int = 200,
        ef_search: int = 512,
        rebuild_fraction: float = 0.2,
        pca_sample: int = 20000,
        seed: int = 0,
    ) -> None:
        if top_k < 1 or dim < 1:
            raise ValueError("dim and top_k must be positive")
        self.dim = dim
        self.top_k = top_k
        self.min_keys = min_keys  # the provider answers None (exact routing) below this many keys
        self.reduced_dim = min(reduced_dim, dim)  # PCA dimensions the HNSW graph works in
        self.hnsw_m = hnsw_m  # graph degree (2*M links on the bottom layer)
        if storage not in ("sq8", "flat"):
            raise ValueError("storage is 'sq8' or 'flat'")
        self.storage = storage  # graph vectors as 8-bit codes (4x less memory traffic per hop) or float32
        self.ef_construction = ef_construction  # build-time beam; 200 leaves far fewer unreachable keys than 40
        self.ef_search = ef_search  # search beam; the recall/latency knob (bench: 512 for 0.999 at 1M)
        self.rebuild_fraction = rebuild_fraction  # tombstones per live entry that trigger a rebuild
        self.pca_sample = pca_sample  # keys the PCA is fitted on; refits stop once this many were seen
        self.on_gpu = bool(use_gpu) and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        rng = np.random.default_rng(seed)
        self._seed = seed
        self._probes = rng.standard_normal((dim, _SIGNATURE_PROBES)).astype(np.float32)
        self._probes_t: dict[str, torch.Tensor] = {}
        self._gpu_res = faiss.StandardGpuResources() if self.on_gpu else None
        self._generation: int | None = None  # codebook generation this index reflects
        self._clear()

    def _clear(self) -> None:
        self._index: faiss.Index | None = None
        self._mean: np.ndarray | None = None  # [d] PCA centre
        self._proj: np.ndarray | None = None  # [d, r] PCA basis; None searches the keys themselves
        self._fit_count = 0  # keys the projection was fitted on
        self._label_entry = np.empty(0, dtype=np.int64)  # FAISS label -> entry id, -1 once removed
        self._label_sig = np.empty((0, _SIGNATURE_PROBES), dtype=np.float32)
        self._entry_label: dict[int, int] = {}  # live entry id -> FAISS label
        self._dead: list[int] = []  # tombstoned labels
        self._params: faiss.SearchParameters | None = None  # search params carrying the tombstone filter
        self._keepalive: tuple = ()  # SWIG objects the params point to

    # ---- state ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entry_label)

    @property
    def built(self) -> bool:
        return self._index is not None

    @property
    def kind(self) -> str:
        if self.on_gpu:
            return "gpu-flat-ip"
        r = self.reduced_dim if self._proj is not None else self.dim
        return f"pca{r}-hnsw{self.hnsw_m}-{self.storage}"

    def tombstones(self) -> int:
        return len(self._dead)

    # ---- low-level API (entry ids + keys) --------------------------------------------------
    def rebuild(self, entry_ids: np.ndarray, keys: np.ndarray) -> None:
        """Replace the whole index with these entries (refits the PCA on a sample of ``keys``)."""
        entry_ids, keys = self._check(entry_ids, keys)
        self._clear()
        sample = self._fit(keys)
        self._index = self._new_index(self._project(sample))
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
                self._label_entry[label] = -1
                self._dead.append(label)
                dropped += 1
        if not dropped:
            return
        self._params = None
        if len(self._dead) > self._max_dead():
            self._compact()

    def search(self, queries: np.ndarray) -> np.ndarray:
        """[B, d] unit queries -> [B, top_k] entry ids, nearest first, -1 where fewer were found."""
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        out = np.full((q.shape[0], self.top_k), -1, dtype=np.int64)
        if self._index is None or not self._entry_label:
            return out
        x = self._project(q)
        if self.on_gpu:  # GPU flat has no tombstone filter: over-fetch and drop them
            k = min(self._index.ntotal, self.top_k + len(self._dead), _GPU_MAX_K)
            _, labels = self._index.search(x, k)
        else:
            with _omp_threads(1 if len(x) < _PARALLEL_QUERIES else 0):
                _, labels = self._index.search(x, self.top_k, params=self._search_params())
        entries = np.where(labels >= 0, self._label_entry[np.maximum(labels, 0)], -1)
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
            if n >= self.min_keys:
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

    def candidate_provider(self, codebook: Codebook) -> CandidateProvider:
        """The editor's ``candidate_provider``: unit queries [B, d] -> codebook rows [B, top_k]
        (-1 padded), or None for exact routing (small codebook, or no candidate for some query)."""

        def provide(queries: torch.Tensor) -> torch.Tensor | None:
            if len(codebook) < self.min_keys:
                return None
            if codebook.generation != self._generation:
                self.sync(codebook)
            if self._index is None:
                return None
            ids = self.search(queries.detach().to(torch.float32).cpu().numpy())
            rows = np.full(ids.shape, -1, dtype=np.int64)
            for i, j in zip(*np.nonzero(ids >= 0)):
                try:
                    rows[i, j] = codebook.row_of(int(ids[i, j]))
                except KeyError:
                    pass  # removed since the index saw it
            if (rows < 0).all(axis=1).any():
                return None
            return torch.from_numpy(rows).to(queries.device)

        return provide

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
        if self.on_gpu or self.reduced_dim >= self.dim or n < 2 * self.reduced_dim:
            self._mean = self._proj = None
            return sample
        x = torch.from_numpy(np.ascontiguousarray(sample))
        mean = x.double().mean(dim=0).float()
        x = x - mean
        _, vecs = torch.linalg.eigh((x.T @ x).double())  # ascending eigenvalues
        self._mean = mean.float().numpy()
        self._proj = np.ascontiguousarray(vecs[:, -self.reduced_dim :].flip(1).float().numpy())
        return sample

    def _project(self, x: np.ndarray) -> np.ndarray:
        if self._proj is None:
            return np.ascontiguousarray(x, dtype=np.float32)
        return np.ascontiguousarray((x - self._mean) @ self._proj, dtype=np.float32)

    def _new_index(self, sample: np.ndarray) -> faiss.Index:
        """An empty index for vectors like ``sample`` (projected), which trains its quantizer."""
        if self.on_gpu:
            return faiss.GpuIndexFlatIP(self._gpu_res, self.dim)
        d = sample.shape[1]
        if self.storage == "sq8":
            index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, self.hnsw_m)
            index.train(sample)
        else:
            index = faiss.IndexHNSWFlat(d, self.hnsw_m)
        index.hnsw.efConstruction = self.ef_construction
        return index

    def _append(self, entry_ids: np.ndarray, keys: np.ndarray) -> None:
        assert self._index is not None
        start = self._index.ntotal
        for i in range(0, len(entry_ids), _ADD_CHUNK):
            self._index.add(self._project(keys[i : i + _ADD_CHUNK]))
        self._label_entry = np.concatenate([self._label_entry, entry_ids])
        self._label_sig = np.concatenate([self._label_sig, keys @ self._probes])
        self._entry_label.update(zip(entry_ids.tolist(), range(start, start + len(entry_ids))))

    def _max_dead(self) -> int:
        limit = max(int(self.rebuild_fraction * len(self._entry_label)), self.top_k)
        return min(limit, _GPU_MAX_K - self.top_k) if self.on_gpu else limit

    def _compact(self) -> None:
        """Rebuild from the stored (projected) vectors of live entries, keeping the projection."""
        assert self._index is not None
        live = np.nonzero(self._label_entry >= 0)[0]
        vectors = self._index.reconstruct_n(0, self._index.ntotal)[live]
        entries, sigs = self._label_entry[live], self._label_sig[live]
        log.info("key index: rebuilding %d entries to drop %d tombstones", len(live), len(self._dead))
        rng = np.random.default_rng(self._seed)
        sample = (
            vectors[np.sort(rng.choice(len(live), self._fit_count, replace=False))]
            if len(live) > self._fit_count
            else vectors
        )
        index = self._new_index(np.ascontiguousarray(sample))
        for i in range(0, len(live), _ADD_CHUNK):
            index.add(np.ascontiguousarray(vectors[i : i + _ADD_CHUNK]))
        self._index, self._label_entry, self._label_sig = index, entries, sigs
        self._entry_label = dict(zip(entries.tolist(), range(len(entries))))
        self._dead, self._params, self._keepalive = [], None, ()

    def _search_params(self) -> faiss.SearchParameters:
        if self._params is None:
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.ef_search, self.top_k)
            if self._dead:
                batch = faiss.IDSelectorBatch(np.asarray(self._dead, dtype=np.int64))
                skip = faiss.IDSelectorNot(batch)
                params.sel = skip
                self._keepalive = (batch, skip)
            self._params = params
        return self._params

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
        live = np.nonzero(self._label_entry >= 0)[0]
        indexed = self._label_entry[live]
        self.remove(np.setdiff1d(indexed, ids, assume_unique=True))
        known = np.isin(ids, indexed, assume_unique=True)
        changed = np.zeros(len(ids), dtype=bool)
        if known.any():
            order = np.argsort(indexed)
            labels = live[order[np.searchsorted(indexed[order], ids[known])]]
            now = self._signature(codebook.keys)[known]
            changed[known] = np.abs(now - self._label_sig[labels]).max(axis=1) > _SIGNATURE_TOL
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
                    lab < 0 or np.abs(sig[i] - self._label_sig[lab]).max() > _SIGNATURE_TOL
                    for i, lab in enumerate(labels)
                ]
            )
            ids, keys = ids[keep], keys[keep]
        if len(ids):
            self.add(ids, keys)
