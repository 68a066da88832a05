"""Read and check a GGUF file's header before any library parses it (bounded memory).

llama.cpp's format is a header (magic, version, counts), typed key/value metadata, tensor
infos (name, dims, type, offset) and an aligned data region. gguf's ``GGUFReader`` trusts the
counts and lengths it reads, so a file that claims 10^12 tensors or a string longer than the
file is parsed here first: every count and length is checked against what the file can hold
before it is used, and every tensor's bytes are proven to lie inside the file. Then the
metadata is checked against the tensors as a Llama (layers, widths, heads, vocabulary), so
that a lie is refused in one line, in seconds, before anything is dequantized.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from rankdown.errors import RankdownError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_TENSORS = 1 << 16  # a 405B Llama has about 1,100
MAX_KV = 1 << 16
MAX_STRING_BYTES = 16 << 20  # a chat template is kilobytes
MAX_ARRAY_ITEMS = 1 << 24  # vocabularies and merge lists are a few hundred thousand
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # in PyTorch order (rows first): GGUF lists the fastest dimension first
    type_name: str
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]


class _Cursor:
    """Reads from a memory-mapped file, refusing any read past its end (the one bound on lengths)."""

    def __init__(self, buf: mmap.mmap, bad):
        self.buf, self.pos, self.bad = buf, 0, bad

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.bad(f"{what} runs past the end of the file (truncated or a length that lies)")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, kind: int, what: str):
        fmt = SCALARS[kind]
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.scalar(10, what)
        if length > MAX_STRING_BYTES:
            raise self.bad(f"{what} claims a string of {length} bytes (limit {MAX_STRING_BYTES})")
        start = self.take(length, what)
        try:
            return bytes(self.buf[start:start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.bad(f"{what} is not UTF-8") from None

    def value(self, kind: int, what: str):
        if kind in SCALARS:
            return self.scalar(kind, what)
        if kind == STRING:
            return self.string(what)
        if kind != ARRAY:
            raise self.bad(f"{what} has unknown value type {kind}")
        item_kind, count = self.scalar(4, what), self.scalar(10, what)
        if count > MAX_ARRAY_ITEMS:
            raise self.bad(f"{what} claims {count} items (limit {MAX_ARRAY_ITEMS})")
        if item_kind in SCALARS:
            fmt = SCALARS[item_kind]
            start = self.take(count * struct.calcsize(fmt), what)
            return list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, start))
        if item_kind == STRING:
            # Each item needs at least its 8-byte length: a count the file cannot hold fails here, not after a long loop.
            if count * 8 > len(self.buf) - self.pos:
                raise self.bad(f"{what} claims {count} strings, more than the file can hold")
            return [self.string(what) for _ in range(count)]
        raise self.bad(f"{what} is an array of unsupported type {item_kind}")


def _type_size(type_id: int, bad) -> tuple[str, int, int]:
    try:
        kind = GGMLQuantizationType(type_id)
    except ValueError:
        raise bad(f"unknown tensor type {type_id}") from None
    if kind not in GGML_QUANT_SIZES:
        raise bad(f"tensor type {kind.name} has no known size")
    block, size = GGML_QUANT_SIZES[kind]
    return kind.name, block, size


def read_gguf_header(path: Path) -> GGUFHeader:
    """The metadata and tensor infos of a GGUF file, every length checked against the file."""
    path = Path(path)

    def bad(problem: str) -> RankdownError:
        return RankdownError(f"{path}: not a valid GGUF file: {problem}")

    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise bad(f"file is {size} bytes, too short for a header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, size, bad)
    except OSError as e:
        raise RankdownError(f"{path}: cannot read: {e.strerror or e}") from None


def _parse(buf: mmap.mmap, size: int, bad) -> GGUFHeader:
    cur = _Cursor(buf, bad)
    if bytes(buf[:4]) != MAGIC:
        raise bad("no GGUF magic at the start")
    cur.take(4, "magic")
    version = cur.scalar(4, "version")
    if version not in VERSIONS:
        raise bad(f"version {version} (rankdown reads GGUF versions 2 and 3, little-endian)")
    n_tensors, n_kv = cur.scalar(10, "tensor count"), cur.scalar(10, "metadata count")
    if n_tensors > MAX_TENSORS:
        raise bad(f"claims {n_tensors} tensors (limit {MAX_TENSORS})")
    if n_kv > MAX_KV:
        raise bad(f"claims {n_kv} metadata entries (limit {MAX_KV})")
    # The smallest entries: a 1-byte key and a 1-byte value; a 1-byte name, one dimension, type and offset.
    if n_kv * 14 + n_tensors * 33 > size - cur.pos:
        raise bad(f"claims {n_tensors} tensors and {n_kv} metadata entries, more than its {size} bytes can hold")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        if key in metadata:
            raise bad(f"metadata key {key!r} appears twice")
        metadata[key] = cur.value(cur.scalar(4, f"metadata {key!r}"), f"metadata {key!r}")
    infos = []
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.scalar(4, f"tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise bad(f"tensor {name!r} has {n_dims} dimensions")
        dims = [cur.scalar(10, f"tensor {name!r}") for _ in range(n_dims)]
        type_id, offset = cur.scalar(4, f"tensor {name!r}"), cur.scalar(10, f"tensor {name!r}")
        infos.append((name, dims, type_id, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise bad(f"general.alignment {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, type_id, offset in infos:
        if name in tensors:
            raise bad(f"tensor {name!r} appears twice")
        type_name, block, type_size = _type_size(type_id, lambda p, n=name: bad(f"tensor {n!r}: {p}"))
        if any(d < 1 for d in dims) or dims[0] % block:
            raise bad(f"tensor {name!r} has dimensions {dims} that {type_name} blocks of {block} cannot hold")
        nbytes = math.prod(dims) // block * type_size
        begin = data_start + offset
        if offset % alignment or begin + nbytes > size:
            raise bad(f"tensor {name!r} lies outside the file (bytes {begin}..{begin + nbytes} of {size})")
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(dims)), type_name, begin, nbytes)
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: t.offset):
        if info.offset < position:
            raise bad(f"tensor {info.name!r} overlaps another tensor")
        position = info.offset + info.nbytes
    return GGUFHeader(version, metadata, tensors)


def check_readable_types(header: GGUFHeader, path: Path) -> None:
    """Every tensor type is one gguf can dequantize: tried once per type on one zero block."""
    for type_name in sorted({t.type_name for t in header.tensors.values()}):
        kind = GGMLQuantizationType[type_name]
        block, size = GGML_QUANT_SIZES[kind]
        try:
            dequantize(np.zeros((1, size), dtype=np.uint8), kind)
        except NotImplementedError:
            name = next(t.name for t in header.tensors.values() if t.type_name == type_name)
            raise RankdownError(f"{path}: tensor {name!r} has type {type_name}, which cannot be dequantized "
                                "(gguf reads F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0 and the K-quants)") from None


_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
LAYER_TENSORS = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                 "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
OPTIONAL_TENSORS = ("output.weight", "rope_freqs.weight")


def _positive(meta: dict, key: str, path: Path, default: int | None = None) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RankdownError(f"{path}: GGUF metadata {key} must be a positive integer, got {value!r}")
    return value


def check_llama(header: GGUFHeader, path: Path) -> None:
    """The metadata describes a Llama and agrees with every tensor's name and shape, and the
    tokenizer's vocabulary is the embedding's rows: a lie in any count is refused here."""
    meta, tensors = header.metadata, header.tensors
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise RankdownError(f"{path}: GGUF architecture {arch!r} is not supported (rankdown reads llama)")
    layers = _positive(meta, "llama.block_count", path)
    hidden = _positive(meta, "llama.embedding_length", path)
    mlp = _positive(meta, "llama.feed_forward_length", path)
    heads = _positive(meta, "llama.attention.head_count", path)
    kv_heads = _positive(meta, "llama.attention.head_count_kv", path, default=heads)
    head_dim = _positive(meta, "llama.rope.dimension_count", path, default=hidden // heads or 1)
    if heads % kv_heads or head_dim % 2:
        raise RankdownError(f"{path}: GGUF heads {heads}/{kv_heads} (query/key-value) with head size {head_dim} "
                            "are not a grouped-query attention layout")
    found = {int(m.group(1)) for name in tensors if (m := _LAYER.fullmatch(name))}
    if len(found) != layers or max(found, default=-1) != layers - 1:  # distinct and >= 0: then exactly 0..layers-1
        raise RankdownError(f"{path}: llama.block_count is {layers} but the file holds {len(found)} layers "
                            f"(numbered {min(found, default=0)}..{max(found, default=-1)})")
    embed = tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2 or embed.shape[1] != hidden:
        raise RankdownError(f"{path}: tensor 'token_embd.weight' is missing or not [vocabulary, {hidden}] "
                            f"(llama.embedding_length {hidden})")
    vocab = embed.shape[0]
    expected = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    shapes = {"attn_norm.weight": (hidden,), "attn_q.weight": (heads * head_dim, hidden),
              "attn_k.weight": (kv_heads * head_dim, hidden), "attn_v.weight": (kv_heads * head_dim, hidden),
              "attn_output.weight": (hidden, heads * head_dim), "ffn_norm.weight": (hidden,),
              "ffn_gate.weight": (mlp, hidden), "ffn_up.weight": (mlp, hidden), "ffn_down.weight": (hidden, mlp)}
    for layer in range(layers):
        expected.update({f"blk.{layer}.{part}": shape for part, shape in shapes.items()})
    if "output.weight" in tensors:
        expected["output.weight"] = (vocab, hidden)
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise RankdownError(f"{path}: tensor {name!r} is missing (the metadata describes {layers} Llama layers)")
        if info.shape != shape:
            raise RankdownError(f"{path}: tensor {name!r} has shape {list(info.shape)} but the metadata implies {list(shape)}")
    extra = sorted(set(tensors) - set(expected) - set(OPTIONAL_TENSORS))
    if extra:
        raise RankdownError(f"{path}: tensor {extra[0]!r} is not part of a Llama")
    _check_tokenizer(meta, vocab, path)


def _check_tokenizer(meta: dict, vocab: int, path: Path) -> None:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise RankdownError(f"{path}: no tokenizer in the file (tokenizer.ggml.tokens)")
    if len(tokens) != vocab:
        raise RankdownError(f"{path}: the tokenizer has {len(tokens)} tokens but the embedding has {vocab} rows")
    declared = meta.get("llama.vocab_size", vocab)
    if declared != vocab:
        raise RankdownError(f"{path}: llama.vocab_size {declared!r} but the embedding has {vocab} rows")
    model = meta.get("tokenizer.ggml.model")
    merges = meta.get("tokenizer.ggml.merges")
    if model != "gpt2" or not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        # transformers rebuilds missing merges in time quadratic in the vocabulary: refused, not waited for.
        raise RankdownError(f"{path}: tokenizer {model!r} without BPE merges is not supported "
                            "(rankdown reads byte-level BPE GGUF tokenizers: tokenizer.ggml.model 'gpt2' with merges)")
    types = meta.get("tokenizer.ggml.token_type")
    if types is not None and (not isinstance(types, list) or len(types) != vocab):
        raise RankdownError(f"{path}: tokenizer.ggml.token_type has {len(types) if isinstance(types, list) else types!r} "
                            f"entries for {vocab} tokens")
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab):
            raise RankdownError(f"{path}: tokenizer.ggml.{key} {value!r} is not a token of the {vocab}-token vocabulary")


def check_gguf(path: Path) -> GGUFHeader:
    """Everything that can be proven from the header: structure, types, Llama shape, tokenizer."""
    header = read_gguf_header(path)
    check_readable_types(header, path)
    check_llama(header, path)
    return header


def is_gguf(path: Path) -> bool:
    """A regular file that starts with the GGUF magic (what a file is, its bytes say, not its name)."""
    try:
        with Path(path).open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
