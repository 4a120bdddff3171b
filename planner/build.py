"""Making a plan: the pipeline from a model to a ``Plan``.

    trace and profile (jobs.py) -> problem (here) -> solve (solve.py)
    -> baselines (baselines.py) -> plan records (records.py)

``make_plan`` is the library entry point behind ``nf-plan``; ``make_plans``
plans several budgets from one profiling, ``make_plan_shared`` shares one
across calls (``nf-bench``). They report progress through an optional
callback and log through ``logging``; tables and bars belong to the CLI.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroflux.errors import NeuroFluxError
from neuroflux.planner.baselines import baselines
from neuroflux.planner.checkpoint_baseline import budget_checkpoint
from neuroflux.planner.config import PlanConfig, default_cache_budget_bytes, default_disk_budget_bytes
from neuroflux.planner.jobs import Profiled, Progress, profile_model
from neuroflux.planner.polish import polish_record
from neuroflux.planner.problem import Problem, Solution, candidate_batch_sizes, check_solution
from neuroflux.planner.records import plan_record
from neuroflux.planner.solve import InfeasibleBudget, raise_infeasible, solve
from neuroflux.planner.solve_batches import prefer_small_batches
from neuroflux.runtime.model_file import ModelObject
from neuroflux.schemas.plan import Plan

__all__ = ["PlanConfig", "PlanResult", "InfeasibleBudget", "make_plan", "make_plans", "make_plan_shared"]


@dataclass(frozen=True)
class PlanResult:
    """A plan with the problem and solution it was written from."""

    plan: Plan
    problem: Problem
    solution: Solution


def _no_progress(desc: str, done: int, total: int) -> None:
    pass


def make_plan(
    model_spec: str | ModelObject, cfg: PlanConfig, *, plan_dir: str | Path = ".", progress: Progress | None = None
) -> PlanResult:
    """Trace, profile and solve: the plan for ``cfg.budget.budget_bytes``."""
    prof = profile_model(model_spec, cfg, progress or _no_progress)
    return _plan_at(prof, cfg, plan_dir=Path(plan_dir), progress=progress)


def make_plans(
    model_spec: str | ModelObject,
    cfg: PlanConfig,
    budgets: Sequence[tuple[int, str]],
    *,
    plan_dir: str | Path = ".",
    progress: Progress | None = None,
) -> list[PlanResult | NeuroFluxError]:
    """Plans for several budgets ((bytes, text) pairs), profiling the model
    once: a budget changes the solve, not the units' costs. A budget with no
    plan gives its error in its place."""
    prof = profile_model(model_spec, cfg, progress or _no_progress)
    out: list[PlanResult | NeuroFluxError] = []
    for nbytes, text in budgets:
        c = cfg.replace(budget_bytes=nbytes, budget_text=text, budget_source="flag")
        try:
            out.append(_plan_at(prof, c, plan_dir=Path(plan_dir), progress=progress))
        except NeuroFluxError as e:
            out.append(e)
    return out


#: PlanConfig options that change only the solve (and the plan's records),
#: never a unit's profile: configs equal but for these share one profiling.
_SOLVE_ONLY = frozenset(
    {
        "budget_bytes",
        "budget_text",
        "budget_source",
        "strategy",
        "time_limit_s",
        "tie_tolerance",
        "batch_time_tolerance",
        "max_blocks",
        "max_block_units",
        "margin",
        "min_batch",
        "max_batch",
        "epochs",
        "cache_budget_bytes",
        "disk_budget_bytes",
        "cache_location",
        "data_mode",
        "patience",
        "tolerance",
        "prefer",
        "epoch_patience",
        "max_extra_epochs",
        "min_reduction",
        "base_batch_size",
        "lr_scaling",
        "schedule",
        "workers",
        "polish_epochs",
        "polish_lr_scale",
    }
)


def make_plan_shared(
    model_spec: str,
    cfg: PlanConfig,
    *,
    plan_dir: str | Path,
    profiles: dict[Any, Any],
    progress: Progress | None = None,
) -> PlanResult:
    """``make_plan``, profiling ``model_spec`` once for every config that
    differs only in ``_SOLVE_ONLY`` options (``profiles`` holds them between
    calls): a benchmark's optimal, greedy and budget variants of one model
    profile it once, and get the plans ``make_plan`` gives each."""
    key = (
        model_spec,
        tuple(sorted((name, repr(value)) for name, value in cfg.options().items() if name not in _SOLVE_ONLY)),
        # Steps are profiled at the ends of the batch range (ProfilingJobs.batches).
        (cfg.search.min_batch, cfg.search.max_batch, cfg.data.train_size),
    )
    if key not in profiles:
        profiles[key] = profile_model(model_spec, cfg, progress or _no_progress)
    return _plan_at(profiles[key], cfg, plan_dir=Path(plan_dir), progress=progress)


def _plan_at(pr: Profiled, cfg: PlanConfig, *, plan_dir: Path, progress: Progress | None = None) -> PlanResult:
    """The budget's problem, baselines and solution, as a plan."""
    problem = _problem(pr, cfg, plan_dir=plan_dir)
    bp, ck_all = baselines(problem, pr, cfg)
    ck = budget_checkpoint(problem, pr, cfg)
    solution, engine = solve(problem, cfg)
    if solution.status in ("infeasible", "timeout"):
        raise_infeasible(problem, solution, cfg)
    solution = prefer_small_batches(problem, solution, cfg.batch_time_tolerance)
    broken = check_solution(problem, solution)  # every written plan, whichever engine made it
    if broken:
        raise NeuroFluxError(
            f"internal error: the {engine} plan breaks its own constraints ({'; '.join(broken[:3])}); no plan "
            "written. Please report it with the model file and flags; --strategy greedy may plan meanwhile"
        )
    # Recorded without the size limit first: the plan's own check of it would refuse in the plan's words,
    # where nf-plan names the flag and the largest reduction any exit reaches.
    any_exit = cfg.replace(min_reduction=1.0)
    plan = plan_record(
        pr, any_exit, problem=problem, solution=solution, bp=bp, ck=ck, ck_all=ck_all, engine=engine, plan_dir=plan_dir
    )
    allowed = _allowed_exits(plan, cfg)
    plan = dataclasses.replace(
        plan, exit_policy=dataclasses.replace(plan.exit_policy, min_reduction=cfg.exits.min_reduction)
    )
    polish = polish_record(pr, problem, solution, cfg, allowed=set(allowed), report=progress)
    if polish is not None:
        assumes = f"{plan.predicted.assumes}; the polish of the kept exit (polish.exits) comes on top"
        plan = dataclasses.replace(plan, polish=polish, predicted=dataclasses.replace(plan.predicted, assumes=assumes))
    return PlanResult(plan=plan, problem=problem, solution=solution)


