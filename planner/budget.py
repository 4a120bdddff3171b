"""Memory budgets: parsing ``1GB``/``1GiB``/``512MB``/``1.5G``/bytes, NVML.

Decimal units are powers of 10 (``1GB`` = 10^9 bytes), binary units powers of
2 (``1GiB`` = 2^30); a bare ``G``/``M``/``K`` is decimal like ``GB``.
"""

from __future__ import annotations

import re

from neuroflux.common import format_bytes
from neuroflux.errors import NeuroFluxError

__all__ = ["parse_bytes", "format_bytes", "nvml_free_bytes", "ACCEPTED_FORMS"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}
ACCEPTED_FORMS = (
    "plain bytes (1500000000), or a number with a unit: 512MB, 512MiB, 1GB, 1GiB, 1.5G, 2TB "
    "(KB/MB/GB = powers of 10, KiB/MiB/GiB = powers of 2)"
)
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str, *, what: str = "budget", allow_zero: bool = False) -> int:
    """Parse a byte size; raises NeuroFluxError naming the accepted forms.
    ``allow_zero``: 0 is a valid size (a host or disk budget of none)."""
    m = _RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise NeuroFluxError(f"cannot read {what} {text!r}; use {ACCEPTED_FORMS}")
    value = float(m.group(1)) * _UNITS[unit]
    if allow_zero and value == 0:
        return 0
    if value < 1:
        raise NeuroFluxError(f"{what} {text!r} is less than one byte")
    return int(value)


def nvml_free_bytes(index: int = 0) -> tuple[int, str]:
    """Free memory and name of GPU ``index`` as NVML reports them."""
    try:
        import pynvml
    except ImportError as e:
        raise NeuroFluxError("reading free GPU memory needs nvidia-ml-py; install it or pass --budget") from e
    try:
        pynvml.nvmlInit()
    except Exception as e:  # pynvml.NVMLError and driver-library errors
        raise NeuroFluxError(
            f"no NVIDIA GPU found to read free memory from ({e}); pass the budget explicitly, e.g. --budget 1GB"
        ) from e
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return int(info.free), name.decode() if isinstance(name, bytes) else str(name)
    except Exception as e:
        raise NeuroFluxError(f"NVML could not read GPU {index} ({e}); pass --budget explicitly") from e
    finally:
        pynvml.nvmlShutdown()
