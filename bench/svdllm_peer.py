"""The SVD-LLM peer on the real model (`make bench-svdllm`): its own code, scored as every row of bench-real.

SVD-LLM (AIoT-MLSys-Lab/SVD-LLM, commit ``SVDLLM_COMMIT``) runs from its public source, extracted
by the Makefile into bench/.svdllm-src (git-ignored, never copied into the project), in its own
venv bench/.venv-svdllm with its own pins (transformers 4.35.2, bench/svdllm-constraints.txt).
Three stages, each its own process:

1. ``windows`` (project venv): rankdown's calibration windows for the task (the task's
   calibration split, CompressConfig's calib_tokens and seq_len, each window led by BOS), saved
   as safetensors, so both methods see the same tokens.
2. ``factor`` (SVD-LLM's venv): imports their SVDLLM.py and calls their functions unmodified:
   ``profle_svdllm`` (X^T X of every linear's input on those windows, Cholesky) then
   ``whitening`` (method ``svd-llm``: SVD of W S, truncation, u = U sqrt(S), v = sqrt(S) V^T S^-1)
   or ``whitening_local_update`` (``svd-llm-u``: the same truncation, then u refitted by least
   squares on the outputs, layer by layer through the already-compressed layers). Their factors
   are written as ``<module>.down.weight`` (their v) and ``<module>.up.weight`` (their u), with
   their compressed model's logits on one window (``check``: the same, rebuilt from saved factors).
3. ``score`` (project venv): the factors become a rankdown compressed checkpoint (FactorizedLinear
   pairs, save_checkpoint: safetensors and factorization.json) whose logits must match the peer's
   within 1e-3 of the largest, scored by ``bench.real.score``;
   the row goes to bench/results/svdllm.json, which bench/real.py's table merges.

Shimmed, at the boundary only (none of SVD-LLM's functions is edited):
- ``SVD_LlamaAttention`` and ``SVD_LlamaMLP``, rebound in SVDLLM's namespace: theirs build
  k/v with num_heads (no grouped-query attention; SmolLM2 has 9 query and 3 KV heads) and a
  rotary table with base 10000 (SmolLM2's is 100000), so they cannot hold SmolLM2. The
  stand-ins have the same Linear attribute names (``q_u_proj``, ``q_v_proj``, ...), which
  ``whitening`` fills by ``.weight.data =`` whatever shape it computed, and run as the
  installed transformers' own LlamaAttention / LlamaMLP with each projection computed as
  ``x_u_proj(x_v_proj(x))`` (``whitening_local_update`` runs each compressed layer).
- ``torch.Tensor.cuda`` is the identity (svd-llm-u only): ``local_update`` moves its truncated
  factors with ``.cuda()``; this torch is the CPU wheel.
- dev is "cpu"; the model name passed is "llama" (their functions choose the layer list and
  the module classes by a substring of the name; SmolLM2 is a Llama).
- ratio: their functions take the fraction of parameters KEPT (their main does
  ``args.ratio = 1 - args.ratio``); this script's ratio is the fraction removed, as rankdown's.
Their main script profiles with ``profle_svdllm_low_resource`` (the same X^T X on the dense
model, a layer at a time); ``profle_svdllm`` computes the same matrices in one pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SVDLLM_COMMIT = "1c1009a99bea54c22c27a4dd5d9fba7116dc456b"
SRC = Path("bench/.svdllm-src")
PEER_PYTHON = Path("bench/.venv-svdllm/bin/python")
MODEL = Path("bench/models/smollm2-135m-instruct")
WORK = Path("bench/models/work/svdllm")
RESULTS = Path("bench/results/svdllm.json")
VARIANTS = {"svd-llm": "whitening", "svd-llm-u": "whitening_local_update"}
PROJECTIONS = {"self_attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
PROFILE_BATCH = 8  # windows per forward pass while profiling


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- stage 1: project venv -------------------------------------------------------------------

def windows_stage(model: Path, task: str, out: Path) -> None:
    """rankdown's calibration windows for ``task``, exactly as `rankdown compress --task` cuts them."""
    import torch
    from safetensors.torch import save_file

    from rankdown.checkpoint import load_tokenizer
    from rankdown.compress.config import CompressConfig
    from rankdown.compress.training_data import data_windows
    from rankdown.tasks import Split

    cfg = CompressConfig(task=task)
    windows = data_windows(load_tokenizer(model), cfg, Split.CALIBRATION, cfg.seq_len, cfg.calib_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"windows": windows.to(torch.int64).contiguous()}, str(out),
              metadata={"task": task, "calib_tokens": str(cfg.calib_tokens), "seq_len": str(cfg.seq_len)})
    log(f"{windows.shape[0]} calibration windows of {windows.shape[1]} tokens for {task} -> {out}")


