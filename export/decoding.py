"""Greedy decoding with a KV cache in each runtime, the way an app drives the artifact.

Deliberately light: numpy and the runtime only (no transformers, no optimum), because the
same code runs on devices that have no PyTorch. ExecuTorch's Python runtime does import
torch for its tensors; on a device the C++ runner takes its place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rankdown.library_logs import native_stderr_without

# An ExecuTorch program's second method: one token, static shapes, the same weights and KV cache as
# forward (export/executorch.py); decoders call it for each generated token when it is there.
# Not "decode": ExecuTorch's TextLLMRunner (1.5) sends every generated token to a method of that
# name, in a Module whose methods do not share arenas, so it would read an empty cache. Under this
# name TextLLMRunner runs forward for everything, as on a one-method program.
DECODE_METHOD = "decode_step"
# What rankdown named it before 2026-12-04 (an opt-in then). A program with it answers wrongly in
# TextLLMRunner, so decoders refuse it rather than pass a bundle an app would break on.
LEGACY_DECODE_METHOD = "decode"
# onnxruntime-genai's config beside the graph (export/onnx_genai.py writes it): which I/O and cache layout.
GENAI_CONFIG = "genai_config.json"


class Decoder(Protocol):
    """One sequence at a time: ``prefill`` a prompt, then ``step`` one token at a time."""

    max_positions: int | None

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Reset the cache, run the prompt in one call; logits for every prompt position (n, vocab)."""

    def step(self, token: int) -> np.ndarray:
        """Append one token; its logits (vocab,)."""


@dataclass(frozen=True)
class Generation:
    prompt_logits: np.ndarray  # (n_prompt, vocab), float32
    tokens: tuple[int, ...]  # new tokens, greedy, exactly ``new_tokens`` of them (no stop at EOS)
    step_logits: np.ndarray  # (new_tokens, vocab): the logits each new token was chosen from


def greedy(decoder: Decoder, prompt: list[int], new_tokens: int) -> Generation:
    """Greedy continuation of a fixed length, so two runtimes are compared token for token."""
    if decoder.max_positions is not None and len(prompt) + new_tokens > decoder.max_positions:
        raise ValueError(f"prompt of {len(prompt)} + {new_tokens} new tokens exceeds the artifact's "
                         f"{decoder.max_positions} positions")
    prompt_logits = decoder.prefill(prompt)
    logits = prompt_logits[-1]
    tokens, chosen = [], []
    for i in range(new_tokens):
        token = int(np.argmax(logits))
        tokens.append(token)
        chosen.append(logits)
        if i + 1 < new_tokens:
            logits = decoder.step(token)
    step_logits = np.stack(chosen) if chosen else np.zeros((0, prompt_logits.shape[-1]), np.float32)
    return Generation(prompt_logits, tuple(tokens), step_logits)


def check_positions(ids: list[int], start: int, max_positions: int | None, max_call: int | None = None) -> None:
    """Refuse, before the runtime sees it, a call that would run past the positions the artifact
    holds: a static cache written out of bounds corrupts memory instead of failing cleanly."""
    if not ids:
        raise ValueError("no tokens to run")
    if max_call is not None and len(ids) > max_call:
        raise ValueError(f"{len(ids)} tokens in one call exceed the artifact's limit of {max_call} per call")
    if max_positions is not None and start + len(ids) > max_positions:
        raise ValueError(f"{len(ids)} tokens at position {start} exceed the artifact's {max_positions} positions")


