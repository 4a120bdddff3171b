"""``StepMeter``: peak tensor memory, FLOPs and dispatched ops of the code
run under it, in one dispatch mode (what every profile of the planner is
measured with)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from neuroflux.planner.meta_shortcuts import SHORTCUTS

__all__ = ["StepMeter"]


class StepMeter(TorchDispatchMode):
    """Peak tensor memory, FLOPs and dispatched ops of the code run under it,
    in one dispatch mode.

    Memory is PyTorch's own accounting as ``MemTracker`` keeps it (every
    storage an op returns counts its bytes until the storage dies; storages
    of ``external`` tensors count from the start), keeping only the running
    total and its peak: no per-module bookkeeping and no module hooks, which
    made up most of planning time on deep networks. On meta and fake
    tensors, the few ops whose meta kernels are slow Python decompositions
    (batch norm, ...) get their outputs from ``meta_shortcuts``. FLOPs use
    ``FlopCounterMode``'s formulas, decomposing an op without one the way
    it does; ``ops`` counts the ops dispatched to this mode (not their
    decompositions, nor metadata queries such as ``prim.device``: whether
    those reach a dispatch mode at all changes once another mode has run in
    the process, and they launch no kernel). A test holds all three to MemTracker and
    FlopCounterMode on the zoo's units."""

    def __init__(self, external: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.flops = 0
        self.ops = 0
        self._nested = 0
        for t in external:
            self._track(t)
        self.peak = self._segment_peak = self.current
        self.marks: list[tuple[int, int]] = []
        """(memory now, peak since the previous mark) at every ``mark()``."""

    def mark(self) -> None:
        """Close a phase of the step: record the memory now and the phase's peak."""
        self.marks.append((self.current, self._segment_peak))
        self._segment_peak = self.current

    @property
    def segment_peak(self) -> int:
        """Peak since the last mark."""
        return self._segment_peak

    def _freed(self, key: int, size: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= size

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._live:
            return
        size = st.nbytes()
        if t.device.type == "cuda":  # the caching allocator's rounding, as MemTracker counts it
            size = math.ceil(size / _CUDA_MIN_ALLOC) * _CUDA_MIN_ALLOC
        self._live[key] = (weakref.ref(st, lambda _: self._freed(key, size)), size)
        self.current += size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:  # queries, not kernels; whether one reaches a mode at all varies within a process
            return func(*args, **kwargs)
        if not self._nested:
            self.ops += 1
        if _decomposes(func):
            self._nested += 1
            try:
                with self:
                    r = func.decompose(*args, **kwargs)
            finally:
                self._nested -= 1
            if r is not NotImplemented:
                return r
        out = None
        shortcut = SHORTCUTS.get(func)
        if shortcut is not None and _dataless(args[0]):
            out = shortcut(*args, **kwargs)
        if out is None:
            out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        if self.current > self._segment_peak:
            self._segment_peak = self.current
            if self.current > self.peak:
                self.peak = self.current
        return out


_METADATA = frozenset(
    {
        torch.ops.prim.device.default,
        torch.ops.prim.layout.default,
        torch.ops.aten.sym_is_contiguous.default,
        torch.ops.aten.is_contiguous.default,
        torch.ops.aten.is_contiguous.memory_format,
        torch.ops.aten.is_strides_like_format.default,
        torch.ops.aten.is_non_overlapping_and_dense.default,
        torch.ops.aten.size.default,
        torch.ops.aten.sym_size.default,
        torch.ops.aten.stride.default,
        torch.ops.aten.sym_stride.default,
        torch.ops.aten.storage_offset.default,
        torch.ops.aten.sym_storage_offset.default,
        torch.ops.aten.numel.default,
        torch.ops.aten.sym_numel.default,
        torch.ops.aten.dim.default,
    }
)
_DECOMPOSES: dict = {}


def _dataless(t: object) -> bool:
    """Whether ``t`` is a tensor without data (meta or fake), where only outputs' metadata matter."""
    return isinstance(t, torch.Tensor) and (t.device.type == "meta" or isinstance(t, FakeTensor))


def _decomposes(func) -> bool:
    """Whether ``func`` has a CompositeImplicitAutograd kernel (the ops
    ``FlopCounterMode`` splits into counted parts); asked once per op."""
    known = _DECOMPOSES.get(func)
    if known is None:
        key = torch._C.DispatchKey.CompositeImplicitAutograd
        known = _DECOMPOSES[func] = key in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(
            func.name(), key
        )
    return known


_CUDA_MIN_ALLOC = 512
