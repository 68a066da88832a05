"""The rank-strategy registry: one line per strategy. Adding a strategy adds a file and a line here.

A strategy turns a RankJob (the units, the calibration windows, the method) into a RankOutcome
(the ranks, the model with its factor pairs, written); the pipeline picks it by
``CompressConfig.strategy`` and writes the report around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from rankdown.compress import basis_tuning, bayesian_ranks, error_ranks, uniform_ranks
from rankdown.compress.config import Strategy
from rankdown.compress.rank_job import RankJob, RankOutcome


@dataclass(frozen=True)
class StrategySpec:
    choose: Callable[[RankJob], RankOutcome]  # ranks chosen, factors built and written
    distributed: bool = False  # runs on several workers (compress/distributed.py), or in one process only


STRATEGIES: dict[Strategy, StrategySpec] = {
    Strategy.UNIFORM: StrategySpec(uniform_ranks.choose, distributed=True),
    # Seed 002: trials on factors cached from the dense model, then checked against uniform and streamed.
    Strategy.BAYES: StrategySpec(bayesian_ranks.choose),
    # SVD-LLM's truncation loss priced per parameter over every unit: a profiling pass, then stream.
    Strategy.ERROR: StrategySpec(error_ranks.choose, distributed=True),
    # Seed 001 as its authors run it: ranks are what training and pruning the bases leave.
    Strategy.TUNED_BASIS: StrategySpec(basis_tuning.choose),
}
