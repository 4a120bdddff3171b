"""A unit's step with each of its aux heads, composed from one step of the
unit and one step of each head alone (``profile_unit_options``): the
planner profiles every head option of every unit, and a full step per head
would cost as many unit steps as there are heads."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from neuroflux.planner.profile import (
    SGDConfig,
    StepProfile,
    fit_profile,
    measure_step,
    on_meta_first,
    prepared_trainer,
    profile_step,
    state_bytes,
)
from neuroflux.runtime.precision import FP32, Precision

__all__ = ["profile_unit_options"]


class _GradSource(nn.Module):
    """Stands in for a unit when a head is profiled alone: its output needs a
    gradient (as a unit's does) and has a backward node of its own, so the
    head's phase ends exactly as it does after a real unit."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.requires_grad_() * 1.0


def profile_unit_options(
    unit: nn.Module,
    heads: Sequence[nn.Module | None],
    input_shape: Sequence[int],
    output_shape: Sequence[int],
    num_classes: int,
    *,
    fake_mode: torch._subclasses.fake_tensor.FakeTensorMode,
    batches: tuple[int, int] = (8, 16),
    sgd: SGDConfig | None = None,
    foreach: bool | None = None,
    fake_heads: Callable[[], Sequence[nn.Module | None]] | None = None,
    precision: Precision = FP32,
    dtypes: tuple[torch.dtype, torch.dtype] = (torch.float32, torch.float32),
) -> list[StepProfile]:
    """``[profile_step(unit, h, ...) for h in heads]``, composed from one
    step of the unit (with the first head) and one step of each head alone,
    instead of a full step per head. A lone head may be None (the model's own).

    A step runs in three phases: the unit's forward; the head's forward,
    loss and backward (parameter gradients included); the unit's backward and
    the optimizer step. A head changes only the middle phase, and what it
    leaves for the last one (its logits and gradients, of fixed size), so
    with ``m`` the memory at the head's start and ``r`` what the head leaves:

        peak(h) = max(peak before the head,
                      m + head phase peak(h) - m_h,
                      last phase peak(h*) - r(h*) + r(h))  + static(h) - static(h*)

    FLOPs, ops and traffic add up: unit step(h*) - head alone(h*) + head alone(h).
    Equal to the full steps byte for byte (a test holds it to that on every
    zoo unit and head)."""
    sgd = sgd or SGDConfig()
    common: dict[str, Any] = dict(fake_mode=fake_mode, batches=batches, sgd=sgd, foreach=foreach, precision=precision)
    if len(heads) < 2:
        rebuilt = None if fake_heads is None else lambda i: lambda: fake_heads()[i]
        return [
            profile_step(
                unit, h, input_shape, num_classes, fake_head=rebuilt and rebuilt(i), input_dtype=dtypes[0], **common
            )
            for i, h in enumerate(heads)
        ]
    assert batches[1] > batches[0]
    shapes = (input_shape, output_shape, num_classes)
    return on_meta_first(
        lambda mode, unit, *heads: _composed(
            mode, unit, heads, *shapes, batches=batches, sgd=sgd, foreach=foreach, precision=precision, dtypes=dtypes
        ),
        [unit, *heads],
        fake_mode,
        fake_modules=None if fake_heads is None else lambda: [unit, *fake_heads()],
        meta=not precision.mixed,
    )


def _composed(
    mode: Any,
    unit: nn.Module,
    heads: Sequence[nn.Module],
    input_shape: Sequence[int],
    output_shape: Sequence[int],
    num_classes: int,
    *,
    batches: tuple[int, int],
    sgd: SGDConfig,
    foreach: bool | None,
    precision: Precision,
    dtypes: tuple[torch.dtype, torch.dtype],
) -> list[StepProfile]:
    """``profile_unit_options``'s work, with the modules' tensors living in ``mode``."""
    with mode:
        ref = prepared_trainer(unit, heads[0], sgd, foreach, precision)
        whole = [measure_step(ref, input_shape, num_classes, b, mark_head=True, dtype=dtypes[0]) for b in batches]
        ref_static = state_bytes(ref.modules(), ref.opt)
        alone = []
        for h in heads:
            t = prepared_trainer(_GradSource(), h, sgd, foreach, precision)
            alone.append(
                (
                    state_bytes(t.modules(), t.opt),
                    [measure_step(t, output_shape, num_classes, b, mark_head=True, dtype=dtypes[1]) for b in batches],
                )
            )
    out = []
    _, ref_alone = alone[0]
    for head_static, head_alone in alone:
        static = ref_static + head_static - alone[0][0]
        peaks, flops, traffic = [], [], []
        for w, ra, ha in zip(whole, ref_alone, head_alone):
            (start, before), (bwd_start, _) = w.marks
            (h_start, _), (h_end, h_peak) = ha.marks
            (r_start, _), (r_end, _) = ra.marks
            left, ref_left = h_end - h_start, r_end - r_start
            peaks.append(max(before, start + h_peak - h_start, w.segment_peak - ref_left + left) + static - ref_static)
            flops.append(float(w.flops - ra.flops + ha.flops))
            traffic.append(float(w.traffic - ra.traffic + ha.traffic))
        ops = whole[-1].ops - ref_alone[-1].ops + head_alone[-1].ops
        out.append(fit_profile(static, peaks, flops, ops, batches, traffic))
    return out
