"""HopfieldRetriever's support: each query attends its nearest keys only, so routing does not drift
as far keys pile up, and routing over candidates that hold those keys equals exhaustive routing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from horen_core import HopfieldRetriever
from horen_core.config import HorenConfig

DIM = 64


def bulk_keys(n: int, seed: int, shared: float = 0.5) -> torch.Tensor:
    """Unit keys sharing one direction (cosine ~``shared`` with each other), like a real layer's."""
    g = torch.Generator().manual_seed(seed)
    mean = F.normalize(torch.ones(DIM), dim=0)
    rest = F.normalize(torch.randn(n, DIM, generator=g), dim=-1)
    return F.normalize(shared**0.5 * mean + (1 - shared) ** 0.5 * rest, dim=-1)


def near(keys: torch.Tensor, cos: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(keys.shape, generator=g)
    noise = F.normalize(noise - (noise * keys).sum(-1, keepdim=True) * keys, dim=-1)
    return F.normalize(cos * keys + (1 - cos**2) ** 0.5 * noise, dim=-1)


def retriever(support: int) -> HopfieldRetriever:
    return HopfieldRetriever(alpha=0.1, beta=20.0, steps=2, threshold=0.8, support=support)


def test_default_config_attends_32_nearest():
    assert HorenConfig().hopfield_support == 32


def test_far_keys_barely_move_supported_routing_but_drag_full_attention():
    edits = bulk_keys(50, seed=1)
    queries = near(edits, 0.84, seed=2)
    crowd = torch.cat([edits, bulk_keys(20000, seed=3)])  # thousands of unrelated keys at cosine ~0.5
    sparse, full = retriever(32), retriever(0)
    alone, crowded = sparse.route(queries, edits), sparse.route(queries, crowd)
    assert torch.equal(alone.rows, torch.arange(50))
    assert torch.equal(crowded.rows, alone.rows)
    assert (crowded.scores - alone.scores).abs().max() < 0.03  # at most 31 other keys share the attention
    dragged = full.route(queries, crowd)
    assert torch.allclose(full.route(queries, edits).scores, alone.scores, atol=1e-3)  # alike without the crowd
    assert (dragged.scores < crowded.scores).all()  # the bulk's softmax mass pulls every query away
    assert (crowded.scores - dragged.scores).mean() > 0.005


def test_candidates_holding_the_nearest_keys_route_like_exhaustive_search():
    keys = torch.cat([bulk_keys(3000, seed=4), bulk_keys(200, seed=5, shared=0.9)])
    queries = torch.cat([near(keys[::40], 0.86, seed=6), bulk_keys(40, seed=7)])
    r = retriever(32)
    exact = r.route(queries, keys)
    cos = queries @ keys.T
    wide = cos.topk(100, dim=-1).indices[:, torch.randperm(100)]  # a superset, in any order
    padded = torch.cat([cos.topk(32, dim=-1).indices, torch.full((len(queries), 8), -1)], dim=1)
    for candidates in (wide, padded):
        got = r.route(queries, keys, candidates)
        assert torch.equal(got.rows, exact.rows)
        assert torch.allclose(got.scores, exact.scores, atol=1e-6)
    assert (exact.rows[: len(keys[::40])] >= 0).float().mean() > 0.9
    missing = cos.topk(33, dim=-1).indices[:, 1:]  # the nearest key left out: routes elsewhere or nowhere
    assert not torch.equal(r.route(queries, keys, missing).rows, exact.rows)


def test_a_few_queries_on_the_cpu_route_as_a_batch_does():
    """Up to _HOST_QUERIES queries take the numpy path; a larger batch the torch one. Both must agree,
    padding, identical keys (the larger order wins) and the threshold included."""
    from horen_core.retrieval import _HOST_QUERIES

    keys = torch.cat([bulk_keys(2000, seed=8), bulk_keys(100, seed=9, shared=0.9)])
    keys[5] = keys[7]  # the same prompt edited twice
    unrelated = F.normalize(torch.randn(6, DIM, generator=torch.Generator().manual_seed(11)), dim=-1)
    queries = torch.cat([near(keys[::50], 0.86, seed=10), keys[5:6], unrelated])
    assert len(queries) > _HOST_QUERIES
    order = torch.arange(len(keys)).flip(0)  # row 5 outranks row 7
    cos = queries @ keys.T
    pads = torch.full((len(queries), 4), -1)
    for r in (retriever(32), HopfieldRetriever(alpha=0.3, beta=10.0, steps=3, threshold=0.9, support=16)):
        for candidates in (None, torch.cat([cos.topk(40, dim=-1).indices, pads], dim=1)):
            batch = r.route(queries, keys, candidates, order=order)
            for i in range(len(queries)):
                one = r.route(
                    queries[i : i + 1], keys, None if candidates is None else candidates[i : i + 1], order=order
                )
                assert int(one.rows[0]) == int(batch.rows[i])
                assert abs(float(one.scores[0]) - float(batch.scores[i])) < 1e-5
            assert int(batch.rows[len(keys[::50])]) == 5
            assert 0 < int((batch.rows >= 0).sum()) < len(queries)
    nothing = r.route(queries[:2], keys, torch.full((2, 8), -1))
    assert torch.equal(nothing.rows, torch.tensor([-1, -1]))


def test_runners_up_are_the_next_rows_above_the_threshold_in_both_paths():
    """``runners_up`` m: the m best rows after the chosen one, best first, -1 where below the
    threshold; the numpy path (a few queries over candidates) and the torch one agree."""
    keys = bulk_keys(500, seed=12)
    anchor = keys[10]
    keys[11] = near(anchor[None], 0.95, seed=13)[0]  # two more keys near row 10's
    keys[12] = near(anchor[None], 0.90, seed=14)[0]
    query = near(anchor[None], 0.99, seed=15)
    r = retriever(32)
    cos = query @ keys.T
    for candidates in (None, cos.topk(40, dim=-1).indices):
        one = r.route(query, keys, candidates, runners_up=3)  # numpy path with candidates
        many = r.route(
            query.expand(12, -1), keys, None if candidates is None else candidates.expand(12, -1), runners_up=3
        )
        for got in (one, many):
            assert int(got.rows[0]) == 10
            nxt = got.next_rows[0].tolist()
            assert set(nxt[:2]) == {11, 12} and nxt[2] == -1  # the rest of the keys are far below 0.8
            assert float(got.next_scores[0, 0]) >= float(got.next_scores[0, 1]) >= 0.8 > float(got.next_scores[0, 2])
            assert float(got.next_scores[0, 0]) <= float(got.scores[0])
    assert r.route(query, keys).next_rows is None
