"""Compute precision: ``fp32``, or mixed precision with ``bf16`` or ``fp16``.

Mixed precision is PyTorch's automatic mixed precision: parameters,
gradients and optimizer state stay fp32, and the forward pass (and the
loss) runs under ``torch.autocast`` at the lower precision, op by op as
autocast decides for the device. ``fp16`` also scales each unit's loss with
its own ``GradScaler`` (fp16's range is too narrow for small gradients;
bf16 has fp32's). The plan's recipe names the precision; the planner
profiles every step under the same autocast, so the predicted peaks hold.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

import torch

from neuroflux.errors import NeuroFluxError

__all__ = [
    "EMULATED_PRECISION_ENV",
    "FP32",
    "PRECISIONS",
    "Precision",
    "PrecisionName",
    "check_supported",
    "is_native",
    "cache_dtype_for",
]

EMULATED_PRECISION_ENV = "NEUROFLUX_ALLOW_EMULATED_PRECISION"
"""Set (to 1) to run bf16 or fp16 on a CPU without native support: correct, but
several times slower than fp32 (the tests use it on any CPU)."""

PrecisionName = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[PrecisionName, ...] = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dtype_for(precision: str) -> Literal["float16", "bfloat16"]:
    """The default element type of cached activations: the compute
    precision's (fp32 runs keep their long-standing float16 caches)."""
    return "bfloat16" if precision == "bf16" else "float16"


@dataclass(frozen=True)
class Precision:
    """A precision on a device type (``cpu`` or ``cuda``)."""

    name: PrecisionName = "fp32"
    device_type: str = "cpu"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise NeuroFluxError(f"unknown precision {self.name!r}; choose one of {', '.join(PRECISIONS)}")

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.name]

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    def autocast(self) -> AbstractContextManager:
        """The context a forward pass runs in (a no-op for fp32)."""
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.mixed)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A fresh loss scaler for one unit (fp16 only)."""
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


FP32 = Precision()
"""fp32 on any device (the default of everything that takes a precision)."""


def is_native(precision: str, device: torch.device) -> bool:
    """Whether ``device`` computes in ``precision`` natively (on a CPU: avx512_bf16
    or AMX for bf16, avx512_fp16 or AMX-FP16 for fp16; on CUDA, bf16 where the GPU has it)."""
    if precision == "fp32":
        return True
    if device.type == "cuda":
        return precision != "bf16" or torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    native = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported, "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}
    return native[precision]()


def check_supported(precision: str, device: torch.device) -> None:
    """Refuse, with what to do, a precision this device cannot compute in."""
    if is_native(precision, device):
        return
    if device.type == "cuda":  # only bf16 is ever missing there
        raise NeuroFluxError(
            f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 support; re-plan with "
            "--precision fp16 (or fp32)"
        )
    if device.type != "cpu":
        raise NeuroFluxError(f"--precision {precision} runs on cpu or cuda, not {device.type}; re-plan with fp32")
    if precision == "bf16":
        raise NeuroFluxError(
            "this CPU has no native bf16 (no avx512_bf16 or amx_bf16; emulated bf16 is several times slower than "
            f"fp32): re-plan with --precision fp32, or run on a GPU (or set {EMULATED_PRECISION_ENV}=1 to run anyway)"
        )
    if precision == "fp16":
        raise NeuroFluxError(
            "this CPU has no native fp16 compute (no avx512_fp16 or amx_fp16): re-plan with --precision bf16 or "
            f"fp32 (or set {EMULATED_PRECISION_ENV}=1 to run anyway)"
        )
