"""Profiling jobs: everything about a model that does not depend on the budget.

``profile_model`` loads and traces the model, learns its input shape,
classes and data sizes (``infer_meta``), finds its units, and profiles every
unit's aux options and the two BP baselines as jobs on this machine's cores
(``ProfilingJobs``, over ``map_forked``). A budget then changes only the
solve: ``make_plans`` profiles once for many budgets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from neuroflux.errors import NeuroFluxError
from neuroflux.planner.config import PlanConfig
from neuroflux.planner.heads import unit_head_options
from neuroflux.planner.parallel import map_forked, usable_cpus
from neuroflux.planner.problem import AuxOption, UnitCost
from neuroflux.planner.profile import (
    ForwardProfile,
    SGDConfig,
    StepProfile,
    measure_step_time,
    profile_forward,
    profile_step,
)
from neuroflux.planner.profile_compose import profile_unit_options
from neuroflux.planner.target import Target, calibrated, device_target
from neuroflux.planner.units import UnitSpan, find_units, propagate_shapes, unit_signature
from neuroflux.runtime.graph import META_CAPTURE, split_units, trace
from neuroflux.runtime.heads import build_head
from neuroflux.runtime.model_file import ModelFile, ModelObject, load_model_file
from neuroflux.runtime.modules import Chain, CheckpointedChain
from neuroflux.runtime.precision import Precision

__all__ = ["Progress", "ModelMeta", "Profiled", "ProfilingJobs", "WithExit", "infer_meta", "profile_model"]

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``progress(description, done, total)``: how far planning has got."""


