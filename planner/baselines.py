"""Baselines: what end-to-end backprop (BP), BP with budget-optimal
activation checkpointing, and BP with checkpointing at every unit boundary
would do under the same budget, and the grid BP under ``torch.compile`` with an
activation memory budget searches on the device.

BP and every-unit checkpointing take the largest candidate batch at which
their whole-model step fits; budget-optimal checkpointing chooses the batch
and the units to recompute (``checkpoint_baseline.py``). Each one's time is
the same epochs at its batch (from FLOPs, or measured under ``--cost
measure``). The plan records all three, for the speedups it predicts and for
``nf-run --baseline bp`` / ``bp-checkpoint`` / ``bp-checkpoint-all`` /
``bp-compile``. A compiled step's memory depends on the compiler's choices, which
an eager trace cannot see: for ``bp-compile`` the plan lists the candidates (each
batch with its rate and schedule) and the runtime measures them.
"""

from __future__ import annotations

from typing import Any

from neuroflux.planner.config import PlanConfig
from neuroflux.planner.jobs import Profiled
from neuroflux.planner.problem import Problem, block_steps
from neuroflux.planner.profile import StepProfile, measure_step_time
from neuroflux.runtime.train import shuffle_seed
from neuroflux.schemas.plan import Baseline, CompileBaseline, CompileCandidate

__all__ = ["COMPILE_RATIOS", "baseline_at", "baselines", "compile_baseline", "unfit_baseline"]

#: ``activation_memory_budget`` values bp-compile tries: the compiler's own choice, half and a fifth of it.
COMPILE_RATIOS = (1.0, 0.5, 0.2)
_MAX_COMPILE_BATCHES = 8


def baselines(problem: Problem, pr: Profiled, cfg: PlanConfig) -> tuple[Baseline, Baseline]:
    """The BP and every-unit BP-checkpointing baselines of a profiled model at
    ``problem``'s budget, each at the largest batch that fits (the
    budget-optimal one: ``checkpoint_baseline.budget_checkpoint``)."""
    real = (None, None) if pr.real is None else pr.real
    return (
        _largest_fitting(problem, pr, cfg, pr.bp_prof, real=real[0]),
        _largest_fitting(problem, pr, cfg, pr.ck_prof, real=real[1]),
    )


def _largest_fitting(problem: Problem, pr: Profiled, cfg: PlanConfig, prof: StepProfile, *, real: Any) -> Baseline:
    """A baseline whose step profile is ``prof``, at the largest batch that fits
    (``real``: the real model to time, under ``--cost measure``)."""
    fitting = [b for b in problem.batch_sizes if prof.peak_bytes(b) <= problem.cap_bytes]
    if not fitting:
        return unfit_baseline(problem, cfg, prof)
    return baseline_at(problem, pr, cfg, fitting[-1], prof, real=real)


def baseline_at(
    problem: Problem,
    pr: Profiled,
    cfg: PlanConfig,
    b: int,
    prof: StepProfile,
    *,
    real: Any,
    checkpointed_units: list[str] | None = None,
) -> Baseline:
    """A baseline training at batch ``b`` with step profile ``prof``, timed from
    it (or, ``real`` given, from timing that real model: ``--cost measure``)."""
    if real is not None:
        fixed, per = measure_step_time(
            real,
            pr.shape,
            pr.classes,
            device=pr.device,
            batches=(8, 32),
            sgd=pr.sgd,
            precision=cfg.recipe.precision,
        )
        step = fixed + per * b
    else:
        step = pr.target.speed.step_s(prof, b)
    return Baseline(
        batch_size=b,
        predicted_peak_bytes=prof.peak_bytes(b) + problem.workspace_bytes,
        predicted_time_s=block_steps(problem, b) * step,
        epochs=cfg.recipe.epochs,
        fits=True,
        steps=block_steps(problem, b),
        lr=cfg.recipe.lr_at(b),
        shuffle_seed=shuffle_seed(cfg.seed, 0),
        checkpointed_units=checkpointed_units,
    )


def unfit_baseline(
    problem: Problem, cfg: PlanConfig, prof: StepProfile, checkpointed_units: list[str] | None = None
) -> Baseline:
    """A baseline that fits no candidate batch (its peak at the smallest)."""
    return Baseline(
        batch_size=0,
        predicted_peak_bytes=prof.peak_bytes(problem.batch_sizes[0]) + problem.workspace_bytes,
        predicted_time_s=0.0,
        epochs=cfg.recipe.epochs,
        fits=False,
        lr=0.0,
        steps=0,
        shuffle_seed=shuffle_seed(cfg.seed, 0),
        checkpointed_units=checkpointed_units,
    )


def compile_baseline(problem: Problem, cfg: PlanConfig, bp: Baseline, ck_all: Baseline) -> CompileBaseline:
    """bp-compile's grid: the candidate batches from the one below BP's (the
    smallest where BP fits none) up to twice the larger of BP's and every-unit
    checkpointing's (what recomputing may reach), at most eight, each with the
    plan's rate and schedule; the ratios ``COMPILE_RATIOS``."""
    ladder = problem.batch_sizes
    at = ladder.index(bp.batch_size) if bp.fits and bp.batch_size in ladder else 0
    hi = 2 * max(bp.batch_size, ck_all.batch_size, ladder[0])
    batches = [b for b in ladder[max(at - 1, 0) :] if b <= hi][:_MAX_COMPILE_BATCHES] or [ladder[0]]
    return CompileBaseline(
        ratios=list(COMPILE_RATIOS),
        candidates=[
            CompileCandidate(batch_size=b, lr=cfg.recipe.lr_at(b), steps=block_steps(problem, b)) for b in batches
        ],
        epochs=cfg.recipe.epochs,
        shuffle_seed=shuffle_seed(cfg.seed, 0),
    )
