"""An exact dynamic program for the time objective, for networks of any depth.

The planning problem is a one-dimensional segmentation: cut the units into
contiguous blocks, give each block a batch size. When every unit has a
*lightest* aux option (one that is no larger and no slower than each of its
other options, in all five profile terms), that option is the fastest choice
in every block at every batch size, so the least-time plan uses it everywhere
and the problem is a shortest path over block boundaries:

    best[e] = min over s <= e, batch k of  best[s-1] + time(s..e at k)
              where (s..e, k) fits memory, its caches and the block length

computed in O(units x max block length x batch sizes) with running sums, and
with a block count when ``max_blocks`` is set. This is exact for the time
objective (``status = "optimal"``); profiled models satisfy the condition
(a narrower head has fewer FLOPs, parameters and activations).

The accuracy rule's second phase (widest heads with time within the
tolerance) is then a greedy widening, not proven (``widths_status =
"feasible"``); CP-SAT proves it on networks small enough for its model.

Returns None when some unit has no lightest option: then use CP-SAT.
"""

from __future__ import annotations

import math
import time

from neuroflux.planner.problem import (
    AuxOption,
    BlockChoice,
    Problem,
    Solution,
    pass_time_s,
    block_allowed,
    block_peak_bytes,
    block_steps,
    plan_time_s,
)

__all__ = ["solve_dp", "lightest_options"]


def _le(a: AuxOption, b: AuxOption) -> bool:
    return (a.static_bytes <= b.static_bytes and a.dyn_fixed_bytes <= b.dyn_fixed_bytes
            and a.dyn_per_sample_bytes <= b.dyn_per_sample_bytes and a.step_fixed_s <= b.step_fixed_s
            and a.step_per_sample_s <= b.step_per_sample_s)


def lightest_options(p: Problem) -> tuple[int, ...] | None:
    """Per unit, the option that is <= every other in every term, or None."""
    out = []
    for u in p.units:
        found = next((i for i, o in enumerate(u.options) if all(_le(o, other) for other in u.options)), None)
        if found is None:
            return None
        out.append(found)
    return tuple(out)


def solve_dp(p: Problem, *, tie_tolerance: float = 0.0) -> Solution | None:
    t0 = time.perf_counter()
    base = lightest_options(p)
    if base is None:
        return None
    n, K = p.n, len(p.batch_sizes)
    opt = [p.units[u].options[base[u]] for u in range(n)]
    steps = [block_steps(p, b) for b in p.batch_sizes]
    max_len = p.max_block_units or n
    B = p.max_blocks or n
    INF = math.inf
    # best[j][e+1]: least time covering units 0..e with j blocks; choice for backtracking.
    best = [[INF] * (n + 1) for _ in range(B + 1)]
    choice: list[list[tuple[int, int] | None]] = [[None] * (n + 1) for _ in range(B + 1)]
    best[0][0] = 0.0
    for s in range(n):
        reach = [j for j in range(B) if best[j][s] < INF]
        if not reach:
            continue
        static = 0
        max_dyn = [0] * K
        train = [0.0] * K
        for e in range(s, min(n, s + max_len)):
            o = opt[e]
            static += o.static_bytes
            for k, b in enumerate(p.batch_sizes):
                max_dyn[k] = max(max_dyn[k], o.dyn_bytes(b))
                train[k] += steps[k] * o.step_s(b)
            if static > p.cap_bytes:
                break  # static memory only grows with the block
            if not block_allowed(p, s, e):
                continue
            fits = [k for k in range(K) if static + max_dyn[k] <= p.cap_bytes]
            if not fits:
                continue
            k = min(fits, key=lambda kk: (train[kk], -kk))
            cost = train[k] + pass_time_s(p, s, e)
            for j in reach:
                if best[j][s] + cost < best[j + 1][e + 1]:
                    best[j + 1][e + 1] = best[j][s] + cost
                    choice[j + 1][e + 1] = (s, k)
    j_best = min(range(1, B + 1), key=lambda j: best[j][n])
    if best[j_best][n] == INF:
        return Solution(status="infeasible", wall_time_s=time.perf_counter() - t0,
                        message="no split into blocks fits the memory and cache budgets")
    blocks, e, j = [], n, j_best
    while e > 0:
        s, k = choice[j][e]  # type: ignore[misc]
        blocks.append(BlockChoice(start=s, end=e - 1, batch_size=p.batch_sizes[k]))
        e, j = s, j - 1
    blocks.reverse()
    options = list(base)
    optimum = plan_time_s(p, blocks, options)
    widened = _widen(p, blocks, options, limit=optimum * (1 + tie_tolerance)) if tie_tolerance > 0 else False
    return Solution(status="optimal", widths_status="feasible" if widened else "skipped", blocks=tuple(blocks),
                    options=tuple(options), time_s=plan_time_s(p, blocks, options), lower_bound_s=optimum,
                    wall_time_s=time.perf_counter() - t0, stats={"dp_optimum_s": optimum})


def _widen(p: Problem, blocks: list[BlockChoice], options: list[int], *, limit: float) -> bool:
    """Greedy second phase: widen heads one step at a time (the cheapest
    extra time first) while every block fits and the total stays within
    ``limit``."""
    block_of = {u: b for b in blocks for u in range(b.start, b.end + 1)}
    total = plan_time_s(p, blocks, options)
    changed = False
    while True:
        moves = []
        for u in range(p.n):
            if options[u] == 0:
                continue
            b = block_of[u]
            trial = options.copy()
            trial[u] -= 1
            if block_peak_bytes(p, b.start, b.end, b.batch_size, trial) > p.cap_bytes:
                continue
            extra = block_steps(p, b.batch_size) * (p.units[u].options[trial[u]].step_s(b.batch_size)
                                                    - p.units[u].options[options[u]].step_s(b.batch_size))
            if total + extra <= limit:
                moves.append((extra, u))
        if not moves:
            return changed
        extra, u = min(moves)
        options[u] -= 1
        total += extra
        changed = True
