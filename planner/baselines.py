"""Baselines: what end-to-end backprop (BP) and BP with activation
checkpointing at every unit boundary would do under the same budget.

Each takes the largest candidate batch at which its whole-model step fits;
its time is the same epochs at that batch (from FLOPs, or measured under
``--cost measure``). The plan records both, for the speedups it predicts
and for ``nf-run --method bp`` / ``bp-checkpoint``.
"""

from __future__ import annotations

from typing import Any

from neuroflux.planner.config import PlanConfig
from neuroflux.planner.jobs import Profiled
from neuroflux.planner.problem import Problem, block_steps
from neuroflux.planner.profile import DeviceSpeed, StepProfile, measure_step_time
from neuroflux.runtime.train import shuffle_seed
from neuroflux.schemas.plan import Baseline

__all__ = ["baselines"]


def baselines(problem: Problem, pr: Profiled, cfg: PlanConfig) -> tuple[Baseline, Baseline]:
    """The BP and BP-checkpointing baselines of a profiled model at ``problem``'s budget."""
    common: dict[str, Any] = dict(shape=pr.shape, classes=pr.classes, device=pr.device, sgd=pr.sgd)
    bp = _baseline(problem, pr.bp_prof, pr.target.speed, cfg, real=None if pr.real is None else pr.real[0], **common)
    ck = _baseline(problem, pr.ck_prof, pr.target.speed, cfg, real=None if pr.real is None else pr.real[1], **common)
    return bp, ck


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
