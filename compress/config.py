"""The compress stage's recipe (CompressConfig) and its report (compression.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from rankdown.compute_device import Device
from rankdown.errors import RankdownError
from rankdown.int4_numerics import PER_CHANNEL
from rankdown.schema import coerce_enums, dump_json, read_dataclass, read_json_file, to_jsonable
from rankdown.tasks import TASKS, task_names

REPORT_FILE = "compression.json"
# 2: allocation_check (bayes re-judged against uniform); 3: healing; 4: workers, device; 5: healing precision;
# 6: head (--head-rank); 7: weights (compress --weights); 8: config (every setting)
REPORT_SCHEMA_VERSION = 8
# older reports read with an empty allocation_check, no healing, 1 cpu worker, healing in fp32, float weights,
# an empty config
READABLE_REPORT_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)


class Method(str, Enum):
    SVD = "svd"
    ASVD = "asvd"
    WHITEN = "whiten"
    JOINT = "joint"
    FEATURE = "feature"
    BASIS = "basis"


class Allocation(str, Enum):
    UNIFORM = "uniform"
    BAYES = "bayes"
    ERROR = "error"


class BasisMode(str, Enum):
    CLOSED_FORM = "closed-form"
    TUNED = "tuned"


class HealQuantize(str, Enum):
    """The numerics healing trains for (compress/fake_quant.py): float; the int4 export's 4-bit
    weights; or those and the int8 per-token inputs ExecuTorch's 8da4w kernels run them on."""

    NONE = "none"
    INT4 = "int4"
    INT4_8DA = "8da4w"

    @property
    def four_bit(self) -> bool:
        return self is not HealQuantize.NONE