class OnnxDecoder:
    """A decoder graph with a KV cache in a plain InferenceSession: ``input_ids``, ``attention_mask``,
    ``past_key_values.*`` (and ``position_ids`` in optimum's layout) -> ``logits``, ``present.*``.

    The model builder's graph (GroupQueryAttention) derives positions from the mask and takes a
    past of ``[batch, kv_heads, past, head_size]`` whose last dimension is symbolic; the head size
    then comes from config.json beside the graph. Where the bundle's genai_config.json says the
    graph writes its cache in place (``past_present_share_buffer``, the builder's graph), each
    layer's cache is one buffer bound as both past and present, as onnxruntime-genai runs it:
    GroupQueryAttention writes the new positions into it and copies nothing else. The buffer
    starts at ``cache_positions`` and doubles when a call needs more. Otherwise (optimum's graph)
    the cache grows by one call's tokens per call, the graph concatenating past and new.
    ``in_place=False`` takes that path on any graph, for comparing the two."""

    def __init__(self, model_path: Path, threads: int | None = None, in_place: bool | None = None,
                 cache_positions: int = 256):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self._past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self._present_names = [n.replace("past_key_values.", "present.") for n in self._past_names]
        missing = {"input_ids", "logits"} - set(inputs) - {o.name for o in self.session.get_outputs()}
        if missing or not self._past_names:
            raise ValueError(f"{model_path}: not a decoder graph with a KV cache (missing {sorted(missing) or 'past_key_values'})")
        self._needs_mask = "attention_mask" in inputs
        self._needs_positions = "position_ids" in inputs
        self._past_shapes = {}
        for name in self._past_names:
            shape = inputs[name].shape  # [batch, kv_heads, past, head_dim]
            head_size = shape[3] if isinstance(shape[3], int) else _head_size(Path(model_path).parent / "config.json")
            self._past_shapes[name] = (1, int(shape[1]), 0, int(head_size))
        self._dtype = np.float16 if "float16" in inputs[self._past_names[0]].type else np.float32
        self.max_positions = trained_positions(Path(model_path).parent / "config.json")
        self._cache: dict[str, np.ndarray] = {}
        self._length = 0
        if in_place is None:
            in_place = not self._needs_positions and writes_cache_in_place(Path(model_path).parent)
        self.in_place = in_place
        self._ort = ort
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self._logits_type = np.float16 if "float16" in logits.type else np.float32
        # only the in-place path allocates the logits itself; the other keeps working without config.json
        self._vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) or not in_place else \
            _vocab_size(Path(model_path).parent / "config.json")
        self._first_capacity = max(1, cache_positions)
        self._capacity = 0
        self._binding: Any = None  # onnxruntime.IOBinding over the cache buffers

    def _reserve(self, positions: int) -> None:
        """Cache buffers that hold ``positions``, the written ones kept, bound as past and present."""
        if positions <= self._capacity:
            return
        capacity = max(positions, 2 * self._capacity, self._first_capacity)
        if self.max_positions is not None:
            capacity = max(positions, min(capacity, self.max_positions))
        cache = {}
        for name, (batch, heads, _, size) in self._past_shapes.items():
            cache[name] = np.zeros((batch, heads, capacity, size), dtype=self._dtype)
            if name in self._cache:
                cache[name][:, :, :self._length] = self._cache[name][:, :, :self._length]
        binding = self.session.io_binding()
        for past, present in zip(self._past_names, self._present_names):
            # One OrtValue over the numpy buffer, which self._cache keeps alive, for both names.
            value = self._ort.OrtValue.ortvalue_from_numpy(cache[past])
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self._cache, self._capacity, self._binding = cache, capacity, binding

    def _run_in_place(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        self._reserve(self._length + n)
        binding = self._binding
        tokens = np.asarray([ids], dtype=np.int64)
        mask = np.ones((1, self._length + n), dtype=np.int64)
        logits = self._ort.OrtValue.ortvalue_from_shape_and_type([1, n, self._vocab], self._logits_type)
        binding.bind_cpu_input("input_ids", tokens)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_ortvalue_output("logits", logits)
        self.session.run_with_iobinding(binding)
        self._length += n
        return logits.numpy()[0].astype(np.float32, copy=False)

    def _run(self, ids: list[int]) -> np.ndarray:
        check_positions(ids, self._length, self.max_positions)
        if self.in_place:
            return self._run_in_place(ids)
        n = len(ids)
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64)}
        if self._needs_mask:
            feeds["attention_mask"] = np.ones((1, self._length + n), dtype=np.int64)
        if self._needs_positions:
            feeds["position_ids"] = np.arange(self._length, self._length + n, dtype=np.int64)[None, :]
        feeds.update(self._cache)
        outputs = self.session.run(["logits", *self._present_names], feeds)
        self._cache = dict(zip(self._past_names, outputs[1:]))
        self._length += n
        return outputs[0][0].astype(np.float32, copy=False)

    def prefill(self, ids: list[int]) -> np.ndarray:
        self._cache = {} if self.in_place else {n: np.zeros(s, dtype=self._dtype) for n, s in self._past_shapes.items()}
        self._length, self._capacity = 0, 0
        return self._run(list(ids))

    def step(self, token: int) -> np.ndarray:
        return self._run([token])[-1]


