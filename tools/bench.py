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
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from neuroflux.errors import NeuroFluxError

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


def _run_one(plan_path: Path, method: str, out: Path, device: str) -> dict[str, Any]:
    from neuroflux.runtime.runner import RunConfig, run_plan
    from neuroflux.schemas import load_plan

    plan = load_plan(plan_path)
    runtime_method = "neuroflux" if method.startswith("neuroflux") else method
    s = run_plan(plan, plan_path, RunConfig(out_dir=out, method=runtime_method, device=device, export_onnx=False))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": s, "metrics": metrics, "plan": plan}


def run_bench(*, models: list[str], budgets: list[str], methods: list[str], epochs: int, out: Path, device: str,
              target: float | None, time_limit: float, datasets: str = "datasets", log=print) -> dict[str, Any]:  # noqa: ANN001
    import torch

    from neuroflux.planner.budget import parse_bytes
    from neuroflux.planner.build import PlanConfig, make_plan
    from neuroflux.schemas import save_plan

    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cells = []
    for model in models:
        for budget in budgets:
            cell_dir = out / f"{Path(model.split(':')[0]).stem}-{budget}"
            cell: dict[str, Any] = {"model": model, "budget": budget, "budget_bytes": parse_bytes(budget), "runs": {}}
            plans = {}
            for strategy in ("optimal", "greedy"):
                if strategy == "greedy" and "neuroflux-greedy" not in methods:
                    continue
                cfg = PlanConfig(budget_bytes=parse_bytes(budget), budget_text=budget, device_kind=dev,
                                 device_name=torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", strategy=strategy,
                                 epochs=epochs, time_limit_s=time_limit, datasets=datasets)
                try:
                    res = make_plan(_model_path(model), cfg, plan_dir=cell_dir)
                except NeuroFluxError as e:
                    log(f"[{model} @ {budget}] {strategy} plan: {e}")
                    cell["runs"]["neuroflux" if strategy == "optimal" else "neuroflux-greedy"] = {"error": str(e)}
                    continue
                path = cell_dir / f"plan-{strategy}.json"
                save_plan(res.plan, path)
                plans[strategy] = path
            for method in methods:
                strategy = "greedy" if method == "neuroflux-greedy" else "optimal"
                if strategy not in plans:
                    continue
                run_dir = cell_dir / method
                if run_dir.exists():
                    import shutil

                    shutil.rmtree(run_dir)
                log(f"[{model} @ {budget}] {method} ...")
                try:
                    r = _run_one(plans[strategy], method, run_dir, dev)
                except NeuroFluxError as e:
                    cell["runs"][method] = {"error": str(e)}
                    log(f"  {method}: {e}")
                    continue
                s, plan = r["summary"], r["plan"]
                cell["runs"][method] = {
                    "final_accuracy": s["final_accuracy"], "final_exit": s["final_exit"],
                    "wall_time_s": s["wall_time_s"], "train_time_s": s["train_time_s"],
                    "measured_peak_bytes": max(b["measured_peak_bytes"] for b in s["blocks"]),
                    "predicted_peak_bytes": max(b["predicted_peak_bytes"] for b in s["blocks"]),
                    "final_params": s["final_params"], "original_params": s["original_params"],
                    "throughput_final": s["throughput"]["final_images_per_s"],
                    "throughput_original": s["throughput"]["original_images_per_s"],
                    "batch_sizes": [b["batch_size"] for b in s["blocks"]], "blocks": len(s["blocks"]),
                    "stopped_early": s["stopped_early"], "predicted_time_s": plan.predicted.time_s if method.startswith("neuroflux")
                    else getattr(plan.baseline, method.replace("-", "_")).predicted_time_s,
                    "metrics": r["metrics"],
                }
                log(f"  acc {s['final_accuracy']:.4f}, {s['wall_time_s']:.1f} s, exit {s['final_exit']}")
            ok = {m: v for m, v in cell["runs"].items() if "error" not in v}
            cell_target = target if target is not None else (min(v["final_accuracy"] for v in ok.values()) if ok else None)
            cell["target_accuracy"] = cell_target
            for v in ok.values():
                v["time_to_target_s"] = time_to_target(v.pop("metrics"), cell_target) if cell_target is not None else None
            bp = ok.get("bp")
            for m, v in ok.items():
                if bp and m != "bp":
                    v["speedup_vs_bp_wall"] = bp["wall_time_s"] / v["wall_time_s"]
                    if bp.get("time_to_target_s") and v.get("time_to_target_s"):
                        v["speedup_vs_bp_to_target"] = bp["time_to_target_s"] / v["time_to_target_s"]
                    v["accuracy_delta_vs_bp"] = v["final_accuracy"] - bp["final_accuracy"]
                v["param_reduction"] = v["original_params"] / v["final_params"]
                v["throughput_gain"] = v["throughput_final"] / v["throughput_original"]
            cells.append(cell)
    return {
        "device": torch.cuda.get_device_name(0) if dev == "cuda" else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "torch": torch.__version__, "command": shlex.join(["nf-bench", *sys.argv[1:]]),
        "data": os.environ.get("NEUROFLUX_DATA", "shipped subset"), "limit": os.environ.get("NEUROFLUX_LIMIT"),
        "datasets": datasets, "epochs": epochs, "date": time.strftime("%Y-%m-%d %H:%M"), "cells": cells,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Device: {results['device']}; torch {results['torch']}; data: {results['data']}"
             + (f" (first {results['limit']} samples)" if results["limit"] else "") + f"; epochs per block / BP epochs: {results['epochs']}",
             f"Command: `{results['command']}`", "",
             "| model | budget | method | batch | val acc | wall s | to target s | speed-up vs BP (wall / to target) | "
             "peak measured / predicted MiB | final params | param. reduction | inference gain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cells"]:
        for m in METHODS:
            v = c["runs"].get(m)
            if v is None:
                continue
            name = Path(c["model"].split(":")[0]).stem
            if "error" in v:
                lines.append(f"| {name} | {c['budget']} | {m} | - | - | - | - | - | {v['error'][:80]} | - | - | - |")
                continue
            sp = "-" if m == "bp" else f"{v.get('speedup_vs_bp_wall', float('nan')):.2f}x / " + (
                f"{v['speedup_vs_bp_to_target']:.2f}x" if v.get("speedup_vs_bp_to_target") else "-")
            tt = f"{v['time_to_target_s']:.0f}" if v.get("time_to_target_s") else "-"
            lines.append(
                f"| {name} | {c['budget']} | {m} | {','.join(map(str, v['batch_sizes']))} | {v['final_accuracy']:.4f} | "
                f"{v['wall_time_s']:.0f} | {tt} | {sp} | {v['measured_peak_bytes'] / 2**20:.1f} / "
                f"{v['predicted_peak_bytes'] / 2**20:.1f} | {v['final_params']:,} | {v['param_reduction']:.1f}x | "
                f"{v['throughput_gain']:.2f}x |")
    lines.append("")
    lines.append("Target accuracy per cell (time to target): " + "; ".join(
        f"{Path(c['model'].split(':')[0]).stem} @ {c['budget']}: {c['target_accuracy']:.4f}" for c in results["cells"]
        if c["target_accuracy"] is not None))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nf-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["small_cnn"], help="zoo names or model files (name:factory)")
    ap.add_argument("--budgets", nargs="+", default=None, help="default: 16MB (smoke: 40MB)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--data", default=None, help="Fashion-MNIST .npz (sets NEUROFLUX_DATA)")
    ap.add_argument("--limit", default=None, help="TRAIN[,VAL]: first samples only (sets NEUROFLUX_LIMIT)")
    ap.add_argument("--target", type=float, default=None,
                    help="target val accuracy for time-to-target (default: the lowest final accuracy in the cell)")
    ap.add_argument("--datasets", default="datasets",
                    help="datasets function of every model file (e.g. datasets_imagenet: synthetic, throughput only)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--smoke", action="store_true", help="tiny CI configuration: checks the harness, not speed")
    args = ap.parse_args(argv)
    if args.smoke:  # explicit flags still win
        args.models, args.epochs, args.limit = ["small_cnn"], 1, args.limit or "512,128"
        args.budgets = args.budgets or ["40MB"]
    args.budgets = args.budgets or ["16MB"]
    if args.data and not Path(args.data).is_file():
        print(f"nf-bench: error: --data {args.data} not found", file=sys.stderr)
        return 2
    saved = {k: os.environ.get(k) for k in ("NEUROFLUX_DATA", "NEUROFLUX_LIMIT")}
    try:
        if args.data:
            os.environ["NEUROFLUX_DATA"] = str(Path(args.data).resolve())
        if args.limit:
            os.environ["NEUROFLUX_LIMIT"] = args.limit
        return _main(args)
    finally:  # callers (tests, notebooks) get their environment back
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        results = run_bench(models=args.models, budgets=args.budgets, methods=args.methods, epochs=args.epochs, out=out,
                            device=args.device, target=args.target, time_limit=args.time_limit, datasets=args.datasets,
                            log=lambda m: print(m, file=sys.stderr, flush=True))
    except NeuroFluxError as e:
        print(f"nf-bench: error: {e}", file=sys.stderr)
        return 2
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
