"""Device profiles (``nf-profile``): the throughput and per-op overhead the
FLOP cost model assumes, measured once per device and reused, so that the
same inputs give the same plan whatever the machine's load, and a plan can
be made on one machine for another (``nf-plan --device-profile h100.json``).

Usage::

    nf-profile -o gpu.json                  # this machine's GPU (its CPU when it has none)
    nf-profile --device cpu -o cpu.json
    python -m neuroflux.planner.device_profile --device cuda -o h100.json
    nf-plan model.py --device cuda --device-profile h100.json --budget 8GB   # then plan for it anywhere

A profile is a small JSON file::

    {"name": "NVIDIA H100 80GB HBM3", "kind": "cuda", "flops_per_s": 3.1e13,
     "op_overhead_s": 9e-06, "source": "measured", "date": "2026-11-25", "torch": "2.11.0+cu130",
     "workspace_bytes": 68157440}

``workspace_bytes``, ``step_overhead_bytes`` and ``activation_scale`` are the
device memory a trace cannot see (``device_memory``).

Without a profile, ``nf-plan`` uses this machine's, measured on first use
(median of several runs) and cached under ``$NEUROFLUX_CACHE`` (default
``~/.cache/neuroflux``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from neuroflux.errors import NeuroFluxError
from neuroflux.planner.device_memory import (
    DEFAULT_CUDA_CALIBRATION,
    DEFAULT_CUDA_WORKSPACE_BYTES,
    MemoryCalibration,
    measure_memory_calibration,
    measure_workspace_bytes,
)
from neuroflux.runtime.host_memory import host_memory_setting, keep_freed_host_memory
from neuroflux.runtime.precision import MEMORY_FORMATS, MemoryFormat, default_memory_format

log = logging.getLogger(__name__)

__all__ = [
    "DeviceProfile",
    "load_profile",
    "save_profile",
    "measure_profile",
    "measure_mixed_flops",
    "native_mixed_precisions",
    "cached_profile",
    "cache_dir",
]


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    name: str
    kind: Literal["cpu", "cuda"]
    flops_per_s: float
    op_overhead_s: float
    source: Literal["measured", "estimated"]
    date: str
    torch: str
    workspace_bytes: int | None = None
    """Library workspaces held for the run (see the module doc); None: not measured."""
    step_overhead_bytes: int | None = None
    """Bytes a step allocates beyond the predicted tensors; None: not measured."""
    activation_scale: float | None = None
    """Measured per-sample bytes over predicted ones; None: not measured."""
    bf16_flops_per_s: float | None = None
    """Throughput in bf16, what bf16 plans' cost model uses: ``flops_per_s``
    times a convolution step's measured speed-up under bf16 autocast (about
    2x on a CPU with avx512_bf16); None: not measured (plans then assume
    ``flops_per_s``)."""
    fp16_flops_per_s: float | None = None
    """The same in fp16."""
    bandwidth_bytes_per_s: float | None = None
    """Bytes per second a step's ops read and write at; None: traffic is free."""
    speed_method: Literal["step-fit", "microbench"] | None = None
    """``step-fit``: the speeds fitted to a reference suite's training steps
    (``step_costs.py``); ``microbench`` or None (before 2026-12-02): a
    matmul's throughput and one op's dispatch, a fifth of a CPU step's time.
    A cached profile measured the old way is measured again."""
    host_memory: Literal["kept", "default"] | None = None
    """On a CPU, the host allocator's setting the speeds were measured under
    (``runtime.host_memory``: ``kept`` reuses freed large blocks, which makes
    large-batch steps up to 2x faster); a cached profile measured under
    another setting than this process's is measured again. None: CUDA, or
    not recorded (before 2026-12-03)."""
    memory_format: MemoryFormat | None = None
    """The activations' layout the reference steps were timed in (a plan's
    ``memory_format``; channels_last steps of mobile networks run 1.2x-1.5x
    faster on a CPU); a cached profile measured in another layout than the
    plan's is measured again. None: contiguous (not recorded before
    2026-12-03's second session)."""

    @property
    def layout(self) -> MemoryFormat:
        """The layout the speeds were measured in (None read as contiguous)."""
        return self.memory_format or "contiguous"

    def flops_for(self, precision: str) -> float | None:
        """Throughput at a plan's precision; None: not measured."""
        return {"fp32": self.flops_per_s, "bf16": self.bf16_flops_per_s, "fp16": self.fp16_flops_per_s}[precision]

    def calibration(self) -> MemoryCalibration:
        """The memory calibration plans for this device use."""
        if self.step_overhead_bytes is not None and self.activation_scale is not None:
            return MemoryCalibration(self.step_overhead_bytes, self.activation_scale)
        return DEFAULT_CUDA_CALIBRATION if self.kind == "cuda" else MemoryCalibration()

    def workspace(self) -> int:
        """The workspace a plan adds to its peaks on this device."""
        if self.workspace_bytes is not None:
            return self.workspace_bytes
        return DEFAULT_CUDA_WORKSPACE_BYTES if self.kind == "cuda" else 0


