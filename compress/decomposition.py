"""What every method returns: factors ordered so that a rank-r choice is cheap to take.

A *unit* is one linear, or a group of linears reading one input that share ``down``
(joint rank-k). ``factors(rank)`` gives A (rank x n), one B_j (m_j x rank) per member and
one bias per member; Bayesian rank trials call it many times on one cached decomposition.
``energies`` is the unit's error profile: what dropping each rank direction costs in the
method's own metric, so that an allocation can price every rank before any is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Factors = tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]


@dataclass
class UnitWeights:
    """The dense weights of a unit, in float64, and its input statistics (None when data-free)."""

    names: list[str]
    weights: list[torch.Tensor]  # m_j x n each
    biases: list[torch.Tensor | None]
    stats: object | None  # calibration.InputStats
    # Per output channel (stacked over members), the weight of its squared error: the loss's
    # diagonal Fisher (compress/sensitivity.py). None weighs every channel alike. Only the
    # methods registered with ``output_weighted`` read it.
    output_weights: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.weights[0].shape[1]

    @property
    def out_features(self) -> int:
        return sum(w.shape[0] for w in self.weights)

    @property
    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)


@dataclass
class Decomposition:
    """Nested factors: the first r rows of ``a`` and columns of each ``b`` are the rank-r choice."""

    a: torch.Tensor  # R x n
    bs: list[torch.Tensor]  # m_j x R
    biases: list[torch.Tensor | None]
    # Per rank direction, descending: the squared singular value in the method's metric, so that
    # energies[r:].sum() is the error of rank r (SVD-LLM's truncation loss: for whitening the
    # calibration output error ||W X - B A X||^2 / T exactly, ||D^1/2 (W X - B A X)||^2 / T with
    # output weights D; for plain SVD ||W - B A||_F^2).
    energies: torch.Tensor
    bias_for_rank: Callable[[int], list[torch.Tensor | None]] | None = None
    custom: Callable[[int], Factors] | None = None
    # Column i: the output direction (stacked over members) along which dropping direction i loses
    # energies[i]; None where that is column i of the stacked bs.
    directions: torch.Tensor | None = None

    def output_directions(self) -> torch.Tensor:
        return self.directions if self.directions is not None else torch.cat(self.bs, dim=0)

    def factors(self, rank: int) -> Factors:
        if self.custom is not None:
            return self.custom(rank)
        biases = self.bias_for_rank(rank) if self.bias_for_rank else self.biases
        return self.a[:rank], [b[:, :rank] for b in self.bs], biases

    def tail_error(self, rank: int) -> float:
        """The error a rank-``rank`` truncation leaves, in the method's metric (0 at full rank)."""
        return float(self.energies[rank:].sum())


def balanced_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V^T of a float64 matrix, with a clear error if LAPACK does not converge."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"SVD did not converge: {e}") from None


def split_rows(b: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cut a stacked B back into one block per member."""
    return list(torch.split(b, [w.shape[0] for w in weights], dim=0))


def balanced_pair(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B' = U S^1/2 and A' = S^1/2 V^T with U S V^T the SVD of B A: the product unchanged, each
    direction's norm split evenly between the factors (as the SVD methods give them). Two thin QRs
    and an SVD of rank x rank, never the m x n product."""
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = balanced_svd(rb @ ra.T)
    root = s.sqrt()
    return qb @ (u * root), (root[:, None] * vh) @ qa.T
