"""Profiling training steps: memory from meta and fake tensors, time from
FLOPs or measurement.

Memory: a training step (forward, cross-entropy, backward, SGD step,
``zero_grad(set_to_none=True)``) runs on meta copies of the unit and its heads
(on fake tensors where an op has no meta kernel) under ``StepMeter``
(``step_meter.py``), which keeps the live-storage accounting PyTorch's
``MemTracker`` keeps, so planning needs no real memory and no GPU. Two batch
sizes give ``dyn_fixed + dyn_per_sample * b`` exactly (the accounting is
linear in the batch); ``static`` is params, buffers and optimizer state. A
unit's steps with several heads are composed from one step of the unit and
one of each head alone (``profile_unit_options``); an inference forward (a
recomputed prefix) is profiled apart (``profile_forward``).
What the numbers cover: tensor memory seen by the allocator. Not covered:
the CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation, which
the plan's safety margin absorbs.

Time (``--cost``): ``flops`` counts, in the same StepMeter, FLOPs
(``FlopCounterMode``'s formulas, the convolution backward's corrected for
groups), dispatched ops and the bytes they read and write, then ``step = ops
* op_overhead + flops / throughput + traffic / bandwidth`` with the speeds of
the device profile (fitted to reference training steps: ``step_costs.py``);
``measure`` times real steps on the device at two batch sizes.
"""

from __future__ import annotations

import copy
import functools
import gc
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from neuroflux.common import seconds_per_call
from neuroflux.planner.step_meter import StepMeter, flop_counter
from neuroflux.runtime.host_memory import keep_freed_host_memory
from neuroflux.runtime.precision import FP32, MemoryFormat, Precision, PrecisionName
from neuroflux.runtime.train import UnitTrainer

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "StepProfile",
    "DeviceSpeed",
    "profile_step",
    "forward_flops",
    "ForwardProfile",
    "profile_forward",
    "measure_step_time",
    "SGDConfig",
    "StepMeter",
    "state_bytes",
    "state_tensors",
]


@dataclass(frozen=True, kw_only=True)
class SGDConfig:
    """The local optimizer's recipe. These defaults are the only ones:
    ``PlanConfig`` and ``nf-plan``'s flags take theirs from here."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True, kw_only=True)
class StepProfile:
    static_bytes: int
    dyn_fixed_bytes: int
    dyn_per_sample_bytes: int
    flops_fixed: float
    flops_per_sample: float
    ops: int
    """Dispatched aten ops per step (drives the fixed per-step overhead)."""
    traffic_fixed: float = 0.0
    traffic_per_sample: float = 0.0
    """Bytes the step's ops read and write (StepMeter.traffic), fixed and per sample."""

    def peak_bytes(self, batch: int) -> int:
        return self.static_bytes + self.dyn_fixed_bytes + self.dyn_per_sample_bytes * batch


@dataclass(frozen=True, kw_only=True)
class DeviceSpeed:
    """The cost model: a step costs ``ops * op_overhead_s + flops / flops_per_s
    + traffic / bandwidth_bytes_per_s`` (the last term only where the profile
    measured a bandwidth)."""

    flops_per_s: float
    op_overhead_s: float
    bandwidth_bytes_per_s: float | None = None

    def traffic_s(self, traffic: float) -> float:
        return traffic / self.bandwidth_bytes_per_s if self.bandwidth_bytes_per_s else 0.0

    def fixed_s(self, p: StepProfile) -> float:
        """The part of a step's time that does not grow with the batch."""
        return p.ops * self.op_overhead_s + p.flops_fixed / self.flops_per_s + self.traffic_s(p.traffic_fixed)

    def per_sample_s(self, p: StepProfile) -> float:
        return p.flops_per_sample / self.flops_per_s + self.traffic_s(p.traffic_per_sample)

    def step_s(self, p: StepProfile, batch: int) -> float:
        return self.fixed_s(p) + self.per_sample_s(p) * batch


def state_tensors(
    modules: Sequence[nn.Module], opt: torch.optim.Optimizer, *, grads: bool = True
) -> list[torch.Tensor]:
    """Params, buffers, (``grads``) their gradients and the optimizer's state tensors, once each."""
    tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
    if grads:
        for p in list(tensors.values()):
            if p.grad is not None:
                tensors[id(p.grad)] = p.grad
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                tensors[id(v)] = v
    return list(tensors.values())


