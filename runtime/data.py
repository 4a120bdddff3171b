"""Where a block's batches come from: the dataset, a cache, or a recomputed prefix.

Every source yields ``(inputs, labels)`` batches on the device through
``batches(batch_size, shuffle=, generator=, device=)``, in the same order for
the same generator (the epoch's permutation, cut into consecutive batches):

- ``TensorCache``: all samples in one tensor (RAM, pinned when feeding a
  GPU) or one memory-mapped ``.npy`` file (disk); a batch is gathered at
  once (no per-sample Python reads); fp16 caches are widened to fp32 on the
  device. The stacked dataset is one too.
- ``StreamSource``: a map-style dataset read through a ``DataLoader`` with
  worker processes, pinned memory and prefetching, checked batch by batch;
  for datasets larger than RAM, or whose transforms draw anew every epoch.
- ``PrefixSource``: another source run through frozen units (eval mode,
  ``no_grad``) on every batch: a block whose input is recomputed.

``dataset_sources`` opens the dataset as the plan says (stacked or streamed,
this rank's shard under torchrun).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from neuroflux.common import atomic_write
from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.distributed import Dist, shard_indices
from neuroflux.schemas.plan import Plan

__all__ = [
    "TensorCache",
    "StreamSource",
    "call_augment",
    "dataset_tensors",
    "check_samples",
    "CacheWriter",
    "default_loader_workers",
    "dataset_sources",
    "labels_file",
]

log = logging.getLogger(__name__)

#: A cache dtype's torch and numpy element types; numpy has no bfloat16, so a
#: bfloat16 disk cache holds its bits as int16 (``_as_torch`` views them back).
_DTYPES = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.int16),
}


def numpy_dtype(cache_dtype: str) -> np.dtype:
    """The numpy element type a disk cache of ``cache_dtype`` is stored as."""
    return np.dtype(_DTYPES[cache_dtype][1])


def _as_torch(a: np.ndarray) -> torch.Tensor:
    """A numpy array read from a cache as a tensor (int16 bits: bfloat16)."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if t.dtype == torch.int16 else t


def default_loader_workers() -> int:
    """DataLoader worker processes: one per usable core beyond the trainer's
    own, at most 8 (decoding rarely needs more); 0 on a single core."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


def _loader(ds, batches: list[list[int]], *, workers: int, pin: bool) -> DataLoader:
    """Batches of ``ds`` at the given indices, in order: ``workers``
    processes decode ahead (two batches each), into pinned memory when
    feeding a GPU."""
    extra: dict[str, Any] = dict(prefetch_factor=2, persistent_workers=False) if workers > 0 else {}
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, pin_memory=pin, **extra)


def _read_error(what: str, e: BaseException, indices: list[int]) -> NeuroFluxError:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    if "Original Traceback" in str(e) and lines:  # raised in a worker: its last line is the dataset's own error
        cause = lines[-1].strip()
    else:
        cause = f"{type(e).__name__}: {lines[0] if lines else ''}"
    span = f"{indices[0]}" if len(indices) == 1 else f"{min(indices)}..{max(indices)} (a batch)"
    return NeuroFluxError(
        f"reading {what} samples {span} failed: {cause[:200]}; datasets must yield (float tensor "
        "of one shape, int label) pairs: fix the dataset or its transform"
    )


def _iter_loader(loader: DataLoader, batches: list[list[int]], what: str) -> Iterator[tuple[list[int], Any]]:
    it = iter(loader)
    for idx in batches:
        try:
            item = next(it)
        except StopIteration:
            size = len(cast(Sized, loader.dataset))  # map-style: the batches were made from its __len__
            raise NeuroFluxError(
                f"{what} dataset yielded fewer samples than its __len__ says ({size}); fix __len__"
            ) from None
        except NeuroFluxError:
            raise
        except Exception as e:  # the dataset's own code: IndexError, OSError, PIL errors, collate's RuntimeError
            raise _read_error(what, e, idx) from e
        yield idx, item


def _as_pair(item: Any, what: str, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        n = len(item) if isinstance(item, (list, tuple)) else type(item).__name__
        raise NeuroFluxError(
            f"{what} samples {min(idx)}..{max(idx)} are not (input, label) pairs (got {n} items); "
            "datasets must yield (tensor, int) pairs"
        )
    x, y = item
    if not isinstance(x, torch.Tensor):
        raise NeuroFluxError(f"{what} inputs are {type(x).__name__}, not tensors; add a ToTensor-like transform")
    return x, torch.as_tensor(y)


def dataset_tensors(
    ds, *, what: str, input_shape: tuple[int, ...] | None = None, num_classes: int | None = None, workers: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of a whole map-style dataset, stacked once (read by
    ``workers`` processes), and checked once: float inputs of
    ``input_shape``, all finite; integer labels in ``[0, num_classes)``. A
    bad sample is an error naming its index."""
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        inputs, labels = ds.tensors
        if not torch.is_floating_point(inputs):
            raise NeuroFluxError(f"{what} inputs are {inputs.dtype}; datasets must yield float tensors")
        check_samples(inputs, labels, what=what, input_shape=input_shape, num_classes=num_classes)
        return inputs.float().contiguous(), labels.long().contiguous()
    n = len(ds)
    batches = [list(range(i, min(i + 256, n))) for i in range(0, n, 256)]
    x: torch.Tensor | None = None  # allocated at the first batch, which gives the sample shape
    y = torch.empty(n, dtype=torch.long)
    for idx, item in _iter_loader(_loader(ds, batches, workers=workers, pin=False), batches, what):
        xb, yb = _as_pair(item, what, idx)
        check_samples(xb, yb, what=what, input_shape=input_shape, num_classes=num_classes, indices=idx)
        if x is None:  # one allocation: no list of parts and a second copy at the end
            x = torch.empty((n, *xb.shape[1:]), dtype=torch.float32)
        x[idx[0] : idx[-1] + 1] = xb
        y[idx[0] : idx[-1] + 1] = yb
    if x is None:
        raise NeuroFluxError(f"the {what} dataset is empty")
    return x, y


