"""Open, pre-flight, load and save Llama checkpoints: Hugging Face folders, safetensors only.

Nothing here unpickles (a ``.bin`` checkpoint is refused with a hint to convert it) or
imports code from the folder: the config is read as JSON into the stock ``LlamaConfig``,
whatever ``auto_map`` says. Every shard name is contained in the folder, every header is
checked, and the tensors are matched against the model the config describes before any
weight is read.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from rankdown.atomic import atomic_folder
from rankdown.config_check import check_config_against_weights, check_config_values
from rankdown.errors import RankdownError
from rankdown.factor import FactorizedLinear, SharedDownLinear
from rankdown.factor_record import HEAD, RECORD_FILE, FactorRecord, apply_record, factored_table, record_of
from rankdown.safetensors_check import TensorEntry, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
SUPPORTED_MODEL_TYPES = ("llama",)
TIED_UP = f"{HEAD}.up.weight"  # a factored tied head's table, stored as model.embed_tokens.table.weight
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Checkpoint:
    """A checked checkpoint folder: its config, factor record and where each tensor lives."""

    folder: Path
    config: LlamaConfig
    record: FactorRecord
    tensors: dict[str, tuple[Path, TensorEntry]]

    @property
    def weight_files(self) -> list[Path]:
        return sorted({path for path, _ in self.tensors.values()})

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)

    @property
    def stored_dtype(self) -> torch.dtype:
        names = {entry.dtype for _, entry in self.tensors.values()}
        by_name = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        floats = [by_name[n] for n in sorted(names) if n in by_name]
        return floats[0] if len(floats) == 1 else torch.float32


def _read_json(path: Path, limit: int) -> dict:
    try:
        if path.stat().st_size > limit:
            raise RankdownError(f"{path}: larger than {limit} bytes")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RankdownError(f"{path}: cannot read: {e.strerror}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise RankdownError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RankdownError(f"{path}: not a JSON object")
    return data


def read_config(folder: Path) -> LlamaConfig:
    """The folder's config.json as a stock ``LlamaConfig``; remote code is never considered."""
    path = folder / "config.json"
    if not path.is_file():
        if (folder / "manifest.json").is_file():  # export's output given where a model is taken
            raise RankdownError(f"{folder}: a rankdown bundle (export's output), not a model folder: give the checkpoint "
                                "it was exported from")
        raise RankdownError(f"{folder}: no config.json (not a Hugging Face model folder)")
    raw = _read_json(path, MAX_CONFIG_BYTES)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise RankdownError(f"{path}: unsupported model type {model_type!r} (rankdown supports: llama)")
    raw.pop("auto_map", None)  # remote code: ignored, never imported
    check_config_values(raw, path)
    _check_rope(raw, path)
    try:
        config = LlamaConfig.from_dict(raw)
        LlamaRotaryEmbedding(config=config)  # the rotary table the model will build
    except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError) as e:
        raise RankdownError(f"{path}: invalid Llama config: {type(e).__name__}: {e}") from None
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise RankdownError(f"{path}: num_key_value_heads {kv_heads!r} does not divide num_attention_heads {heads}")
    if getattr(config, "head_dim", None) is None and config.hidden_size % heads:
        raise RankdownError(f"{path}: hidden_size {config.hidden_size} is not divisible by {heads} heads")
    return config