class WithExit(nn.Module):
    """A unit followed by its aux head (or by nothing, for the last unit):
    what ``--cost measure`` times."""

    def __init__(self, unit: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.unit = unit
        self.head = head if head is not None else nn.Identity()

    def forward(self, x):
        return self.head(self.unit(x))


@dataclass(frozen=True)
class ModelMeta:
    """What planning learns from the model and its data before profiling."""

    shape: tuple[int, ...]
    classes: int
    train_n: int
    val_n: int
    model: nn.Module
    """The model on fake tensors."""
    gm: Any
    """Its trace (an fx.GraphModule)."""


def infer_meta(mf: ModelFile | ModelObject, cfg: PlanConfig, fake: FakeTensorMode) -> ModelMeta:
    """Input shape, classes, train and val sizes; the fake model and its trace."""
    shape, train_n, val_n = _data_sizes(mf, cfg)
    model = mf.build_fake(fake)
    gm = trace(model, shape)  # first: an untraceable model gets the error that names the module
    if gm.meta.get(META_CAPTURE) == "shape-specialized":
        log.warning(
            "%s: torch.fx cannot trace %s() symbolically (shape arithmetic in forward); traced it with the "
            "input shape %s fixed instead (the batch stays free)",
            mf.path.name,
            mf.factory_name,
            shape,
        )
    classes = _output_classes(mf, model, shape, fake)
    return ModelMeta(shape=shape, classes=classes, train_n=int(train_n), val_n=int(val_n), model=model, gm=gm)


def _data_sizes(mf: ModelFile | ModelObject, cfg: PlanConfig) -> tuple[tuple[int, ...], int, int]:
    """One sample's shape and the train and val sizes: the config's, else
    the model file's INPUT_SHAPE and datasets."""
    shape = cfg.data.input_shape or mf.input_shape()
    train_n, val_n = cfg.data.train_size, cfg.data.val_size
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
    return tuple(int(s) for s in shape), train_n, val_n


def _output_classes(mf: ModelFile | ModelObject, model: nn.Module, shape: tuple[int, ...], fake: FakeTensorMode) -> int:
    """The classes the model outputs, checked against NUM_CLASSES, on a fake batch of 2."""
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
        raise NeuroFluxError(
            f"{mf.path}: NUM_CLASSES is {classes} but {mf.factory_name}() outputs {out.shape[1]} "
            f"classes; fix NUM_CLASSES, or set {mf.factory_name}.NUM_CLASSES for this factory"
        )
    if out.shape[1] < 2:
        raise NeuroFluxError(
            f"{mf.path}: {mf.factory_name}() outputs {out.shape[1]} class; a classifier needs at "
            "least 2 (with one, every loss is 0 and nothing is learned)"
        )
    return int(out.shape[1])


@dataclass
class Profiled:
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
    target: Target
    real: Any
    """Real modules for --cost measure: (whole model, checkpointed chain), else None."""
    device: Any
    sgd: SGDConfig
    jobs: ProfilingJobs | None = None
    """The profiling jobs, for the steps profiled after the solve (the polish's prefixes)."""
    prefix_profiles: dict[tuple[int, str, int], StepProfile] = dataclasses.field(default_factory=dict)
    """Polish steps profiled so far, by (exit unit, head kind, head width):
    budgets planned from one profiling share them."""
    checkpointing: dict[Any, Any] = dataclasses.field(default_factory=dict)
    """The checkpointing baseline's unit retention and verified chain profiles, shared the same way."""


def profile_model(model_spec: str | ModelObject, cfg: PlanConfig, report: Progress) -> Profiled:
    """Load, trace and profile ``model_spec``: its units' costs and the BP baselines' steps."""
    torch.manual_seed(cfg.seed)
    mf = (
        model_spec
        if isinstance(model_spec, ModelObject)
        else load_model_file(model_spec, factory=cfg.data.factory, datasets=cfg.data.datasets)
    )
    fake = FakeTensorMode()
    meta = infer_meta(mf, cfg, fake)
    propagate_shapes(meta.gm, meta.shape, fake, precision=Precision(cfg.recipe.precision, "cpu", cfg.memory_format))
    spans = find_units(meta.gm)
    recipe = cfg.recipe
    jobs = ProfilingJobs(
        cfg=cfg,
        fake=fake,
        meta=meta,
        spans=spans,
        unit_mods=split_units(meta.gm, [s.nodes for s in spans]),
        target=device_target(cfg),
        sgd=SGDConfig(lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay),
    )
    if cfg.target.cost == "measure":
        if cfg.target.device_kind == "cuda" and not torch.cuda.is_available():
            raise NeuroFluxError("--cost measure with a CUDA target needs a CUDA device here; use --cost flops")
        torch.manual_seed(cfg.seed)
        real_gm = trace(mf.build(), meta.shape)
        jobs.real_mods = split_units(real_gm, [s.nodes for s in spans])
        jobs.device = torch.device(cfg.target.device_kind)
    unit_costs, bp_prof, ck_prof = jobs.run(report)
    return Profiled(
        mf=mf,
        gm=meta.gm,
        spans=spans,
        shape=meta.shape,
        classes=meta.classes,
        train_n=meta.train_n,
        val_n=meta.val_n,
        model_params=sum(p.numel() for p in meta.model.parameters()),
        unit_costs=unit_costs,
        bp_prof=bp_prof,
        ck_prof=ck_prof,
        target=jobs.target,
        real=None if jobs.real_mods is None else (real_gm, CheckpointedChain(jobs.real_mods)),
        device=jobs.device,
        sgd=jobs.sgd,
        jobs=jobs,
    )


@dataclass
class ProfilingJobs:
    """Every unit's aux options and the two baselines, profiled as jobs on
    this machine's cores (``map_forked``)."""

    cfg: PlanConfig
    fake: FakeTensorMode
    meta: ModelMeta
    spans: list[UnitSpan]
    unit_mods: list[fx.GraphModule]
    target: Target
    sgd: SGDConfig
    real_mods: list[fx.GraphModule] | None = None
    """Real units for --cost measure."""
    device: torch.device = torch.device("cpu")
    """Where --cost measure times steps."""
    option_lists: list[list[tuple[str, int]]] = dataclasses.field(init=False)
    """Every unit's (kind, width) options, widest first."""

    def __post_init__(self) -> None:
        last = len(self.spans) - 1
        self.option_lists = [unit_head_options(s, self.cfg.heads, last=s.index == last) for s in self.spans]

    @property
    def precision(self) -> Precision:
        """The plan's precision, as autocast applies it to the (CPU) fake tensors
        profiled here; on a CUDA target, CUDA's autocast op lists differ in a few
        ops (softmax, losses, norms run in fp32 there)."""
        return Precision(self.cfg.recipe.precision, "cpu", self.cfg.memory_format)

    @property
    def batches(self) -> tuple[int, int]:
        """The two batches each step is profiled at: its memory is
        ``fixed + per_sample * b`` between them. A step's peak is the largest
        of affine functions of the batch (one per moment of the step), so it
        is convex in the batch: the line through two batches is exact there
        and above the peak between them, and below it outside them. Which
        moment holds the peak moves with the batch: in a unit whose weights
        outweigh its activations (ResNet-18's last stages), the backward
        with its parameter gradients at small batches, the activations at
        large ones (a line through batches 8 and 16 under-predicted such a
        unit 1.5x at batch 192); under mixed precision the bf16 copies of
        weights and gradients do the same. So the line goes through the
        smallest and largest candidate batches: exact there, safe in
        between, at every precision."""
        lo, hi = self.cfg.search.batch_range(self.meta.train_n)
        return (lo, hi) if hi > lo else (lo, lo + 1)

    @property
    def foreach(self) -> bool | None:
        return True if self.cfg.target.device_kind == "cuda" else None  # the optimizer step PyTorch runs there

    def run(self, report: Progress) -> tuple[list[UnitCost], StepProfile, StepProfile]:
        """Every unit's costs, then the BP and BP-checkpointing step profiles."""
        spans, cfg = self.spans, self.cfg
        last = len(spans) - 1
        # Units that compute the same thing on the same shape (a deep ResNet's
        # repeated blocks) have the same costs: profile one, reuse its options.
        first_of: dict[tuple[str, tuple[int, ...], bool, torch.dtype], int] = {}
        same_as = [
            first_of.setdefault(
                (unit_signature(mod, span.input_shape), tuple(span.output_shape), span.index == last, span.input_dtype),
                span.index,
            )
            for span, mod in zip(spans, self.unit_mods)
        ]
        distinct = sorted(first_of.values())
        weight = {k: len(self.option_lists[k]) for k in distinct} | {-1: 2 * len(spans), -2: 3 * len(spans)}
        total, done = sum(weight.values()), 0

        def finished(k: int) -> None:
            nonlocal done
            done += weight[k]
            report("profiling units and baselines", done, total)

        report("profiling units and baselines", 0, total)
        # Timed steps (--cost measure) must have the machine to themselves.
        workers = 1 if cfg.target.cost == "measure" else (cfg.target.workers or usable_cpus())
        results = map_forked(self.job, [-2, -1, *distinct], workers=workers, on_done=finished)
        unit_costs = [self.unit_cost(span, *results[same_as[span.index]]) for span in spans]
        report("solving", total, total)
        return unit_costs, results[-1], results[-2]

    def unit_cost(self, span: UnitSpan, options: tuple[AuxOption, ...], fwd: ForwardProfile) -> UnitCost:
        """The problem's view of a unit: its options, its cache and its inference forward on the target."""
        dtype_bytes = 4 if self.cfg.cache_dtype == "float32" else 2
        speed = self.target.speed
        return UnitCost(
            name=f"u{span.index}",
            options=options,
            out_bytes_per_sample=math.prod(span.output_shape) * dtype_bytes,
            fwd_per_sample_s=fwd.flops_per_sample / speed.flops_per_s + speed.traffic_s(fwd.traffic_per_sample),
            fwd_fixed_s=fwd.ops * speed.op_overhead_s,
            infer_static_bytes=fwd.weight_bytes,
            infer_fixed_bytes=fwd.fixed_bytes,
            infer_per_sample_bytes=math.ceil(fwd.per_sample_bytes * self.target.cal.activation_scale),
        )

    def job(self, k: int):
        """Unit ``k``'s options, or for -1 and -2 the BP and BP-checkpointing steps (whole-model, the longest jobs)."""
        if k >= 0:
            return self.options(k)
        return self.whole_step(self.meta.gm if k == -1 else CheckpointedChain(self.unit_mods))

    def whole_step(
        self, model: nn.Module, head: nn.Module | None = None, fake_head: Callable[[], nn.Module] | None = None
    ) -> StepProfile:
        """The calibrated step profile of ``model`` (and ``head``) from the model's input: BP's, a
        checkpointed chain's, an exit's end to end."""
        return calibrated(
            profile_step(
                model,
                head,
                self.meta.shape,
                self.meta.classes,
                fake_mode=self.fake,
                sgd=self.sgd,
                foreach=self.foreach,
                fake_head=fake_head,
                precision=self.precision,
                batches=self.batches,
            ),
            self.target.cal,
        )

    def chain_job(self, checkpointed: tuple[bool, ...]) -> StepProfile:
        """BP's step through the chain of units, recomputing the flagged ones
        (the budget-optimal checkpointing baseline's candidates)."""
        return self.whole_step(CheckpointedChain(self.unit_mods, checkpointed=checkpointed))

    def prefix_job(self, key: tuple[int, str, int]) -> StepProfile:
        """The end-to-end step of units 0..k with unit k's (kind, width) head
        (the polish of exit k); the last unit's is BP's step."""
        k, kind, width = key
        if kind == "model":
            return self.job(-1)
        span, classes = self.spans[k], self.meta.classes

        def head(mode: Any) -> nn.Module:
            with mode:
                return build_head(kind, span.output_shape, width, classes)

        return self.whole_step(
            Chain(self.unit_mods[: k + 1]), head(torch.device("meta")), fake_head=lambda: head(self.fake)
        )

    def options(self, k: int) -> tuple[tuple[AuxOption, ...], ForwardProfile]:
        """Unit ``k``'s aux options (memory and step time per head) and its inference forward."""
        span, mod, classes, fake = self.spans[k], self.unit_mods[k], self.meta.classes, self.fake

        def build(mode: Any) -> list[nn.Module | None]:
            with mode:
                return [
                    None if kind == "model" else build_head(kind, span.output_shape, width, classes)
                    for kind, width in self.option_lists[k]
                ]

        # On the meta device, where a module's initialisation costs nothing
        # (on fake tensors, a fifth of the job); in ``fake`` only where a
        # step cannot run on meta tensors.
        heads = build(torch.device("meta"))
        profs = profile_unit_options(  # the last unit's one option, the model's own head, is None
            mod,
            heads,
            span.input_shape,
            span.output_shape,
            classes,
            fake_mode=fake,
            sgd=self.sgd,
            foreach=self.foreach,
            fake_heads=lambda: build(fake),
            precision=self.precision,
            dtypes=(span.input_dtype, span.output_dtype),
            batches=self.batches,
        )
        options = []
        for (kind, width), head, prof in zip(self.option_lists[k], heads, profs):
            prof = calibrated(prof, self.target.cal)
            step_fixed, step_per = self.step_time(prof, k, kind, width)
            options.append(
                AuxOption(
                    kind=kind,
                    width=width,
                    head_params=0 if head is None else sum(p.numel() for p in head.parameters()),
                    static_bytes=prof.static_bytes,
                    dyn_fixed_bytes=prof.dyn_fixed_bytes,
                    dyn_per_sample_bytes=prof.dyn_per_sample_bytes,
                    step_fixed_s=step_fixed,
                    step_per_sample_s=step_per,
                )
            )
        return tuple(options), profile_forward(
            mod,
            span.input_shape,
            fake_mode=fake,
            precision=self.precision,
            input_dtype=span.input_dtype,
            batches=self.batches,
        )

    def step_time(self, prof: StepProfile, k: int, kind: str, width: int) -> tuple[float, float]:
        """(fixed_s, per_sample_s) of unit ``k``'s step with that head: from
        FLOPs, ops and traffic, or (--cost measure) timed on real tensors."""
        speed = self.target.speed
        if self.cfg.target.cost == "flops":
            return speed.fixed_s(prof), speed.per_sample_s(prof)
        assert self.real_mods is not None
        span = self.spans[k]
        head = None if kind == "model" else build_head(kind, span.output_shape, width, self.meta.classes)
        return measure_step_time(
            WithExit(self.real_mods[k], head),
            span.input_shape,
            self.meta.classes,
            device=self.device,
            batches=(8, 32),
            sgd=self.sgd,
            precision=self.cfg.recipe.precision,
            memory_format=self.cfg.memory_format,
            input_dtype=span.input_dtype,
        )
