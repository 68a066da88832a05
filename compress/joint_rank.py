"""Data-free joint rank-k (seed 003, Peng et al. 2024) for matrices that read one input.

Stack the group, W_cat = [W_q; W_k] (or [W_gate; W_up]), SVD it and keep the top-k right
singular vectors V_k: one shared A = V_k^T (k x n) and B_j = W_j V_k. One matmul by A
serves the whole group, so parameters and FLOPs fall further than per-matrix SVD at the
same k. No calibration data is read. A single matrix reduces to plain SVD.
"""

from __future__ import annotations

from rankdown.compress.decomposition import Decomposition, UnitWeights, balanced_svd, split_rows


def decompose(unit: UnitWeights) -> Decomposition:
    import torch

    stacked = torch.cat(unit.weights, dim=0)
    u, s, vh = balanced_svd(stacked)
    if len(unit.weights) == 1:
        root = s.sqrt()
        return Decomposition(a=root[:, None] * vh, bs=[u * root], biases=unit.biases, energies=s**2)
    # A = V_k^T is orthonormal, so B_j = W_j V_k carries the scale (U S rows of each member).
    return Decomposition(a=vh, bs=split_rows(u * s, unit.weights), biases=unit.biases,
                         energies=s**2)
