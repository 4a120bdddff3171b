"""Profiling training steps: memory from fake tensors, time from FLOPs or
measurement.

Memory: a training step (forward, cross-entropy, backward, SGD step,
``zero_grad(set_to_none=True)``) runs on fake tensors under PyTorch's own
``MemTracker``, so planning needs no real memory and no GPU. Two batch sizes
give ``dyn_fixed + dyn_per_sample * b`` exactly (fake-tensor accounting is
linear in the batch); ``static`` is params, buffers and optimizer state.
What the numbers cover: tensor memory seen by the allocator. Not covered:
the CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation, which
the plan's safety margin absorbs.

Time (``--cost``): ``flops`` counts FLOPs with ``FlopCounterMode`` and ops
with a dispatch counter, then ``step = ops * op_overhead + flops / throughput``
with throughput and overhead measured on the planning machine (or given);
``measure`` times real steps on the device at two batch sizes.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker


class _PeakTracker(MemTracker):
    """MemTracker's accounting, keeping only the whole-step peak. The stock
    tracker also refreshes every tracked module's own peak after each op
    (a loop over all modules per op: two thirds of planning time on deep
    networks); the step's total peak, all the planner reads, is the same."""

    _TOTAL = "Total"

    def _update_peak_stats(self, peak_state) -> None:  # noqa: ANN001
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[self._TOTAL]:
                self._peak_mem[dev] = snap[self._TOTAL]
                self._peak_mem_snap[dev] = dict(snap)


def peak_tracker() -> MemTracker:
    """The lean tracker where this torch's MemTracker has the internals it
    relies on, else the stock one."""
    probe = MemTracker()
    ok = all(hasattr(probe, a) for a in ("_curr_mem_snap", "_peak_mem", "_peak_mem_snap", "_update_peak_stats"))
    return _PeakTracker() if ok else probe
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from neuroflux.runtime.train import UnitTrainer

__all__ = ["StepProfile", "DeviceSpeed", "profile_step", "forward_flops", "measure_device_speed", "measure_step_time", "SGDConfig",
           "peak_tracker", "state_bytes"]


@dataclass(frozen=True, kw_only=True)
class SGDConfig:
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

    def peak_bytes(self, batch: int) -> int:
        return self.static_bytes + self.dyn_fixed_bytes + self.dyn_per_sample_bytes * batch


@dataclass(frozen=True, kw_only=True)
class DeviceSpeed:
    flops_per_s: float
    op_overhead_s: float

    def step_s(self, p: StepProfile, batch: int) -> float:
        return p.ops * self.op_overhead_s + (p.flops_fixed + p.flops_per_sample * batch) / self.flops_per_s


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += 1
        return func(*args, **(kwargs or {}))


def state_bytes(modules: Sequence[nn.Module], opt: torch.optim.Optimizer) -> int:
    """Params, buffers and optimizer state: resident for the whole block."""
    tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                tensors[id(v)] = v
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _trainer(unit: nn.Module, head: nn.Module | None, sgd: SGDConfig, foreach: bool | None = None) -> UnitTrainer:
    return UnitTrainer(unit, head, lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay, total_steps=1_000_000,
                       schedule="constant", foreach=foreach)


