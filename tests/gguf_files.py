"""Tiny Llama GGUF files written by the tests with the ``gguf`` package, as llama.cpp's converter
writes them (query/key rows permuted for its rotary layout, 2-D weights quantized, norms F32)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file

NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module = rest.removesuffix(".weight")
    return f"blk.{layer}.{NAMES[module]}.weight"


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def round_trip(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """What a tensor stored as ``qtype`` reads back as (rows are quantized independently)."""
    if w.ndim == 1:
        return w.astype(np.float32)
    return dequantize(quantize(w.astype(np.float32), qtype), qtype).reshape(w.shape)


def write_gguf(folder: Path, out: Path, qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
               arch: str = "llama", metadata_overrides: dict | None = None, tokens_cut: int = 0) -> Path:
    """``folder`` (a tiny Llama checkpoint) as llama.cpp would store it in ``qtype``."""
    config = json.loads((folder / "config.json").read_text())
    tok = json.loads((folder / "tokenizer.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = GGUFWriter(out, arch)
    counts = {"block_count": config["num_hidden_layers"], "context_length": config["max_position_embeddings"],
              "embedding_length": config["hidden_size"], "feed_forward_length": config["intermediate_size"],
              "attention.head_count": heads, "attention.head_count_kv": kv_heads,
              "rope.dimension_count": config["hidden_size"] // heads, "vocab_size": config["vocab_size"]}
    counts = {f"{arch}.{k}": v for k, v in counts.items()} | (metadata_overrides or {})
    for key, value in counts.items():
        writer.add_uint32(key, value)
    writer.add_float32(f"{arch}.rope.freq_base", float(config["rope_theta"]))
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"] for t in tok["added_tokens"] if t["special"]}
    tokens = [token for token, _ in vocab][: len(vocab) - tokens_cut]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, w in tensors.items():
        if config.get("tie_word_embeddings") and name == "lm_head.weight":
            continue
        if ".q_proj." in name:
            w = _permute(w, heads)
        elif ".k_proj." in name:
            w = _permute(w, kv_heads)
        if w.ndim == 1 or qtype == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), w.astype(np.float32))
        else:
            writer.add_tensor(gguf_name(name), quantize(w.astype(np.float32), qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def patch_tensor_info(raw: bytes, tensor: str, dim0: int | None = None, type_id: int | None = None,
                      offset: int | None = None) -> bytes:
    """A copy of a GGUF file with one tensor's info rewritten (name, n_dims, dims, type, offset)."""
    name = tensor.encode()
    at = raw.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    dims_at, type_at = at + 4, at + 4 + 8 * n_dims
    out = bytearray(raw)
    if dim0 is not None:
        struct.pack_into("<Q", out, dims_at, dim0)
    if type_id is not None:
        struct.pack_into("<I", out, type_at, type_id)
    if offset is not None:
        struct.pack_into("<Q", out, type_at + 4, offset)
    return bytes(out)
