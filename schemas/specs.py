"""What a plan is made for and how it trains: the model, the device with its
budgets, how the data reaches the first block, the training recipe and the
exit policy (records of ``Plan``; see ``plan.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DataSpec", "DeviceSpec", "ExitPolicy", "ModelSpec", "Recipe"]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model a plan was made for."""

    file: str
    """Path of the model file, absolute or relative to the plan file."""
    sha256: str
    """Hex digest of the model file's bytes when planned."""
    factory: str
    """Name of the function that builds the untrained ``nn.Module``."""
    datasets: str
    """Name of the function returning ``(train, val)`` datasets."""
    input_shape: list[int]
    """Shape of one sample, (C, H, W)."""
    num_classes: int
    params: int
    """Parameters of the original model, its own head included."""
    capture: Literal["symbolic", "shape-specialized"] = "symbolic"
    """How the graph was captured: torch.fx symbolic tracing, or (when the
    forward does shape arithmetic that refuses it) tracing with the input
    shape fixed and the batch symbolic. Added in 2.1."""
    source: Literal["file", "import", "object"] = "file"
    """Where the model came from: a model file (``file`` is its path and
    ``sha256`` the file's digest), an installed module's factory (``file`` is
    the module's import name, ``sha256`` its source file's digest), or a
    model object in Python (``file`` is its class, ``sha256`` its structural
    fingerprint: parameter and buffer names, shapes and dtypes). Added in
    2.2."""


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """Where the plan runs and what memory it may use."""

    kind: Literal["cuda", "cpu"]
    """Target device type; on CPU the budget is accounted, not enforced."""
    name: str
    """Device name when planned (for the record only)."""
    budget_text: str
    """The budget as the user gave it (or as read from NVML)."""
    budget_bytes: int
    budget_source: Literal["flag", "nvml"]
    margin_fraction: float
    """Share of the budget held back for allocator rounding and
    fragmentation: every predicted peak is at most budget * (1 - margin)."""
    cache_budget_bytes: int
    """Host RAM for activation caches: a block's source cache plus the cache
    it writes (``--host-budget``; before 2.3, RAM or disk for both)."""
    workspace_bytes: int = 0
    """Memory the device's math libraries hold for the whole run and no
    tensor accounts for (on CUDA: a cuBLAS workspace per handle, one for the
    forward thread and one for autograd's, 32 MiB each on Hopper); included
    in every predicted peak. Added in 2.1 (0 in older plans)."""
    step_overhead_bytes: int = 0
    """Bytes a training step allocates on the device beyond the traced
    tensors (cuDNN workspaces, allocator rounding), from the device
    profile's calibration; already in every unit profile's dyn_fixed_bytes."""
    activation_scale: float = 1.0
    """Measured over traced per-sample bytes on the device; already applied
    to every unit profile's dyn_per_sample_bytes (1.0 on CPU, where the
    trace is exact)."""
    disk_budget_bytes: int = 0
    """Disk for activation caches, counted like ``cache_budget_bytes``
    (``--disk-budget``; default: the free space where the plan is written,
    less a margin). Added in 2.3."""


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """How the dataset's inputs reach the first block (and recomputing ones). Added in 2.3."""

    mode: Literal["stack", "stream"]
    """``stack``: every sample is read once into one float32 tensor in RAM
    (fastest; frozen per-sample transforms); ``stream``: batches are read
    through a DataLoader with worker processes on every pass (any size;
    random transforms draw anew each epoch)."""
    input_bytes: int
    """Train plus val inputs as float32: what stacking holds in RAM."""
    peak_cache_ram_bytes: int
    """Most RAM the plan's caches hold at once."""
    peak_cache_disk_bytes: int
    """Most disk the plan's caches hold at once."""
    reason: str
    """Why this mode: the flag, or the host budget against the two RAM terms."""


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How every block is trained."""

    optimizer: Literal["sgd"]
    lr: float
    """Base learning rate at ``base_batch_size``."""
    base_batch_size: int
    lr_scaling: Literal["sqrt", "linear", "none"]
    momentum: float
    weight_decay: float
    schedule: Literal["cosine", "constant"]
    epochs_per_block: int
    seed: int
    train_size: int
    val_size: int
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision of every method: ``fp32``, or automatic mixed
    precision (fp32 weights, the forward under ``torch.autocast``) in bf16
    or fp16 (with a loss scaler per unit). Added in 2.5 (older plans: fp32)."""
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    """Layout of every method's activations and 4-d weights: ``contiguous``
    (NCHW) or ``channels_last`` (NHWC; runtime/precision.py). The planner
    profiles the steps in it. Added in 2.10 (older plans: contiguous)."""


@dataclass(frozen=True, kw_only=True)
class ExitPolicy:
    """Adaptive depth, per-block epochs, and which exit to keep."""

    patience: int
    """Adaptive depth, counted in units: training stops at the end of a
    block once this many exits in a row (in depth order) have not beaten the
    best exit so far by more than ``tolerance``; 0 trains every block."""
    tolerance: float
    """Accuracy (0..1) within which exits count as equal."""
    prefer: Literal["shallowest", "best"]
    """``shallowest``: the earliest exit within ``tolerance`` of the best."""
    epoch_patience: int
    """Per-block epochs: a block moves on once its best exit (on val, after
    every epoch) has not improved by more than ``tolerance`` for this many
    epochs; 0 runs every block for its planned epochs."""
    max_extra_epochs: int
    """A block still improving at its last planned epoch may run up to this
    many more, each paid from the predicted time that converged blocks saved
    and that the units past ``min_reduction``'s last exit would have taken,
    so a run never exceeds the plan's predicted total."""
    min_reduction: float = 1.0
    """The kept exit (its units and head) has at least this many times fewer
    parameters than the model: larger exits are never kept, and training stops
    at the last exit small enough, its block trained only up to it (1: any
    exit). Added in 2.6."""