def _allowed_exits(plan: Any, cfg: PlanConfig) -> list[str]:
    """The exits ``--min-reduction`` allows; refused with the largest reduction any exit reaches when none."""
    allowed = plan.allowed_exits(cfg.exits.min_reduction)
    if not allowed:
        smallest = min(plan.units, key=lambda u: plan.exit_params(u.name))
        best = math.floor(10 * plan.model.params / plan.exit_params(smallest.name)) / 10
        raise NeuroFluxError(
            f"no exit of this model is {cfg.exits.min_reduction:g}x smaller than it: the smallest exit, "
            f"{smallest.name} with its head, is {best:.1f}x smaller. Pass --min-reduction {best:.1f} or less, or "
            "narrower heads (--head-kind pooled)"
        )
    return allowed


def _problem(pr: Profiled, cfg: PlanConfig, *, plan_dir: Path) -> Problem:
    """The torch-free planning problem: the profiled units under the config's budgets and search space."""
    budget, search, train_n = cfg.budget, cfg.search, pr.train_n
    _, max_batch = search.batch_range(train_n)
    return Problem(
        units=tuple(pr.unit_costs),
        batch_sizes=candidate_batch_sizes(min_batch=search.min_batch, max_batch=max_batch),
        train_size=train_n,
        val_size=pr.val_n,
        epochs=cfg.recipe.epochs,
        cap_bytes=int(budget.budget_bytes * (1 - budget.margin)) - pr.target.workspace,
        workspace_bytes=pr.target.workspace,
        cache_budget_bytes=default_cache_budget_bytes()
        if budget.cache_budget_bytes is None
        else budget.cache_budget_bytes,
        disk_budget_bytes=default_disk_budget_bytes(plan_dir)
        if budget.disk_budget_bytes is None
        else budget.disk_budget_bytes,
        boundaries=budget.boundaries,
        max_blocks=search.max_blocks,
        max_block_units=search.block_units_limit(len(pr.unit_costs)),
    )