def _check_rope(raw: dict, path: Path) -> None:
    """A rotary setting the stock Llama can build: transformers only logs a warning for a bad
    factor and fails with a KeyError deep inside model construction for an unknown type."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta = raw.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise RankdownError(f"{path}: rope_theta must be a positive number, got {theta!r}")
    scaling = raw.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise RankdownError(f"{path}: rope_scaling must be an object or null, got {scaling!r}")
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ROPE_INIT_FUNCTIONS:
            raise RankdownError(f"{path}: rope_scaling type {kind!r} is not one of {', '.join(ROPE_INIT_FUNCTIONS)}")
        factor = scaling.get("factor", 1.0)
        if kind != "default" and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1):
            raise RankdownError(f"{path}: rope_scaling factor must be a number >= 1, got {factor!r}")


def _contained(folder: Path, name: object, where: Path) -> Path:
    """A shard path from the index, proven to stay inside the folder (no '..', absolute path or link out)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise RankdownError(f"{where}: shard name {name!r} points outside the model folder")
    path = folder / name
    if path.is_symlink() or not path.resolve().is_relative_to(folder.resolve()):
        raise RankdownError(f"{where}: shard {name!r} is a link or resolves outside the model folder")
    if not path.is_file():
        raise RankdownError(f"{where}: shard {name!r} is missing")
    return path


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    single = folder / SINGLE_FILE
    if index.exists():
        weight_map = _read_json(index, 64 * 1024 * 1024).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise RankdownError(f"{index}: no weight_map")
        return sorted({_contained(folder, name, index) for name in weight_map.values()})
    if single.exists():
        return [_contained(folder, SINGLE_FILE, folder)]
    pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
    if pickles:
        raise RankdownError(
            f"{folder}: no safetensors weights; pickle is not loaded ({pickles[0]}). Convert it "
            "once in a trusted sandbox: load it and save_pretrained(..., safe_serialization=True)"
        )
    raise RankdownError(f"{folder}: no weights (expected {SINGLE_FILE} or {INDEX_FILE})")


def meta_model(config: LlamaConfig, record: FactorRecord, folder: Path) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    apply_record(model, record, folder / RECORD_FILE)
    return model


