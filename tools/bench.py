"""``nf-bench``: NeuroFlux against BP and BP with checkpointing, side by side.

For every model x budget it plans once with CP-SAT and once greedily, then
trains ``neuroflux``, ``neuroflux-greedy``, ``bp`` and ``bp-checkpoint`` on the
same data, seed and epochs, in this one process, and writes ``results.json``
and ``results.md``. Ratios are computed only between runs of one invocation.

    nf-bench --models small_cnn resnet18 --budgets 16MB 250MB --epochs 2 \\
        --data ../shared/data/fashion_mnist.npz --out bench-out
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.datasets import DATA_ENV, LIMIT_ENV

#: Dry runs: overrides every cell's data limit (tiny data, one step per epoch).
DRY_LIMIT_ENV = "NEUROFLUX_DRY_LIMIT"

__all__ = ["main", "run_bench", "time_to_target"]

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("neuroflux", "neuroflux-greedy", "bp", "bp-checkpoint")


def _model_path(name: str) -> str:
    path, _, factory = name.partition(":")
    if not path.endswith(".py"):
        path = str(ROOT / "examples" / f"{path}.py")
    return f"{path}:{factory}" if factory else path


def time_to_target(metrics: list[dict[str, Any]], target: float) -> float | None:
    """Seconds of training until a val accuracy >= target was first reached
    (NeuroFlux: after the block whose exit reached it; BP: after the epoch)."""
    for rec in metrics:
        if rec["event"] == "block" and max(rec["exit_accuracies"].values()) >= target:
            return rec["elapsed_s"]
        if rec["event"] == "epoch" and rec.get("val_acc", -1) >= target:
            return rec["elapsed_s"]
    return None


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One benchmark cell: a model at a budget, every method side by side."""

    name: str
    model: str
    budget: str
    epochs: int
    methods: tuple[str, ...] = METHODS
    limit: str | None = None
    """TRAIN[,VAL]: first samples only."""
    datasets: str = "datasets"
    data: str | None = "fashion_mnist"
    """``fashion_mnist``: the full shared file; None: what the model file loads by default."""
    variants: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    """Extra NeuroFlux runs (ablation): (label, PlanConfig option overrides)."""


#: The ablation: what each lever of issue 8 buys, on the same cell.
ABLATION = (
    ("old heads, fixed depth", (("head_kind", "conv"), ("tie_tolerance", 0.01), ("patience", 0), ("epoch_patience", 0),
                                ("max_block_units", None))),
    ("new heads, fixed depth", (("patience", 0), ("epoch_patience", 0), ("max_block_units", None))),
)

_GPU_METHODS = ("neuroflux", "bp", "bp-checkpoint")
PRESETS: dict[str, tuple[Cell, ...]] = {
    # CPU (2 cores): half-width models on the first 20,000 training images.
    "cpu": (
        Cell(name="resnet18-half-80MB", model="resnet18:model_half", budget="80MB", epochs=3, limit="20000,10000",
             variants=ABLATION),
        Cell(name="vgg11-half-40MB", model="vgg11:model_half", budget="40MB", epochs=3, limit="20000,10000"),
        Cell(name="resnet18-half-400MB", model="resnet18:model_half", budget="400MB", epochs=3, limit="20000,10000"),
    ),
    # GPU: full-width models on all of Fashion-MNIST, stringent (BP fits batch 16 or less) and loose budgets;
    # neuroflux-greedy is left out to keep every cell well under 10 minutes on one H100.
    "gpu": (
        Cell(name="resnet18-350MB", model="resnet18", budget="350MB", epochs=3, methods=_GPU_METHODS),
        Cell(name="vgg16-350MB", model="vgg16", budget="350MB", epochs=3, methods=_GPU_METHODS),
        Cell(name="resnet34-imagenet-8GB", model="resnet34:model_imagenet", budget="8GB", epochs=1,
             datasets="datasets_imagenet", data=None, methods=_GPU_METHODS),
        Cell(name="resnet18-2GB", model="resnet18", budget="2GB", epochs=3, methods=_GPU_METHODS),
        Cell(name="vgg16-2GB", model="vgg16", budget="2GB", epochs=3, methods=_GPU_METHODS),
    ),
    # CI: checks the harness, not speed.
    "smoke": (Cell(name="small_cnn-40MB", model="small_cnn", budget="40MB", epochs=1, limit="512,128", data=None),),
}


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    device: str = "cpu"
    """Where the runs execute (resolved: cpu or cuda)."""
    target: float | None = None
    time_limit: float = 30.0
    plan_device: str | None = None
    """Device kind the plans target (default: ``device``)."""
    device_profile: str | None = None
    """Device profile for the FLOP cost model (plans made ahead for a GPU)."""
    plans: Path | None = None
    """Read ``<plans>/<cell>/plans.json`` made by an earlier ``--plan-only`` run instead of planning."""
    plan_only: bool = False
    max_steps: int | None = None
    """Dry runs: cut every epoch after this many steps."""
    skip_runs: tuple[str, ...] = ()
    """Cells planned and loaded but not trained (dry runs of cells too heavy for a CPU)."""


