"""Running ``nf-bench`` cells: the options every cell shares, planning a cell (or reading its prepared
plans), training each method of it in this process, and the run of a list of cells with results rewritten
after every method.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.datasets import DATA_ENV, LIMIT_ENV
from neuroflux.tools.bench_cells import ROOT, Cell, model_path
from neuroflux.tools.bench_report import compare_runs, save_results

if TYPE_CHECKING:
    from neuroflux.runtime.config import Method

#: Dry runs: overrides every cell's data limit (tiny data, one step per epoch).
DRY_LIMIT_ENV = "NEUROFLUX_DRY_LIMIT"

__all__ = ["DRY_LIMIT_ENV", "BenchOptions", "restored_env", "run_bench", "run_cell", "run_folder", "shared_data_path"]


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """What every cell of one invocation shares: devices, the solver's limit, prepared plans, dry-run cuts."""

    device: Literal["cpu", "cuda"] = "cpu"
    """Where the runs execute (resolved: cpu or cuda)."""
    target: float | None = None
    """Val accuracy for time-to-target (None: BP's final accuracy minus one point)."""
    time_limit: float = 30.0
    """The solver's time limit per plan, in seconds."""
    plan_device: str | None = None
    """Device kind the plans target (default: ``device``)."""
    device_profile: str | None = None
    """Device profile for the FLOP cost model (plans made ahead for a GPU)."""
    plans: Path | None = None
    """Read ``<plans>/<cell>/plans.json`` made by an earlier ``--plan-only`` run instead of planning."""
    plan_only: bool = False
    """Make the plans (and their ``plans.json`` index) and train nothing."""
    max_steps: int | None = None
    """Dry runs: cut every epoch after this many steps."""
    skip_runs: tuple[str, ...] = ()
    """Cells planned and loaded but not trained (dry runs of cells too heavy for a CPU)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Every method's compute precision (the plans')."""
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"
    """Every method's activation layout (the plans'; auto: the target's default)."""


@contextlib.contextmanager
def restored_env(*keys: str) -> Iterator[None]:
    """Give the caller (a test, a notebook) its environment back afterwards."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def shared_data_path() -> Path:
    """The full Fashion-MNIST file: $NEUROFLUX_DATA, or ../shared/data beside the repo."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else ROOT.parent / "shared" / "data" / "fashion_mnist.npz"


