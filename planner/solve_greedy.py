"""``--strategy greedy``: a heuristic in the spirit of the NeuroFlux paper.

The paper's exact rules are not public in any source we could reach; this is
our reconstruction, described in the README:

1. aux heads: each unit takes the widest of C, C/2, C/4, ... that lets the
   unit alone fit at the smallest batch size;
2. blocks: walk the units in order and keep adding a unit to the current block
   while its per-sample memory is within ``group_factor`` of the block's first
   unit's and the block still fits at the smallest batch;
3. boundaries: each takes the first of a RAM cache, a disk cache and
   recompute that fits the host budgets (the paper caches everything);
4. batch: each block takes the largest candidate batch size that fits.
"""

from __future__ import annotations

import time

from neuroflux.planner.problem import (
    BlockChoice,
    Problem,
    Solution,
    block_allowed,
    block_peak_bytes,
    host_ok,
    plan_time_s,
)

__all__ = ["solve_greedy"]


def solve_greedy(p: Problem, *, group_factor: float = 2.0) -> Solution:
    t0 = time.perf_counter()
    b_min = p.batch_sizes[0]
    options: list[int] = []
    for u in p.units:
        fits = [i for i, o in enumerate(u.options) if o.static_bytes + o.dyn_bytes(b_min) <= p.cap_bytes]
        if not fits:
            return Solution(
                status="infeasible",
                wall_time_s=time.perf_counter() - t0,
                message=f"unit {u.name} alone does not fit at batch {b_min} with any aux head",
            )
        options.append(fits[0])

    spans = _group(p, options, group_factor=group_factor)
    blocks: list[BlockChoice] = []
    src, src_kind = 0, None
    for s, e in spans:
        kind = next((k for k in p.boundaries if k == "recompute" or host_ok(p, src, src_kind, e, k)), None)
        if kind is None or not host_ok(p, src, src_kind, e, None):
            return Solution(
                status="infeasible",
                wall_time_s=time.perf_counter() - t0,
                message=f"the caches around units {s}..{e} exceed the host budgets; allow recompute",
            )
        fitting = [b for b in p.batch_sizes if block_peak_bytes(p, s, e, b, options, src=src) <= p.cap_bytes]
        if not fitting or not block_allowed(p, s, e):
            return Solution(
                status="infeasible",
                wall_time_s=time.perf_counter() - t0,
                message=f"greedy grouping left units {s}..{e} in a block that does not fit; try --strategy optimal",
            )
        blocks.append(BlockChoice(start=s, end=e, batch_size=fitting[-1], boundary=kind))
        if kind != "recompute":
            src, src_kind = e + 1, kind
    t = plan_time_s(p, blocks, options)
    return Solution(
        status="feasible",
        blocks=tuple(blocks),
        options=tuple(options),
        time_s=t,
        lower_bound_s=0.0,
        wall_time_s=time.perf_counter() - t0,
    )


def _group(p: Problem, options: list[int], *, group_factor: float) -> list[tuple[int, int]]:
    """The paper's grouping: consecutive units whose activations per sample
    are within ``group_factor`` of each other share a block while it fits at
    the smallest batch; then, over ``max_blocks``, the pair with the smallest
    merged peak merges."""
    b_min = p.batch_sizes[0]

    def per_sample(u: int) -> int:
        return p.units[u].options[options[u]].dyn_per_sample_bytes

    spans: list[tuple[int, int]] = []
    start = 0
    for u in range(1, p.n + 1):
        if u < p.n and (p.max_block_units is None or u - start < p.max_block_units):
            similar = max(per_sample(u), per_sample(start)) <= group_factor * max(
                1, min(per_sample(u), per_sample(start))
            )
            fits = block_peak_bytes(p, start, u, b_min, options) <= p.cap_bytes
            if similar and fits:
                continue
        spans.append((start, u - 1))
        start = u
    if p.max_blocks is not None:
        while len(spans) > p.max_blocks:  # merge the pair with the smallest merged peak
            merged = [
                (block_peak_bytes(p, spans[i][0], spans[i + 1][1], b_min, options), i) for i in range(len(spans) - 1)
            ]
            _, i = min(merged)
            spans[i : i + 2] = [(spans[i][0], spans[i + 1][1])]
    return spans
