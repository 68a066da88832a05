"""Task-specific basis selection (seed 001, "Basel"), closed-form mode: no fine-tuning.

W = U diag(s) V^T is a sum of bases s_i u_i v_i^T. On the task's inputs (second moment C)
basis i contributes output energy score_i = s_i^2 v_i^T C v_i: keep the best-scoring
bases, refit their coefficients by least squares on task outputs
(c_i = u_i^T W C v_i / v_i^T C v_i), then spend the rest of the rank on new bases: the
whitened SVD of the residual W - W_kept. Different task data, different selection.
"""

from __future__ import annotations

import math

import torch

from rankdown.compress.decomposition import Decomposition, UnitWeights, balanced_svd
from rankdown.compress.whitening import cholesky_factor, whitened_factors

SELECTED_SHARE = 0.75  # of the rank spent on selected bases; the rest on new (enhancing) bases


def decompose(unit: UnitWeights) -> Decomposition:
    (w,) = unit.weights
    c = unit.stats.second_moment
    u, s, vh = balanced_svd(w)
    v = vh.T
    v_energy = torch.einsum("ni,nm,mi->i", v, c, v)  # v_i^T C v_i
    score = s**2 * v_energy
    order = torch.argsort(score, descending=True)
    chol = cholesky_factor(c)

    def factors(rank: int):
        selected = order[: max(1, math.ceil(SELECTED_SHARE * rank))]
        us, vs = u[:, selected], v[:, selected]
        coefficients = torch.einsum("mi,mn,nk,ki->i", us, w, c, vs) / v_energy[selected].clamp_min(1e-12)
        root = coefficients.abs().sqrt()
        sign = torch.sign(coefficients)
        a_sel = (root[:, None] * vs.T)
        b_sel = us * (root * sign)[None, :]
        extra = rank - len(selected)
        if extra > 0:
            residual = w - b_sel @ a_sel
            a_new, (b_new,) = whitened_factors([residual], chol)
            a_sel = torch.cat([a_sel, a_new[:extra]])
            b_sel = torch.cat([b_sel, b_new[:, :extra]], dim=1)
        return a_sel, [b_sel], unit.biases

    # The scores sum to trace(W C W^T), the output energy: a score's share is what dropping its basis costs.
    return Decomposition(a=v.T, bs=[u], biases=unit.biases, custom=factors, energies=score[order],
                         directions=u[:, order])
