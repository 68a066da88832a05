"""Balancing factor pairs before int4 quantization: the fp32 function is kept, each rank direction's
down row and up column(s) end with equal norms, a shared down is balanced against all its ups
once. That an int4 export does it by default and records it is in test_int4_shipped.py."""

from __future__ import annotations

import torch

from rankdown.export.factor_balance import balance_factors
from rankdown.factor import FactorizedLinear, shared_down_group


def _feature_like(m: int = 48, n: int = 40, rank: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal B and an A whose rows carry very different scales, as ``feature`` stores them."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))
    a = torch.logspace(1, -2, rank, dtype=torch.float64)[:, None] * torch.randn(rank, n, generator=g, dtype=torch.float64)
    return a, q


def test_a_pair_keeps_its_function_and_ends_balanced():
    a, b = _feature_like()
    pair = torch.nn.Sequential(FactorizedLinear.from_factors(a, b, torch.randn(b.shape[0], dtype=torch.float64)))
    x = torch.randn(7, a.shape[1], dtype=torch.float64)
    before = pair(x)
    assert balance_factors(pair) == 1
    linear = pair[0]
    torch.testing.assert_close(pair(x), before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear.down.weight.norm(dim=1), linear.up.weight.norm(dim=0), rtol=1e-12, atol=0)
    down = linear.down.weight.clone()
    balance_factors(pair)  # already balanced: nothing moves
    torch.testing.assert_close(linear.down.weight, down, rtol=1e-12, atol=0)


def test_a_shared_down_is_balanced_once_against_all_its_ups():
    a, b = _feature_like(m=60)
    members = shared_down_group(a, [b[:20], b[20:]], [None, None])
    model = torch.nn.ModuleList(members)
    x = torch.randn(5, a.shape[1], dtype=torch.float64)
    before = [m(x) for m in members]
    assert balance_factors(model) == 1
    for m, y in zip(members, before):
        torch.testing.assert_close(m(x), y, rtol=1e-12, atol=1e-12)
    ups = torch.cat([m.up.weight for m in members], dim=0)
    torch.testing.assert_close(members[0].shared_down.weight.norm(dim=1), ups.norm(dim=0), rtol=1e-12, atol=0)
    assert members[1].shared_down is members[0].down  # still one weight


def test_a_zero_direction_is_left_alone():
    a, b = _feature_like()
    a[3] = 0
    pair = torch.nn.Sequential(FactorizedLinear.from_factors(a, b))
    balance_factors(pair)
    assert torch.isfinite(pair[0].up.weight).all() and torch.isfinite(pair[0].down.weight).all()
    assert pair[0].down.weight[3].abs().max() == 0
    torch.testing.assert_close(pair[0].up.weight[:, 3], b[:, 3], rtol=0, atol=0)