@contextlib.contextmanager
def _restored_env(*keys: str) -> Iterator[None]:
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
    runtime_method = "neuroflux" if method.startswith("neuroflux") else method
    s = run_plan(plan, plan_path, RunConfig(out_dir=out, method=runtime_method, device=opts.device, export_onnx=False,
                                            max_steps_per_epoch=opts.max_steps,
                                            command=f"nf-bench ({method} of {plan_path.name})",
                                            throughput_batch=8 if opts.max_steps is not None else None))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": s, "metrics": metrics, "plan": plan}


def _plan_cell(cell: Cell, cell_dir: Path, opts: BenchOptions, log) -> dict[str, Any]:  # noqa: ANN001
    """Plans for the cell: optimal, greedy and each ablation variant; label ->
    path or error. Written with an index, ``plans.json``, that ``--plans`` reads."""
    if opts.plans is not None:
        index_path = opts.plans / cell.name / "plans.json"
        if not index_path.is_file():
            raise NeuroFluxError(f"no prepared plans for cell {cell.name} in {opts.plans}; run nf-bench --plan-only first")
        try:
            index = json.loads(index_path.read_text())
            if not isinstance(index, dict) or not all(isinstance(v, str) for v in index.values()):
                raise ValueError("not an object of label -> plan file")
        except (ValueError, UnicodeDecodeError) as e:
            raise NeuroFluxError(f"{index_path} is not a plans index ({str(e).splitlines()[0][:120]}); make it again "
                                 "with nf-bench --plan-only") from None
        return {label: (index_path.parent / v if not v.startswith("error:") else NeuroFluxError(v[6:]))
                for label, v in index.items()}
    from neuroflux.planner.budget import parse_bytes
    from neuroflux.planner.build import make_plan_shared
    from neuroflux.planner.config import PlanConfig
    from neuroflux.schemas import save_plan

    wanted = [("neuroflux", "optimal", ())]
    if "neuroflux-greedy" in cell.methods:
        wanted.append(("neuroflux-greedy", "greedy", ()))
    wanted += [(f"neuroflux ({label})", "optimal", overrides) for label, overrides in cell.variants]
    kind = opts.plan_device or opts.device
    plans: dict[str, Any] = {}
    index: dict[str, str] = {}
    for i, (label, strategy, overrides) in enumerate(wanted):
        cfg = PlanConfig.from_options(budget_bytes=parse_bytes(cell.budget), budget_text=cell.budget, device_kind=kind,
                                      device_name=_device_name(kind, opts), strategy=strategy, epochs=cell.epochs,
                                      time_limit_s=opts.time_limit, datasets=cell.datasets,
                                      device_profile=opts.device_profile, **dict(overrides))
        try:
            res = make_plan_shared(_model_path(cell.model), cfg, plan_dir=cell_dir, profiles=_PROFILES)
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
        "final_accuracy": s["final_accuracy"], "final_exit": s["final_exit"],
        "wall_time_s": s["wall_time_s"], "train_time_s": s["train_time_s"],
        "measured_peak_bytes": max(b["measured_peak_bytes"] for b in s["blocks"]),
        "predicted_peak_bytes": max(b["predicted_peak_bytes"] for b in s["blocks"]),
        "final_params": s["final_params"], "original_params": s["original_params"],
        "throughput_final": s["throughput"]["final_images_per_s"],
        "throughput_original": s["throughput"]["original_images_per_s"],
        "batch_sizes": [b["batch_size"] for b in s["blocks"]], "blocks": len(s["blocks"]),
        "planned_blocks": len(plan.blocks), "heads": sorted({u.aux.kind for u in plan.units if u.aux is not None}),
        "stopped_early": s["stopped_early"], "stopped_at_unit": st.get("stopped_at_unit"),
        "epochs_run": st.get("epochs_run"), "saved_estimated_s": st.get("saved_estimated_s"),
        "exit_accuracies": s["exit_accuracies"],
        "predicted_time_s": plan.predicted.time_s if method.startswith("neuroflux")
        else getattr(plan.baseline, method.replace("-", "_")).predicted_time_s,
        "metrics": r["metrics"],
    }


