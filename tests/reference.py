"""Exact brute-force reference for small planning problems (test oracle).

Enumerates every contiguous partition and every aux option per unit; given
those, each block independently takes its fastest fitting batch size.
"""

from __future__ import annotations

import itertools
import math

from neuroflux.planner.problem import (
    BlockChoice,
    Problem,
    block_allowed,
    block_peak_bytes,
    block_time_s,
)


def partitions(n: int):
    for mask in range(1 << (n - 1)):
        spans, start = [], 0
        for i in range(n - 1):
            if mask >> i & 1:
                spans.append((start, i))
                start = i + 1
        spans.append((start, n - 1))
        yield spans


def brute_force(p: Problem) -> tuple[float, tuple[BlockChoice, ...], tuple[int, ...]] | None:
    best = None
    for options in itertools.product(*[range(len(u.options)) for u in p.units]):
        for spans in partitions(p.n):
            if p.max_blocks is not None and len(spans) > p.max_blocks:
                continue
            total, blocks = 0.0, []
            for s, e in spans:
                if not block_allowed(p, s, e):
                    total = math.inf
                    break
                cands = [
                    (block_time_s(p, s, e, b, options), b)
                    for b in p.batch_sizes
                    if block_peak_bytes(p, s, e, b, options) <= p.cap_bytes
                ]
                if not cands:
                    total = math.inf
                    break
                t, b = min(cands)
                total += t
                blocks.append(BlockChoice(start=s, end=e, batch_size=b))
            if total < math.inf and (best is None or total < best[0]):
                best = (total, tuple(blocks), tuple(options))
    return best
