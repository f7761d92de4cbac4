"""KeyIndex behaviour on synthetic clustered unit keys (no model): candidates hold the exact best
key, removals and codebook changes are mirrored, prefiltered routing equals exact routing, and the
index reads the codebook only through the router's ``KeysView``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from horen_core.codebook import Codebook
from horen_core.retrieval import HopfieldRetriever
from horen_core.routing import KeysView, Router
from service.index import KeyIndex
from tests.horen_core.test_hugepages import collapse_supported, huge_bytes, needs_thp

DIM = 256


def clustered_keys(n: int, dim: int = DIM, cluster: int = 16, spread: float = 0.8, seed: int = 0) -> np.ndarray:
    """Unit keys in clusters of ``cluster`` whose members share ~1/(1+spread^2) of their direction."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // cluster), dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    noise = rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    keys = centers[rng.integers(0, len(centers), n)] + spread * noise
    return keys / np.linalg.norm(keys, axis=1, keepdims=True)


def paraphrases(keys: np.ndarray, cos: float = 0.9, seed: int = 1) -> np.ndarray:
    """Unit queries at exactly ``cos`` from their source keys."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(keys.shape).astype(np.float32)
    noise -= (noise * keys).sum(axis=1, keepdims=True) * keys
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return (cos * keys + np.sqrt(1 - cos**2) * noise).astype(np.float32)


def exact_top1(queries: np.ndarray, keys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return ids[(queries @ keys.T).argmax(axis=1)]


def small_index(**kw) -> KeyIndex:
    kw.setdefault("reduced_dim", 32)
    kw.setdefault("code_dims", 2)  # 16 bytes per key at 32 dimensions
    kw.setdefault("min_keys", 0)
    kw.setdefault("pq_min_keys", 1000)  # the quantised scan, as at scale, for all but the smallest
    kw.setdefault("scan_threads", 2)  # two shards, each searched on its own thread
    kw.setdefault("top_k", 32)
    return KeyIndex(DIM, **kw)


def codebook_with(keys: np.ndarray) -> Codebook:
    cb = Codebook(keys.shape[1], 2)
    for i, k in enumerate(keys):
        cb.add(i + 1, torch.from_numpy(k), torch.zeros(2), [i])
    return cb


@pytest.mark.parametrize("code_dims, kind", [(2, "pca32-pq16x4fs-refine2048"), (4, "pca64-pq16x4fs-refine2048")])
def test_candidates_contain_exact_top1(code_dims, kind):
    keys = clustered_keys(3000)
    ids = np.arange(100, 3100, dtype=np.int64)
    # the same 8 bytes per key: 32 dimensions two to a code, or 64 four to a code
    index = small_index(code_dims=code_dims, reduced_dim=16 * code_dims)
    index.rebuild(ids, keys)
    q = paraphrases(keys[::7])
    found = index.search(q)
    assert found.shape == (len(q), index.top_k)
    assert np.isin(found, ids).all()  # entry ids, never rows; the index is bigger than top_k
    assert (found == exact_top1(q, keys, ids)[:, None]).any(axis=1).all()
    assert index.kind == kind


def test_scanned_codes_are_reranked_by_exact_distance_in_the_reduced_space():
    keys = clustered_keys(3000)
    ids = np.arange(100, 3100, dtype=np.int64)
    # one shard each, so that both scans fetch the same 64 codes
    wide, narrow = small_index(top_k=64, scan_k=0, scan_threads=1), small_index(top_k=8, scan_k=64, scan_threads=1)
    wide.rebuild(ids, keys)
    narrow.rebuild(ids, keys)
    q = paraphrases(keys[::7])
    found = narrow.search(q)
    assert found.shape == (len(q), 8) and (found >= 0).all()
    # the 8 nearest of the scan's 64 by exact distance between projected keys, nearest first
    x, reduced = narrow._project(q, queries=True), narrow._project(keys)
    dist = lambda e: np.square(reduced[e - 100] - x[:, None, :]).sum(axis=2)  # noqa: E731
    d_found = dist(found)
    assert (np.diff(d_found, axis=1) >= -1e-5).all()
    np.testing.assert_allclose(d_found, np.sort(dist(wide.search(q)), axis=1)[:, :8], rtol=1e-4, atol=1e-5)
    assert (found == exact_top1(q, keys, ids)[:, None]).any(axis=1).all()
    # removed entries never come back; the next nearest take their places
    gone = found[:5, 0]
    narrow.remove(gone)
    again = narrow.search(q[:5])
    assert not np.isin(again, gone).any() and (again >= 0).all()
    assert (again[:, 0] == found[:5, 1]).all()


def test_shards_stay_equal_and_answer_one_query_as_a_batch():
    keys = clustered_keys(3001)
    ids = np.arange(3001, dtype=np.int64)
    index = small_index(top_k=16, scan_threads=3)
    index.rebuild(ids[:3000], keys[:3000])
    assert [p.ntotal for p in index._index._parts] == [1000, 1000, 1000]  # one bulk add, spread
    index.add(ids[3000:], keys[3000:])
    assert sorted(p.ntotal for p in index._index._parts) == [1000, 1000, 1001]
    # fewer queries than _PARALLEL_QUERIES: shards on threads; more: in turn, FAISS over the queries
    q = paraphrases(keys[::60])
    assert len(q) >= 32
    batch = index.search(q)
    alone = np.concatenate([index.search(q[i : i + 1]) for i in range(len(q))])
    np.testing.assert_array_equal(alone, batch)
    assert (batch[:, 0] == exact_top1(q, keys, ids)).mean() > 0.9


def test_rotated_pca_basis_keeps_distances_and_order():
    keys = clustered_keys(600)
    ids = np.arange(600, dtype=np.int64)
    rotated, plain = small_index(pq_min_keys=10**6), small_index(pq_min_keys=10**6, rotate=False)
    rotated.rebuild(ids, keys)
    plain.rebuild(ids, keys)
    xr, xp = rotated._project(keys[:40]), plain._project(keys[:40])
    assert not np.allclose(xr, xp, atol=1e-3)  # a different basis of the same subspace
    gram = lambda x: x @ x.T  # noqa: E731
    np.testing.assert_allclose(gram(xr), gram(xp), atol=1e-4)
    q = paraphrases(keys[::6])
    assert (rotated.search(q)[:, 0] == plain.search(q)[:, 0]).all()


def test_index_space_keeps_each_keys_residual_norm():
    """Components plus one coordinate for the residual's norm (keys: |r_k|; queries: lam |r_q|), so
    |y_q - y_k|^2 = |p_q - p_k|^2 + (lam |r_q| - |r_k|)^2 in any rotation."""
    keys = clustered_keys(3000)
    index = small_index(pq_min_keys=10**6)
    index.rebuild(np.arange(3000, dtype=np.int64), keys)
    lam = index.projection.query_residual
    assert 0.2 < lam < 0.9  # clustered keys: neighbours share part of their residual
    noise = np.random.default_rng(2).standard_normal((3000, DIM)).astype(np.float32)
    iid = KeyIndex(DIM, reduced_dim=32, min_keys=0, pq_min_keys=10**6)
    iid.rebuild(np.arange(3000, dtype=np.int64), noise / np.linalg.norm(noise, axis=1, keepdims=True))
    assert iid.projection.query_residual < lam / 2  # independent keys: residuals barely correlate
    q = paraphrases(keys[:50])
    yk, yq = index._project(keys[:50]), index._project(q, queries=True)
    ck, cq = keys[:50] - index.projection.mean, q - index.projection.mean
    pk, pq = ck @ index.projection.basis, cq @ index.projection.basis  # rotated components and norm share one frame
    np.testing.assert_allclose((yk * yk).sum(1), (ck * ck).sum(1), rtol=1e-4)  # a key keeps its norm
    rk = np.sqrt(np.maximum((ck * ck).sum(1) - (pk * pk).sum(1), 0))
    rq = np.sqrt(np.maximum((cq * cq).sum(1) - (pq * pq).sum(1), 0))
    expected = ((pq - pk) ** 2).sum(1) + (lam * rq - rk) ** 2
    np.testing.assert_allclose(((yq - yk) ** 2).sum(1), expected, rtol=1e-4, atol=1e-5)


def test_small_index_searches_full_keys_and_pads():
    keys = clustered_keys(10)
    index = small_index()
    index.add(np.arange(10), keys)
    found = index.search(keys[:3])
    assert index.kind == f"pca{DIM}-flat"  # too few keys to fit a projection or quantise
    assert (found[:, 0] == np.arange(3)).all()
    assert (found[:, 10:] == -1).all() and (found[:, :10] >= 0).all()


def test_removal_hides_id():
    keys = clustered_keys(2000)
    ids = np.arange(2000, dtype=np.int64)
    index = small_index(rebuild_fraction=0.5)
    index.rebuild(ids, keys)
    gone = ids[::10]
    index.remove(gone)
    index.remove([10**9])  # unknown ids are ignored
    assert len(index) == 2000 - len(gone)
    assert index.tombstones() == len(gone)
    found = index.search(keys[gone])
    assert not np.isin(found, gone).any()
    assert (found >= 0).all()  # removed entries do not take candidate slots
    kept = ids[1::10]
    assert (index.search(keys[kept]) == kept[:, None]).any(axis=1).all()  # a kept key is a candidate for itself


def test_tombstones_past_the_fraction_trigger_a_rebuild():
    keys = clustered_keys(1000)
    ids = np.arange(1000, dtype=np.int64)
    index = small_index(rebuild_fraction=0.2)
    index.rebuild(ids, keys)
    index.remove(ids[:150])
    assert index.tombstones() == 150
    index.remove(ids[150:300])  # 300 dead > 0.2 * 700 live
    assert index.tombstones() == 0 and len(index) == 700
    q = paraphrases(keys[300:])
    assert (index.search(q) == exact_top1(q, keys[300:], ids[300:])[:, None]).any(axis=1).all()
    assert not np.isin(index.search(keys[:300]), ids[:300]).any()


def test_add_replaces_an_existing_id():
    keys = clustered_keys(1000)
    index = small_index()
    index.rebuild(np.arange(1000), keys)
    index.add(np.array([5]), keys[900:901])  # entry 5 now has entry 900's key
    assert len(index) == 1000
    assert 5 in index.search(keys[900:901])[0]
    assert 5 not in index.search(keys[5:6])[0, :1]


def test_rebuild_equals_incremental():
    keys = clustered_keys(3000)
    ids = np.arange(3000, dtype=np.int64)
    fresh = small_index()
    fresh.rebuild(ids[1000:], keys[1000:])
    grown = small_index()
    grown.rebuild(ids[:2000], keys[:2000])
    grown.remove(ids[:1000])
    grown.add(ids[2000:], keys[2000:])
    assert len(grown) == len(fresh) == 2000
    q = paraphrases(keys[1000::3])
    want = exact_top1(q, keys[1000:], ids[1000:])
    for index in (fresh, grown):
        found = index.search(q)
        assert (found == want[:, None]).any(axis=1).all()
        assert np.isin(found[found >= 0], ids[1000:]).all()


def test_rejects_bad_shapes_and_duplicate_ids():
    index = small_index()
    with pytest.raises(ValueError):
        index.add(np.arange(3), np.zeros((3, DIM + 1), np.float32))
    with pytest.raises(ValueError):
        index.add(np.array([1, 1]), np.zeros((2, DIM), np.float32))


def test_no_candidates_below_min_keys():
    keys = clustered_keys(600)
    cb = codebook_with(keys[:300])
    index, view = small_index(min_keys=500), KeysView(cb)
    index.reset(view)
    assert not index.built and index.kind == "none-exact-below-500"
    assert index.candidates(torch.from_numpy(keys[:2]), view) is None
    changes = [cb.add(i + 1, torch.from_numpy(keys[i]), torch.zeros(2), [i]) for i in range(300, 600)]
    index.apply(changes, view)  # the codebook reached min_keys: built over all of it
    rows = index.candidates(torch.from_numpy(keys[:2]), view)
    assert index.built and len(index) == 600
    assert rows is not None and rows.dtype == torch.long and rows.shape == (2, index.top_k)
    assert rows[:, 0].tolist() == [0, 1]


def test_cuda_codebook_without_faiss_gpu_is_routed_exactly():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("FAISS has GPU support here: the GPU flat index is used instead")
    keys = clustered_keys(600)
    cb = codebook_with(keys)
    view = KeysView(cb)
    index = small_index(use_gpu=True)  # what the engine asks for when the codebook is on a CUDA device
    index.reset(view)
    assert index.exact_on_device and index.kind == "none-exact-on-device"
    assert not index.built and index.candidates(torch.from_numpy(keys[:2]), view) is None
    cpu = small_index()
    cpu.reset(view)
    assert cpu.candidates(torch.from_numpy(keys[:2]), view) is not None  # unlike on the CPU


def test_candidates_map_entry_ids_to_current_rows():
    keys = clustered_keys(1200)
    cb = codebook_with(keys)
    index, view = small_index(), KeysView(cb)
    index.reset(view)
    last_entry = cb.entry_id_at(len(cb) - 1)
    change = cb.rollback(1)  # entry 1 (row 0) goes; the last row moves into row 0
    assert cb.row_of(last_entry) == 0
    index.apply([change], view)
    rows = index.candidates(torch.from_numpy(keys[[0, 1199]]), view)
    assert rows[1, 0].item() == 0  # the moved key is found at its new row
    assert (rows >= 0).all() and (rows < len(cb)).all()
    assert 1 not in index.search(keys[[0]])  # the removal of entry 1 was applied


def test_apply_mirrors_codebook_changes():
    keys = clustered_keys(1500)
    cb = codebook_with(keys[:1000])
    view = KeysView(cb)
    hinted, stepwise = small_index(), small_index()
    hinted.reset(view)
    stepwise.reset(view)
    changes = [cb.add(1001 + i, torch.from_numpy(keys[1000 + i]), torch.zeros(2), [i]) for i in range(200)]
    changes += [cb.rollback(e) for e in range(1, 101)]
    # a retrain, which moves the entry's key to the mean of its owners' queries
    changes.append(cb.retrain(5000, 300, torch.from_numpy(keys[1450]), torch.ones(2)))
    stepwise.apply(changes, view)  # once here, and for the hinted one all at once below
    # a retrain then a rollback of the oldest version: entry 200 keeps its id but takes a new key
    more = [cb.retrain(5001, 200, torch.from_numpy(keys[1400]), torch.ones(2)), cb.rollback(200)]
    for change in more:
        stepwise.apply([change], view)
    hinted.apply(changes + more, view)
    fresh = small_index()
    fresh.rebuild(cb.row_entry_ids.numpy(), cb.keys.numpy())
    cur_keys, cur_ids = cb.keys.numpy(), cb.row_entry_ids.numpy()
    q = paraphrases(np.concatenate([keys[1000:1200], keys[1400:1401], keys[100:1000:9]]))
    want = exact_top1(q, cur_keys, cur_ids)
    for index in (hinted, stepwise, fresh):
        assert len(index) == len(cb) == 1100
        found = index.search(q)
        assert (found == want[:, None]).any(axis=1).all()
        assert np.isin(found[found >= 0], cur_ids).all()
        assert 200 in index.search(keys[1400:1401])[0]
        centroid = cb.keys[cb.row_of(300)].numpy()[None]
        assert index.search(centroid)[0, 0] == 300  # indexed under the retrained key


def test_routing_does_no_index_upkeep(monkeypatch):
    cb = codebook_with(clustered_keys(800))
    router = Router(cb, HopfieldRetriever(alpha=0.1, beta=20.0, steps=1, threshold=0.8))
    index = small_index()
    router.attach(index)

    def fail(*_a, **_k):
        raise AssertionError("the index did work although the codebook did not change")

    monkeypatch.setattr(index, "_reconcile", fail)
    monkeypatch.setattr(index, "rebuild", fail)
    router.apply([])
    router.route(torch.from_numpy(clustered_keys(2, seed=5)))


def test_exact_scan_below_pq_min_keys_then_quantised_once_grown():
    keys = clustered_keys(1500)
    cb = codebook_with(keys[:300])
    index, view = small_index(pq_min_keys=1200), KeysView(cb)
    index.reset(view)
    assert index.kind == "pca32-flat"
    q = paraphrases(keys[:300:5])
    assert (index.search(q)[:, 0] == exact_top1(q, keys[:300], np.arange(1, 301))).all()  # exact in PCA space
    for i in range(300, 1500):
        index.apply([cb.add(i + 1, torch.from_numpy(keys[i]), torch.zeros(2), [i])], view)
    assert index.kind == "pca32-pq16x4fs-refine2048" and len(index) == 1500
    q = paraphrases(keys[::7])
    assert (index.search(q) == exact_top1(q, keys, np.arange(1, 1501))[:, None]).any(axis=1).all()


@pytest.mark.parametrize("pq_min_keys", [1000, 10**6], ids=["sharded-pq", "flat"])
def test_compaction_keeps_survivors_searchable_past_the_tombstone_cap(pq_min_keys):
    keys = clustered_keys(4000)
    ids = np.arange(4000, dtype=np.int64)
    index = small_index(rebuild_fraction=0.5, pq_min_keys=pq_min_keys)  # 0.5 * live > the 256 over-fetch cap
    index.rebuild(ids, keys)
    for chunk in np.array_split(ids[::4], 10):
        index.remove(chunk)
        assert index.tombstones() <= 256
    assert len(index) == 3000
    kept = np.setdiff1d(ids, ids[::4])
    q = paraphrases(keys[kept[::5]])
    found = index.search(q)
    assert not np.isin(found, ids[::4]).any() and (found >= 0).all()
    assert (found == exact_top1(q, keys[kept], kept)[:, None]).any(axis=1).all()


def test_apply_refits_the_projection_when_the_codebook_doubles():
    keys = clustered_keys(2000)
    cb = codebook_with(keys[:600])
    index, view = small_index(pq_min_keys=10**6), KeysView(cb)  # the projection's refit alone
    index.reset(view)
    assert index._fit_count == 600
    for i in range(600, 1300):
        index.apply([cb.add(i + 1, torch.from_numpy(keys[i]), torch.zeros(2), [i])], view)
    assert index._fit_count == 1200 and len(index) == 1300


def test_prefiltered_routing_equals_exact_routing():
    keys = clustered_keys(4000, cluster=32, spread=0.7)
    cb = codebook_with(keys)
    index = small_index(top_k=32)
    retriever = HopfieldRetriever(alpha=0.1, beta=20.0, steps=1, threshold=0.8)
    router = Router(cb, retriever)
    router.attach(index)
    rng = np.random.default_rng(3)
    src = rng.choice(len(keys), 600, replace=False)
    near = np.concatenate([paraphrases(keys[src[:300]], 0.9), paraphrases(keys[src[300:]], 0.82, seed=2)])
    unrelated = clustered_keys(200, seed=9)
    queries = F.normalize(torch.from_numpy(np.concatenate([near, unrelated])), dim=-1)
    order = cb.row_entry_ids
    exact = retriever.route(queries, cb.keys, order=order)
    candidates = index.candidates(queries, router.keys)
    assert candidates is not None
    pre = retriever.route(queries, cb.keys, candidates, order=order)
    assert (exact.rows[:600] >= 0).float().mean() > 0.9  # the check is about real hits
    assert torch.equal(pre.rows, exact.rows)
    assert torch.equal(router.route(queries).rows, exact.rows)
    hit = exact.rows >= 0
    assert torch.allclose(pre.scores[hit], exact.scores[hit], atol=1e-3)


def test_provider_with_support_hands_over_the_nearest_candidates_by_exact_cosine():
    keys = clustered_keys(4000, cluster=32, spread=0.7)
    cb = codebook_with(keys)
    index, view = small_index(top_k=32), KeysView(cb)
    index.reset(view)
    queries = F.normalize(torch.from_numpy(paraphrases(keys[::40], 0.85)), dim=-1)
    all32, best8 = index.candidates(queries, view), index.candidates(queries, view, support=8)
    assert all32.shape == (len(queries), 32) and best8.shape == (len(queries), 8)
    cos = torch.bmm(cb.keys[all32.clamp(min=0)], queries[:, :, None]).squeeze(-1).masked_fill(all32 < 0, -2)
    expected = all32.gather(1, cos.topk(8, dim=1).indices)
    assert torch.equal(best8.sort(dim=1).values, expected.sort(dim=1).values)
    retriever = HopfieldRetriever(alpha=0.1, beta=20.0, steps=2, threshold=0.8, support=8)
    order = cb.row_entry_ids
    exact = retriever.route(queries, cb.keys, order=order)
    assert (exact.rows >= 0).float().mean() > 0.9
    assert torch.equal(retriever.route(queries, cb.keys, best8, order=order).rows, exact.rows)
    assert torch.equal(retriever.route(queries, cb.keys, all32, order=order).rows, exact.rows)
    # fewer keys than candidates: the padding stays padding, never a row
    few = KeysView(codebook_with(keys[:5]))
    tiny = small_index(top_k=32)
    tiny.reset(few)
    rows = tiny.candidates(queries[:3], few, support=8)
    assert rows.shape == (3, 8) and sorted(rows[0].tolist()) == [-1, -1, -1, 0, 1, 2, 3, 4]


@pytest.mark.gpu
def test_gpu_flat_index_finds_exact_top1():
    import faiss

    if not torch.cuda.is_available() or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("needs faiss with GPU support and a CUDA device")
    keys = clustered_keys(3000)
    ids = np.arange(3000, dtype=np.int64)
    index = small_index(use_gpu=True, rebuild_fraction=0.5)
    index.rebuild(ids, keys)
    assert index.kind == "gpu-flat-ip"
    q = paraphrases(keys[::5])
    found = index.search(q)
    assert (found[:, 0] == exact_top1(q, keys, ids)).all()
    index.remove(ids[::5])
    assert not np.isin(index.search(keys[::5]), ids[::5]).any()


@needs_thp
def test_the_re_rank_vectors_sit_on_huge_pages_after_a_build_and_after_growing():
    if not collapse_supported():
        pytest.skip("kernel without MADV_COLLAPSE: written vectors reach huge pages only in the background")
    index = KeyIndex(DIM, min_keys=0, pq_min_keys=1000, scan_threads=2, top_k=32, scan_k=256)
    n = 80_000  # 40K keys of 1 KB per shard: 40 MB of re-rank vectors each
    keys = clustered_keys(n, seed=30)
    index.rebuild(np.arange(n), keys)

    def refine_vectors() -> list[torch.Tensor]:
        return [torch.from_numpy(v) for v in index._index.refine_vectors()]

    assert all(huge_bytes(v) >= 24 << 20 for v in refine_vectors())
    index.add(np.arange(n, 2 * n), clustered_keys(n, seed=31))  # the vectors reallocate as they grow
    assert all(huge_bytes(v) >= 48 << 20 for v in refine_vectors())
    q = paraphrases(keys[:50], seed=32)
    assert (index.search(q)[:, 0] == np.arange(50)).mean() > 0.9


def _watched(cls: type) -> type:
    """A subclass of ``cls`` that fails any read of its private attributes from the service's code."""

    def __getattribute__(self, name: str):
        if name.startswith("_") and not name.startswith("__"):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("service"):
                raise AssertionError(f"{caller} read {cls.__name__}.{name}")
        return object.__getattribute__(self, name)

    return type(f"Watched{cls.__name__}", (cls,), {"__getattribute__": __getattribute__})


