"""The export stage's recipe: which formats, which precision, how long a sequence."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from rankdown.errors import RankdownError
from rankdown.export.et_backends import Backend
from rankdown.export.formats import format_names
from rankdown.int4_numerics import PER_CHANNEL
from rankdown.schema import coerce_enums, name_enum
from rankdown.tasks import task_names

# Every registered format (export/formats.py), in registration order.
if TYPE_CHECKING:  # the members come from the registry at run time; a type checker sees a text enum
    class Format(str, Enum):
        pass
else:
    Format = name_enum("Format", format_names(), __name__)


class Quantize(str, Enum):
    NONE = "none"
    # int8 weights, one scale per output channel; activations are quantized per call at run
    # time. It is the int8 scheme both onnxruntime (MatMulInteger) and XNNPACK (qd8-f32-qc8w)
    # run fast on CPU, so both formats carry the same numerics.
    INT8 = "int8"
    # 4-bit weights in groups of --group-size input columns, int8 activations per call (8da4w);
    # ExecuTorch: 8da4w, head and embedding 8-bit (export/et_int4.py); ONNX: MatMulNBits, head 8-bit,
    # embedding 4-bit, or a tied table 8-bit shared with the head (export/onnx_int4.py).
    INT4 = "int4"


class Int4Scales(str, Enum):
    """How ExecuTorch int4 picks each group's scale. XNNPACK's 4-bit kernels take symmetric groups
    (no zero point), where max |w| / 7.5 (torchao's affine default) cost the 256-step default model
    most of its task: SmolLM2 healed for compare+code at 40%, PyTorch with those weights, 86.0% exact
    match on 100 compare problems against 98.0% in fp32; torchao's half-quadratic scale search (HQQ,
    scale only: the same symmetric format, the same kernels) 98.0%, and in ExecuTorch 92.0% against
    78.0% on 50 (docs/measurements.md, "ExecuTorch int4 scales"). For ONNX, ``hqq`` leaves the decoder to
    onnxruntime's asymmetric blocks and ``absmax`` writes the symmetric max |w| / 7.5 numerics itself
    (export/onnx_int4.py)."""

    HQQ = "hqq"
    # the checkpoint's own choice when ``compress --heal-quantize int4`` trained it through these
    # scales: the export then stores the healed weights to the bit, in ExecuTorch and in ONNX
    ABSMAX = "absmax"


class Int4Rounding(str, Enum):
    """How int4 picks each weight's code at the chosen scales (export/int4_gptq.py; ONNX on its graph's
    blocks, export/onnx_int4_gptq.py)."""

    # GPTQ on calibration text of --task (else the checkpoint's tasks, else the generic ones): dense
    # SmolLM2-135M in PyTorch 8da4w, perplexity x1.161 of the float model's against nearest's x1.337
    GPTQ = "gptq"
    # each weight to its nearest code: what a checkpoint healed through the 4-bit weights was trained for
    NEAREST = "nearest"


GROUP_SIZES = (PER_CHANNEL, 16, 32, 64, 128, 256)
DEFAULT_GROUP = 32  # the peers' (optimum-executorch 8da4w, onnxruntime-genai int4) and the issue's default
HEAD_BITS = (4, 8)


class OnnxGraph(str, Enum):
    # onnxruntime-genai's model builder (export/onnx_builder.py): GroupQueryAttention with the KV
    # cache and rotary inside, SkipSimplifiedLayerNormalization; each factor pair two MatMuls.
    FUSED = "fused"
    # optimum's text-generation-with-past export: one ONNX op per PyTorch op (Llama attention
    # unfused), the graph ORTModelForCausalLM loads.
    OPTIMUM = "optimum"


def is_share(value: object) -> bool:
    """A number in (0, 1] (a bool or NaN is not): what ``--min-top1`` takes."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1