def open_checkpoint(path: Path | str) -> Checkpoint:
    """Check a folder without reading weight data: config, record, headers, names and shapes."""
    folder = Path(path)
    if not folder.exists():
        raise RankdownError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise RankdownError(f"{folder}: not a folder (give a Hugging Face model folder)")
    config = read_config(folder)
    record = FactorRecord.read(folder)
    tensors: dict[str, tuple[Path, TensorEntry]] = {}
    for file in _weight_files(folder):
        for name, entry in read_header(file).items():
            if name in tensors:
                raise RankdownError(f"{file}: tensor {name!r} is also in {tensors[name][0].name}")
            tensors[name] = (file, entry)
    check_config_against_weights(config, tensors, folder)  # before the model the config describes is built
    expected = {k: tuple(v.shape) for k, v in meta_model(config, record, folder).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        expected.pop(TIED_UP, None)  # a factored tied head's ``up`` is the token table
        if "lm_head.weight" in tensors:
            _check_tied_head(tensors, folder)
            tensors.pop("lm_head.weight")
    for name, shape in expected.items():
        if name not in tensors:
            raise RankdownError(f"{folder}: tensor {name!r} is missing from the weights (config and weights disagree)")
        file, entry = tensors[name]
        if entry.shape != shape:
            raise RankdownError(
                f"{file}: tensor {name!r} has shape {list(entry.shape)} but the config implies {list(shape)}"
            )
        if entry.dtype not in ("F32", "F16", "BF16"):
            raise RankdownError(f"{file}: tensor {name!r} has dtype {entry.dtype}; expected F32, F16 or BF16")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise RankdownError(f"{tensors[extra[0]][0]}: tensor {extra[0]!r} is not in the model the config describes")
    return Checkpoint(folder, config, record, tensors)


def _check_tied_head(tensors: dict[str, tuple[Path, TensorEntry]], folder: Path) -> None:
    """A config that ties the head to the embedding, with weights that hold a different head,
    would silently drop the stored head: refuse unless the two are the same bytes."""
    head_file, head = tensors["lm_head.weight"]
    embed_file, embed = tensors.get("model.embed_tokens.weight", (None, None))
    if embed is None or (head.dtype, head.shape) != (embed.dtype, embed.shape):
        raise RankdownError(f"{head_file}: config.json ties the embeddings, but tensor 'lm_head.weight' "
                            "does not match model.embed_tokens.weight")
    with safe_open(str(head_file), framework="pt") as f:
        stored_head = f.get_tensor("lm_head.weight")
    with safe_open(str(embed_file), framework="pt") as f:
        stored_embed = f.get_tensor("model.embed_tokens.weight")
    if not torch.equal(stored_head, stored_embed):
        raise RankdownError(f"{head_file}: config.json ties the embeddings, but tensor 'lm_head.weight' differs "
                            "from model.embed_tokens.weight (set tie_word_embeddings to false)")


FINITE_CHUNK = 1 << 22  # elements checked at once: a whole-tensor isfinite costs several times the tensor


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf, checked in slices: on a 128k-vocabulary embedding a one-shot
    ``torch.isfinite(t).all()`` allocated 1.7 GB of temporaries, the compressor's whole peak."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(FINITE_CHUNK))


def load_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Materialize the model from a checked checkpoint: one copy of the weights, no random init."""
    model = meta_model(ckpt.config, ckpt.record, ckpt.folder)
    for file in ckpt.weight_files:
        chunk = {}
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name not in ckpt.tensors:
                    continue
                tensor = f.get_tensor(name)
                if not all_finite(tensor):
                    raise RankdownError(f"{file}: tensor {name!r} contains NaN or Inf")
                chunk[name] = tensor.to(dtype)
        model.load_state_dict(chunk, strict=False, assign=True)
    # Non-persistent buffers are not in the file; rebuild the rotary table on the CPU.
    model.model.rotary_emb = LlamaRotaryEmbedding(config=ckpt.config)
    if ckpt.config.tie_word_embeddings:
        tie_head(model)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{ckpt.folder}: tensors left unloaded: {left[:3]}")
    model.config.dtype = dtype
    return model.eval()


def tie_head(model: LlamaForCausalLM) -> None:
    """Point a tied head at the token table: the dense weight, or a factored head's ``up``."""
    table = factored_table(model)
    if table is None:
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        head = model.get_submodule(HEAD)
        assert isinstance(head, FactorizedLinear), "a factored table's head is a factor pair (apply_record)"
        head.up.weight = table.table.weight


def load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The folder's fast tokenizer (tokenizer.json); chat templates are never rendered."""
    path = folder / "tokenizer.json"
    if not path.is_file() or path.is_symlink():
        raise RankdownError(f"{folder}: no tokenizer.json (a fast tokenizer file is required)")
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise RankdownError(f"{path}: larger than {MAX_TOKENIZER_BYTES} bytes")
    _check_tokenizer_config(folder)
    try:
        # tokenizer_file is passed explicitly: transformers would otherwise take it from
        # tokenizer_config.json, and resolve even a plain name against the working directory.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True,
                                                            tokenizer_file=str(path))
    except Exception as e:  # the library raises many types for a corrupt file
        raise RankdownError(f"{path}: cannot load tokenizer: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_tokenizer_config(folder: Path) -> None:
    """tokenizer_config.json may only name files by their standard names in this folder; a path
    elsewhere (``../``, absolute) is refused before transformers reads it. Its chat template is
    kept as text: rankdown never renders it."""
    path = folder / "tokenizer_config.json"
    if not path.exists():
        return
    if path.is_symlink():
        raise RankdownError(f"{path}: is a link; tokenizer files must be plain files in the model folder")
    raw = _read_json(path, MAX_CONFIG_BYTES * 16)
    for key, value in raw.items():
        if not key.endswith("_file") or value is None:
            continue
        name = Path(str(value))
        if not isinstance(value, str) or name.is_absolute() or ".." in name.parts or len(name.parts) != 1:
            raise RankdownError(f"{path}: {key} {value!r} points outside the model folder")


def _write_folder_files(folder: Path, model: LlamaForCausalLM, source: Path, dtype: torch.dtype,
                        extra_files: dict[str, str] | None) -> None:
    """Everything but the weights: config, factor record, the source's tokenizer files, extras."""
    config = model.config.to_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in config:  # load_model sets float32 on the config it shares; transformers reads ``dtype`` first
        config["dtype"] = config["torch_dtype"]
    config.pop("auto_map", None)
    record = record_of(model)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if record.modules:
        (folder / RECORD_FILE).write_text(record.to_json(), encoding="utf-8")
    for name in TOKENIZER_FILES:
        src = source / name
        if src.is_file() and not src.is_symlink():
            shutil.copyfile(src, folder / name)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text, encoding="utf-8")


