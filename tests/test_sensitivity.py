"""Output sensitivities (diagonal Fisher) and the error profiles they weigh, for --allocate error."""

import pytest
import torch
import torch.nn.functional as F
from helpers import quiet

from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint, skeleton_model
from rankdown.compress.config import CompressConfig, Precision
from rankdown.compress.distributed import Workers
from rankdown.compress.sensitivity import nonincreasing, output_fisher, weighted_energies
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
