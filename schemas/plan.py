"""Typed plan records, and the one loader that validates a plan file.

A plan is what ``nf-plan`` decides and ``nf-run`` executes. Every decision the
runtime acts on is here, named by stable torch.fx node names. Byte counts are
ints named ``*_bytes``; times are floats named ``*_s``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from neuroflux.common import atomic_write
from neuroflux.errors import NeuroFluxError

__all__ = [
    "record_from_json",
    "validate_record",
    "SCHEMA_VERSION",
    "AuxHead",
    "Baseline",
    "Baselines",
    "Block",
    "BlockInput",
    "CacheSpec",
    "DataSpec",
    "DeviceSpec",
    "ExitPolicy",
    "GraphEdge",
    "GraphNode",
    "ModelSpec",
    "Plan",
    "PlanError",
    "Predicted",
    "ProfileInfo",
    "Recipe",
    "SolverInfo",
    "Unit",
    "UnitProfile",
    "load_plan",
    "plan_from_dict",
    "plan_to_dict",
    "save_plan",
    "schema",
]

#: Major.minor. A reader accepts any plan with the same major and a minor up
#: to its own; a newer plan is refused with a message to upgrade.
SCHEMA_VERSION = "2.3"


class PlanError(NeuroFluxError):
    """A plan file that cannot be used: missing, corrupt, invalid or too new."""


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
class AuxHead:
    """A unit's local classifier (its early exit)."""

    kind: Literal["pooled", "conv", "linear"]
    """``pooled``: avg-pool to at most 4x4, two 1x1 convs (width)+BN+ReLU,
    linear (DGL-style; the default). ``conv``: 3x3 conv(width)+BN+ReLU at
    full resolution, 2x2 avg-pool, linear. ``linear``: global avg-pool (if
    spatial) and a linear layer."""
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
    dtype: Literal["float32", "float16"]
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
    many more, each paid from the predicted time that converged blocks saved,
    so a run never exceeds the plan's predicted total."""


@dataclass(frozen=True, kw_only=True)
class Baseline:
    """End-to-end training of the original model under the same budget."""

    batch_size: int
    """Largest candidate batch whose predicted peak fits (0: none fits)."""
    predicted_peak_bytes: int
    predicted_time_s: float
    epochs: int
    fits: bool
    lr: float
    """Peak learning rate, by the same batch-size rule as the blocks (0 when it does not fit)."""
    steps: int
    """Optimizer steps: epochs * ceil(train_size / batch_size) (the cosine schedule's length)."""


@dataclass(frozen=True, kw_only=True)
class Baselines:
    bp: Baseline
    bp_checkpoint: Baseline
    """BP with activation checkpointing at every unit boundary."""


@dataclass(frozen=True, kw_only=True)
class Predicted:
    time_s: float
    speedup_vs_bp: float | None
    """None where BP fits no batch size within the budget."""
    speedup_vs_bp_checkpoint: float | None
    peak_bytes: int
    """Largest block peak."""
    assumes: str
    """What ``time_s`` assumes about stopping."""


@dataclass(frozen=True, kw_only=True)
class SolverInfo:
    strategy: Literal["optimal", "greedy"]
    engine: Literal["cp-sat", "dp", "greedy"]
    """What made the plan: CP-SAT (networks of up to 24 units, seeded with
    the dynamic program's plan), the exact dynamic program (deeper networks,
    or a CP-SAT timeout), or the greedy heuristic."""
    status: Literal["optimal", "feasible", "infeasible", "timeout"]
    """Of the time objective: ``optimal`` is proven least predicted time."""
    widths_status: Literal["optimal", "feasible", "skipped"]
    """Of the tie-break that widens aux heads within ``tie_tolerance``."""
    wall_time_s: float
    time_limit_s: float
    seed: int
    objective_time_s: float
    """Predicted training time of the chosen plan."""
    lower_bound_s: float
    """Best proven lower bound (equals the objective when optimal)."""
    tie_tolerance: float
    """Aux widths were widened while time stays within this share."""
    num_variables: int
    num_constraints: int
    max_blocks: int | None
    min_batch_size: int
    max_batch_size: int


