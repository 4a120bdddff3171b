"""Host memory for CPU training: keep freed blocks for the next step.

glibc's malloc serves a block larger than its mmap threshold (dynamic, up to
32 MiB) with fresh pages from the kernel and returns them when it is freed,
and trims the top of its heap when more than the trim threshold is free. A
CPU training step allocates and frees the same feature maps every step, so
each step pays a page fault per 4 KiB of every large activation: on the
2-core EPYC session machine a MobileNetV2-style 32x32 step ran 1.7x-3.9x
faster per sample with freed memory kept, and three mobile networks' unit
steps 1.07x-1.34x faster in total at batch 48 (BENCHMARKS.md, "Host memory,
and the mobile cells again"). ``keep_freed_host_memory`` raises both thresholds once per process,
so that freed blocks stay in the heap for reuse; the process's resident size
then stays at its peak rather than shrinking between steps. The planner's
speed profile is measured under the same setting as the runs it prices.

Set ``NEUROFLUX_HOST_MEMORY=default`` to leave the allocator as it is (the
setting is process-wide). Other C libraries (musl, macOS, Windows) are left
alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Literal

__all__ = ["HOST_MEMORY_ENV", "KEEP_THRESHOLD_BYTES", "host_memory_setting", "keep_freed_host_memory"]

HOST_MEMORY_ENV = "NEUROFLUX_HOST_MEMORY"
#: Blocks below this come from the heap, and this much free heap is kept.
KEEP_THRESHOLD_BYTES = 1 << 30
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_host_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process) unless
    ``NEUROFLUX_HOST_MEMORY=default``; whether the setting is in force."""
    global _applied
    if _applied is None:
        libc = None if os.environ.get(HOST_MEMORY_ENV, "").strip().lower() == "default" else _glibc()
        _applied = bool(
            libc is not None
            and libc.mallopt(_M_MMAP_THRESHOLD, KEEP_THRESHOLD_BYTES) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_THRESHOLD_BYTES) == 1
        )
    return _applied


def host_memory_setting() -> Literal["kept", "default"]:
    """What this process's allocator does with freed large blocks (after
    ``keep_freed_host_memory`` was asked): ``kept`` or the C library's ``default``."""
    return "kept" if _applied else "default"
