"""SVD-LLM whitening (Wang et al. 2024): the rank-r optimum of ||(W - BA) X||_F in closed form.

C = E[x x^T] = L L^T (Cholesky, with a small ridge when C is singular); SVD of W L;
A = S^1/2 V^T L^-1, B = U S^1/2. Also used by basis selection.

``decompose`` takes no SVD of an m x n matrix (nor holds its workspace). For a tall W (m > n)
V and S come from the n x n matrix L^T W^T W L. For a wide W (m <= n, e.g. down_proj at
n = 8192) the same factors come without L: the left singular vectors U of W L are the
eigenvectors of W L L^T W^T = W C W^T (m x m), and A = S^1/2 V^T L^-1 = S^-1/2 U^T W, so C
is freed as soon as W C W^T is formed and no n x n factor (512 MiB at n = 8192) is held.
"""

from __future__ import annotations

import torch

from rankdown.compress.decomposition import Decomposition, Factors, UnitWeights, balanced_pair, balanced_svd, split_rows

RIDGE = 1e-6  # relative to the mean diagonal of C
GRAM_BLOCK = 1024  # columns of C per step when forming W C W^T


def cholesky_factor(second_moment: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """Lower-triangular L with L L^T = C + ridge (relative to C's mean diagonal), the ridge growing
    until C is positive definite.

    The ridge goes onto C's diagonal in place and comes off again: no n x n identity and no
    copy of C, which at n = 8192 would be 512 MiB each.
    """
    c = second_moment.to(torch.float64)
    diagonal = c.diagonal()
    original = diagonal.clone()
    scale = original.mean().clamp_min(1e-12)
    try:
        for _ in range(8):
            diagonal.copy_(original + ridge * scale)
            lower, info = torch.linalg.cholesky_ex(c)
            if int(info) == 0:
                return lower
            del lower
            ridge *= 10
    finally:
        diagonal.copy_(original)
    raise ValueError("input covariance is not positive definite even with a ridge")


def _descending_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, so that a rank-r choice is a prefix) and eigenvectors of a symmetric matrix."""
    try:
        eigenvalues, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"eigendecomposition did not converge: {e}") from None
    return eigenvalues.flip(0), vectors.flip(1)


def _quarter_power(eigenvalues: torch.Tensor) -> torch.Tensor:
    """S^1/2 for singular values S = sqrt(eigenvalues). The floor only guards a division by zero:
    the product B A of the split factors does not depend on it."""
    top = float(eigenvalues[0])
    # An all-zero W (top 0) has B A = 0 whatever the split: any positive floor will do.
    return eigenvalues.clamp_min(top * 1e-24 if top > 1e-200 else 1.0) ** 0.25


def whitened_factors(weights: list[torch.Tensor], lower: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A (R x n) and per-member B_j for the stacked weights, ordered by whitened singular value."""
    stacked = torch.cat(weights, dim=0)
    if stacked.shape[0] > stacked.shape[1]:
        # Tall (gate/up: 8192 x 2048): V and S^2 from the n x n matrix L^T W^T W L, and
        # U S^1/2 = W L V S^-1/2; the SVD of the m x n W L and its workspace are never held.
        eigenvalues, v = _descending_eigh(lower.T @ (stacked.T @ stacked) @ lower)
        root = _quarter_power(eigenvalues)
        vh = v.T
        b = (stacked @ (lower @ v)) / root
    else:
        u, s, vh = balanced_svd(stacked @ lower)
        root = s.sqrt()
        b = u * root
    # A = S^1/2 V^T L^-1, i.e. L^T A^T = V S^1/2: a triangular solve, never an explicit inverse.
    a = torch.linalg.solve_triangular(lower.T, (root[:, None] * vh).T, upper=True).T
    return a, split_rows(b, weights)


def projected_factors(unit: UnitWeights) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The whitened factors of a wide stack (m <= n) from the eigenvectors of W (C + ridge) W^T.

    Takes the statistics off ``unit`` and lets go of them after W C, so that C is freed there
    when nobody else holds it.
    """
    weights, stats, unit.stats = unit.weights, unit.stats, None
    stacked = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
    c = stats.second_moment
    ridge = RIDGE * c.diagonal().mean().clamp_min(1e-12)
    # W C W^T by blocks of C: W C (m x n, 128 MiB for down_proj) is never held whole. C is
    # symmetric, so a column block is a row block transposed, which BLAS reads without a copy.
    gram = stacked @ stacked.T
    gram.mul_(ridge)
    for start in range(0, c.shape[0], GRAM_BLOCK):
        block = slice(start, start + GRAM_BLOCK)
        gram.addmm_(stacked @ c[block].T, stacked[:, block].T)
    del c, stats
    eigenvalues, u = _descending_eigh(gram)
    quarter = _quarter_power(eigenvalues)  # singular values of W L are sqrt(eigenvalues)
    a = (u.T @ stacked) / quarter[:, None]
    return a, split_rows(u * quarter, weights)


def decompose(unit: UnitWeights) -> Decomposition:
    """With output weights D the factors are those of D^1/2 W, B then unscaled by D^-1/2: the
    rank-r optimum of ||D^1/2 (W - BA) X||_F, whose energies are the loss's second-order cost."""
    roots = None
    if unit.output_weights is not None:
        roots = split_rows(unit.output_weights.sqrt()[:, None], unit.weights)
        unit.weights = [w * root for w, root in zip(unit.weights, roots)]
    if unit.out_features <= unit.in_features:
        a, bs = projected_factors(unit)
    else:
        chol = cholesky_factor(unit.stats.second_moment)
        unit.stats = None  # C is no longer needed: free it (if nobody else holds it) before the SVD
        a, bs = whitened_factors(unit.weights, chol)
    # B = U S^1/2 with U orthonormal: column i's squared norm is s_i, and s_i^2 is the output error
    # that dropping it adds (SVD-LLM's truncation loss).
    singular_values = sum((b * b).sum(0) for b in bs)
    if roots is None:
        return Decomposition(a=a, bs=bs, biases=unit.biases, energies=singular_values**2)
    bs = [b / root for b, root in zip(bs, roots)]
    sizes = [b.shape[0] for b in bs]  # not the weights: the decomposition outlives them

    def balanced(rank: int) -> Factors:
        # D^-1/2 U S^1/2 has its rows scaled by the Fisher: the same product rebalanced, so that
        # healing's Adam steps meet factors shaped as the unweighted method's (feature.py says why).
        b, a_r = balanced_pair(torch.cat([b[:, :rank] for b in bs]), a[:rank])
        return a_r, list(torch.split(b, sizes)), unit.biases

    return Decomposition(a=a, bs=bs, biases=unit.biases, energies=singular_values**2, custom=balanced)
