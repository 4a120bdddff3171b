"""Solving: which engine plans (the dynamic program, CP-SAT or the greedy
heuristic), the fallbacks that keep a plan when one exists, and the error
that names the smallest budget when none does.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

from neuroflux.errors import NeuroFluxError
from neuroflux.planner.config import PlanConfig
from neuroflux.planner.problem import Problem, Solution, min_feasible_budget_bytes
from neuroflux.planner.solve_cpsat import SolverConfig, solve_cpsat
from neuroflux.planner.solve_dp import solve_dp
from neuroflux.planner.solve_greedy import solve_greedy

__all__ = ["CPSAT_MAX_UNITS", "Engine", "InfeasibleBudget", "solve", "raise_infeasible"]

log = logging.getLogger(__name__)

#: Above this many units the exact dynamic program plans alone: CP-SAT's model
#: grows with units x block length x batch sizes and stops proving in seconds.
CPSAT_MAX_UNITS = 24

Engine = Literal["cp-sat", "dp", "greedy"]
"""Which solver made a plan."""


class InfeasibleBudget(NeuroFluxError):
    """No plan fits; the message names the smallest budget that would."""

    def __init__(self, message: str, *, min_budget_bytes: int | None) -> None:
        super().__init__(message)
        self.min_budget_bytes = min_budget_bytes


def solve(problem: Problem, cfg: PlanConfig) -> tuple[Solution, Engine]:
    """The strategy's plan and the engine that made it. ``optimal``: CP-SAT,
    seeded with the dynamic program's exact least-time plan (or the greedy
    one), on networks of up to CPSAT_MAX_UNITS units whose least-time plan
    caches every boundary in RAM (CP-SAT's model); the dynamic program alone
    otherwise. Never "no plan" when one exists: on a CP-SAT timeout or
    infeasibility the dynamic program's or the greedy plan is written."""
    search, tie_tolerance = cfg.search, cfg.heads.tie_tolerance
    greedy = solve_greedy(problem)
    if search.strategy == "greedy":
        return greedy, "greedy"
    dp = solve_dp(problem, tie_tolerance=tie_tolerance)
    all_ram = dp is not None and all(b.boundary == "ram" for b in dp.blocks[:-1])
    if dp is not None and (problem.n > CPSAT_MAX_UNITS or dp.status == "infeasible" or not all_ram):
        return dp, "dp"
    if "ram" not in problem.boundaries:
        return greedy, "greedy"
    seed = dp if dp is not None else greedy
    # The hint: the dynamic program's least-time plan before its widening. All
    # in RAM, it is CP-SAT's phase-1 optimum too (the DP searched a superset of
    # CP-SAT's model), so phase 1 takes it instead of proving it again.
    least = solve_dp(problem, tie_tolerance=0.0) if dp is not None and tie_tolerance > 0 else dp
    first = least if least is not None else greedy
    hint: Solution | None = first
    if first.status in ("feasible", "optimal") and any(b.boundary != "ram" for b in first.blocks[:-1]):
        hint = None  # CP-SAT cannot take a hint outside its model; ``seed`` is still the fallback
    proven = hint is not None and hint is least and hint.status == "optimal"
    solver_cfg = SolverConfig(time_limit_s=search.time_limit_s, seed=cfg.seed, tie_tolerance=tie_tolerance)
    solution = solve_cpsat(dataclasses.replace(problem, boundaries=("ram",)), solver_cfg, hint=hint, proven=proven)
    if solution.status == "infeasible" and dp is None and greedy.status == "feasible":
        return greedy, "greedy"  # no lightest heads, and caches alone do not fit: the greedy plan recomputes
    if solution.status == "timeout" and seed.status in ("feasible", "optimal"):
        log.warning(
            "CP-SAT found no plan within %.0f s; writing the %s plan (raise --time-limit for CP-SAT's)",
            search.time_limit_s,
            "dynamic program's" if seed is dp else "greedy",
        )
        return dataclasses.replace(
            seed, message=f"CP-SAT timed out ({solution.message})"
        ), "dp" if seed is dp else "greedy"
    return solution, "cp-sat"


def raise_infeasible(problem: Problem, solution: Solution, cfg: PlanConfig) -> None:
    """Raise why no plan fits (``solution`` is infeasible or timed out): the
    smallest budget that works, or which other limit to lift."""
    budget = cfg.budget
    need = min_feasible_budget_bytes(problem, margin_fraction=budget.margin)
    from neuroflux.planner.budget import format_bytes

    if solution.status == "timeout":
        raise NeuroFluxError(f"the solver found no plan in time: {solution.message}")
    if need > budget.budget_bytes:
        raise InfeasibleBudget(
            f"budget {budget.budget_text} ({budget.budget_bytes} bytes) is too small: even one unit at batch "
            f"{problem.batch_sizes[0]} with the narrowest aux head needs more. The smallest budget that works is "
            f"{need} bytes ({format_bytes(need)}, with the {budget.margin:.0%} margin"
            + (
                f" and the device's {format_bytes(problem.workspace_bytes)} of library workspace"
                if problem.workspace_bytes
                else ""
            )
            + f"); pass --budget {need} or more, "
            "or lower --min-batch",
            min_budget_bytes=need,
        )
    if "recompute" in problem.boundaries:
        raise InfeasibleBudget(
            f"no plan fits: {solution.message}. Every unit fits alone ({format_bytes(need)} suffices for that), "
            "so --max-blocks or --max-block-units is the limit (a block that recomputes its input also holds the "
            "recomputed units' weights): drop --max-blocks, or raise --budget",
            min_budget_bytes=None,
        )
    raise InfeasibleBudget(
        f"no plan fits: {solution.message}. The device budget would allow one ({format_bytes(need)} suffices), "
        "so the cache budgets or --max-blocks are the limit: let boundaries recompute (--cache-location auto), "
        "raise --host-budget or --disk-budget, use --cache-dtype float16, or drop --max-blocks",
        min_budget_bytes=None,
    )
