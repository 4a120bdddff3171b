"""``nf-plan``: plan block-wise training of a model under a memory budget.

Usage::

    nf-plan model.py --budget 1GB -o plan.json          # one plan
    nf-plan model.py:build_net --budget 512MiB --strategy greedy
    nf-plan mypkg.models:resnet18 --input-shape 3,224,224 --train-size 50000 --val-size 10000
    nf-plan model.py --sweep 100MB:2GB:6 -o sweep        # plans at 6 budgets, sweep.json and sweep.html
    nf-plan model.py --device cuda --device-profile gpu.json --budget 8GB

Without ``--budget`` the budget is the free memory NVML reports on GPU 0.
The plan is written as JSON (``nf-run plan.json`` trains it); a table of
its blocks and predicted times goes to the terminal unless ``-q``. Every
flag maps to a ``PlanConfig`` option of the same name (``planner/config.py``);
exit status 2 names what to change.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroflux.common import resolve_device, speed_verdict
from neuroflux.errors import NeuroFluxError
from neuroflux.planner.budget import format_bytes, nvml_free_bytes, parse_bytes
from neuroflux.planner.cli_args import build_parser

if TYPE_CHECKING:
    from neuroflux.planner.config import ConfigError, PlanConfig

__all__ = ["main", "build_parser", "planning_progress", "print_plan", "parse_shape"]


def _device(choice: str) -> tuple[str, str]:
    import torch

    choice = resolve_device(choice)
    if choice == "cuda" and torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name(0)
    return choice, "cpu" if choice == "cpu" else "cuda (not present when planned)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="nf-plan: %(message)s")
    try:
        return _run(args)
    except NeuroFluxError as e:
        print(f"nf-plan: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nf-plan: interrupted; no plan written", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from neuroflux.planner.build import make_plan
    from neuroflux.schemas import save_plan

    kind, name = _device(args.device)
    if args.sweep is not None:
        return _run_sweep(args, kind, name)
    if args.budget is not None:
        budget_bytes, budget_text, source = parse_bytes(args.budget), args.budget, "flag"
    else:
        budget_bytes, gpu = nvml_free_bytes(0)
        budget_text, source, name = f"{budget_bytes} (NVML free on {gpu})", "nvml", gpu
    out = Path(args.output or "plan.json")
    if out.is_dir():
        raise NeuroFluxError(f"-o {out} is a directory; give a file name such as {out / 'plan.json'}")
    _check_writable(out)
    cfg = _config(args, budget_bytes=budget_bytes, budget_text=budget_text, source=source, kind=kind, name=name)
    bar, progress = planning_progress(quiet=args.quiet)
    try:
        result = make_plan(args.model, cfg, plan_dir=out.parent, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    save_plan(result.plan, out)
    if not args.quiet:
        print_plan(result.plan)
    print(f"wrote {out}")
    return 0


def _run_sweep(args: argparse.Namespace, kind: str, name: str) -> int:
    from neuroflux.planner.build import make_plans
    from neuroflux.planner.sweep import parse_sweep, sweep_row, write_sweep
    from neuroflux.schemas import save_plan

    if args.budget is not None:
        raise NeuroFluxError("give either --budget or --sweep, not both")
    budgets = parse_sweep(args.sweep)
    out = Path(args.output or "sweep")
    if out.exists() and not out.is_dir():
        raise NeuroFluxError(f"-o {out} is a file; with --sweep, -o names a folder for the plans")
    out.mkdir(parents=True, exist_ok=True)
    _check_writable(out / "sweep.json")
    cfg = _config(args, budget_bytes=budgets[0][0], budget_text=budgets[0][1], source="flag", kind=kind, name=name)
    bar, progress = planning_progress(quiet=args.quiet)
    try:
        results = make_plans(args.model, cfg, budgets, plan_dir=out, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    rows = []
    for (nbytes, text), res in zip(budgets, results):
        plan_file = None
        if not isinstance(res, Exception):
            plan_file = f"plan-{''.join(c if c.isalnum() or c in '.-' else '_' for c in text)}.json"
            save_plan(res.plan, out / plan_file)
        rows.append(sweep_row(res, text, nbytes, plan_file))
    write_sweep(rows, out, model=Path(args.model.split(":")[0]).name)
    if not args.quiet:
        _print_sweep(rows)
    print(f"wrote {len([r for r in rows if r.plan_file])} plans, sweep.json and sweep.html to {out}")
    return 0 if any(r.plan_file for r in rows) else 2


def _print_sweep(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="NeuroFlux budget sweep (predicted)")
    for col in ("budget", "NeuroFlux", "least", "blocks", "batches", "BP", "BP + ckpt", "vs BP"):
        t.add_column(col, justify="left" if col in ("budget", "batches") else "right")
    for r in rows:
        if r.error:
            t.add_row(r.budget_text, "no plan", "-", "-", "-", "-", "-", "-")
            continue
        bp = f"{r.bp_time_s:.1f} s (b{r.bp_batch})" if r.bp_time_s else "does not fit"
        ck = f"{r.bp_checkpoint_time_s:.1f} s (b{r.bp_checkpoint_batch})" if r.bp_checkpoint_time_s else "does not fit"
        verdict = speed_verdict(r.bp_time_s / r.neuroflux_time_s) if r.bp_time_s else "BP cannot train"
        least = f"{r.neuroflux_least_time_s:.1f} s" if r.neuroflux_least_time_s is not None else "-"
        t.add_row(
            r.budget_text,
            f"{r.neuroflux_time_s:.1f} s",
            least,
            str(r.blocks),
            ",".join(map(str, r.batch_sizes or [])),
            bp,
            ck,
            verdict,
        )
    console = Console()
    console.print(t)
    for r in rows:
        if r.error:
            console.print(f"{r.budget_text}: {r.error}")


def planning_progress(*, quiet: bool) -> tuple[Any, Callable[[str, int, int], None]]:
    """A planning progress bar on stderr (None when ``quiet``) and the
    ``progress(description, done, total)`` callback that drives it."""
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=1, desc="planning", unit="job", leave=False, file=sys.stderr, disable=None)

    def progress(desc: str, done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.set_description(desc)
            bar.n = done
            bar.refresh()

    return bar, progress


def _config(
    args: argparse.Namespace, *, budget_bytes: int, budget_text: str, source: str, kind: str, name: str
) -> PlanConfig:
    """The flags as a ``PlanConfig``; its errors reworded with the flags' names."""
    from neuroflux.planner.config import ConfigError, PlanConfig

    cache_budget = parse_bytes(args.cache_budget, what="host budget", allow_zero=True) if args.cache_budget else None
    disk_budget = parse_bytes(args.disk_budget, what="disk budget", allow_zero=True) if args.disk_budget else None
    try:
        return PlanConfig.from_options(
            budget_bytes=budget_bytes,
            budget_text=budget_text,
            budget_source=source,
            device_kind=kind,
            device_name=name,
            strategy=args.strategy,
            epochs=args.epochs,
            min_batch=args.min_batch,
            max_batch=args.max_batch,
            margin=args.margin,
            cache_budget_bytes=cache_budget,
            cache_location=args.cache_location,
            disk_budget_bytes=disk_budget,
            data_mode=args.data_mode,
            cache_dtype=args.cache_dtype,
            precision=args.precision,
            memory_format=args.memory_format,
            polish_epochs=args.polish,
            polish_lr_scale=args.polish_lr_scale,
            max_blocks=args.max_blocks,
            time_limit_s=args.time_limit,
            seed=args.seed,
            cost=args.cost,
            device_profile=args.device_profile,
            device_flops_per_s=args.device_tflops * 1e12 if args.device_tflops else None,
            op_overhead_s=args.op_overhead_us * 1e-6 if args.op_overhead_us is not None else None,
            lr=args.lr,
            patience=args.patience,
            tolerance=args.tolerance,
            prefer=args.prefer,
            train_size=args.train_size,
            epoch_patience=args.epoch_patience,
            max_extra_epochs=args.max_extra_epochs,
            min_reduction=args.min_reduction,
            head_kind=args.head_kind,
            tie_tolerance=args.head_time_tolerance,
            max_block_units=-1 if args.max_block_units is None else (args.max_block_units or None),
            batch_time_tolerance=args.batch_time_tolerance,
            val_size=args.val_size,
            datasets=args.datasets,
            workers=args.workers,
            input_shape=parse_shape(args.input_shape) if args.input_shape else None,
        )
    except ConfigError as e:
        raise NeuroFluxError(_flag_message(e, budget_text=budget_text)) from None


