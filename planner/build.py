"""Making a plan: load, trace, find units, profile, solve, assemble.

``make_plan`` is the library entry point behind ``nf-plan``. It reports
progress through an optional callback and logs through ``logging``; tables
and bars belong to the CLI.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import neuroflux
from neuroflux.errors import NeuroFluxError
from neuroflux.common import format_bytes
from neuroflux.planner.problem import (
    AuxOption,
    Boundary,
    Problem,
    Solution,
    block_sources,
    host_use,
    recompute_time_s,
    source_kind,
    UnitCost,
    block_peak_bytes,
    block_steps,
    block_time_s,
    cache_bytes,
    candidate_batch_sizes,
    min_feasible_budget_bytes,
)
from neuroflux.planner.device_profile import (
    DEFAULT_CUDA_CALIBRATION,
    DEFAULT_CUDA_WORKSPACE_BYTES,
    DeviceProfile,
    MemoryCalibration,
    cached_profile,
    load_profile,
)
from neuroflux.planner.profile import (
    DeviceSpeed,
    SGDConfig,
    StepProfile,
    ForwardProfile,
    profile_forward,
    measure_step_time,
    profile_step,
    profile_unit_options,
)
from neuroflux.planner.parallel import map_forked, usable_cpus
from neuroflux.planner.solve_cpsat import SolverConfig, solve_cpsat
from neuroflux.planner.solve_dp import solve_dp
from neuroflux.planner.solve_greedy import solve_greedy
from neuroflux.planner.units import UnitSpan, activation_graph, find_units, propagate_shapes, unit_signature
from neuroflux.runtime.graph import META_CAPTURE, META_SHAPE, META_UNIT, split_units, trace
from neuroflux.runtime.heads import build_head, head_widths
from neuroflux.runtime.model_file import ModelFile, ModelObject, load_model_file
from neuroflux.runtime.train import lr_for_batch, shuffle_seed
from neuroflux.runtime.modules import CheckpointedChain, WithExit
from neuroflux.schemas.plan import (
    SCHEMA_VERSION,
    AuxHead,
    Baseline,
    Baselines,
    Block,
    BlockInput,
    CacheSpec,
    DataSpec,
    DeviceSpec,
    ExitPolicy,
    GraphEdge,
    GraphNode,
    ModelSpec,
    Plan,
    Predicted,
    ProfileInfo,
    Recipe,
    SolverInfo,
    Unit,
    UnitProfile,
)

__all__ = ["PlanConfig", "PlanResult", "InfeasibleBudget", "make_plan", "make_plans", "make_plan_shared",
           "default_cache_budget_bytes"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


class InfeasibleBudget(NeuroFluxError):
    """No plan fits; the message names the smallest budget that would."""

    def __init__(self, message: str, *, min_budget_bytes: int | None) -> None:
        super().__init__(message)
        self.min_budget_bytes = min_budget_bytes


@dataclass(frozen=True, kw_only=True)
class PlanConfig:
    """Everything ``nf-plan`` decides with. Most fields are a flag of the
    same name (``max_batch``: ``--max-batch``); ``budget_*`` come from
    ``--budget`` (or NVML), ``device_*`` from ``--device``, ``factory`` from
    ``MODEL:factory``, ``tie_tolerance`` is ``--head-time-tolerance``."""

    budget_bytes: int
    budget_text: str
    budget_source: Literal["flag", "nvml"] = "flag"
    device_kind: Literal["cpu", "cuda"] = "cpu"
    device_name: str = "cpu"
    strategy: Literal["optimal", "greedy"] = "optimal"
    epochs: int = 5
    """Epochs per block (and for the BP baselines)."""
    min_batch: int = 8
    max_batch: int | None = None
    """Default: min(512, train_size // 32), so every epoch has >= 32 steps."""
    margin: float = 0.10
    cache_budget_bytes: int | None = None
    """Host RAM for activation caches (``--host-budget``). Default: half of
    this machine's physical RAM (not of the free RAM: plans do not follow load)."""
    disk_budget_bytes: int | None = None
    """Disk for activation caches (``--disk-budget``). Default: the free
    space of the filesystem that holds the plan, less 10% and 1 GiB."""
    cache_location: Literal["auto", "ram", "disk", "recompute"] = "auto"
    """Boundary kinds the plan may use: ``auto`` all three, ``ram`` or
    ``disk`` that cache and recompute, ``recompute`` recompute only."""
    cache_dtype: Literal["float16", "float32"] = "float16"
    data_mode: Literal["auto", "stack", "stream"] = "auto"
    """How inputs reach the first block: ``auto`` stacks them in RAM when
    they fit the host budget beside the caches, else streams."""
    max_blocks: int | None = None
    time_limit_s: float = 30.0
    seed: int = 0
    cost: Literal["flops", "measure"] = "flops"
    device_profile: str | None = None
    """JSON device profile (planner/device_profile.py) for the FLOP cost model."""
    device_flops_per_s: float | None = None
    op_overhead_s: float | None = None
    lr: float = SGDConfig.lr
    base_batch_size: int = 128
    lr_scaling: Literal["sqrt", "linear", "none"] = "sqrt"
    momentum: float = SGDConfig.momentum
    weight_decay: float = SGDConfig.weight_decay
    schedule: Literal["cosine", "constant"] = "cosine"
    patience: int = 2
    """Adaptive depth: units in a row without exit improvement before training stops (0: full depth)."""
    tolerance: float = 0.005
    prefer: Literal["shallowest", "best"] = "best"
    """Which exit to keep: ``best`` (the design's rule; adaptive depth already
    stops a few units past it, so it is small) or ``shallowest`` within the
    tolerance of the best (smaller still, up to ``tolerance`` less accurate)."""
    epoch_patience: int = 1
    """Per-block epochs: epochs without exit improvement before a block moves on (0: planned epochs)."""
    max_extra_epochs: int = 2
    head_kind: Literal["pooled", "conv"] = "pooled"
    max_block_units: int | None = -1
    """Longest block in units. -1 (default): ceil(units / 3), so a plan has at
    least three block boundaries where adaptive depth can stop; None: no limit."""
    train_size: int | None = None
    val_size: int | None = None
    input_shape: tuple[int, ...] | None = None
    """One sample's shape, e.g. (3, 32, 32); default: the model file's
    INPUT_SHAPE, else a training sample's."""
    factory: str | None = None
    datasets: str = "datasets"
    max_aux_options: int = 4
    workers: int = 0
    """Processes that profile units (0: every core this process may use). The
    plan is the same for any number; ``--cost measure`` always uses one."""
    tie_tolerance: float = 0.10
    """The accuracy rule for aux heads: the widest heads whose plan costs at
    most this share more predicted time than the fastest plan."""

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ValueError("budget_bytes must be > 0")
        if self.budget_bytes > 2**48:
            raise NeuroFluxError(f"--budget {self.budget_text} is {self.budget_bytes} bytes, more than any device has "
                                 "(limit 256 TiB); give the device's memory, e.g. 80GB")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise NeuroFluxError(f"--lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.margin < 1:
            raise NeuroFluxError(f"--margin must be in [0, 1), got {self.margin}")
        if self.epochs < 1:
            raise NeuroFluxError(f"--epochs must be >= 1, got {self.epochs}")
        if self.min_batch < 1:
            raise NeuroFluxError(f"--min-batch must be >= 1, got {self.min_batch}")
        if self.max_batch is not None and self.max_batch < self.min_batch:
            raise NeuroFluxError(f"--max-batch ({self.max_batch}) must be >= --min-batch ({self.min_batch})")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise NeuroFluxError("--max-blocks must be >= 1")
        if self.time_limit_s <= 0:
            raise NeuroFluxError("--time-limit must be > 0")
        if self.patience < 0 or self.epoch_patience < 0 or self.max_extra_epochs < 0:
            raise NeuroFluxError("--patience, --epoch-patience and --max-extra-epochs must be >= 0")
        if self.max_block_units is not None and self.max_block_units != -1 and self.max_block_units < 1:
            raise NeuroFluxError(f"--max-block-units must be >= 1 (or 0 for no limit), got {self.max_block_units}")
        if self.input_shape is not None and (not self.input_shape or any(int(d) < 1 for d in self.input_shape)):
            raise NeuroFluxError(f"--input-shape must be positive sizes such as 3,32,32, got {self.input_shape}")
        if self.workers < 0:
            raise NeuroFluxError(f"--workers must be >= 0 (0: every core), got {self.workers}")
        if not 0 <= self.tie_tolerance < 1:
            raise NeuroFluxError(f"--head-time-tolerance must be in [0, 1), got {self.tie_tolerance}")
        for name in ("train_size", "val_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise NeuroFluxError(f"--{name.replace('_', '-')} must be a positive number of samples, got {value!r}")
        for name in ("cache_budget_bytes", "disk_budget_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise NeuroFluxError(f"{name} must be a number of bytes >= 0, got {value!r}")
        _check_choices(self)


def _check_choices(cfg: PlanConfig) -> None:
    """Every ``Literal`` field holds one of its choices (a Python caller can
    pass anything; the CLI's argparse checks its own)."""
    import typing

    hints = typing.get_type_hints(PlanConfig)
    for f in dataclasses.fields(PlanConfig):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Literal and getattr(cfg, f.name) not in typing.get_args(tp):
            choices = ", ".join(repr(c) for c in typing.get_args(tp))
            raise NeuroFluxError(f"{f.name} must be one of {choices}, got {getattr(cfg, f.name)!r}")


@dataclass(frozen=True)
class PlanResult:
    plan: Plan
    problem: Problem
    solution: Solution


def default_cache_budget_bytes() -> int:
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


@dataclass(frozen=True)
class _Meta:
    """What planning learns from the model and its data before profiling."""

    shape: tuple[int, ...]
    classes: int
    train_n: int
    val_n: int
    model: nn.Module
    """The model on fake tensors."""
    gm: Any
    """Its trace (an fx.GraphModule)."""


def _infer_meta(mf: ModelFile | ModelObject, cfg: PlanConfig, fake: FakeTensorMode) -> _Meta:
    """Input shape, classes, train and val sizes; the fake model and its trace."""
    shape = cfg.input_shape or mf.input_shape()
    train_n, val_n = cfg.train_size, cfg.val_size
    if shape is None or train_n is None or val_n is None:
        if not mf.has_datasets():
            raise NeuroFluxError(
                f"{mf.path} has no {mf.datasets_name}(); define it, or give INPUT_SHAPE in the file and "
                "--train-size/--val-size on the command line"
            )
        train, val = mf.datasets()
        train_n = train_n or len(train)
        val_n = val_n or len(val)
        if shape is None:
            sample = train[0][0]
            if not isinstance(sample, torch.Tensor):
                raise NeuroFluxError(f"{mf.path}: datasets must yield (tensor, int) pairs, got {type(sample).__name__}")
            shape = tuple(sample.shape)
    shape = tuple(int(s) for s in shape)
    model = mf.build_fake(fake)
    gm = trace(model, shape)  # first: an untraceable model gets the error that names the module
    if gm.meta.get(META_CAPTURE) == "shape-specialized":
        log.warning("%s: torch.fx cannot trace %s() symbolically (shape arithmetic in forward); traced it with the "
                    "input shape %s fixed instead (the batch stays free)", mf.path.name, mf.factory_name, shape)
    classes = mf.num_classes()
    with fake:
        try:
            out = model(torch.empty(2, *shape))
        except Exception as e:
            raise NeuroFluxError(
                f"{mf.path}: {mf.factory_name}() model fails on an input of shape (2, {', '.join(map(str, shape))}): "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; check INPUT_SHAPE (or set "
                f"{mf.factory_name}.INPUT_SHAPE for this factory)"
            ) from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NeuroFluxError(
            f"{mf.path}: the model must return logits of shape (batch, classes); for a batch of 2 it returned {got}"
        )
    if classes is not None and int(classes) != out.shape[1]:
        raise NeuroFluxError(f"{mf.path}: NUM_CLASSES is {classes} but {mf.factory_name}() outputs {out.shape[1]} classes; "
                             f"fix NUM_CLASSES, or set {mf.factory_name}.NUM_CLASSES for this factory")
    if out.shape[1] < 2:
        raise NeuroFluxError(f"{mf.path}: {mf.factory_name}() outputs {out.shape[1]} class; a classifier needs at least "
                             "2 (with one, every loss is 0 and nothing is learned)")
    return _Meta(shape=shape, classes=int(out.shape[1]), train_n=int(train_n), val_n=int(val_n), model=model, gm=gm)


def make_plan(model_spec: str | ModelObject, cfg: PlanConfig, *, plan_dir: str | Path = ".", progress: Progress | None = None) -> PlanResult:
    """Trace, profile and solve: the plan for ``cfg.budget_bytes``."""
    t_start = time.perf_counter()
    prof = _profile_model(model_spec, cfg, progress or (lambda desc, done, total: None))
    return _plan_at(prof, cfg, plan_dir=Path(plan_dir), t_start=t_start)


def make_plans(model_spec: str | ModelObject, cfg: PlanConfig, budgets: Sequence[tuple[int, str]], *, plan_dir: str | Path = ".",
               progress: Progress | None = None) -> list[PlanResult | NeuroFluxError]:
    """Plans for several budgets ((bytes, text) pairs), profiling the model
    once: a budget changes the solve, not the units' costs. A budget with no
    plan gives its error in its place."""
    t_start = time.perf_counter()
    prof = _profile_model(model_spec, cfg, progress or (lambda desc, done, total: None))
    out: list[PlanResult | NeuroFluxError] = []
    for nbytes, text in budgets:
        c = dataclasses.replace(cfg, budget_bytes=nbytes, budget_text=text, budget_source="flag")
        try:
            out.append(_plan_at(prof, c, plan_dir=Path(plan_dir), t_start=t_start))
        except NeuroFluxError as e:
            out.append(e)
        t_start = time.perf_counter()
    return out


#: PlanConfig fields that change only the solve (and the plan's records),
#: never a unit's profile: configs equal but for these share one profiling.
_SOLVE_ONLY = frozenset({
    "budget_bytes", "budget_text", "budget_source", "strategy", "time_limit_s", "tie_tolerance", "max_blocks",
    "max_block_units", "margin", "min_batch", "max_batch", "epochs", "cache_budget_bytes", "disk_budget_bytes",
    "cache_location", "data_mode", "patience", "tolerance", "prefer", "epoch_patience", "max_extra_epochs",
    "base_batch_size", "lr_scaling", "schedule", "workers"})


def make_plan_shared(model_spec: str, cfg: PlanConfig, *, plan_dir: str | Path, profiles: dict[Any, Any],
                     progress: Progress | None = None) -> PlanResult:
    """``make_plan``, profiling ``model_spec`` once for every config that
    differs only in ``_SOLVE_ONLY`` fields (``profiles`` holds them between
    calls): a benchmark's optimal, greedy and budget variants of one model
    profile it once, and get the plans ``make_plan`` gives each."""
    t_start = time.perf_counter()
    key = (model_spec, tuple(sorted((f.name, repr(getattr(cfg, f.name))) for f in dataclasses.fields(cfg)
                                    if f.name not in _SOLVE_ONLY)))
    if key not in profiles:
        profiles[key] = _profile_model(model_spec, cfg, progress or (lambda desc, done, total: None))
    return _plan_at(profiles[key], cfg, plan_dir=Path(plan_dir), t_start=t_start)


@dataclass
class _Profiled:
    """Everything about a model that does not depend on the budget."""

    mf: ModelFile | ModelObject
    gm: Any
    spans: list[UnitSpan]
    shape: tuple[int, ...]
    classes: int
    train_n: int
    val_n: int
    model_params: int
    unit_costs: list[UnitCost]
    bp_prof: StepProfile
    ck_prof: StepProfile
    target: _Target
    real: Any
    """Real modules for --cost measure: (whole model, checkpointed chain), else None."""
    device: Any
    sgd: SGDConfig


def _profile_model(model_spec: str | ModelObject, cfg: PlanConfig, report: Progress) -> _Profiled:
    torch.manual_seed(cfg.seed)
    mf = model_spec if isinstance(model_spec, ModelObject) else \
        load_model_file(model_spec, factory=cfg.factory, datasets=cfg.datasets)
    fake = FakeTensorMode()
    meta = _infer_meta(mf, cfg, fake)
    propagate_shapes(meta.gm, meta.shape, fake)
    spans = find_units(meta.gm)
    prof = _Profiler(cfg=cfg, fake=fake, meta=meta, spans=spans, unit_mods=split_units(meta.gm, [s.nodes for s in spans]),
                     target=_device_target(cfg), sgd=SGDConfig(lr=cfg.lr, momentum=cfg.momentum,
                                                               weight_decay=cfg.weight_decay))
    if cfg.cost == "measure":
        if cfg.device_kind == "cuda" and not torch.cuda.is_available():
            raise NeuroFluxError("--cost measure with a CUDA target needs a CUDA device here; use --cost flops")
        torch.manual_seed(cfg.seed)
        real_gm = trace(mf.build(), meta.shape)
        prof.real_mods = split_units(real_gm, [s.nodes for s in spans])
        prof.device = torch.device(cfg.device_kind)
    unit_costs, bp_prof, ck_prof = prof.run(report)
    return _Profiled(mf=mf, gm=meta.gm, spans=spans, shape=meta.shape, classes=meta.classes, train_n=meta.train_n,
                     val_n=meta.val_n, model_params=sum(p.numel() for p in meta.model.parameters()),
                     unit_costs=unit_costs, bp_prof=bp_prof, ck_prof=ck_prof, target=prof.target,
                     real=None if prof.real_mods is None else (real_gm, CheckpointedChain(prof.real_mods)),
                     device=prof.device, sgd=prof.sgd)


@dataclass
class _Profiler:
    """Every unit's aux options and the two baselines, profiled as jobs on
    this machine's cores (``map_forked``)."""

    cfg: PlanConfig
    fake: FakeTensorMode
    meta: _Meta
    spans: list[UnitSpan]
    unit_mods: list[nn.Module]
    target: _Target
    sgd: SGDConfig
    real_mods: list[nn.Module] | None = None
    """Real units for --cost measure."""
    device: torch.device = torch.device("cpu")
    """Where --cost measure times steps."""
    option_lists: list[list[tuple[str, int]]] = dataclasses.field(init=False)
    """Every unit's (kind, width) options, widest first."""

    def __post_init__(self) -> None:
        last = len(self.spans) - 1
        self.option_lists = [_options_for(s, self.cfg, last=s.index == last) for s in self.spans]

    @property
    def foreach(self) -> bool | None:
        return True if self.cfg.device_kind == "cuda" else None  # the optimizer step PyTorch runs there

    def run(self, report: Progress) -> tuple[list[UnitCost], StepProfile, StepProfile]:
        spans, cfg = self.spans, self.cfg
        last = len(spans) - 1
        # Units that compute the same thing on the same shape (a deep ResNet's
        # repeated blocks) have the same costs: profile one, reuse its options.
        first_of: dict[tuple[str, tuple[int, ...], bool], int] = {}
        same_as = [first_of.setdefault((unit_signature(mod, span.input_shape), tuple(span.output_shape),
                                        span.index == last), span.index) for span, mod in zip(spans, self.unit_mods)]
        distinct = sorted(first_of.values())
        weight = {k: len(self.option_lists[k]) for k in distinct} | {-1: 2 * len(spans), -2: 3 * len(spans)}
        total, done = sum(weight.values()), 0

        def finished(k: int) -> None:
            nonlocal done
            done += weight[k]
            report("profiling units and baselines", done, total)

        report("profiling units and baselines", 0, total)
        # Timed steps (--cost measure) must have the machine to themselves.
        workers = 1 if cfg.cost == "measure" else (cfg.workers or usable_cpus())
        results = map_forked(self.job, [-2, -1, *distinct], workers=workers, on_done=finished)
        dtype_bytes = 2 if cfg.cache_dtype == "float16" else 4
        scale = self.target.cal.activation_scale
        unit_costs = []
        for span in spans:
            options, fwd = results[same_as[span.index]]
            unit_costs.append(UnitCost(
                name=f"u{span.index}", options=options, out_bytes_per_sample=math.prod(span.output_shape) * dtype_bytes,
                fwd_per_sample_s=fwd.flops_per_sample / self.target.speed.flops_per_s,
                fwd_fixed_s=fwd.ops * self.target.speed.op_overhead_s,
                infer_static_bytes=fwd.weight_bytes, infer_fixed_bytes=fwd.fixed_bytes,
                infer_per_sample_bytes=math.ceil(fwd.per_sample_bytes * scale)))
        report("solving", total, total)
        return unit_costs, results[-1], results[-2]

    def job(self, k: int):  # noqa: ANN201
        """Unit ``k``'s options, or for -1 and -2 the BP and BP-checkpointing steps (whole-model, the longest jobs)."""
        if k >= 0:
            return self.options(k)
        model = self.meta.gm if k == -1 else CheckpointedChain(self.unit_mods)
        return _calibrated(profile_step(model, None, self.meta.shape, self.meta.classes, fake_mode=self.fake,
                                        sgd=self.sgd, foreach=self.foreach), self.target.cal)

    def options(self, k: int) -> tuple[tuple[AuxOption, ...], ForwardProfile]:
        """Unit ``k``'s aux options (memory and step time per head) and its inference forward."""
        span, mod, classes, fake = self.spans[k], self.unit_mods[k], self.meta.classes, self.fake
        with fake:
            heads = [None if kind == "model" else build_head(kind, span.output_shape, width, classes)
                     for kind, width in self.option_lists[k]]
        if None in heads:
            profs = [profile_step(mod, h, span.input_shape, classes, fake_mode=fake, sgd=self.sgd, foreach=self.foreach)
                     for h in heads]
        else:
            profs = profile_unit_options(mod, heads, span.input_shape, span.output_shape, classes, fake_mode=fake,
                                         sgd=self.sgd, foreach=self.foreach)
        options = []
        for (kind, width), head, prof in zip(self.option_lists[k], heads, profs):
            prof = _calibrated(prof, self.target.cal)
            step_fixed, step_per = self.step_time(prof, k, kind, width)
            options.append(AuxOption(
                kind=kind, width=width, head_params=0 if head is None else sum(p.numel() for p in head.parameters()),
                static_bytes=prof.static_bytes, dyn_fixed_bytes=prof.dyn_fixed_bytes,
                dyn_per_sample_bytes=prof.dyn_per_sample_bytes, step_fixed_s=step_fixed, step_per_sample_s=step_per,
            ))
        return tuple(options), profile_forward(mod, span.input_shape, fake_mode=fake)

    def step_time(self, prof: StepProfile, k: int, kind: str, width: int) -> tuple[float, float]:
        """(fixed_s, per_sample_s) of unit ``k``'s step with that head: from
        FLOPs and ops, or (--cost measure) timed on real tensors."""
        speed = self.target.speed
        if self.cfg.cost == "flops":
            return prof.ops * speed.op_overhead_s + prof.flops_fixed / speed.flops_per_s, \
                prof.flops_per_sample / speed.flops_per_s
        assert self.real_mods is not None
        span = self.spans[k]
        head = None if kind == "model" else build_head(kind, span.output_shape, width, self.meta.classes)
        return measure_step_time(WithExit(self.real_mods[k], head), span.input_shape, self.meta.classes,
                                 device=self.device, batches=(8, 32), sgd=self.sgd)


def _plan_at(pr: _Profiled, cfg: PlanConfig, *, plan_dir: Path, t_start: float) -> PlanResult:
    """The budget's problem, baselines and solution, as a plan."""
    train_n, val_n, workspace, unit_costs = pr.train_n, pr.val_n, pr.target.workspace, pr.unit_costs
    max_batch = cfg.max_batch or max(cfg.min_batch, min(512, train_n // 32))
    max_batch = min(max_batch, train_n) if train_n >= cfg.min_batch else cfg.min_batch
    problem = Problem(
        units=tuple(unit_costs),
        batch_sizes=candidate_batch_sizes(min_batch=cfg.min_batch, max_batch=max_batch),
        train_size=train_n,
        val_size=val_n,
        epochs=cfg.epochs,
        cap_bytes=int(cfg.budget_bytes * (1 - cfg.margin)) - workspace,
        workspace_bytes=workspace,
        cache_budget_bytes=default_cache_budget_bytes() if cfg.cache_budget_bytes is None else cfg.cache_budget_bytes,
        disk_budget_bytes=default_disk_budget_bytes(plan_dir) if cfg.disk_budget_bytes is None else cfg.disk_budget_bytes,
        boundaries=_BOUNDARIES[cfg.cache_location],
        max_blocks=cfg.max_blocks,
        max_block_units=_max_block_units(cfg, len(unit_costs)),
    )

    common = dict(shape=pr.shape, classes=pr.classes, device=pr.device, sgd=pr.sgd)
    bp = _baseline(problem, pr.bp_prof, pr.target.speed, cfg, real=None if pr.real is None else pr.real[0], **common)
    ck = _baseline(problem, pr.ck_prof, pr.target.speed, cfg, real=None if pr.real is None else pr.real[1], **common)

    solver_cfg = SolverConfig(time_limit_s=cfg.time_limit_s, seed=cfg.seed, tie_tolerance=cfg.tie_tolerance)
    solution, engine = _solve(problem, cfg, solver_cfg)
    if solution.status in ("infeasible", "timeout"):
        _raise_infeasible(problem, solution, cfg)

    plan = _assemble(
        mf=pr.mf, cfg=cfg, gm=pr.gm, spans=pr.spans, problem=problem, solution=solution, shape=pr.shape,
        classes=pr.classes, bp=bp, ck=ck, target=pr.target, engine=engine,
        plan_dir=plan_dir, model_params=pr.model_params, wall_s=time.perf_counter() - t_start,
    )
    return PlanResult(plan=plan, problem=problem, solution=solution)


#: Above this many units the exact dynamic program plans alone: CP-SAT's model
#: grows with units x block length x batch sizes and stops proving in seconds.
CPSAT_MAX_UNITS = 24

_BOUNDARIES: dict[str, tuple[Boundary, ...]] = {
    "auto": ("ram", "disk", "recompute"), "ram": ("ram", "recompute"), "disk": ("disk", "recompute"),
    "recompute": ("recompute",)}


def _solve(problem: Problem, cfg: PlanConfig, solver_cfg: SolverConfig) -> tuple[Solution, str]:
    """The strategy's plan and the engine that made it. ``optimal``: CP-SAT,
    seeded with the dynamic program's exact least-time plan (or the greedy
    one), on networks of up to CPSAT_MAX_UNITS units whose least-time plan
    caches every boundary in RAM (CP-SAT's model); the dynamic program alone
    otherwise. Never "no plan" when one exists: on a CP-SAT timeout or
    infeasibility the dynamic program's or the greedy plan is written."""
    greedy = solve_greedy(problem)
    if cfg.strategy == "greedy":
        return greedy, "greedy"
    dp = solve_dp(problem, tie_tolerance=cfg.tie_tolerance)
    all_ram = dp is not None and all(b.boundary == "ram" for b in dp.blocks[:-1])
    if dp is not None and (problem.n > CPSAT_MAX_UNITS or dp.status == "infeasible" or not all_ram):
        return dp, "dp"
    if "ram" not in problem.boundaries:
        return greedy, "greedy"
    seed = dp if dp is not None else greedy
    if seed.status in ("feasible", "optimal") and any(b.boundary != "ram" for b in seed.blocks[:-1]):
        seed = None  # CP-SAT cannot take a hint outside its model
    solution = solve_cpsat(dataclasses.replace(problem, boundaries=("ram",)), solver_cfg, hint=seed)
    if solution.status == "infeasible" and dp is None and greedy.status == "feasible":
        return greedy, "greedy"  # no lightest heads, and caches alone do not fit: the greedy plan recomputes
    if solution.status == "timeout" and seed is not None and seed.status in ("feasible", "optimal"):
        log.warning("CP-SAT found no plan within %.0f s; writing the %s plan (raise --time-limit for CP-SAT's)",
                    cfg.time_limit_s, "dynamic program's" if seed is dp else "greedy")
        return dataclasses.replace(seed, message=f"CP-SAT timed out ({solution.message})"), \
            "dp" if seed is dp else "greedy"
    return solution, "cp-sat"


def _options_for(span: UnitSpan, cfg: PlanConfig, *, last: bool) -> list[tuple[str, int]]:
    """Aux options, widest first; the last unit exits through the model's head."""
    return [("model", 0)] if last else head_widths(span.output_shape, kind=cfg.head_kind, max_options=cfg.max_aux_options)


def _max_block_units(cfg: PlanConfig, n_units: int) -> int | None:
    if cfg.max_block_units == -1:
        return max(1, math.ceil(n_units / 3))
    return cfg.max_block_units


@dataclass(frozen=True)
class _Target:
    """What the plan assumes of the device it targets, resolved once."""

    speed: DeviceSpeed
    speed_source: str
    """Where the speed came from: the flags, a profile file, or this machine's cached profile."""
    workspace: int
    """Library workspace every peak on the target includes."""
    cal: MemoryCalibration
    """Memory calibration (none on the CPU, where the trace is exact)."""
    name: str


def _device_target(cfg: PlanConfig) -> _Target:
    """The target device's speed for the FLOP cost model (the flags, a
    device profile file, or this machine's cached profile, measured once),
    its memory terms and its name (the GPU here, else the device profile's,
    else what the CLI said)."""
    prof: DeviceProfile | None = None
    if cfg.device_profile is not None:
        prof, source = load_profile(cfg.device_profile), f"profile {cfg.device_profile}"
        if prof.kind != cfg.device_kind:
            log.warning("device profile %s is for %s, the plan targets %s", cfg.device_profile, prof.kind, cfg.device_kind)
    else:
        here = "cuda" if cfg.device_kind == "cuda" and torch.cuda.is_available() else "cpu"
        if cfg.device_flops_per_s and cfg.op_overhead_s is not None:
            source = "flags"
        else:
            if cfg.device_kind == "cuda" and here == "cpu" and cfg.device_flops_per_s is None:
                log.warning("planning for CUDA on a machine without one: times use this CPU's speed; pass "
                            "--device-profile with the GPU's profile")
            prof, path = cached_profile(here)
            source = f"cached profile {path}"
    if cfg.device_kind == "cpu":
        workspace, cal = 0, MemoryCalibration()
    elif prof is not None and prof.kind == "cuda":
        workspace, cal = prof.workspace(), prof.calibration()
    else:
        workspace, cal = DEFAULT_CUDA_WORKSPACE_BYTES, DEFAULT_CUDA_CALIBRATION
    name = cfg.device_name
    if cfg.device_kind == "cuda" and not torch.cuda.is_available() and cfg.device_profile is not None:
        name = prof.name
    if prof is None:
        speed = DeviceSpeed(flops_per_s=cfg.device_flops_per_s, op_overhead_s=cfg.op_overhead_s)
    else:
        speed = DeviceSpeed(flops_per_s=cfg.device_flops_per_s or prof.flops_per_s,
                            op_overhead_s=prof.op_overhead_s if cfg.op_overhead_s is None else cfg.op_overhead_s)
        source = f"{source} ({prof.name}, {prof.source} {prof.date})"
    return _Target(speed=speed, speed_source=source, workspace=workspace, cal=cal, name=name)


def _calibrated(prof: StepProfile, cal: MemoryCalibration) -> StepProfile:
    """A step profile as the target device will allocate it."""
    return dataclasses.replace(prof, dyn_fixed_bytes=prof.dyn_fixed_bytes + cal.step_overhead_bytes,
                               dyn_per_sample_bytes=math.ceil(prof.dyn_per_sample_bytes * cal.activation_scale))


def _baseline(problem: Problem, prof: StepProfile, speed: DeviceSpeed, cfg: PlanConfig, *, real, shape, classes, device, sgd) -> Baseline:
    fitting = [b for b in problem.batch_sizes if prof.peak_bytes(b) <= problem.cap_bytes]
    ws = problem.workspace_bytes
    if not fitting:
        return Baseline(batch_size=0, predicted_peak_bytes=prof.peak_bytes(problem.batch_sizes[0]) + ws, predicted_time_s=0.0,
                        epochs=cfg.epochs, fits=False, lr=0.0, steps=0)
    b = fitting[-1]
    if real is not None:
        fixed, per = measure_step_time(real, shape, classes, device=device, batches=(8, 32), sgd=sgd)
        step = fixed + per * b
    else:
        step = speed.step_s(prof, b)
    return Baseline(batch_size=b, predicted_peak_bytes=prof.peak_bytes(b) + ws, predicted_time_s=block_steps(problem, b) * step,
                    epochs=cfg.epochs, fits=True, steps=block_steps(problem, b),
                    lr=lr_for_batch(cfg.lr, b, base=cfg.base_batch_size, rule=cfg.lr_scaling))


def _raise_infeasible(problem: Problem, solution: Solution, cfg: PlanConfig) -> None:
    need = min_feasible_budget_bytes(problem, margin_fraction=cfg.margin)
    from neuroflux.planner.budget import format_bytes

    if solution.status == "timeout":
        raise NeuroFluxError(f"the solver found no plan in time: {solution.message}")
    if need > cfg.budget_bytes:
        raise InfeasibleBudget(
            f"budget {cfg.budget_text} ({cfg.budget_bytes} bytes) is too small: even one unit at batch "
            f"{problem.batch_sizes[0]} with the narrowest aux head needs more. The smallest budget that works is "
            f"{need} bytes ({format_bytes(need)}, with the {cfg.margin:.0%} margin"
            + (f" and the device's {format_bytes(problem.workspace_bytes)} of library workspace" if problem.workspace_bytes else "")
            + f"); pass --budget {need} or more, "
            "or lower --min-batch",
            min_budget_bytes=need,
        )
    if "recompute" in problem.boundaries:
        raise InfeasibleBudget(
            f"no plan fits: {solution.message}. Every unit fits alone ({format_bytes(need)} suffices for that), "
            "so --max-blocks or --max-block-units is the limit (a block that recomputes its input also holds the "
            "recomputed units' weights): drop --max-blocks, or raise --budget",
            min_budget_bytes=None,
        )
    raise InfeasibleBudget(
        f"no plan fits: {solution.message}. The device budget would allow one ({format_bytes(need)} suffices), "
        "so the cache budgets or --max-blocks are the limit: let boundaries recompute (--cache-location auto), "
        "raise --host-budget or --disk-budget, use --cache-dtype float16, or drop --max-blocks",
        min_budget_bytes=None,
    )


def _assemble(*, mf: ModelFile | ModelObject, cfg: PlanConfig, gm, spans: list[UnitSpan], problem: Problem, solution: Solution,
              shape, classes: int, bp: Baseline, ck: Baseline, target: _Target, engine: str, plan_dir: Path,
              model_params: int, wall_s: float) -> Plan:
    speed = target.speed
    units = _unit_records(spans, problem, solution)
    blocks = _block_records(problem, solution, cfg)
    total = sum(b.predicted_time_s for b in blocks)
    nodes, edges = _graph_records(gm)
    return Plan(
        schema_version=SCHEMA_VERSION,
        created_by=f"neuroflux {neuroflux.__version__}, torch {torch.__version__}",
        model=ModelSpec(file=_model_file(mf, plan_dir), sha256=mf.sha256, factory=mf.factory_name, datasets=mf.datasets_name,
                        input_shape=list(shape), num_classes=classes, params=model_params,
                        capture=gm.meta.get(META_CAPTURE, "symbolic"), source=mf.source),
        device=DeviceSpec(kind=cfg.device_kind, name=target.name, budget_text=cfg.budget_text,
                          budget_bytes=cfg.budget_bytes, budget_source=cfg.budget_source, margin_fraction=cfg.margin,
                          cache_budget_bytes=problem.cache_budget_bytes, workspace_bytes=problem.workspace_bytes,
                          step_overhead_bytes=target.cal.step_overhead_bytes,
                          activation_scale=target.cal.activation_scale, disk_budget_bytes=problem.disk_budget_bytes),
        budget_bytes=cfg.budget_bytes,
        recipe=Recipe(optimizer="sgd", lr=cfg.lr, base_batch_size=cfg.base_batch_size, lr_scaling=cfg.lr_scaling,
                      momentum=cfg.momentum, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                      epochs_per_block=cfg.epochs, seed=cfg.seed, train_size=problem.train_size, val_size=problem.val_size),
        exit_policy=ExitPolicy(patience=cfg.patience, tolerance=cfg.tolerance, prefer=cfg.prefer,
                               epoch_patience=cfg.epoch_patience, max_extra_epochs=cfg.max_extra_epochs),
        units=units,
        blocks=blocks,
        graph_nodes=nodes,
        graph_edges=edges,
        baseline=Baselines(bp=bp, bp_checkpoint=ck),
        predicted=Predicted(
            time_s=total,
            speedup_vs_bp=bp.predicted_time_s / total if bp.fits and total > 0 else None,
            speedup_vs_bp_checkpoint=ck.predicted_time_s / total if ck.fits and total > 0 else None,
            peak_bytes=max(b.predicted_peak_bytes for b in blocks),
            assumes="no early stop: every block runs its planned epochs and every unit trains; adaptive depth and "
                    "per-block epochs only shorten this (extra epochs are paid from time that converged blocks saved)",
        ),
        solver=SolverInfo(strategy=cfg.strategy, engine=engine, status=solution.status, widths_status=solution.widths_status,
                          wall_time_s=solution.wall_time_s,
                          time_limit_s=cfg.time_limit_s, seed=cfg.seed, objective_time_s=solution.time_s,
                          lower_bound_s=solution.lower_bound_s, tie_tolerance=cfg.tie_tolerance,
                          num_variables=solution.num_variables, num_constraints=solution.num_constraints,
                          max_blocks=cfg.max_blocks, min_batch_size=problem.batch_sizes[0],
                          max_batch_size=problem.batch_sizes[-1]),
        profile=ProfileInfo(memory_source="fake", cost_source=cfg.cost,
                            device_flops_per_s=speed.flops_per_s if cfg.cost == "flops" else 0.0,
                            op_overhead_s=speed.op_overhead_s if cfg.cost == "flops" else 0.0,
                            device_speed_source=target.speed_source if cfg.cost == "flops" else "measured steps",
                            profile_batch_sizes=[8, 16]),
        data=_data_spec(problem, solution, cfg, tuple(shape)),
    )


def _model_file(mf: ModelFile | ModelObject, plan_dir: Path) -> str:
    """How the plan names its model: the file relative to the plan, an
    installed module's import name, or a model object's class."""
    if mf.source != "file":
        return mf.import_name if mf.source == "import" else mf.label
    try:
        return os.path.relpath(mf.path, plan_dir.resolve())
    except ValueError:  # another drive on Windows
        return str(mf.path)


def _unit_records(spans: list[UnitSpan], problem: Problem, solution: Solution) -> list[Unit]:
    units = []
    for span, cost, opt_i in zip(spans, problem.units, solution.options):
        o = cost.options[opt_i]
        is_last = span.index == len(spans) - 1
        units.append(
            Unit(
                name=cost.name, index=span.index, nodes=list(span.nodes), input_node=span.input_node,
                output_node=span.output_node, input_shape=list(span.input_shape), output_shape=list(span.output_shape),
                params=span.params, out_bytes_per_sample=cost.out_bytes_per_sample, is_last=is_last,
                aux=None if is_last else AuxHead(kind=o.kind, width=o.width, params=o.head_params),
                profile=UnitProfile(
                    static_bytes=o.static_bytes, dyn_fixed_bytes=o.dyn_fixed_bytes,
                    dyn_per_sample_bytes=o.dyn_per_sample_bytes, step_fixed_s=o.step_fixed_s,
                    step_per_sample_s=o.step_per_sample_s, fwd_per_sample_s=cost.fwd_per_sample_s,
                ),
            )
        )
    return units


def _block_records(problem: Problem, solution: Solution, cfg: PlanConfig) -> list[Block]:
    blocks = []
    srcs = block_sources(solution.blocks)
    end_of = {bc.end: i for i, bc in enumerate(solution.blocks)}
    for i, (bc, src) in enumerate(zip(solution.blocks, srcs)):
        last_block = bc.end == problem.n - 1
        peak = block_peak_bytes(problem, bc.start, bc.end, bc.batch_size, solution.options, src=src)
        own = block_peak_bytes(problem, bc.start, bc.end, bc.batch_size, solution.options)
        source_block = None if src == 0 else end_of[src - 1]
        kind = "data" if i == 0 else ("cache" if src == bc.start else "recompute")
        cached = not last_block and bc.boundary != "recompute"
        blocks.append(
            Block(
                index=i, units=[problem.units[u].name for u in range(bc.start, bc.end + 1)], batch_size=bc.batch_size,
                epochs=cfg.epochs,
                lr=lr_for_batch(cfg.lr, bc.batch_size, base=cfg.base_batch_size, rule=cfg.lr_scaling),
                steps=block_steps(problem, bc.batch_size),
                predicted_peak_bytes=peak + problem.workspace_bytes,
                predicted_time_s=block_time_s(problem, bc.start, bc.end, bc.batch_size, solution.options, src=src,
                                              boundary=bc.boundary),
                cache=CacheSpec(location=bc.boundary, dtype=cfg.cache_dtype, bytes=cache_bytes(problem, bc.end),
                                file=f"cache/block{i}.npy" if bc.boundary == "disk" else None) if cached else None,
                shuffle_seed=shuffle_seed(cfg.seed, i),
                input=BlockInput(kind=kind, source_block=source_block,
                                 recompute_units=[problem.units[u].name for u in range(src, bc.start)],
                                 recompute_s=recompute_time_s(problem, src, bc.start, bc.batch_size)),
                predicted_peak_recompute_bytes=peak - own,
            )
        )
    return blocks


def _host_peaks(problem: Problem, solution: Solution) -> dict[str, int]:
    """Most RAM and disk the plan's caches hold at once (over its blocks)."""
    srcs = block_sources(solution.blocks)
    peaks = {"ram": 0, "disk": 0}
    for bc, src in zip(solution.blocks, srcs):
        use = host_use(problem, src, source_kind(solution.blocks, src), bc.end, bc.boundary)
        peaks = {k: max(v, use[k]) for k, v in peaks.items()}
    return peaks


def _data_spec(problem: Problem, solution: Solution, cfg: PlanConfig, shape: tuple[int, ...]) -> DataSpec:
    """Stack the inputs in RAM when the flag says so, or (auto) when they fit
    the host budget beside the most the caches hold in RAM; else stream."""
    inputs = (problem.train_size + problem.val_size) * math.prod(shape) * 4
    peaks = _host_peaks(problem, solution)
    room = problem.cache_budget_bytes - peaks["ram"]
    if cfg.data_mode != "auto":
        mode, reason = cfg.data_mode, f"--data-mode {cfg.data_mode}"
    elif inputs <= room:
        mode, reason = "stack", (f"the inputs ({format_bytes(inputs)} as float32) fit the host budget beside the "
                                 f"caches' {format_bytes(peaks['ram'])} of RAM")
    else:
        mode, reason = "stream", (f"the inputs ({format_bytes(inputs)} as float32) do not fit the host budget's "
                                  f"{format_bytes(max(room, 0))} left beside the caches' RAM")
    return DataSpec(mode=mode, input_bytes=inputs, peak_cache_ram_bytes=peaks["ram"],
                    peak_cache_disk_bytes=peaks["disk"], reason=reason)


def _graph_records(gm) -> tuple[list[GraphNode], list[GraphEdge]]:
    """The traced graph's activation nodes and data edges, with their units."""
    g = activation_graph(gm)
    nodes = []
    for n in gm.graph.nodes:
        if n.name not in g:
            continue
        unit = n.meta.get(META_UNIT)
        shape = n.meta.get(META_SHAPE)
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        nodes.append(GraphNode(name=n.name, op=n.op, target=str(target), unit=None if unit is None else f"u{unit}",
                               shape=None if shape is None else list(shape)))
    edges = [GraphEdge(src=a, dst=b) for a, b in g.edges]
    return nodes, edges
