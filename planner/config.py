"""Plan configuration: what ``nf-plan`` decides with, as nested records.

``PlanConfig`` holds one frozen, keyword-only record per concern: the
budgets (device memory, host RAM, disk), the data, the target device and
its cost model, the solver's search, the aux heads, the training recipe and
the exit policy. Each record checks its own values and names the field in
its errors (``ConfigError``); ``nf-plan`` rewords them with its flags.

Every field has a unique name across the records: ``PlanConfig.from_options``
builds a config from those names (``epochs=5``, ``head_kind="conv"``), as
``neuroflux.plan(**options)``, ``nf-plan`` and ``nf-bench``'s variants do.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from neuroflux.errors import NeuroFluxError
from neuroflux.planner.problem import Boundary
from neuroflux.planner.profile import SGDConfig
from neuroflux.planner.solve_cpsat import DEFAULT_TIE_TOLERANCE
from neuroflux.runtime.precision import cache_dtype_for, default_memory_format

__all__ = [
    "PlanConfig",
    "BudgetConfig",
    "DataConfig",
    "TargetConfig",
    "SearchConfig",
    "HeadsConfig",
    "RecipeConfig",
    "ExitConfig",
    "ConfigError",
    "lr_for_batch",
    "default_cache_budget_bytes",
    "default_disk_budget_bytes",
    "auto_patience",
    "CPU_BATCH_TIME_TOLERANCE",
]

#: The batch rule's tolerance on a CPU target by default. On a CPU a large
#: batch saves little time per sample (measured: sometimes none, sometimes it
#: costs), and local learning at a few epochs is step-bound: the smallest batch
#: within 10% of the least predicted time bought 0.6 to 3 points on VGG-11,
#: ResNet-18 and ShuffleNetV2 at 2-3 epochs (BENCHMARKS.md). Off on CUDA until
#: measured on a GPU.
CPU_BATCH_TIME_TOLERANCE = 0.1


def auto_patience(n_units: int) -> int:
    """Adaptive depth's default patience: a quarter of the network's units, at
    least 2. A network cut into many small units (ShuffleNetV2, MobileNetV2:
    18-19) gains little per unit, and its exits plateau within a resolution
    stage before climbing in the next; 2 units there is a plateau's middle,
    not its end. Networks of up to 11 units keep 2."""
    return max(2, n_units // 4)


class ConfigError(NeuroFluxError, ValueError):
    """A config value out of range. The message names the config fields;
    ``worded(names)`` names them as a front end does (``nf-plan``: its flags).

    ``template`` is a ``str.format`` template: each placeholder that is not
    a key of ``values`` names a field."""

    def __init__(self, template: str, **values: Any) -> None:
        self.template = template
        self.values = values
        self.fields = tuple(name for _, name, _, _ in string.Formatter().parse(template) if name and name not in values)
        super().__init__(self.worded({}))

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with each field called ``names[field]`` (default: the field's own name)."""
        return self.template.format(**{f: names.get(f, f) for f in self.fields}, **self.values)


def _check_choices(record: Any) -> None:
    """Every ``Literal`` field holds one of its choices (a Python caller can
    pass anything; the CLI's argparse checks its own)."""
    cls = type(record)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Literal and getattr(record, f.name) not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise ConfigError(
                "{" + f.name + "} must be one of {choices}, got {got!r}", choices=choices, got=getattr(record, f.name)
            )


