"""The parameter budget and ranks: uniform, or scaled per kind (for Bayesian trials).

A unit's rank r costs r (n + sum m_j) parameters (plus biases); it saves parameters only
below the break-even rank. Ranks are chosen so that the decoder linears keep
(1 - ratio) of their dense parameters, within 1%; a unit whose rank would not save
parameters stays dense.
"""

from __future__ import annotations

import math

from rankdown.compress.units import Unit
from rankdown.errors import RankdownError

TOLERANCE = 0.01  # the kept parameter count lands within 1% of the target count


def _ranks_for_scale(units: list[Unit], scale: float, weights: dict[str, float]) -> list[int | None]:
    ranks: list[int | None] = []
    for unit in units:
        if not unit.compressible:
            ranks.append(None)
            continue
        keep = scale * weights.get(unit.kind, 1.0)
        rank = math.floor(keep * unit.in_features * sum(unit.out_features) / (unit.in_features + sum(unit.out_features)))
        rank = max(1, rank)
        ranks.append(None if rank > unit.max_saving_rank else rank)
    return ranks


def total_params(units: list[Unit], ranks: list[int | None]) -> int:
    return sum(u.params(r) for u, r in zip(units, ranks))


def allocate(units: list[Unit], ratio: float, weights: dict[str, float] | None = None) -> list[int | None]:
    """Ranks meeting the budget (1 - ratio) x dense within 1%; ``weights`` scale each kind's keep share."""
    weights = weights or {}
    dense = sum(u.dense_params for u in units)
    target = (1 - ratio) * dense
    floor = total_params(units, [1 if u.compressible else None for u in units])
    if floor > target:
        raise RankdownError(f"ratio {ratio} is out of reach: with rank 1 everywhere, at most {1 - floor / dense:.1%} "
                            "of the decoder-linear parameters can be removed")
    low, high = 0.0, 1.0 / min(weights.values(), default=1.0) + 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if total_params(units, _ranks_for_scale(units, mid, weights)) > target:
            high = mid
        else:
            low = mid
    ranks = _ranks_for_scale(units, low, weights)
    # Close the rounding gap one rank at a time, largest units first.
    order = sorted(range(len(units)), key=lambda i: -units[i].dense_params)
    for _ in range(10 * len(units)):
        gap = target - total_params(units, ranks)
        improved = False
        for i in order:
            r = ranks[i]
            if r is None:
                continue
            step = 1 if gap > 0 else -1
            new = r + step
            if not 1 <= new <= units[i].max_saving_rank:
                continue
            delta = units[i].params(new) - units[i].params(r)
            if abs(gap - delta) < abs(gap):
                ranks[i] = new
                improved = True
                break
        if not improved:
            break
    kept = total_params(units, ranks)
    if abs(kept - target) > TOLERANCE * target:
        raise RankdownError(f"ratio {ratio}: could only reach {1 - kept / dense:.4f} with whole ranks")
    return ranks