def test_the_index_reads_the_codebook_only_through_the_keys_view(tmp_path):
    keys = clustered_keys(1600)
    cb = _watched(Codebook)(DIM, 2)
    for i in range(300):
        cb.add(i + 1, torch.from_numpy(keys[i]), torch.zeros(2), [i])
    router = Router(cb, HopfieldRetriever(alpha=0.1, beta=20.0, steps=2, threshold=0.8, support=8))
    router.keys = _watched(KeysView)(cb)
    index = small_index(min_keys=500)
    router.attach(index)
    queries = torch.from_numpy(paraphrases(keys[:1200:50]))
    ids = list(range(301, 1201))
    router.apply(cb.add_many(ids, torch.from_numpy(keys[300:1200]), torch.zeros(900, 2), [[i] for i in ids], ids))
    assert index.kind == "pca32-pq16x4fs-refine2048"  # built from the changes alone
    router.apply([cb.retrain(5000, 7, torch.from_numpy(keys[1300]), torch.ones(2)), cb.rollback(9)])
    assert router.route(queries).rows.shape == (len(queries),)
    assert index.candidates(queries, router.keys, 8).shape == (len(queries), 8)
    cb.save(tmp_path / "cb.safetensors")
    cb.load(tmp_path / "cb.safetensors")
    router.reloaded()
    assert len(index) == len(cb) == 1199


def test_the_index_package_imports_no_codebook_internals():
    """service.index takes from horen_core only the change records, the keys view and huge pages."""
    allowed = {
        "horen_core.codebook": {"CodebookChange"},
        "horen_core.routing": {"KeysView"},
        "horen_core": {"hugepages"},
    }
    package = Path(__file__).resolve().parents[2] / "service" / "index"
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("horen_core") for a in node.names), path.name
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("horen_core"):
                assert {a.name for a in node.names} <= allowed.get(node.module, set()), f"{path.name}: {node.module}"