def run_cell(cell: Cell, *, out: Path, opts: BenchOptions, log=print,  # noqa: ANN001
             on_run: Callable[[dict[str, Any]], object] | None = None) -> dict[str, Any]:
    """Plan and run every method of ``cell``; ratios only within the cell.
    ``on_run`` gets the partial cell after every method, so a run cut off
    mid-cell (a device's time limit) keeps the methods it finished."""
    import shutil

    from neuroflux.planner.budget import parse_bytes

    cell_dir = out / cell.name
    result: dict[str, Any] = {"name": cell.name, "model": cell.model, "budget": cell.budget, "epochs": cell.epochs,
                              "limit": cell.limit, "datasets": cell.datasets, "budget_bytes": parse_bytes(cell.budget),
                              "runs": {}}
    plans = _plan_cell(cell, cell_dir, opts, log)
    if opts.plan_only or cell.name in opts.skip_runs:
        result["planned_only"] = True
        for label, plan in plans.items():  # prepared plans must load, on this torch
            if not isinstance(plan, Exception):
                from neuroflux.schemas import load_plan

                load_plan(plan)
        result["plans"] = {k: str(v) for k, v in plans.items()}
        return result
    labels = [m for m in cell.methods if m != "neuroflux-greedy" or "neuroflux-greedy" in plans]
    labels += [f"neuroflux ({label})" for label, _ in cell.variants]
    for label in labels:
        plan = plans.get(label if label.startswith("neuroflux") else "neuroflux")
        if isinstance(plan, Exception) or plan is None:
            result["runs"][label] = {"error": str(plan)}
            continue
        run_dir = cell_dir / _slug(label)
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
            _compare(partial, opts.target)
            on_run(partial)
    _compare(result, opts.target)
    return result


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in label).strip("-")


def _compare(cell: dict[str, Any], target: float | None) -> None:
    """Targets and ratios. The default target is BP's final accuracy minus
    one point (the lowest final accuracy in the cell where BP did not run)."""
    ok = {m: v for m, v in cell["runs"].items() if "error" not in v}
    bp = ok.get("bp")
    if target is not None:
        cell_target, rule = target, "given"
    elif bp is not None:
        cell_target, rule = bp["final_accuracy"] - 0.01, "BP final - 1 point"
    elif ok:
        cell_target, rule = min(v["final_accuracy"] for v in ok.values()), "lowest final accuracy in the cell"
    else:
        cell_target, rule = None, "none"
    cell["target_accuracy"], cell["target_rule"] = cell_target, rule
    for v in ok.values():
        v["time_to_target_s"] = time_to_target(v.pop("metrics"), cell_target) if cell_target is not None else None
    for m, v in ok.items():
        if bp and m != "bp":
            v["speedup_vs_bp_wall"] = bp["wall_time_s"] / v["wall_time_s"]
            if bp.get("time_to_target_s") and v.get("time_to_target_s"):
                v["speedup_vs_bp_to_target"] = bp["time_to_target_s"] / v["time_to_target_s"]
            v["accuracy_delta_vs_bp"] = v["final_accuracy"] - bp["final_accuracy"]
        v["param_reduction"] = v["original_params"] / v["final_params"]
        v["throughput_gain"] = v["throughput_final"] / v["throughput_original"]


def run_bench(*, cells: list[Cell], out: Path, opts: BenchOptions, log=print,  # noqa: ANN001
              results_dir: Path | None = None) -> dict[str, Any]:
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
        with _restored_env(DATA_ENV, LIMIT_ENV):
            if cell.data == "fashion_mnist":
                data = shared_data_path()
                if not data.is_file():
                    raise NeuroFluxError(f"cell {cell.name} needs the full Fashion-MNIST file, not found at {data}; "
                                         f"set {DATA_ENV} or pass --data")
                os.environ[DATA_ENV] = str(data.resolve())
            limit = os.environ.get(DRY_LIMIT_ENV) or cell.limit
            if limit:
                os.environ[LIMIT_ENV] = limit
            else:
                os.environ.pop(LIMIT_ENV, None)
            save = functools.partial(_save_results, done, res_dir, opts, _portable(os.environ.get(DATA_ENV, "shipped subset")))
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


