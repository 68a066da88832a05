"""onnxruntime-genai for the ONNX bundle: ``onnx/genai_config.json`` and the decoder that drives
``onnxruntime_genai``'s ``Generator`` the way an app does.

onnxruntime-genai (the LLM runtime of ONNX apps on Android, iOS and Windows) opens a folder that
holds ``genai_config.json``, the graph and the tokenizer files. For the fused graph (the default)
the model builder writes the config itself (export/onnx_builder.py): ``past_key_values.%d.key`` in,
``present.%d.key`` out, one cache buffer of ``max_length`` positions that GroupQueryAttention writes
in place (``past_present_share_buffer`` true). For optimum's graph (``--onnx-graph optimum``)
``genai_config`` below names optimum's I/O and the cache grows by concatenation
(``past_present_share_buffer`` false), as that graph computes it.

The decoder half (``open_genai``, ``GenaiDecoder``) imports only numpy and the runtime: it ships to
devices with the harness. Writing the config reads the graph with ``onnx``, imported inside.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from rankdown.export.decoding import GENAI_CONFIG, check_positions

# What onnxruntime-genai's tokenizer reads, from the folder of genai_config.json.
GENAI_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def genai_config(model_config: dict, generation_config: dict, graph_inputs: set[str], graph_outputs: set[str],
                 model_file: str) -> dict:
    """The config for optimum's text-generation-with-past graph of a Llama (model builder's schema,
    onnxruntime-genai 0.18: ``model.decoder.inputs/outputs`` name the graph's tensors)."""
    heads = model_config["num_attention_heads"]
    context = model_config["max_position_embeddings"]
    eos = generation_config.get("eos_token_id", model_config.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = generation_config.get("pad_token_id", model_config.get("pad_token_id"))
    inputs = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}
    inputs.update({name: name for name in ("attention_mask", "position_ids") if name in graph_inputs})
    missing = {"input_ids", "past_key_values.0.key"} - graph_inputs | {"logits", "present.0.key"} - graph_outputs
    if missing:
        raise ValueError(f"not optimum's decoder graph with a KV cache (missing {', '.join(sorted(missing))})")
    return {
        "model": {
            "type": model_config.get("model_type", "llama"),
            "bos_token_id": model_config.get("bos_token_id"),
            "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
            "pad_token_id": pad if pad is not None else (eos_ids[0] if eos_ids else 0),
            "context_length": context,
            "vocab_size": model_config["vocab_size"],
            "decoder": {
                "filename": model_file,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": model_config.get("head_dim") or model_config["hidden_size"] // heads,
                "hidden_size": model_config["hidden_size"],
                "num_attention_heads": heads,
                "num_key_value_heads": model_config.get("num_key_value_heads") or heads,
                "num_hidden_layers": model_config["num_hidden_layers"],
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        # Greedy by default: an app that wants sampling sets it on its GeneratorParams.
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
                   "min_length": 0, "past_present_share_buffer": False, "temperature": 1.0, "top_k": 1,
                   "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
                   "diversity_penalty": 0.0, "early_stopping": True},
    }


def write_genai_files(folder: Path, bundle: Path, model_file: str, keep_config: bool = False) -> list[str]:
    """Write ``folder/genai_config.json`` for the graph ``folder/model_file`` (``keep_config``: the
    model builder already wrote it for its own graph) and copy the bundle's tokenizer files beside it
    (onnxruntime-genai reads them from the config's folder). Returns the names written."""
    import onnx

    from rankdown.atomic import write_text_atomic

    if keep_config:
        if not (folder / GENAI_CONFIG).is_file():
            from rankdown.errors import RankdownError

            raise RankdownError(f"{folder / GENAI_CONFIG}: the model builder wrote none")
    else:
        graph = onnx.load(str(folder / model_file), load_external_data=False).graph
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        gen_path = folder / "generation_config.json"
        generation = json.loads(gen_path.read_text(encoding="utf-8")) if gen_path.is_file() else {}
        config = genai_config(model_config, generation, {i.name for i in graph.input},
                              {o.name for o in graph.output}, model_file)
        write_text_atomic(folder / GENAI_CONFIG, json.dumps(config, indent=2) + "\n")
    written = [GENAI_CONFIG]
    for name in GENAI_TOKENIZER_FILES:
        if (bundle / name).is_file():
            shutil.copy2(bundle / name, folder / name)
            written.append(name)
    spec, changes = genai_readable(json.loads((bundle / "tokenizer.json").read_text(encoding="utf-8")))
    if changes:
        write_text_atomic(folder / "tokenizer.json", json.dumps(spec, ensure_ascii=False, indent=2) + "\n")
        written[written.index("tokenizer.json")] += f" ({'; '.join(changes)})"
    return written


def genai_readable(spec: dict) -> tuple[dict, list[str]]:
    """The tokenizer spec as onnxruntime-extensions (genai's tokenizer) reads it, and the changes in words.

    transformers' GGUF conversion gives a byte-level BPE (SmolLM2, Llama 3) the decoder of a
    SentencePiece one: ``Sequence[ByteFallback, Fuse, Replace('▁', ' '), ByteLevel]``. The library
    then takes it for SentencePiece and encodes every word after a space as -1. Over a byte-level
    vocabulary the first three are identities, so the decoder becomes the ``ByteLevel`` alone;
    export/onnx.py proves it decodes and encodes the check texts as the original does."""
    decoder = spec.get("decoder")
    if not isinstance(decoder, dict) or decoder.get("type") != "Sequence":
        return spec, []
    members = decoder.get("decoders")
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        return spec, []
    last = members[-1]
    if last.get("type") != "ByteLevel" or not all(m.get("type") in ("ByteFallback", "Fuse", "Replace")
                                                   for m in members[:-1]) or len(members) == 1:
        return spec, []
    dropped = ", ".join(m["type"] for m in members[:-1])
    return {**spec, "decoder": last}, [f"decoder: {dropped} dropped before ByteLevel"]


def genai_encodings(folder: Path, texts: list[str]) -> list[list[int]]:
    """onnxruntime-genai's own tokenizer on ``texts`` (it adds no BOS: an app prepends it)."""
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(og.Model(str(folder)))
    return [[int(t) for t in tokenizer.encode(text)] for text in texts]


class GenaiDecoder:
    """The bundle's ONNX folder in onnxruntime-genai: a ``Generator`` per prompt, fed with
    ``append_tokens``; the prompt's logits from the graph's ``logits`` output, a step's from ``get_logits``."""

    def __init__(self, folder: Path, threads: int | None = None):
        import onnxruntime_genai as og

        self._og = og
        config = og.Config(str(folder))
        if threads:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        settings = json.loads((Path(folder) / GENAI_CONFIG).read_text(encoding="utf-8"))
        self.max_positions = int(settings["model"]["context_length"])
        self._generator: Any = None
        self._length = 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        check_positions(ids, 0, self.max_positions)
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.max_positions)
        generator = self._og.Generator(self.model, params)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        self._generator, self._length = generator, len(ids)
        return np.asarray(generator.get_output("logits"))[0].astype(np.float32, copy=False)

    def step(self, token: int) -> np.ndarray:
        if self._generator is None:
            raise ValueError("step before prefill")
        check_positions([token], self._length, self.max_positions)
        self._generator.append_tokens(np.asarray([[token]], dtype=np.int32))
        self._length += 1
        return np.asarray(self._generator.get_logits())[0, -1].astype(np.float32, copy=False)


def open_genai(artifact: Path, threads: int | None = None, native_runner: list[str] | None = None) -> GenaiDecoder:
    """The onnxruntime-genai runtime's decoder opener (export/formats.py): the artifact's folder."""
    return GenaiDecoder(Path(artifact).parent, threads=threads)
