"""Memory on the run's device: the plan checked against this device and its
budget before training, the CUDA allocator capped at the budget, and the
measured peaks (MemTracker over a CPU step, NVML's view of the process)."""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

try:  # private API (torch >= 2.5); only the CPU peak report needs it
    from torch.distributed._tools.mem_tracker import MemTracker
except ImportError:  # pragma: no cover - older or trimmed torch builds
    MemTracker = None  # type: ignore[assignment,misc]

from neuroflux.common import format_mib, tracker_peak_bytes
from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.train import StepStats, UnitTrainer, block_step
from neuroflux.schemas.plan import Plan

__all__ = [
    "CAP_ENV",
    "CAN_TRACK",
    "cap_requested",
    "enforce_budget",
    "set_cap",
    "check_device",
    "check_edited_batches",
    "tracked_step",
    "allocation_peak",
    "live_bytes",
    "nvml_process_bytes",
]

log = logging.getLogger(__name__)

CAP_ENV = "NEUROFLUX_CUDA_CAP"
"""Set to 0 to leave the CUDA allocator uncapped (measuring a plan's true
peak against its prediction); the summary then says ``budget_enforced: false``."""

CAN_TRACK = MemTracker is not None
"""Whether this torch has MemTracker, which measures the CPU peak of a block's first steps."""


def cap_requested(device: torch.device) -> bool:
    """Whether the allocator is capped at the budget: on CUDA, unless ``CAP_ENV`` is 0."""
    return device.type == "cuda" and os.environ.get(CAP_ENV, "1") != "0"


def enforce_budget(device: torch.device, *, budget_bytes: int) -> None:
    """Cap the CUDA allocator at ``budget_bytes`` (and turn off cuDNN's
    benchmark search, which allocates far beyond any budget)."""
    total = torch.cuda.get_device_properties(device).total_memory
    frac = min(1.0, budget_bytes / total)
    set_cap(device, frac)
    log.info("CUDA allocator capped at %.4f of %d bytes (= budget %d)", frac, total, budget_bytes)
    if torch.backends.cudnn.benchmark:  # its algorithm search peaked at 2.6 GB for ResNet-18 (H200 probe)
        log.warning(
            "turning torch.backends.cudnn.benchmark off: its algorithm search allocates far beyond "
            "the budget (set NEUROFLUX_CUDA_CAP=0 to run uncapped instead)"
        )
        torch.backends.cudnn.benchmark = False


def set_cap(device: torch.device, fraction: float) -> None:
    # The cap needs an indexed device ("cuda" alone is refused): the current one.
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(fraction, index)


def check_device(plan: Plan, device: torch.device) -> None:
    """Warn when this device is not the one the plan was made for: its
    times, and on CUDA its memory terms, were predicted for that one."""
    planned, here = plan.device, device.type
    name = torch.cuda.get_device_name(device) if here == "cuda" else "cpu"
    if planned.kind == "cpu" and here == "cuda":
        log.warning(
            "the plan was made for the CPU and runs on %s: it holds no CUDA library workspace or memory "
            "calibration, so the allocator cap may be hit; re-plan with nf-plan --device cuda",
            name,
        )
    elif planned.kind == "cuda" and here == "cpu":
        log.warning(
            "the plan was made for %s and runs on the CPU: predicted times do not apply, and the budget "
            "is accounted, not enforced",
            planned.name,
        )
    elif here == "cuda" and planned.name != name and "not present" not in planned.name:
        log.warning(
            "the plan was made for %s and runs on %s: predicted times and the device's memory terms "
            "(workspace, calibration) were for that one; re-plan here (or with this device's "
            "--device-profile) for exact ones",
            planned.name,
            name,
        )


def check_edited_batches(plan: Plan, *, device: torch.device) -> None:
    """A block whose batch the plan's own unit profiles say exceeds the
    budget was edited by hand: refused on CUDA (it would run out of
    memory or break the cap), a warning on CPU (where it is accounted)."""
    cap = plan.budget_bytes * (1 - plan.device.margin_fraction)
    for b in plan.blocks:
        peak = plan.block_peak_bytes(b)
        if peak <= cap * 1.001:
            continue
        msg = (
            f"block {b.index} runs at batch {b.batch_size}, whose predicted peak {format_mib(peak)} exceeds "
            f"the budget {plan.device.budget_text} (less the {plan.device.margin_fraction:.0%} margin); the plan "
            "was edited by hand: re-plan with nf-plan"
        )
        if device.type == "cuda":
            raise NeuroFluxError(msg)
        log.warning("%s (CPU: accounted, not enforced)", msg)


def tracked_step(
    trainers: list[UnitTrainer], inputs: list[torch.Tensor], yb: torch.Tensor, stats: StepStats, *, prefix: nn.Module
) -> int:
    """One ``block_step`` under MemTracker; returns its peak in bytes. A
    compiled model's step (bp-compile) is measured by ``allocation_peak``:
    MemTracker's dispatch mode does not see compiled code's buffers."""
    dynamo = sys.modules.get("torch._dynamo")  # loaded only once something was compiled
    compiled = dynamo is not None and any(
        isinstance(m, dynamo.eval_frame.OptimizedModule) for t in trainers for m in t.unit.modules()
    )
    if compiled:
        alive = live_bytes([m for t in trainers for m in t.modules()], [t.opt for t in trainers], [*inputs, yb])
        return alive + allocation_peak(lambda: block_step(trainers, inputs, yb, stats))
    tracker = MemTracker()
    for t in trainers:
        tracker.track_external(*t.modules(), t.opt)
    if any(True for _ in prefix.parameters()):  # a recomputed prefix's weights stay on the device all block
        tracker.track_external(prefix)
    gc.collect(0)  # as the planner's profile does: the collector's timing must not move the peak
    gc.disable()
    try:
        with tracker:
            block_step(trainers, inputs, yb, stats)
    finally:
        gc.enable()
    return tracker_peak_bytes(tracker)


def live_bytes(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer], tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``modules``' weights and buffers, the optimizers' state and ``tensors``."""
    state = [t for o in optimizers for s in o.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    every = [
        *(p for m in modules for p in m.parameters()),
        *(b for m in modules for b in m.buffers()),
        *state,
        *tensors,
    ]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in every}.values())


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null (C++ output that Python cannot catch)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocation_peak(fn: Callable[[], Any]) -> int:
    """The most bytes allocated on the CPU at once while ``fn`` runs, above
    what was allocated before it: from the profiler's record of every
    allocation and free (it sees the buffers of compiled code, which
    MemTracker's dispatch mode does not)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    gc.collect(0)
    gc.disable()
    try:
        with _quiet_stderr():  # the profiler's C++ side prints a line on start and on stop
            prof.start()
        try:
            fn()
        finally:
            with _quiet_stderr():
                prof.stop()
    finally:
        gc.enable()
    kineto: Any = prof.profiler.kineto_results  # type: ignore[union-attr]
    events = [e for e in kineto.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    now = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def nvml_process_bytes() -> int | None:
    """This process's GPU memory as NVML sees it (CUDA context included)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == os.getpid():
                    return int(p.usedGpuMemory or 0)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML is a report, never a reason to fail a run
        return None
    return None
