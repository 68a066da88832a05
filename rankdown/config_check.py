"""A Hugging Face folder's config.json against its weights' headers, before any model is built.

Building even a weightless (meta) model costs time and memory in proportion to what the
config claims: a config that says a million layers ran for minutes at 2 GB before the
mismatch with the weights surfaced. So the counts and widths are bounded first (absurd
values refused outright), then compared with the tensor names and shapes the safetensors
headers declare, which are themselves bounded by the bytes really in the files.
"""

from __future__ import annotations

import re
from pathlib import Path

from rankdown.errors import RankdownError
from rankdown.safetensors_check import TensorEntry

# Far beyond any released Llama (405B: 126 layers, hidden 16,384, MLP 53,248, vocabulary 128k).
LIMITS = {
    "num_hidden_layers": 1024, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_attention_heads": 1024,
    "num_key_value_heads": 1024, "head_dim": 1 << 12, "vocab_size": 1 << 22, "max_position_embeddings": 1 << 24,
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def check_config_values(raw: dict, path: Path) -> None:
    """Every count and width in config.json is a positive integer no larger than any real Llama's allows."""
    for key, limit in LIMITS.items():
        value = raw.get(key)
        if value is None and key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RankdownError(f"{path}: {key} must be a positive integer, got {value!r}")
        if value > limit:
            raise RankdownError(f"{path}: {key} {value} is absurd (at most {limit})")
    tied = raw.get("tie_word_embeddings", True)
    if not isinstance(tied, bool):
        raise RankdownError(f"{path}: tie_word_embeddings must be true or false, got {tied!r}")


def check_config_against_weights(config, tensors: dict[str, tuple[Path, TensorEntry]], folder: Path) -> None:
    """Layer count, widths, heads and vocabulary agree with the dense tensors the headers declare.
    (Factorized linears are matched later, against the factor record.)"""
    path = folder / "config.json"
    layers = config.num_hidden_layers
    found = {int(m.group(1)) for name in tensors if (m := _LAYER.match(name))}
    if found != set(range(layers)):
        wrong = min(set(range(layers)) ^ found)
        what = "is missing" if wrong < layers else "is not in the model the config describes"
        raise RankdownError(f"{path}: num_hidden_layers is {layers} but the weights hold {len(found)} layers "
                            f"(model.layers.{wrong}.* {what})")
    hidden, vocab, mlp = config.hidden_size, config.vocab_size, config.intermediate_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    expected = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                "lm_head.weight": (vocab, hidden)}
    per_layer = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
                 "self_attn.q_proj.weight": (heads * head_dim, hidden),
                 "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                 "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                 "self_attn.o_proj.weight": (hidden, heads * head_dim),
                 "mlp.gate_proj.weight": (mlp, hidden), "mlp.up_proj.weight": (mlp, hidden),
                 "mlp.down_proj.weight": (hidden, mlp)}
    for layer in range(layers):
        expected.update({f"model.layers.{layer}.{part}": shape for part, shape in per_layer.items()})
    for name, shape in expected.items():
        if name not in tensors:
            continue  # absent or factorized: the model built from the record names it
        file, entry = tensors[name]
        if entry.shape != shape:
            raise RankdownError(f"{file}: tensor {name!r} has shape {list(entry.shape)} but the config implies {list(shape)}")
