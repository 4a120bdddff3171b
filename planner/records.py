"""Plan records: the ``Plan`` dataclasses (``schemas/plan.py``) built from a
profiled model, its problem and the solution (``plan_record``).

Not to be confused with ``runtime/assemble.py``, which assembles modules
from a plan: here the plan itself is written down.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

import neuroflux
from neuroflux.common import format_bytes
from neuroflux.planner.baselines import compile_baseline
from neuroflux.planner.config import PlanConfig
from neuroflux.planner.jobs import Profiled
from neuroflux.planner.problem import (
    Problem,
    Solution,
    block_peak_bytes,
    block_sources,
    block_steps,
    block_time_s,
    cache_bytes,
    host_use,
    recompute_time_s,
    source_kind,
)
from neuroflux.planner.target import Target
from neuroflux.planner.units import UnitSpan, activation_graph
from neuroflux.runtime.graph import META_CAPTURE, META_SHAPE, META_UNIT
from neuroflux.runtime.model_file import ModelFile, ModelObject
from neuroflux.runtime.train import shuffle_seed
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

if TYPE_CHECKING:
    from neuroflux.planner.solve import Engine

__all__ = ["plan_record"]


def plan_record(
    pr: Profiled,
    cfg: PlanConfig,
    *,
    problem: Problem,
    solution: Solution,
    bp: Baseline,
    ck: Baseline,
    ck_all: Baseline,
    engine: Engine,
    plan_dir: Path,
) -> Plan:
    """The plan: ``solution`` to ``problem`` for the profiled model ``pr``,
    with its baselines and the engine that solved it."""
    blocks = _block_records(problem, solution, cfg)
    total = sum(b.predicted_time_s for b in blocks)
    nodes, edges = _graph_records(pr.gm)
    exits = cfg.exits
    return Plan(
        schema_version=SCHEMA_VERSION,
        created_by=f"neuroflux {neuroflux.__version__}, torch {torch.__version__}",
        model=_model_spec(pr, plan_dir),
        device=_device_spec(problem, cfg, pr.target),
        budget_bytes=cfg.budget.budget_bytes,
        recipe=_recipe(cfg, problem),
        exit_policy=ExitPolicy(
            patience=cfg.patience(len(problem.units)),
            tolerance=exits.tolerance,
            prefer=exits.prefer,
            epoch_patience=exits.epoch_patience,
            max_extra_epochs=exits.max_extra_epochs,
            min_reduction=exits.min_reduction,
        ),
        units=_unit_records(pr.spans, problem, solution),
        blocks=blocks,
        graph_nodes=nodes,
        graph_edges=edges,
        baseline=Baselines(
            bp=bp, bp_checkpoint=ck, bp_checkpoint_all=ck_all, bp_compile=compile_baseline(problem, cfg, bp, ck_all)
        ),
        predicted=Predicted(
            time_s=total,
            speedup_vs_bp=bp.predicted_time_s / total if bp.fits and total > 0 else None,
            speedup_vs_bp_checkpoint=ck.predicted_time_s / total if ck.fits and total > 0 else None,
            peak_bytes=max(b.predicted_peak_bytes for b in blocks),
            assumes="no early stop: every block runs its planned epochs and every unit trains; adaptive depth and "
            "per-block epochs only shorten this (extra epochs are paid from time that converged blocks saved and "
            "from the units the exit size limit skips)",
        ),
        solver=_solver_info(problem, solution, cfg, engine),
        profile=_profile_info(cfg, pr.target),
        data=_data_spec(problem, solution, cfg, tuple(pr.shape)),
    )


def _recipe(cfg: PlanConfig, problem: Problem) -> Recipe:
    recipe = cfg.recipe
    return Recipe(
        optimizer="sgd",
        lr=recipe.lr,
        base_batch_size=recipe.base_batch_size,
        lr_scaling=recipe.lr_scaling,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
        schedule=recipe.schedule,
        epochs_per_block=recipe.epochs,
        seed=cfg.seed,
        train_size=problem.train_size,
        val_size=problem.val_size,
        precision=recipe.precision,
        memory_format=cfg.memory_format,
    )


def _model_spec(pr: Profiled, plan_dir: Path) -> ModelSpec:
    mf = pr.mf
    return ModelSpec(
        file=_model_file(mf, plan_dir),
        sha256=mf.sha256,
        factory=mf.factory_name,
        datasets=mf.datasets_name,
        input_shape=list(pr.shape),
        num_classes=pr.classes,
        params=pr.model_params,
        capture=pr.gm.meta.get(META_CAPTURE, "symbolic"),
        source=mf.source,
    )


def _device_spec(problem: Problem, cfg: PlanConfig, target: Target) -> DeviceSpec:
    budget = cfg.budget
    return DeviceSpec(
        kind=cfg.target.device_kind,
        name=target.name,
        budget_text=budget.budget_text,
        budget_bytes=budget.budget_bytes,
        budget_source=budget.budget_source,
        margin_fraction=budget.margin,
        cache_budget_bytes=problem.cache_budget_bytes,
        workspace_bytes=problem.workspace_bytes,
        step_overhead_bytes=target.cal.step_overhead_bytes,
        activation_scale=target.cal.activation_scale,
        disk_budget_bytes=problem.disk_budget_bytes,
    )


def _solver_info(problem: Problem, solution: Solution, cfg: PlanConfig, engine: Engine) -> SolverInfo:
    search = cfg.search
    return SolverInfo(
        strategy=search.strategy,
        engine=engine,
        status=solution.status,
        widths_status=solution.widths_status,
        wall_time_s=solution.wall_time_s,
        time_limit_s=search.time_limit_s,
        seed=cfg.seed,
        objective_time_s=solution.time_s,
        lower_bound_s=solution.lower_bound_s,
        tie_tolerance=cfg.heads.tie_tolerance,
        batch_time_tolerance=cfg.batch_time_tolerance,
        num_variables=solution.num_variables,
        num_constraints=solution.num_constraints,
        max_blocks=search.max_blocks,
        min_batch_size=problem.batch_sizes[0],
        max_batch_size=problem.batch_sizes[-1],
    )


def _profile_info(cfg: PlanConfig, target: Target) -> ProfileInfo:
    flops = cfg.target.cost == "flops"
    return ProfileInfo(
        memory_source="fake",
        cost_source=cfg.target.cost,
        device_flops_per_s=target.speed.flops_per_s if flops else 0.0,
        op_overhead_s=target.speed.op_overhead_s if flops else 0.0,
        device_speed_source=target.speed_source if flops else "measured steps",
        profile_batch_sizes=[8, 16],
        device_bandwidth_bytes_per_s=(target.speed.bandwidth_bytes_per_s or 0.0) if flops else 0.0,
    )


def _model_file(mf: ModelFile | ModelObject, plan_dir: Path) -> str:
    """How the plan names its model: the file relative to the plan, an
    installed module's import name, or a model object's class."""
    if isinstance(mf, ModelObject):
        return mf.label
    if mf.import_name is not None:
        return mf.import_name
    try:
        return os.path.relpath(mf.path, plan_dir.resolve())
    except ValueError:  # another drive on Windows
        return str(mf.path)


def _unit_records(spans: list[UnitSpan], problem: Problem, solution: Solution) -> list[Unit]:
    units = []
    for span, cost, opt_i in zip(spans, problem.units, solution.options):
        o = cost.options[opt_i]
        is_last = span.index == len(spans) - 1
        # One of head_widths' kinds for every unit but the last (which exits through the model's head).
        head_kind = cast(Literal["pooled", "conv", "dgl", "stage", "linear"], o.kind)
        units.append(
            Unit(
                name=cost.name,
                index=span.index,
                nodes=list(span.nodes),
                input_node=span.input_node,
                output_node=span.output_node,
                input_shape=list(span.input_shape),
                output_shape=list(span.output_shape),
                params=span.params,
                out_bytes_per_sample=cost.out_bytes_per_sample,
                is_last=is_last,
                aux=None if is_last else AuxHead(kind=head_kind, width=o.width, params=o.head_params),
                profile=UnitProfile(
                    static_bytes=o.static_bytes,
                    dyn_fixed_bytes=o.dyn_fixed_bytes,
                    dyn_per_sample_bytes=o.dyn_per_sample_bytes,
                    step_fixed_s=o.step_fixed_s,
                    step_per_sample_s=o.step_per_sample_s,
                    fwd_per_sample_s=cost.fwd_per_sample_s,
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
        kind: Literal["data", "cache", "recompute"] = (
            "data" if i == 0 else ("cache" if src == bc.start else "recompute")
        )
        cached = not last_block and bc.boundary != "recompute"
        blocks.append(
            Block(
                index=i,
                units=[problem.units[u].name for u in range(bc.start, bc.end + 1)],
                batch_size=bc.batch_size,
                epochs=cfg.recipe.epochs,
                lr=cfg.recipe.lr_at(bc.batch_size),
                steps=block_steps(problem, bc.batch_size),
                predicted_peak_bytes=peak + problem.workspace_bytes,
                predicted_time_s=block_time_s(
                    problem, bc.start, bc.end, bc.batch_size, solution.options, src=src, boundary=bc.boundary
                ),
                cache=CacheSpec(
                    location=cast(Literal["ram", "disk"], bc.boundary),  # cached: not "recompute"
                    dtype=cfg.cache_dtype,
                    bytes=cache_bytes(problem, bc.end),
                    file=f"cache/block{i}.npy" if bc.boundary == "disk" else None,
                )
                if cached
                else None,
                shuffle_seed=shuffle_seed(cfg.seed, i),
                input=BlockInput(
                    kind=kind,
                    source_block=source_block,
                    recompute_units=[problem.units[u].name for u in range(src, bc.start)],
                    recompute_s=recompute_time_s(problem, src, bc.start, bc.batch_size),
                ),
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
    """Stack the inputs in RAM when the config says so, or (auto) when they
    fit the host budget beside the most the caches hold in RAM; else stream."""
    inputs = (problem.train_size + problem.val_size) * math.prod(shape) * 4
    peaks = _host_peaks(problem, solution)
    room = problem.cache_budget_bytes - peaks["ram"]
    data_mode = cfg.data.data_mode
    if data_mode != "auto":
        mode, reason = data_mode, f"--data-mode {data_mode}"
    elif inputs <= room:
        mode, reason = (
            "stack",
            (
                f"the inputs ({format_bytes(inputs)} as float32) fit the host budget beside the "
                f"caches' {format_bytes(peaks['ram'])} of RAM"
            ),
        )
    else:
        mode, reason = (
            "stream",
            (
                f"the inputs ({format_bytes(inputs)} as float32) do not fit the host budget's "
                f"{format_bytes(max(room, 0))} left beside the caches' RAM"
            ),
        )
    return DataSpec(
        mode=mode,
        input_bytes=inputs,
        peak_cache_ram_bytes=peaks["ram"],
        peak_cache_disk_bytes=peaks["disk"],
        reason=reason,
    )


def _graph_records(gm: Any) -> tuple[list[GraphNode], list[GraphEdge]]:
    """The traced graph's activation nodes and data edges, with their units."""
    g = activation_graph(gm)
    nodes = []
    for n in gm.graph.nodes:
        if n.name not in g:
            continue
        unit = n.meta.get(META_UNIT)
        shape = n.meta.get(META_SHAPE)
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        nodes.append(
            GraphNode(
                name=n.name,
                op=n.op,
                target=str(target),
                unit=None if unit is None else f"u{unit}",
                shape=None if shape is None else list(shape),
            )
        )
    edges = [GraphEdge(src=a, dst=b) for a, b in g.edges]
    return nodes, edges
