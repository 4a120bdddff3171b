"""Device profiles: the throughput and per-op overhead the FLOP cost model
assumes, measured once per device and reused, so that the same inputs give
the same plan whatever the machine's load, and a plan can be made on one
machine for another (``nf-plan --device-profile h100.json``).

A profile is a small JSON file::

    {"name": "NVIDIA H100 80GB HBM3", "kind": "cuda", "flops_per_s": 3.1e13,
     "op_overhead_s": 9e-06, "source": "measured", "date": "2026-11-25", "torch": "2.11.0+cu130"}

Without a profile, ``nf-plan`` uses this machine's, measured on first use
(median of several runs) and cached under ``$NEUROFLUX_CACHE`` (default
``~/.cache/neuroflux``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from neuroflux.errors import NeuroFluxError

__all__ = ["DeviceProfile", "load_profile", "save_profile", "measure_profile", "cached_profile", "cache_dir"]


@dataclass(frozen=True, kw_only=True)
class DeviceProfile:
    name: str
    kind: Literal["cpu", "cuda"]
    flops_per_s: float
    op_overhead_s: float
    source: Literal["measured", "estimated"]
    date: str
    torch: str


def cache_dir() -> Path:
    return Path(os.environ.get("NEUROFLUX_CACHE") or Path.home() / ".cache" / "neuroflux")


def load_profile(path: str | os.PathLike[str]) -> DeviceProfile:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        prof = DeviceProfile(**{f.name: data[f.name] for f in dataclasses.fields(DeviceProfile)})
    except FileNotFoundError:
        raise NeuroFluxError(f"device profile {p} not found; measure one on the target with "
                             "`python -m neuroflux.planner.device_profile -o FILE`") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise NeuroFluxError(f"device profile {p} is not a valid profile ({type(e).__name__}: {e}); re-measure it") from e
    if not (prof.flops_per_s > 0 and prof.op_overhead_s >= 0):
        raise NeuroFluxError(f"device profile {p} has non-positive speeds; re-measure it")
    return prof


def save_profile(prof: DeviceProfile, path: str | os.PathLike[str]) -> None:
    from neuroflux.runtime.checkpoint import atomic_write_json

    atomic_write_json(dataclasses.asdict(prof), Path(path))


def measure_profile(device: str = "cpu", *, runs: int = 5) -> DeviceProfile:
    """Median of ``runs`` measurements of matmul throughput and op overhead."""
    import torch

    from neuroflux.planner.profile import measure_device_speed

    dev = torch.device(device)
    speeds = [measure_device_speed(dev) for _ in range(runs)]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return DeviceProfile(name=name, kind="cuda" if dev.type == "cuda" else "cpu",
                         flops_per_s=statistics.median(s.flops_per_s for s in speeds),
                         op_overhead_s=statistics.median(s.op_overhead_s for s in speeds), source="measured",
                         date=time.strftime("%Y-%m-%d"), torch=torch.__version__)


def cached_profile(device: str = "cpu") -> tuple[DeviceProfile, Path]:
    """This machine's profile for ``device``: read from the cache, or
    measured once and cached."""
    import torch

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    threads = torch.get_num_threads() if dev.type == "cpu" else 0
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{name}-{threads}t" if threads else name).strip("-").lower()
    path = cache_dir() / f"device-{slug}.json"
    if path.is_file():
        try:
            return load_profile(path), path
        except NeuroFluxError:
            pass  # a broken cache entry is re-measured
    prof = measure_profile(device)
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
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m neuroflux.planner.device_profile",
                                 description="Measure this machine's device profile for nf-plan --device-profile.")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args(argv)
    prof = measure_profile(args.device)
    save_profile(prof, args.output)
    print(json.dumps(dataclasses.asdict(prof)), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
