"""ASVD (Yuan et al. 2023): SVD of W diag(s), s_j = mean|x_j|^alpha, with diag(s)^-1 folded into A."""

from __future__ import annotations

from rankdown.compress.decomposition import Decomposition, UnitWeights, balanced_svd

ALPHA = 0.5


def decompose(unit: UnitWeights) -> Decomposition:
    (w,) = unit.weights
    scale = unit.stats.mean_abs.clamp_min(1e-6) ** ALPHA
    u, s, vh = balanced_svd(w * scale[None, :])
    root = s.sqrt()
    return Decomposition(a=(root[:, None] * vh) / scale[None, :], bs=[u * root], biases=unit.biases, energies=s**2)
