"""The cost model's three speeds, fitted to real training steps.

The planner prices a training step as ``ops * op_overhead_s + flops /
flops_per_s + traffic / bandwidth_bytes_per_s`` (``profile.DeviceSpeed``;
traffic is the bytes the step's ops read and write). Microbenchmarks (a
512x512 matmul, a dispatch of ``x + 1``) miss what a step pays: autograd's
nodes, the math library's per-call set-up, the thread pool's wake-ups, and
BatchNorm, ReLU and depthwise convolutions, which are bound by memory rather
than arithmetic. On this 2-core CPU the microbenchmarks' two speeds priced
MobileNetV2's and ShuffleNetV2's unit steps at 0.16x to 0.21x of their
measured time (``benchmarks/cost_model_fit.py``).

``measure_step_costs`` times the training steps of a small reference suite
of units with their aux heads (dense 3x3 convolutions as ResNets have them,
MobileNet's inverted residuals with depthwise convolutions; narrow at large
feature maps, wide at small ones; a small and a large batch), counts each
step's ops, FLOPs and traffic with the StepMeter that planning uses, and
fits the three speeds to the times (``fit_step_costs``: non-negative least
squares on the relative error). The suite is fixed, so a device gives the
same speeds up to timing noise; plans read them from a cached or committed
profile, never from a fresh measurement.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from neuroflux.common import seconds_per_call
from neuroflux.planner.profile import DeviceSpeed, SGDConfig, held_step, local_trainer, state_tensors
from neuroflux.planner.step_meter import StepMeter
from neuroflux.runtime.heads import PooledHead
from neuroflux.runtime.host_memory import keep_freed_host_memory
from neuroflux.runtime.precision import MemoryFormat, Precision

__all__ = [
    "StepSample",
    "fit_step_costs",
    "measure_step_costs",
    "reference_units",
    "relative_errors",
    "measure_device_speed",
    "measure_precision_speedup",
]


@dataclass(frozen=True)
class StepSample:
    """One reference step: what the planner counts for it, and its measured time."""

    name: str
    batch: int
    ops: int
    flops: float
    traffic: float
    """Bytes its ops read and write (StepMeter.traffic)."""
    seconds: float


def _conv_bn(c_in: int, c_out: int, k: int, *, groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    return [*layers, nn.ReLU(inplace=True)] if relu else layers


def reference_units() -> list[tuple[str, nn.Module, tuple[int, int, int]]]:
    """(name, unit, per-sample input shape): dense and inverted-residual
    units, narrow at 32x32, middling at 16x16, wide at 8x8."""
    units: list[tuple[str, nn.Module, tuple[int, int, int]]] = []
    for c, hw in ((16, 32), (64, 16), (128, 8)):
        dense = nn.Sequential(*_conv_bn(c, c, 3), *_conv_bn(c, c, 3))
        e = 4 * c
        inverted = nn.Sequential(*_conv_bn(c, e, 1), *_conv_bn(e, e, 3, groups=e), *_conv_bn(e, c, 1, relu=False))
        units += [(f"dense-{c}x{hw}", dense, (c, hw, hw)), (f"inverted-{c}x{hw}", inverted, (c, hw, hw))]
    return units


def _sample(
    name: str, unit: nn.Module, shape: tuple[int, int, int], batch: int, device, reps: int, precision: Precision
) -> StepSample:
    head = PooledHead(shape, shape[0], 10)
    # lr 0: the weights stay as built
    t = local_trainer(unit.to(device), head.to(device), SGDConfig(lr=0.0), precision=precision)
    t.train(True)
    x = precision.randn(batch, shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    step = functools.partial(held_step, t, x, y)
    step()  # momentum buffers: the steady state the planner profiles
    meter = StepMeter(state_tensors(t.modules(), t.opt, grads=False))
    with meter:
        step()
    seconds = seconds_per_call(step, device=device, reps=reps, warmup=2, median=True)
    return StepSample(name, batch, meter.ops, float(meter.flops), float(meter.traffic), seconds)


def _solve(rows: Sequence[Sequence[float]], active: Sequence[int]) -> list[float] | None:
    """Least squares of ``sum_k c_k * row[k] = 1`` over the ``active`` columns (the others 0)."""
    a = torch.tensor([[r[k] for k in active] for r in rows], dtype=torch.float64)
    if torch.linalg.matrix_rank(a) < len(active):
        return None
    sol = torch.linalg.lstsq(a, torch.ones(len(rows), 1, dtype=torch.float64)).solution.flatten().tolist()
    coef = [0.0] * len(rows[0])
    for k, c in zip(active, sol):
        coef[k] = c
    return coef


def fit_step_costs(samples: Sequence[StepSample]) -> tuple[float, float, float | None]:
    """(op_overhead_s, flops_per_s, bandwidth_bytes_per_s) minimising the
    squared relative error of ``ops * op_overhead_s + flops / flops_per_s +
    traffic / bandwidth`` against the samples' times, every coefficient at
    least 0 (non-negative least squares, by trying every set of free
    coefficients: there are three). A bandwidth the fit does not need is
    None (traffic free). Raises ValueError when the samples leave the
    throughput undetermined (no FLOPs, or times that ops and traffic
    alone explain)."""
    rows = [(s.ops / s.seconds, s.flops / s.seconds, s.traffic / s.seconds) for s in samples if s.seconds > 0]
    best: tuple[float, list[float]] | None = None
    # Fewest coefficients first; one more must lower the error by more than rounding does.
    for active in ((1,), (0, 1), (1, 2), (0, 1, 2)):
        coef = _solve(rows, active) if rows else None
        if coef is None or any(c < 0 for c in coef) or coef[1] <= 0:
            continue
        err = sum((sum(c * x for c, x in zip(coef, r)) - 1) ** 2 for r in rows)
        if best is None or err < best[0] - 1e-9 * len(rows):
            best = (err, coef)
    if best is None:
        raise ValueError("the reference steps do not determine a throughput (no FLOPs, or times their ops explain)")
    overhead, per_flop, per_byte = best[1]
    return overhead, 1.0 / per_flop, (1.0 / per_byte if per_byte > 0 else None)


def measure_step_costs(
    device: torch.device | str = "cpu", *, reps: int = 5, memory_format: MemoryFormat = "contiguous"
) -> tuple[float, float, float | None, list[StepSample]]:
    """Time the reference suite on ``device`` (each step the median of
    ``reps``, in fp32, activations laid out in ``memory_format``) and fit
    the cost model's speeds to it: (op_overhead_s, flops_per_s,
    bandwidth_bytes_per_s, the samples)."""
    dev = torch.device(device)
    precision = Precision("fp32", dev.type, memory_format)
    if dev.type == "cpu":
        keep_freed_host_memory()  # timed as the runtime runs it (``runtime.host_memory``)
    batches = (32, 256) if dev.type == "cuda" else (4, 32)
    torch.manual_seed(0)
    samples = [
        _sample(name, unit, shape, b, dev, reps, precision) for name, unit, shape in reference_units() for b in batches
    ]
    return (*fit_step_costs(samples), samples)


def relative_errors(
    samples: Sequence[StepSample], op_overhead_s: float, flops_per_s: float, bandwidth: float | None
) -> list[float]:
    """Predicted over measured time, per sample."""
    return [
        (s.ops * op_overhead_s + s.flops / flops_per_s + (s.traffic / bandwidth if bandwidth else 0.0)) / s.seconds
        for s in samples
    ]


def measure_device_speed(device: torch.device | str = "cpu") -> DeviceSpeed:
    """Matmul throughput and per-op dispatch overhead of this device."""
    device = torch.device(device)
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    matmul_s = seconds_per_call(lambda: a @ b, device=device, reps=20 if device.type == "cuda" else 10, warmup=3)
    flops_per_s = 2 * n**3 / matmul_s
    x = torch.ones(8, device=device)
    overhead = seconds_per_call(lambda: x + 1, device=device, reps=500, warmup=50)
    return DeviceSpeed(flops_per_s=flops_per_s, op_overhead_s=overhead)


def measure_precision_speedup(device: torch.device | str, dtype: torch.dtype, *, reps: int = 15) -> float:
    """How many times faster a reference convolution's forward and backward
    run under autocast at ``dtype`` than in fp32 on this device: what a
    mixed-precision step gains, measured on a convolution rather than a bare
    matmul (on an avx512_bf16 CPU a bf16 matmul runs 4.2x fp32's, a
    convolution's step about 2x). The two are timed alternately and their
    fastest calls compared, so that the machine's load falls on both alike."""
    device = torch.device(device)
    batch = 128 if device.type == "cuda" else 32
    conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).to(device)
    x = torch.randn(batch, 64, 32, 32, device=device, requires_grad=True)

    def seconds(mixed: bool) -> float:
        def step() -> None:
            with torch.autocast(device.type, dtype=dtype, enabled=mixed):
                y = conv(x)
            y.float().sum().backward()

        return seconds_per_call(step, device=device, reps=1, warmup=0)  # one call, the device synchronized

    for mixed in (False, True, False, True):  # warm-up: library primitives, caches
        seconds(mixed)
    fp32, low = zip(*((seconds(False), seconds(True)) for _ in range(reps)))
    return min(fp32) / min(low)
