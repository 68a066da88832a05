import torch
from torch import nn

from rankdown.factor import FactorizedLinear, SharedDownLinear, linear_params, shared_down_group


def test_full_rank_factor_pair_reproduces_the_dense_layer():
    torch.manual_seed(0)
    dense = nn.Linear(48, 32, bias=True)
    u, s, vh = torch.linalg.svd(dense.weight.detach().double(), full_matrices=False)
    a = (s.sqrt()[:, None] * vh).float()
    b = (u * s.sqrt()).float()
    pair = FactorizedLinear.from_factors(a, b, dense.bias.detach())
    x = torch.randn(5, 48)
    assert pair.rank == 32 and isinstance(pair.down, nn.Linear) and isinstance(pair.up, nn.Linear)
    torch.testing.assert_close(pair(x), dense(x), atol=1e-5, rtol=1e-5)


def test_shared_down_group_registers_one_down_and_computes_each_member():
    torch.manual_seed(0)
    a = torch.randn(8, 16)
    bs = [torch.randn(16, 8), torch.randn(4, 8)]
    members = shared_down_group(a, bs, [None, None])
    holder = nn.ModuleDict({"q": members[0], "k": members[1]})
    names = [n for n, _ in holder.named_parameters()]
    assert names == ["q.up.weight", "q.down.weight", "k.up.weight"]
    x = torch.randn(3, 16)
    torch.testing.assert_close(members[1](x), x @ a.T @ bs[1].T)
    assert members[1].shared_down is members[0].down
    assert linear_params(members[0]) == 8 * 16 + 16 * 8 and linear_params(members[1]) == 4 * 8


def test_mismatched_factor_ranks_are_rejected():
    import pytest

    with pytest.raises(ValueError, match="factor ranks disagree: down has 3, up has 2"):
        FactorizedLinear(nn.Linear(4, 3, bias=False), nn.Linear(2, 4))
    with pytest.raises(ValueError, match="factor ranks disagree: down has 3, up has 2"):
        SharedDownLinear(nn.Linear(4, 3, bias=False), nn.Linear(2, 4), owner=True)
