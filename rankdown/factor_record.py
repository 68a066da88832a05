"""``factorization.json``: which linears of a checkpoint are factor pairs, and how.

The one place that reads and writes the record. Loading rebuilds the module tree from it
on top of the stock transformers Llama classes, so no model code ships with a checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from rankdown.errors import RankdownError
from rankdown.factor import FactoredEmbedding, FactorizedLinear, SharedDownLinear, factored_embedding
from rankdown.schema import build, read_json_file

RECORD_FILE = "factorization.json"
SCHEMA_VERSION = 1
HEAD = "lm_head"  # a factored head; with tied embeddings the token table shares its ``up``
FACTORED_TABLE = "model.embed_tokens.table"  # that shared table's module (FactoredEmbedding.table)


@dataclass(frozen=True)
class ModuleFactor:
    """One replaced linear. ``shares_down_with`` names the group member that owns ``down``."""

    rank: int
    in_features: int
    out_features: int
    bias: bool
    shares_down_with: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class FactorRecord:
    modules: dict[str, ModuleFactor] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, folder: Path) -> FactorRecord:
        """The folder's record, or an empty one for a dense checkpoint."""
        path = folder / RECORD_FILE
        if not path.exists():
            return cls()
        raw = read_json_file(path, "factorization record")
        try:
            version = raw.get("schema_version") if isinstance(raw, dict) else None
            if version != SCHEMA_VERSION:
                raise ValueError(f"schema_version {version!r} is not {SCHEMA_VERSION}")
            if "modules" not in raw:
                raise ValueError("missing keys ['modules']")
            modules = build(cls, raw, "factorization").modules
        except (ValueError, TypeError) as e:
            raise RankdownError(f"{path}: invalid factorization record: {e}") from None
        for name, spec in modules.items():
            # A shared-down group's rank is bounded by the group's stacked rows, not one member's.
            limit = spec.in_features if spec.group else min(spec.in_features, spec.out_features)
            if not 1 <= spec.rank <= limit:  # its type (int, not bool) was checked when read
                raise RankdownError(f"{path}: module {name} has rank {spec.rank!r} outside 1..{limit}")
            if name == HEAD and (spec.group is not None or spec.shares_down_with is not None):
                raise RankdownError(f"{path}: module {HEAD} must be a pair of its own (no shared down)")
            owner = spec.shares_down_with
            if owner is not None and (owner not in modules or modules[owner].shares_down_with is not None
                                      or modules[owner].group is None
                                      or modules[owner].rank != spec.rank
                                      or modules[owner].in_features != spec.in_features):
                raise RankdownError(f"{path}: module {name} shares down with {owner!r}, which is not a matching owner")
        return cls(modules)


def record_of(model: nn.Module) -> FactorRecord:
    """The record describing every factor pair in ``model``."""
    modules: dict[str, ModuleFactor] = {}
    owners: dict[int, str] = {}
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (FactorizedLinear, SharedDownLinear))]
    for name, module in found:
        if isinstance(module, SharedDownLinear) and module.owns_down:
            owners[id(module.down)] = name
    for name, module in found:
        shares = None
        group = None
        if isinstance(module, SharedDownLinear):
            owner = owners.get(id(module.shared_down))
            if owner is None:
                raise ValueError(f"{name}: shared down has no owner in the model")
            shares = None if module.owns_down else owner
            group = owner
        modules[name] = ModuleFactor(
            rank=module.rank,
            in_features=module.in_features,
            out_features=module.out_features,
            bias=module.up.bias is not None,
            shares_down_with=shares,
            group=group,
        )
    return FactorRecord(modules)


def apply_record(model: nn.Module, record: FactorRecord, where: Path) -> None:
    """Swap each recorded ``nn.Linear`` for an empty factor pair of the recorded shape."""
    owners_first = sorted(record.modules.items(), key=lambda kv: kv[1].shares_down_with is not None)
    built: dict[str, FactorizedLinear | SharedDownLinear] = {}
    for name, spec in owners_first:
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise RankdownError(f"{where}: factorization names {name}, which the model does not have") from None
        if not isinstance(dense, nn.Linear):
            raise RankdownError(f"{where}: factorization names {name}, which is not a linear layer")
        if (dense.in_features, dense.out_features) != (spec.in_features, spec.out_features):
            raise RankdownError(
                f"{where}: {name} is {dense.out_features}x{dense.in_features} in the config "
                f"but {spec.out_features}x{spec.in_features} in the factorization"
            )
        dtype, device = dense.weight.dtype, dense.weight.device
        up = nn.Linear(spec.rank, spec.out_features, bias=spec.bias, dtype=dtype, device=device)
        if spec.group is None:
            down = nn.Linear(spec.in_features, spec.rank, bias=False, dtype=dtype, device=device)
            replacement: FactorizedLinear | SharedDownLinear = FactorizedLinear(down, up)
        elif spec.shares_down_with is None:
            down = nn.Linear(spec.in_features, spec.rank, bias=False, dtype=dtype, device=device)
            replacement = SharedDownLinear(down, up, owner=True)
        else:
            owner = built[spec.shares_down_with]
            assert isinstance(owner, SharedDownLinear), "a shared down's owner is built first (record order)"
            replacement = SharedDownLinear(owner.shared_down, up, owner=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        built[name] = replacement
    if HEAD in built and getattr(model.config, "tie_word_embeddings", False):
        if built[HEAD].bias is not None:
            raise RankdownError(f"{where}: {HEAD} is tied to the token table and carries no bias")
        tie_factored_table(model)


def tie_factored_table(model: nn.Module) -> None:
    """Give a tied model whose ``lm_head`` is a factor pair the token lookup that shares its table."""
    head = model.get_submodule(HEAD)
    if not isinstance(head, FactorizedLinear):
        raise TypeError(f"{HEAD} is not a factor pair")
    model.get_submodule("model").embed_tokens = factored_embedding(head)


def factored_table(model: nn.Module) -> FactoredEmbedding | None:
    """The model's rank-r token table when its tied head is a factor pair, else None."""
    try:
        embedding = model.get_submodule("model.embed_tokens")
    except AttributeError:  # not a causal LM (a bare stack of layers)
        return None
    return embedding if isinstance(embedding, FactoredEmbedding) else None