# ---- stage 2: SVD-LLM's venv (no rankdown import here: rankdown needs a newer transformers) ----

def _shims(svdllm):
    """Stand-ins for SVD_LlamaAttention / SVD_LlamaMLP: their Linear names, the stock forward."""
    import torch
    from torch import nn
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

    class FactorPair(nn.Module):
        """x_u_proj(x_v_proj(x)), the two Linears looked up on the stand-in at call time."""

        def __init__(self, owner: nn.Module, kind: str):
            super().__init__()
            object.__setattr__(self, "owner", owner)  # not registered: the stand-in owns the Linears
            self.kind = kind

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return getattr(self.owner, f"{self.kind}_u_proj")(getattr(self.owner, f"{self.kind}_v_proj")(x))

    def placeholders(module: nn.Module, kinds: tuple[str, ...]) -> None:
        for kind in kinds:  # whitening assigns .weight.data of the computed shape
            setattr(module, f"{kind}_u_proj", nn.Linear(1, 1, bias=False))
            setattr(module, f"{kind}_v_proj", nn.Linear(1, 1, bias=False))

    class StandInAttention(nn.Module):
        def __init__(self, config, ratio):
            super().__init__()
            placeholders(self, PROJECTIONS["self_attn"])
            self.stock = LlamaAttention(config)  # GQA and config.rope_theta
            for kind in PROJECTIONS["self_attn"]:
                setattr(self.stock, f"{kind}_proj", FactorPair(self, kind))

        def forward(self, *args, **kwargs):
            return self.stock(*args, **kwargs)

    class StandInMLP(nn.Module):
        def __init__(self, hidden_size, intermediate_size, hidden_act, ratio):
            super().__init__()
            placeholders(self, PROJECTIONS["mlp"])
            config = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                                                    hidden_act=hidden_act)
            self.stock = LlamaMLP(config)
            for kind in PROJECTIONS["mlp"]:
                setattr(self.stock, f"{kind}_proj", FactorPair(self, kind))

        def forward(self, x):
            return self.stock(x)

    svdllm.SVD_LlamaAttention = StandInAttention
    svdllm.SVD_LlamaMLP = StandInMLP
    return StandInAttention, StandInMLP


def factor_stage(model_dir: Path, windows_file: Path, variant: str, ratio: float, out: Path) -> None:
    import resource

    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(SRC.resolve()))
    import SVDLLM  # their module, unmodified
    import transformers
    from transformers import LlamaForCausalLM

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    attention_cls, mlp_cls = _shims(SVDLLM)
    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    model.config.use_cache = False
    windows = load_file(str(windows_file))["windows"]
    keep = 1.0 - ratio  # their ratio is the fraction kept
    loader = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(PROFILE_BATCH)]
    log(f"SVD-LLM {SVDLLM_COMMIT[:7]} ({transformers.__version__}): profle_svdllm on {windows.shape[0]} windows")
    profiling_mat = SVDLLM.profle_svdllm("llama", model, loader, "cpu")
    if variant == "svd-llm":
        SVDLLM.whitening("llama", model, profiling_mat, keep, "cpu")
    else:
        # local_update moves its factors with .cuda(); this torch is the CPU wheel.
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
        model.seqlen = windows.shape[1]  # their get_model_from_huggingface sets it
        SVDLLM.whitening_local_update("llama", model, [(w[None],) for w in windows], profiling_mat, keep, "cpu")
    seconds = time.perf_counter() - start
    tensors, ranks = {}, {}
    for i, layer in enumerate(model.model.layers):
        for parent, kinds in PROJECTIONS.items():
            container = getattr(layer, parent)
            if not isinstance(container, (attention_cls, mlp_cls)):
                raise SystemExit(f"layer {i}.{parent} was not replaced by SVD-LLM's {VARIANTS[variant]}")
            for kind in kinds:
                name = f"model.layers.{i}.{parent}.{kind}_proj"
                up = getattr(container, f"{kind}_u_proj").weight.data
                down = getattr(container, f"{kind}_v_proj").weight.data
                tensors[f"{name}.down.weight"] = down.float().contiguous()
                tensors[f"{name}.up.weight"] = up.float().contiguous()
                ranks[name] = down.shape[0]
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "factors.safetensors"), metadata={"peer": f"SVD-LLM {SVDLLM_COMMIT}"})
    write_check(model, windows, out)
    info = {"variant": variant, "function": VARIANTS[variant], "ratio_removed": ratio, "keep_ratio_passed": keep,
            "seconds": round(seconds, 1), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "transformers": transformers.__version__, "torch": torch.__version__, "ranks": ranks}
    (out / "factors.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"{variant} {ratio}: factors of {len(ranks)} linears in {seconds:.0f} s -> {out}")


def write_check(model, windows, out: Path) -> None:
    """The peer's compressed model's own logits on one window, which the rankdown checkpoint must reproduce."""
    import torch
    from safetensors.torch import save_file

    with torch.no_grad():
        logits = model(windows[:1]).logits[0].float().contiguous()
    save_file({"window": windows[:1].contiguous(), "logits": logits}, str(out / "check.safetensors"))


def check_stage(model_dir: Path, windows_file: Path, factors: Path) -> None:
    """check.safetensors for factors saved before the factor stage wrote it: the peer's compressed
    model rebuilt in its venv from the saved factors (their tensors, float32 as their function made
    them) in the stand-ins, as ``whitening`` leaves it."""
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(SRC.resolve()))
    import SVDLLM  # their module, unmodified
    from transformers import LlamaForCausalLM

    attention_cls, mlp_cls = _shims(SVDLLM)
    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
    tensors = load_file(str(factors / "factors.safetensors"))
    config = model.config
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = attention_cls(config=config, ratio=None)
        layer.mlp = mlp_cls(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                            hidden_act=config.hidden_act, ratio=None)
        for parent, kinds in PROJECTIONS.items():
            for kind in kinds:
                name = f"model.layers.{i}.{parent}.{kind}_proj"
                getattr(getattr(layer, parent), f"{kind}_u_proj").weight.data = tensors[f"{name}.up.weight"]
                getattr(getattr(layer, parent), f"{kind}_v_proj").weight.data = tensors[f"{name}.down.weight"]
    write_check(model, load_file(str(windows_file))["windows"], factors)
    log(f"{factors}: check.safetensors from the saved factors")


