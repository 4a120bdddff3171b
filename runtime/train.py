"""Block-wise local learning: one optimizer per unit, detached inputs.

``UnitTrainer`` owns a unit, its exit (aux head, or the model's own head for
the last unit), an SGD optimizer and its schedule. ``block_step`` runs one
batch through a block: each unit steps on its own local loss and hands a
detached output to the next, so no gradient crosses units and only one
unit's activations are alive at a time (the planner's memory model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neuroflux.runtime.precision import FP32, Precision

__all__ = ["UnitTrainer", "block_step", "StepStats", "Schedule", "shuffle_seed"]


class StepStats:
    """Running loss/accuracy per unit, kept on the device (no sync per step)."""

    def __init__(self, n_units: int, device: torch.device) -> None:
        self.loss = torch.zeros(n_units, device=device, dtype=torch.float64)
        self.correct = torch.zeros(n_units, device=device, dtype=torch.int64)
        self.seen = 0

    def summary(self) -> tuple[list[float], list[float]]:
        n = max(1, self.seen)
        return (self.loss / n).tolist(), (self.correct.double() / n).tolist()


class Schedule:
    """LR multiplier at a step: cosine from 1 to 0 over ``total`` steps, or
    constant. A callable object, not a lambda, so that ``LambdaLR`` saves
    ``total`` in its state dict: a block granted extra epochs keeps its
    stretched schedule across a resume."""

    def __init__(self, kind: str, total: int) -> None:
        self.kind, self.total = kind, max(1, int(total))

    def __call__(self, step: int) -> float:
        if self.kind != "cosine":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(step, self.total) / self.total))


class UnitTrainer:
    def __init__(
        self,
        unit: nn.Module,
        head: nn.Module | None,
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
        total_steps: int,
        schedule: str,
        foreach: bool | None = None,
        grad_sync: Callable[[Sequence[torch.Tensor]], None] | None = None,
        precision: Precision = FP32,
    ) -> None:
        self.unit = unit
        self.head = head
        precision.format_modules(unit, head)
        params = list(unit.parameters()) + (list(head.parameters()) if head is not None else [])
        # foreach=None: PyTorch's choice, the multi-tensor step on CUDA. Weight decay is added to the
        # gradients in place here instead of by SGD, whose multi-tensor step would hold a copy of all
        # the unit's gradients during the step (a peak of its own, not linear in the batch); the
        # update is the same (SGD adds weight_decay * param to the gradient before momentum).
        self.params = params
        self.weight_decay = weight_decay
        self.grad_sync = grad_sync
        """Called on the parameters after backward, before decay and the step:
        data-parallel ranks average their gradients there (runtime/distributed.py)."""
        self.precision = precision
        """The forward and the loss run under its autocast; fp16 scales the loss with this unit's own scaler."""
        self.scaler = precision.scaler()
        self.opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0, foreach=foreach)
        self.schedule = Schedule(schedule, total_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.schedule)

    def extend(self, total_steps: int) -> None:
        """Stretch the schedule to ``total_steps`` (a block granted extra
        epochs): the cosine is recomputed over the longer horizon, so the
        rate steps up to where a schedule of that length would be and decays
        to zero at the new end, instead of training on at zero."""
        self.schedule.total = max(self.schedule.total, int(total_steps))

    def modules(self) -> list[nn.Module]:
        return [self.unit] + ([self.head] if self.head is not None else [])

    def train(self, mode: bool = True) -> None:
        for m in self.modules():
            m.train(mode)

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.head(out) if self.head is not None else out

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with self.precision.autocast():
            out = self.unit(self.precision.format_input(x.detach()))
            logits = self.logits(out)
            loss = F.cross_entropy(logits, y)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
        if self.grad_sync is not None:
            self.grad_sync(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)  # decay is added to true gradients
        if self.weight_decay:
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_add_(grads, [p for p in self.params if p.grad is not None], alpha=self.weight_decay)
        if self.scaler is None:
            self.opt.step()
        else:
            self.scaler.step(self.opt)  # skipped when a gradient overflowed; the scale then shrinks
            self.scaler.update()
        self.opt.zero_grad(set_to_none=True)  # free grads before the next unit runs
        self.sched.step()
        correct = (logits.detach().argmax(1) == y).sum()
        return out.detach(), loss.detach() * y.shape[0], correct

    def state_dict(self) -> dict:
        state = {
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "head": None if self.head is None else self.head.state_dict(),
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        for g in self.opt.param_groups:  # decay is applied in step(), never by SGD (older checkpoints had it there)
            g["weight_decay"] = 0.0
        self.sched.load_state_dict(state["sched"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.head is not None:
            self.head.load_state_dict(state["head"])


def shuffle_seed(seed: int, block: int) -> int:
    """The shuffle seed of ``block``'s epoch 0 (epoch ``e`` adds ``e``); the
    planner records it in the plan, and older plans derive it here."""
    return seed * 1_000_003 + block * 1009


def block_step(
    trainers: Sequence[UnitTrainer], inputs: list[torch.Tensor], y: torch.Tensor, stats: StepStats | None = None
) -> None:
    """One batch through a block. ``inputs`` holds the batch and is emptied,
    so the block's input can be freed once the first unit has used it."""
    h = inputs.pop()
    for i, t in enumerate(trainers):
        h, loss, correct = t.step(h, y)
        if stats is not None:
            stats.loss[i] += loss.double()
            stats.correct[i] += correct
    if stats is not None:
        stats.seen += y.shape[0]
