"""The method registry: one line per method. Adding a method adds a file and a line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rankdown.compress import asvd, basis_selection, feature, joint_rank, svd, whitening
from rankdown.compress.config import Method
from rankdown.compress.decomposition import Decomposition, UnitWeights


@dataclass(frozen=True)
class MethodSpec:
    decompose: Callable[[UnitWeights], Decomposition]
    needs_data: bool
    joint_groups: bool = False  # q/k and gate/up share one down
    dense_kinds: frozenset[str] = frozenset()  # kinds this method leaves dense
    factor_bias: bool = False  # the up factor always carries a bias (counted in the budget)
    pooled_stats: bool = False  # reads the pooled input covariance (an extra n x n per site)
    basis_modes: bool = False  # closed-form or tuned (--basis-mode), recorded in compression.json
    # Minimizes the output error weighted per channel (UnitWeights.output_weights) when given
    # weights, so that its energies are already in the loss's units.
    output_weighted: bool = False


METHODS: dict[Method, MethodSpec] = {
    Method.SVD: MethodSpec(svd.decompose, needs_data=False),
    Method.ASVD: MethodSpec(asvd.decompose, needs_data=True),
    Method.WHITEN: MethodSpec(whitening.decompose, needs_data=True, output_weighted=True),
    Method.JOINT: MethodSpec(joint_rank.decompose, needs_data=False, joint_groups=True),
    # Seed 002 leaves v dense (its public code does): v is small under GQA and sensitive.
    Method.FEATURE: MethodSpec(feature.decompose, needs_data=True, dense_kinds=frozenset({"v"}),
                                  factor_bias=True, pooled_stats=True, output_weighted=True),
    Method.BASIS: MethodSpec(basis_selection.decompose, needs_data=True, basis_modes=True),
}