#: What each ``cache_location`` lets a block boundary be.
_BOUNDARIES: dict[str, tuple[Boundary, ...]] = {
    "auto": ("ram", "disk", "recompute"),
    "ram": ("ram", "recompute"),
    "disk": ("disk", "recompute"),
    "recompute": ("recompute",),
}


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    """Device memory, host RAM and disk the plan may use, and where
    activations live between blocks."""

    budget_bytes: int
    """Device memory for training tensors (``--budget``, or the free memory NVML reports)."""
    budget_text: str
    """The budget as given (``1GB``); the plan records it."""
    budget_source: Literal["flag", "nvml"] = "flag"
    """Where the budget came from: the caller, or NVML's free memory."""
    margin: float = 0.10
    """Share of the budget kept free for allocator rounding and fragmentation."""
    cache_budget_bytes: int | None = None
    """Host RAM for activation caches (``--host-budget``). Default: half of
    this machine's physical RAM (not of the free RAM: plans do not follow load)."""
    disk_budget_bytes: int | None = None
    """Disk for activation caches (``--disk-budget``). Default: the free
    space of the filesystem that holds the plan, less 10% and 1 GiB."""
    cache_location: Literal["auto", "ram", "disk", "recompute"] = "auto"
    """Boundary kinds the plan may use: ``auto`` all three, ``ram`` or
    ``disk`` that cache and recompute, ``recompute`` recompute only."""
    cache_dtype: Literal["float16", "bfloat16", "float32"] | None = None
    """Element type of cached activations; None: the compute precision's
    (``bfloat16`` for bf16, else ``float16``): ``PlanConfig.cache_dtype``."""

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ConfigError("{budget_bytes} must be > 0")
        if self.budget_bytes > 2**48:
            raise ConfigError(
                "{budget_bytes} is {got} bytes, more than any device has (limit 256 TiB); give the "
                "device's memory, e.g. 80GB",
                got=self.budget_bytes,
            )
        if not 0 <= self.margin < 1:
            raise ConfigError("{margin} must be in [0, 1), got {got}", got=self.margin)
        for name in ("cache_budget_bytes", "disk_budget_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ConfigError("{" + name + "} must be a number of bytes >= 0, got {got!r}", got=value)
        _check_choices(self)

    @property
    def boundaries(self) -> tuple[Boundary, ...]:
        """The boundary kinds ``cache_location`` allows."""
        return _BOUNDARIES[self.cache_location]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The model's data: where it comes from, its sizes, how inputs reach the first block."""

    input_shape: tuple[int, ...] | None = None
    """One sample's shape, e.g. (3, 32, 32); default: the model file's
    INPUT_SHAPE, else a training sample's."""
    train_size: int | None = None
    """Training samples; default: the length of the model file's training set."""
    val_size: int | None = None
    """Validation samples; default: the length of the model file's validation set."""
    factory: str | None = None
    """The model file's factory function (``MODEL:factory``); default: ``model``."""
    datasets: str = "datasets"
    """Name of the datasets function in the model file."""
    data_mode: Literal["auto", "stack", "stream"] = "auto"
    """How inputs reach the first block: ``auto`` stacks them in RAM when
    they fit the host budget beside the caches, else streams."""

    def __post_init__(self) -> None:
        if self.input_shape is not None and (not self.input_shape or any(int(d) < 1 for d in self.input_shape)):
            raise ConfigError(
                "{input_shape} must be positive sizes such as (3, 32, 32), got {got}", got=self.input_shape
            )
        for name in ("train_size", "val_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError("{" + name + "} must be a positive number of samples, got {got!r}", got=value)
        _check_choices(self)


@dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """The device the plan is for, and the cost model that times steps on it."""

    device_kind: Literal["cpu", "cuda"] = "cpu"
    """The target device's kind."""
    device_name: str = "cpu"
    """Its name as the plan records it (a device profile's or the GPU's here take precedence on CUDA)."""
    cost: Literal["flops", "measure"] = "flops"
    """Step times from FLOPs and the device's throughput, or from measured real steps."""
    device_profile: str | None = None
    """JSON device profile (planner/device_profile.py) for the FLOP cost model."""
    device_flops_per_s: float | None = None
    """Throughput for the FLOP cost model (overrides the profile's)."""
    op_overhead_s: float | None = None
    """Fixed cost per dispatched op for the FLOP cost model (overrides the profile's)."""
    workers: int = 0
    """Processes that profile units (0: every core this process may use). The
    plan is the same for any number; ``cost="measure"`` always uses one."""

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise ConfigError("{workers} must be >= 0 (0: every core), got {got}", got=self.workers)
        _check_choices(self)


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """What the solver searches over, and how long."""

    strategy: Literal["optimal", "greedy"] = "optimal"
    """``optimal``: the dynamic program and CP-SAT; ``greedy``: our reconstruction of the paper's heuristic."""
    time_limit_s: float = 30.0
    """CP-SAT seconds per solve phase."""
    min_batch: int = 8
    """Smallest batch size a block may take."""
    max_batch: int | None = None
    """Largest batch size. Default: min(512, train_size // 32), so every epoch has >= 32 steps."""
    max_blocks: int | None = None
    """Most blocks a plan may have (None: no limit)."""
    max_block_units: int | None = -1
    """Longest block in units. -1 (default): ceil(units / 3), so a plan has at
    least three block boundaries where adaptive depth can stop; None: no limit."""
    batch_time_tolerance: float | None = None
    """The batch rule: each block takes the smallest candidate batch (the most
    optimizer steps) whose predicted time is at most this share above the
    solved one (``solve_batches.prefer_small_batches``; 0: the solved batch).
    None (default): ``CPU_BATCH_TIME_TOLERANCE`` on a CPU target, 0 on CUDA
    (``PlanConfig.batch_time_tolerance``)."""

    def __post_init__(self) -> None:
        if self.time_limit_s <= 0:
            raise ConfigError("{time_limit_s} must be > 0")
        if self.batch_time_tolerance is not None and not 0 <= self.batch_time_tolerance < 1:
            raise ConfigError("{batch_time_tolerance} must be in [0, 1), got {got}", got=self.batch_time_tolerance)
        if self.min_batch < 1:
            raise ConfigError("{min_batch} must be >= 1, got {got}", got=self.min_batch)
        if self.max_batch is not None and self.max_batch < self.min_batch:
            raise ConfigError(
                "{max_batch} ({got_max}) must be >= {min_batch} ({got_min})",
                got_max=self.max_batch,
                got_min=self.min_batch,
            )
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ConfigError("{max_blocks} must be >= 1")
        if self.max_block_units is not None and self.max_block_units != -1 and self.max_block_units < 1:
            raise ConfigError(
                "{max_block_units} must be >= 1, -1 (a third of the units) or None (no limit), got {got}",
                got=self.max_block_units,
            )
        _check_choices(self)

    def batch_range(self, train_n: int) -> tuple[int, int]:
        """The smallest and largest candidate batch for ``train_n`` training samples."""
        hi = self.max_batch or max(self.min_batch, min(512, train_n // 32))
        return self.min_batch, min(hi, train_n) if train_n >= self.min_batch else self.min_batch

    def block_units_limit(self, n_units: int) -> int | None:
        """``max_block_units`` for a network of ``n_units`` units (-1 resolved)."""
        if self.max_block_units == -1:
            return max(1, math.ceil(n_units / 3))
        return self.max_block_units


@dataclass(frozen=True, kw_only=True)
class HeadsConfig:
    """The aux heads (local losses and early exits) a plan chooses from, and the accuracy rule."""

    head_kind: Literal["pooled", "conv", "dgl", "stage"] = "pooled"
    """Aux head family on feature maps (runtime/heads.py)."""
    max_aux_options: int = 4
    """Head widths weighed per unit: C, C/2, C/4, ... at most this many."""
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE
    """The accuracy rule for aux heads: the widest heads whose plan costs at
    most this share more predicted time than the fastest plan."""

    def __post_init__(self) -> None:
        if not 0 <= self.tie_tolerance < 1:
            raise ConfigError("{tie_tolerance} must be in [0, 1), got {got}", got=self.tie_tolerance)
        _check_choices(self)


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    """The local training recipe every block follows (SGD per unit)."""

    epochs: int = 5
    """Epochs per block (and for the BP baselines)."""
    lr: float = SGDConfig.lr
    """Learning rate at ``base_batch_size``; each block's follows from ``lr_scaling``."""
    base_batch_size: int = 128
    """The batch size at which ``lr`` applies."""
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    """How the learning rate follows the batch size (``lr_for_batch``)."""
    momentum: float = SGDConfig.momentum
    """SGD momentum."""
    weight_decay: float = SGDConfig.weight_decay
    """SGD weight decay."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate schedule over a block's steps."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Every method's compute precision (runtime/precision.py): fp32, or mixed bf16 or fp16."""
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    """Every method's activation layout; ``auto``: ``precision.default_memory_format``."""
    polish_epochs: float = 0.0
    """After local learning, train the kept exit's prefix and head end to end
    for this many epochs (a fraction, e.g. 0.5) at a batch proven to fit; 0: no polish."""
    polish_lr_scale: float = 0.1
    """The polish's peak learning rate relative to the recipe's at its batch."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("{lr} must be a positive finite number, got {got}", got=self.lr)
        if self.epochs < 1:
            raise ConfigError("{epochs} must be >= 1, got {got}", got=self.epochs)
        if not (math.isfinite(self.polish_epochs) and 0 <= self.polish_epochs <= 10):
            raise ConfigError("{polish_epochs} must be in [0, 10] (0: no polish), got {got}", got=self.polish_epochs)
        if not (math.isfinite(self.polish_lr_scale) and 0 < self.polish_lr_scale <= 1):
            raise ConfigError("{polish_lr_scale} must be in (0, 1], got {got}", got=self.polish_lr_scale)
        _check_choices(self)

    def lr_at(self, batch: int) -> float:
        """The learning rate of a block (or baseline) training at ``batch``."""
        return lr_for_batch(self.lr, batch, base=self.base_batch_size, rule=self.lr_scaling)


@dataclass(frozen=True, kw_only=True)
class ExitConfig:
    """The run-time exit policy the plan records (adaptive depth, per-block epochs)."""

    patience: int = -1
    """Adaptive depth: units in a row without exit improvement before training
    stops (0: full depth; -1, the default: ``auto_patience`` of the network's
    units, resolved into the plan)."""
    tolerance: float = 0.005
    """Accuracy within which exits count as equal."""
    prefer: Literal["shallowest", "best"] = "best"
    """Which exit to keep: ``best`` (the design's rule; adaptive depth already
    stops a few units past it, so it is small) or ``shallowest`` within the
    tolerance of the best (smaller still, up to ``tolerance`` less accurate)."""
    epoch_patience: int = 1
    """Per-block epochs: epochs without exit improvement before a block moves on (0: planned epochs)."""
    max_extra_epochs: int = 2
    """Epochs a still-improving block may add, paid from time that converged blocks saved."""
    min_reduction: float = 1.0
    """The kept exit has at least this many times fewer parameters than the
    model; training stops after the last exit that small (1: any exit)."""

    def __post_init__(self) -> None:
        if self.patience < -1 or self.epoch_patience < 0 or self.max_extra_epochs < 0:
            raise ConfigError(
                "{patience} (or -1: a quarter of the units), {epoch_patience} and {max_extra_epochs} must be >= 0"
            )
        if not (math.isfinite(self.min_reduction) and self.min_reduction >= 1):
            raise ConfigError("{min_reduction} must be >= 1 (1: any exit), got {got}", got=self.min_reduction)
        _check_choices(self)


#: The nested records, by ``PlanConfig`` field.
_RECORDS: dict[str, type] = {
    "budget": BudgetConfig,
    "data": DataConfig,
    "target": TargetConfig,
    "search": SearchConfig,
    "heads": HeadsConfig,
    "recipe": RecipeConfig,
    "exits": ExitConfig,
}
#: Each option name (a record's field) -> the ``PlanConfig`` field of its record.
_RECORD_OF: dict[str, str] = {f.name: rec for rec, cls in _RECORDS.items() for f in dataclasses.fields(cls)}


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """Everything ``nf-plan`` decides with. Build it from option names with
    ``PlanConfig.from_options`` (each a flag of ``nf-plan``: ``max_batch`` is
    ``--max-batch``; ``budget_*`` come from ``--budget`` or NVML,
    ``device_*`` from ``--device``, ``factory`` from ``MODEL:factory``,
    ``tie_tolerance`` is ``--head-time-tolerance``)."""

    budget: BudgetConfig
    """Device memory, host RAM and disk; where activations live between blocks."""
    data: DataConfig = field(default_factory=DataConfig)
    """The model's data and how inputs reach the first block."""
    target: TargetConfig = field(default_factory=TargetConfig)
    """The target device and the cost model."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """The solver's strategy, time limit and search space (batch sizes, blocks)."""
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    """Aux head options and the accuracy rule."""
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    """The training recipe."""
    exits: ExitConfig = field(default_factory=ExitConfig)
    """The run-time exit policy."""
    seed: int = 0
    """Seed of profiling, the solver and training (shuffles)."""

    @classmethod
    def from_options(cls, **options: Any) -> PlanConfig:
        """A config from option names (the records' fields and ``seed``);
        ``budget_bytes`` and ``budget_text`` are required."""
        unknown = sorted(set(options) - set(option_names()))
        if unknown:
            raise TypeError(f"unknown plan option(s) {', '.join(unknown)}")
        parts: dict[str, dict[str, Any]] = {rec: {} for rec in _RECORDS}
        for name, value in options.items():
            if name != "seed":
                parts[_RECORD_OF[name]][name] = value
        return cls(
            **{rec: _RECORDS[rec](**kw) for rec, kw in parts.items()},
            **({"seed": options["seed"]} if "seed" in options else {}),
        )

    def options(self) -> dict[str, Any]:
        """Every option by name: ``from_options(**cfg.options()) == cfg``."""
        out = {
            f.name: getattr(getattr(self, rec), f.name)
            for rec, cls in _RECORDS.items()
            for f in dataclasses.fields(cls)
        }
        return {**out, "seed": self.seed}

    @property
    def batch_time_tolerance(self) -> float:
        """The batch rule's tolerance for this target (the option, None resolved)."""
        t = self.search.batch_time_tolerance
        if t is None:
            return CPU_BATCH_TIME_TOLERANCE if self.target.device_kind == "cpu" else 0.0
        return t

    @property
    def memory_format(self) -> Literal["contiguous", "channels_last"]:
        f = self.recipe.memory_format  # auto: the target's default
        return default_memory_format(self.target.device_kind) if f == "auto" else f

    def patience(self, n_units: int) -> int:
        """Adaptive depth's patience for a network of ``n_units`` units (-1 resolved)."""
        return auto_patience(n_units) if self.exits.patience == -1 else self.exits.patience

    @property
    def cache_dtype(self) -> Literal["float16", "bfloat16", "float32"]:
        """The element type of cached activations: the option's, else the precision's."""
        return self.budget.cache_dtype or cache_dtype_for(self.recipe.precision)

    def replace(self, **options: Any) -> PlanConfig:
        """This config with some options changed (checked again)."""
        return PlanConfig.from_options(**{**self.options(), **options})


def option_names() -> tuple[str, ...]:
    """Every option ``PlanConfig.from_options`` takes."""
    return (*_RECORD_OF, "seed")


def option_default(name: str) -> Any:
    """An option's default (one source per setting: ``nf-plan``'s flags take theirs from here)."""
    if name == "seed":
        return PlanConfig.__dataclass_fields__["seed"].default
    return next(f.default for f in dataclasses.fields(_RECORDS[_RECORD_OF[name]]) if f.name == name)


def lr_for_batch(lr: float, batch: int, *, base: int, rule: str) -> float:
    """Learning rate at ``batch`` from ``lr`` at ``base`` (the plan's rule).

    The planner owns it: it writes each block's rate and the BP baselines'
    rates into the plan, and the runtime trains with those."""
    scale = {"sqrt": math.sqrt(batch / base), "linear": batch / base, "none": 1.0}[rule]
    return lr * scale


def default_cache_budget_bytes() -> int:
    """Half of this machine's physical RAM (``cache_budget_bytes``'s default)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_disk_budget_bytes(where: Path) -> int:
    """Free space of the filesystem holding ``where`` (its nearest existing
    parent), less 10% and 1 GiB for everything else that writes there;
    rounded down to whole GiB, so that small changes in free space do not
    change the plan."""
    import shutil

    where = Path(where).resolve()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return 0
    return max(0, int(free * 0.9) - 2**30) // 2**30 * 2**30
