"""The stages a run trains, built from the plan and the assembled model: one
per plan block for NeuroFlux, one (the whole model) for a BP baseline; and
the steps and predicted time of a stage's epoch."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.assemble import Assembled
from neuroflux.runtime.config import Method
from neuroflux.runtime.distributed import Dist
from neuroflux.runtime.modules import CheckpointedChain
from neuroflux.runtime.precision import FP32, Precision
from neuroflux.runtime.train import UnitTrainer, shuffle_seed
from neuroflux.schemas.plan import Plan

__all__ = [
    "Stage",
    "build_stages",
    "steps_per_epoch",
    "predicted_epoch_s",
    "size_limit_bank_s",
    "units_past_limit_s",
    "whole_model_stage",
    "whole_model_trainer",
]


@dataclass
class Stage:
    index: int
    unit_idx: list[int]
    exits: list[str]
    """Names of the exits trained in this stage (the units)."""
    trainers: list[UnitTrainer]
    batch_size: int
    epochs: int
    predicted_peak_bytes: int
    cache: Any
    shuffle_seed: int
    source: Any = None
    """The plan's BlockInput (None for the baselines: the dataset)."""
    compile: dict[str, Any] | None = None
    """bp-compile: the search's record (runtime/compile_baseline.py)."""
    predicted_time_s: float = 0.0
    """NeuroFlux: the plan block's predicted time, less that of the units the
    exit size limit leaves untrained (``units_past_limit_s``)."""


