"""Plain truncated SVD (data-free baseline): W = U S V^T, A = S^1/2 V^T, B = U S^1/2."""

from __future__ import annotations

from rankdown.compress.decomposition import Decomposition, UnitWeights, balanced_svd


def decompose(unit: UnitWeights) -> Decomposition:
    (w,) = unit.weights
    u, s, vh = balanced_svd(w)
    root = s.sqrt()
    return Decomposition(a=root[:, None] * vh, bs=[u * root], biases=unit.biases, energies=s**2)
