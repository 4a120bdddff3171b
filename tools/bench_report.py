"""What ``nf-bench`` reports: time to a target accuracy, each cell's targets and ratios against BP, and
``results.json`` with its table, ``results.md``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["compare_runs", "markdown", "save_results", "time_to_target"]


def time_to_target(metrics: list[dict[str, Any]], target: float) -> float | None:
    """Seconds of training until a val accuracy >= target was first reached
    (NeuroFlux: after the block whose exit reached it, or after the polish
    that raised it there; BP: after the epoch)."""
    for rec in metrics:
        if rec["event"] == "block" and max(rec["exit_accuracies"].values()) >= target:
            return rec["elapsed_s"]
        if rec["event"] == "epoch" and rec.get("val_acc", -1) >= target:
            return rec["elapsed_s"]
        if rec["event"] == "polish" and rec["kept"] and rec["accuracy_after"] >= target:
            return rec["elapsed_s"]
    return None


def compare_runs(cell: dict[str, Any], target: float | None) -> None:
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
    _strongest(cell, ok)
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


def _strongest(cell: dict[str, Any], ok: dict[str, Any]) -> None:
    """The strongest baseline (the most accurate; the faster on a tie) and
    each NeuroFlux run's speed-up to its final accuracy minus one point,
    against that baseline's own time to it."""
    base = {m: v for m, v in ok.items() if m.startswith("bp") and "metrics" in v}
    if not base:
        return
    name = max(base, key=lambda m: (base[m]["final_accuracy"], -base[m]["wall_time_s"]))
    target = base[name]["final_accuracy"] - 0.01
    ref = time_to_target(base[name]["metrics"], target)
    cell["strongest_baseline"], cell["strongest_target_accuracy"] = name, target
    cell["strongest_time_to_target_s"] = ref
    for m, v in ok.items():
        if m.startswith("neuroflux") and "metrics" in v:
            t = time_to_target(v["metrics"], target)
            v["time_to_strongest_target_s"] = t
            v["speedup_vs_strongest_to_target"] = ref / t if ref and t else None


def save_results(
    cell_result: dict[str, Any], *, done: dict[str, Any], res_dir: Path, run_device: str, data_name: str
) -> dict[str, Any]:
    """Record ``cell_result`` (whole or partial) in ``done`` and rewrite
    ``results.json`` and ``results.md`` with every cell so far (the runs
    ran on ``run_device``: cpu or cuda)."""
    import torch

    done[cell_result["name"]] = {**cell_result, "data": data_name}
    device = (
        torch.cuda.get_device_name(0)
        if run_device == "cuda"
        else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    results = {
        "device": device,
        "torch": torch.__version__,
        "command": shlex.join(["nf-bench", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cells": list(done.values()),
    }
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (res_dir / "results.md").write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    """``results.md`` (and what ``nf-bench`` prints): one table per cell, one row per method."""
    lines = [f"Device: {results['device']}; torch {results['torch']}", f"Command: `{results['command']}`", ""]
    for c in results["cells"]:
        if c.get("planned_only"):
            lines += [f"#### {c['name']}: planned only ({', '.join(c.get('plans', {}))})", ""]
            continue
        data = Path(c.get("data") or "shipped subset").name + (
            f", first {c['limit']} (train,val)" if c.get("limit") else ""
        )
        target = "-" if c.get("target_accuracy") is None else f"{c['target_accuracy']:.4f} ({c.get('target_rule', '')})"
        lines += [
            f"#### {c['name']}: {c['model']} @ {c['budget']}, {c['epochs']} epochs per block / BP epochs; "
            f"data: {data}; target {target}",
            "",
            "| method | batch | val acc | vs BP | wall s | to target s | speed-up vs BP (wall / to target) | "
            "peak measured / predicted MiB | final params | param. reduction | inference gain | stopped at |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m, v in c["runs"].items():
            if "error" in v:
                lines.append(f"| {m} | - | - | - | - | - | - | {v['error'][:80]} | - | - | - | - |")
                continue
            sp = (
                "-"
                if m == "bp" or "speedup_vs_bp_wall" not in v  # BP itself, or a cell without BP
                else f"{v['speedup_vs_bp_wall']:.2f}x / "
                + (f"{v['speedup_vs_bp_to_target']:.2f}x" if v.get("speedup_vs_bp_to_target") else "never")
            )
            tt = f"{v['time_to_target_s']:.0f}" if v.get("time_to_target_s") else "never"
            delta = "-" if "accuracy_delta_vs_bp" not in v else f"{100 * v['accuracy_delta_vs_bp']:+.2f} pt"
            stop = "-"
            if m.startswith("neuroflux"):
                ran = v.get("epochs_run") or {}
                stop = (
                    f"{v.get('stopped_at_unit')} ({v['blocks']}/{v['planned_blocks']} blocks; epochs "
                    f"{'/'.join(str(e) for e in ran.values())})"
                )
            lines.append(
                f"| {m} | {','.join(map(str, v['batch_sizes']))} | {v['final_accuracy']:.4f} | {delta} | "
                f"{v['wall_time_s']:.0f} | {tt} | {sp} | {v['measured_peak_bytes'] / 2**20:.1f} / "
                f"{v['predicted_peak_bytes'] / 2**20:.1f} | {v['final_params']:,} | {v['param_reduction']:.1f}x | "
                f"{v['throughput_gain']:.2f}x | {stop} |"
            )
        lines += _strongest_lines(c) + _compile_lines(c)
        lines.append("")
    return "\n".join(lines)


def _strongest_lines(c: dict[str, Any]) -> list[str]:
    """The cell's verdict against its strongest baseline, one line per NeuroFlux run."""
    name = c.get("strongest_baseline")
    if name is None:
        return []
    ref = c.get("strongest_time_to_target_s")
    out = [
        "",
        f"Strongest baseline: {name}, final {c['strongest_target_accuracy'] + 0.01:.4f}; its final minus one point "
        f"reached in {f'{ref:.0f} s' if ref else 'never'} by it.",
    ]
    for m, v in c["runs"].items():
        if m.startswith("neuroflux") and "error" not in v:
            t, sp = v.get("time_to_strongest_target_s"), v.get("speedup_vs_strongest_to_target")
            out.append(f"- {m}: {f'{t:.0f} s, {sp:.2f}x sooner' if t and sp else 'never reached it'}")
    return out


def _compile_lines(c: dict[str, Any]) -> list[str]:
    """What bp-compile's search chose and what it cost (inside its wall time)."""
    v = c["runs"].get("bp-compile") or {}
    rec = v.get("compile")
    if not rec:
        return []
    fits = sum(p["fits"] for p in rec["probes"])
    return [
        "",
        f"bp-compile: activation_memory_budget {rec['ratio']:g} at batch {rec['batch_size']} "
        f"({rec['peak_bytes'] / 2**20:.1f} MiB measured), chosen from {len(rec['probes'])} probes ({fits} fit); "
        f"the search took {rec['search_s']:.0f} s of its wall time, {rec['compile_s']:.0f} s of it compiling.",
    ]