def _run_one(plan_path: Path, method: str, out: Path, opts: BenchOptions) -> dict[str, Any]:
    from neuroflux.runtime.runner import RunConfig, run_plan
    from neuroflux.schemas import load_plan

    plan = load_plan(plan_path)
    # A label is one of METHODS (nf-bench's --methods choices) or an ablation "neuroflux (...)".
    runtime_method = cast("Method", "neuroflux" if method.startswith("neuroflux") else method)
    s = run_plan(
        plan,
        plan_path,
        RunConfig(
            out_dir=out,
            method=runtime_method,
            device=opts.device,
            export_onnx=False,
            max_steps_per_epoch=opts.max_steps,
            command=f"nf-bench ({method} of {plan_path.name})",
            throughput_batch=8 if opts.max_steps is not None else None,
        ),
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": s, "metrics": metrics, "plan": plan}


def _plan_cell(cell: Cell, cell_dir: Path, opts: BenchOptions, log) -> dict[str, Any]:
    """Plans for the cell: optimal, greedy and each ablation variant; label ->
    path or error. Written with an index, ``plans.json``, that ``--plans`` reads."""
    if opts.plans is not None:
        index_path = opts.plans / cell.name / "plans.json"
        if not index_path.is_file():
            raise NeuroFluxError(
                f"no prepared plans for cell {cell.name} in {opts.plans}; run nf-bench --plan-only first"
            )
        try:
            prepared = json.loads(index_path.read_text())
            if not isinstance(prepared, dict) or not all(isinstance(v, str) for v in prepared.values()):
                raise ValueError("not an object of label -> plan file")
        except (ValueError, UnicodeDecodeError) as e:
            raise NeuroFluxError(
                f"{index_path} is not a plans index ({str(e).splitlines()[0][:120]}); make it again "
                "with nf-bench --plan-only"
            ) from None
        return {
            label: (index_path.parent / v if not v.startswith("error:") else NeuroFluxError(v[6:]))
            for label, v in prepared.items()
        }
    from neuroflux.planner.budget import parse_bytes
    from neuroflux.planner.build import make_plan_shared
    from neuroflux.planner.config import PlanConfig
    from neuroflux.schemas import save_plan

    wanted: list[tuple[str, str, tuple[tuple[str, Any], ...]]] = [("neuroflux", "optimal", ())]
    if "neuroflux-greedy" in cell.methods:
        wanted.append(("neuroflux-greedy", "greedy", ()))
    wanted += [(f"neuroflux ({label})", "optimal", overrides) for label, overrides in cell.variants]
    kind = opts.plan_device or opts.device
    defaults = {"precision": opts.precision, "memory_format": opts.memory_format, "device_profile": opts.device_profile}
    plans: dict[str, Any] = {}
    index: dict[str, str] = {}
    for i, (label, strategy, overrides) in enumerate(wanted):
        cfg = PlanConfig.from_options(
            budget_bytes=parse_bytes(cell.budget),
            budget_text=cell.budget,
            device_kind=kind,
            device_name=_device_name(kind, opts),
            strategy=strategy,
            epochs=cell.epochs,
            time_limit_s=opts.time_limit,
            datasets=cell.datasets,
            # A variant's options replace the invocation's (a variant may plan with another device profile).
            **{**defaults, **dict(cell.options), **dict(overrides)},
        )
        try:
            res = make_plan_shared(model_path(cell.model), cfg, plan_dir=cell_dir, profiles=_PROFILES)
        except NeuroFluxError as e:
            log(f"[{cell.name}] {label} plan: {e}")
            plans[label], index[label] = e, f"error:{e}"
            continue
        path = cell_dir / f"plan-{i}.json"
        save_plan(res.plan, path)
        plans[label], index[label] = path, path.name
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "plans.json").write_text(json.dumps(index, indent=1) + "\n")
    return plans


#: Profiles made in this process, by model and profiling settings: a model's
#: cells and variants are profiled once (their plans are the same as apart).
_PROFILES: dict[Any, Any] = {}


def _device_name(kind: str, opts: BenchOptions) -> str:
    import torch

    if kind == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if opts.device_profile:
        from neuroflux.planner.device_profile import load_profile

        return load_profile(opts.device_profile).name
    return kind


def _run_record(r: dict[str, Any], method: str, cell: Cell) -> dict[str, Any]:
    from neuroflux.planner.budget import parse_bytes

    s, plan = r["summary"], r["plan"]
    st = s.get("stopping") or {}
    measured = max(b["measured_peak_bytes"] for b in s["blocks"])
    nvml = [b["nvml_process_bytes"] for b in s["blocks"] if "nvml_process_bytes" in b]
    return {
        "budget_enforced": s.get("budget_enforced", False),
        "cap_held": measured <= parse_bytes(cell.budget),
        "nvml_process_bytes": max(nvml) if nvml else None,
        "final_accuracy": s["final_accuracy"],
        "final_exit": s["final_exit"],
        "wall_time_s": s["wall_time_s"],
        "train_time_s": s["train_time_s"],
        "measured_peak_bytes": max(b["measured_peak_bytes"] for b in s["blocks"]),
        "predicted_peak_bytes": max(b["predicted_peak_bytes"] for b in s["blocks"]),
        "final_params": s["final_params"],
        "original_params": s["original_params"],
        "throughput_final": s["throughput"]["final_images_per_s"],
        "throughput_original": s["throughput"]["original_images_per_s"],
        "batch_sizes": [b["batch_size"] for b in s["blocks"]],
        "blocks": len(s["blocks"]),
        "planned_blocks": len(plan.blocks),
        "heads": sorted({u.aux.kind for u in plan.units if u.aux is not None}),
        "stopped_early": s["stopped_early"],
        "stopped_at_unit": st.get("stopped_at_unit"),
        "epochs_run": st.get("epochs_run"),
        "saved_estimated_s": st.get("saved_estimated_s"),
        "exit_accuracies": s["exit_accuracies"],
        "polish": s.get("polish"),
        "predicted_time_s": _predicted_time(plan, method),
        "compile": s.get("compile"),
        "metrics": _keepable(r["metrics"], set(plan.allowed_exits()))
        if method.startswith("neuroflux")
        else r["metrics"],
    }


