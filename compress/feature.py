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
    d = unit.output_weights
    cov = w @ unit.stats.pooled_covariance @ w.T
    if d is not None:
        root = d.sqrt()
        cov.mul_(root[:, None]).mul_(root)
    cov = (cov + cov.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    del cov  # m x m each: 1.6 GB at m = 14336 in float64
    p = eigenvectors.flip(-1)  # descending eigenvalue order
    del eigenvectors
    energies = eigenvalues.flip(-1).clamp_min(0)  # output variance (or loss) per direction
    mu = w @ unit.stats.mean
    if d is None:
        a, q, weighted_mu = p.T @ w, p, mu
    else:
        a = p.T @ (root[:, None] * w)
        q = p.div_(root[:, None])  # B = D^-1/2 P, in place of P
        weighted_mu = d * mu  # B_r A_r-equivalent on the mean: q_r (D q_r)^T mu = q_r q_r^T (D mu)

    def bias_for_rank(rank: int) -> list[torch.Tensor | None]:
        qr = q[:, :rank]
        restore = mu - qr @ (qr.T @ weighted_mu)
        return [restore if b is None else b + restore]

    if d is None:
        return Decomposition(a=a, bs=[q], biases=unit.biases, bias_for_rank=bias_for_rank, energies=energies)

    def orthonormal(rank: int) -> Factors:
        # The same product with an orthonormal B, as the unweighted method gives: D^-1/2 P_r has
        # its rows scaled by the Fisher (orders of magnitude apart, and its absolute scale is
        # that of a gradient), and healing's Adam steps, one size for every entry, wrecked the
        # factors in that form (SmolLM2, 20%: held-back loss 3.29 -> 3.37 after 256 steps).
        basis, triangle = torch.linalg.qr(q[:, :rank])
        return triangle @ a[:rank], [basis], bias_for_rank(rank)

    return Decomposition(a=a, bs=[q], biases=unit.biases, energies=energies, custom=orthonormal)
