"""export/et_norms.py ``as_linear`` and export/et_views.py ``drop_unit_reshapes``: fewer XNNPACK
operators in the ExecuTorch graph, the same numbers."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rankdown.export.et_norms import EPSILON_BUFFER, MEAN_BUFFER, pooled_norms
from rankdown.export.et_views import drop_unit_reshapes, reshape_unit_permutes

aten = torch.ops.aten
RESHAPES = (aten.reshape.default, aten.view.default)


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def _targets(program) -> list:
    return [n.target for n in program.graph.nodes if n.op == "call_function"]


def test_norms_as_one_linear_compute_the_same_and_are_restored():
    model = _tiny_llama()
    for norm in model.modules():
        if isinstance(norm, LlamaRMSNorm):
            norm.weight.data.uniform_(0.5, 1.5)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        before = model(ids).logits
        with pooled_norms(model, as_linear=True) as count:
            inside = model(ids).logits
        after = model(ids).logits
    assert count == 2 * model.config.num_hidden_layers + 1
    assert torch.allclose(inside, before, atol=1e-5) and torch.equal(after, before)
    for norm in model.modules():
        if isinstance(norm, LlamaRMSNorm):
            assert "forward" not in norm.__dict__
            assert MEAN_BUFFER not in norm._buffers and EPSILON_BUFFER not in norm._buffers


def test_the_one_token_trace_has_no_mean_and_few_reshapes():
    """export/executorch.py ``trace`` (int4's flags): each norm is one linear (no mean, no pooled
    reshapes); the heads' swaps and swaps back are gone, leaving per layer the queries' and keys'
    views to heads, the values' and the attention output's reshape."""
    from rankdown.export.executorch import trace

    model = _tiny_llama()
    lean, _, _ = trace(model, 16, tokens=1, rotary_matmul=True, norm_linear=True)
    pooled, _, _ = trace(model, 16, tokens=1, rotary_matmul=True)
    layers, norms = model.config.num_hidden_layers, 2 * model.config.num_hidden_layers + 1
    assert aten.mean.dim not in _targets(lean) and aten.mean.dim in _targets(pooled)
    assert _targets(lean).count(aten.linear.default) == _targets(pooled).count(aten.linear.default) + norms
    reshapes = sum(_targets(lean).count(t) for t in RESHAPES)
    assert reshapes <= 4 * layers + 2, reshapes
    assert sum(_targets(pooled).count(t) for t in RESHAPES) >= reshapes + 2 * norms
    buffers = set(lean.graph_signature.inputs_to_buffers.values())
    assert f"model.model.norm.{MEAN_BUFFER}" in buffers and f"model.model.norm.{EPSILON_BUFFER}" in buffers


def test_unit_swaps_go_where_the_ops_between_do_not_care_and_stay_where_they_do():
    class Heads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8, 8))

        def forward(self, x, cos, per_head):
            heads = x.view(1, 1, 4, 8).transpose(1, 2)  # [1, 4, 1, 8]
            rotated = heads * cos + torch.nn.functional.linear(heads, self.weight)  # cos [1, 1, 1, 8]
            free = rotated.transpose(1, 2).reshape(1, 1, 32)
            other = x.view(1, 1, 4, 8).transpose(1, 2)
            bound = (other * per_head).transpose(1, 2)  # per_head [1, 4, 1, 1]: the layout matters
            # a size-1 dim swapped past a larger one: the same memory, other coordinates along dim 2
            passed = ((x.view(1, 4, 8, 1) + 0.5).reshape(1, 1, 8, 4) * cos.view(1, 1, 8, 1)).reshape(1, 32)
            return free, bound, passed

    x, cos, per_head = torch.randn(1, 1, 32), torch.randn(1, 1, 1, 8), torch.randn(1, 4, 1, 1)
    program = torch.export.export(Heads(), (x, cos, per_head), strict=True)
    expected = program.module()(x, cos, per_head)
    assert reshape_unit_permutes(program) == 4
    before = sum(_targets(program).count(t) for t in RESHAPES)
    removed = drop_unit_reshapes(program)
    after = sum(_targets(program).count(t) for t in RESHAPES)
    assert removed == before - after >= 2
    shapes = [tuple(n.meta["val"].shape) for n in program.graph.nodes if n.target is aten.mul.Tensor]
    assert (1, 1, 4, 8) in shapes and (1, 4, 1, 8) in shapes  # the free region moved, the bound one did not
    assert (1, 1, 8, 4) in shapes
    for got, want in zip(program.module()(x, cos, per_head), expected, strict=True):
        assert got.shape == want.shape and torch.equal(got, want)
