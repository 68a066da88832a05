"""SVD-LLM whitening (Wang et al. 2024): the rank-r optimum of ||(W - BA) X||_F in closed form.

C = E[x x^T] = L L^T (Cholesky, with a small ridge when C is singular); SVD of W L;
A = S^1/2 V^T L^-1, B = U S^1/2. Also used by joint rank-k and basis selection.
"""

from __future__ import annotations

import torch

from compress.decomposition import Decomposition, UnitWeights, balanced_svd, split_rows

RIDGE = 1e-6  # relative to the mean diagonal of C


def cholesky_factor(second_moment: torch.Tensor) -> torch.Tensor:
    """Lower-triangular L with L L^T = C + ridge, the ridge growing until C is positive definite.

    The ridge goes onto C's diagonal in place and comes off again: no n x n identity and no
    copy of C, which at n = 8192 would be 512 MiB each.
    """
    c = second_moment.to(torch.float64)
    diagonal = c.diagonal()
    original = diagonal.clone()
    scale = original.mean().clamp_min(1e-12)
    ridge = RIDGE
    try:
        for _ in range(8):
            diagonal.copy_(original + ridge * scale)
            l, info = torch.linalg.cholesky_ex(c)
            if int(info) == 0:
                return l
            del l
            ridge *= 10
    finally:
        diagonal.copy_(original)
    raise ValueError("input covariance is not positive definite even with a ridge")


def whitened_factors(weights: list[torch.Tensor], l: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A (R x n) and per-member B_j for the stacked weights, ordered by whitened singular value."""
    stacked = torch.cat(weights, dim=0)
    u, s, vh = balanced_svd(stacked @ l)
    root = s.sqrt()
    # A = S^1/2 V^T L^-1, i.e. L^T A^T = V S^1/2: a triangular solve, never an explicit inverse.
    a = torch.linalg.solve_triangular(l.T, (root[:, None] * vh).T, upper=True).T
    return a, split_rows(u * root, weights)


def decompose(unit: UnitWeights) -> Decomposition:
    chol = cholesky_factor(unit.stats.second_moment)
    unit.stats = None  # C is no longer needed: free it (if nobody else holds it) before the SVD
    a, bs = whitened_factors(unit.weights, chol)
    return Decomposition(a=a, bs=bs, biases=unit.biases)
