"""The space ``KeyIndex`` searches in: ``r - 1`` principal components of the keys plus one coordinate
for the norm of the residual they leave out, the basis randomly rotated. Why, with measurements:
docs/design.md and docs/benchmarks.md."""

from __future__ import annotations

import numpy as np
import torch

_RESIDUAL_PROBES, _RESIDUAL_NEIGHBOURS = 512, 4  # sampled keys and their nearest others that estimate lam


class Projection:
    """Keys (or queries) [n, d] -> [n, r], fitted on a sample of the keys.

    A key puts the norm of its residual r_k (beyond the components) in the last coordinate, a query
    lam * |r_q|. The squared distance is then the true |q - k|^2 up to a per-query constant and
    2 |r_q| |r_k| (cos(r_q, r_k) - lam), small where lam is the residuals' typical cosine between a
    query and its near keys, estimated between sampled keys and their nearest others. Plain PCA
    distances (no such coordinate) are off by |r_q - r_k|^2, which ranks the keys the components
    describe worst too near."""

    def __init__(self, sample: np.ndarray, reduced_dim: int, seed: int = 0, rotate: bool = True) -> None:
        r = reduced_dim
        x = torch.from_numpy(np.ascontiguousarray(sample))
        mean = x.double().mean(dim=0).float()
        x = x - mean
        _, vecs = torch.linalg.eigh((x.T @ x).double())  # ascending eigenvalues
        basis = vecs[:, -(r - 1) :].flip(1)
        self.query_residual = _residual_cosine(x, basis.float())  # lam
        # a random rotation spreads the variance evenly over the PQ codes (in PCA order the first codes
        # would carry most of it, and the norm coordinate one code alone); distances are unchanged
        rot = torch.eye(r, dtype=torch.float64)
        if rotate:
            gen = torch.Generator().manual_seed(seed)
            rot = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))[0]
        self.mean = mean.float().numpy()  # [d]
        self.basis = np.ascontiguousarray((basis @ rot[: r - 1]).float().numpy())  # [d, r]
        self.norm_axis = np.ascontiguousarray(rot[r - 1].float().numpy())  # [r]: the residual norm's direction

    def __call__(self, x: np.ndarray, queries: bool = False) -> np.ndarray:
        c = np.asarray(x, dtype=np.float32) - self.mean
        y = c @ self.basis
        # the rotation keeps |y| = |components|: the residual is what c has beyond
        residual = np.sqrt(np.maximum(np.einsum("ij,ij->i", c, c) - np.einsum("ij,ij->i", y, y), 0.0))
        y += (self.query_residual * residual if queries else residual)[:, None] * self.norm_axis
        return np.ascontiguousarray(y, dtype=np.float32)


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
