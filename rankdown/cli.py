"""The ``rankdown`` command: parse arguments into a config, call one function, print."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path

from rankdown.errors import RankdownError
from rankdown.library_logs import quiet_library_logs
from rankdown.shipped import SHIPPED_MODEL


def _model_arg(parser: argparse.ArgumentParser) -> None:
    # Kept as text: resolve_model turns a .gguf file or a cached hub id into a folder inside main's error handling.
    parser.add_argument("model", nargs="?", default=SHIPPED_MODEL,
                        help="model folder, rankdown checkpoint, .gguf file (imported once, cached) or a hub id "
                             "org/name in the local Hugging Face cache (default: the shipped model)")


def _task_data(args: argparse.Namespace, split_name: str):
    from rankdown.datafiles import load_data
    from rankdown.tasks import TASKS, Split, load_task

    given = getattr(args, split_name)
    if given is not None and args.task is not None:
        raise RankdownError(f"give --task or --{split_name}, not both")
    if given is not None:
        return load_data(given)
    if args.task is None:
        raise RankdownError(f"give --task ({', '.join(TASKS)}) or --{split_name} FILE")
    split = Split.EVALUATION if split_name == "eval" else Split.CALIBRATION
    return load_task(args.task, split)


def cmd_import(args: argparse.Namespace) -> None:
    from rankdown.gguf_check import is_gguf
    from rankdown.gguf_import import import_gguf

    source = Path(args.source)
    if source.is_dir():
        raise RankdownError(f"{source}: a folder; a Hugging Face model folder is used as it is, without import")
    if not source.is_file():
        raise RankdownError(f"{source}: no such file")
    if not is_gguf(source):
        raise RankdownError(f"{source}: not a GGUF file (it does not start with the GGUF magic)")
    record = import_gguf(source, args.out, overwrite=args.overwrite,
                         progress=lambda message: print(message, file=sys.stderr))
    print(f"{args.out}: imported {source} (sha256 {record.sha256[:16]}...) in {record.seconds:.1f} s")


def cmd_info(args: argparse.Namespace) -> None:
    from rankdown.checkpoint import open_checkpoint
    from rankdown.compress.report_line import made_by
    from rankdown.info import format_info, model_info

    ckpt = open_checkpoint(args.model)
    info, recipe = model_info(ckpt), made_by(ckpt.folder)
    if args.json:
        payload = dataclasses.asdict(info) | {"compression_ratio": info.compression_ratio, "made_by": recipe}
        print(json.dumps(payload, indent=2))
    else:
        print(format_info(info, recipe))


def cmd_eval(args: argparse.Namespace) -> None:
    from rankdown.atomic import check_file_output, write_text_atomic
    from rankdown.compute_device import resolve_device
    from rankdown.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(max_examples=args.max_examples, threads=args.threads, device=args.device)
    resolve_device(cfg.device)  # --device cuda without a GPU is refused before the model loads
    if args.json is not None:
        check_file_output(args.json)
    data = _task_data(args, "eval")
    # after the options and the data are checked: loading checkpoints imports transformers (4 s here)
    from rankdown.checkpoint import load_model, load_tokenizer, open_checkpoint

    ckpt = open_checkpoint(args.model)
    model = load_model(ckpt)
    tokenizer = load_tokenizer(ckpt.folder)
    result = evaluate(model, tokenizer, data, cfg)
    em = "n/a" if result.exact_match is None else f"{result.exact_match:.1%} of {result.examples}"
    ppl = "n/a" if result.perplexity is None else f"{result.perplexity:.3f} over {result.tokens} tokens"
    print(f"{data.name}: exact match {em}; perplexity {ppl} ({result.seconds:.1f} s)")
    if args.json:
        write_text_atomic(args.json, json.dumps(dataclasses.asdict(result), indent=2) + "\n")


def cmd_compress(args: argparse.Namespace) -> None:
    from rankdown.compress.config import INT4_RECIPE, BasisTuning, CompressConfig, compress_config
    from rankdown.schema import default_of

    if args.task is None and args.calib is None:
        args.task = default_of(CompressConfig, "task")
    given = {
        "method": args.method, "ratio": args.ratio, "task": args.task, "calib": args.calib, "allocate": args.allocate,
        "trials": args.trials, "basis_mode": args.basis_mode,
        "tuning": None if args.tune_steps is None else BasisTuning(steps=args.tune_steps),
        "seed": args.seed, "calib_tokens": args.calib_tokens, "calib_precision": args.calib_precision,
        "correct_carried": args.correct_carried, "dtype": args.dtype, "overwrite": args.overwrite, "workers": args.workers,
        "device": args.device, "rank_multiple": args.rank_multiple, "max_pair_share": args.max_pair_share,
        "head_rank": args.head_rank,
    }
    healing = {"steps": args.heal_steps, "lr": args.heal_lr, "quantize": args.heal_quantize,
               "group_size": args.heal_group_size, "precision": args.heal_precision}
    # The recipe's options are None when not given: --weights' recipe decides, else the config's default.
    fields = {k: v for k, v in given.items() if v is not None or k not in (*INT4_RECIPE, *GIVEN_ONLY)}
    if fields.get("head_rank") == HEAD_DENSE:
        fields["head_rank"] = None  # given, so it wins over the recipe's rank like any given value
    cfg = compress_config(args.weights, {k: v for k, v in healing.items() if v is not None}, **fields)
    _refuse_unused_compress_options(args, cfg)
    # after the options are checked: the pipeline imports transformers (4 s here)
    from rankdown.compress.distributed import leads_output
    from rankdown.compress.pipeline import compress

    report = compress(args.model, args.out, cfg)
    if not leads_output():
        return  # under torchrun: worker 0 prints
    print(f"{args.out}: {report.method} ({report.allocate}) removed {report.achieved_ratio:.2%} of decoder-linear "
          f"parameters ({report.params_before:,} -> {report.params_after:,}) in {report.wall_seconds:.1f} s")
    if report.healing is not None:
        h = report.healing
        print(f"healed {h.steps} steps in {h.seconds:.1f} s: held-back training loss {h.loss_before:.4f} -> "
              f"{h.loss_after:.4f}, KL to the dense model {h.kl_before:.4f} -> {h.kl_after:.4f}")
    if report.head is not None:
        t = report.head
        print(f"head at rank {t.rank}: {t.params_before:,} -> {t.params_after:,} parameters, held-back loss "
              f"{t.loss_before:.4f} -> {t.loss_after:.4f}")


# compress options whose value matters to one strategy only: None unless given, so that giving one
# where it does nothing is refused (_refuse_unused_compress_options) rather than ignored (healing's
# options are None unless given too: the healing dict drops them)
GIVEN_ONLY = ("trials", "tuning")


def _refuse_unused_compress_options(args: argparse.Namespace, cfg) -> None:
    from rankdown.compress.config import Strategy

    if args.trials is not None and cfg.strategy is not Strategy.BAYES:
        raise RankdownError(f"--trials applies to --allocate bayes only (these ranks are {cfg.strategy.value})")
    if args.tune_steps is not None and cfg.strategy is not Strategy.TUNED_BASIS:
        raise RankdownError("--tune-steps applies to --method basis --basis-mode tuned only")
    if cfg.healing.steps == 0:
        given = {"--heal-lr": args.heal_lr, "--heal-precision": args.heal_precision,
                 "--heal-group-size": args.heal_group_size,
                 "--heal-quantize": None if args.heal_quantize == "none" else args.heal_quantize}
        for flag, value in given.items():
            if value is not None:
                raise RankdownError(f"{flag} applies to healing, which --heal-steps 0 turns off")
    if args.heal_group_size is not None and not cfg.healing.quantize.four_bit:
        how = ("which --heal-quantize none turns off" if args.heal_quantize is not None
               else "given by --heal-quantize int4 or 8da4w, or --weights int4")
        raise RankdownError(f"--heal-group-size applies to healing through 4-bit weights, {how}")


QUANTIZE_AUTO = "auto"  # export --quantize: the checkpoint's own (ExportConfig.quantize None)


def cmd_export(args: argparse.Namespace) -> None:
    from rankdown.export.config import ExportConfig, Format

    quantize = None if args.quantize == QUANTIZE_AUTO else args.quantize
    # None: not given, so the config's default (and an option of a format not exported is refused below)
    per_format = {"backend": args.backend, "decode_method": args.decode_method, "onnx_graph": args.onnx_graph,
                  "max_seq_len": args.max_seq_len}
    cfg = ExportConfig(formats=args.format, quantize=quantize, group_size=args.group_size, head_bits=args.head_bits,
                       balance=not args.no_balance, int4_scales=args.int4_scales,
                       int4_rounding=args.int4_rounding, task=args.task, min_top1=args.min_top1,
                       check=not args.no_check,
                       overwrite=args.overwrite, **{k: v for k, v in per_format.items() if v is not None})
    for flag, value, name in (("--backend", args.backend, "executorch"), ("--decode-method", args.decode_method, "executorch"),
                              ("--max-seq-len", args.max_seq_len, "executorch"), ("--onnx-graph", args.onnx_graph, "onnx")):
        fmt = Format(name)
        if value is not None and fmt not in cfg.formats:
            raise RankdownError(f"{flag} applies to the {fmt.value} format, which --format {args.format} leaves out")
    # after the options are checked: the pipeline loads transformers, seconds a mistake need not wait
    from rankdown.export.pipeline import export, format_manifest

    manifest = export(args.model, args.out, cfg)
    print(f"{args.out}: bundle written")
    print(format_manifest(manifest))


def cmd_validate(args: argparse.Namespace) -> int:
    from rankdown.export.parity import top1_note
    from rankdown.validate.config import Checks, LatencyPlan, ValidateConfig
    from rankdown.validate.report import fastest_threads, float_floor_note, runtime_notes

    checks = Checks(max_rel_logit_diff=args.max_rel_logit_diff, min_top1_agreement=args.min_top1,
                    greedy_tokens=args.greedy_tokens, max_exact_match_drop=args.max_em_drop,
                    max_perplexity_increase=args.max_ppl_increase)
    cfg = ValidateConfig(runtimes=args.runtime, reference=args.reference, task=args.task, eval_file=args.eval,
                         max_examples=args.max_examples, threads=args.threads, checks=checks,
                         latency=None if args.no_latency else LatencyPlan(repeats=args.repeats),
                         report_dir=args.report, compare=args.compare,
                         sweep_threads=_thread_counts(args.sweep_threads) if args.sweep_threads else ())
    runner = None
    if args.device:
        from rankdown.devices.profile import find_profile
        from rankdown.devices.runners import runner_for

        profile = find_profile(args.device)
        runner = runner_for(profile)
        if cfg.runtimes is None:
            cfg = dataclasses.replace(cfg, runtimes=profile.runtimes)
        if cfg.threads is None:
            cfg = dataclasses.replace(cfg, threads=profile.threads)
        print(f"device: {profile.name} ({profile.description}) via {profile.transport.kind.value}")
    # after the options are checked: the harness loads both runtimes' Python stacks (5 s here)
    from rankdown.validate.harness import validate

    report = validate(args.bundle, cfg, runner=runner)
    for name, r in report.runtimes.items():
        q, p, lat = r.quality, r.parity, r.latency
        em = "n/a" if q.exact_match is None else f"{q.exact_match:.1%} (PyTorch {q.reference_exact_match:.1%}" + \
            ("" if q.quantized_reference_exact_match is None
             else f", with its quantized weights {q.quantized_reference_exact_match:.1%}") + ")"
        ppl = "n/a" if q.perplexity is None else f"{q.perplexity:.3f} (PyTorch {q.reference_perplexity:.3f})"
        line = (f"{name:<12} greedy {'identical' if p.greedy_match else 'DIFFERS'} over {p.greedy_tokens}, "
                f"max |dlogit| {p.max_abs_logit_diff:.1e}{'' if r.passed else ' at ' + p.max_diff_at}, "
                f"top-1 {p.top1_agreement:.1%}{top1_note(p.top1_tie)}"
                f"{'' if p.strict_top1_agreement is None else f' ({p.strict_top1_agreement:.1%} the same token)'}"
                f"{'' if p.reference == 'float' else ' against its quantized PyTorch model'}; exact match {em}; "
                f"perplexity {ppl}")
        if p.reference != "float" and p.float_top1_agreement is not None:
            line += f"\n{'':<12} top-1 against the {float_floor_note(p)}"
        if r.executed_on:
            line += f"\n{'':<12} ran on {r.executed_on}"
        for note in runtime_notes(name, r):
            line += f"\n{'':<12} {note.removeprefix(name + ': ')}"
        if lat is not None:
            ttft = ", ".join(f"{k} tok {v.median:.1f} ms" for k, v in lat.ttft_ms.items())
            line += (f"\n{'':<12} TTFT {ttft}; decode {lat.decode_tokens_per_s.median:.1f} tok/s; load "
                     f"{lat.load_s:.2f} s; peak RSS {lat.peak_rss_mb:.0f} MB; {lat.size_bytes / 2**20:.2f} MiB")
        print(line)
    for name, c in report.comparisons.items():
        ratio = ", ".join(f"{k} {v:.2f}x" for k, v in c.ratios.items())
        quality = "" if c.exact_match_difference is None else f"; exact match {c.exact_match_difference:+.1%}"
        if c.perplexity_ratio is not None:
            quality += f"; perplexity {c.perplexity_ratio:.2f}x"
        print(f"{name:<12} vs {c.other} (this / other, timed interleaved): {ratio}{quality}")
    for name, r in report.runtimes.items():
        if r.thread_sweep:
            rates = ", ".join(f"{lat.threads}: {lat.decode_tokens_per_s.median:.1f}" for lat in r.thread_sweep)
            print(f"{name:<12} decode tok/s by threads (timed interleaved) {rates}; fastest at "
                  f"{fastest_threads(r.thread_sweep)}")
    if args.report:
        print(f"report: {args.report / 'report.json'}")
    if not report.passed:
        print(f"rankdown validate: FAILED: {', '.join(report.failures)}", file=sys.stderr)
        return 1
    print("passed")
    return 0


def _thread_counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise RankdownError(f"--sweep-threads must be comma-separated thread counts such as 1,2, got {text!r}") from None


def cmd_fit(args: argparse.Namespace) -> int:
    from rankdown.devices.fit_config import FitConfig
    from rankdown.devices.profile import find_profile

    profile = find_profile(args.device)
    try:
        ratios = tuple(float(r) for r in args.ratios.split(","))
    except ValueError:
        raise RankdownError(f"--ratios must be comma-separated numbers, got {args.ratios!r}") from None
    cfg = FitConfig(task=args.task, method=args.method, ratios=ratios,
                    quantize=tuple(q for q, left_out in (("none", False), ("int8", args.no_int8), ("int4", args.no_int4))
                                   if not left_out), max_memory_mb=args.max_memory,
                    min_score=args.min_score, max_examples=args.max_examples, heal_steps=args.heal_steps,
                    overwrite=args.overwrite)
    # after the options are checked: fit imports every stage's pipeline (4 s here)
    from rankdown.devices.fit import fit

    report = fit(args.model, args.out, profile, cfg)
    print(f"{'ratio':>5}  {'weights':<5} {'params':>10}  {'needs MB':>8}  {'exact match':>11}  fits")
    for c in report.candidates:
        mark = " <- chosen" if c == report.chosen else ""
        print(f"{c.ratio:>5}  {c.quantize:<5} {c.params:>10,}  {c.memory_mb:>8.1f}  {c.score:>11.1%}  "
              f"{'yes' if c.fits else 'no'}{mark}")
    print(f"{args.out}: ratio {report.chosen.ratio} {report.chosen.quantize} for {report.device} "
          f"(budget {report.budget_mb:.0f} MB); validated on the device: "
          f"{'passed' if report.validation_passed else 'FAILED'}")
    return 0 if report.validation_passed else 1


def cmd_devices(args: argparse.Namespace) -> None:
    from rankdown.devices.profile import shipped_profiles

    for profile in shipped_profiles().values():
        t = profile.transport
        where = t.kind.value if t.host is None else f"{t.kind.value} {t.user + '@' if t.user else ''}{t.host}:{t.port}"
        print(f"{profile.name:<18} {profile.arch:<8} {','.join(profile.runtimes):<24} threads {profile.threads:<3} "
              f"memory {profile.memory_mb} MB  {where}  ({profile.description})")


def _group_size(text: str) -> int:
    from rankdown.int4_numerics import parse_group

    try:
        return parse_group(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of columns or `channel`, got {text!r}") from None


HEAD_DENSE = "dense"  # compress --head-rank dense: keep the head dense, also under --weights int4


def _head_rank(text: str) -> int | str:
    if text == HEAD_DENSE:
        return HEAD_DENSE
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a rank or `{HEAD_DENSE}`, got {text!r}") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rankdown")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    from rankdown.compress.config import BasisTuning, CompressConfig, Healing
    from rankdown.tasks import EXACT_MATCH_TASKS, TASKS

    parser = argparse.ArgumentParser(prog="rankdown", description="Shrink a Llama for one task by low-rank factorization.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("import", help="a .gguf file as a safetensors checkpoint folder (dequantized once)")
    imp.add_argument("source", help=".gguf file (llama.cpp's format; Llama architecture)")
    imp.add_argument("-o", "--out", type=Path, required=True, help="output checkpoint folder")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    imp.set_defaults(func=cmd_import)

    info = sub.add_parser("info", help="parameters, per-module shapes and ranks, size")
    _model_arg(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=cmd_info)

    from rankdown.compute_device import Device
    from rankdown.evaluate import EvalConfig
    from rankdown.schema import choices, default_of, help_with_default

    ev = sub.add_parser("eval", help="exact match and perplexity in PyTorch")
    _model_arg(ev)
    ev.add_argument("--task", choices=TASKS, help="a built-in task's evaluation split (give --task or --eval)")
    ev.add_argument("--eval", type=Path, help=".txt, .jsonl or a folder of them")
    ev.add_argument("--json", type=Path, help="write the result as JSON here")
    ev.add_argument("--max-examples", type=int, default=default_of(EvalConfig, "max_examples"),
                    help="question/answer pairs scored by exact match (default: %(default)s)")
    ev.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, one per core)")
    ev.add_argument("--device", choices=choices(Device), default=default_of(EvalConfig, "device").value,
                    help=help_with_default("where the model runs (auto: cuda when torch sees a GPU)", EvalConfig, "device"))
    ev.set_defaults(func=cmd_eval)

    # compress: choices, defaults and their help come from the config's enums and dataclasses.
    from rankdown.compress.config import INT4_HEALING, INT4_RECIPE, Allocation, BasisMode, BundleWeights, Method
    from rankdown.int4_numerics import group_option

    def option(flag: str, text: str, cls: type = CompressConfig, field: str | None = None, **kwargs) -> None:
        field = field or flag.removeprefix("--").replace("-", "_")
        recipe = INT4_HEALING if cls is Healing else INT4_RECIPE
        if field in recipe:  # not given: None, and --weights picks the recipe's value or the default
            def shown(value):
                if field == "head_rank" and value is None:
                    return HEAD_DENSE
                return group_option(value) if field == "group_size" else getattr(value, "value", value)
            default, int4 = shown(default_of(cls, field)), shown(recipe[field])
            text = f"{text} (default: {default}{'' if int4 == default else f'; with --weights int4: {int4}'})"
            comp.add_argument(flag, default=None, help=text, **kwargs)
        else:
            comp.add_argument(flag, default=default_of(cls, field), help=help_with_default(text, cls, field), **kwargs)

    comp = sub.add_parser("compress", help="replace decoder linears by factor pairs chosen with task data")
    _model_arg(comp)
    comp.add_argument("-o", "--out", type=Path, required=True, help="output checkpoint folder")
    comp.add_argument("--task", metavar="{" + ",".join(TASKS) + "}[+...]",
                      help=help_with_default("built-in calibration and healing data; several joined by + (compare+code) "
                                             "share the windows equally", CompressConfig, "task"))
    comp.add_argument("--calib", type=Path, help="calibration .txt, .jsonl or folder instead of a task")
    comp.add_argument("--weights", choices=[w.value for w in BundleWeights], default=BundleWeights.FLOAT.value,
                      help="the weights the bundle will be exported with: int4 compresses with the recipe measured "
                           "best for 4-bit bundles (the options below that name it), and `export` then writes int4 "
                           "by itself; an option given on the command line wins over the recipe (default: float)")
    option("--calib-tokens", "calibration tokens read", type=int)
    from rankdown.compress.config import Precision

    option("--calib-precision", "arithmetic of the calibration forward passes (statistics are summed in float64); "
           "auto is bf16 on a CPU with AVX512-BF16 or AMX (attention kept fp32 there) or a GPU with bf16, else fp32",
           choices=choices(Precision))
    comp.add_argument("--ratio", type=float, required=True, help="fraction of decoder-linear parameters removed, 0 < R < 1")
    option("--method", "factorization method", choices=choices(Method))
    option("--correct-carried", "fit each layer to the dense model's outputs from the compressed layers' inputs "
           "(the error carried from earlier layers corrected; data-aware methods)", action=argparse.BooleanOptionalAction)
    comp.add_argument("--allocate", choices=choices(Allocation),
                      help="how ranks are spread over the layers (default: error; tuned basis prunes instead)")
    option("--trials", "Bayesian-optimization trials", type=int)
    option("--basis-mode", "basis method only: closed-form (no training) or tuned (trained coefficients, pruned to "
           "the budget)", choices=choices(BasisMode))
    option("--tune-steps", "training steps of --basis-mode tuned", BasisTuning, "steps", type=int)
    option("--heal-steps", "healing after factorization: distillation steps on the task's training split (or "
           f"the --calib file), {default_of(Healing, 'batch')} windows of {default_of(Healing, 'seq_len')} tokens "
           "each, every factor pair trained; 0 turns it off", Healing, "steps", type=int)
    option("--heal-lr", "healing: AdamW learning rate, decayed linearly to 0 over the steps", Healing, "lr",
           type=float)
    from rankdown.compress.config import HealQuantize

    option("--heal-quantize", "healing: int4 trains through the 4-bit weights `export --quantize int4` gives "
           "ExecuTorch (quantization-aware), 8da4w through those and the int8 per-token inputs its kernels "
           "quantize at run time; export then keeps the trained scales (no balancing)", Healing, "quantize",
           choices=choices(HealQuantize))
    option("--heal-group-size", "healing for int4: input columns per scale, or `channel` for one scale per "
           "output channel, ExecuTorch's fastest 4-bit kernels (the export's --group-size)", Healing, "group_size",
           type=_group_size)
    option("--heal-precision", "healing: arithmetic of the training passes (weights and optimizer stay float32); "
           "auto is bf16 on a CPU with AVX512-BF16 or AMX, else fp32", Healing, "precision",
           choices=choices(Precision))
    option("--rank-multiple", "error ranks: every factored rank a multiple of this; 32 (the int4 group) for a "
           "model exported with --quantize int4, whose ranks are otherwise padded with zeros to the group", type=int)
    option("--max-pair-share", "leave dense every linear whose factor pair would hold more than this share of "
           "its parameters (near break-even a pair saves few bytes but runs two matmuls); 1 leaves dense only "
           "past break-even", type=float)
    option("--head-rank", "also factor the output head to this rank, fitted to the task's final hidden states and "
           "token counts; a tied table becomes one V x r table for the lookup and the head (exported in fp32 or "
           "int4; int8 does not take it yet), or `dense` to keep it dense",
           type=_head_rank, metavar=f"{{RANK,{HEAD_DENSE}}}")
    option("--seed", "random seed", type=int)
    option("--workers", "processes sharing the calibration windows, started here (under torchrun: leave at 1); "
           "uniform and error ranks", type=int)
    option("--device", "where statistics and decompositions run (auto: cuda when torch sees a GPU)",
           choices=choices(Device))
    comp.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="stored dtype (default: the source's)")
    comp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    # given or not (GIVEN_ONLY): refused where the strategy does not use them; their help shows the default
    comp.set_defaults(func=cmd_compress, trials=None, tune_steps=None, heal_lr=None, heal_precision=None)

    from rankdown.export.config import DEFAULT_GROUP, Backend, ExportConfig, Format, Int4Rounding, Int4Scales, OnnxGraph, Quantize
    from rankdown.export.formats import default_runtime_names, format_names, runtime_names
    from rankdown.validate.config import Runtime

    exp = sub.add_parser("export", help=f"{' and '.join(format_names())} with KV cache, factor pairs kept, self-checked")
    _model_arg(exp)
    exp.add_argument("-o", "--out", type=Path, required=True, help="output bundle folder")
    exp.add_argument("--format", default=",".join(f.value for f in default_of(ExportConfig, "formats")),
                     help=f"comma-separated: {', '.join(choices(Format))} (default: %(default)s)")
    exp.add_argument("--quantize", default=QUANTIZE_AUTO, choices=[QUANTIZE_AUTO, *choices(Quantize)],
                     help=f"{QUANTIZE_AUTO}, {' or '.join(choices(Quantize))} (int8: weights per channel; int4: "
                          "4-bit weights per group, head per --head-bits, embedding 8-bit (ExecuTorch) or 4-bit "
                          "(ONNX MatMulNBits); both with activations quantized per call; auto: int4 for a "
                          "checkpoint healed through the 4-bit weights (compress --weights int4), else none) "
                          f"(default: {QUANTIZE_AUTO})")
    exp.add_argument("--group-size", type=_group_size, default=default_of(ExportConfig, "group_size"),
                     help=f"int4: input columns sharing one scale, or `channel` for one scale per output channel "
                          f"(ExecuTorch's fastest 4-bit kernels; ONNX MatMulNBits then takes blocks of "
                          f"{DEFAULT_GROUP}) (default: the group a checkpoint healed through the 4-bit weights was "
                          f"trained in, else {DEFAULT_GROUP})")
    exp.add_argument("--head-bits", type=int, default=default_of(ExportConfig, "head_bits"),
                     help="int4: bits of the head (4 or 8; a tied lookup shares them in ONNX) (default: 4 where "
                          "--int4-rounding is gptq, which then rounds the head too, else 8)")
    exp.add_argument("--no-balance", action="store_true",
                     help="int4: quantize the factors as compressed, without first equalizing each rank "
                          "direction's down-row and up-column norms, nor a factored head's table columns "
                          "(for measuring what balancing gives)")
    exp.add_argument("--int4-scales", default=None,
                     help=f"int4 scales: {' or '.join(choices(Int4Scales))} (hqq: torchao's half-quadratic scale "
                          "search for ExecuTorch, onnxruntime's asymmetric blocks for ONNX; absmax: max |w| / 7.5, "
                          "symmetric, in both formats, the numerics healing trains through). Default: absmax for a "
                          "checkpoint healed through int4 weights (compress --heal-quantize), else hqq")
    exp.add_argument("--int4-rounding", default=None, choices=choices(Int4Rounding),
                     help="int4: how each weight's code is picked at its block's scale, in both formats (gptq: "
                          "GPTQ on up to 32768 tokens of --task's calibration text, about 90 s a format for "
                          "SmolLM2-135M on 2 cores; nearest: round each weight alone). Default: "
                          "nearest for a checkpoint healed through int4 weights, else gptq")
    exp.add_argument("--task", default=None,
                     help="int4: the task the bundle is for (one of the built-in tasks, or several joined by +): "
                          "the text GPTQ rounding is calibrated on and the float floor is judged on. Default: the "
                          "task the checkpoint was compressed for; math, code and prose for a dense model")
    exp.add_argument("--backend", default=None,
                     help=help_with_default(f"ExecuTorch delegate: {', '.join(choices(Backend))}", ExportConfig,
                                            "backend"))
    exp.add_argument("--onnx-graph", default=None,
                     help=help_with_default(f"{' or '.join(choices(OnnxGraph))} (fused: onnxruntime-genai's model builder, "
                                            "GroupQueryAttention + SkipSimplifiedLayerNorm; optimum: one op per PyTorch op, "
                                            "the graph optimum's ORTModelForCausalLM loads)", ExportConfig, "onnx_graph"))
    exp.add_argument("--max-seq-len", type=int, default=None,
                     help=help_with_default("positions the ExecuTorch KV cache holds", ExportConfig, "max_seq_len"))
    exp.add_argument("--decode-method", action=argparse.BooleanOptionalAction,
                     default=None,
                     help="ExecuTorch: a one-token `decode_step` method beside forward, sharing its stored weights "
                          "and KV cache, which rankdown's runners call for each new token (int4: decode 1.08-1.13x "
                          "on SmolLM2, about 45 MB more RSS; fp32: no gain measured, and a second copy of XNNPACK's "
                          "packed weights, +620 MB on dense SmolLM2; rankdown-et-runner shares one copy through "
                          "XNNPACK's weight cache; twice the export time). ExecuTorch's "
                          "TextLLMRunner runs forward only either way (default: on for --quantize int8/int4, off "
                          "in fp32)")
    exp.add_argument("--min-top1", type=float, default=None,
                     help="int8/int4: the share of the self-check's prompt positions where the artifact must pick "
                          "the float model's top token (default: 0.8 int8, 0.6 int4); lower it to accept what "
                          "the rounding costs a model not healed through it (the runtime is still held to its "
                          "quantized PyTorch model; `validate` takes the floor the bundle was exported with)")
    exp.add_argument("--no-check", action="store_true", help="skip the parity self-check against PyTorch")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    exp.set_defaults(func=cmd_export)

    val = sub.add_parser("validate", help=f"run a bundle in {' / '.join(runtime_names())}: parity, quality, latency")
    val.add_argument("bundle", type=Path, help="a folder `rankdown export` wrote (it holds manifest.json)")
    val.add_argument("--reference", type=Path, help="PyTorch reference checkpoint (default: the bundle's source)")
    val.add_argument("--runtime", help=f"comma-separated: {', '.join(choices(Runtime))} (default: each format's own "
                     f"runtime, {', '.join(default_runtime_names())}, for the formats in the bundle)")
    val.add_argument("--task", choices=TASKS, help="quality measured on this task's evaluation split (default: the "
                     "task the bundle was compressed for, else math)")
    val.add_argument("--eval", type=Path, help=".txt, .jsonl or a folder of them")
    val.add_argument("--threads", type=int, help="threads of each runtime (default: the device profile's, else the "
                     "runtime's own)")
    val.add_argument("--report", type=Path, help="write report.json, report.md and latency.png into this folder "
                     "(created; an earlier report's files there are replaced)")
    val.add_argument("--max-examples", type=int, default=200, help="question/answer pairs scored (default: %(default)s)")
    val.add_argument("--max-rel-logit-diff", type=float,
                     help="default: 1e-3 (fp32), 0.25 (int8), 0.5 (int4); 0.25 for an ExecuTorch int4 artifact, "
                          "which is held against its quantized PyTorch model")
    val.add_argument("--min-top1", type=float,
                     help="default: 1.0 (fp32), 0.8 (int8), 0.6 (int4); 0.85 against an int4 artifact's "
                          "quantized PyTorch model, where a token it scores within 0.05 x the logit scale of its "
                          "best counts as a near-tie, with 0.6 (or this, if lower) against the float one; a "
                          "bundle exported with --min-top1 is held to that floor")
    val.add_argument("--greedy-tokens", type=int, default=64,
                     help="greedy tokens that must match PyTorch's (fp32 bundles) (default: %(default)s)")
    val.add_argument("--max-em-drop", type=float, default=None,
                     help="allowed exact-match drop vs PyTorch (default 0.02; int4 bundles 0.10)")
    val.add_argument("--max-ppl-increase", type=float, default=None,
                     help="allowed relative perplexity increase vs PyTorch (default 0.02; int4 bundles 0.10)")
    val.add_argument("--repeats", type=int, default=5,
                     help="timed runs per latency measure, after 1 warm-up (default: %(default)s)")
    val.add_argument("--no-latency", action="store_true", help="check parity and quality only, time nothing")
    val.add_argument("--compare", type=Path, metavar="OTHER",
                     help="another bundle (e.g. the dense export): both timed interleaved with one protocol, the "
                          "ratios and the quality difference reported")
    val.add_argument("--sweep-threads", metavar="N,M,...",
                     help="also time the bundle at each of these thread counts, interleaved, and name the fastest "
                          "(a device's count, not the bundle's: on a 2-vCPU Emerald Rapids the int4 .pte decoded "
                          "1.16-1.35x faster on one thread than on two, the .onnx as fast or faster on two)")
    val.add_argument("--device", help="a device profile name (see `rankdown devices`) or a .toml file")
    val.set_defaults(func=cmd_validate)

    fitp = sub.add_parser("fit", help="the best task score that fits a device's memory: compress, export, validate there")
    _model_arg(fitp)
    fitp.add_argument("-o", "--out", type=Path, required=True, help="output folder: bundle/, checkpoint/, fit.json")
    fitp.add_argument("--device", required=True, help="a device profile name (see `rankdown devices`) or a .toml file")
    fitp.add_argument("--task", choices=EXACT_MATCH_TASKS, default="math",
                      help="scored by exact match (default: %(default)s)")
    fitp.add_argument("--max-memory", type=float, help="MB for the model (default: the profile's memory_mb)")
    fitp.add_argument("--min-score", type=float, help="lowest acceptable exact match, 0..1")
    fitp.add_argument("--method", default="feature", help="compression method (see compress) (default: %(default)s)")
    fitp.add_argument("--ratios", default="0,0.2,0.4,0.6",
                      help="ratios to try; 0 is the dense model (default: %(default)s)")
    fitp.add_argument("--no-int8", action="store_true", help="leave out the int8 candidates")
    fitp.add_argument("--no-int4", action="store_true",
                      help="leave out the int4 candidates (4-bit decoder linears, 8-bit head and table; they rank "
                           "after every fp32 and int8 candidate that fits, so one is chosen where none of those fits)")
    fitp.add_argument("--max-examples", type=int, default=200,
                      help="question/answer pairs each candidate is scored on (default: %(default)s)")
    fitp.add_argument("--heal-steps", type=int, default=default_of(Healing, "steps"),
                      help="healing steps of each compressed candidate, as compress's (default: %(default)s)")
    fitp.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    fitp.set_defaults(func=cmd_fit)

    dev = sub.add_parser("devices", help="list the shipped device profiles")
    dev.set_defaults(func=cmd_devices)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a job scheduler, a container stopping) raised where the program is, as Ctrl-C
    is: Python's default would end the process at once, leaving the temporary output and its lock."""


