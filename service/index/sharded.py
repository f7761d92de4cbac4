"""The quantised scan of ``KeyIndex``: a trained ``IndexPQFastScan`` split into shards that one
search scans on parallel threads, and the OpenMP settings FAISS searches run under."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from horen_core import hugepages

ADD_CHUNK = 65536  # rows projected and added per FAISS call, to bound temporary memory
# FAISS parallelises a search over its queries; for a few queries waking OpenMP threads costs more
# than it saves (and a lot when the cores are busy), so small searches run on the calling thread
PARALLEL_QUERIES = 32


@contextlib.contextmanager
def omp_threads(n: int) -> Iterator[None]:
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
    with omp_threads(1):  # per thread: a few queries are not worth waking OpenMP's threads
        return index.search(x, k)


class ShardedScan:
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
        if len(x) >= PARALLEL_QUERIES:  # FAISS parallelises over the queries: the shards in turn
            found = [part.search(x, k) for part in self._parts]
        else:  # this thread scans the first shard, workers the others (FAISS releases the GIL)
            pending = [_workers().submit(_search_alone, part, x, k) for part in self._parts[1:]]
            found = [_search_alone(self._parts[0], x, k)] + [p.result() for p in pending]
        if len(found) == 1:
            return found[0]
        dist, labels = (np.concatenate(a, axis=1) for a in zip(*found))
        nearest = np.argsort(np.where(labels >= 0, dist, np.inf), axis=1, kind="stable")[:, :k]
        return np.take_along_axis(dist, nearest, axis=1), np.take_along_axis(labels, nearest, axis=1)

    def compacted(self, live: np.ndarray) -> ShardedScan:
        """A copy holding only the ``live`` labels (sorted), renumbered 0..len(live)-1 in their order.
        What a shard reconstructs (the kept vectors, else the decoded codes) encodes to the same codes."""
        fresh = ShardedScan(self._trained, len(self._parts), self.refine)
        for old, new in zip(self._parts, fresh._parts):
            ids = faiss.vector_to_array(old.id_map)
            keep = np.isin(ids, live, assume_unique=True)
            for i in range(0, len(ids), ADD_CHUNK):
                rows = np.nonzero(keep[i : i + ADD_CHUNK])[0] + i
                if len(rows):
                    new.add_with_ids(old.index.reconstruct_batch(rows), np.searchsorted(live, ids[rows]))
        fresh.ntotal = len(live)
        fresh.advise_huge_pages()
        return fresh
