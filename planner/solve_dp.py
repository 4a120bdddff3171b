"""An exact dynamic program for the time objective, for networks of any depth.

The planning problem is a one-dimensional segmentation: cut the units into
contiguous blocks, give each block a batch size. When every unit has a
*lightest* aux option (one that is no larger and no slower than each of its
other options at every batch size the problem allows: static bytes, and the
affine dynamic bytes and step time at the smallest and the largest batch),
that option is the fastest choice in every block at every batch size, so
the least-time plan uses it everywhere
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
    block_allowed,
    block_peak_bytes,
    block_sources,
    block_steps,
    cache_bytes,
    plan_time_s,
)

__all__ = ["solve_dp", "lightest_options"]


def _le_on(a: AuxOption, b: AuxOption, batches: tuple[int, int]) -> bool:
    """``a`` <= ``b`` at every batch in ``batches[0]..batches[1]``: their
    dynamic bytes and step times are affine in the batch, so at both ends."""
    return a.static_bytes <= b.static_bytes and all(
        a.dyn_bytes(n) <= b.dyn_bytes(n) and a.step_s(n) <= b.step_s(n) for n in batches
    )


def lightest_options(p: Problem) -> tuple[int, ...] | None:
    """Per unit, the option that is <= every other at every batch size the
    problem allows, or None. (Term by term would be stricter than needed: a
    narrower head whose peak falls in another phase of the step trades
    per-sample bytes for fixed ones, and is still the lighter one at every
    allowed batch.)"""
    ends = (min(p.batch_sizes), max(p.batch_sizes))
    out = []
    for u in p.units:
        found = next((i for i, o in enumerate(u.options) if all(_le_on(o, other, ends) for other in u.options)), None)
        if found is None:
            return None
        out.append(found)
    return tuple(out)


#: A DP state (s, c, kind, j): units 0..s-1 are covered by j blocks (j = 0
#: when max_blocks is unset: the count does not matter), the next block
#: reading unit c-1's cache of ``kind`` (c = s) or recomputing units c..s-1
#: from it (c = 0, kind None: from the dataset).
_State = tuple[int, int, "str | None", int]


def solve_dp(p: Problem, *, tie_tolerance: float = 0.0) -> Solution | None:
    """The least-time plan with every unit's lightest head, then (when
    ``tie_tolerance`` > 0) heads widened greedily within that share of extra
    time. The default 0 gives the least-time plan alone; the planner passes
    its accuracy rule (``PlanConfig``'s ``tie_tolerance``, by default
    ``solve_cpsat.DEFAULT_TIE_TOLERANCE``). None when some unit has no
    lightest option."""
    t0 = time.perf_counter()
    base = lightest_options(p)
    if base is None:
        return None
    best, back, at = _shortest_paths(p, _Tables(p, base))
    finals = sorted(((best[st], st[3], str(st[2]), st[1]), st) for st in at[p.n])
    if not finals:
        why = (
            "no split into blocks fits the memory budget (every boundary may recompute, so the cache budgets "
            "are not the limit)"
            if "recompute" in p.boundaries
            else "no split into blocks fits the memory and cache budgets"
        )
        return Solution(status="infeasible", wall_time_s=time.perf_counter() - t0, message=why)
    blocks = _blocks_to(p, finals[0][-1], back)
    options = list(base)
    optimum = plan_time_s(p, blocks, options)
    widened = _widen(p, blocks, options, limit=optimum * (1 + tie_tolerance)) if tie_tolerance > 0 else False
    return Solution(
        status="optimal",
        widths_status="feasible" if widened else "skipped",
        blocks=tuple(blocks),
        options=tuple(options),
        time_s=plan_time_s(p, blocks, options),
        lower_bound_s=optimum,
        wall_time_s=time.perf_counter() - t0,
        stats={"dp_optimum_s": optimum, "dp_states": float(len(best))},
    )


#: How a state was reached: the previous state, the block's end, its batch index and its boundary.
_Back = tuple[_State, int, int, str]


def _shortest_paths(p: Problem, table: _Tables) -> tuple[dict[_State, float], dict[_State, _Back], list[list[_State]]]:
    """``best[state]``: the least time reaching each state; ``back[state]``:
    the state, block end, batch index and boundary it was reached by;
    ``at[s]``: the states at position s, in the order found."""
    n, B = p.n, p.max_blocks or 1
    counted = p.max_blocks is not None
    best: dict[_State, float] = {(0, 0, None, 0): 0.0}
    back: dict[_State, _Back] = {}
    at: list[list[_State]] = [[] for _ in range(n + 1)]
    at[0].append((0, 0, None, 0))
    for s in range(n):
        for state in at[s]:
            _, c, kind, j = state
            if counted and j >= B:
                continue
            here = best[state]
            for e in range(s, min(n, s + table.max_len)):
                if table.static[s][e] > p.cap_bytes:
                    break  # static memory only grows with the block
                if not block_allowed(p, s, e):
                    continue
                k = table.best_batch(s, e, c)
                if k is None:
                    continue
                train = table.train[s][e][k] + table.recompute_s(c, s, k)
                src_ram = table.cache[c - 1] if kind == "ram" and c > 0 else 0
                src_disk = table.cache[c - 1] if kind == "disk" and c > 0 else 0
                for out in p.boundaries if e < n - 1 else (None,):
                    if (
                        src_ram + (table.cache[e] if out == "ram" else 0) > p.cache_budget_bytes
                        or src_disk + (table.cache[e] if out == "disk" else 0) > p.disk_budget_bytes
                    ):
                        continue
                    cost = train + table.pass_s(c, e, out)
                    nxt = (e + 1, c, kind, j + counted) if out == "recompute" else (e + 1, e + 1, out, j + counted)
                    if nxt not in best:
                        at[nxt[0]].append(nxt)
                    if here + cost < best.get(nxt, math.inf):
                        best[nxt] = here + cost
                        back[nxt] = (state, e, k, out or "ram")
    return best, back, at


def _blocks_to(p: Problem, state: _State, back: dict[_State, _Back]) -> list[BlockChoice]:
    """The blocks of the path that reached ``state``, in order."""
    blocks: list[BlockChoice] = []
    while state[0] > 0:
        prev, e, k, out = back[state]
        blocks.append(BlockChoice(start=prev[0], end=e, batch_size=p.batch_sizes[k], boundary=out))  # type: ignore[arg-type]
        state = prev
    blocks.reverse()
    return blocks


class _Tables:
    """Running sums over blocks s..e at every batch (lightest heads), and the
    recomputed prefixes' memory, computed once."""

    def __init__(self, p: Problem, base: tuple[int, ...]) -> None:
        self.p = p
        n, K = p.n, len(p.batch_sizes)
        opt = [p.units[u].options[base[u]] for u in range(n)]
        steps = self.steps = [block_steps(p, b) for b in p.batch_sizes]
        self.max_len = p.max_block_units or n
        self.static = [[0] * n for _ in range(n)]
        self.dyn = [[[0] * K for _ in range(n)] for _ in range(n)]
        self.train = [[[0.0] * K for _ in range(n)] for _ in range(n)]
        for s in range(n):
            static, dyn, train = 0, [0] * K, [0.0] * K
            for e in range(s, min(n, s + self.max_len)):
                static += opt[e].static_bytes
                for k, b in enumerate(p.batch_sizes):
                    dyn[k] = max(dyn[k], opt[e].dyn_bytes(b))
                    train[k] += steps[k] * opt[e].step_s(b)
                self.static[s][e], self.dyn[s][e], self.train[s][e] = static, dyn.copy(), train.copy()
        self._prefix: dict[tuple[int, int], tuple[int, list[int]]] = {}
        # Prefix sums, so that a block's pass and a prefix's recompute cost O(1):
        # F[i] = sum of fwd_per_sample over units < i, X[i] the same of fwd_fixed.
        self.F, self.X = [0.0], [0.0]
        for u in p.units:
            self.F.append(self.F[-1] + u.fwd_per_sample_s)
            self.X.append(self.X[-1] + u.fwd_fixed_s)
        self.cache = [cache_bytes(p, e) for e in range(n)]

    def recompute_s(self, c: int, s: int, k: int) -> float:
        """``recompute_time_s`` from the prefix sums."""
        if c >= s:
            return 0.0
        p = self.p
        return p.epochs * p.train_size * (self.F[s] - self.F[c]) + self.steps[k] * (self.X[s] - self.X[c])

    def pass_s(self, c: int, e: int, out: str | None) -> float:
        """``pass_time_s`` from the prefix sums: units c..e forward over val,
        and over train with the cache write when ``out`` caches."""
        p = self.p
        fwd = self.F[e + 1] - self.F[c]
        if out is None or out == "recompute":
            return p.val_size * fwd
        bandwidth = p.disk_bytes_per_s if out == "disk" else p.cache_bytes_per_s
        return (p.train_size + p.val_size) * fwd + self.cache[e] / bandwidth

    def prefix(self, c: int, s: int) -> tuple[int, list[int]]:
        """Weights of units c..s-1 and their largest inference peak per batch."""
        key = (c, s)
        if key not in self._prefix:
            units = self.p.units[c:s]
            self._prefix[key] = (
                sum(u.infer_static_bytes for u in units),
                [max((u.infer_bytes(b) for u in units), default=0) for b in self.p.batch_sizes],
            )
        return self._prefix[key]

    def best_batch(self, s: int, e: int, c: int) -> int | None:
        """The fastest batch at which block s..e fits, recomputing units
        c..s-1 (ties: the larger batch)."""
        p = self.p
        cap, static, dyn, train = p.cap_bytes, self.static[s][e], self.dyn[s][e], self.train[s][e]
        pstatic, pinfer = self.prefix(c, s) if c < s else (0, None)
        fits = [
            k
            for k in range(len(dyn))
            if static + pstatic + (dyn[k] if pinfer is None else max(dyn[k], pinfer[k])) <= cap
        ]
        fixed = self.X[s] - self.X[c] if c < s else 0.0
        return min(fits, key=lambda k: (train[k] + self.steps[k] * fixed, -k)) if fits else None


def _widen(p: Problem, blocks: list[BlockChoice], options: list[int], *, limit: float) -> bool:
    """Greedy second phase: widen heads one step at a time (the cheapest
    extra time first) while every block fits and the total stays within
    ``limit``."""
    src_of = dict(zip((b.start for b in blocks), block_sources(blocks)))
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
            if block_peak_bytes(p, b.start, b.end, b.batch_size, trial, src=src_of[b.start]) > p.cap_bytes:
                continue
            extra = block_steps(p, b.batch_size) * (
                p.units[u].options[trial[u]].step_s(b.batch_size) - p.units[u].options[options[u]].step_s(b.batch_size)
            )
            if total + extra <= limit:
                moves.append((extra, u))
        if not moves:
            return changed
        extra, u = min(moves)
        options[u] -= 1
        total += extra
        changed = True
