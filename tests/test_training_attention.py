"""Healing's float32 attention under bf16 autocast (compress/training_attention.py)."""

import pytest
import torch
from conftest import tiny_config
from transformers import LlamaForCausalLM

from rankdown.compress.training_attention import NAME, float32_attention


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(300)).eval()


def test_same_logits_as_sdpa_with_and_without_padding(model):
    ids = torch.randint(3, 300, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the mask function must be sdpa's, not none
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        padded = model(input_ids=ids, attention_mask=mask).logits
        with float32_attention(model):
            assert model.config._attn_implementation == NAME
            ours = model(input_ids=ids).logits
            ours_padded = model(input_ids=ids, attention_mask=mask).logits
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_padded[1, 5:], padded[1, 5:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours_padded[1, 5:], ours[1, 5:], atol=1e-3)  # the padding was masked


def test_attention_runs_in_float32_under_bf16_autocast_and_trains(model, monkeypatch):
    seen = []
    inner = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):  # the kernel call itself: autocast would recast its inputs there
        output = inner(query, *args, **kwargs)
        seen.append((query.dtype, output.dtype, torch.is_autocast_enabled("cpu")))
        return output

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids = torch.randint(3, 300, (2, 16))
    with float32_attention(model), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert seen == [(torch.float32, torch.float32, False)] * model.config.num_hidden_layers
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_disabled_or_failing_leaves_the_model_as_it_was(model):
    with float32_attention(model, enabled=False):
        assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), float32_attention(model):
        raise RuntimeError("inside")
    assert model.config._attn_implementation == "sdpa"
