"""export/et_rotary.py: transformers' rotate_half as one matmul during the ExecuTorch trace."""

from __future__ import annotations

import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from transformers import LlamaConfig, LlamaForCausalLM

from rankdown.export.et_rotary import BUFFER, matmul_rotary, rotate_half_matrix


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("head_dim", [2, 16, 64])
def test_the_matrix_is_rotate_half_to_the_bit(head_dim):
    x = torch.randn(3, 4, 5, head_dim)
    stock = torch.cat((-x[..., head_dim // 2:], x[..., : head_dim // 2]), dim=-1)
    assert torch.equal(torch.nn.functional.linear(x, rotate_half_matrix(head_dim)), stock)


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="even"):
        rotate_half_matrix(7)


def test_the_model_computes_the_same_inside_and_is_restored_after():
    model = _tiny_llama()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    stock = llama.rotate_half
    with torch.no_grad():
        before = model(ids).logits
        with matmul_rotary(model):
            assert llama.rotate_half is not stock
            inside = model(ids).logits
        after = model(ids).logits
    assert llama.rotate_half is stock and not hasattr(model.model.rotary_emb, BUFFER)
    assert torch.allclose(inside, before, atol=1e-6) and torch.equal(after, before)


def test_the_traced_graph_rotates_with_one_linear_on_a_buffer_of_the_model():
    """No slice/neg/cat of the rotary left: per layer two more linears (queries, keys) that read the
    rotary module's buffer, which torch.export keeps as a buffer, not a lifted constant."""
    model = _tiny_llama()
    ids = torch.tensor([[1, 5, 9, 2]])

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, tokens):
            return self.model(input_ids=tokens, use_cache=False).logits

    def ops(program) -> dict:
        counts: dict = {}
        for node in program.graph.nodes:
            if node.op == "call_function":
                counts[node.target] = counts.get(node.target, 0) + 1
        return counts

    with torch.no_grad():
        plain = ops(torch.export.export(Logits(), (ids,), strict=True))
        with matmul_rotary(model):
            program = torch.export.export(Logits(), (ids,), strict=True)
    hooked = ops(program)
    layers = model.config.num_hidden_layers
    aten = torch.ops.aten
    assert hooked.get(aten.neg.default, 0) == plain[aten.neg.default] - 2 * layers == 0
    assert hooked.get(aten.linear.default, 0) == plain[aten.linear.default] + 2 * layers
    assert f"model.model.rotary_emb.{BUFFER}" in program.graph_signature.inputs_to_buffers.values()


def test_one_token_transposes_become_reshapes_and_compute_the_same():
    """export/et_views.py: in a statically shaped one-token trace, the head transposes (which move
    only the size-1 token axis) become reshapes; a transpose that reorders data stays."""
    from rankdown.export.et_views import reshape_unit_permutes

    class Heads(torch.nn.Module):
        def forward(self, x, y):
            moved = x.view(1, 1, 4, 8).transpose(1, 2)  # [1, 4, 1, 8]: only the 1 moves
            kept = y.transpose(0, 1)  # [3, 2] -> [2, 3]: a real transpose
            return moved * 2, kept + 1, moved.permute(0, 2, 1, 3)

    x, y = torch.randn(1, 1, 32), torch.randn(3, 2)
    program = torch.export.export(Heads(), (x, y), strict=True)
    expected = program.module()(x, y)
    assert reshape_unit_permutes(program) == 2
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.transpose.int) == 1
    assert torch.ops.aten.permute.default not in targets
    for got, want in zip(program.module()(x, y), expected, strict=True):
        assert torch.equal(got, want)


def test_the_export_trace_uses_both_and_keeps_the_stock_rotary_unless_asked():
    """export/executorch.py ``trace``: asked (int4), the one-token program has the rotary as linears;
    unasked (fp32, int8), transformers' own rotary; either way no transpose that moves only the
    size-1 token axis, while forward, with a symbolic token count, keeps its transposes."""
    from rankdown.export.executorch import trace

    model = _tiny_llama()
    aten = torch.ops.aten

    def targets(program) -> list:
        return [n.target for n in program.graph.nodes if n.op == "call_function"]

    one_token, _, _ = trace(model, 16, tokens=1, rotary_matmul=True)
    stock, _, _ = trace(model, 16, tokens=1)
    assert aten.neg.default not in targets(one_token) and aten.neg.default in targets(stock)
    layers = model.config.num_hidden_layers
    assert targets(one_token).count(aten.linear.default) == targets(stock).count(aten.linear.default) + 2 * layers
    forward, _, _ = trace(model, 16, rotary_matmul=True)  # a symbolic token count: its transposes stay
    assert aten.transpose.int not in targets(one_token) and aten.transpose.int not in targets(stock)
    assert aten.transpose.int in targets(forward)
    assert aten.neg.default not in targets(forward)
    assert llama.rotate_half.__module__ == llama.__name__
