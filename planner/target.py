"""The device target: what a plan assumes of the device it is for.

Its speed for the FLOP cost model (the config's numbers, a device profile
file, or this machine's cached profile), its library workspace and memory
calibration, and its name, resolved once per plan (``device_target``);
``calibrated`` applies the calibration to a profiled step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from neuroflux.planner.config import PlanConfig
from neuroflux.planner.device_memory import DEFAULT_CUDA_CALIBRATION, DEFAULT_CUDA_WORKSPACE_BYTES, MemoryCalibration
from neuroflux.planner.device_profile import (
    DeviceProfile,
    cached_profile,
    load_profile,
)
from neuroflux.planner.profile import DeviceSpeed, StepProfile

__all__ = ["Target", "device_target", "calibrated"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """What the plan assumes of the device it targets, resolved once."""

    speed: DeviceSpeed
    speed_source: str
    """Where the speed came from: the flags, a profile file, or this machine's cached profile."""
    workspace: int
    """Library workspace every peak on the target includes."""
    cal: MemoryCalibration
    """Memory calibration (none on the CPU, where the trace is exact)."""
    name: str


def device_target(cfg: PlanConfig) -> Target:
    """The target device's speed for the FLOP cost model (the flags, a
    device profile file, or this machine's cached profile, measured once),
    its memory terms and its name (the GPU here, else the device profile's,
    else what the CLI said)."""
    t = cfg.target
    prof, source = _speed_profile(cfg)
    if t.device_kind == "cpu":
        workspace, cal = 0, MemoryCalibration()
    elif prof is not None and prof.kind == "cuda":
        workspace, cal = prof.workspace(), prof.calibration()
    else:
        workspace, cal = DEFAULT_CUDA_WORKSPACE_BYTES, DEFAULT_CUDA_CALIBRATION
    name = t.device_name
    if t.device_kind == "cuda" and not torch.cuda.is_available() and t.device_profile is not None:
        assert prof is not None  # loaded from t.device_profile
        name = prof.name
    if prof is None:  # the flags give both numbers
        assert t.device_flops_per_s is not None and t.op_overhead_s is not None
        speed = DeviceSpeed(flops_per_s=t.device_flops_per_s, op_overhead_s=t.op_overhead_s)
    else:
        flops, at = _flops(prof, cfg.recipe.precision, source)
        speed = DeviceSpeed(
            flops_per_s=t.device_flops_per_s or flops,
            op_overhead_s=prof.op_overhead_s if t.op_overhead_s is None else t.op_overhead_s,
            bandwidth_bytes_per_s=prof.bandwidth_bytes_per_s,
        )
        fitted = ", speeds fitted to reference steps" if prof.speed_method == "step-fit" else ""
        source = f"{source} ({prof.name}, {prof.source} {prof.date}{fitted}{'' if t.device_flops_per_s else at})"
    return Target(speed=speed, speed_source=source, workspace=workspace, cal=cal, name=name)


def _flops(prof: DeviceProfile, precision: str, source: str) -> tuple[float, str]:
    """The profile's throughput at the plan's precision, and what the
    speed source says of it; a profile without that precision's falls back
    to its fp32 throughput, with a warning."""
    if precision == "fp32":
        return prof.flops_per_s, ""
    flops = prof.flops_for(precision)
    if flops is not None:
        return flops, f"; {precision} throughput"
    log.warning(
        "%s has no %s throughput: planned times assume its fp32 speed, so batches and heads may be chosen for "
        "the wrong speed; re-measure it on the target with `nf-profile -o FILE`",
        source,
        precision,
    )
    return prof.flops_per_s, f"; fp32 throughput, no {precision} measured"


def _speed_profile(cfg: PlanConfig) -> tuple[DeviceProfile | None, str]:
    """The device profile the speed comes from (None: the config gives both
    numbers) and where it came from."""
    t = cfg.target
    if t.device_profile is not None:
        prof = load_profile(t.device_profile)
        if prof.kind != t.device_kind:
            log.warning("device profile %s is for %s, the plan targets %s", t.device_profile, prof.kind, t.device_kind)
        if prof.layout != cfg.memory_format:
            log.warning(
                "device profile %s timed its steps in the %s layout and the plan runs %s: planned times may be "
                "off by up to 1.5x; re-measure it with `nf-profile --memory-format %s -o FILE`",
                t.device_profile,
                prof.layout,
                cfg.memory_format,
                cfg.memory_format,
            )
        return prof, f"profile {t.device_profile}"
    here = "cuda" if t.device_kind == "cuda" and torch.cuda.is_available() else "cpu"
    if t.device_flops_per_s and t.op_overhead_s is not None:
        return None, "flags"
    if t.device_kind == "cuda" and here == "cpu" and t.device_flops_per_s is None:
        log.warning(
            "planning for CUDA on a machine without one: times use this CPU's speed; pass "
            "--device-profile with the GPU's profile"
        )
    prof, path = cached_profile(here, cfg.recipe.precision, cfg.memory_format)
    return prof, f"cached profile {path}"


def calibrated(prof: StepProfile, cal: MemoryCalibration) -> StepProfile:
    """A step profile as the target device will allocate it."""
    return dataclasses.replace(
        prof,
        dyn_fixed_bytes=prof.dyn_fixed_bytes + cal.step_overhead_bytes,
        dyn_per_sample_bytes=math.ceil(prof.dyn_per_sample_bytes * cal.activation_scale),
    )