@dataclass(frozen=True, kw_only=True)
class ProfileInfo:
    memory_source: Literal["fake", "measure"]
    cost_source: Literal["flops", "measure"]
    device_flops_per_s: float
    """Throughput assumed by the FLOP cost model (0 when measured)."""
    op_overhead_s: float
    """Fixed cost per dispatched op assumed by the FLOP cost model."""
    device_speed_source: str
    """Where those two came from: flags, a device profile file, or this
    machine's cached profile (measured once, so plans do not follow load)."""
    profile_batch_sizes: list[int]


@dataclass(frozen=True, kw_only=True)
class GraphNode:
    """One fx node of the traced model, for graph views."""

    name: str
    op: str
    target: str
    unit: str | None
    """Unit that executes it (None for placeholder/output)."""
    shape: list[int] | None


@dataclass(frozen=True, kw_only=True)
class GraphEdge:
    src: str
    dst: str


@dataclass(frozen=True, kw_only=True)
class Plan:
    schema_version: str
    created_by: str
    model: ModelSpec
    device: DeviceSpec
    budget_bytes: int
    """Same as ``device.budget_bytes``; top-level for tools that read it."""
    recipe: Recipe
    exit_policy: ExitPolicy
    units: list[Unit]
    blocks: list[Block]
    graph_nodes: list[GraphNode]
    graph_edges: list[GraphEdge]
    baseline: Baselines
    predicted: Predicted
    solver: SolverInfo
    profile: ProfileInfo
    data: DataSpec | None = None
    """Added in 2.3 (older plans: stacked)."""

    def __post_init__(self) -> None:
        for i, u in enumerate(self.units):
            if u.index != i or u.name != f"u{i}":
                raise PlanError(f"units are out of order: position {i} holds {u.name} (index {u.index}); "
                                "re-create the plan with nf-plan")
            if u.aux is not None and u.aux.kind != "linear" and u.aux.width < 1:
                raise PlanError(f"unit {u.name}'s {u.aux.kind} head has width {u.aux.width}; widths are >= 1")
        names = [u.name for u in self.units]
        planned = [n for b in self.blocks for n in b.units]
        if planned != names:
            raise PlanError(
                f"plan blocks cover units {planned}, expected every unit once in order {names}"
            )
        if self.budget_bytes != self.device.budget_bytes:
            raise PlanError("budget_bytes differs from device.budget_bytes")
        self._check_recipe()
        self._check_units()
        self._check_sources()

    def _check_recipe(self) -> None:
        """Values the schema's types admit but training cannot use."""
        import math

        r, fix = self.recipe, "re-create the plan with nf-plan"
        checks = [
            (math.isfinite(r.lr) and r.lr > 0, f"recipe.lr is {r.lr}; it must be a positive number"),
            (math.isfinite(r.momentum) and 0 <= r.momentum < 1, f"recipe.momentum is {r.momentum}; it must be in [0, 1)"),
            (math.isfinite(r.weight_decay) and r.weight_decay >= 0, f"recipe.weight_decay is {r.weight_decay}; it must be >= 0"),
            (0 <= r.seed < 2**63, f"recipe.seed is {r.seed}; seeds must be in [0, 2^63)"),
            (r.train_size >= 1 and r.val_size >= 1, "recipe.train_size and val_size must be >= 1"),
            (self.exit_policy.patience >= 0 and self.exit_policy.epoch_patience >= 0
             and self.exit_policy.max_extra_epochs >= 0, "exit_policy counts must be >= 0"),
            (math.isfinite(self.exit_policy.tolerance) and 0 <= self.exit_policy.tolerance <= 1,
             f"exit_policy.tolerance is {self.exit_policy.tolerance}; it must be in [0, 1]"),
        ]
        for b in self.blocks:
            checks += [
                (b.batch_size >= 1 and b.epochs >= 1 and b.steps >= 1, f"block {b.index} has batch {b.batch_size}, "
                 f"{b.epochs} epochs and {b.steps} steps; each must be >= 1"),
                (math.isfinite(b.lr) and b.lr > 0, f"block {b.index}'s lr is {b.lr}; it must be a positive number"),
                (b.shuffle_seed is None or 0 <= b.shuffle_seed < 2**62,
                 f"block {b.index}'s shuffle_seed is {b.shuffle_seed}; it must be in [0, 2^62)"),
            ]
        for ok, what in checks:
            if not ok:
                raise PlanError(f"{what}; {fix}")

    def _check_units(self) -> None:
        """Every unit but the last has an aux head of a sane width; the last
        exits through the model's own head; shapes are positive."""
        for u in self.units:
            last = u.index == len(self.units) - 1
            if u.is_last != last or (u.aux is None) != last:
                raise PlanError(f"unit {u.name} {'has' if u.aux is not None else 'lacks'} an aux head (is_last "
                                f"{u.is_last}); only the last unit exits through the model's head: re-create the plan")
            if not u.output_shape or any(d < 1 for d in u.output_shape) or any(d < 1 for d in u.input_shape):
                raise PlanError(f"unit {u.name} has shapes {u.input_shape} -> {u.output_shape}; re-create the plan")
            if u.aux is not None and u.aux.width > 16 * max(u.output_shape[0], 8):
                raise PlanError(f"unit {u.name}'s aux head is {u.aux.width} wide for {u.output_shape[0]} channels "
                                "(the planner offers at most the unit's channels): re-create the plan")

    def _check_sources(self) -> None:
        """Every block reads what an earlier block wrote, and recomputes
        exactly the units between: a hand-edited plan that would read a
        missing cache or skip units is refused here, not mid-run."""
        known = {u.name for u in self.units}
        for b in self.blocks:
            bad = set(b.source().recompute_units) - known
            if bad:
                raise PlanError(f"block {b.index} recomputes unknown units {sorted(bad)}; re-create the plan")
            if b.index != self.blocks.index(b):
                raise PlanError(f"block at position {self.blocks.index(b)} has index {b.index}; re-create the plan")
            src = b.source()
            first = self.unit(b.units[0]).index
            if src.kind == "data":
                ok = b.index == 0 and src.source_block is None and not src.recompute_units
            else:
                j = src.source_block
                ok = b.index > 0 and (j is None or 0 <= j < b.index) and (src.kind == "recompute" or j == b.index - 1)
                if ok:
                    start = 0 if j is None else self.unit(self.blocks[j].units[-1]).index + 1
                    ok = [self.unit(u).index for u in src.recompute_units] == list(range(start, first)) and \
                        (j is None or self.blocks[j].cache is not None) and (src.kind == "recompute") == (start < first)
            if not ok:
                raise PlanError(f"block {b.index}'s input ({src.kind}, source block {src.source_block}, recomputing "
                                f"{src.recompute_units}) does not follow from the blocks before it; re-create the plan "
                                "with nf-plan")
            if b.cache is not None and b.cache.file is not None:
                f = b.cache.file
                if f.startswith(("/", "\\")) or ".." in f.replace("\\", "/").split("/") or f.strip("./") == "" \
                        or f.endswith(("/", "\\")):
                    raise PlanError(f"block {b.index}'s cache file {f!r} is not a plain path inside the run "
                                    "directory; re-create the plan with nf-plan")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON (atomically), as ``nf-plan -o`` does."""
        save_plan(self, path)

    def unit(self, name: str) -> Unit:
        for u in self.units:
            if u.name == name:
                return u
        raise KeyError(name)

    def block_peak_bytes(self, block: Block) -> int:
        """The peak the plan's own unit profiles predict for ``block`` at its
        batch: the device workspace, every unit's resident state, and the
        largest one-unit step (units step one at a time), plus what
        recomputing its input costs (recorded by the planner)."""
        units = [self.unit(u) for u in block.units]
        return self.device.workspace_bytes + sum(u.profile.static_bytes for u in units) + max(
            u.profile.dyn_fixed_bytes + u.profile.dyn_per_sample_bytes * block.batch_size for u in units) \
            + block.predicted_peak_recompute_bytes


# --------------------------------------------------------------------------
# dict <-> dataclass, driven by the type hints above.


def record_from_json(tp: Any, value: Any) -> Any:
    """``value`` (JSON data already checked against the schema) as the typed
    record ``tp``: dataclasses, lists, optionals; ints become floats where
    the field is a float. Plans and run summaries are both read with it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else record_from_json(args[0], value)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [record_from_json(item, v) for v in value]
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        kwargs = {f.name: record_from_json(hints[f.name], value[f.name]) for f in dataclasses.fields(tp)
                  if f.name in value or f.default is dataclasses.MISSING}
        return tp(**kwargs)
    if tp is float and isinstance(value, int):
        return float(value)
    if tp is int and isinstance(value, float):  # JSON Schema counts 12.0 as an integer; Python does not
        return int(value)
    return value


