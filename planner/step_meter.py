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
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, flop_registry, shape_wrapper

from neuroflux.planner.meta_shortcuts import SHORTCUTS

__all__ = ["StepMeter", "FLOP_FORMULAS", "conv_backward_flops", "flop_counter"]


def conv_backward_flops(
    grad_out_shape: Sequence[int],
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    _bias: object,
    _stride: object,
    _padding: object,
    _dilation: object,
    transposed: bool,
    _output_padding: object,
    _groups: int,
    output_mask: Sequence[bool],
    out_shape: object = None,
    **kwargs: object,
) -> int:
    """FLOPs of ``aten.convolution_backward``: the input's gradient and the
    weight's each cost what the forward convolution costs (the same
    multiply-adds, visited in another order), for grouped and depthwise
    convolutions too.

    ``FlopCounterMode``'s own formula (torch 2.13) rebuilds the backward as
    two convolutions of transposed shapes, which lose the division by the
    number of groups: a depthwise 3x3 convolution's backward counts about
    C times its real work (385x on 384 channels), which made every mobile
    network's step look several times slower than it runs."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


FLOP_FORMULAS = {
    **flop_registry,
    torch.ops.aten.convolution_backward: shape_wrapper(conv_backward_flops),
}
"""``FlopCounterMode``'s formulas with the convolution backward corrected
(``conv_backward_flops``): what a StepMeter counts with."""


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that counts the FLOPs a StepMeter counts."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})


class StepMeter(TorchDispatchMode):
    """Peak tensor memory, FLOPs, dispatched ops and the bytes they move, of
    the code run under it, in one dispatch mode.

    Memory is PyTorch's own accounting as ``MemTracker`` keeps it (every
    storage an op returns counts its bytes until the storage dies; storages
    of ``external`` tensors count from the start), keeping only the running
    total and its peak: no per-module bookkeeping and no module hooks, which
    made up most of planning time on deep networks. On meta and fake
    tensors, the few ops whose meta kernels are slow Python decompositions
    (batch norm, ...) get their outputs from ``meta_shortcuts``. FLOPs use
    ``FlopCounterMode``'s formulas (the convolution backward's corrected for
    groups: ``conv_backward_flops``), decomposing an op without one the way
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
        self.traffic = 0
        """Bytes the counted ops read and write: every tensor argument and
        output of an op that is not a view, once per op (what the cost model
        prices at the device's bandwidth)."""
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
            if not func.is_view:
                self.traffic += _tensor_bytes((args, kwargs))
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
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        if not self._nested and not func.is_view:
            self.traffic += _tensor_bytes(out)
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


def _tensor_bytes(tree: object) -> int:
    """Bytes of the distinct tensors in ``tree`` (shapes only: fake and meta tensors count alike)."""
    seen: dict[int, int] = {}
    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


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
