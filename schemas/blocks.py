"""The plan's decisions: units (a span of the traced graph with its aux head and
predicted step cost) and blocks (units trained together at one batch size,
with where their input comes from and where their output goes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["AuxHead", "Block", "BlockInput", "CacheSpec", "Unit", "UnitProfile"]


@dataclass(frozen=True, kw_only=True)
class AuxHead:
    """A unit's local classifier (its early exit)."""

    kind: Literal["pooled", "conv", "dgl", "stage", "linear"]
    """``pooled``: avg-pool to at most 4x4, two 1x1 convs (width)+BN+ReLU,
    linear (the default). ``conv``: 3x3 conv(width)+BN+ReLU at full
    resolution, 2x2 avg-pool, linear. ``dgl``: DGL's spatially-reduced head,
    avg-pool to at most 8x8, two 1x1 convs (width)+BN+ReLU, avg-pool to 2x2,
    a 3-layer MLP (width). ``stage``: two 3x3 convs (width)+BN+ReLU, the
    first strided, global avg-pool, linear (AugLocal-like). ``linear``:
    global avg-pool (if spatial) and a linear layer. (``dgl`` and
    ``stage`` since 2.5.)"""
    width: int
    """Filters of the conv (0 for ``linear``)."""
    params: int


@dataclass(frozen=True, kw_only=True)
class UnitProfile:
    """Predicted cost of one training step of a unit with its chosen head.

    Memory of a step at batch ``b``: ``static_bytes`` (params, buffers,
    optimizer state: resident for the whole block) plus
    ``dyn_fixed_bytes + dyn_per_sample_bytes * b`` (input, saved activations,
    output, gradients: alive only while this unit steps). Time:
    ``step_fixed_s + step_per_sample_s * b``.
    """

    static_bytes: int
    dyn_fixed_bytes: int
    dyn_per_sample_bytes: int
    step_fixed_s: float
    step_per_sample_s: float
    fwd_per_sample_s: float
    """Inference time per sample of the unit alone (for cache writes)."""


@dataclass(frozen=True, kw_only=True)
class Unit:
    """A span of the traced graph trained on its own local loss."""

    name: str
    """Stable id, ``u<index>``."""
    index: int
    nodes: list[str]
    """torch.fx node names executed by this unit, in graph order."""
    input_node: str
    """fx node producing this unit's input (the placeholder for unit 0)."""
    output_node: str
    """fx node whose value is this unit's output (a cut point)."""
    input_shape: list[int]
    output_shape: list[int]
    """Per-sample shapes (batch dim dropped)."""
    params: int
    out_bytes_per_sample: int
    """Bytes of one cached output sample at the plan's cache dtype."""
    is_last: bool
    """The last unit exits through the model's own head (no aux head)."""
    aux: AuxHead | None
    profile: UnitProfile


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    """How a block's outputs are stored for the next block."""

    location: Literal["ram", "disk"]
    dtype: Literal["float32", "float16", "bfloat16"]
    bytes: int
    """Train plus val outputs of the block at this dtype."""
    file: str | None = None
    """With ``location: disk``: the cache file, relative to the run directory. Added in 2.2."""


@dataclass(frozen=True, kw_only=True)
class BlockInput:
    """Where a block's input batches come from. Added in 2.3."""

    kind: Literal["data", "cache", "recompute"]
    """``data``: the dataset (the first block); ``cache``: the cache that
    ``source_block`` wrote; ``recompute``: the cache of ``source_block`` (or
    the dataset when it is None) run through ``recompute_units``, frozen, in
    inference mode, on every batch."""
    source_block: int | None
    """Block whose output cache is read; None: the dataset."""
    recompute_units: list[str]
    """Units run before this block on every batch (empty unless recompute)."""
    recompute_s: float
    """Predicted time of that recomputation over the block's training
    (included in ``predicted_time_s``)."""


@dataclass(frozen=True, kw_only=True)
class Block:
    """Consecutive units trained together at one batch size."""

    index: int
    units: list[str]
    batch_size: int
    epochs: int
    lr: float
    """Peak learning rate for this block's optimizers (scaled from the
    recipe's base rate by the batch-size rule)."""
    steps: int
    """Optimizer steps per unit: epochs * ceil(train_size / batch_size)."""
    predicted_peak_bytes: int
    predicted_time_s: float
    """Training steps plus writing the output cache."""
    cache: CacheSpec | None
    """Output cache; None for the last block, and where the next block
    recomputes its input."""
    shuffle_seed: int | None = None
    """Epoch ``e`` draws its batches with ``torch.Generator().manual_seed(shuffle_seed + e)``. Added in 2.2
    (older plans: derived from the recipe's seed by the same rule)."""
    input: BlockInput | None = None
    """Where the block's input comes from. Added in 2.3 (older plans: the
    previous block's cache, the dataset for the first)."""
    predicted_peak_recompute_bytes: int = 0
    """Part of ``predicted_peak_bytes`` due to the recomputed units (their
    weights, and an inference pass beyond the step's own peak). Added in 2.3."""

    def input_text(self) -> str:
        """The input in a few words: ``data``, ``cache b1``, ``recompute u0..u3 from data``."""
        src = self.source()
        origin = "data" if src.source_block is None else f"cache b{src.source_block}"
        if src.kind != "recompute":
            return origin
        us = src.recompute_units
        return f"recompute {us[0]}{'..' + us[-1] if len(us) > 1 else ''} from {origin}"

    def output_text(self) -> str:
        """Where its outputs go: ``ram cache``, ``disk cache`` or ``-`` (last block, or the next recomputes)."""
        return "-" if self.cache is None else f"{self.cache.location} cache"

    def source(self) -> BlockInput:
        """``input``, derived for plans older than 2.3."""
        if self.input is not None:
            return self.input
        if self.index == 0:
            return BlockInput(kind="data", source_block=None, recompute_units=[], recompute_s=0.0)
        return BlockInput(kind="cache", source_block=self.index - 1, recompute_units=[], recompute_s=0.0)
