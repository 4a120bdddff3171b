"""Device memory the fake-tensor trace cannot see: the math libraries'
workspaces and a training step's overhead on the device, measured on a
reference network (``DeviceProfile.workspace_bytes``, ``step_overhead_bytes``
and ``activation_scale``; see ``device_profile``).

``workspace_bytes`` is the memory the math libraries keep for the whole run
that no tensor accounts for (cuBLAS allocates a workspace per handle through
PyTorch's allocator: one for the forward thread, one for autograd's backward
thread, 32 MiB each on Hopper). Plans include it in every predicted peak.
Profiles without it get ``DEFAULT_CUDA_WORKSPACE_BYTES`` on CUDA, 0 on CPU.

``step_overhead_bytes`` and ``activation_scale`` calibrate the fake-tensor
memory model to the device: a training step on CUDA allocates more than the
tensors a CPU trace sees (cuDNN workspaces, the caching allocator's rounding).
``measure_memory_calibration`` runs a reference network's step on the device
and compares it with the planner's prediction for it; plans then add the
overhead to every unit's step and scale its per-sample bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from neuroflux.planner.profile import SGDConfig
    from neuroflux.runtime.train import UnitTrainer

__all__ = [
    "DEFAULT_CUDA_CALIBRATION",
    "DEFAULT_CUDA_WORKSPACE_BYTES",
    "MemoryCalibration",
    "measure_memory_calibration",
    "measure_workspace_bytes",
]

DEFAULT_CUDA_WORKSPACE_BYTES = 2 * 32 * 2**20 + 2**20
"""Two cuBLAS handles at Hopper's default 32 MiB workspace, plus the 1 MiB
measured beside them on an H200 (torch 2.11, CUDA 13): the most any current
GPU's default needs, so plans made without a measured profile stay safe."""


@dataclass(frozen=True)
class MemoryCalibration:
    """How a device's training step exceeds the fake-tensor prediction:
    ``dyn_fixed + step_overhead_bytes`` and ``dyn_per_sample * activation_scale``."""

    step_overhead_bytes: int = 0
    activation_scale: float = 1.0


DEFAULT_CUDA_CALIBRATION = MemoryCalibration(step_overhead_bytes=13_653_600, activation_scale=1.11)
"""Measured on an H200 (torch 2.11, CUDA 13; benchmarks/results/gpu-h200-memory-probe.json):
ResNet-18's step at batch 16 and 128 held 13.0 MiB more fixed and 10.8% more
per sample than the fake-tensor prediction. Used for CUDA profiles measured
before calibration existed, and for CUDA plans made without a profile."""


def measure_workspace_bytes(dev) -> int:
    """Bytes the allocator holds after one matmul forward and backward once
    every tensor is freed: the cuBLAS workspaces of the forward thread and of
    autograd's backward thread. Exact only in a process that has not used
    cuBLAS yet (``python -m neuroflux.planner.device_profile`` is one); in
    another it returns the default, since the workspaces already exist."""
    import torch

    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    x = torch.randn(64, 64, device=dev, requires_grad=True)
    (x @ x).sum().backward()
    del x
    torch.cuda.synchronize(dev)
    held = torch.cuda.memory_allocated(dev) - base
    return held if held > 0 else DEFAULT_CUDA_WORKSPACE_BYTES


def measure_memory_calibration(
    dev,
    *,
    batches: tuple[int, int] = (16, 64),
    floor: bool = True,
) -> MemoryCalibration:
    """Run a reference network's training step (the runtime's UnitTrainer)
    on ``dev`` at two batch sizes and compare its memory beyond the resident
    state with the planner's fake-tensor prediction of the same step. On the
    CPU the measurement is MemTracker's, which the prediction matches
    exactly (a test holds it to that, with ``floor=False``: by default a
    device never calibrates below the prediction)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from neuroflux.planner.profile import SGDConfig, profile_step

    sgd = SGDConfig()
    fake = FakeTensorMode()
    with fake:
        fake_model = _reference_network()
    pred = profile_step(
        fake_model,
        None,
        _REFERENCE_SHAPE,
        _REFERENCE_CLASSES,
        fake_mode=fake,
        sgd=sgd,
        foreach=dev.type == "cuda" or None,
    )
    dyn = _measured_step_bytes(dev, batches=batches, sgd=sgd)
    per = (dyn[1] - dyn[0]) / (batches[1] - batches[0])
    fixed = dyn[0] - per * batches[0]
    scale = math.ceil(1000 * per / pred.dyn_per_sample_bytes) / 1000 if pred.dyn_per_sample_bytes else 1.0
    overhead = math.ceil(fixed - pred.dyn_fixed_bytes)
    if floor:
        scale, overhead = max(1.0, scale), max(0, overhead)
    return MemoryCalibration(step_overhead_bytes=overhead, activation_scale=scale)


#: The reference network's input (one sample) and classes.
_REFERENCE_SHAPE, _REFERENCE_CLASSES = (3, 32, 32), 10


def _reference_network() -> nn.Module:
    """A small CIFAR-style conv net: the step the calibration measures."""
    from torch import nn

    def cbr(i: int, o: int, s: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *cbr(3, 64),
        *cbr(64, 64),
        *cbr(64, 128, 2),
        *cbr(128, 128),
        *cbr(128, 256, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


def _measured_step_bytes(dev, *, batches: tuple[int, int], sgd: SGDConfig) -> list[float]:
    """Memory the reference network's real training step allocates beyond
    its resident state on ``dev``, at each of ``batches`` (after one step
    to reach steady state: momentum buffers, library handles)."""
    import torch

    from neuroflux.runtime.train import UnitTrainer

    torch.manual_seed(0)
    model = _reference_network().to(dev)
    t = UnitTrainer(
        model,
        None,
        lr=sgd.lr,
        momentum=sgd.momentum,
        weight_decay=sgd.weight_decay,
        total_steps=10**6,
        schedule="constant",
    )
    t.train(True)

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(b, *_REFERENCE_SHAPE, device=dev), torch.randint(0, _REFERENCE_CLASSES, (b,), device=dev)

    t.step(*batch(batches[0]))  # momentum buffers, library handles: steady state
    dyn = []
    for b in batches:
        x, y = batch(b)
        dyn.append(_step_bytes(dev, t, model, x, y))
        del x, y
    return dyn


def _step_bytes(dev, t: UnitTrainer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """One step's peak memory beyond the state it starts from: CUDA's
    allocator statistics, or on the CPU the planner's own accounting
    (MemTracker) on real tensors."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from neuroflux.common import tracker_peak_bytes
    from neuroflux.planner.profile import state_bytes

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        t.step(x, y)
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - start
    tracker = MemTracker()
    tracker.track_external(model, t.opt)
    with tracker:
        t.step(x, y)
    peak = tracker_peak_bytes(tracker)
    return peak - state_bytes([model], t.opt)
