"""What a checkpoint holds: parameters, per-module shape and rank, size, compression ratio."""

from __future__ import annotations

from dataclasses import dataclass

from rankdown.checkpoint import Checkpoint, linear_modules, meta_model
from rankdown.factor import FactorizedLinear, SharedDownLinear, linear_params


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: dense
    params: int
    dense_params: int


@dataclass(frozen=True)
class ModelInfo:
    folder: str
    total_params: int
    decoder_linear_params: int
    dense_decoder_linear_params: int
    weights_bytes: int
    modules: tuple[ModuleInfo, ...]
    head_rank: int | None = None  # compress --head-rank: the head (a tied table) as a factor pair
    tied: bool = False

    @property
    def compression_ratio(self) -> float:
        """Fraction of the dense decoder-linear parameters removed (0 for a dense model)."""
        return 1.0 - self.decoder_linear_params / self.dense_decoder_linear_params

    @property
    def warnings(self) -> list[str]:
        """Factor pairs above the break-even rank m n / (m + n): they store more than the dense layer."""
        return [f"{m.name}: rank {m.rank} is above the break-even rank "
                f"{m.out_features * m.in_features // (m.out_features + m.in_features)}; "
                f"the pair stores {m.params:,} parameters, more than the dense layer's {m.dense_params:,}"
                for m in self.modules if m.rank is not None and m.params > m.dense_params]


def model_info(ckpt: Checkpoint) -> ModelInfo:
    """Computed from the config, record and headers alone: no weight data is read."""
    model = meta_model(ckpt.config, ckpt.record, ckpt.folder)
    modules = []
    for name, module in linear_modules(model).items():
        # A pair's dense equivalent is m x n: a bias that a method adds to ``up`` (feature's
        # mean restoration) is a cost of the pair, not part of the original layer.
        factored = isinstance(module, (FactorizedLinear, SharedDownLinear))
        bias = None if factored else module.bias
        dense = module.out_features * module.in_features + (module.out_features if bias is not None else 0)
        rank = module.rank if isinstance(module, (FactorizedLinear, SharedDownLinear)) else None
        modules.append(ModuleInfo(name, module.out_features, module.in_features, rank, linear_params(module), dense))
    unique = {id(p): p for p in model.parameters()}
    return ModelInfo(
        folder=str(ckpt.folder),
        total_params=sum(p.numel() for p in unique.values()),
        decoder_linear_params=sum(m.params for m in modules),
        dense_decoder_linear_params=sum(m.dense_params for m in modules),
        weights_bytes=ckpt.size_bytes,
        modules=tuple(modules),
        head_rank=model.lm_head.rank if isinstance(model.lm_head, FactorizedLinear) else None,
        tied=bool(ckpt.config.tie_word_embeddings),
    )


def format_info(info: ModelInfo, made_by: str | None = None) -> str:
    """The table `rankdown info` prints; ``made_by``: how the checkpoint was made (compress/report_line.py)."""
    lines = [
        f"model:                 {info.folder}",
        f"parameters:            {info.total_params:,}",
        f"decoder linear params: {info.decoder_linear_params:,} of {info.dense_decoder_linear_params:,} dense "
        f"({info.compression_ratio:.1%} removed)",
        f"weights on disk:       {info.weights_bytes / 2**20:.2f} MiB",
        *([] if made_by is None else [f"made by:               {made_by}"]),
        *([] if info.head_rank is None else
          [f"head:                  rank {info.head_rank}" + (" (the tied token table: lookup and head)" if info.tied else "")]),
        "",
        f"{'module':<40} {'shape':>11} {'rank':>6} {'params':>9}",
    ]
    for m in info.modules:
        rank = "dense" if m.rank is None else str(m.rank)
        lines.append(f"{m.name:<40} {f'{m.out_features}x{m.in_features}':>11} {rank:>6} {m.params:>9,}")
    lines += [f"warning: {w}" for w in info.warnings]
    return "\n".join(lines)
