"""The polish (the plan's ``polish``): after local learning, the kept exit's
prefix of units and its head trained end to end for a fraction of an epoch,
at the batch and peak learning rate the plan proved to fit the budget
(cosine to zero), on the dataset as block 0 reads it (augmented).

The polished weights are kept only when the exit is more accurate on val
afterwards; otherwise the exit returns to its weights before. A polish that
diverges is undone the same way: the run keeps its local-learning result.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from neuroflux.runtime.assemble import Assembled
from neuroflux.runtime.data import call_augment
from neuroflux.runtime.distributed import Dist
from neuroflux.runtime.memory import CAN_TRACK, tracked_step
from neuroflux.runtime.modules import Chain
from neuroflux.runtime.precision import Precision
from neuroflux.runtime.stages import steps_per_epoch
from neuroflux.runtime.train import StepStats, UnitTrainer, block_step, shuffle_seed
from neuroflux.schemas.plan import Plan
from neuroflux.schemas.summary import PolishResult

__all__ = ["polish_exit"]


def polish_exit(
    plan: Plan,
    asm: Assembled,
    chosen: str,
    *,
    data: tuple[Any, Any],
    augment: Any,
    device: torch.device,
    dist: Dist,
    precision: Precision,
    max_steps: int | None = None,
) -> PolishResult | None:
    """Polish exit ``chosen`` on ``data`` ((train, val) from the dataset);
    None where the plan has no polish of it. Its val accuracy is measured
    before and after the same way (through its units from the data, not on a
    block's cache). ``max_steps``: fewer steps (a dry run)."""
    spec = plan.polish_exit(chosen)
    if spec is None or plan.polish is None:
        return None
    k = plan.unit(chosen).index
    unit, head = Chain(asm.units[: k + 1]), asm.heads[k]
    exit_model = Chain(asm.units[: k + 1], head)
    before = {name: t.detach().clone() for name, t in exit_model.state_dict().items()}
    r = plan.recipe
    steps = _steps(plan.polish.epochs, spec, r.train_size, dist)
    steps = steps if max_steps is None else min(steps, max_steps)
    trainer = UnitTrainer(unit, head, lr=spec.lr, momentum=r.momentum, weight_decay=r.weight_decay,
                          total_steps=steps, schedule="cosine", precision=precision)  # fmt: skip
    trainer.grad_sync = dist.average_grads if dist.enabled else None
    exit_model.to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    train, val = data
    accuracy_before = _accuracy(exit_model, val, batch=spec.batch_size, device=device, dist=dist, precision=precision)
    cpu_peak, finite = _train(
        trainer, train, steps, batch=spec.batch_size, seed=shuffle_seed(r.seed, len(plan.blocks)), augment=augment
    )
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else cpu_peak
    finite = int(dist.all_sum(torch.tensor([int(not finite)], device=device))[0]) == 0  # every rank decides alike
    after = _accuracy(exit_model, val, batch=spec.batch_size, device=device, dist=dist, precision=precision)
    kept = finite and after > accuracy_before
    if not kept:
        exit_model.load_state_dict(before)
    exit_model.to("cpu")
    return PolishResult(
        exit=chosen,
        batch_size=spec.batch_size,
        steps=steps,
        lr=spec.lr,
        accuracy_before=accuracy_before,
        accuracy_after=after if finite else 0.0,
        kept=kept,
        time_s=time.perf_counter() - t0,
        measured_peak_bytes=int(peak),
        predicted_peak_bytes=spec.predicted_peak_bytes,
    )


def _steps(epochs: float, spec: Any, train_size: int, dist: Dist) -> int:
    """The plan's steps; under torchrun, each rank's through its shard for the same epochs."""
    if not dist.enabled:
        return int(spec.steps)
    return max(1, math.ceil(epochs * steps_per_epoch(train_size, batch_size=spec.batch_size, world=dist.world)))


def _train(trainer: UnitTrainer, train: Any, steps: int, *, batch: int, seed: int, augment: Any) -> tuple[int, bool]:
    """``steps`` end-to-end steps over shuffled passes of ``train``; returns
    the MemTracker peak of the first steps on a CPU, and whether every loss
    was finite."""
    trainer.train(True)
    device = trainer.params[0].device
    stats = StepStats(1, device)
    peak, step, epoch = 0, 0, 0
    while step < steps:
        gen = torch.Generator().manual_seed(seed + epoch)
        for xb, yb in train.batches(batch, shuffle=True, generator=gen, device=device):
            if augment is not None:
                xb = call_augment(augment, xb)
            inputs = [xb]
            del xb
            if device.type == "cpu" and step < 2 and CAN_TRACK:
                peak = max(peak, tracked_step([trainer], inputs, yb, stats, prefix=Chain([])))
            else:
                block_step([trainer], inputs, yb, stats)
            step += 1
            if step >= steps:
                break
        epoch += 1
    return peak, bool(torch.isfinite(stats.loss).all())


@torch.inference_mode()
def _accuracy(
    model: torch.nn.Module, val: Any, *, batch: int, device: torch.device, dist: Dist, precision: Precision
) -> float:
    """Val accuracy of ``model`` (every rank's shard counted), at the polish's batch."""
    model.eval()
    dist.broadcast_buffers([model])
    correct = torch.zeros(2, dtype=torch.int64, device=device)
    for x, y in val.batches(batch, shuffle=False, device=device):
        with precision.autocast():
            correct[0] += (model(precision.format_input(x)).argmax(1) == y).sum()
        correct[1] += y.shape[0]
    counts = dist.all_sum(correct)
    return int(counts[0]) / max(1, int(counts[1]))
