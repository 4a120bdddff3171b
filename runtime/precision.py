"""Compute precision: ``fp32``, or mixed precision with ``bf16`` or ``fp16``.

Mixed precision is PyTorch's automatic mixed precision: parameters,
gradients and optimizer state stay fp32, and the forward pass (and the
loss) runs under ``torch.autocast`` at the lower precision, op by op as
autocast decides for the device. ``fp16`` also scales each unit's loss with
its own ``GradScaler`` (fp16's range is too narrow for small gradients;
bf16 has fp32's). The plan's recipe names the precision; the planner
profiles every step under the same autocast, so the predicted peaks hold.

The activations' memory format travels with the precision: ``contiguous``
(NCHW) or ``channels_last`` (NHWC), the layout oneDNN's CPU convolutions
run natively (1.2x-1.5x faster training steps of mobile networks on an
AVX-512 CPU, BENCHMARKS.md). Under ``channels_last`` every unit and head
holds its 4-d weights in that layout and converts a 4-d input on entry;
outputs keep it. Planner and runtime build the same ``Precision`` from the
plan's recipe (``Precision.of``), so the profiled step is the run's step.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from neuroflux.errors import NeuroFluxError

__all__ = [
    "EMULATED_PRECISION_ENV",
    "FP32",
    "MEMORY_FORMATS",
    "MemoryFormat",
    "PRECISIONS",
    "Precision",
    "PrecisionName",
    "check_supported",
    "is_native",
    "cache_dtype_for",
    "default_memory_format",
]

EMULATED_PRECISION_ENV = "NEUROFLUX_ALLOW_EMULATED_PRECISION"
"""Set (to 1) to run bf16 or fp16 on a CPU without native support: correct, but
several times slower than fp32 (the tests use it on any CPU)."""

PrecisionName = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[PrecisionName, ...] = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MemoryFormat = Literal["contiguous", "channels_last"]
MEMORY_FORMATS: tuple[MemoryFormat, ...] = ("contiguous", "channels_last")


def default_memory_format(device_type: str) -> MemoryFormat:
    """The layout plans for a device type use by default: ``channels_last``
    on a CPU (oneDNN's native layout; 1.2x-1.5x faster training steps of
    mobile networks, BENCHMARKS.md), ``contiguous`` on CUDA (not measured
    faster there yet)."""
    return "channels_last" if device_type == "cpu" else "contiguous"


def cache_dtype_for(precision: str) -> Literal["float16", "bfloat16"]:
    """The default element type of cached activations: the compute
    precision's (fp32 runs keep their long-standing float16 caches)."""
    return "bfloat16" if precision == "bf16" else "float16"


@dataclass(frozen=True)
class Precision:
    """A precision on a device type (``cpu`` or ``cuda``), with the
    activations' memory format."""

    name: PrecisionName = "fp32"
    device_type: str = "cpu"
    memory_format: MemoryFormat = "contiguous"

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise NeuroFluxError(f"unknown precision {self.name!r}; choose one of {', '.join(PRECISIONS)}")
        if self.memory_format not in MEMORY_FORMATS:
            raise NeuroFluxError(
                f"unknown memory format {self.memory_format!r}; choose one of {', '.join(MEMORY_FORMATS)}"
            )

    @classmethod
    def of(cls, recipe: Any, device_type: str) -> Precision:
        """The precision a plan's ``recipe`` asks for on ``device_type`` (a
        plan before 2.10 has no memory format: contiguous)."""
        return cls(recipe.precision, device_type, getattr(recipe, "memory_format", "contiguous"))

    @property
    def channels_last(self) -> bool:
        return self.memory_format == "channels_last"

    def format_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in this memory format (a 4-d tensor under ``channels_last``;
        anything else as it is, and no copy when it is already laid out so)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def randn(
        self, batch: int, shape: Sequence[int], *, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        """A random batch of per-sample ``shape`` laid out in this memory
        format from the start (one allocation, as the runtime's formatted
        batches are: what the planner profiles a step on)."""
        if self.channels_last and len(shape) == 3:
            c, h, w = shape
            return torch.randn(batch, h, w, c, dtype=dtype, device=device).permute(0, 3, 1, 2)
        return torch.randn(batch, *shape, dtype=dtype, device=device)

    def format_modules(self, *modules: nn.Module | None) -> None:
        """Lay out the 4-d weights of ``modules`` in this memory format, in
        place (before an optimizer makes state for them: momentum follows
        the parameter's layout)."""
        if not self.channels_last:
            return
        # Each parameter's data replaced in place (the same Parameter objects:
        # an optimizer made before still holds them); not Module.to, which
        # swaps the tensors of a fake-tensor parameter and fails there.
        for p in {id(p): p for m in modules if m is not None for p in m.parameters()}.values():
            if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                p.data = p.data.contiguous(memory_format=torch.channels_last)

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