def _predicted_time(plan: Any, method: str) -> float | None:
    """The plan's predicted training time of ``method`` (bp-compile: none, its step is measured)."""
    if method.startswith("neuroflux"):
        return float(plan.predicted.time_s)
    if method == "bp-compile":
        return None
    base = getattr(plan.baseline, method.replace("-", "_")) or plan.baseline.bp_checkpoint
    return float(base.predicted_time_s)


def _keepable(metrics: list[dict[str, Any]], allowed: set[str]) -> list[dict[str, Any]]:
    """The run's records as time-to-target reads them, counting only exits the
    run may keep (``--min-reduction``): a larger exit reaching the target
    earlier is not a model the run delivers."""
    out = []
    for rec in metrics:
        rec = dict(rec)
        if rec["event"] == "block":
            rec["exit_accuracies"] = {u: a for u, a in rec["exit_accuracies"].items() if u in allowed} or {"-": 0.0}
        elif rec["event"] == "epoch" and "val_exit_acc" in rec:
            rec["val_acc"] = max((a for u, a in rec["val_exit_acc"].items() if u in allowed), default=0.0)
        out.append(rec)
    return out


def run_cell(
    cell: Cell,
    *,
    out: Path,
    opts: BenchOptions,
    log=print,
    on_run: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """Plan and run every method of ``cell``; ratios only within the cell.
    ``on_run`` gets the partial cell after every method, so a run cut off
    mid-cell (a device's time limit) keeps the methods it finished."""
    import shutil

    cell_dir = out / cell.name
    plans = _plan_cell(cell, cell_dir, opts, log)
    result = _cell_record(cell, plans)
    if opts.plan_only or cell.name in opts.skip_runs:
        return _planned_only(result, plans)
    labels = [m for m in cell.methods if m != "neuroflux-greedy" or "neuroflux-greedy" in plans]
    labels += [f"neuroflux ({label})" for label, _ in cell.variants]
    for label in labels:
        plan = plans.get(label if label.startswith("neuroflux") else "neuroflux")
        if isinstance(plan, Exception) or plan is None:
            result["runs"][label] = {"error": str(plan)}
            continue
        if label == "bp-checkpoint" and "error" not in result["runs"].get("bp", {"error": ""}) and _as_bp(plan):
            # Budget-optimal checkpointing recomputes nothing at BP's own batch: it is BP; not trained twice.
            result["runs"][label] = {**result["runs"]["bp"], "same_as": "bp"}
            log(f"[{cell.name}] {label}: recomputes nothing at BP's batch, so it is BP's run")
            continue
        run_dir = cell_dir / run_folder(label)
        if run_dir.exists():
            shutil.rmtree(run_dir)
        log(f"[{cell.name}] {label} ...")
        try:
            r = _run_one(plan, label, run_dir, opts)
        except NeuroFluxError as e:
            result["runs"][label] = {"error": str(e)}
            log(f"  {label}: {e}")
            continue
        result["runs"][label] = _run_record(r, label, cell)
        s = r["summary"]
        log(f"  acc {s['final_accuracy']:.4f}, {s['wall_time_s']:.1f} s, exit {s['final_exit']}")
        if on_run is not None:
            partial = copy.deepcopy(result)
            compare_runs(partial, opts.target)
            on_run(partial)
    compare_runs(result, opts.target)
    return result


def _cell_record(cell: Cell, plans: dict[str, Any]) -> dict[str, Any]:
    """The cell's record before any run: what it is, and the device speed its plans assumed."""
    from neuroflux.planner.budget import parse_bytes

    return {
        "name": cell.name,
        "model": cell.model,
        "budget": cell.budget,
        "epochs": cell.epochs,
        "limit": cell.limit,
        "datasets": cell.datasets,
        "budget_bytes": parse_bytes(cell.budget),
        "speed_profile": _speed_profile(plans),
        "numerics": _numerics(plans),
        "runs": {},
    }


def _numerics(plans: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each plan's precision and activation layout (a variant may change either)."""
    from neuroflux.schemas import load_plan

    out: dict[str, dict[str, Any]] = {}
    for label, plan in plans.items():
        if isinstance(plan, Path):
            r = load_plan(plan).recipe
            out[label] = {"precision": r.precision, "memory_format": r.memory_format}
    return out


def _speed_profile(plans: dict[str, Any]) -> dict[str, Any] | None:
    """The device speed the cell's plans assumed (the cost model's throughput, per-op overhead and
    bandwidth, and where they came from): plans of the same cell made on two machines differ in their
    batches when these do."""
    from neuroflux.schemas import load_plan

    for plan in plans.values():
        if isinstance(plan, Path):
            p = load_plan(plan).profile
            return {
                "cost_source": p.cost_source,
                "device_flops_per_s": p.device_flops_per_s,
                "op_overhead_s": p.op_overhead_s,
                "device_bandwidth_bytes_per_s": p.device_bandwidth_bytes_per_s,
                "device_speed_source": p.device_speed_source,
            }
    return None


def _as_bp(plan_path: Path) -> bool:
    """Whether the plan's budget-optimal checkpointing is plain BP (no unit recomputed, BP's batch)."""
    from neuroflux.schemas import load_plan

    bl = load_plan(plan_path).baseline
    ck = bl.bp_checkpoint
    return ck.checkpointed_units == [] and ck.batch_size == bl.bp.batch_size and ck.fits


def _planned_only(result: dict[str, Any], plans: dict[str, Any]) -> dict[str, Any]:
    """A cell planned, not run: its plans must load, on this torch."""
    from neuroflux.schemas import load_plan

    result["planned_only"] = True
    for plan in plans.values():
        if not isinstance(plan, Exception):
            load_plan(plan)
    result["plans"] = {k: str(v) for k, v in plans.items()}
    return result


def run_folder(label: str) -> str:
    """A run's folder name in its cell: the label with anything but letters, digits, - and _ as -."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in label).strip("-")


def run_bench(
    *,
    cells: list[Cell],
    out: Path,
    opts: BenchOptions,
    log=print,
    results_dir: Path | None = None,
) -> dict[str, Any]:
    """Run ``cells`` in order; ``results.json`` and ``results.md`` in
    ``results_dir`` (default ``out``) are rewritten after every method, so an
    interrupted run keeps what it measured, and cells from earlier
    invocations there are kept."""
    res_dir = results_dir or out
    path = res_dir / "results.json"
    previous = json.loads(path.read_text())["cells"] if path.is_file() else []
    done = {c["name"]: c for c in previous if "name" in c}
    results: dict[str, Any] = {}
    for cell in cells:
        with restored_env(DATA_ENV, LIMIT_ENV):
            if cell.data == "fashion_mnist":
                data = shared_data_path()
                if not data.is_file():
                    raise NeuroFluxError(
                        f"cell {cell.name} needs the full Fashion-MNIST file, not found at {data}; "
                        f"set {DATA_ENV} or pass --data"
                    )
                os.environ[DATA_ENV] = str(data.resolve())
            limit = os.environ.get(DRY_LIMIT_ENV) or cell.limit
            if limit:
                os.environ[LIMIT_ENV] = limit
            else:
                os.environ.pop(LIMIT_ENV, None)
            save = functools.partial(
                save_results,
                done=done,
                res_dir=res_dir,
                run_device=opts.device,
                data_name=_portable(os.environ.get(DATA_ENV, "shipped subset")),
            )
            results = save(run_cell(cell, out=out, opts=opts, log=log, on_run=save))
    return results


def _portable(path: str) -> str:
    """A path as results files record it: relative to the repository where
    it can be (``../shared/data/...``), so results name no machine's layout."""
    p = Path(path)
    if not p.is_absolute():
        return path
    try:
        return os.path.relpath(p, ROOT)
    except ValueError:  # another drive on Windows
        return path
