"""Helpers shared by the planner, the runtime and the tools (no solver;
torch only inside the functions that need it), so that the runtime never
imports the planner: byte formatting, the speed wording, atomic file
writes (any file, and JSON), the auto/cuda/cpu device choice, and timing a
call with the device synchronized."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroflux.errors import NeuroFluxError

if TYPE_CHECKING:
    import torch

__all__ = [
    "format_bytes",
    "format_mib",
    "speed_verdict",
    "atomic_write",
    "atomic_write_json",
    "write_probe",
    "resolve_device",
    "torch_device",
    "seconds_per_call",
    "tracker_peak_bytes",
]


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> None:
    """``write(tmp_path)`` then rename over ``path``: readers see the old
    file or the new one, never half of one (a crash leaves no temp file).

    Safe against a link planted in the target directory: the temp file is
    made by ``mkstemp`` (``O_EXCL``, a random name, so it is never an
    existing file or link), and ``os.replace`` renames over ``path`` itself,
    so a symbolic link at ``path`` is replaced, never followed, and the
    file it points at is left untouched. ``path``'s parent directories are
    trusted: a linked parent is the caller's to refuse (see
    ``neuroflux.runtime.run_dir.confined_path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """``obj`` as JSON (indented by one, a final newline) written atomically
    (``atomic_write``): summaries, device profiles, sweeps."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")

    atomic_write(path, write)


def write_probe(dir: str | os.PathLike[str]) -> None:
    """Check that ``dir`` (which must exist) is writable, before any work is
    spent: create a file in it and remove it again; an ``OSError`` (read-only
    file system, no permission) says why not.

    The probe gets a fresh random name from ``mkstemp`` (``O_EXCL``), never a
    fixed one: a fixed name such as ``.write-test`` could be a link planted
    in the directory, and writing it would write through the link into the
    file it points at."""
    fd, tmp = tempfile.mkstemp(dir=dir, prefix=".write-test.")
    try:
        os.close(fd)
    finally:
        os.unlink(tmp)


def tracker_peak_bytes(tracker: Any) -> int:
    """A ``MemTracker``'s peak over every device it saw, in bytes."""
    return int(sum(dev["Total"] for dev in tracker.get_tracker_snapshot("peak").values()))


def resolve_device(choice: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; others as given."""
    if choice == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice not in ("cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {choice!r}")
    return choice


def torch_device(choice: str) -> torch.device:
    """The ``torch.device`` for an auto/cuda/cpu choice (``resolve_device``);
    ``cuda`` without a CUDA device is a NeuroFluxError naming the fix."""
    import torch

    choice = resolve_device(choice)
    if choice == "cuda" and not torch.cuda.is_available():
        raise NeuroFluxError("--device cuda but no CUDA device is available; use --device cpu or auto")
    return torch.device(choice)


def seconds_per_call(
    fn: Callable[[], Any], *, device: Any = "cpu", reps: int = 10, warmup: int = 1, median: bool = False
) -> float:
    """Wall time of one ``fn()`` after ``warmup`` calls, the device
    synchronized around the clock (CUDA runs asynchronously: an
    unsynchronized clock times the launches only). ``median``: each call
    timed on its own and the median returned (robust to a stray slow call);
    else the mean over ``reps`` back-to-back calls (for calls too short to
    time one by one)."""
    import statistics

    import torch

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if not median:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / reps
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def format_bytes(n: int | float) -> str:
    """Human form with binary units, e.g. ``1.50 GiB``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_mib(n: int | float) -> str:
    """Bytes in MiB with one decimal, e.g. ``12.4 MiB``: tables and charts of peaks."""
    return f"{n / 2**20:.1f} MiB"


def speed_verdict(speedup: float, *, bold: tuple[str, str] = ("", "")) -> str:
    """``1.38x faster``, or ``1.62x slower`` for a speed-up below one (never
    "0.62x faster"); ``bold`` wraps the number, e.g. ``("<b>", "</b>")``."""
    a, b = bold
    return f"{a}{speedup:.2f}x{b} faster" if speedup >= 1 else f"{a}{1 / speedup:.2f}x{b} slower"