def check_samples(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    what: str,
    input_shape: tuple[int, ...] | None,
    num_classes: int | None,
    indices: Sequence[int] | None = None,
) -> None:
    """Refuse data that would train on garbage, naming the first bad index
    (``indices``: the dataset index of each row, for a batch)."""
    at = (lambda i: int(indices[i])) if indices is not None else int
    if not torch.is_floating_point(x):
        raise NeuroFluxError(f"{what} inputs are {x.dtype}; datasets must yield float tensors")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        where = f" (samples {at(0)}..{at(len(x) - 1)})" if indices is not None else ""
        raise NeuroFluxError(
            f"{what} samples have shape {tuple(x.shape[1:])}{where}, the plan was made for "
            f"{tuple(input_shape)}; fix the datasets function or re-plan"
        )
    finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise NeuroFluxError(
            f"{what} sample {at(i)} has NaN or infinite inputs ({int((~finite).sum())} such samples"
            f"{' in its batch' if indices is not None else ''}); clean the data before training"
        )
    if y.dim() != 1 or len(y) != len(x):
        raise NeuroFluxError(f"{what} labels have shape {tuple(y.shape)}; expected one integer label per sample")
    if torch.is_floating_point(y) or y.dtype == torch.bool or torch.is_complex(y):
        raise NeuroFluxError(
            f"{what} labels are {y.dtype}; labels must be integer class indices (e.g. torch.long), "
            "not floats or one-hot vectors"
        )
    if num_classes is not None:
        bad = (y < 0) | (y >= num_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise NeuroFluxError(
                f"{what} sample {at(i)} has label {int(y[i])}, outside [0, {num_classes}) for this "
                f"{num_classes}-class model"
            )


def _order(n: int, *, shuffle: bool, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)


class StreamSource:
    """A map-style dataset read batch by batch: nothing is held beyond the
    batches in flight. ``indices`` restricts it to a subset (a rank's shard)."""

    def __init__(
        self,
        ds,
        *,
        what: str,
        input_shape: tuple[int, ...] | None,
        num_classes: int | None,
        workers: int,
        indices: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        self.ds, self.what, self.workers = ds, what, workers
        self.input_shape, self.num_classes = input_shape, num_classes
        self.indices = None if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.ds)

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = _order(len(self), shuffle=shuffle, generator=generator).tolist()
        if self.indices is not None:
            order = [self.indices[i] for i in order]
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        loader = _loader(self.ds, chunks, workers=self.workers, pin=device.type == "cuda")
        for idx, item in _iter_loader(loader, chunks, self.what):
            x, y = _as_pair(item, self.what, idx)
            check_samples(x, y, what=self.what, input_shape=self.input_shape, num_classes=self.num_classes, indices=idx)
            yield x.to(device, non_blocking=True).float(), y.to(device, non_blocking=True).long()


def call_augment(fn: Any, x: torch.Tensor) -> torch.Tensor:
    """The model file's ``augment(x)``: its errors, and a result that is not
    a tensor of the batch's shape, are the user's to fix (exit 2)."""
    try:
        out = fn(x)
    except Exception as e:
        raise NeuroFluxError(
            f"augment() raised {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}; "
            "fix the model file's augment function"
        ) from e
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NeuroFluxError(
            f"augment() returned {got} for a batch of shape {tuple(x.shape)}; it must return a batch of the same shape"
        )
    return out


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
    out_dtype: torch.dtype = torch.float32
    """Batches come out in it: float32, or under mixed precision the compute
    dtype (what the previous unit handed over before the cache)."""
    _events: list[Any] = field(default_factory=lambda: [None, None], repr=False)
    _turn: int = 0

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def index_batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
    ) -> Iterator[torch.Tensor]:
        n = len(self)
        order = _order(n, shuffle=shuffle, generator=generator)
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]

    def batches(
        self, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.index_batches(batch_size, shuffle=shuffle, generator=generator):
            yield self.take(idx, device)

    def _gather(self, idx: torch.Tensor) -> torch.Tensor:
        if isinstance(self.x, np.memmap):
            # Sorted reads are sequential on disk; the permutation is restored after.
            sorted_idx, inverse = torch.sort(idx)
            return _as_torch(np.ascontiguousarray(self.x[sorted_idx.numpy()]))[torch.argsort(inverse)]
        return self.x.index_select(0, idx)

    def subset(self, idx: torch.Tensor) -> TensorCache:
        """The samples ``idx`` as a cache of their own (a copy: a data-parallel
        rank keeps only its shard)."""
        return TensorCache(self._gather(idx), self.y.index_select(0, idx), out_dtype=self.out_dtype)

    def take(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch on ``device`` in ``out_dtype``, with its labels."""
        yb = self.y.index_select(0, idx)
        if device.type != "cuda":
            return self._gather(idx).to(self.out_dtype), yb
        n = idx.shape[0]
        turn = self._turn = self._turn ^ 1
        if self._events[turn] is not None:
            self._events[turn].synchronize()  # the copy that last read this buffer is done
        if len(self._staging) < 2 or self._staging[turn].shape[0] < n:
            shape = (n, *self.x.shape[1:])
            dtype = self.x.dtype if isinstance(self.x, torch.Tensor) else _as_torch(self.x[:1]).dtype
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
        return xb.to(self.out_dtype), yb.to(device, non_blocking=True)


class CacheWriter:
    """Preallocated output cache filled batch by batch, in RAM or on disk."""

    def __init__(
        self, n: int, sample_shape: tuple[int, ...], *, dtype: str, location: str, path: Path | None, pin: bool = False
    ) -> None:
        tdtype, ndtype = _DTYPES[dtype]
        self.location = location
        self.path = path
        self.x: torch.Tensor | np.memmap
        if location == "disk":
            assert path is not None
            self.x = _allocate_disk_cache(path, ndtype, (n, *sample_shape))
        else:
            self.x = torch.empty((n, *sample_shape), dtype=tdtype, pin_memory=pin)
        self._tdtype = tdtype
        self._pos = 0

    def append(self, out: torch.Tensor) -> None:
        if tuple(out.shape[1:]) != tuple(self.x.shape[1:]):
            raise NeuroFluxError(
                f"the block's outputs have shape {tuple(out.shape[1:])} but the plan says "
                f"{tuple(self.x.shape[1:])} (its output_shape was edited, or the model changed): "
                "re-plan with nf-plan"
            )
        b = out.shape[0]
        chunk = out.detach().to("cpu", dtype=self._tdtype)
        if isinstance(self.x, np.memmap):  # location "disk"
            self.x[self._pos : self._pos + b] = (
                chunk.view(torch.int16) if chunk.dtype == torch.bfloat16 else chunk
            ).numpy()
        else:
            self.x[self._pos : self._pos + b].copy_(chunk)
        self._pos += b

    def finish(self, y: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> TensorCache:
        """The filled cache; on disk, flushed, with its labels written beside
        it (``<name>.labels.npy``), so a resume can reopen it without reading
        the dataset again."""
        assert self._pos == len(y), (self._pos, len(y))
        if isinstance(self.x, np.memmap):  # location "disk"
            assert self.path is not None  # __init__ checks that a disk cache has a path
            self.x.flush()
            labels = labels_file(self.path)
            # After the data is flushed: labels present means the cache is whole.
            atomic_write(labels, lambda tmp: np.save(open(tmp, "wb"), y.numpy().astype(np.int64), allow_pickle=False))
            return TensorCache(np.load(self.path, mmap_mode="r"), y, out_dtype=out_dtype)
        return TensorCache(self.x, y, out_dtype=out_dtype)


def labels_file(cache: Path) -> Path:
    """The labels beside a disk cache (``block0.npy`` -> ``block0.labels.npy``)."""
    return cache.with_name(f"{cache.stem}.labels{cache.suffix}")


def _allocate_disk_cache(path: Path, ndtype, shape: tuple[int, ...]) -> np.memmap:
    """A memory-mapped ``.npy`` whose blocks are really allocated: a sparse
    file on a full disk kills the process with SIGBUS at some later write;
    this fails now, with how much space is needed and where."""
    import errno
    import shutil

    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise NeuroFluxError(
            f"the disk cache {path} exists and is not a regular file (a directory or a link); "
            "remove it, then --resume (the cache is rebuilt from the finished blocks)"
        )
    path.unlink(missing_ok=True)  # a new file: never written through another name of an old one
    path.parent.mkdir(parents=True, exist_ok=True)
    need = int(np.prod(shape)) * np.dtype(ndtype).itemsize
    free = shutil.disk_usage(path.parent).free
    if free < need + (16 << 20):
        raise NeuroFluxError(
            f"the disk cache {path} needs {need / 2**30:.2f} GiB but {path.parent} has {free / 2**30:.2f} GiB free; "
            "free space there (or re-plan with --cache-location ram or --cache-dtype float16), then --resume"
        )
    x = np.lib.format.open_memmap(path, mode="w+", dtype=ndtype, shape=shape)
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    except OSError as e:
        del x
        path.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise NeuroFluxError(
                f"no space left for the disk cache {path} ({need / 2**30:.2f} GiB); free space there, then --resume"
            ) from None
        raise
    return x


def dataset_sources(
    train_set: Any, val_set: Any, plan: Plan, *, dist: Dist, check_sizes: bool, workers: int
) -> tuple[Any, Any]:
    """The dataset as the plan says: stacked in RAM once, or streamed
    through DataLoader workers; checked against the plan's sizes (when
    ``check_sizes``); this rank's shard under torchrun."""
    r = plan.recipe
    for what, ds, planned in (("train", train_set, r.train_size), ("val", val_set, r.val_size)):
        if len(ds) != planned and check_sizes:
            raise NeuroFluxError(
                f"the {what} set has {len(ds)} samples but the plan was made for {planned}: its "
                "batches, learning-rate schedule and cache sizes assume that many; re-plan for "
                "this data (or pass --force to run anyway)"
            )
    meta: dict[str, Any] = dict(input_shape=tuple(plan.model.input_shape), num_classes=plan.model.num_classes)
    mode = plan.data.mode if plan.data is not None else "stack"
    shards: list[torch.Tensor | None] = [None, None]
    if dist.enabled:  # this rank's shards: its caches hold only these
        shards = [shard_indices(len(train_set), dist, equal=True), shard_indices(len(val_set), dist, equal=False)]
    out: list[StreamSource | TensorCache] = []
    for what, ds, shard in (("train", train_set, shards[0]), ("val", val_set, shards[1])):
        if mode == "stream":
            out.append(StreamSource(ds, what=what, workers=workers, indices=shard, **meta))
            continue
        src = TensorCache(*dataset_tensors(ds, what=what, workers=workers, **meta))
        if what == "train" and len(src) > 1 and bool((src.y == src.y[0]).all()):
            log.warning(
                "every training sample has label %d: the run can only learn to predict that class; "
                "check the datasets function",
                int(src.y[0]),
            )
        out.append(src if shard is None else src.subset(shard))
    return out[0], out[1]