def _storable(name: str, tensor: torch.Tensor, dtype: torch.dtype, out: Path) -> torch.Tensor:
    if not all_finite(tensor):
        raise RankdownError(f"{out}: refusing to write tensor {name!r}: it contains NaN or Inf")
    return tensor.detach().to(dtype).contiguous()  # a copy only where the dtype changes


def save_checkpoint(
    model: LlamaForCausalLM,
    source: Path,
    out: Path,
    dtype: torch.dtype,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a checkpoint folder (weights, config, record, tokenizer), atomically."""
    with atomic_folder(out, overwrite=overwrite) as tmp:
        write_into(tmp, model, source, dtype, extra_files)
    return out


def write_into(folder: Path, model: LlamaForCausalLM, source: Path, dtype: torch.dtype,
               extra_files: dict[str, str] | None = None) -> None:
    """Write ``model`` into ``folder`` (a folder being built, e.g. an atomic one's temporary) as one
    safetensors file, replacing any weight files and factor record already there."""
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name in ("lm_head.weight", TIED_UP):
            continue
        state[name] = _storable(name, tensor, dtype, folder)
    for old in [*folder.glob("model*.safetensors"), folder / INDEX_FILE, folder / RECORD_FILE]:
        old.unlink(missing_ok=True)
    save_file(state, str(folder / SINGLE_FILE), metadata={"format": "pt"})
    _write_folder_files(folder, model, source, dtype, extra_files)


class ShardedWriter:
    """A checkpoint written one piece at a time (a safetensors shard per piece, then the index),
    so that a streaming compressor never holds the whole output: memory stays at one piece."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.folder, self.dtype = folder, dtype
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {name: _storable(name, t, self.dtype, self.folder) for name, t in tensors.items()}
        path = self.folder / f".piece-{len(self.shards)}.safetensors"
        save_file(state, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(state)))

    def finish(self, model: LlamaForCausalLM, source: Path, extra_files: dict[str, str] | None = None) -> None:
        """Name the shards, write the index and the folder's other files (``model`` may be on meta)."""
        weight_map, total = {}, len(self.shards)
        for number, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{number:05d}-of-{total:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        size = sum((self.folder / f).stat().st_size for f in set(weight_map.values()))
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _write_folder_files(self.folder, model, source, self.dtype, extra_files)


def read_tensors(ckpt: Checkpoint, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose names start with ``prefix``, read from safetensors on demand
    (``dtype`` None keeps the stored dtype), so a streaming pass holds only what it is working on."""
    found = {}
    for name, (file, _entry) in ckpt.tensors.items():
        if not name.startswith(prefix):
            continue
        with safe_open(str(file), framework="pt") as f:
            tensor = f.get_tensor(name)
        if not all_finite(tensor):
            raise RankdownError(f"{file}: tensor {name!r} contains NaN or Inf")
        found[name] = tensor if dtype is None else tensor.to(dtype)
    return found


def skeleton_model(ckpt: Checkpoint) -> LlamaForCausalLM:
    """The checkpoint's model with every weight on the meta device (no memory), rotary table built."""
    model = meta_model(ckpt.config, ckpt.record, ckpt.folder)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=ckpt.config)
    return model.eval()


def linear_modules(model: nn.Module) -> dict[str, nn.Linear | FactorizedLinear | SharedDownLinear]:
    """The decoder's linears (dense or factorized) by qualified name; embeddings and lm_head excluded."""
    kinds = (nn.Linear, FactorizedLinear, SharedDownLinear)
    found: dict[str, nn.Linear | FactorizedLinear | SharedDownLinear] = {}
    for name, module in model.named_modules():
        if not name.startswith("model.layers.") or not isinstance(module, kinds):
            continue
        if any(name.startswith(parent + ".") for parent in found):
            continue  # the down/up halves of a pair already listed
        found[name] = module
    return found
