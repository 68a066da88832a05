"""The output head as a factor pair W ~ B A fitted to the task; a tied table (embedding and head) as one.

SmolLM2's 49,152 x 576 table is a third of what a 40%-compressed model reads per token, and no
decoder rank touches it. Plain SVD of the table destroys a task model (compare exact match 100%
-> 0% at rank 384, README, `--head-rank` in the compress reference), because the rows and directions that matter are few: the
task's text uses few tokens, and the head reads a final hidden state that lives in a narrow
subspace. So the fit is weighted on both sides, feature-aware as ``feature`` weights a decoder
linear: rows by how often the calibration text holds the token (plus one, so that no row is
dropped outright), columns by the second moment C of the final norm's output on the same text.
With D the row weights, the SVD of D^1/2 W C^1/2 gives the rank-r optimum of
||D^1/2 (W - B A) C^1/2||_F: B = D^-1/2 U_r S_r^1/2, A = S_r^1/2 V_r^T C^-1/2.

The projection is oblique: a token the calibration text never holds keeps only what the task's
directions carry of its row, so its lookup can be worse than plain SVD's (code perplexity below).
The held-back loss the report gives is on the task's text, which cannot show that.

The head becomes ``up(down(h))`` (``up`` = B, ``down`` = A). A tied table's lookup becomes
``proj(table(t))`` (``table`` = B, the same Parameter; ``proj`` = A^T), so B is stored once, as the
dense table was; an untied model's lookup is left as it is (it costs no arithmetic per token).
"""

from __future__ import annotations

import time

import torch
from transformers import LlamaForCausalLM

from rankdown.compress.calibration import held_back
from rankdown.compress.config import HeadReport
from rankdown.compress.training_data import mean_loss
from rankdown.compress.units import BATCH
from rankdown.errors import RankdownError
from rankdown.factor import FactorizedLinear
from rankdown.factor_record import tie_factored_table

MIN_WINDOWS = 4  # two fitted, two held back
HEAD_WINDOWS = 160  # calibration windows read (the last quarter held back): the fit is H x H and V counts
EIGEN_FLOOR = 1e-8  # C's eigenvalues below this fraction of the largest are floored (C^-1/2 stays finite)
CHUNK = 8192  # table rows per float64 step


def check_head_rank(config, rank: int) -> None:
    """A rank that saves parameters: for a tied table B once and A twice, else the head's pair."""
    vocab, hidden = config.vocab_size, config.hidden_size
    limit = vocab * hidden // (vocab + (2 if config.tie_word_embeddings else 1) * hidden)
    if not 1 <= rank < limit:
        what = "tied token table" if config.tie_word_embeddings else "head"
        raise RankdownError(f"--head-rank {rank} saves nothing on a {vocab} x {hidden} {what} (give 1..{limit - 1}, "
                           "or dense)")


@torch.no_grad()
def _statistics(model: LlamaForCausalLM, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[h h^T] of the final norm's output, float64; each token's count in ``windows``)."""
    hidden = model.config.hidden_size
    second = torch.zeros(hidden, hidden, dtype=torch.float64)
    count = 0

    def take(_module, _inputs, output):
        nonlocal second, count
        flat = output.detach().reshape(-1, hidden).double()
        second += flat.T @ flat
        count += flat.shape[0]

    hook = model.model.norm.register_forward_hook(take)
    try:
        for i in range(0, windows.shape[0], BATCH):
            model.model(input_ids=windows[i:i + BATCH])
    finally:
        hook.remove()
    frequency = torch.bincount(windows.reshape(-1), minlength=model.config.vocab_size).double()
    return second / max(count, 1), frequency


def weighted_factors(table: torch.Tensor, second: torch.Tensor, frequency: torch.Tensor,
                     rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A r x H, B V x r) minimizing ||D^1/2 (W - B A) C^1/2||_F (module docstring), float64.

    From the H x H Gram matrix G = C^1/2 W^T D W C^1/2 = V S^2 V^T, never a V x H SVD: with
    M = D^1/2 W C^1/2, the best rank-r M_r = M V_r V_r^T, so B A = W C^1/2 V_r V_r^T C^-1/2 with
    A = S_r^1/2 V_r^T C^-1/2 and B = W C^1/2 V_r S_r^-1/2. W is read ``CHUNK`` rows at a time in
    float64, so a 128k-vocabulary table costs its own size once more (B), not five float64 copies."""
    hidden = table.shape[1]
    eigenvalues, vectors = torch.linalg.eigh((second + second.T) / 2)
    eigenvalues = eigenvalues.clamp_min(float(eigenvalues.max()) * EIGEN_FLOOR)
    root = (vectors * eigenvalues.sqrt()) @ vectors.T
    inverse_root = (vectors / eigenvalues.sqrt()) @ vectors.T
    gram = torch.zeros(hidden, hidden, dtype=torch.float64)
    for start in range(0, table.shape[0], CHUNK):
        rows = table[start:start + CHUNK].double() @ root
        gram += rows.T @ ((frequency[start:start + CHUNK] + 1)[:, None] * rows)
    squares, right = torch.linalg.eigh((gram + gram.T) / 2)
    squares, right = squares.flip(0)[:rank], right.flip(1)[:, :rank]
    half = squares.clamp_min(float(squares[0]) * 1e-24 if float(squares[0]) > 0 else 1.0) ** 0.25  # S_r^1/2
    a = (half[:, None] * right.T) @ inverse_root
    to_b = root @ right / half[None, :]
    b = torch.cat([table[start:start + CHUNK].double() @ to_b for start in range(0, table.shape[0], CHUNK)])
    return a, b


def head_memory(config) -> int:
    """Bytes the head step adds beyond the model read back: B in float64 and one float64 chunk."""
    return 8 * config.vocab_size * config.hidden_size + 8 * 2 * CHUNK * config.hidden_size


def factor_head(model: LlamaForCausalLM, windows: torch.Tensor, rank: int) -> HeadReport:
    """Replace ``model``'s head (a tied table: lookup and head) by its rank-``rank`` factor pair, in
    place (module docstring).
    Fitted on all but the held-back windows, judged on those."""
    start = time.perf_counter()
    check_head_rank(model.config, rank)
    fit, held = held_back(windows, MIN_WINDOWS, "--head-rank")
    loss_before = mean_loss(model, held)
    second, frequency = _statistics(model, fit)
    tied = bool(model.config.tie_word_embeddings)
    table = model.lm_head.weight
    a, b = weighted_factors(table.detach(), second, frequency, rank)
    dtype = table.dtype
    before = table.numel()
    model.lm_head = FactorizedLinear.from_factors(a.to(dtype), b.to(dtype))
    if tied:
        tie_factored_table(model)
    loss_after = mean_loss(model, held)
    # Tied, A is stored twice (the head's ``down`` and the lookup's ``proj``), H x r entries each.
    return HeadReport(rank=rank, params_before=before, params_after=(2 if tied else 1) * a.numel() + b.numel(),
                      calibration_windows=fit.shape[0], held_back_windows=held.shape[0],
                      distinct_tokens=int((frequency > 0).sum()), loss_before=round(loss_before, 5),
                      loss_after=round(loss_after, 5), seconds=round(time.perf_counter() - start, 2))
