"""Attention through ExecuTorch's LLM kernels: ``llama::update_cache`` writes the new keys and
values into a static cache in place, ``llama::custom_sdpa`` attends causally over the cache up to
the current position (grouped-query heads included), as ExecuTorch's own Llama export does.

Hooked into the stock transformers model, not a copy of its code: a function registered in
transformers' ``AttentionInterface`` replaces sdpa, and each attention layer gets a ``KVCache``
child for the duration of the export. No mask function is registered under the same name, so
transformers builds no mask (the kernel masks causally from ``start_pos``). The caches are laid
out [batch, position, kv head, head dim], the layout the kernels take.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

ATTENTION = "rankdown_et_custom_sdpa"  # the name registered in transformers' AttentionInterface
START_POS = "et_start_pos"  # the keyword the wrapper passes through the model to the attention
CACHE_CHILD = "et_kv_cache"  # attribute of each attention layer while the export runs


def load_custom_ops() -> None:
    """Register ``torch.ops.llama.*`` and their ExecuTorch kernels (libcustom_ops_aot_lib.so) in
    this process; a .pte that uses them needs this before it is loaded by the Python runtime."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


class KVCache(torch.nn.Module):
    """One layer's static keys and values, [1, max_len, kv_heads, head_dim], updated in place."""

    def __init__(self, max_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (1, max_len, kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def update(self, key: torch.Tensor, value: torch.Tensor, start_pos) -> tuple[torch.Tensor, torch.Tensor]:
        """``key``/``value`` as transformers gives them, [1, kv_heads, n, head_dim]."""
        torch.ops.llama.update_cache(key.transpose(1, 2), self.k_cache, start_pos)
        torch.ops.llama.update_cache(value.transpose(1, 2), self.v_cache, start_pos)
        return self.k_cache, self.v_cache


def custom_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature; ``key``/``value`` are the new tokens' only
    (the model runs without a transformers cache), the layer's ``KVCache`` holds the rest."""
    start_pos = kwargs[START_POS]
    k_cache, v_cache = getattr(module, CACHE_CHILD).update(key, value, start_pos)
    output = torch.ops.llama.custom_sdpa(query.transpose(1, 2), k_cache, v_cache, start_pos, None, 0.0, True,
                                         scaling)
    return output, None  # [1, n, heads, head_dim], as transformers' sdpa returns it


@contextmanager
def custom_attention(model, max_len: int) -> Iterator[None]:
    """While inside: ``model`` attends with the custom ops over per-layer static caches of
    ``max_len`` positions. The model's attention setting and modules are restored on exit."""
    from transformers import AttentionInterface

    load_custom_ops()
    AttentionInterface.register(ATTENTION, custom_sdpa_attention)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # The activations' dtype: a 4-bit model's first parameters are integer weights.
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    layers = [layer.self_attn for layer in model.model.layers]
    before = config._attn_implementation
    try:
        for attention in layers:
            attention.add_module(CACHE_CHILD, KVCache(max_len, config.num_key_value_heads, head_dim, dtype))
        config._attn_implementation = ATTENTION
        yield
    finally:
        config._attn_implementation = before
        for attention in layers:
            if hasattr(attention, CACHE_CHILD):
                delattr(attention, CACHE_CHILD)


class CustomOpsSignature(torch.nn.Module):
    """``forward(tokens[1, n], input_pos[1]) -> logits[1, n, vocab]`` with the custom-ops attention,
    the signature of ExecuTorch's own Llama exports. Use inside ``custom_attention(model, ...)``."""

    def __init__(self, model, max_len: int):
        super().__init__()
        self.model = model
        self.max_len = max_len

    def forward(self, tokens, input_pos):
        n = tokens.shape[1]
        start_pos = input_pos[0].item()
        torch._check_is_size(start_pos)
        torch._check(start_pos + n <= self.max_len)
        positions = input_pos + torch.arange(n, dtype=torch.long)
        out = self.model(input_ids=tokens, cache_position=positions, position_ids=positions.unsqueeze(0),
                         use_cache=False, **self.attention_kwargs(start_pos, positions))
        return out.logits

    def attention_kwargs(self, start_pos, positions) -> dict:
        """What the registered attention function gets beside transformers' own arguments."""
        return {START_POS: start_pos}
