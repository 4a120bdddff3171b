"""Exact brute-force reference for small planning problems (test oracle).

Enumerates every contiguous partition, every aux option per unit and every
allowed boundary kind; given those, each block independently takes its
fastest fitting batch size.
"""

from __future__ import annotations

import itertools

from neuroflux.planner.problem import (
    BlockChoice,
    Problem,
    block_allowed,
    block_peak_bytes,
    block_sources,
    block_time_s,
    host_ok,
    source_kind,
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
            for kinds in itertools.product(p.boundaries, repeat=len(spans) - 1):
                found = _evaluate(p, spans, (*kinds, "ram"), options)
                if found is not None and (best is None or found[0] < best[0]):
                    best = (found[0], found[1], tuple(options))
    return best


def _evaluate(p: Problem, spans, kinds, options):
    shells = [BlockChoice(start=s, end=e, batch_size=p.batch_sizes[0], boundary=k) for (s, e), k in zip(spans, kinds)]
    srcs = block_sources(shells)
    total, blocks = 0.0, []
    for (s, e), kind, src in zip(spans, kinds, srcs):
        if not block_allowed(p, s, e) or not host_ok(p, src, source_kind(shells, src), e, kind):
            return None
        cands = [
            (block_time_s(p, s, e, b, options, src=src, boundary=kind), b)
            for b in p.batch_sizes
            if block_peak_bytes(p, s, e, b, options, src=src) <= p.cap_bytes
        ]
        if not cands:
            return None
        t, b = min(cands)
        total += t
        blocks.append(BlockChoice(start=s, end=e, batch_size=b, boundary=kind))
    return total, tuple(blocks)