def _step(t: UnitTrainer, x: torch.Tensor, y: torch.Tensor) -> None:
    # The output is held until the step returns, as the runtime holds it for
    # the next unit: it is alive during this unit's optimizer step.
    out = t.step(x, y)
    del out


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
) -> StepProfile:
    """Memory, FLOPs and op count of one runtime training step
    (``UnitTrainer.step``) of ``unit`` with ``head``, whose parameters live in
    ``fake_mode``, at two batch sizes. ``foreach=True`` profiles the
    optimizer step PyTorch runs on CUDA (the fake tensors live on the CPU,
    where the default is the per-parameter loop)."""
    b1, b2 = batches
    assert b2 > b1
    peaks, flops = [], []
    ops = 0
    with fake_mode:
        t = _trainer(unit, head, sgd, foreach)
        t.train(True)
        # Steady-state memory: the momentum buffers a first step would create,
        # made directly (a fake step costs as much as a profiled one).
        if sgd.momentum:
            for group in t.opt.param_groups:
                for p in group["params"]:
                    t.opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        static = state_bytes(t.modules(), t.opt)
        for b in batches:
            tracker = peak_tracker()
            tracker.track_external(*t.modules(), t.opt)
            counter = _OpCounter()
            # Reference cycles (activation checkpointing keeps some) are freed
            # by the garbage collector at whatever moment it runs: hold it off
            # during the step, so that the peak is the same on every call
            # (plans are reproducible in one process too). A young-generation
            # pass first is cheap (a full collection costs 0.2 s here).
            gc.collect(0)
            gc.disable()
            try:
                with tracker, FlopCounterMode(display=False) as fc, counter:
                    _step(t, torch.randn(b, *input_shape), torch.randint(0, num_classes, (b,)))
            finally:
                gc.enable()
            snap = tracker.get_tracker_snapshot("peak")
            peaks.append(sum(dev["Total"] for dev in snap.values()))
            flops.append(float(fc.get_total_flops()))
            ops = counter.count
    per_sample = max(0, math.ceil((peaks[1] - peaks[0]) / (b2 - b1)))
    dyn_fixed = max(0, peaks[0] - static - per_sample * b1)
    f_per = max(0.0, (flops[1] - flops[0]) / (b2 - b1))
    return StepProfile(
        static_bytes=static,
        dyn_fixed_bytes=dyn_fixed,
        dyn_per_sample_bytes=per_sample,
        flops_fixed=max(0.0, flops[0] - f_per * b1),
        flops_per_sample=f_per,
        ops=ops,
    )


def forward_flops(module: nn.Module, input_shape: Sequence[int], *, fake_mode, batch: int = 8) -> float:
    """FLOPs per sample of an inference forward (for cache writes)."""
    module.eval()
    try:
        with fake_mode, torch.no_grad(), FlopCounterMode(display=False) as fc:
            module(torch.randn(batch, *input_shape))
    finally:
        module.train()
    return fc.get_total_flops() / batch


def measure_device_speed(device: torch.device | str = "cpu") -> DeviceSpeed:
    """Matmul throughput and per-op dispatch overhead of this device."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync()
    reps = 20 if device.type == "cuda" else 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    flops_per_s = 2 * n**3 * reps / (time.perf_counter() - t0)
    x = torch.ones(8, device=device)
    for _ in range(50):
        x = x + 1
    sync()
    t0 = time.perf_counter()
    for _ in range(500):
        x = x + 1
    sync()
    overhead = (time.perf_counter() - t0) / 500
    return DeviceSpeed(flops_per_s=flops_per_s, op_overhead_s=overhead)


def measure_step_time(
    module: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    device: torch.device,
    batches: tuple[int, int],
    reps: int = 3,
    sgd: SGDConfig = SGDConfig(),
) -> tuple[float, float]:
    """(fixed_s, per_sample_s) of a real training step on ``device``
    (median of ``reps`` after a warm-up), from two batch sizes."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    module.to(device)
    t = _trainer(module, None, SGDConfig(lr=0.0, momentum=sgd.momentum))  # lr 0: profiling leaves weights alone
    t.train(True)
    times = []
    for b in batches:
        x = torch.randn(b, *input_shape, device=device)
        y = torch.randint(0, num_classes, (b,), device=device)
        _step(t, x, y)
        sync()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            _step(t, x, y)
            sync()
            samples.append(time.perf_counter() - t0)
        times.append(statistics.median(samples))
    per = max(0.0, (times[1] - times[0]) / (batches[1] - batches[0]))
    return max(0.0, times[0] - per * batches[0]), per