def steps_per_epoch(train_samples: int, *, batch_size: int, world: int = 1) -> int:
    """Optimizer steps one process takes in an epoch over ``train_samples``
    split evenly over ``world`` processes (torchrun's equal shards: the
    remainder is dropped), the last batch partial. Under torchrun this is a
    rank's share: every epoch count, schedule and predicted time uses it."""
    return -(-(train_samples // world) // batch_size)


def predicted_epoch_s(plan: Plan, stage: Stage) -> float:
    """Predicted training time of one epoch of ``stage``, in the plan's
    terms: one process over the whole training set, as every
    ``predicted_time_s`` of the plan (under torchrun too, so that the seconds
    the epoch rule banks, the seconds the depth rule skips and the seconds
    reported as saved add up; the schedule counts a rank's steps instead)."""
    return _epoch_s(plan, stage.unit_idx, stage.batch_size)


def _epoch_s(plan: Plan, unit_idx: list[int], batch: int) -> float:
    """Predicted training time of one epoch of units ``unit_idx`` at ``batch`` (``predicted_epoch_s``'s terms)."""
    steps = steps_per_epoch(plan.recipe.train_size, batch_size=batch)
    return steps * sum(
        plan.units[i].profile.step_fixed_s + plan.units[i].profile.step_per_sample_s * batch for i in unit_idx
    )


def units_past_limit_s(plan: Plan, block: Any) -> float:
    """Predicted training time of ``block``'s units that the exit size limit
    never trains (``Plan.units_past_size_limit``), over its planned epochs,
    in ``predicted_epoch_s``'s terms."""
    past = set(plan.units_past_size_limit())
    idx = [plan.unit(u).index for u in block.units if u in past]
    return block.epochs * _epoch_s(plan, idx, block.batch_size) if idx else 0.0


def size_limit_bank_s(plan: Plan) -> float:
    """Predicted training time of the units the exit size limit never trains
    (the blocks it never runs and the tail of the block it stops in:
    ``units_past_limit_s``). The run's time bank starts with it: per-block
    epochs spend it on extra epochs of the blocks that still improve, as they
    spend the time that converged blocks bank, so the run's training steps
    never exceed the full-depth plan's predicted step time (an extra epoch's
    exit evaluation, and a recompute block's prefix, are not charged to the
    bank)."""
    return sum(units_past_limit_s(plan, b) for b in plan.blocks)


def build_stages(plan: Plan, asm: Assembled, *, method: Method, dist: Dist, precision: Precision = FP32) -> list[Stage]:
    """The stages of ``method``: the plan's blocks, or the baseline's whole
    model (refused when the plan found no batch at which it fits), training
    at ``precision``."""
    if method == "neuroflux":
        return [_block_stage(plan, b, asm, dist=dist, precision=precision) for b in plan.blocks]
    if method == "bp-compile":
        raise ValueError("bp-compile's stage is measured on the device: compile_baseline.compile_stage")
    base = _baseline(plan, method)
    if not base.fits:
        raise NeuroFluxError(
            f"the plan found no batch size >= {plan.solver.min_batch_size} at which {method} fits "
            f"{plan.device.budget_text}; that is the comparison: BP cannot train under this budget"
        )
    recomputed = [False] if method == "bp" else _recomputed(plan, base)
    # BP, and budget-optimal checkpointing that recomputes nothing: the model itself, as the plan profiled it.
    whole = (
        asm.model
        if recomputed is not None and not any(recomputed)
        else CheckpointedChain(asm.units, checkpointed=recomputed)
    )
    seed = shuffle_seed(plan.recipe.seed, 0) if base.shuffle_seed is None else base.shuffle_seed
    # The plan decides the rate and schedule; the runtime executes them.
    return [
        whole_model_stage(
            plan,
            whole,
            dist=dist,
            precision=precision,
            lr=base.lr,
            steps=base.steps,
            batch=base.batch_size,
            epochs=base.epochs,
            peak=base.predicted_peak_bytes,
            shuffle_seed=seed,
        )
    ]


def whole_model_stage(
    plan: Plan,
    model: nn.Module,
    *,
    dist: Dist,
    precision: Precision,
    lr: float,
    steps: int,
    batch: int,
    epochs: int,
    peak: int,
    shuffle_seed: int,
    compile: dict[str, Any] | None = None,
) -> Stage:
    """The one stage of a BP baseline: ``model`` trained end to end (no aux head) at ``batch``."""
    trainer = whole_model_trainer(
        plan, model, dist=dist, lr=lr, steps=steps, batch=batch, epochs=epochs, precision=precision
    )
    return Stage(
        index=0,
        unit_idx=list(range(len(plan.units))),
        exits=[plan.units[-1].name],
        trainers=[trainer],
        batch_size=batch,
        epochs=epochs,
        predicted_peak_bytes=peak,
        cache=None,
        shuffle_seed=shuffle_seed,
        compile=compile,
    )


def _baseline(plan: Plan, method: Method) -> Any:
    """The plan's record of a baseline method (a plan before 2.6 has no
    ``bp_checkpoint_all``: its ``bp_checkpoint`` checkpoints every unit)."""
    bl = plan.baseline
    if method == "bp":
        return bl.bp
    if method == "bp-checkpoint-all":
        if bl.bp_checkpoint_all is None and bl.bp_checkpoint.checkpointed_units is not None:
            raise NeuroFluxError("this plan has no bp-checkpoint-all baseline; re-plan it with nf-plan")
        return bl.bp_checkpoint_all or bl.bp_checkpoint
    return bl.bp_checkpoint


def _recomputed(plan: Plan, base: Any) -> list[bool] | None:
    """Which units the baseline recomputes (None: every one)."""
    if base.checkpointed_units is None:
        return None
    named = set(base.checkpointed_units)
    return [u.name in named for u in plan.units]


def _block_stage(plan: Plan, b: Any, asm: Assembled, *, dist: Dist, precision: Precision) -> Stage:
    """The stage of the plan's block ``b``: up to the last exit the size
    limit allows (``Plan.units_past_size_limit``; a block wholly past it,
    never run, keeps its units), its predicted peak that of the units it
    trains."""
    past = set(plan.units_past_size_limit())
    names = [u for u in b.units if u not in past] or list(b.units)
    trimmed = names != list(b.units)
    idx = [plan.unit(u).index for u in names]
    return Stage(
        index=b.index,
        unit_idx=idx,
        exits=names,
        trainers=[
            _trainer(
                plan,
                asm.units[i],
                asm.heads[i],
                dist=dist,
                lr=b.lr,
                steps=b.steps,
                batch=b.batch_size,
                epochs=b.epochs,
                precision=precision,
            )
            for i in idx
        ],
        batch_size=b.batch_size,
        epochs=b.epochs,
        predicted_peak_bytes=_trimmed_peak(plan, b, names) if trimmed else b.predicted_peak_bytes,
        cache=b.cache,
        shuffle_seed=shuffle_seed(plan.recipe.seed, b.index) if b.shuffle_seed is None else b.shuffle_seed,
        source=b.source(),
        predicted_time_s=b.predicted_time_s - (units_past_limit_s(plan, b) if trimmed else 0.0),
    )


def _trimmed_peak(plan: Plan, b: Any, names: list[str]) -> int:
    """The predicted peak of block ``b`` trained only up to ``names``: the
    plan's formula over those units, exact when the block reads a cache or
    the data. A block that recomputes its input gets the whole block's peak
    less the untrained units' resident state instead, an upper bound: the
    plan records the recompute pass's extra memory only against the whole
    block's largest step."""
    if b.source().kind != "recompute":
        return plan.block_peak_bytes(replace(b, units=names))
    tail = [plan.unit(u) for u in b.units if u not in names]
    return b.predicted_peak_bytes - sum(u.profile.static_bytes for u in tail)


def _trainer(
    plan: Plan,
    unit: nn.Module,
    head: nn.Module | None,
    *,
    dist: Dist,
    lr: float,
    steps: int,
    batch: int,
    epochs: int,
    precision: Precision,
) -> UnitTrainer:
    """A unit's trainer with the plan's recipe; its schedule spans ``steps``,
    the plan's (one process) or, under torchrun, the steps this rank takes."""
    r = plan.recipe
    if dist.enabled:  # each rank steps through its shard: the schedule spans the steps it really takes
        steps = epochs * steps_per_epoch(r.train_size, batch_size=batch, world=dist.world)
    return UnitTrainer(
        unit,
        head,
        lr=lr,
        momentum=r.momentum,
        weight_decay=r.weight_decay,
        total_steps=steps,
        schedule=r.schedule,
        grad_sync=dist.average_grads if dist.enabled else None,
        precision=precision,
    )


def whole_model_trainer(
    plan: Plan, model: nn.Module, *, dist: Dist, lr: float, steps: int, batch: int, epochs: int, precision: Precision
) -> UnitTrainer:
    """The trainer of a whole model end to end (a BP baseline: no aux head), with the plan's recipe."""
    return _trainer(plan, model, None, dist=dist, lr=lr, steps=steps, batch=batch, epochs=epochs, precision=precision)
