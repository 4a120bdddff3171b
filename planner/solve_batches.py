"""The batch rule: more optimizer steps where they cost little time.

The solver picks each block's batch for the least predicted time, so every
block takes the largest batch that pays. Local learning at a few epochs is
step-bound: a block at batch 96 takes a third of the optimizer steps it
would at 32, and on a CPU, where a step's fixed cost is small, the larger
batch saves little time (kuangliu's ShuffleNetV2 on this project's 2-core
machine: batch 32 instead of 96 was 2 points more accurate, and no slower).

``prefer_small_batches`` keeps the solved partition, boundaries and heads
and gives every block the smallest candidate batch whose predicted time
(``problem.block_time_s``: steps, recompute, the pass after training) is at
most ``1 + tolerance`` times the block's solved time. A smaller batch never
needs more memory (a unit's dynamic bytes grow with the batch), and the
caches do not depend on it; the memory check is kept anyway, so the result
always satisfies ``check_solution``. Pure Python: no torch here.
"""

from __future__ import annotations

import dataclasses

from neuroflux.planner.problem import (
    BlockChoice,
    Problem,
    Solution,
    block_peak_bytes,
    block_sources,
    block_time_s,
    plan_time_s,
)

__all__ = ["prefer_small_batches"]


def prefer_small_batches(p: Problem, s: Solution, tolerance: float) -> Solution:
    """``s`` with each block at the smallest batch within ``tolerance`` of
    its solved time (``tolerance`` 0, or a solution without blocks: ``s``)."""
    if tolerance <= 0 or not s.blocks:
        return s
    srcs = block_sources(s.blocks)
    blocks = [_smallest_batch(p, b, s.options, src=src, tolerance=tolerance) for b, src in zip(s.blocks, srcs)]
    if blocks == list(s.blocks):
        return s
    return dataclasses.replace(s, blocks=tuple(blocks), time_s=plan_time_s(p, blocks, s.options))


def _smallest_batch(p: Problem, b: BlockChoice, options: tuple[int, ...], *, src: int, tolerance: float) -> BlockChoice:
    """Block ``b`` at the smallest candidate batch within ``tolerance`` of its time that fits the device."""

    def time_at(batch: int) -> float:
        return block_time_s(p, b.start, b.end, batch, options, src=src, boundary=b.boundary)

    limit = time_at(b.batch_size) * (1 + tolerance)
    for batch in sorted(c for c in p.batch_sizes if c < b.batch_size):
        fits = block_peak_bytes(p, b.start, b.end, batch, options, src=src) <= p.cap_bytes
        if fits and time_at(batch) <= limit:
            return dataclasses.replace(b, batch_size=batch)
    return b