def state_bytes(modules: Sequence[nn.Module], opt: torch.optim.Optimizer) -> int:
    """Params, buffers and optimizer state: resident for the whole block."""
    return sum(t.numel() * t.element_size() for t in state_tensors(modules, opt, grads=False))


def local_trainer(
    unit: nn.Module,
    head: nn.Module | None,
    sgd: SGDConfig,
    foreach: bool | None = None,
    precision: Precision = FP32,
) -> UnitTrainer:
    return UnitTrainer(
        unit,
        head,
        lr=sgd.lr,
        momentum=sgd.momentum,
        weight_decay=sgd.weight_decay,
        total_steps=1_000_000,
        schedule="constant",
        foreach=foreach,
        precision=precision,
    )


def held_step(t: UnitTrainer, x: torch.Tensor, y: torch.Tensor) -> None:
    # The output is held until the step returns, as the runtime holds it for
    # the next unit: it is alive during this unit's optimizer step.
    out = t.step(x, y)
    del out


class _AssumeFinite(torch.amp.GradScaler):
    """fp16's loss scaler as profiled: the same tensors and ops, but the step
    is taken without asking whether a gradient overflowed (an ``.item()``,
    which fake tensors cannot answer; the step is the common case)."""

    def _maybe_opt_step(self, optimizer: Any, optimizer_state: Any, *args: Any, **kwargs: Any) -> Any:
        return optimizer.step(*args, **kwargs)


def prepared_trainer(
    unit: nn.Module, head: nn.Module | None, sgd: SGDConfig, foreach: bool | None, precision: Precision
) -> UnitTrainer:
    t = local_trainer(unit, head, sgd, foreach, precision)
    if t.scaler is not None:
        t.scaler = _AssumeFinite(precision.device_type)
    t.train(True)
    # Steady-state memory: the momentum buffers a first step would create,
    # made directly (a fake step costs as much as a profiled one).
    if sgd.momentum:
        for group in t.opt.param_groups:
            for p in group["params"]:
                t.opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return t


