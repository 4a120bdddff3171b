"""Output-only kernels for the ops that dominate a profiled step's cost.

A profiled step runs on meta (or fake) tensors: no data, only shapes,
strides, dtypes and storages, which is all ``StepMeter`` counts. PyTorch's
meta kernels of batch norm, its backward, ReLU's backward and the
cross-entropy ops are Python decompositions that compute every
intermediate on meta tensors (about 3 ms a call for batch norm, most of the
profiling time of a deep BN network such as DenseNet-121). What they
*return* is simple: a tensor laid out like the input and a few per-channel
vectors. The shortcuts here build those outputs directly.

Each shortcut returns ``None`` (the real kernel runs) unless its inputs are
in the common layout it knows (contiguous, no weight, ...). A test holds
every shortcut to the real kernel's outputs (shapes, strides, dtypes,
storage sizes) on contiguous and channels-last inputs in fp32, bf16 and
fp16, training and eval, and ``benchmarks/zoo_plans.py`` holds the plans
byte-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["SHORTCUTS"]

aten = torch.ops.aten
_LOW = (torch.float16, torch.bfloat16)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The computation dtype of a reduction over ``dtype`` (as ``utils.get_computation_dtype``)."""
    return torch.float32 if dtype in _LOW else dtype


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor laid out as the dense ``t``."""
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)


def _vector(n: int, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty((n,), dtype=dtype, device=like.device)


def _batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, ...] | None:
    if input.dim() < 2 or not _dense(input) or (not training and (running_mean is None or running_var is None)):
        return None
    cpu = input.device.type == "cpu"  # fake CPU tensors: the CPU kernel's saved statistics
    stats_dtype = input.dtype if cpu else _acc(input.dtype)
    n = 0 if cpu and not training else int(input.shape[1])
    return _like(input), _vector(n, input, stats_dtype), _vector(n, input, stats_dtype)


def _batch_norm_eval(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, ...] | None:
    return _batch_norm(input, weight, bias, running_mean, running_var, False, momentum, eps)


def _batch_norm_no_stats(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[torch.Tensor, ...] | None:
    return _batch_norm(input, weight, bias, None, None, training, momentum, eps) if training else None


def _batch_norm_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    save_mean: torch.Tensor | None,
    save_invstd: torch.Tensor | None,
    train: bool,
    eps: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor | None, ...] | None:
    if input.dim() < 2 or not _dense(input) or grad_out.stride() != input.stride() or grad_out.dtype != input.dtype:
        return None
    c = int(input.shape[1])
    wdtype = weight.dtype if weight is not None else input.dtype
    return (
        _like(input) if output_mask[0] else None,
        _vector(c, input, wdtype) if output_mask[1] else None,
        _vector(c, input, wdtype) if output_mask[2] else None,
    )


def _threshold_backward(grad_output: torch.Tensor, self: torch.Tensor, threshold: Any) -> torch.Tensor | None:
    if (
        grad_output.shape != self.shape
        or grad_output.stride() != self.stride()
        or not _dense(grad_output)
        or not grad_output.dtype.is_floating_point
    ):
        return None
    return _like(grad_output)


def _log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor | None:
    if x.dim() != 2 or not x.is_contiguous():
        return None
    return _like(x, torch.float32 if half_to_float else x.dtype)


def _log_softmax_backward(
    grad_output: torch.Tensor, output: torch.Tensor, dim: int, input_dtype: torch.dtype
) -> torch.Tensor | None:
    if grad_output.dim() != 2 or not grad_output.is_contiguous() or not output.is_contiguous():
        return None
    return _like(grad_output, input_dtype)


def _nll_loss(
    self: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    if self.dim() != 2 or target.dim() != 1 or weight is not None or reduction not in (1, 2):  # mean, sum
        return None
    scalar = torch.empty((), dtype=self.dtype, device=self.device)
    return scalar, torch.empty((), dtype=self.dtype, device=self.device)


def _nll_loss_backward(
    grad_output: torch.Tensor,
    self: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    reduction: int,
    ignore_index: int,
    total_weight: torch.Tensor,
) -> torch.Tensor | None:
    if self.dim() != 2 or not self.is_contiguous() or weight is not None or reduction not in (1, 2):
        return None
    return _like(self)


SHORTCUTS: dict[Any, Callable[..., Any]] = {
    aten.native_batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit.default: _batch_norm,
    aten._native_batch_norm_legit.no_stats: _batch_norm_no_stats,
    aten._native_batch_norm_legit_no_training.default: _batch_norm_eval,
    aten.native_batch_norm_backward.default: _batch_norm_backward,
    aten.threshold_backward.default: _threshold_backward,
    aten._log_softmax.default: _log_softmax,
    aten._log_softmax_backward_data.default: _log_softmax_backward,
    aten.nll_loss_forward.default: _nll_loss,
    aten.nll_loss_backward.default: _nll_loss_backward,
}
"""Op -> shortcut, for tensors on the meta device or fake tensors."""