#: Options whose flag is not ``--`` and the option's name with dashes.
_FLAG_OF = {
    "time_limit_s": "--time-limit",
    "tie_tolerance": "--head-time-tolerance",
    "cache_budget_bytes": "--host-budget",
    "disk_budget_bytes": "--disk-budget",
    "device_flops_per_s": "--device-tflops",
    "op_overhead_s": "--op-overhead-us",
    "device_kind": "--device",
    "polish_epochs": "--polish",
}


def _flag_message(e: ConfigError, *, budget_text: str) -> str:
    """A config error as ``nf-plan`` words it: its flags in place of the options."""
    if e.fields == ("max_block_units",):  # the flag says "no limit" with 0
        return f"--max-block-units must be >= 1 (or 0 for no limit), got {e.values['got']}"
    names = {f: _FLAG_OF.get(f, "--" + f.replace("_", "-")) for f in e.fields}
    names["budget_bytes"] = f"--budget {budget_text}"
    return e.worded(names)


def parse_shape(text: str) -> tuple[int, ...]:
    """``3,224,224`` (or ``3x224x224``) -> (3, 224, 224)."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise NeuroFluxError(f"--input-shape {text!r}: give positive sizes separated by commas, e.g. 3,224,224")
    return shape


def print_plan(plan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(
        title=f"NeuroFlux plan: {Path(plan.model.file).name}, budget {plan.device.budget_text} "
        f"({format_bytes(plan.budget_bytes)}), {plan.solver.strategy} ({plan.solver.status})"
    )
    for col in ("block", "units", "input", "batch", "aux heads", "predicted peak / budget", "predicted time", "output"):
        t.add_column(col, justify="right" if col not in ("units", "input", "output") else "left")
    for b in plan.blocks:
        widths = ",".join("model" if plan.unit(u).aux is None else _head_text(plan.unit(u).aux) for u in b.units)
        units = f"{b.units[0]}..{b.units[-1]}" if len(b.units) > 2 else ",".join(b.units)
        t.add_row(
            str(b.index),
            units,
            b.input_text(),
            str(b.batch_size),
            widths,
            f"{format_bytes(b.predicted_peak_bytes)} ({b.predicted_peak_bytes / plan.budget_bytes:.0%})",
            f"{b.predicted_time_s:.1f} s",
            "-" if b.cache is None else f"{b.cache.location} cache {format_bytes(b.cache.bytes)}",
        )
    console.print(t)
    if plan.data is not None:
        d = plan.data
        console.print(
            f"inputs: {d.mode} ({d.reason}); caches hold at most {format_bytes(d.peak_cache_ram_bytes)} of "
            f"RAM (host budget {format_bytes(plan.device.cache_budget_bytes)}) and "
            f"{format_bytes(d.peak_cache_disk_bytes)} of disk (disk budget "
            f"{format_bytes(plan.device.disk_budget_bytes)})"
        )
    bl = plan.baseline

    def line(name: str, b, speedup) -> str:
        if not b.fits:
            return f"{name}: no batch size >= {plan.solver.min_batch_size} fits the budget"
        if not speedup:
            return f"{name}: batch {b.batch_size}"
        verdict = speed_verdict(speedup)
        return f"{name}: batch {b.batch_size}, {b.predicted_time_s:.1f} s predicted -> NeuroFlux {verdict} (predicted)"

    console.print(
        f"NeuroFlux: {plan.predicted.time_s:.1f} s predicted for {plan.recipe.epochs_per_block} "
        f"epochs per block on {plan.recipe.train_size} samples, assuming {plan.predicted.assumes}"
    )
    console.print(line("BP", bl.bp, plan.predicted.speedup_vs_bp))
    recomputed = bl.bp_checkpoint.checkpointed_units
    which = "" if recomputed is None else f" (recomputing {', '.join(recomputed) or 'nothing'})"
    console.print(line(f"BP + checkpointing{which}", bl.bp_checkpoint, plan.predicted.speedup_vs_bp_checkpoint))
    if bl.bp_checkpoint_all is not None:
        t_all = bl.bp_checkpoint_all.predicted_time_s
        console.print(
            line(
                "BP + checkpointing every unit", bl.bp_checkpoint_all, t_all / plan.predicted.time_s if t_all else None
            )
        )


def _check_writable(out: Path) -> None:
    """Fail before planning, not after minutes of it."""
    import os
    import tempfile

    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".nf-plan-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise NeuroFluxError(f"cannot write the plan to {out} ({e.strerror}); choose a writable -o path") from None


def _head_text(aux) -> str:
    return "lin" if aux.kind == "linear" else f"{aux.kind[0]}{aux.width}"


if __name__ == "__main__":
    sys.exit(main())
