"""``rankdown import``: a GGUF file (llama.cpp's format) as a safetensors checkpoint folder, once.

Dequantizing is slow, so it is done once and the later stages read the folder. The file is
checked first (``gguf_check``: bounded, in seconds), then transformers' GGUF loader does the
work it owns: dequantizing every tensor through the ``gguf`` package, undoing llama.cpp's
query/key row permutation, naming tensors as the Hugging Face Llama does, and rebuilding the
tokenizer and chat template from the file. The fp32 weights are held once (the loader's
state dict, assigned to the model without a copy) and written with the config, the tokenizer
and ``import.json`` (the source's sha256) into a folder that appears only when complete and
only after rankdown's own loaders have opened it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rankdown import __version__
from rankdown.atomic import atomic_folder, check_output_path
from rankdown.checkpoint import SINGLE_FILE, all_finite, load_tokenizer, open_checkpoint
from rankdown.errors import RankdownError
from rankdown.gguf_check import GGUFHeader, check_gguf
from rankdown.output_lock import exclusive_output
from rankdown.schema import dump_json, read_dataclass

IMPORT_FILE = "import.json"
IMPORT_SCHEMA_VERSION = 1
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ImportRecord:
    """Where an imported folder came from: enough to tell whether a file is the one imported."""

    source: str
    sha256: str
    size_bytes: int
    tensor_types: dict[str, int]  # GGUF tensor type -> how many tensors had it
    rankdown_version: str
    seconds: float
    schema_version: int = IMPORT_SCHEMA_VERSION

    def __post_init__(self):
        if self.schema_version != IMPORT_SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not {IMPORT_SCHEMA_VERSION}")

    @classmethod
    def read(cls, folder: Path) -> ImportRecord:
        return read_dataclass(cls, Path(folder) / IMPORT_FILE, "import record")


def sha256_of(path: Path) -> str:
    try:
        with Path(path).open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise RankdownError(f"{path}: cannot read: {e.strerror}") from None


def _header_config(header: GGUFHeader) -> LlamaConfig:
    """The skeleton the loader maps tensor names onto (its layer count and widths, checked)."""
    meta, embed = header.metadata, header.tensors["token_embd.weight"]
    heads = meta["llama.attention.head_count"]
    return LlamaConfig(
        vocab_size=embed.shape[0], hidden_size=embed.shape[1], intermediate_size=meta["llama.feed_forward_length"],
        num_hidden_layers=meta["llama.block_count"], num_attention_heads=heads,
        num_key_value_heads=meta.get("llama.attention.head_count_kv", heads),
        head_dim=meta.get("llama.rope.dimension_count", embed.shape[1] // heads),
        tie_word_embeddings="output.weight" not in header.tensors,
    )


def _tokenizer(parsed: dict, header: GGUFHeader) -> PreTrainedTokenizerFast:
    """The file's tokenizer through transformers' GGUF converter. Special tokens are named from
    the file's ids here: the 4.57 converter passes the BOS token as both BOS and EOS."""
    from transformers.integrations.ggml import convert_gguf_tokenizer

    backend, _extra = convert_gguf_tokenizer("llama", dict(parsed["tokenizer"]))
    tokens, meta = header.metadata["tokenizer.ggml.tokens"], header.metadata
    if backend.normalizer is not None and json.loads(backend.normalizer.__getstate__()).get("normalizers") == []:
        # The converter writes an empty normalizer Sequence, which ExecuTorch's C++ tokenizer refuses.
        backend.normalizer = None
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") is True and bos_id is not None:
        # As llama.cpp does for this file: BOS only when the file asks for it.
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, bos_id)])
    special = {}
    for key, name in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        if meta.get(f"tokenizer.ggml.{name}") is not None:
            special[key] = tokens[meta[f"tokenizer.ggml.{name}"]]
    template = parsed["tokenizer_config"].get("chat_template")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **special)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load(source: Path, header: GGUFHeader) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The dequantized model (fp32, weights held once) and tokenizer, by transformers' GGUF loader."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    skeleton = _header_config(header)
    with torch.device("meta"):
        model = LlamaForCausalLM(skeleton)
    try:
        parsed = load_gguf_checkpoint(str(source), return_tensors=True, model_to_load=model)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise RankdownError(f"{source}: transformers' GGUF loader refused it: {str(e).splitlines()[0]}") from None
    state = parsed.pop("tensors")
    settings = {k: v for k, v in parsed["config"].items() if not k.startswith("_")}
    settings.update(tie_word_embeddings=skeleton.tie_word_embeddings, vocab_size=skeleton.vocab_size,
                    head_dim=skeleton.head_dim, torch_dtype="float32")
    tokenizer = _tokenizer(parsed, header)
    settings.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(**settings)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise RankdownError(f"{source}: the GGUF tensors do not map onto a Llama "
                            f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
    for name, tensor in state.items():
        if not all_finite(tensor):
            raise RankdownError(f"{source}: tensor {name!r} dequantizes to NaN or Inf")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)  # the loader's tensors, not copies
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model, tokenizer


def _write(folder: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, record: ImportRecord) -> None:
    state = {name: t.contiguous() for name, t in model.state_dict().items()
             if not (model.config.tie_word_embeddings and name == "lm_head.weight")}
    save_file(state, str(folder / SINGLE_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["torch_dtype"] = "float32"
    # Tools that pick a model class from the config (onnxruntime-genai's builder, optimum) refuse null.
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # The chat template stays inside tokenizer_config.json, which every later stage copies.
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)
    (folder / IMPORT_FILE).write_text(dump_json(record), encoding="utf-8")


def import_gguf(source: Path, out: Path, overwrite: bool = False, progress: Progress = print,
                sha256: str | None = None) -> ImportRecord:
    """Check ``source``, dequantize it and write the checkpoint folder ``out`` with ``import.json``."""
    source, out = Path(source), Path(out)
    start = time.perf_counter()
    header = check_gguf(source)
    check_output_path(out, [source], overwrite)
    digest = sha256 or sha256_of(source)
    types = dict(sorted(collections.Counter(t.type_name for t in header.tensors.values()).items()))
    progress(f"importing {source} ({source.stat().st_size / 2**20:.1f} MiB; tensors "
             f"{', '.join(f'{n} {k}' for k, n in types.items())}): dequantizing to float32")
    with exclusive_output(out, "importing"):
        model, tokenizer = _load(source, header)
        record = ImportRecord(source=str(source.resolve()), sha256=digest, size_bytes=source.stat().st_size,
                              tensor_types=types, rankdown_version=__version__,
                              seconds=round(time.perf_counter() - start, 1))
        with atomic_folder(out, overwrite=overwrite) as tmp:
            _write(tmp, model, tokenizer, record)
            del model
            open_checkpoint(tmp)
            load_tokenizer(tmp)
    return record
