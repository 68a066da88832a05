"""Feature-aware factorization (seed 002, "Bolaco"): output PCA from pooled covariances.

Outputs y = W x have mean mu = W E[x] and pooled covariance S = W C_pooled W^T, where
C_pooled averages the per-group input covariances with equal weight. Keep the top-r
eigenvectors Q_r of S: A = Q_r^T W, B = Q_r, bias = b + (I - Q_r Q_r^T) W mu_x, so the
discarded output directions are replaced by their calibration mean. No SVD of W is needed.
"""

from __future__ import annotations

import torch

from rankdown.compress.decomposition import Decomposition, UnitWeights


def decompose(unit: UnitWeights) -> Decomposition:
    (w,) = unit.weights
    (b,) = unit.biases
    cov = w @ unit.stats.pooled_covariance @ w.T
    cov = (cov + cov.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    q = eigenvectors.flip(-1)  # descending eigenvalue order
    mu = w @ unit.stats.mean

    def bias_for_rank(rank: int) -> list[torch.Tensor | None]:
        qr = q[:, :rank]
        restore = mu - qr @ (qr.T @ mu)
        return [restore if b is None else b + restore]

    return Decomposition(a=q.T @ w, bs=[q], biases=unit.biases, bias_for_rank=bias_for_rank,
                         energies=eigenvalues.flip(-1).clamp_min(0))  # output variance per direction