def writes_cache_in_place(folder: Path) -> bool:
    """Whether the genai_config.json in ``folder`` runs the graph with one cache buffer per layer
    bound as past and present (``search.past_present_share_buffer``); False without one."""
    try:
        config = json.loads((Path(folder) / GENAI_CONFIG).read_text(encoding="utf-8"))
        return config["search"]["past_present_share_buffer"] is True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _vocab_size(config: Path) -> int:
    """vocab_size from config.json, for a graph whose logits' last dimension is symbolic."""
    return int(json.loads(config.read_text(encoding="utf-8"))["vocab_size"])


def program_data_file(pte_path: Path) -> Path | None:
    """The program data (.ptd) the export writes beside a .pte whose weights are partly outside it
    (a tied embedding table, export/tied_embeddings.py); None when the .pte holds them all."""
    data = Path(pte_path).with_suffix(".ptd")
    return data if data.is_file() else None


def legacy_method_message(pte_path: Path) -> str:
    return (f"{pte_path}: its one-token method is named '{LEGACY_DECODE_METHOD}' (rankdown before 2026-12-04); "
            "ExecuTorch's TextLLMRunner sends every generated token to a method of that name without the "
            "prompt's KV cache, so an app would answer wrongly: export the bundle again")


class ExecuTorchDecoder:
    """A .pte with a static KV cache: ``forward(tokens[1, n], input_pos[1])`` -> logits[1, n, vocab],
    the signature ExecuTorch's own LLM runner calls."""

    def __init__(self, pte_path: Path):
        import torch
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (llama::custom_sdpa, update_cache)
        from executorch.kernels import quantized  # noqa: F401  (quantized_decomposed::embedding_byte, int4 bundles)
        from executorch.runtime import Runtime, Verification

        self._torch = torch
        runtime = Runtime.get()
        with native_stderr_without():  # the first load's threadpool logs its /sys probing
            program = runtime.load_program(Path(pte_path), verification=Verification.InternalConsistency,
                                           data_path=program_data_file(pte_path))
            if LEGACY_DECODE_METHOD in program.method_names:
                raise ValueError(legacy_method_message(pte_path))
            self.method = program.load_method("forward")
            # The one-token method (export/executorch.py), when the program has it: same cache, static shapes.
            self.decode = program.load_method(DECODE_METHOD) if DECODE_METHOD in program.method_names else None
        self.max_positions = _constant(program, "get_max_seq_len")
        self.program = program
        self._length = 0

    def _run(self, ids: list[int]) -> np.ndarray:
        # A prompt is one call of at most max_positions - 1 tokens (the export's dynamic length bound).
        check_positions(ids, self._length, self.max_positions,
                        None if self.max_positions is None else self.max_positions - 1)
        torch = self._torch
        n = len(ids)
        tokens = torch.tensor([ids], dtype=torch.long)
        method = self.decode if n == 1 and self.decode is not None else self.method
        logits = method.execute([tokens, torch.tensor([self._length], dtype=torch.long)])[0]
        self._length += n
        return logits[0].float().numpy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        # The static cache is overwritten position by position, and attention reads only
        # positions before the current one, so restarting at 0 needs no explicit reset.
        self._length = 0
        return self._run(list(ids))

    def step(self, token: int) -> np.ndarray:
        return self._run([token])[-1]


