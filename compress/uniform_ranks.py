"""Uniform ranks: every compressible unit keeps the same share of its parameters, within the
budget; the factors are built by the streaming pass, one layer at a time."""

from __future__ import annotations

from rankdown.compress.rank_allocation import allocate
from rankdown.compress.rank_job import RankJob, RankOutcome
from rankdown.compress.streaming import compress_streaming


def choose(job: RankJob) -> RankOutcome:
    ranks = allocate(job.units, job.cfg.ratio)
    model, loss = compress_streaming(job.ckpt, job.method, job.units, ranks, job.windows, job.writer, job.progress, job.workers,
                                     correct_carried=job.cfg.correct_carried, bf16=job.bf16_forwards)
    return RankOutcome(model, ranks, loss)