# ---- stage 3: project venv -------------------------------------------------------------------

def checkpoint_stage(model_dir: Path, factors: Path, out: Path) -> dict:
    """The peer's factors as a rankdown compressed checkpoint; the counts a row needs."""
    import torch
    from safetensors.torch import load_file

    from rankdown.checkpoint import load_model, open_checkpoint, save_checkpoint
    from rankdown.factor import FactorizedLinear
    from rankdown.info import model_info

    model = load_model(open_checkpoint(model_dir))
    tensors = load_file(str(factors / "factors.safetensors"))
    for name in sorted({key.rsplit(".", 2)[0] for key in tensors}):
        dense = model.get_submodule(name)
        assert isinstance(dense, torch.nn.Linear), f"{name} is a dense linear of the dense model"
        pair = FactorizedLinear.from_factors(tensors[f"{name}.down.weight"], tensors[f"{name}.up.weight"])
        if (pair.out_features, pair.in_features) != (dense.out_features, dense.in_features):
            raise SystemExit(f"{name}: SVD-LLM's factors are {pair.out_features}x{pair.in_features}, "
                             f"the linear {dense.out_features}x{dense.in_features}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, pair)
    info = json.loads((factors / "factors.json").read_text())
    save_checkpoint(model, model_dir, out, torch.float32, overwrite=True,
                    extra_files={"peer.json": json.dumps({"peer": f"SVD-LLM {SVDLLM_COMMIT}"} | info, indent=2)})
    del model
    dense_params = model_info(open_checkpoint(model_dir)).decoder_linear_params
    params = model_info(open_checkpoint(out)).decoder_linear_params
    return {"params": params, "achieved_ratio": round(1 - params / dense_params, 4),
            "compress_seconds": info["seconds"], "peak_rss_mb": info["peak_rss_mb"],
            "parity_max_abs_logit_diff": parity(out, factors / "check.safetensors")}


def parity(checkpoint: Path, check: Path) -> float:
    """The rankdown checkpoint's logits against the peer's own compressed model's (its venv, its
    transformers, the stand-ins' forward) on one calibration window: the conversion changes nothing."""
    import torch
    from safetensors.torch import load_file

    from rankdown.checkpoint import load_model, open_checkpoint

    expected = load_file(str(check))
    with torch.no_grad():
        logits = load_model(open_checkpoint(checkpoint))(expected["window"]).logits[0]
    diff = float((logits - expected["logits"]).abs().max())
    scale = float(expected["logits"].abs().max())
    if not diff <= 1e-3 * scale:
        raise SystemExit(f"{checkpoint}: logits differ from the peer's own model by {diff:.3g} (largest logit {scale:.3g})")
    log(f"{checkpoint}: max |logit diff| against the peer's own model {diff:.2e} (largest logit {scale:.1f})")
    return diff


def setup_of(model: Path, examples: int, ppl_tokens: int) -> dict:
    """The same setup key as bench/results/real.json, so its table can merge these rows."""
    provenance = json.loads((model / "import.json").read_text()) if (model / "import.json").is_file() else {}
    return {"model": str(model), "source_sha256": provenance.get("sha256"), "examples": examples,
            "ppl_tokens": ppl_tokens}


def run(command: list[str], prefix: str) -> None:
    """bench-real's relay (a step in its own process, its output prefixed); imported here, not at the
    top, because this module's peer stages run in the peer's venv, where rankdown is not installed."""
    from bench.real import run as relay

    relay(command, prefix)


def ensure_check(model: Path, windows: Path, factors: Path, prefix: str) -> None:
    if not (factors / "check.safetensors").is_file():
        run([str(PEER_PYTHON), "-m", "bench.svdllm_peer", "check", "--model", str(model), "--windows", str(windows),
             "--out", str(factors)], prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", default="all", choices=("all", "windows", "factor", "check"))
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--task", default="compare")
    parser.add_argument("--ratios", default="0.2,0.4", help="fractions of decoder-linear parameters removed")
    parser.add_argument("--variants", default="svd-llm,svd-llm-u")
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--ppl-tokens", type=int, default=8192)
    parser.add_argument("--windows", type=Path, help="(factor stage) the windows file")
    parser.add_argument("--variant", choices=tuple(VARIANTS), help="(factor stage)")
    parser.add_argument("--ratio", type=float, help="(factor stage) fraction removed")
    parser.add_argument("--out", type=Path, help="(windows, factor, check stages) output file or folder")
    args = parser.parse_args()
    if args.stage == "windows":
        return windows_stage(args.model, args.task, args.out)
    if args.stage == "factor":
        return factor_stage(args.model, args.windows, args.variant, args.ratio, args.out)
    if args.stage == "check":
        return check_stage(args.model, args.windows, args.out)

    from bench.real import ensure_model, score
    from rankdown.atomic import write_text_atomic

    if not (SRC / "SVDLLM.py").is_file() or not PEER_PYTHON.is_file():
        raise SystemExit(f"no {SRC}/SVDLLM.py or {PEER_PYTHON}: run `make bench-svdllm`, which makes both")
    ensure_model(args.model)
    setup = setup_of(args.model, args.examples, args.ppl_tokens)
    results: dict = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"setup": setup, "rows": []}
    if results["setup"] != setup:
        raise SystemExit(f"{RESULTS} was made with {results['setup']}; move it away to start over")
    done = {(r["task"], r["method"], r["ratio"]) for r in results["rows"]}
    windows = WORK / f"windows-{args.task}.safetensors"
    if not windows.is_file():
        run([sys.executable, "-m", "bench.svdllm_peer", "windows", "--model", str(args.model), "--task", args.task,
             "--out", str(windows)], "windows")
    for row in results["rows"]:  # rows scored before the parity check existed get it, on their checkpoint
        name = f"{row['task']}-{row['method']}-{row['ratio']}"
        if "parity_max_abs_logit_diff" not in row and (WORK / name / "peer.json").is_file():
            ensure_check(args.model, windows, WORK / f"factors-{name}", name)
            row["parity_max_abs_logit_diff"] = parity(WORK / name, WORK / f"factors-{name}" / "check.safetensors")
            write_text_atomic(RESULTS, json.dumps(results, indent=2) + "\n")
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for variant in args.variants.split(","):
            if (args.task, variant, ratio) in done:
                continue
            name = f"{args.task}-{variant}-{ratio}"
            factors, checkpoint = WORK / f"factors-{name}", WORK / name
            if not (factors / "factors.json").is_file():  # written last: a finished factor run is reused
                run([str(PEER_PYTHON), "-m", "bench.svdllm_peer", "factor", "--model", str(args.model), "--windows",
                     str(windows), "--variant", variant, "--ratio", str(ratio), "--out", str(factors)], name)
            ensure_check(args.model, windows, factors, name)
            row = {"task": args.task, "method": variant, "allocate": "uniform", "ratio": ratio,
                   "peer": f"SVD-LLM {SVDLLM_COMMIT[:7]}"}
            row |= checkpoint_stage(args.model, factors, checkpoint)
            row["load_average"] = round(os.getloadavg()[0], 1)
            row |= score(checkpoint, args.task, args.examples, args.ppl_tokens)
            results["rows"].append(row)
            write_text_atomic(RESULTS, json.dumps(results, indent=2) + "\n")
            log(json.dumps(row))


if __name__ == "__main__":
    main()
