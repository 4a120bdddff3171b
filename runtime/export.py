"""The final early-exit model: ONNX export and inference throughput."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from neuroflux.common import atomic_write, seconds_per_call

__all__ = ["export_onnx", "throughput"]


def export_onnx(module: nn.Module, input_shape: Sequence[int], path: Path | None = None) -> bytes:
    """Export ``module`` (eval mode, CPU) with a dynamic batch dimension.

    Uses the dynamo exporter, which records each node's module scope in
    ``pkg.torch.onnx.name_scopes`` metadata (nf-graph reads it)."""
    module = module.eval().cpu()
    x = torch.zeros(2, *input_shape)
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # it warns about torchvision ops we never use
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (x,),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            verbose=False,
            report=False,
        )
    onnx_log.setLevel(level)
    assert program is not None, "dynamo=True always returns the ONNXProgram"
    data = program.model_proto.SerializeToString()
    if path is not None:  # temp file and rename: a link at ``path`` is replaced, never written through
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return data


@torch.no_grad()
def throughput(
    module: nn.Module, input_shape: Sequence[int], *, device: torch.device, batch: int | None = None, reps: int = 5
) -> float:
    """Inference images per second (median of ``reps`` after a warm-up), under
    ``torch.inference_mode`` so that no activation is kept for autograd.
    Default batch: 128, or 32 for inputs larger than 3x64x64 (ImageNet
    shapes), so the measurement stays inside a training budget."""
    if batch is None:
        batch = 128 if math.prod(input_shape) <= 3 * 64 * 64 else 32
    module = module.eval().to(device)
    with torch.inference_mode():
        x = torch.randn(batch, *input_shape, device=device)
        return batch / seconds_per_call(lambda: module(x), device=device, reps=reps, median=True)
