"""Datasets as tensors, and the activation caches between blocks.

A block's input is a ``TensorCache``: all samples in one tensor (RAM,
pinned when feeding a GPU) or one memory-mapped ``.npy`` file (disk). Every
epoch is shuffled by indexing the whole batch at once (no per-sample Python
reads); fp16 caches are widened to fp32 on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from neuroflux.errors import NeuroFluxError

__all__ = ["TensorCache", "dataset_tensors", "check_samples", "CacheWriter"]

_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}


def dataset_tensors(ds, *, what: str, input_shape: tuple[int, ...] | None = None,
                    num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001 - any map-style dataset
    """(inputs, labels) of a whole map-style dataset, stacked once, and
    checked once: float inputs of ``input_shape``, all finite; integer labels
    in ``[0, num_classes)``. A bad sample is an error naming its index."""
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        x, y = ds.tensors
    else:
        parts_x, parts_y = [], []
        for xb, yb in DataLoader(ds, batch_size=512, shuffle=False, num_workers=0):
            parts_x.append(xb)
            parts_y.append(torch.as_tensor(yb))
        x, y = torch.cat(parts_x), torch.cat(parts_y)
    if not torch.is_floating_point(x):
        raise NeuroFluxError(f"{what} inputs are {x.dtype}; datasets must yield float tensors")
    check_samples(x, y, what=what, input_shape=input_shape, num_classes=num_classes)
    return x.float().contiguous(), y.long().contiguous()


def check_samples(x: torch.Tensor, y: torch.Tensor, *, what: str, input_shape: tuple[int, ...] | None,
                  num_classes: int | None) -> None:
    """Refuse data that would train on garbage, naming the first bad index."""
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise NeuroFluxError(f"{what} samples have shape {tuple(x.shape[1:])}, the plan was made for "
                             f"{tuple(input_shape)}; fix the datasets function or re-plan")
    finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise NeuroFluxError(f"{what} sample {i} has NaN or infinite inputs ({int((~finite).sum())} such samples); "
                             "clean the data before training")
    if y.dim() != 1 or len(y) != len(x):
        raise NeuroFluxError(f"{what} labels have shape {tuple(y.shape)}; expected one integer label per sample")
    if torch.is_floating_point(y) or y.dtype == torch.bool or torch.is_complex(y):
        raise NeuroFluxError(f"{what} labels are {y.dtype}; labels must be integer class indices (e.g. torch.long), "
                             "not floats or one-hot vectors")
    if num_classes is not None:
        bad = (y < 0) | (y >= num_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise NeuroFluxError(f"{what} sample {i} has label {int(y[i])}, outside [0, {num_classes}) for this "
                                 f"{num_classes}-class model")


@dataclass
class TensorCache:
    """Inputs (any dtype, RAM tensor or memmap) and int64 labels.

    On CUDA, batches are gathered into one of two reusable pinned staging
    buffers and copied with ``non_blocking=True``; a CUDA event per buffer
    guards reuse, so the gather of batch i+1 overlaps the copy and compute of
    batch i without pinning new memory every step.
    """

    x: torch.Tensor | np.memmap
    y: torch.Tensor
    _staging: list[torch.Tensor] = field(default_factory=list, repr=False)
    _events: list[Any] = field(default_factory=lambda: [None, None], repr=False)
    _turn: int = 0

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def index_batches(self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(self.x, np.memmap):
            # Sorted reads are sequential on disk; the permutation is restored after.
            sorted_idx, inverse = torch.sort(idx)
            return torch.from_numpy(np.ascontiguousarray(self.x[sorted_idx.numpy()]))[torch.argsort(inverse)]
        return self.x.index_select(0, idx)

    def subset(self, idx: torch.Tensor) -> "TensorCache":
        """The samples ``idx`` as a cache of their own (a copy: a data-parallel
        rank keeps only its shard)."""
        return TensorCache(self._gather(idx), self.y.index_select(0, idx))

    def take(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch on ``device`` as float32, with its labels."""
        yb = self.y.index_select(0, idx)
        if device.type != "cuda":
            return self._gather(idx).float(), yb
        n = idx.shape[0]
        turn = self._turn = self._turn ^ 1
        if self._events[turn] is not None:
            self._events[turn].synchronize()  # the copy that last read this buffer is done
        if len(self._staging) < 2 or self._staging[turn].shape[0] < n:
            shape = (n, *self.x.shape[1:])
            dtype = self.x.dtype if isinstance(self.x, torch.Tensor) else torch.from_numpy(self.x[:1]).dtype
            self._staging = [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(2)]
        buf = self._staging[turn][:n]
        if isinstance(self.x, torch.Tensor):
            torch.index_select(self.x, 0, idx, out=buf)
        else:
            buf.copy_(self._gather(idx))
        xb = buf.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[turn] = event
        return xb.float(), yb.to(device, non_blocking=True)


class CacheWriter:
    """Preallocated output cache filled batch by batch, in RAM or on disk."""

    def __init__(self, n: int, sample_shape: tuple[int, ...], *, dtype: str, location: str, path: Path | None,
                 pin: bool = False) -> None:
        tdtype, ndtype = _DTYPES[dtype]
        self.location = location
        self.path = path
        if location == "disk":
            assert path is not None
            self.x = _allocate_disk_cache(path, ndtype, (n, *sample_shape))
        else:
            self.x = torch.empty((n, *sample_shape), dtype=tdtype, pin_memory=pin)
        self._tdtype = tdtype
        self._pos = 0

    def append(self, out: torch.Tensor) -> None:
        b = out.shape[0]
        chunk = out.detach().to("cpu", dtype=self._tdtype)
        if self.location == "disk":
            self.x[self._pos : self._pos + b] = chunk.numpy()
        else:
            self.x[self._pos : self._pos + b].copy_(chunk)
        self._pos += b

    def finish(self, y: torch.Tensor) -> TensorCache:
        assert self._pos == len(y), (self._pos, len(y))
        if self.location == "disk":
            self.x.flush()
            return TensorCache(np.load(self.path, mmap_mode="r"), y)
        return TensorCache(self.x, y)


def _allocate_disk_cache(path: Path, ndtype, shape: tuple[int, ...]) -> np.memmap:  # noqa: ANN001
    """A memory-mapped ``.npy`` whose blocks are really allocated: a sparse
    file on a full disk kills the process with SIGBUS at some later write;
    this fails now, with how much space is needed and where."""
    import errno
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    need = int(np.prod(shape)) * np.dtype(ndtype).itemsize
    free = shutil.disk_usage(path.parent).free
    if free < need + (16 << 20):
        raise NeuroFluxError(
            f"the disk cache {path} needs {need / 2**30:.2f} GiB but {path.parent} has {free / 2**30:.2f} GiB free; "
            "free space there (or re-plan with --cache-location ram or --cache-dtype float16), then --resume")
    x = np.lib.format.open_memmap(path, mode="w+", dtype=ndtype, shape=shape)
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    except OSError as e:
        del x
        path.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise NeuroFluxError(f"no space left for the disk cache {path} ({need / 2**30:.2f} GiB); free space "
                                 "there, then --resume") from None
        raise
    return x


def open_disk_cache(path: Path, y: torch.Tensor) -> TensorCache:
    return TensorCache(np.load(path, mmap_mode="r"), y)