def plan_from_dict(data: dict[str, Any]) -> Plan:
    """Validate ``data`` against the schema and build the typed plan."""
    _check_version(data)
    _validate(data)
    try:
        return record_from_json(Plan, data)
    except (KeyError, TypeError) as e:  # schema and dataclasses disagree: a bug
        raise AssertionError(f"plan passed the schema but not the types: {e}") from e


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return dataclasses.asdict(plan)


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Validate and write atomically (temp file, then rename)."""
    data = plan_to_dict(plan)
    _validate(data)
    _atomic_write_text(Path(path), json.dumps(data, indent=1) + "\n")


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read, validate and type a plan file. Raises PlanError with the fix."""
    p = Path(path)
    if not p.is_file():
        raise PlanError(f"plan file {p} not found; make one with: nf-plan model.py --budget 1GB -o {p}")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"plan file {p} is not valid JSON ({e}); re-create it with nf-plan") from e
    if not isinstance(data, dict):
        raise PlanError(f"plan file {p} holds a JSON {type(data).__name__}, not a plan object")
    try:
        return plan_from_dict(data)
    except PlanError as e:
        raise PlanError(f"{p}: {e}") from e


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The JSON Schema of plan files."""
    text = resources.files("neuroflux.schemas").joinpath("plan.schema.json").read_text()
    return json.loads(text)


def _check_version(data: dict[str, Any]) -> None:
    version = data.get("schema_version")
    if not isinstance(version, str) or version.count(".") != 1:
        raise PlanError(f"schema_version is {version!r}, expected 'MAJOR.MINOR'; re-create the plan with nf-plan")
    major, minor = (int(x) if x.isdigit() else -1 for x in version.split("."))
    my_major, my_minor = (int(x) for x in SCHEMA_VERSION.split("."))
    if major > my_major or (major == my_major and minor > my_minor):
        raise PlanError(
            f"plan schema version {version} is newer than this NeuroFlux reads ({SCHEMA_VERSION}); "
            "upgrade neuroflux, or re-plan with this version's nf-plan"
        )
    if major != my_major or minor < 0:
        raise PlanError(f"plan schema version {version} is not supported (this NeuroFlux reads {SCHEMA_VERSION}); re-plan")


def _validate(data: dict[str, Any]) -> None:
    validate_record(data, schema(), what="plan", fix="re-create it with nf-plan", error=PlanError)


def validate_record(data: Any, schema_doc: dict[str, Any], *, what: str, fix: str,
                    error: type[NeuroFluxError] = NeuroFluxError) -> None:
    """Check ``data`` against a JSON Schema; the first problem (where, what,
    how many more) and ``fix`` become ``error``. A field the schema does not
    know is named as such."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema_doc)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        message = first.message
        if first.validator == "additionalProperties":
            known = set(first.schema.get("properties", {}))
            message = f"unknown field(s) {sorted(set(first.instance) - known)}"
        raise error(f"invalid {what} at {where}: {message}{more}; {fix}")


def _atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
