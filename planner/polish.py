"""The polish (``nf-plan --polish EPOCHS``): after local learning, the kept
exit's prefix of units and its aux head are trained end to end for a
fraction of an epoch at a small learning rate.

The exit is known only at run time (adaptive depth and the exit rule choose
it), so the plan holds the polish of every exit: its end-to-end step is
profiled with the head the solve chose for that unit, exactly as the BP
baseline's step is, and it trains at the largest candidate batch whose
predicted peak fits the same budget. The last exit's polish is BP's own step.
"""

from __future__ import annotations

import math

from neuroflux.planner.config import PlanConfig
from neuroflux.planner.jobs import Profiled, Progress
from neuroflux.planner.parallel import map_forked, usable_cpus
from neuroflux.planner.problem import Problem, Solution
from neuroflux.planner.profile import StepProfile
from neuroflux.schemas.plan import Polish, PolishExit

__all__ = ["polish_record"]


def polish_record(
    pr: Profiled,
    problem: Problem,
    solution: Solution,
    cfg: PlanConfig,
    *,
    allowed: set[str] | None = None,
    report: Progress | None = None,
) -> Polish | None:
    """The plan's polish of every exit the run may keep (``allowed``, default
    all; None when ``--polish`` is 0)."""
    recipe = cfg.recipe
    if recipe.polish_epochs <= 0:
        return None
    keys = [
        (k, problem.units[k].options[i].kind, problem.units[k].options[i].width)
        for k, i in enumerate(solution.options)
        if allowed is None or problem.units[k].name in allowed
    ]
    profiles = _profiles(pr, keys, cfg, report)
    exits = []
    for (k, _, _), prof in zip(keys, profiles):
        fitting = [b for b in problem.batch_sizes if prof.peak_bytes(b) <= problem.cap_bytes]
        if not fitting:
            continue
        b = fitting[-1]
        steps = max(1, math.ceil(recipe.polish_epochs * math.ceil(problem.train_size / b)))
        exits.append(
            PolishExit(
                unit=problem.units[k].name,
                batch_size=b,
                predicted_peak_bytes=prof.peak_bytes(b) + problem.workspace_bytes,
                predicted_time_s=steps * pr.target.speed.step_s(prof, b),
                steps=steps,
                lr=recipe.lr_at(b) * recipe.polish_lr_scale,
            )
        )
    return Polish(epochs=recipe.polish_epochs, lr_scale=recipe.polish_lr_scale, exits=exits)


def _profiles(
    pr: Profiled, keys: list[tuple[int, str, int]], cfg: PlanConfig, report: Progress | None
) -> list[StepProfile]:
    """Each exit's end-to-end step profile, profiled once per (exit, head) on
    this machine's cores and kept in ``pr`` for the next budget."""
    assert pr.jobs is not None, "a Profiled made by profile_model"
    jobs = pr.jobs
    for key in keys:
        if key[1] == "model":
            pr.prefix_profiles.setdefault(key, pr.bp_prof)
    todo = [key for key in keys if key not in pr.prefix_profiles]
    if todo:
        finished = 0

        def done(i: int) -> None:
            nonlocal finished
            finished += 1
            if report is not None:
                report("profiling the polish of every exit", finished, len(todo))

        workers = 1 if cfg.target.cost == "measure" else (cfg.target.workers or usable_cpus())
        # The deepest prefixes are the longest jobs: started first.
        order = sorted(range(len(todo)), key=lambda i: -todo[i][0])
        results = map_forked(lambda i: jobs.prefix_job(todo[i]), order, workers=workers, on_done=done)
        for i, key in enumerate(todo):
            pr.prefix_profiles[key] = results[i]
    return [pr.prefix_profiles[key] for key in keys]