class NativeExecuTorchDecoder:
    """The same .pte in ExecuTorch's C++ runtime, through ``rankdown-et-runner`` (devices/et_runner),
    for devices with no PyTorch. ``command`` launches the runner, e.g. ``[".../rankdown-et-runner"]``
    or, under emulation, ``["qemu-aarch64-static", "-L", ROOT, ".../rankdown-et-runner"]``."""

    def __init__(self, pte_path: Path, command: list[str], threads: int | None = None):
        import subprocess

        data = program_data_file(pte_path)
        argv = [*command, str(pte_path)] + ([str(threads)] if threads else []) + (["--data", str(data)] if data else [])
        self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self._proc.stdin and self._proc.stdout and self._proc.stderr  # all three are pipes
        self._stdin, self._stdout, self._stderr = self._proc.stdin, self._proc.stdout, self._proc.stderr
        header = self._stdout.readline()
        if not header:
            self._fail()
        info = json.loads(header)
        self.max_positions = info["max_seq_len"]
        self.runner_load_ms = info["load_ms"]
        self.one_token_method = info.get("one_token_method")  # the method it sends single tokens to, if any
        self._length = 0

    def _fail(self):
        self._proc.kill()
        err = self._stderr.read().decode(errors="replace").strip().splitlines()
        status = self._proc.wait()
        raise RuntimeError(err[-1] if err else f"rankdown-et-runner exited with status {status}")

    def _run(self, ids: list[int]) -> np.ndarray:
        check_positions(ids, self._length, self.max_positions,
                        None if self.max_positions is None else self.max_positions - 1)
        n = len(ids)
        request = (np.asarray([n], "<i4").tobytes() + np.asarray([self._length], "<i8").tobytes()
                   + np.asarray(ids, "<i8").tobytes())
        try:
            self._stdin.write(request)
            self._stdin.flush()
        except BrokenPipeError:
            self._fail()
        header = self._stdout.read(8)
        if len(header) != 8:
            self._fail()
        rows, cols = np.frombuffer(header, "<i4")
        data = self._stdout.read(4 * int(rows) * int(cols))
        if len(data) != 4 * int(rows) * int(cols):
            self._fail()
        self._length += n
        return np.frombuffer(data, "<f4").reshape(int(rows), int(cols))

    def prefill(self, ids: list[int]) -> np.ndarray:
        self._length = 0  # as ExecuTorchDecoder: the static cache needs no explicit reset
        return self._run(list(ids))

    def step(self, token: int) -> np.ndarray:
        return self._run([token])[-1]

    def close(self) -> float | None:
        """End the runner; its peak resident memory in MB, as it measured it."""
        if self._proc.poll() is not None:
            return None
        self._stdin.write(np.asarray([0], "<i4").tobytes())
        self._stdin.close()
        line = self._stdout.readline()
        self._proc.wait(timeout=30)
        return json.loads(line)["peak_rss_kb"] / 1024 if line else None


def open_onnx(artifact: Path, threads: int | None = None, native_runner: list[str] | None = None) -> OnnxDecoder:
    """The ONNX format's decoder opener (export/formats.py); ONNX has no native runner."""
    return OnnxDecoder(artifact, threads=threads)


def open_executorch(artifact: Path, threads: int | None = None, native_runner: list[str] | None = None) -> Decoder:
    """The ExecuTorch format's decoder opener: ``rankdown-et-runner`` when its argv is given,
    else ExecuTorch's Python runtime."""
    if native_runner:
        return NativeExecuTorchDecoder(artifact, native_runner, threads=threads)
    if threads:
        set_executorch_threads(threads)
    return ExecuTorchDecoder(artifact)


def set_executorch_threads(threads: int) -> None:
    """``threads`` for ExecuTorch's Python runtime in this process."""
    import torch
    from executorch.extension.pybindings import portable_lib

    # ExecuTorch's kernels and delegates run on its own threadpool, which torch's setting does
    # not reach (it stayed at one thread per core); torch's bounds the BLAS calls in its LLM kernels.
    portable_lib._unsafe_reset_threadpool(threads)
    torch.set_num_threads(threads)


def trained_positions(config: Path) -> int | None:
    """max_position_embeddings from the config.json optimum writes beside the graph: the graph
    computes rotary angles for any position, but the model was never run past this one."""
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _head_size(config: Path) -> int:
    """head_dim from config.json (or hidden_size / num_attention_heads)."""
    settings = json.loads(config.read_text(encoding="utf-8"))
    return int(settings.get("head_dim") or settings["hidden_size"] // settings["num_attention_heads"])


def _constant(program, name: str) -> int | None:
    if name not in program.method_names:
        return None
    value = program.load_method(name).execute([])[0]
    return int(value)
