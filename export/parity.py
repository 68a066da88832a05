"""Does an exported artifact compute what its PyTorch source computes? Logits and greedy tokens."""

from __future__ import annotations

import math

import numpy as np

from rankdown.errors import RankdownError
from rankdown.export.config import ParityThresholds
from rankdown.export.decoding import Decoder, Generation, greedy
from rankdown.export.manifest import Parity
from rankdown.tasks import Split, load_task, task_names

# The prompts of a checkpoint that names no built-in task (dense, or calibrated on a file): one of each
# kind of text the shipped model knows.
GENERIC_TASKS = ("math", "code", "prose")
PROMPT_LENGTHS = (5, 23, 41)


def parity_tasks(compression: dict | None, task: str | None = None) -> tuple[str, ...]:
    """The tasks whose text the float floor of a quantized artifact is judged on (and GPTQ rounding
    calibrated on): ``task`` (export --task), else the ones the checkpoint was compressed for (its
    compression.json), else ``GENERIC_TASKS``. A model compressed
    and healed for one task has flat logits on other text, where 4-bit rounding flips the top token
    without costing the task: a SmolLM2 healed for compare+code at 40%, ONNX int4, agrees with its
    float model at 59.4% of the generic positions and 76.8% of compare+code ones, and keeps compare
    exact match at 96.0% vs 98.0%."""
    if task is not None:
        return task_names(task)
    task = (compression or {}).get("task")
    if not isinstance(task, str):
        return GENERIC_TASKS
    try:
        return task_names(task)
    except RankdownError:  # a calibration file's path, or a task this version does not know
        return GENERIC_TASKS