class Precision(str, Enum):
    """The arithmetic of a stage's passes: healing's forward and backward (its weights and AdamW stay
    float32), calibration's forward (its statistics are summed in float64). auto: bfloat16 where the
    hardware multiplies it natively (rankdown/compute_device.py), else float32."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


class Strategy(str, Enum):
    """How ranks are chosen (compress/strategies.py); picked from --allocate and --basis-mode."""

    UNIFORM = "uniform"
    BAYES = "bayes"
    ERROR = "error"  # greedy over every unit's truncation loss per parameter (compress/error_ranks.py)
    TUNED_BASIS = "tuned-basis"  # ranks are the outcome of training and pruning the bases


@dataclass(frozen=True)
class BasisTuning:
    """How tuned mode trains: optimizer steps, windows per step, pruning steps and rates."""

    steps: int = 60
    batch: int = 8
    seq_len: int = 64  # tokens per training window: math lines are short, and a step costs per token
    prune_steps: int = 6
    recover_share: float = 0.25  # of the steps, after the last pruning, that only train
    coefficient_lr: float = 2e-3  # coefficients train as c = s * g, g starting at 1
    new_bases_lr: float = 1e-3
    # Weight of KL(dense || tuned) next to the task's next-token loss (0 turns it off). Measured on
    # the shipped model at ratio 0.4, 60 steps: weight 1 gave math EM 90.5%, weight 10 gave 97.5%
    # (dense 98.2%): the more the next-token loss weighs, the lower the perplexity and the further
    # the answers drift (the shipped model already learned this task from the same training split).
    distill: float = 10.0

    def __post_init__(self):
        if self.steps < 1:
            raise RankdownError(f"--tune-steps must be at least 1, got {self.steps}")
        if self.batch < 1 or self.prune_steps < 1:
            raise RankdownError("tuning batch and prune steps must be at least 1")
        if self.prune_steps > self.steps:
            raise RankdownError(f"--tune-steps {self.steps} is fewer than the {self.prune_steps} pruning steps")


@dataclass(frozen=True)
class Healing:
    """Distillation after factorization (compress/healing.py): both factors of every pair trained on
    the task's training split, next-token loss + ``distill`` x KL(dense || compressed) over the dense
    model's top ``top_k`` tokens (the rest of its mass as one more outcome). 0 steps: no healing."""

    # On by default: measured on SmolLM2-135M at 40% removed, 32 steps took compare exact match from
    # 76.0% to 97.0% (compressed for compare) and code perplexity from 9.6x to 2.63x dense (for code).
    # 256 since bf16 halved a step: at 20% removed for code, 32 steps gave code perplexity 1.57x dense,
    # 128 steps 1.34x, 256 steps 1.21x in 14 minutes for the whole command (docs/measurements.md, Healing on the real model).
    # 300 since calibration runs in bf16: with 65,536 calibration tokens, 1.17x -> 1.12x at 20% and 1.52x ->
    # 1.45x at 40%, in 18 min 49 s and 18 min 22 s (docs/measurements.md, "Calibration in bfloat16, 300 healing steps").
    # 256 again since error ranks are the default: their sensitivity and profile passes cost about 100 s, and
    # 300 steps then ran 21 min 48 s (docs/measurements.md, "Error ranks weighed by the loss").
    steps: int = 256
    batch: int = 8  # training windows per step
    seq_len: int = 128  # tokens per training window, BOS included (256 measured no better)
    # AdamW, decayed linearly to 0 over the steps; chosen on the held-back windows at 128 steps (SmolLM2
    # 20% for code: 1e-4 gave 3.1655, 5e-5 3.1835, 2e-4 3.1958; at 32 steps 5e-5 beat 2e-4)
    lr: float = 1e-4
    distill: float = 1.0
    top_k: int = 32  # the dense model's log-probs kept per token; they are computed before compressing
    # the first training windows (the same whatever the steps), never trained on: the report's loss before and after
    held_back: int = 16
    # int4: the forward pass sees 4-bit weights (quantization-aware training)
    quantize: HealQuantize = field(default=HealQuantize.NONE, metadata={"option": "--heal-quantize"})
    # int4: input columns per scale, as the export's --group-size; PER_CHANNEL (`channel`) by default:
    # SmolLM2 40% + head 128 healed per channel kept 98% of `compare` in the .pte against 88% at groups
    # of 128, and decoded 1.15x (XNNPACK's qc4w kernels; docs/measurements.md, run Q)
    group_size: int = PER_CHANNEL
    precision: Precision = field(default=Precision.AUTO, metadata={"option": "--heal-precision"})

    def __post_init__(self):
        coerce_enums(self)
        for name in ("steps", "batch", "seq_len", "top_k", "held_back", "group_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise RankdownError(f"healing {name} must be a whole number, got {value!r}")
        if self.steps < 0:
            raise RankdownError(f"--heal-steps must be at least 0, got {self.steps}")
        if self.group_size not in (PER_CHANNEL, 32, 64, 128, 256):
            raise RankdownError(f"--heal-group-size must be 32, 64, 128, 256 or channel, got {self.group_size}")
        if self.batch < 1 or self.seq_len < 2 or self.top_k < 1 or self.held_back < 1:
            raise RankdownError("healing batch, top_k and held-back windows must be at least 1, seq_len at least 2")
        if not self.lr > 0:
            raise RankdownError(f"--heal-lr must be positive, got {self.lr!r}")
        if not self.distill >= 0:
            raise RankdownError(f"healing's distillation weight must be at least 0, got {self.distill!r}")


class BundleWeights(str, Enum):
    """compress --weights: the weights the checkpoint will be exported with, which pick the recipe
    (``compress_config``); export then takes the same (``export --quantize auto``)."""

    FLOAT = "float"
    INT4 = "int4"


@dataclass(frozen=True)
class CompressConfig:
    """One compression recipe. ``ratio`` is the fraction of decoder-linear parameters removed."""

    # feature: the best measured on the real model (SmolLM2-135M, compare, 40% removed, uniform ranks: 76.0%
    # against whiten 68.0% and whiten with error ranks 64.5%; dense 65.5%) and within one problem of 400 of
    # whiten on the shipped model (97.8% vs 98.0%). svd, the old default, collapses on the real model.
    method: Method = Method.FEATURE
    ratio: float = 0.4
    task: str | None = "math"
    calib: Path | None = None
    # None: error ranks weighed by the loss's sensitivities, or, for tuned basis, its pruning. SmolLM2
    # compressed for code at 20% removed, healed: code perplexity 1.12x dense with uniform ranks, 1.01x
    # (docs/measurements.md, "Error ranks weighed by the loss").
    allocate: Allocation | None = None
    trials: int = 30
    basis_mode: BasisMode = BasisMode.CLOSED_FORM
    tuning: BasisTuning = field(default_factory=BasisTuning)  # used by --basis-mode tuned only
    healing: Healing = field(default_factory=Healing)  # after any strategy, tuned basis included
    seed: int = 0
    # calibration budget: windows of seq_len tokens, BOS included; a task's split may hold fewer (of the
    # built-in ones only code holds more than 16k). 65,536 since 2026-12-01: SmolLM2 compressed for code and
    # healed 256 steps, code perplexity 1.21x -> 1.18x dense at 20% removed, 1.75x -> 1.52x at 40%, for
    # about 270 s more factorizing (docs/measurements.md, "Healing levers").
    calib_tokens: int = 65536
    # The calibration forward passes: bf16 autocast (attention float32) where native, 2.2x faster on SmolLM2
    # (8.9 -> 4 s a layer at 65,536 tokens) with the same factors' held-back loss
    # (docs/measurements.md, "Calibration in bfloat16, 300 healing steps").
    calib_precision: Precision = field(default=Precision.AUTO, metadata={"option": "--calib-precision"})
    # Fit each layer to the dense model's outputs from the compressed model's inputs (issue 14, item 2)
    correct_carried: bool = False
    seq_len: int = 128
    dtype: str | None = None  # stored dtype of the factors; None keeps the source's
    overwrite: bool = False
    workers: int = 1  # processes sharing the calibration windows (compress/distributed.py); torchrun's under torchrun
    # error ranks only: every factored rank a multiple of this (32, the int4 group: no rank padded at export)
    rank_multiple: int = 1
    # error ranks only: a unit whose factor pair would hold more than this share of its dense parameters
    # stays dense. Near break-even the pair saves few bytes but runs two GEMMs, each with its own dispatch
    # and (int4) its own int8 input, where the dense linear runs one. 1.0: dense only past break-even.
    max_pair_share: float = 1.0
    # the output head (a tied table: lookup and head) factored to this rank after the decoder (compress/head.py)
    head_rank: int | None = None
    device: Device = Device.AUTO  # where statistics and decompositions are computed
    # the bundle's weights (compress --weights), recorded for `export --quantize auto`; the recipe is
    # applied by compress_config, not here
    weights: BundleWeights = BundleWeights.FLOAT

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise RankdownError(f"--ratio must be a number strictly between 0 and 1, got {self.ratio!r}")
        coerce_enums(self)
        if (self.task is None) == (self.calib is None):
            raise RankdownError(f"give a task ({', '.join(TASKS)}) or a calibration file, not both")
        if self.task is not None:
            task_names(self.task)  # an unknown task or a bad mix is refused here, before any work
        if self.basis_mode is BasisMode.TUNED and self.method is not Method.BASIS:
            raise RankdownError("--basis-mode tuned applies to --method basis only")
        if self.correct_carried and (self.method in (Method.SVD, Method.JOINT) or self.basis_mode is BasisMode.TUNED):
            raise RankdownError("--correct-carried applies to the methods fitted on calibration statistics "
                                "(asvd, whiten, feature, closed-form basis)")
        if self.basis_mode is BasisMode.TUNED and self.allocate not in (None, Allocation.UNIFORM):
            raise RankdownError("--basis-mode tuned chooses ranks by pruning; leave --allocate unset")
        if self.trials < 1:
            raise RankdownError(f"--trials must be at least 1, got {self.trials}")
        if isinstance(self.calib_tokens, bool) or not isinstance(self.calib_tokens, int) or self.calib_tokens < self.seq_len:
            raise RankdownError(f"--calib-tokens must be at least one window of {self.seq_len} tokens, got {self.calib_tokens!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise RankdownError(f"--workers must be a whole number of at least 1, got {self.workers!r}")
        if isinstance(self.rank_multiple, bool) or not isinstance(self.rank_multiple, int) or \
                not 1 <= self.rank_multiple <= 256:
            raise RankdownError(f"--rank-multiple must be a whole number from 1 to 256, got {self.rank_multiple!r}")
        if isinstance(self.max_pair_share, bool) or not isinstance(self.max_pair_share, (int, float)) or \
                not 0 < self.max_pair_share <= 1:
            raise RankdownError(f"--max-pair-share must be a number in (0, 1], got {self.max_pair_share!r}")
        if self.head_rank is not None and (isinstance(self.head_rank, bool) or not isinstance(self.head_rank, int)
                                           or self.head_rank < 1):
            raise RankdownError(f"--head-rank must be a whole number of at least 1, got {self.head_rank!r}")
        if self.rank_multiple > 1 and self.allocation is not Allocation.ERROR:
            raise RankdownError(f"--rank-multiple applies to error ranks (--allocate error), not {self.allocation.value}")
        if self.max_pair_share < 1 and self.allocation is not Allocation.ERROR:
            raise RankdownError(f"--max-pair-share applies to error ranks (--allocate error), not {self.allocation.value}")

    @property
    def allocation(self) -> Allocation:
        """--allocate, or its default: error ranks (uniform for tuned basis, whose pruning sets the ranks)."""
        if self.allocate is not None:
            return self.allocate
        return Allocation.UNIFORM if self.basis_mode is BasisMode.TUNED else Allocation.ERROR

    @property
    def strategy(self) -> Strategy:
        """Tuned basis selection chooses its ranks by pruning; otherwise --allocate says how."""
        return Strategy.TUNED_BASIS if self.basis_mode is BasisMode.TUNED else Strategy(self.allocation.value)

    @property
    def source(self) -> str:
        """The calibration data as messages name it."""
        return str(self.calib) if self.calib is not None else f"task {self.task}"

    @property
    def recorded_task(self) -> str:
        """compression.json's ``task``: the task, or the calibration file's absolute path, which no
        task name can equal (a file named ``code`` must not be read back as the task)."""
        return str(self.calib.resolve()) if self.calib is not None else str(self.task)


# compress --weights int4: the recipe measured best for 4-bit bundles (SmolLM2-135M for compare at 40%
# removed, 2026-12-06, docs/measurements.md, "Run ab" and "Run ac"): healing trains 512 steps through the 8da4w numerics
# with one scale per output channel (XNNPACK's fastest 4-bit kernels; the .onnx runs the same codes),
# ranks are multiples of the int4 group (none padded), a linear stays dense past 0.6 of its parameters
# (fewer, larger GEMMs: 1.05x a step from 1.0 to 0.7 to 0.6; 0.5 lost 8-15 points of compare), and the
# head is factored to rank 64 (its 8-bit table was 16% of a token's reads at 128). The .pte decoded
# 1.37-1.43x optimum-executorch's 8da4w .pte in one runtime, at 0.36x its size, compare 95%.
INT4_RECIPE: dict[str, Any] = {"rank_multiple": 32, "max_pair_share": 0.6, "head_rank": 64}
INT4_HEALING: dict[str, Any] = {"quantize": HealQuantize.INT4_8DA, "group_size": PER_CHANNEL, "steps": 512}
ERROR_RANKS_ONLY = ("rank_multiple", "max_pair_share")


def recorded_config(cfg: CompressConfig) -> dict[str, Any]:
    """compression.json's ``config``: the CompressConfig as JSON values, without what says how to write
    (``overwrite``) rather than what was made; ``calib`` as an absolute path."""
    recorded = {k: v for k, v in to_jsonable(cfg).items() if k != "overwrite"}
    if cfg.calib is not None:
        recorded["calib"] = str(cfg.calib.resolve())
    return recorded


def compress_config(weights: BundleWeights | str = BundleWeights.FLOAT, healing: dict[str, Any] | None = None,
                    **fields: Any) -> CompressConfig:
    """The config for a bundle of ``weights``: each field given wins, then that bundle's recipe, then
    CompressConfig's defaults (``healing``: Healing's fields, the same way). The recipe's error-rank
    options are left out where the ranks are not error ranks (--allocate uniform or bayes)."""
    try:
        weights = BundleWeights(weights)
    except ValueError:
        raise RankdownError(f"--weights must be {' or '.join(w.value for w in BundleWeights)}, got {weights!r}") from None
    healing = healing or {}
    if weights is BundleWeights.FLOAT:
        return CompressConfig(**fields, weights=weights, healing=Healing(**healing))
    recipe = dict(INT4_RECIPE)
    if CompressConfig(**fields).allocation is not Allocation.ERROR:
        recipe = {k: v for k, v in recipe.items() if k not in ERROR_RANKS_ONLY}
    return CompressConfig(**(recipe | fields), weights=weights, healing=Healing(**(INT4_HEALING | healing)))


@dataclass(frozen=True)
class ModuleReport:
    rank: int | None  # None: kept dense
    out_features: int
    in_features: int
    params: int
    note: str = ""


@dataclass(frozen=True)
class HealingReport:
    """What healing did, judged on training windows it never trained on (never the evaluation split)."""

    steps: int
    batch: int
    seq_len: int
    lr: float
    distill: float
    training_windows: int
    held_back_windows: int
    loss_before: float  # next-token loss on the held-back windows
    loss_after: float
    kl_before: float  # KL(dense || compressed) over the dense model's top-k, on the held-back windows
    kl_after: float
    teacher_seconds: float  # the dense model's top-k log-probs, computed before compressing
    seconds: float  # the training steps and the judging
    quantize: str = "none"  # int4: trained (and judged) with 4-bit weights in groups of group_size
    group_size: int | None = None
    precision: str = "fp32"  # of the training passes (bf16: autocast); judging is always float32


@dataclass(frozen=True)
class HeadReport:
    """The output head factored (--head-rank): its rank and what it cost on held-back text."""

    rank: int
    params_before: int  # the V x H head (a tied table once)
    params_after: int  # B (V x r) and A (r x H); A twice for a tied table (the head and the lookup)
    calibration_windows: int
    held_back_windows: int
    distinct_tokens: int  # tokens the calibration windows hold (the rows weighted above the rest)
    loss_before: float  # next-token loss on the held-back windows, table dense
    loss_after: float
    seconds: float


@dataclass(frozen=True)
class CompressionReport:
    method: str
    task: str
    ratio: float
    allocate: str
    params_before: int
    params_after: int
    modules: dict[str, ModuleReport]
    calibration_loss: float | None
    wall_seconds: float
    peak_memory_mb: float
    keep_ratios: dict[str, float] = field(default_factory=dict)
    # bayes: the loss of the final (streamed) factors for the chosen and the uniform ranks on
    # windows the search never saw, and which were kept; error: the error scale and the truncation
    # loss predicted for the chosen and for the uniform ranks
    allocation_check: dict[str, int | float | str] = field(default_factory=dict)
    basis_mode: str | None = None
    healing: HealingReport | None = None
    seed: int = 0
    workers: int = 1  # processes that shared the calibration windows
    device: str = "cpu"  # where statistics and decompositions ran ("cuda:0", ...)
    correct_carried: bool = False  # each layer fitted to the dense outputs from the compressed inputs
    calib_precision: str = "fp32"  # of the calibration forward passes (bf16: autocast); earlier reports: fp32
    head: HeadReport | None = None  # --head-rank; params_before/after count decoder linears only
    weights: str = BundleWeights.FLOAT.value  # compress --weights: what `export --quantize auto` writes
    # every setting the checkpoint was made with (recorded_config), so that a bundle's provenance holds
    # the whole recipe: calibration tokens, rank multiple, pair share, trials, healing's numerics
    config: dict[str, Any] = field(default_factory=dict)
    schema_version: int = REPORT_SCHEMA_VERSION

    @property
    def achieved_ratio(self) -> float:
        return 1 - self.params_after / self.params_before

    def to_json(self) -> str:
        return dump_json(to_jsonable(self) | {"achieved_ratio": self.achieved_ratio})

    @classmethod
    def read(cls, folder: Path) -> CompressionReport:
        path = folder / REPORT_FILE
        raw = read_json_file(path, "compression report")
        if isinstance(raw, dict):
            raw.pop("achieved_ratio", None)  # derived, written for readers of the file
            if raw.get("schema_version") not in READABLE_REPORT_VERSIONS:
                raise RankdownError(f"{path}: invalid compression report: schema_version {raw.get('schema_version')!r}")
        return read_dataclass(cls, path, "compression report", raw)
