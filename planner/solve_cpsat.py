"""The CP-SAT model: block cuts, one batch size per block, one aux head per unit.

Built in named phases (data, variables, constraints, objective, solve,
status). Imports no torch: it sees only ``Problem``.

Variables
  seg[s,e,k]  block covering units s..e trained at batch_sizes[k]
  z[u,k,o]    unit u runs at batch k with aux option o; linked to seg by
              sum_o z[u,k,o] == sum of the chosen blocks covering u at k

Objective, lexicographic in two solves: (1) least predicted time; (2) with
time held within ``tie_tolerance`` of the optimum, the widest heads (least
sum of option ranks, option 0 being the widest), then least time among those.
Phase 2 is the accuracy rule: wide heads are the accurate ones, and time
alone would buy the narrowest.

Boundaries: this model has RAM caches only (every block's input and output
caches fit host RAM together). The planner runs it where the exact dynamic
program's least-time plan needs nothing else; plans with disk caches or
recompute boundaries come from the dynamic program (``solve_dp.py``), whose
state carries each block's source.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from neuroflux.planner.problem import (
    BlockChoice,
    Problem,
    Solution,
    WidthsStatus,
    block_allowed,
    block_steps,
    pass_time_s,
    plan_time_s,
    ram_pair_ok,
)

__all__ = ["SolverConfig", "solve_cpsat", "DEFAULT_TIE_TOLERANCE"]

_US = 1e6  # times enter the model as integer microseconds

#: The accuracy rule's default: the widest heads whose plan costs at most this
#: share more predicted time than the fastest plan (``nf-plan
#: --head-time-tolerance``, ``PlanConfig``'s ``tie_tolerance``).
DEFAULT_TIE_TOLERANCE = 0.10


@dataclass(frozen=True, kw_only=True)
class SolverConfig:
    time_limit_s: float = 30.0
    """Wall-clock limit for each of the two solves."""
    seed: int = 0
    workers: int = 8
    """CP-SAT search workers. 8 even on small machines: fewer drops the
    LP-based workers from CP-SAT's portfolio, and without their bound a
    19-unit MobileNetV2 plan cannot be proven optimal in 20 s (with 8: 2 s)."""
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE
    """Phase 2 may spend up to this share of extra time for wider heads."""
    tie_time_limit_s: float = 5.0
    """Wall-clock limit of phase 2 (a tie-break: its best-so-far is kept)."""

    def __post_init__(self) -> None:
        if self.time_limit_s <= 0:
            raise ValueError("time_limit_s must be > 0")
        if not 0 <= self.tie_tolerance < 1:
            raise ValueError("tie_tolerance must be in [0, 1)")


def solve_cpsat(
    p: Problem, config: SolverConfig = SolverConfig(), *, hint: Solution | None = None, proven: bool = False
) -> Solution:
    """Optimal all-RAM-cache plan for ``p``. ``hint`` (e.g. the dynamic
    program's plan) seeds the search.

    Phase 1 minimises predicted time; phase 2 keeps the time within
    ``tie_tolerance`` of it and widens heads (the accuracy rule). ``proven``:
    ``hint`` is a least-time plan already (the dynamic program's, without
    widening), so phase 1 takes it instead of proving it again."""
    from ortools.sat.python import cp_model  # here: importing OR-Tools costs 0.3 s, and deep networks never need it

    t0 = time.perf_counter()
    model = _build_model(p, cp_model)
    solver, status, stats = _phase_one(p, model, config, cp_model, hint=hint, proven=proven)
    n_vars, n_cons = len(model.m.proto.variables), len(model.m.proto.constraints)
    failed: dict[str, Any] = dict(wall_time_s=0.0, num_variables=n_vars, num_constraints=n_cons, stats=stats)
    if status == cp_model.INFEASIBLE or (status == cp_model.UNKNOWN and not model.seg):
        failed["wall_time_s"] = time.perf_counter() - t0
        return Solution(status="infeasible", message="no split into blocks fits the memory and cache budgets", **failed)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        failed["wall_time_s"] = time.perf_counter() - t0
        return Solution(
            status="timeout",
            message=f"CP-SAT found no plan within {config.time_limit_s}s "
            f"({solver.status_name(status)}); raise --time-limit",
            **failed,
        )
    chosen, widths_status = _widen_heads(model, solver, config, cp_model, stats)
    blocks, options = _read_plan(p, model, chosen)
    return Solution(
        status="optimal" if status == cp_model.OPTIMAL else "feasible",
        widths_status=widths_status,
        blocks=tuple(blocks),
        options=options,
        time_s=plan_time_s(p, blocks, options),
        # CP-SAT reports a negative bound when it stops before bounding (seen
        # under load at the time limit); every term of the objective is >= 0.
        lower_bound_s=max(0.0, solver.best_objective_bound / _US),
        wall_time_s=time.perf_counter() - t0,
        num_variables=n_vars,
        num_constraints=n_cons,
        stats=stats,
    )


def _phase_one(
    p: Problem, model: _Model, config: SolverConfig, cp_model: Any, *, hint: Solution | None, proven: bool
) -> tuple[Any, Any, dict[str, float]]:
    """Phase 1 (least time), hinted: (what to read the solution from, its
    status, statistics). A ``proven`` least-time hint is taken as it is."""
    values = None
    if hint is not None and hint.status in ("feasible", "optimal"):
        values = _hint_values(p, hint, model)
        for var, value in (values or {}).items():
            model.m.add_hint(var, value)
    if proven and values is not None and hint is not None and hint.status == "optimal":
        return _Assignment(values, model.costs), cp_model.OPTIMAL, {"phase1_wall_s": 0.0, "phase1_branches": 0.0}
    solver = _solver(cp_model, config, config.time_limit_s)
    status = solver.solve(model.m)
    return solver, status, {"phase1_wall_s": solver.wall_time, "phase1_branches": float(solver.num_branches)}


def _read_plan(p: Problem, model: _Model, chosen: Any) -> tuple[list[BlockChoice], tuple[int, ...]]:
    """The blocks and each unit's option in the solution ``chosen`` holds."""
    blocks = sorted(
        (
            BlockChoice(start=s, end=e, batch_size=p.batch_sizes[k])
            for (s, e, k), var in model.seg.items()
            if chosen.boolean_value(var)
        ),
        key=lambda b: b.start,
    )
    options = tuple(
        next(
            o
            for o in range(len(p.units[u].options))
            for k in range(len(p.batch_sizes))
            if chosen.boolean_value(model.z[u, k, o])
        )
        for u in range(p.n)
    )
    return blocks, options


@dataclass
class _Model:
    m: Any
    """The cp_model.CpModel."""
    seg: dict[tuple[int, int, int], Any]
    """seg[s, e, k]: block s..e at batch k is chosen."""
    z: dict[tuple[int, int, int], Any]
    """z[u, k, o]: unit u takes option o, its block running at batch k."""
    time_expr: Any
    """Predicted time in microseconds (the phase-1 objective)."""
    costs: list[tuple[Any, int]]
    """The objective's terms: (variable, microseconds when it is true)."""


def _possible_blocks(p: Problem) -> list[tuple[int, int, int]]:
    """The (s, e, k) blocks that can exist at all: RAM caches fit and, with every
    unit at its lightest head, device memory fits (a cheap prefilter; the
    exact constraint still decides)."""

    def lightest_peak(s: int, e: int, b: int) -> int:
        units = p.units[s : e + 1]
        static = sum(min(o.static_bytes for o in u.options) for u in units)
        return static + max(min(o.dyn_bytes(b) for o in u.options) for u in units)

    return [
        (s, e, k)
        for s in range(p.n)
        for e in range(s, p.n)
        if block_allowed(p, s, e) and ram_pair_ok(p, s, e)
        for k in range(len(p.batch_sizes))
        if lightest_peak(s, e, p.batch_sizes[k]) <= p.cap_bytes
    ]


def _build_model(p: Problem, cp_model) -> _Model:
    """Variables, constraints and the time objective."""
    n, K = p.n, len(p.batch_sizes)
    m = cp_model.CpModel()
    seg = {(s, e, k): m.new_bool_var(f"seg[{s},{e},{k}]") for (s, e, k) in _possible_blocks(p)}
    opts = [range(len(u.options)) for u in p.units]
    z = {(u, k, o): m.new_bool_var(f"z[{u},{k},{o}]") for u in range(n) for k in range(K) for o in opts[u]}
    # Partition: every unit is covered by exactly one chosen block.
    for u in range(n):
        m.add_exactly_one(seg[s, e, k] for (s, e, k) in seg if s <= u <= e)
    # Linking (exact, so the relaxation stays tight): unit u picks one option
    # at batch k iff its block runs at batch k.
    for u in range(n):
        for k in range(K):
            covering = [seg[s, e, kk] for (s, e, kk) in seg if kk == k and s <= u <= e]
            m.add(sum(z[u, k, o] for o in opts[u]) == sum(covering))
    # Memory: if block (s, e, k) is chosen, then for each unit u in it,
    #   sum_{v in s..e} static(v) + dyn(u, b_k) <= cap,
    # the max over u of the peak formula written as one row per u.
    for (s, e, k), var in seg.items():
        b = p.batch_sizes[k]
        static = sum(p.units[v].options[o].static_bytes * z[v, k, o] for v in range(s, e + 1) for o in opts[v])
        for u in range(s, e + 1):
            dyn = sum(p.units[u].options[o].dyn_bytes(b) * z[u, k, o] for o in opts[u])
            m.add(static + dyn <= p.cap_bytes).only_enforce_if(var)
    if p.max_blocks is not None:
        m.add(sum(seg.values()) <= p.max_blocks)
    costs = [
        (var, round(block_steps(p, p.batch_sizes[k]) * p.units[u].options[o].step_s(p.batch_sizes[k]) * _US))
        for (u, k, o), var in z.items()
    ] + [(var, round(pass_time_s(p, s, e) * _US)) for (s, e, k), var in seg.items()]
    time_expr = sum(c * var for var, c in costs)
    m.minimize(time_expr)
    return _Model(m=m, seg=seg, z=z, time_expr=time_expr, costs=costs)


def _solver(cp_model, config: SolverConfig, time_limit_s: float):
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.random_seed = config.seed
    if config.workers:
        solver.parameters.num_workers = config.workers
    return solver


def _widen_heads(model: _Model, solver, config: SolverConfig, cp_model, stats: dict) -> tuple[Any, WidthsStatus]:
    """Phase 2: the widest heads within the time tolerance. Lexicographic:
    fewest narrowing steps first, then least time, so the slack buys wider
    heads and never an arbitrary slower batch size. Returns the solver
    whose solution to read, and phase 2's status."""
    m, z = model.m, model.z
    limit_us = math.floor(round(solver.objective_value) * (1 + config.tie_tolerance))
    m.add(model.time_expr <= limit_us)
    m.minimize((limit_us + 1) * sum(o * var for (u, k, o), var in z.items()) + model.time_expr)
    m.clear_hints()
    for var in (*z.values(), *model.seg.values()):  # start from the phase-1 solution
        m.add_hint(var, solver.boolean_value(var))
    solver2 = _solver(cp_model, config, min(config.time_limit_s, config.tie_time_limit_s))
    status2 = solver2.solve(m)
    stats["phase2_wall_s"] = solver2.wall_time
    if status2 in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return solver2, "optimal" if status2 == cp_model.OPTIMAL else "feasible"
    return solver, "skipped"


def _hint_values(p: Problem, hint: Solution, model: _Model) -> dict[Any, bool] | None:
    """Every variable's value in ``hint``'s plan; None when the plan has a
    block outside the model (a block the prefilter removed)."""
    chosen = {(b.start, b.end, p.batch_sizes.index(b.batch_size)) for b in hint.blocks}
    if not chosen <= set(model.seg):
        return None
    batch_of = {u: p.batch_sizes.index(b.batch_size) for b in hint.blocks for u in range(b.start, b.end + 1)}
    values = {var: key in chosen for key, var in model.seg.items()}
    values.update({var: batch_of[u] == k and hint.options[u] == o for (u, k, o), var in model.z.items()})
    return values


class _Assignment:
    """Phase 1's result when it is known already (a least-time plan proven
    by the dynamic program): read as a solved CpSolver is."""

    def __init__(self, values: dict[Any, bool], costs: list[tuple[Any, int]]) -> None:
        self._values = {var.index: value for var, value in values.items()}
        self.objective_value = float(sum(c for var, c in costs if self._values[var.index]))
        self.best_objective_bound = self.objective_value

    def boolean_value(self, var: Any) -> bool:
        return self._values[var.index]
