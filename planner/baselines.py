"""Baselines: what end-to-end backprop (BP), BP with budget-optimal
activation checkpointing, and BP with checkpointing at every unit boundary
would do under the same budget.

BP and every-unit checkpointing take the largest candidate batch at which
their whole-model step fits; budget-optimal checkpointing chooses the batch
and the units to recompute (``checkpoint_baseline.py``). Each one's time is
the same epochs at its batch (from FLOPs, or measured under ``--cost
measure``). The plan records all three, for the speedups it predicts and for
``nf-run --baseline bp`` / ``bp-checkpoint`` / ``bp-checkpoint-all``.
"""

from __future__ import annotations

from typing import Any

from neuroflux.planner.checkpoint_baseline import budget_checkpoint
from neuroflux.planner.config import PlanConfig
from neuroflux.planner.jobs import Profiled
from neuroflux.planner.problem import Problem, block_steps
from neuroflux.planner.profile import DeviceSpeed, StepProfile, measure_step_time
from neuroflux.runtime.train import shuffle_seed
from neuroflux.schemas.plan import Baseline

__all__ = ["baselines"]


def baselines(problem: Problem, pr: Profiled, cfg: PlanConfig) -> tuple[Baseline, Baseline, Baseline]:
    """The BP, budget-optimal BP-checkpointing and every-unit BP-checkpointing
    baselines of a profiled model at ``problem``'s budget."""
    common: dict[str, Any] = dict(shape=pr.shape, classes=pr.classes, device=pr.device, sgd=pr.sgd)
    bp = _baseline(problem, pr.bp_prof, pr.target.speed, cfg, real=None if pr.real is None else pr.real[0], **common)
    ck = _baseline(problem, pr.ck_prof, pr.target.speed, cfg, real=None if pr.real is None else pr.real[1], **common)
    return bp, budget_checkpoint(problem, pr, cfg), ck


def _baseline(
    problem: Problem,
    prof: StepProfile,
    speed: DeviceSpeed,
    cfg: PlanConfig,
    *,
    real: Any,
    shape: tuple[int, ...],
    classes: int,
    device: Any,
    sgd: Any,
) -> Baseline:
    """One baseline: its step profile ``prof`` at the largest batch that fits
    (``real``: the real model to time, under ``--cost measure``)."""
    epochs = cfg.recipe.epochs
    fitting = [b for b in problem.batch_sizes if prof.peak_bytes(b) <= problem.cap_bytes]
    ws = problem.workspace_bytes
    if not fitting:
        return Baseline(
            batch_size=0,
            predicted_peak_bytes=prof.peak_bytes(problem.batch_sizes[0]) + ws,
            predicted_time_s=0.0,
            epochs=epochs,
            fits=False,
            lr=0.0,
            steps=0,
            shuffle_seed=shuffle_seed(cfg.seed, 0),
        )
    b = fitting[-1]
    if real is not None:
        fixed, per = measure_step_time(real, shape, classes, device=device, batches=(8, 32), sgd=sgd)
        step = fixed + per * b
    else:
        step = speed.step_s(prof, b)
    return Baseline(
        batch_size=b,
        predicted_peak_bytes=prof.peak_bytes(b) + ws,
        predicted_time_s=block_steps(problem, b) * step,
        epochs=epochs,
        fits=True,
        steps=block_steps(problem, b),
        lr=cfg.recipe.lr_at(b),
        shuffle_seed=shuffle_seed(cfg.seed, 0),
    )