def parity_prompts(tokenizer, room: int, tasks: tuple[str, ...] = GENERIC_TASKS) -> list[list[int]]:
    """Real text of ``tasks`` (evaluation split), cut to lengths unlike the export's example input (8),
    so a shape specialised at export time would show up here; none longer than ``room``. Three
    prompts whatever the number of tasks: the tasks take turns, each giving its next text."""
    if tasks == GENERIC_TASKS:  # the prompts every bundle exported before task prompts was checked on
        sources = [load_task("math", Split.EVALUATION).qa[0].prompt,
                   load_task("code", Split.EVALUATION).texts[0],
                   load_task("prose", Split.EVALUATION).texts[0]]
    else:
        texts = {task: load_task(task, Split.EVALUATION).texts for task in tasks}
        if empty := [task for task, found in texts.items() if not found]:
            raise RankdownError(f"task {empty[0]}: no evaluation text on this machine to check the export on")
        sources = []
        for i in range(len(PROMPT_LENGTHS)):
            found = texts[tasks[i % len(tasks)]]
            sources.append(found[(i // len(tasks)) % len(found)])
    prompts = []
    for text, length in zip(sources, PROMPT_LENGTHS):
        ids = tokenizer(text[: 16 * length], return_token_type_ids=False)["input_ids"]
        prompts.append(list(ids[: min(length, room)]))
    return prompts


class TorchDecoder:
    """Eager PyTorch with transformers' own dynamic KV cache, behind the runtimes' decoder interface
    (``prefill`` -> every prompt position's logits, ``step`` -> the next position's), so a PyTorch
    reference is driven by the same loops as the runtimes."""

    max_positions = None  # transformers' cache grows as it is asked

    def __init__(self, model):
        self.model = model
        self._cache = None

    def _run(self, ids: list[list[int]], cache):
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor(ids), past_key_values=cache, use_cache=True)
        self._cache = out.past_key_values
        return out.logits[0].float().numpy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        return self._run([list(ids)], None)

    def step(self, token: int) -> np.ndarray:
        return self._run([[token]], self._cache)[-1]


def torch_greedy(model, prompt: list[int], new_tokens: int) -> Generation:
    """The reference: eager PyTorch with transformers' own dynamic KV cache."""
    return greedy(TorchDecoder(model), prompt, new_tokens)


def logit_agreement(pairs: list[tuple[np.ndarray, np.ndarray]], tie: float = 0.0) -> tuple[float, float, float, int]:
    """Over (got, reference) prompt-logit pairs: max |diff|, the largest |reference logit| over all
    pairs, top-1 agreement and the number of positions. Top-1: the reference scores the runtime's
    top token at its own best, or, with ``tie`` (relative to that scale), within ``tie x scale`` of it
    (a near-tie, decided by rounding noise)."""
    max_diff, scale, agree, positions = 0.0, 0.0, 0, 0
    for got, ref in pairs:
        # np.fmax would drop a NaN, and so would Python's max when it comes second: keep it, so it fails
        max_diff = float(np.max([max_diff, float(np.abs(got - ref).max())]))
        scale = float(np.max([scale, float(np.abs(ref).max())]))
        positions += len(ref)
    if not math.isfinite(scale):  # an infinite logit would make every relative bound hold: none does
        scale = math.nan
    for got, ref in pairs:
        chosen = np.take_along_axis(ref, got.argmax(-1)[..., None], -1)[..., 0]
        agree += int((chosen >= ref.max(-1) - tie * scale).sum())  # NaN anywhere never agrees
    return max_diff, scale, agree / positions, positions


def within(value: float, relative_bound: float, scale: float) -> bool:
    """``value <= relative_bound x scale``, False for a NaN; an infinite bound holds for any number
    (even at a zero scale, where the product is NaN)."""
    if np.isnan(value):
        return False
    return relative_bound == math.inf or value <= relative_bound * scale


def position_percentile(pairs: list[tuple[np.ndarray, np.ndarray]], percent: float = 95.0) -> float:
    """Over (got, reference) pairs: the ``percent`` percentile over positions of each position's
    max |logit diff|."""
    per_position = np.concatenate([np.abs(got - ref).max(-1) for got, ref in pairs])
    return float(np.percentile(per_position, percent))


def largest_difference(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int, int, float]:
    """Where the largest |logit diff| is over (got, reference) pairs: pair index, position,
    vocabulary index and the difference, so a failure says where to look."""
    best = (0, 0, 0, -1.0)
    for index, (got, ref) in enumerate(pairs):
        diff = np.abs(got - ref)
        position, token = np.unravel_index(int(diff.argmax()), diff.shape)
        if diff[position, token] > best[3]:
            best = (index, int(position), int(token), float(diff[position, token]))
    return best


def compare(reference: list[Generation], decoder: Decoder, prompts: list[list[int]], new_tokens: int,
            thresholds: ParityThresholds) -> Parity:
    return judge(reference, run(decoder, prompts, new_tokens), thresholds)


def run(decoder: Decoder, prompts: list[list[int]], new_tokens: int) -> list[Generation]:
    return [greedy(decoder, prompt, new_tokens) for prompt in prompts]


def judge(reference: list[Generation], runs: list[Generation], thresholds: ParityThresholds) -> Parity:
    """The artifact's generations ``runs`` against the reference's, on the same prompts."""
    pairs = [(g.prompt_logits, r.prompt_logits) for g, r in zip(runs, reference)]
    max_diff, scale, top1, positions = logit_agreement(pairs, thresholds.top1_tie)
    strict = logit_agreement(pairs)[2] if thresholds.top1_tie else top1
    p95 = position_percentile(pairs)
    greedy_ok = all(g.tokens == r.tokens for g, r in zip(runs, reference))
    passed = (within(max_diff, thresholds.max_rel_logit_diff, scale) and top1 >= thresholds.min_top1_agreement
              and strict >= thresholds.min_strict_top1 and within(p95, thresholds.max_rel_p95_logit_diff, scale)
              and (greedy_ok or not thresholds.greedy_must_match))
    return Parity(prompts=len(reference), positions=positions, max_abs_logit_diff=max_diff, logit_scale=scale,
                  top1_agreement=top1, new_tokens=len(reference[0].tokens), greedy_match=greedy_ok, passed=passed,
                  p95_abs_logit_diff=p95, top1_tie=thresholds.top1_tie,
                  strict_top1_agreement=strict if thresholds.top1_tie else None)


def top1_note(tie: float) -> str:
    """How a top-1 figure counts near-ties, for the lines that print it."""
    return f" (near-ties within {tie:g} x logit scale count)" if tie else ""


def describe_failure(parity: Parity, thresholds: ParityThresholds) -> str:
    reasons = []
    if not within(parity.max_abs_logit_diff, thresholds.max_rel_logit_diff, parity.logit_scale):
        reasons.append(f"max |logit diff| {parity.max_abs_logit_diff:.3g} > "
                       f"{thresholds.max_rel_logit_diff:g} x logit scale {parity.logit_scale:.3g}")
    if parity.p95_abs_logit_diff is not None and \
            not within(parity.p95_abs_logit_diff, thresholds.max_rel_p95_logit_diff, parity.logit_scale):
        reasons.append(f"95th-percentile position's |logit diff| {parity.p95_abs_logit_diff:.3g} > "
                       f"{thresholds.max_rel_p95_logit_diff:g} x logit scale {parity.logit_scale:.3g}")
    if parity.top1_agreement < thresholds.min_top1_agreement:
        reasons.append(f"top-1 agreement {parity.top1_agreement:.1%}{top1_note(thresholds.top1_tie)} < "
                       f"{thresholds.min_top1_agreement:.1%}")
    strict = parity.strict_top1_agreement
    if strict is not None and strict < thresholds.min_strict_top1:
        reasons.append(f"top-1 agreement without near-ties {strict:.1%} < {thresholds.min_strict_top1:.1%}")
    if thresholds.greedy_must_match and not parity.greedy_match:
        reasons.append(f"greedy tokens differ within {parity.new_tokens} new tokens")
    return "; ".join(reasons)
