"""Passes without training, in inference mode and at the block's training
batch (inference needs less than a training step at the same batch, so
they stay inside the budget the plan proved): evaluating a stage's exits,
running units over the data into a block's cache, and the input of a stage
whose block recomputes its input through frozen units on every batch."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroflux.runtime.assemble import Assembled
from neuroflux.runtime.data import CacheWriter, TensorCache, call_augment
from neuroflux.runtime.distributed import Dist
from neuroflux.runtime.modules import Chain
from neuroflux.runtime.precision import FP32, Precision
from neuroflux.runtime.stages import Stage
from neuroflux.schemas.plan import Plan

__all__ = ["eval_exits", "write_cache", "cache_through", "stage_input", "PrefixSource"]


@torch.inference_mode()
def eval_exits(stage: Stage, val: Any, *, device: torch.device, dist: Dist) -> dict[str, float]:
    """Accuracy of every exit of the stage on val (every rank's shard counted)."""
    for t in stage.trainers:
        t.train(False)
        dist.broadcast_buffers(t.modules())
    # At the training batch: inference needs less than a training step at
    # the same batch, so evaluation stays inside the budget the plan proved.
    dev, bs = device, stage.batch_size
    correct = torch.zeros(len(stage.trainers), dtype=torch.int64, device=dev)
    precision = stage.trainers[0].precision
    for h, y in val.batches(bs, shuffle=False, device=dev):
        h = precision.format_input(h)
        with precision.autocast():
            for i, t in enumerate(stage.trainers):
                h = t.unit(h)
                correct[i] += (t.logits(h).argmax(1) == y).sum()
    counts = dist.all_sum(torch.cat([correct, torch.tensor([len(val)], device=dev)]))
    n = int(counts[-1])
    return {name: c / n for name, c in zip(stage.exits, counts[:-1].tolist())}


@torch.inference_mode()
def write_cache(
    stage: Stage, train: Any, val: Any, *, plan: Plan, path: Path | None, device: torch.device, dist: Dist
) -> tuple[TensorCache, TensorCache]:
    """The block's outputs for train then val: the next block's input cache
    (``path``: its file, for a disk cache)."""
    for t in stage.trainers:
        t.train(False)
        dist.broadcast_buffers(t.modules())
    units = Chain([t.unit for t in stage.trainers])
    return cache_through(
        units,
        train,
        val,
        plan=plan,
        index=stage.index,
        spec=stage.cache,
        path=path,
        batch=stage.batch_size,
        device=device,
        precision=stage.trainers[0].precision,
    )


def cache_through(
    units: nn.Module,
    train: Any,
    val: Any,
    *,
    plan: Plan,
    index: int,
    spec: Any,
    path: Path | None,
    batch: int,
    device: torch.device,
    precision: Precision = FP32,
) -> tuple[TensorCache, TensorCache]:
    """``train`` then ``val`` through ``units`` into block ``index``'s cache
    (``spec``: location and dtype; ``path``: the file of a disk cache), at
    ``batch`` (the training batch: inside the budget). Callers hold
    inference mode."""
    shape = tuple(plan.units[plan.unit(plan.blocks[index].units[-1]).index].output_shape)
    writer = CacheWriter(
        len(train) + len(val), shape, dtype=spec.dtype, location=spec.location, path=path, pin=device.type == "cuda"
    )
    labels = []
    for data in (train, val):
        for x, y in data.batches(batch, shuffle=False, device=device):
            with precision.autocast():
                h = units(precision.format_input(x))
            writer.append(h)
            labels.append(y.cpu())
    full = writer.finish(torch.cat(labels))
    n, out = len(train), precision.dtype  # batches come out at the compute precision
    # A slice of a np.memmap is a memmap (numpy's stubs say ndarray).
    return (
        TensorCache(full.x[:n], full.y[:n], out_dtype=out),  # type: ignore[arg-type]
        TensorCache(full.x[n:], full.y[n:], out_dtype=out),  # type: ignore[arg-type]
    )


def stage_input(
    stage: Stage,
    sources: Mapping[int | None, tuple[Any, Any]],
    asm: Assembled,
    *,
    plan: Plan,
    augment: Callable[[torch.Tensor], torch.Tensor] | None,
    device: torch.device,
    dist: Dist,
) -> tuple[Any, Any, nn.Module]:
    """The stage's train and val sources, and its recomputed prefix (an
    empty Chain when it reads a cache or the dataset directly). ``sources``:
    block index -> (train, val) caches, ``None`` the dataset; ``augment``
    applies to a prefix recomputed from the dataset."""
    spec = stage.source
    if spec is None:  # a baseline: the dataset
        return (*sources[None], Chain([]))
    train, val = sources[spec.source_block]
    if spec.kind != "recompute":
        return train, val, Chain([])
    prefix = Chain([asm.units[plan.unit(u).index] for u in spec.recompute_units]).to(device).eval()
    dist.broadcast_buffers([prefix])
    augment = augment if spec.source_block is None else None
    precision = Precision.of(plan.recipe, device.type)
    return (
        PrefixSource(train, prefix, augment=augment, precision=precision),
        PrefixSource(val, prefix, precision=precision),
        prefix,
    )


class PrefixSource:
    """``base``'s batches run through ``prefix`` (frozen: eval mode, no
    autograd) on the device. ``augment`` applies to the base's inputs while
    training, before the prefix (a recomputed block from the dataset sees
    augmented inputs, as BP does)."""

    def __init__(self, base: Any, prefix: torch.nn.Module, *, augment: Any = None, precision: Any = None) -> None:
        self.base, self.prefix, self.augment = base, prefix, augment
        self.precision = precision
        """The run's ``Precision``: the prefix runs under its autocast (None: fp32)."""
        self._cpu_s = 0.0
        self._events: list[tuple[Any, Any]] = []

    def __len__(self) -> int:
        return len(self.base)

    @property
    def seconds(self) -> float:
        """Time spent in the prefix so far: wall time on a CPU; on CUDA, the
        prefix's kernels as CUDA events time them (no sync per batch)."""
        if self._events:
            self._events[-1][1].synchronize()
            self._cpu_s += sum(a.elapsed_time(b) for a, b in self._events) / 1000
            self._events.clear()
        return self._cpu_s

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.prefix.eval()
        for x, y in self.base.batches(batch_size, shuffle=shuffle, generator=generator, device=device):
            if self.augment is not None and shuffle:
                x = call_augment(self.augment, x)
            # no_grad, not inference_mode: the block saves its input for backward,
            # which inference tensors refuse.
            cuda, t0 = x.is_cuda, time.perf_counter()
            if cuda:
                self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
                self._events[-1][0].record()
            with torch.no_grad(), nullcontext() if self.precision is None else self.precision.autocast():
                box = [(self.prefix(x if self.precision is None else self.precision.format_input(x)), y)]
            del x
            if cuda:
                self._events[-1][1].record()
            else:
                self._cpu_s += time.perf_counter() - t0
            # Yielded out of a list, so that this suspended frame holds no reference to the batch:
            # the block frees its input after its first unit, as the plan's memory model has it.
            yield box.pop()