def cache_dir() -> Path:
    return Path(os.environ.get("NEUROFLUX_CACHE") or Path.home() / ".cache" / "neuroflux")


def load_profile(path: str | os.PathLike[str]) -> DeviceProfile:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        prof = DeviceProfile(
            **{
                f.name: data[f.name]
                for f in dataclasses.fields(DeviceProfile)
                if f.name in data or f.default is dataclasses.MISSING
            }
        )
    except FileNotFoundError:
        raise NeuroFluxError(
            f"device profile {p} not found; measure one on the target with `nf-profile -o FILE`"
        ) from None
    except OSError as e:  # a directory, no permission
        raise NeuroFluxError(f"cannot read the device profile {p} ({e.strerror}); give a profile JSON file") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as e:
        raise NeuroFluxError(
            f"device profile {p} is not a valid profile ({type(e).__name__}: {e}); re-measure it"
        ) from e
    if prof.kind not in ("cpu", "cuda") or not isinstance(prof.name, str):
        raise NeuroFluxError(
            f"device profile {p}: kind {prof.kind!r} (cpu or cuda) and name {prof.name!r} (text) are "
            "not a profile's; re-measure it"
        )
    numeric = (
        "flops_per_s",
        "op_overhead_s",
        "workspace_bytes",
        "step_overhead_bytes",
        "activation_scale",
        "bf16_flops_per_s",
        "fp16_flops_per_s",
        "bandwidth_bytes_per_s",
    )
    for name in numeric:
        v = getattr(prof, name, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise NeuroFluxError(f"device profile {p}: {name} is {v!r}, not a number; re-measure it")
    if (
        not (prof.flops_per_s > 0 and prof.op_overhead_s >= 0)
        or any((f or 1) <= 0 for f in (prof.bf16_flops_per_s, prof.fp16_flops_per_s, prof.bandwidth_bytes_per_s))
        or (prof.workspace_bytes or 0) < 0
        or (prof.step_overhead_bytes or 0) < 0
        or (prof.activation_scale is not None and prof.activation_scale < 1)
    ):
        raise NeuroFluxError(f"device profile {p} has non-positive speeds; re-measure it")
    return prof


def save_profile(prof: DeviceProfile, path: str | os.PathLike[str]) -> None:
    from neuroflux.common import atomic_write_json

    atomic_write_json(dataclasses.asdict(prof), Path(path))


def measure_profile(device: str = "cpu", *, runs: int = 5, memory_format: MemoryFormat | None = None) -> DeviceProfile:
    """The step costs fitted to the reference suite's training steps
    (``step_costs``) in ``memory_format`` (default: the device's plans'),
    the bf16 and fp16 throughputs where the device computes in them
    natively, and on CUDA the workspace and memory calibration.
    ``runs`` microbenchmarks (matmul throughput, one op's dispatch) stand in
    when the fit is undetermined."""
    import torch

    from neuroflux.planner.step_costs import measure_device_speed, measure_step_costs

    dev = torch.device(device)
    layout = memory_format or default_memory_format(dev.type)
    workspace = measure_workspace_bytes(dev) if dev.type == "cuda" else 0  # first: before anything uses cuBLAS
    cal = measure_memory_calibration(dev) if dev.type == "cuda" else MemoryCalibration()
    method: Literal["step-fit", "microbench"] = "step-fit"
    try:
        overhead, flops, bandwidth, _ = measure_step_costs(dev, memory_format=layout)
    except ValueError as e:  # a device so fast that the suite's times are all overhead
        log.warning("cannot fit the step costs (%s); the profile takes a matmul's throughput", e)
        speeds = [measure_device_speed(dev) for _ in range(runs)]
        flops, overhead = (statistics.median(getattr(s, k) for s in speeds) for k in ("flops_per_s", "op_overhead_s"))
        bandwidth, method = None, "microbench"
    mixed = {p: measure_mixed_flops(dev, p, flops) for p in native_mixed_precisions(dev)}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return DeviceProfile(
        bf16_flops_per_s=mixed.get("bf16"),
        fp16_flops_per_s=mixed.get("fp16"),
        name=name,
        kind="cuda" if dev.type == "cuda" else "cpu",
        flops_per_s=flops,
        op_overhead_s=overhead,
        bandwidth_bytes_per_s=bandwidth,
        speed_method=method,
        host_memory=host_memory_setting() if dev.type == "cpu" else None,
        memory_format=layout,
        source="measured",
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
        workspace_bytes=workspace,
        step_overhead_bytes=cal.step_overhead_bytes,
        activation_scale=cal.activation_scale,
    )


def native_mixed_precisions(dev) -> list[str]:
    """The mixed precisions ``dev`` computes in natively (``runtime.precision.is_native``)."""
    from neuroflux.runtime.precision import is_native

    return [p for p in ("bf16", "fp16") if is_native(p, dev)]


def measure_mixed_flops(dev, precision: str, fp32_flops_per_s: float, *, runs: int = 3) -> float:
    """The throughput ``dev``'s steps reach in ``precision`` (bf16 or fp16):
    its fp32 throughput times the median speed-up a convolution's forward and
    backward get under autocast at that precision (not a bare matmul's, which
    overstates a network's: 4.2x against a convolution's about 2x in bf16 on
    an avx512_bf16 CPU)."""
    from neuroflux.planner.step_costs import measure_precision_speedup
    from neuroflux.runtime.precision import Precision

    dtype = Precision(precision).dtype  # type: ignore[arg-type]
    return fp32_flops_per_s * statistics.median(measure_precision_speedup(dev, dtype) for _ in range(runs))


def cached_profile(
    device: str = "cpu", precision: str = "fp32", memory_format: MemoryFormat | None = None
) -> tuple[DeviceProfile, Path]:
    """This machine's profile for ``device`` with steps timed in
    ``memory_format`` (default: the device's plans'): read from the cache,
    or measured once and cached (one file per layout). A profile cached
    without the throughput at a mixed ``precision`` gets it measured once
    and added (emulated where the device has no native support: the speed a
    plan run here will see)."""
    import torch

    dev = torch.device(device)
    layout = memory_format or default_memory_format(dev.type)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    threads = torch.get_num_threads() if dev.type == "cpu" else 0
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{name}-{threads}t" if threads else name).strip("-").lower()
    path = cache_dir() / f"device-{slug}{'-channels-last' if layout == 'channels_last' else ''}.json"
    prof = None
    if path.is_file():
        try:
            prof = load_profile(path)
        except NeuroFluxError:
            pass  # a broken cache entry is re-measured
    if prof is not None and (prof.speed_method != "step-fit" or prof.layout != layout):
        prof = None  # measured the old way (a CPU step priced at a fifth of its time), or in the other layout
    if prof is not None and dev.type == "cpu":
        keep_freed_host_memory()  # what a run on this CPU does
        if prof.host_memory != host_memory_setting():
            prof = None  # measured under another allocator setting than this process runs with
    if prof is not None and prof.flops_for(precision) is not None:
        return prof, path
    if prof is None:
        prof = measure_profile(device, memory_format=layout)
    if prof.flops_for(precision) is None:
        mixed = measure_mixed_flops(dev, precision, prof.flops_per_s)
        if precision == "bf16":
            prof = dataclasses.replace(prof, bf16_flops_per_s=mixed)
        else:
            prof = dataclasses.replace(prof, fp16_flops_per_s=mixed)
    try:
        save_profile(prof, path)
    except OSError:
        pass  # a read-only home still plans, only without the cache
    return prof, path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def main(argv: list[str] | None = None) -> int:
    """``nf-profile``: measure this machine's device profile once, for
    ``nf-plan --device-profile`` here or on another machine."""
    import argparse
    import sys

    import torch

    ap = argparse.ArgumentParser(
        prog="nf-profile",
        description="Measure this machine's device profile (speed, and on CUDA the library "
        "workspace and memory calibration) for nf-plan --device-profile.",
    )
    ap.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: the GPU when there is one, else the CPU",
    )
    ap.add_argument(
        "--memory-format",
        choices=["auto", *MEMORY_FORMATS],
        default="auto",
        help="layout to time the reference steps in: that of the plans that will use the profile (auto: "
        "channels_last on a CPU, contiguous on CUDA, as nf-plan's default)",
    )
    ap.add_argument("-o", "--output", required=True, help="profile JSON to write")
    args = ap.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(
            "nf-profile: error: --device cuda, but torch sees no CUDA device here; run it on the GPU machine "
            "(or --device cpu)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.output)
    if not out.parent.is_dir():
        print(f"nf-profile: error: folder {out.parent} does not exist; create it or choose another -o", file=sys.stderr)
        return 2
    prof = measure_profile(device, memory_format=None if args.memory_format == "auto" else args.memory_format)
    try:
        save_profile(prof, out)
    except OSError as e:
        print(f"nf-profile: error: cannot write {out} ({e.strerror}); choose another -o", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(prof)), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