class _StopSignals:
    """Raises on SIGINT and SIGTERM, and remembers which arrived. An extension the signal lands in
    may turn the raised exception into one of its own (safetensors' reader gave a ValueError about
    an UntypedStorage): the run still stopped because the user asked, so it ends as a stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, signal._HANDLER] = {}

    def _raise(self, signum, frame) -> None:
        self.received = self.received or signum
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    def __enter__(self) -> _StopSignals:
        # Python lets only the main thread set handlers; main() called from another thread keeps the
        # defaults. A SIGINT that the caller ignores (nohup, a background job) stays ignored.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                current = signal.getsignal(signum)
                if signum == signal.SIGTERM or current is signal.default_int_handler:
                    self._previous[signum] = signal.signal(signum, self._raise)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():  # None: a handler set outside Python
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)


def _stopped(command: str, signum: int) -> int:
    if signum == signal.SIGTERM:
        print(f"rankdown {command}: terminated; nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(f"rankdown {command}: interrupted; nothing was written", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_library_logs()
    with _StopSignals() as stop:
        try:
            if getattr(args, "model", None) is not None:
                from rankdown.model_source import resolve_model

                args.model = resolve_model(args.model)
            status = args.func(args)
        except Terminated:
            return _stopped(args.command, signal.SIGTERM)
        except KeyboardInterrupt:
            return _stopped(args.command, signal.SIGINT)
        except Exception as e:
            if stop.received is not None:
                return _stopped(args.command, stop.received)
            if isinstance(e, RankdownError):
                print(f"rankdown {args.command}: error: {e}", file=sys.stderr)
                return e.exit_code
            if isinstance(e, BrokenPipeError):
                # The reader went away (`rankdown info ... | head`): no traceback, and none at exit
                # either, when Python flushes stdout into the closed pipe.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 141  # 128 + SIGPIPE, as a shell tool killed by it
            raise
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
