"""Output sensitivities (diagonal Fisher) and the error profiles they weigh, for --allocate error."""

import pytest
import torch
import torch.nn.functional as F
from helpers import input_stats, quiet

from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint, skeleton_model
from rankdown.compress import feature, whitening
from rankdown.compress.config import CompressConfig, Precision
from rankdown.compress.decomposition import UnitWeights
from rankdown.compress.distributed import Workers
from rankdown.compress.sensitivity import FLOOR, nonincreasing, output_fisher, unit_output_weights, weighted_energies
from rankdown.compress.training_data import training_windows
from rankdown.compress.units import layer_shapes, plan_units


def test_nonincreasing_pools_each_rise_into_its_mean_and_keeps_every_sum():
    profile = torch.tensor([5.0, 1.0, 3.0, 2.0, 2.0, 4.0, 0.5], dtype=torch.float64)
    pooled = nonincreasing(profile)
    assert pooled.shape == profile.shape and pooled.sum().item() == pytest.approx(profile.sum().item())
    assert (pooled[1:] <= pooled[:-1] + 1e-12).all()
    # The convex hull of the tail-error curve: it touches the curve at the ends of the pooled runs.
    assert pooled.tolist() == pytest.approx([5.0, 2.4, 2.4, 2.4, 2.4, 2.4, 0.5])
    descending = torch.tensor([4.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    assert torch.equal(nonincreasing(descending), descending)


def test_weighted_energy_is_the_fisher_weighted_variance_along_each_direction():
    """Error variance e_i along unit direction d_i costs e_i d_i^T diag(F) d_i; scaled columns
    (the data-free methods fold sqrt(s) into B) give the same weights."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=g))
    fisher = torch.rand(6, dtype=torch.float64, generator=g) + 0.1
    energies = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    expected = energies * torch.einsum("ci,c,ci->i", q, fisher, q)
    weighted = weighted_energies(energies, q * torch.linspace(1, 3, 6, dtype=torch.float64), fisher)
    assert weighted.sum().item() == pytest.approx(expected.sum().item(), rel=1e-12)
    assert (weighted[1:] <= weighted[:-1] + 1e-12).all()
    flat = weighted_energies(energies, q, torch.full((6,), 2.0, dtype=torch.float64))
    assert flat.tolist() == pytest.approx((2 * energies).tolist())  # a flat Fisher only rescales


def test_output_fisher_is_the_mean_squared_gradient_of_each_linear_output(shipped_model_dir):
    """Checked against gradients taken another way: autograd.grad with respect to outputs kept by hooks."""
    ckpt = open_checkpoint(shipped_model_dir)
    cfg = CompressConfig(ratio=0.4, task="math")
    windows = training_windows(load_tokenizer(shipped_model_dir), cfg, 64, 12 * 64)[:12]
    units = plan_units(layer_shapes(skeleton_model(ckpt)), joint=False, dense_kinds=frozenset({"v"}))
    fisher = output_fisher(ckpt, units, windows, Precision.FP32, Workers(), quiet)
    assert len(fisher) == 36 and "model.layers.0.self_attn.v_proj" not in fisher  # v is the method's dense kind
    assert all((f >= 0).all() and f.dtype == torch.float64 for f in fisher.values())

    model = load_model(ckpt)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.5.mlp.down_proj"]
    expected = {name: torch.zeros(fisher[name].shape, dtype=torch.float64) for name in names}
    outputs: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in names]
    for chunk in windows.split(8):
        logits = model(input_ids=chunk).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
        grads = torch.autograd.grad(loss, [outputs[n] for n in names])
        for name, grad in zip(names, grads):
            expected[name] += grad.double().pow(2).sum((0, 1))
    for hook in hooks:
        hook.remove()
    for name in names:
        torch.testing.assert_close(fisher[name], expected[name] / windows[:, 1:].numel(), rtol=1e-4, atol=0)
    # Not a flat weight: the loss cares about some outputs several times more than others.
    down = fisher["model.layers.5.mlp.down_proj"]
    assert down.max() > 3 * down.median()


def _weighted_error(decomposition, rank: int, x: torch.Tensor, weights: list[torch.Tensor],
                    biases: list[torch.Tensor | None], d: torch.Tensor) -> float:
    a, bs, fitted = decomposition.factors(rank)
    w, b = torch.cat(weights), torch.cat(bs)
    dense = x @ w.T + (0 if biases[0] is None else torch.cat(biases))
    error = dense - (x @ a.T @ b.T + (0 if fitted[0] is None else torch.cat(fitted)))
    return float((error.pow(2) * d).sum(1).mean())


@pytest.mark.parametrize(("module", "n", "members", "bias"), [
    (feature, 16, [12], True),  # the restored mean goes into the bias
    (whitening, 16, [10, 6], False),  # wide: factors from W C W^T (a stack, as joint units would be)
    (whitening, 8, [12, 9], False),  # tall: factors from L^T W^T W L
])
def test_a_method_given_output_weights_minimizes_the_weighted_error_and_prices_it_exactly(module, n, members, bias):
    """With the loss's diagonal Fisher D on the outputs, the factors are the rank-r optimum of
    E||D^1/2 (W x - B A x)||^2 (B unscaled by D^-1/2 after factoring D^1/2 W): no worse than the
    unweighted factors at every rank, usually far better, and energies[r:] is that error exactly
    (one group of inputs, so that the pooled covariance is the data's own)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64) + 0.5
    weights = [torch.randn(m, n, generator=g, dtype=torch.float64) for m in members]
    biases = [torch.randn(m, generator=g, dtype=torch.float64) if bias else None for m in members]
    d = torch.rand(sum(members), generator=g, dtype=torch.float64).pow(3) * 10 + 1e-3

    def decomposed(output_weights):
        return module.decompose(UnitWeights([f"m{i}" for i in range(len(weights))], [w.clone() for w in weights],
                                            list(biases), input_stats(x, x.shape[0]), output_weights))

    weighted, plain = decomposed(d), decomposed(None)
    gains = []
    for rank in (2, 5, 7):
        mine, other = (_weighted_error(dec, rank, x, weights, biases, d) for dec in (weighted, plain))
        assert mine <= other * (1 + 1e-9)
        assert weighted.tail_error(rank) == pytest.approx(mine, rel=1e-4)  # whitening's ridge
        gains.append(other / mine)
    assert max(gains) > 1.3
    # Shaped as the unweighted method's factors (healing's Adam steps wreck D^-1/2-scaled rows):
    # feature's B orthonormal, whitening's pair balanced.
    a, bs, _ = weighted.factors(5)
    b = torch.cat(bs)
    if module is feature:
        torch.testing.assert_close(b.T @ b, torch.eye(5, dtype=torch.float64))
    else:
        torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1))
    flat = decomposed(torch.full((sum(members),), 4.0, dtype=torch.float64))  # a flat weight only rescales
    torch.testing.assert_close(flat.energies, 4 * plain.energies)
    a, bs, _ = flat.factors(5)
    pa, pbs, _ = plain.factors(5)
    torch.testing.assert_close(torch.cat(bs) @ a, torch.cat(pbs) @ pa)


def test_unit_output_weights_stack_the_members_and_lift_every_channel_off_zero():
    fisher = {"model.layers.3.mlp.gate_proj": torch.tensor([0.0, 2.0], dtype=torch.float64),
              "model.layers.3.mlp.up_proj": torch.tensor([4.0, 6.0], dtype=torch.float64)}
    lifted = unit_output_weights(fisher, "model.layers.3.", ["mlp.gate_proj", "mlp.up_proj"])
    assert lifted.tolist() == pytest.approx([0 + 3 * FLOOR, 2 + 3 * FLOOR, 4 + 3 * FLOOR, 6 + 3 * FLOOR])