def _save_results(done: dict[str, Any], res_dir: Path, opts: BenchOptions, data_name: str,
                  cell_result: dict[str, Any]) -> dict[str, Any]:
    """Record ``cell_result`` (whole or partial) in ``done`` and rewrite
    ``results.json`` and ``results.md`` with every cell so far."""
    import torch

    done[cell_result["name"]] = {**cell_result, "data": data_name}
    device = torch.cuda.get_device_name(0) if opts.device == "cuda" else \
        f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    results = {"device": device, "torch": torch.__version__, "command": shlex.join(["nf-bench", *sys.argv[1:]]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "cells": list(done.values())}
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (res_dir / "results.md").write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Device: {results['device']}; torch {results['torch']}", f"Command: `{results['command']}`", ""]
    for c in results["cells"]:
        if c.get("planned_only"):
            lines += [f"#### {c['name']}: planned only ({', '.join(c.get('plans', {}))})", ""]
            continue
        data = Path(c.get("data") or "shipped subset").name + (f", first {c['limit']} (train,val)" if c.get("limit") else "")
        target = "-" if c.get("target_accuracy") is None else f"{c['target_accuracy']:.4f} ({c.get('target_rule', '')})"
        lines += [f"#### {c['name']}: {c['model']} @ {c['budget']}, {c['epochs']} epochs per block / BP epochs; data: {data}; "
                  f"target {target}", "",
                  "| method | batch | val acc | vs BP | wall s | to target s | speed-up vs BP (wall / to target) | "
                  "peak measured / predicted MiB | final params | param. reduction | inference gain | stopped at |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, v in c["runs"].items():
            if "error" in v:
                lines.append(f"| {m} | - | - | - | - | - | - | {v['error'][:80]} | - | - | - | - |")
                continue
            sp = "-" if m == "bp" else f"{v.get('speedup_vs_bp_wall', float('nan')):.2f}x / " + (
                f"{v['speedup_vs_bp_to_target']:.2f}x" if v.get("speedup_vs_bp_to_target") else "never")
            tt = f"{v['time_to_target_s']:.0f}" if v.get("time_to_target_s") else "never"
            delta = "-" if "accuracy_delta_vs_bp" not in v else f"{100 * v['accuracy_delta_vs_bp']:+.2f} pt"
            stop = "-"
            if m.startswith("neuroflux"):
                ran = v.get("epochs_run") or {}
                stop = f"{v.get('stopped_at_unit')} ({v['blocks']}/{v['planned_blocks']} blocks; epochs " \
                       f"{'/'.join(str(e) for e in ran.values())})"
            lines.append(
                f"| {m} | {','.join(map(str, v['batch_sizes']))} | {v['final_accuracy']:.4f} | {delta} | "
                f"{v['wall_time_s']:.0f} | {tt} | {sp} | {v['measured_peak_bytes'] / 2**20:.1f} / "
                f"{v['predicted_peak_bytes'] / 2**20:.1f} | {v['final_params']:,} | {v['param_reduction']:.1f}x | "
                f"{v['throughput_gain']:.2f}x | {stop} |")
        lines.append("")
    return "\n".join(lines)


def resolve_cells(args: argparse.Namespace) -> list[Cell]:
    """The cells one invocation runs: a preset (optionally some of its cells) or the flags."""
    if args.preset:
        cells = list(PRESETS[args.preset])
        if args.cell:
            names = {c.name for c in cells}
            unknown = [n for n in args.cell if n not in names]
            if unknown:
                raise NeuroFluxError(f"preset {args.preset} has no cell {', '.join(unknown)}; its cells: {', '.join(sorted(names))}")
            cells = [c for c in cells if c.name in args.cell]
        return cells
    if args.smoke:  # explicit flags still win
        base = PRESETS["smoke"][0]
        return [Cell(name=f"small_cnn-{b}", model="small_cnn", budget=b, epochs=1, limit=args.limit or base.limit,
                     data=None) for b in (args.budgets or [base.budget])]
    return [Cell(name=f"{Path(m.split(':')[0]).stem}{'-' + m.split(':')[1] if ':' in m else ''}-{b}", model=m, budget=b,
                 epochs=args.epochs, methods=tuple(args.methods), limit=args.limit, datasets=args.datasets,
                 data="fashion_mnist" if args.data else None)
            for m in args.models for b in (args.budgets or ["16MB"])]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nf-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="a prepared matrix: cpu (issue-8 targets and ablation), gpu (each cell < 10 min on one H100), smoke")
    ap.add_argument("--cell", nargs="+", default=None, help="run only these cells of the preset (see --list)")
    ap.add_argument("--list", action="store_true", help="print the preset's cells and exit")
    ap.add_argument("--models", nargs="+", default=["small_cnn"], help="zoo names or model files (name:factory)")
    ap.add_argument("--budgets", nargs="+", default=None, help="default: 16MB (smoke: 40MB)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--data", default=None, help="Fashion-MNIST .npz (sets NEUROFLUX_DATA)")
    ap.add_argument("--limit", default=None, help="TRAIN[,VAL]: first samples only (sets NEUROFLUX_LIMIT)")
    ap.add_argument("--target", type=float, default=None,
                    help="target val accuracy for time-to-target (default: BP's final accuracy minus one point)")
    ap.add_argument("--datasets", default="datasets",
                    help="datasets function of every model file (e.g. datasets_imagenet: synthetic, throughput only)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--results", default=None,
                    help="folder for results.json/results.md (default: --out); rewritten after every method")
    ap.add_argument("--smoke", action="store_true", help="tiny CI configuration: checks the harness, not speed")
    ap.add_argument("--plan-only", action="store_true", help="make the cells' plans (and plans.json indexes) and stop")
    ap.add_argument("--plans", default=None, help="run prepared plans from this --plan-only output, no solver needed")
    ap.add_argument("--plan-device", choices=["cpu", "cuda"], default=None,
                    help="device kind the plans target (default: the run device)")
    ap.add_argument("--device-profile", default=None, help="device profile JSON for planning (e.g. the GPU's)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny data, one step per epoch: checks a matrix before scarce GPU time is spent on it")
    ap.add_argument("--skip-runs", nargs="*", default=[], help="cells to plan and load but not train")
    return ap


def _check_args(args: argparse.Namespace) -> None:
    """Flags that argparse's types cannot check, before any work."""
    from neuroflux.runtime.datasets import parse_limit

    if args.data and not Path(args.data).is_file():
        raise NeuroFluxError(f"--data {args.data} not found")
    if args.limit is not None:
        parse_limit(args.limit, what="--limit")
    if args.epochs < 1:
        raise NeuroFluxError(f"--epochs must be >= 1, got {args.epochs}")
    if not args.time_limit > 0:
        raise NeuroFluxError(f"--time-limit must be > 0, got {args.time_limit}")
    for flag, value in (("--out", args.out), ("--results", args.results)):
        if value is not None and Path(value).exists() and not Path(value).is_dir():
            raise NeuroFluxError(f"{flag} {value} is a file; give a folder")
    if args.plans is not None and not Path(args.plans).is_dir():
        raise NeuroFluxError(f"--plans {args.plans} is not a folder of prepared plans (nf-bench --plan-only --out DIR)")


def main(argv: list[str] | None = None) -> int:
    """0: every run finished; 1: some run failed (its row says why); 2: a usage error."""
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        with _restored_env(DATA_ENV, DRY_LIMIT_ENV):
            results = _main(args)
    except NeuroFluxError as e:
        print(f"nf-bench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"nf-bench: error: {e.strerror or e} ({e.filename or ''}); check --out, --results and --plans",
              file=sys.stderr)
        return 2
    if results is None:
        return 0
    print(markdown(results))
    failed = [f"{c['name']}/{m}" for c in results["cells"] for m, v in c.get("runs", {}).items() if "error" in v]
    if failed:
        print(f"nf-bench: {len(failed)} run(s) failed: {', '.join(failed)} (see the table's notes)", file=sys.stderr)
        return 1
    return 0


def _main(args: argparse.Namespace) -> dict[str, Any] | None:
    """Resolve the cells and run them; None when only listing them."""
    if args.dry_run:
        os.environ[DRY_LIMIT_ENV] = os.environ.get(DRY_LIMIT_ENV) or "64,32"
    cells = resolve_cells(args)
    if args.list:
        for c in cells:
            print(f"{c.name}: {c.model} @ {c.budget}, {c.epochs} epochs, methods {', '.join(c.methods)}"
                  + (f", limit {c.limit}" if c.limit else "") + (f", {len(c.variants)} ablation runs" if c.variants else ""))
        return None
    if args.data:
        os.environ[DATA_ENV] = str(Path(args.data).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    device = "cpu" if args.dry_run else args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise NeuroFluxError("--device cuda but no CUDA device is available; use --device cpu or --dry-run")
    opts = BenchOptions(device=device, target=args.target, time_limit=args.time_limit, plan_device=args.plan_device,
                        device_profile=args.device_profile, plans=Path(args.plans) if args.plans else None,
                        plan_only=args.plan_only, max_steps=1 if args.dry_run else None,
                        skip_runs=tuple(args.skip_runs))
    return run_bench(cells=cells, out=out, opts=opts, log=lambda m: print(m, file=sys.stderr, flush=True),
                     results_dir=Path(args.results) if args.results else None)


if __name__ == "__main__":
    sys.exit(main())
