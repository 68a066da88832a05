"""Feature-aware factorization (seed 002, "Bolaco"): output PCA from pooled covariances.

Outputs y = W x have mean mu = W E[x] and pooled covariance S = W C_pooled W^T, where
C_pooled averages the per-group input covariances with equal weight. Keep the top-r
eigenvectors Q_r of S: A = Q_r^T W, B = Q_r, bias = b + (I - Q_r Q_r^T) W mu_x, so the
discarded output directions are replaced by their calibration mean. No SVD of W is needed.

With output weights D (the loss's diagonal Fisher per output channel) the PCA is taken of
D^1/2 y, whose error is the loss's second-order cost: P_r the top eigenvectors of
D^1/2 S D^1/2, A = P_r^T D^1/2 W, B = D^-1/2 P_r, and the eigenvalues are loss, not variance.
"""

from __future__ import annotations

import torch

from rankdown.compress.decomposition import Decomposition, Factors, UnitWeights


def decompose(unit: UnitWeights) -> Decomposition:
    (w,) = unit.weights
    (b,) = unit.biases
    cov = w @ unit.stats.pooled_covariance @ w.T
    root = None if unit.output_weights is None else unit.output_weights.sqrt()
    if root is not None:
        cov = root[:, None] * cov * root[None, :]
    cov = (cov + cov.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    p = eigenvectors.flip(-1)  # descending eigenvalue order
    # Projection onto the kept directions in the weighted metric: y -> B (P^T D^1/2) y.
    project, q = (p, p) if root is None else (p * root[:, None], p / root[:, None])
    mu = w @ unit.stats.mean

    def bias_for_rank(rank: int) -> list[torch.Tensor | None]:
        restore = mu - q[:, :rank] @ (project[:, :rank].T @ mu)
        return [restore if b is None else b + restore]

    a = project.T @ w
    energies = eigenvalues.flip(-1).clamp_min(0)  # output variance (or loss) per direction
    if root is None:
        return Decomposition(a=a, bs=[q], biases=unit.biases, bias_for_rank=bias_for_rank, energies=energies)

    def orthonormal(rank: int) -> Factors:
        # The same product with an orthonormal B, as the unweighted method gives: D^-1/2 P_r has
        # its rows scaled by the Fisher (orders of magnitude apart, and its absolute scale is
        # that of a gradient), and healing's Adam steps, one size for every entry, wrecked the
        # factors in that form (SmolLM2, 20%: held-back loss 3.29 -> 3.37 after 256 steps).
        basis, triangle = torch.linalg.qr(q[:, :rank])
        return triangle @ a[:rank], [basis], bias_for_rank(rank)

    return Decomposition(a=a, bs=[q], biases=unit.biases, energies=energies, custom=orthonormal)