@dataclass(frozen=True)
class ParityThresholds:
    """When an exported artifact counts as the same model as its PyTorch source."""

    # max |logit diff| over the prompt positions, relative to the largest reference logit
    max_rel_logit_diff: float = 1e-3
    min_top1_agreement: float = 1.0
    greedy_must_match: bool = True
    # the same for the 95th percentile over positions of each position's max |logit diff|: a bound
    # one chaotic position cannot fail, where 4-bit weights meet 8-bit activations
    max_rel_p95_logit_diff: float = math.inf
    # top-1: the runtime's token also agrees where the reference scores it within this x logit scale
    # of its best (export/parity.py ``logit_agreement``); 0: the same top token
    top1_tie: float = 0.0
    # with a tie: the same top token still at this share of positions at least
    min_strict_top1: float = 0.0

    @classmethod
    def for_quantize(cls, quantize: Quantize) -> ParityThresholds:
        if quantize is Quantize.INT8:
            # int8 changes the numbers on purpose; what must hold is that it still picks the
            # same next token almost everywhere. Task quality is measured separately.
            return cls(max_rel_logit_diff=0.25, min_top1_agreement=0.8, greedy_must_match=False)
        if quantize is Quantize.INT4:
            # 4 bits move logits further than 8; the same token must still win at most positions.
            return cls(max_rel_logit_diff=0.5, min_top1_agreement=0.6, greedy_must_match=False)
        return cls()

    @classmethod
    def beside_lowering(cls, quantize: Quantize) -> ParityThresholds:
        """Against the float model, when the artifact is also held against the quantized PyTorch model
        it lowers: the logit bound is then that check's, and the float model's top-1 bound stays, as a
        floor for what quantizing may cost (task quality is ``validate``'s to judge). A healed 40%
        SmolLM2 in ExecuTorch int4 keeps its task (92% exact match against 96% in fp32) with a largest
        logit difference of 0.84 x the logit scale, a tail logit no bound on the float model separates
        from a broken export."""
        return dataclasses.replace(cls.for_quantize(quantize), max_rel_logit_diff=math.inf)

    def with_floor(self, min_top1: float | None) -> ParityThresholds:
        """These bounds with the float model's top-1 floor set to ``min_top1`` (``export --min-top1``), if given."""
        return self if min_top1 is None else dataclasses.replace(self, min_top1_agreement=float(min_top1))

    @classmethod
    def lowering(cls, p95: float = 0.35) -> ParityThresholds:
        """The artifact against the PyTorch model with its quantized weights: only the runtime's kernels
        differ (its 8-bit rounding of the activations, the attention kernel), so the same token wins
        nearly everywhere. Measured in ExecuTorch int4: SmolLM2 at 40%, top-1 95.7%, per-position max
        |logit diff| at most 0.1 x scale at 68 of 69 positions and 0.45 x at one (the prose prompt's second
        token, whose logits are flat: scale 12.5 there; the same checkpoint compressed again the day
        before had 0.09 x everywhere); the 6.6M shipped model at 40%, 0.04 x, top-1 91.7%. So the bound
        is on the 95th percentile position, and the largest difference only has to stay below the
        logit scale (a broken kernel or a NaN fails that too).

        Top-1 counts near-ties (``top1_tie``): where the reference's own top two are closer than the
        kernels' rounding moves a logit, which token wins says nothing about the lowering. Measured:
        SmolLM2 compressed for ``compare`` at 40% with error ranks (2026-12-02), ExecuTorch int4, head
        8-bit: each position's largest |logit difference| from the runtime to its PyTorch model is 0.052 x scale
        (median; 0.076 at the 90th percentile), the reference's top-two margin is 0.022 x scale (median)
        on the generic text, where that model's logits are flat (it was healed for one task), and the
        runtime picked another token at 14 of 69 positions (top-1 79.7%), each one the reference ranked
        within 0.044 x scale of its best. Within 0.05 x scale they are ties; a broken kernel moves logits
        by the scale itself. The same top token must still win at 60% of positions (int4's floor against
        the float model), so near-ties cannot carry a runtime that agrees nowhere exactly.

        The 95th-percentile bound is the format's (``FormatSpec.lowering_p95``), 0.35 x scale for ONNX:
        onnxruntime's MatMulNBits (accuracy level 4) rounds
        every linear's input to int8 per block of 32-128, each rounding a threshold where a last-bit
        difference in the float input (another summation order) moves a code, and the model carries
        that on through 30 layers and every later position. Measured on SmolLM2 at 40% + head (healed
        per channel), `validate --task compare`, the reference rounding the inputs as MLAS does (exact
        to 1e-6 per linear): 0.23 x scale with onnxruntime's asymmetric blocks of 32 and 0.32 x with the
        healed per-channel numerics, which keep 96% exact match against 78%. ExecuTorch's is 0.2 x:
        its int4 .ptes measured 0.046-0.064 x (healed SmolLM2s, bench/results, 2026-12) and 0.089 x
        (SmolLM2 at 40% not healed, per channel), and exports whose odd-width factors XNNPACK's qc4w
        kernels misread (int4_numerics.py ``QC4W_STEP``) 0.34 x (the shipped model, top-1 95.7%,
        which ONNX's bound let through) and 0.64 x (SmolLM2)."""
        return cls(max_rel_logit_diff=1.0, min_top1_agreement=0.85, greedy_must_match=False,
                   max_rel_p95_logit_diff=p95, top1_tie=0.05, min_strict_top1=0.6)


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[Format, ...] = field(default=tuple(Format), metadata={"option": "--format"})
    # None (`--quantize auto`): the checkpoint's own, int4 for one healed through the 4-bit weights
    # (compress --weights int4 or --heal-quantize), else none; the export resolves it before anything reads it
    quantize: Quantize | None = None
    # int4: input columns that share one scale; None: the group a checkpoint healed through the 4-bit
    # weights was trained in (compress --heal-group-size), else DEFAULT_GROUP
    group_size: int | None = None
    # int4: the head's (and a tied lookup's) weight bits; the decoder linears are 4-bit. None: 4 where the
    # codes are GPTQ's (the head is then rounded on the final hidden states: dense SmolLM2 for compare,
    # perplexity +0.2% ONNX / +0.7% ExecuTorch against the 8-bit head's +0.5% / +1.6%, and 1.07-1.10x
    # the decode, the peers' own head precision), else 8 (a 4-bit head rounded to nearest: +7.0%)
    head_bits: int | None = None
    balance: bool = True  # int4: equal down-row and up-column norms per rank direction first (export/factor_balance.py)
    # int4: how each group's scale is chosen (ExecuTorch; ONNX with absmax); None: absmax for a checkpoint
    # healed through the 4-bit weights (the scales it was trained for), else hqq
    int4_scales: Int4Scales | None = None
    # int4, both formats: how each weight's code is picked at those scales; None: nearest for a checkpoint
    # healed through the 4-bit weights (the codes it was trained for), else gptq
    int4_rounding: Int4Rounding | None = None
    # int4: how a 4-bit head's codes are picked; None: gptq unless --int4-rounding nearest is given. A
    # checkpoint healed through the 4-bit weights rounds its decoder to nearest (the codes it was trained
    # for) and keeps an 8-bit head by default, but never healed its head through rounding, so with
    # --head-bits 4 the head is GPTQ's even then.
    head_rounding: Int4Rounding | None = None
    # int4: the task(s) the bundle is for ("compare", "compare+code"): GPTQ rounding's calibration text and
    # the float floor's text; None: the tasks the checkpoint was compressed for, else math, code and prose
    task: str | None = None
    onnx_graph: OnnxGraph = OnnxGraph.FUSED
    backend: Backend = Backend.XNNPACK
    max_seq_len: int = 256  # positions the ExecuTorch static KV cache holds
    # ExecuTorch: a second method, ``decode_step``, for one token with static shapes, sharing forward's
    # stored weights and KV cache (export/executorch.py); ignored without the executorch format. None:
    # on for a quantized export, off in fp32 (``wants_decode_method``). SmolLM2 int4 decodes 1.08-1.13x
    # faster with it on a Zen 4, interleaved (docs/measurements.md, "A one-token `decode_step` method"), for about
    # 45 MB more RSS; in fp32 it gained nothing (0.97x dense, 1.04x at 40%, Emerald Rapids) and XNNPACK
    # holds a second copy of the packed weights (+620 MB on dense SmolLM2). Twice the export time.
    decode_method: bool | None = None
    # int8/int4: the float model's top-1 floor (the share of the check's prompt positions whose top token
    # the artifact keeps); None: the precision's (ParityThresholds.for_quantize). Lowered to accept what
    # the weights' rounding costs a model not healed through it (dense SmolLM2-135M in ExecuTorch int4:
    # 56.5% < 0.6, its runtime 100% on its int4 PyTorch model); the lowering check keeps its bounds.
    min_top1: float | None = None
    parity_new_tokens: int = 32
    check: bool = True  # run the parity self-check after writing
    overwrite: bool = False

    def __post_init__(self):
        coerce_enums(self)
        if not self.formats:
            raise RankdownError(f"--format needs at least one of {', '.join(format_names())}")
        if not isinstance(self.max_seq_len, int) or not 16 <= self.max_seq_len <= 32768:
            raise RankdownError(f"--max-seq-len must be an integer in 16..32768, got {self.max_seq_len!r}")
        if self.head_bits is not None and self.head_bits not in HEAD_BITS:
            raise RankdownError(f"--head-bits must be one of {', '.join(map(str, HEAD_BITS))}, got {self.head_bits!r}")
        if self.head_bits not in (None, 8) and self.quantize not in (Quantize.INT4, None):
            raise RankdownError("--head-bits applies to --quantize int4 only")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            numbers = ", ".join(str(g) for g in GROUP_SIZES if g != PER_CHANNEL)
            raise RankdownError(f"--group-size must be one of {numbers} or channel, got {self.group_size!r}")
        if self.min_top1 is not None and not is_share(self.min_top1):
            raise RankdownError(f"--min-top1 must be a share in (0, 1], got {self.min_top1!r}")
        if self.min_top1 is not None and self.quantize is Quantize.NONE:
            raise RankdownError("--min-top1 applies to --quantize int8 or int4 (an fp32 export must match PyTorch)")
        if self.int4_rounding is not None and self.quantize in (Quantize.NONE, Quantize.INT8):
            raise RankdownError("--int4-rounding applies to --quantize int4")
        if self.head_rounding is not None and self.quantize in (Quantize.NONE, Quantize.INT8):
            raise RankdownError("head_rounding applies to --quantize int4")
        if self.task is not None:
            task_names(self.task)  # an unknown task is refused here, before minutes of loading
            if self.quantize in (Quantize.NONE, Quantize.INT8):
                raise RankdownError("--task applies to --quantize int4 (its rounding's calibration text and float floor)")
        if not 1 <= self.parity_new_tokens <= self.max_seq_len - 8:
            raise RankdownError(f"parity_new_tokens must be in 1..{self.max_seq_len - 8}")

    @property
    def group(self) -> int:
        """The int4 group: ``group_size``, or DEFAULT_GROUP when unset (the export resolves a healed
        checkpoint's group before any format reads this)."""
        return DEFAULT_GROUP if self.group_size is None else self.group_size

    @property
    def onnx_group(self) -> int:
        """ONNX MatMulNBits' block bound: ``group``, or DEFAULT_GROUP for per-channel scales, which
        MatMulNBits has no layout for (its blocks are powers of two of at least 16)."""
        return DEFAULT_GROUP if self.group == PER_CHANNEL else self.group

    @property
    def scales(self) -> Int4Scales:
        """The int4 scales: ``int4_scales``, or HQQ when unset (the export resolves a healed
        checkpoint's ABSMAX before any format reads this)."""
        return Int4Scales.HQQ if self.int4_scales is None else self.int4_scales

    @property
    def rounding(self) -> Int4Rounding:
        """The int4 rounding: ``int4_rounding``, or GPTQ when unset (the export resolves a healed
        checkpoint's NEAREST before any format reads this)."""
        return Int4Rounding.GPTQ if self.int4_rounding is None else self.int4_rounding

    @property
    def head(self) -> int:
        """The int4 head's bits: ``head_bits``, or 4 where GPTQ picks the codes (it rounds the head on the
        final hidden states, keeping more of the task than an 8-bit head rounded to nearest), else 8 (a
        4-bit head rounded to nearest costs the task)."""
        if self.head_bits is not None:
            return self.head_bits
        return 4 if self.rounding is Int4Rounding.GPTQ else 8

    @property
    def head_rounds_by(self) -> Int4Rounding:
        """A 4-bit head's rounding: ``head_rounding``, else nearest if ``int4_rounding`` says so, else GPTQ."""
        if self.head_rounding is not None:
            return self.head_rounding
        return Int4Rounding.NEAREST if self.int4_rounding is Int4Rounding.NEAREST else Int4Rounding.GPTQ

    @property
    def gptq_parts(self) -> tuple[bool, bool]:
        """Whether GPTQ picks (the decoder's, the head's) codes; an 8-bit head is rounded to nearest."""
        return self.rounding is Int4Rounding.GPTQ, self.head == 4 and self.head_rounds_by is Int4Rounding.GPTQ

    @property
    def precision(self) -> Quantize:
        """``quantize`` as resolved for the checkpoint (``auto``, None, is resolved by export/pipeline.py's
        ``resolve_quantize`` before anything reads it)."""
        if self.quantize is None:
            raise ValueError("ExportConfig.quantize is auto until the export resolves it for its checkpoint")
        return self.quantize

    @property
    def balances(self) -> bool:
        """Whether the factor pairs are balanced before quantizing: int4 only (int8 was better without)."""
        return self.balance and self.precision is Quantize.INT4

    @property
    def thresholds(self) -> ParityThresholds:
        """The artifact against the float model, with the user's top-1 floor if given."""
        return ParityThresholds.for_quantize(self.precision).with_floor(self.min_top1)

    @property
    def floor_thresholds(self) -> ParityThresholds:
        """The float model's bounds beside a lowering check, with the user's top-1 floor if given."""
        return ParityThresholds.beside_lowering(self.precision).with_floor(self.min_top1)

    def wants_decode_method(self) -> bool:
        """Whether the .pte gets the one-token method: as asked, else only for a quantized export."""
        return self.decode_method if self.decode_method is not None else self.precision is not Quantize.NONE