def measure_step(
    t: UnitTrainer,
    input_shape: Sequence[int],
    num_classes: int,
    batch: int,
    *,
    mark_head: bool = False,
    dtype: torch.dtype = torch.float32,
) -> StepMeter:
    """One step of ``t`` under a StepMeter. ``mark_head``: mark where the
    head starts and where the unit's backward starts (the gradient of the
    unit's output is complete: the head's backward, parameter gradients
    included, is over; autograd runs AccumulateGrad before any other node)."""
    meter = StepMeter(state_tensors(t.modules(), t.opt))
    handles = []
    if mark_head:
        assert t.head is not None, "mark_head needs a head to mark"
        handles.append(t.head.register_forward_pre_hook(lambda m, a: meter.mark()))

        def on_output(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            out.register_hook(lambda grad: meter.mark())

        handles.append(t.unit.register_forward_hook(on_output))
    # Reference cycles (activation checkpointing keeps some) are freed by the
    # garbage collector at whatever moment it runs: hold it off during the
    # step, so that the peak is the same on every call (plans are
    # reproducible in one process too). A young-generation pass first is
    # cheap (a full collection costs 0.2 s here).
    gc.collect(0)
    gc.disable()
    try:
        with meter:
            held_step(t, t.precision.randn(batch, input_shape, dtype=dtype), torch.randint(0, num_classes, (batch,)))
    finally:
        gc.enable()
        for h in handles:
            h.remove()
    if mark_head and len(meter.marks) != 2:
        raise RuntimeError(
            f"expected the head and the unit's backward to start once each, saw {len(meter.marks)} marks"
        )
    return meter


def fit_profile(
    static: int,
    peaks: Sequence[int],
    flops: Sequence[float],
    ops: int,
    batches: tuple[int, int],
    traffic: Sequence[float] = (0.0, 0.0),
) -> StepProfile:
    b1, b2 = batches
    per_sample = max(0, math.ceil((peaks[1] - peaks[0]) / (b2 - b1)))
    f_per = max(0.0, (flops[1] - flops[0]) / (b2 - b1))
    t_per = max(0.0, (traffic[1] - traffic[0]) / (b2 - b1))
    return StepProfile(
        traffic_fixed=max(0.0, traffic[0] - t_per * b1),
        traffic_per_sample=t_per,
        static_bytes=static,
        dyn_fixed_bytes=max(0, peaks[0] - static - per_sample * b1),
        dyn_per_sample_bytes=per_sample,
        flops_fixed=max(0.0, flops[0] - f_per * b1),
        flops_per_sample=f_per,
        ops=ops,
    )


def profile_step(
    unit: nn.Module,
    head: nn.Module | None,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    fake_mode: torch._subclasses.fake_tensor.FakeTensorMode,
    batches: tuple[int, int] = (8, 16),
    sgd: SGDConfig = SGDConfig(),
    foreach: bool | None = None,
    fake_head: Callable[[], nn.Module | None] | None = None,
    precision: Precision = FP32,
    input_dtype: torch.dtype = torch.float32,
) -> StepProfile:
    """Memory, FLOPs and op count of one runtime training step
    (``UnitTrainer.step``) of ``unit`` with ``head``, whose parameters live in
    ``fake_mode`` (or on the meta device, with ``fake_head`` building the
    head in ``fake_mode`` should meta tensors not do), at two batch sizes.
    ``foreach=True`` profiles the optimizer step PyTorch runs on CUDA (the
    fake tensors live on the CPU, where the default is the per-parameter
    loop). ``precision``: the step runs under its autocast, as the runtime's,
    on an input of ``input_dtype`` (what the previous unit hands over)."""
    assert batches[1] > batches[0]

    def run(mode: Any, unit: nn.Module, head: nn.Module | None) -> StepProfile:
        with mode:
            t = prepared_trainer(unit, head, sgd, foreach, precision)
            meters = [measure_step(t, input_shape, num_classes, b, dtype=input_dtype) for b in batches]
            static = state_bytes(t.modules(), t.opt)
        return fit_profile(
            static,
            [m.peak for m in meters],
            [float(m.flops) for m in meters],
            meters[-1].ops,
            batches,
            [float(m.traffic) for m in meters],
        )

    return on_meta_first(
        run,
        [unit, head],
        fake_mode,
        fake_modules=None if fake_head is None else lambda: [unit, fake_head()],
        meta=not precision.mixed,
    )


def _meta_copy(module: nn.Module | None) -> nn.Module | None:
    """A copy of ``module`` whose parameters and buffers are meta tensors of
    the same shapes, strides and dtypes (the original, on fake tensors, is
    left as it is)."""
    if module is None:
        return None
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(_meta_like(p), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = _meta_like(b)
    return copy.deepcopy(module, memo)


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def on_meta_first(
    run: Callable[..., T],
    modules: Sequence[nn.Module | None],
    fake_mode: torch._subclasses.fake_tensor.FakeTensorMode,
    *,
    fake_modules: Callable[[], Sequence[nn.Module | None]] | None = None,
    meta: bool = True,
) -> T:
    """``run(mode, *modules)`` on meta copies of the modules under
    ``torch.device("meta")``; where that fails (an op with no meta kernel,
    which fake tensors run on real zeros instead), on the modules themselves
    under ``fake_mode`` (or on ``fake_modules()``, where some of ``modules``
    were built on the meta device). ``meta=False`` goes straight to
    ``fake_mode``: autocast applies to CPU (fake) tensors, not meta ones.

    Why: a fake tensor runs the same meta kernel inside a Python subclass
    whose per-op cache key and output wrapping cost more than the kernel
    (most of planning time on deep networks); on meta tensors the step runs
    faster. Bytes, FLOPs and op counts of a training step are the same on
    both (the profiling tests and ``benchmarks/zoo_plans.py`` hold them to
    it; an eval-mode forward is not: see ``profile_forward``). A real error
    in the model is raised by the fake run, as before."""
    try:
        if not meta:
            raise NotImplementedError("mixed precision: autocast does not apply to meta tensors")
        metas = [_meta_copy(m) for m in modules]
        return run(torch.device("meta"), *metas)
    except Exception as e:
        log.debug("meta profiling failed (%s: %s); profiling on fake tensors", type(e).__name__, e)
        return run(fake_mode, *(modules if fake_modules is None else fake_modules()))


@dataclass(frozen=True, kw_only=True)
class ForwardProfile:
    """An inference forward of a unit alone: what recomputing it costs."""

    flops_per_sample: float
    weight_bytes: int
    """Parameters and buffers."""
    fixed_bytes: int
    per_sample_bytes: int
    """Peak beyond the weights (input, intermediates, output) at batch b: fixed + per_sample * b."""
    ops: int
    """Dispatched ops of one forward (its fixed per-call cost)."""
    traffic_per_sample: float = 0.0
    """Bytes its ops read and write, per sample."""


def profile_forward(
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    fake_mode,
    batches: tuple[int, int] = (8, 16),
    precision: Precision = FP32,
    input_dtype: torch.dtype = torch.float32,
) -> ForwardProfile:
    """Memory and FLOPs of ``module``'s eval-mode forward under ``no_grad``
    (how a frozen prefix is recomputed for a later block), on fake tensors,
    at two batch sizes (exactly linear in the batch)."""
    # On fake tensors, not meta: in eval mode the CPU kernel of batch norm
    # returns empty saved statistics where the meta kernel returns C floats.
    return _forward(fake_mode, module, input_shape, batches=batches, precision=precision, dtype=input_dtype)


def _forward(
    mode: Any,
    module: nn.Module,
    input_shape: Sequence[int],
    *,
    batches: tuple[int, int],
    precision: Precision,
    dtype: torch.dtype,
) -> ForwardProfile:
    module.eval()
    precision.format_modules(module)
    try:
        with mode, torch.no_grad(), precision.autocast():
            weights = [*module.parameters(), *module.buffers()]
            peaks, flops, traffic, ops = [], [], [], 0
            for b in batches:
                meter = StepMeter(weights)
                gc.collect(0)
                with meter:
                    module(precision.randn(b, input_shape, dtype=dtype))
                peaks.append(meter.peak - meter.marks[0][0] if meter.marks else meter.peak)
                flops.append(float(meter.flops))
                traffic.append(float(meter.traffic))
                ops = meter.ops
            static = sum(t.untyped_storage().nbytes() for t in {id(w.untyped_storage()): w for w in weights}.values())
    finally:
        module.train()
    b1, b2 = batches
    per = max(0, math.ceil((peaks[1] - peaks[0]) / (b2 - b1)))
    return ForwardProfile(
        flops_per_sample=flops[1] / b2,
        traffic_per_sample=traffic[1] / b2,
        weight_bytes=static,
        fixed_bytes=max(0, peaks[0] - static - per * b1),
        per_sample_bytes=per,
        ops=ops,
    )


def forward_flops(module: nn.Module, input_shape: Sequence[int], *, fake_mode, batch: int = 8) -> float:
    """FLOPs per sample of an inference forward (for cache writes)."""
    module.eval()
    try:
        with fake_mode, torch.no_grad(), flop_counter() as fc:
            module(torch.randn(batch, *input_shape))
    finally:
        module.train()
    return fc.get_total_flops() / batch


def measure_step_time(
    module: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    device: torch.device,
    batches: tuple[int, int],
    reps: int = 3,
    sgd: SGDConfig = SGDConfig(),
    precision: PrecisionName = "fp32",
    memory_format: MemoryFormat = "contiguous",
    input_dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """(fixed_s, per_sample_s) of a real training step on ``device``
    (median of ``reps`` after a warm-up), from two batch sizes, at the plan's
    ``precision`` on inputs of ``input_dtype`` (a unit fed from a bf16 cache
    gets bf16)."""
    if torch.device(device).type == "cpu":
        keep_freed_host_memory()  # timed as the runtime runs it
    module.to(device)
    sgd0 = SGDConfig(lr=0.0, momentum=sgd.momentum)  # lr 0: profiling leaves weights alone
    t = local_trainer(module, None, sgd0, precision=Precision(precision, torch.device(device).type, memory_format))
    t.train(True)
    times = []
    for b in batches:
        x = t.precision.randn(b, input_shape, device=device).to(input_dtype)
        y = torch.randint(0, num_classes, (b,), device=device)
        times.append(seconds_per_call(functools.partial(held_step, t, x, y), device=device, reps=reps, median=True))
    per = max(0.0, (times[1] - times[0]) / (batches[1] - batches[0]))
    return max(0.0, times[0] - per * batches[0]), per
