"""Factor pairs: a dense ``nn.Linear`` W (m x n) replaced by ``up(down(x))`` of rank r.

Both halves are plain ``nn.Linear`` modules so that every exporter sees two matmuls.
The child names ``down`` and ``up`` are part of the checkpoint format (tensor names in the
safetensors file): renaming them breaks every saved checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn


class FactorizedLinear(nn.Module):
    """y = up(down(x)): ``down`` is r x n without bias, ``up`` is m x r with an optional bias."""

    down: nn.Linear
    up: nn.Linear

    def __init__(self, down: nn.Linear, up: nn.Linear):
        super().__init__()
        if down.out_features != up.in_features:
            raise ValueError(f"factor ranks disagree: down has {down.out_features}, up has {up.in_features}")
        if down.bias is not None:
            raise ValueError("the down factor carries no bias; fold it into up's")
        self.down = down
        self.up = up

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> FactorizedLinear:
        """Build from A (r x n) and B (m x r) so that W ~ B A."""
        rank, n = a.shape
        m = b.shape[0]
        down = nn.Linear(n, rank, bias=False, dtype=a.dtype, device=a.device)
        up = nn.Linear(rank, m, bias=bias is not None, dtype=b.dtype, device=b.device)
        with torch.no_grad():
            down.weight.copy_(a)
            up.weight.copy_(b)
            if bias is not None:
                up.bias.copy_(bias)
        return cls(down, up)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        """The pair's bias is ``up``'s (what an exporter reads as the linear's bias)."""
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class SharedDownLinear(nn.Module):
    """One member of a group of linears that read the same input through one shared ``down``.

    The first member of a group owns ``down`` (registered, so it is saved once under that
    member's name); the others hold a reference that is deliberately not registered, so the
    shared weight exists once in the state dict and in every exported graph.
    """

    down: nn.Linear
    up: nn.Linear
    _shared_down: nn.Linear

    def __init__(self, down: nn.Linear, up: nn.Linear, owner: bool):
        super().__init__()
        if down.out_features != up.in_features:
            raise ValueError(f"factor ranks disagree: down has {down.out_features}, up has {up.in_features}")
        self.up = up
        self.owns_down = owner
        if owner:
            self.down = down
        else:
            object.__setattr__(self, "_shared_down", down)

    @property
    def shared_down(self) -> nn.Linear:
        return self.down if self.owns_down else self._shared_down

    @property
    def in_features(self) -> int:
        return self.shared_down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.shared_down.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        """The member's bias is its ``up``'s."""
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.shared_down(x))


def shared_down_group(a: torch.Tensor, bs: list[torch.Tensor], biases: list[torch.Tensor | None]) -> list[SharedDownLinear]:
    """Members for W_j ~ B_j A with one shared A (k x n): the first member owns ``down``."""
    rank, n = a.shape
    down = nn.Linear(n, rank, bias=False, dtype=a.dtype, device=a.device)
    with torch.no_grad():
        down.weight.copy_(a)
    members = []
    for i, (b, bias) in enumerate(zip(bs, biases)):
        up = nn.Linear(rank, b.shape[0], bias=bias is not None, dtype=b.dtype, device=b.device)
        with torch.no_grad():
            up.weight.copy_(b)
            if bias is not None:
                up.bias.copy_(bias)
        members.append(SharedDownLinear(down, up, owner=(i == 0)))
    return members


class FactoredEmbedding(nn.Module):
    """A token table of rank r: ``proj(table(ids))``, ``table`` V x r and ``proj`` r -> H.

    The embedding half of a factored tied head (``lm_head`` = ``up(down(h))`` with ``up`` reading
    the same V x r table, ``down`` holding ``proj``'s transpose): W ~ B A serves both the lookup
    (row t of B, times A) and the head (h A^T B^T), so the large V x r factor is stored once. The
    child names are part of the checkpoint format."""

    table: nn.Embedding
    proj: nn.Linear

    def __init__(self, table: nn.Embedding, proj: nn.Linear):
        super().__init__()
        if table.embedding_dim != proj.in_features:
            raise ValueError(f"factor ranks disagree: table has {table.embedding_dim}, proj reads {proj.in_features}")
        self.table = table
        self.proj = proj

    @property
    def rank(self) -> int:
        return self.table.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.table(ids))


def factored_embedding(head: FactorizedLinear) -> FactoredEmbedding:
    """The token lookup that shares a factored tied head's V x r table (one Parameter) and holds
    its r x H ``down`` transposed (a copy: H x r entries, small beside the table)."""
    down, up = head.down.weight, head.up.weight
    table = nn.Embedding(up.shape[0], up.shape[1], dtype=up.dtype, device=up.device)
    table.weight = up
    proj = nn.Linear(down.shape[0], down.shape[1], bias=False, dtype=down.dtype, device=down.device)
    if down.device.type != "meta":
        with torch.no_grad():
            proj.weight.copy_(down.T)
    return FactoredEmbedding(table, proj)


def linear_params(module: nn.Module) -> int:
    """Weight and bias entries of a dense or factorized linear (a shared down counted at its owner)."""
    if isinstance(module, nn.Linear):
        return module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    if isinstance(module, FactorizedLinear):
        return linear_params(module.down) + linear_params(module.up)
    if isinstance(module, SharedDownLinear):
        return (linear_params(module.down) if module.owns_down else 0) + linear_params(module.up)
    raise TypeError(f"not a linear: {type(module).__name__}")
