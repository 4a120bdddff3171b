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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from neuroflux.errors import NeuroFluxError
from neuroflux.common import resolve_device, speed_verdict
from neuroflux.planner.budget import format_bytes, nvml_free_bytes, parse_bytes
from neuroflux.runtime.heads import HEAD_KINDS

if TYPE_CHECKING:
    from neuroflux.planner.config import ConfigError, PlanConfig

__all__ = ["main", "build_parser", "planning_progress", "print_plan", "parse_shape"]


def _default(name: str) -> Any:
    """A flag's default is PlanConfig's: one source per setting."""
    from neuroflux.planner.config import option_default

    return option_default(name)


def _add_memory_args(ap: argparse.ArgumentParser) -> None:
    """Host RAM, disk and the block boundaries: where activations live between blocks."""
    ap.add_argument("--host-budget", "--cache-budget", dest="cache_budget", default=None,
                    help="host RAM for activation caches (a block's source cache plus the one it writes) and, where "
                    "they fit beside them, the stacked inputs (default: half of this machine's physical RAM)")
    ap.add_argument("--disk-budget", default=None,
                    help="disk for activation caches (default: the free space where the plan is written, less 10%% "
                    "and 1 GiB; give it when the run writes elsewhere)")
    ap.add_argument("--cache-location", choices=["auto", "ram", "disk", "recompute"], default=_default("cache_location"),
                    help="what a block boundary may be: auto (the planner picks RAM cache, disk cache or recompute "
                    "per boundary), ram or disk (that cache, or recompute), recompute (never cache)")
    ap.add_argument("--data-mode", choices=["auto", "stack", "stream"], default=_default("data_mode"),
                    help="inputs stacked in RAM once (fast; per-sample random transforms are drawn once) or streamed "
                    "through DataLoader workers on every pass; auto: stack when they fit the host budget")
    ap.add_argument("--cache-dtype", choices=["float16", "float32"], default=_default("cache_dtype"))


def build_parser() -> argparse.ArgumentParser:
    """``nf-plan``'s flags, in the order ``--help`` lists them."""
    ap = argparse.ArgumentParser(
        prog="nf-plan",
        description="Plan block-wise local-learning training of a CNN under a GPU memory budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("model", help="model file, optionally with a factory (model.py, model.py:build_net), or an installed "
                    "module's factory (mypkg.models:resnet18)")
    ap.add_argument("--budget", help="device memory for training tensors, e.g. 1GB, 512MiB, 1.5G, 1000000000 "
                    "(default: free memory NVML reports on GPU 0)")
    ap.add_argument("-o", "--output", default=None,
                    help="where to write the plan (default plan.json); with --sweep, a folder (default sweep)")
    ap.add_argument("--sweep", default=None, metavar="BUDGETS",
                    help="plan at several budgets instead of --budget, profiling once: a list (100MB,200MB,1GB) or a "
                         "log-spaced range LOW:HIGH:COUNT (100MB:2GB:6); writes one plan per budget, sweep.json and "
                         "sweep.html (predicted time against budget for NeuroFlux, BP and BP with checkpointing)")
    ap.add_argument("--strategy", choices=["optimal", "greedy"], default=_default("strategy"),
                    help="optimal: CP-SAT; greedy: our reconstruction of the paper's heuristic")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="target device kind")
    ap.add_argument("--epochs", type=int, default=_default("epochs"), help="epochs per block (and for the BP baselines)")
    ap.add_argument("--min-batch", type=int, default=_default("min_batch"))
    ap.add_argument("--max-batch", type=int, default=None, help="default: min(512, train size / 32)")
    ap.add_argument("--margin", type=float, default=_default("margin"), help="share of the budget kept free for allocator rounding "
                    "and fragmentation")
    _add_memory_args(ap)
    _add_solver_and_cost_args(ap)
    _add_head_and_exit_args(ap)
    _add_data_args(ap)
    ap.add_argument("--workers", type=int, default=_default("workers"),
                    help="processes that profile units (default 0: every core; the plan is the same for any number)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")
    return ap


def _add_solver_and_cost_args(ap: argparse.ArgumentParser) -> None:
    """The solver's limits and seed, the cost model that times steps, and the base learning rate."""
    ap.add_argument("--max-blocks", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=_default("time_limit_s"), help="CP-SAT seconds per solve phase")
    ap.add_argument("--seed", type=int, default=_default("seed"), help="solver and training seed")
    ap.add_argument("--cost", choices=["flops", "measure"], default=_default("cost"),
                    help="step times from FLOPs and device throughput, or measured real steps")
    ap.add_argument("--device-profile", default=None,
                    help="device profile JSON for --cost flops, e.g. a GPU's measured with `python -m "
                    "neuroflux.planner.device_profile --device cuda -o gpu.json` (default: this machine's, measured "
                    "once and cached, so plans do not change with load)")
    ap.add_argument("--device-tflops", type=float, default=None,
                    help="throughput for --cost flops (overrides the profile)")
    ap.add_argument("--op-overhead-us", type=float, default=None,
                    help="fixed cost per dispatched op for --cost flops (default: measured here); with "
                    "--device-tflops it makes plans independent of this machine's load")
    ap.add_argument("--lr", type=float, default=_default("lr"),
                    help="base learning rate at batch 128 (sqrt-scaled per block)")


def _add_head_and_exit_args(ap: argparse.ArgumentParser) -> None:
    """Aux heads and the accuracy rule; the exit policy and the block length that gives it places to stop."""
    ap.add_argument("--head-kind", choices=list(HEAD_KINDS), default=_default("head_kind"),
                    help="aux head family: pooled (DGL-style: pool to 4x4, 1x1-conv MLP; cheap, so wide) or conv "
                    "(3x3 conv at full resolution)")
    ap.add_argument("--head-time-tolerance", type=float, default=_default("tie_tolerance"),
                    help="accuracy rule for aux heads: take the widest heads whose plan is at most this share slower "
                    "than the fastest (0: least time, narrowest heads)")
    ap.add_argument("--patience", type=int, default=_default("patience"),
                    help="adaptive depth: exits (units) in a row without improvement before training stops "
                    "(0: full depth)")
    ap.add_argument("--epoch-patience", type=int, default=_default("epoch_patience"),
                    help="per-block epochs: epochs without exit improvement before a block moves on "
                    "(0: planned epochs)")
    ap.add_argument("--max-extra-epochs", type=int, default=_default("max_extra_epochs"),
                    help="epochs a still-improving block may add, paid from time that converged blocks saved")
    ap.add_argument("--max-block-units", type=int, default=None,
                    help="longest block in units (default: a third of the units, so adaptive depth has places to "
                    "stop; 0: no limit)")
    ap.add_argument("--tolerance", type=float, default=_default("tolerance"),
                    help="accuracy within which exits count as equal")
    ap.add_argument("--prefer", choices=["shallowest", "best"], default=_default("prefer"),
                    help="exit to keep: the best, or the shallowest within --tolerance of it (smaller, a little less "
                    "accurate)")


def _add_data_args(ap: argparse.ArgumentParser) -> None:
    """The data, where the model file does not give it."""
    ap.add_argument("--input-shape", default=None, metavar="C,H,W",
                    help="one sample's shape, e.g. 3,224,224 (default: the model file's INPUT_SHAPE, else a sample's)")
    ap.add_argument("--train-size", type=int, default=None, help="needed only if the model file has no datasets()")
    ap.add_argument("--val-size", type=int, default=None)
    ap.add_argument("--datasets", default=_default("datasets"), help="name of the datasets function in the model file")


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


def _print_sweep(rows) -> None:  # noqa: ANN001
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
        t.add_row(r.budget_text, f"{r.neuroflux_time_s:.1f} s", least, str(r.blocks),
                  ",".join(map(str, r.batch_sizes or [])), bp, ck, verdict)
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


def _config(args: argparse.Namespace, *, budget_bytes: int, budget_text: str, source: str, kind: str,
            name: str) -> PlanConfig:
    """The flags as a ``PlanConfig``; its errors reworded with the flags' names."""
    from neuroflux.planner.config import ConfigError, PlanConfig

    cache_budget = parse_bytes(args.cache_budget, what="host budget", allow_zero=True) if args.cache_budget else None
    disk_budget = parse_bytes(args.disk_budget, what="disk budget", allow_zero=True) if args.disk_budget else None
    try:
        return PlanConfig.from_options(
            budget_bytes=budget_bytes, budget_text=budget_text, budget_source=source, device_kind=kind,
            device_name=name,
            strategy=args.strategy, epochs=args.epochs, min_batch=args.min_batch, max_batch=args.max_batch,
            margin=args.margin, cache_budget_bytes=cache_budget, cache_location=args.cache_location,
            disk_budget_bytes=disk_budget, data_mode=args.data_mode,
            cache_dtype=args.cache_dtype, max_blocks=args.max_blocks, time_limit_s=args.time_limit, seed=args.seed,
            cost=args.cost, device_profile=args.device_profile,
            device_flops_per_s=args.device_tflops * 1e12 if args.device_tflops else None,
            op_overhead_s=args.op_overhead_us * 1e-6 if args.op_overhead_us is not None else None, lr=args.lr,
            patience=args.patience, tolerance=args.tolerance, prefer=args.prefer, train_size=args.train_size,
            epoch_patience=args.epoch_patience, max_extra_epochs=args.max_extra_epochs, head_kind=args.head_kind,
            tie_tolerance=args.head_time_tolerance,
            max_block_units=-1 if args.max_block_units is None else (args.max_block_units or None),
            val_size=args.val_size, datasets=args.datasets, workers=args.workers,
            input_shape=parse_shape(args.input_shape) if args.input_shape else None,
        )
    except ConfigError as e:
        raise NeuroFluxError(_flag_message(e, budget_text=budget_text)) from None


#: Options whose flag is not ``--`` and the option's name with dashes.
_FLAG_OF = {"time_limit_s": "--time-limit", "tie_tolerance": "--head-time-tolerance",
            "cache_budget_bytes": "--host-budget", "disk_budget_bytes": "--disk-budget",
            "device_flops_per_s": "--device-tflops", "op_overhead_s": "--op-overhead-us", "device_kind": "--device"}


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


def print_plan(plan) -> None:  # noqa: ANN001 - a schemas.Plan
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"NeuroFlux plan: {Path(plan.model.file).name}, budget {plan.device.budget_text} "
              f"({format_bytes(plan.budget_bytes)}), {plan.solver.strategy} ({plan.solver.status})")
    for col in ("block", "units", "input", "batch", "aux heads", "predicted peak / budget", "predicted time", "output"):
        t.add_column(col, justify="right" if col not in ("units", "input", "output") else "left")
    for b in plan.blocks:
        widths = ",".join("model" if plan.unit(u).aux is None else _head_text(plan.unit(u).aux) for u in b.units)
        units = f"{b.units[0]}..{b.units[-1]}" if len(b.units) > 2 else ",".join(b.units)
        t.add_row(str(b.index), units, b.input_text(), str(b.batch_size), widths,
                  f"{format_bytes(b.predicted_peak_bytes)} ({b.predicted_peak_bytes / plan.budget_bytes:.0%})",
                  f"{b.predicted_time_s:.1f} s",
                  "-" if b.cache is None else f"{b.cache.location} cache {format_bytes(b.cache.bytes)}")
    console.print(t)
    if plan.data is not None:
        d = plan.data
        console.print(f"inputs: {d.mode} ({d.reason}); caches hold at most {format_bytes(d.peak_cache_ram_bytes)} of "
                      f"RAM (host budget {format_bytes(plan.device.cache_budget_bytes)}) and "
                      f"{format_bytes(d.peak_cache_disk_bytes)} of disk (disk budget "
                      f"{format_bytes(plan.device.disk_budget_bytes)})")
    bl = plan.baseline

    def line(name: str, b, speedup) -> str:  # noqa: ANN001
        if not b.fits:
            return f"{name}: no batch size >= {plan.solver.min_batch_size} fits the budget"
        if not speedup:
            return f"{name}: batch {b.batch_size}"
        verdict = speed_verdict(speedup)
        return f"{name}: batch {b.batch_size}, {b.predicted_time_s:.1f} s predicted -> NeuroFlux {verdict} (predicted)"

    console.print(f"NeuroFlux: {plan.predicted.time_s:.1f} s predicted for {plan.recipe.epochs_per_block} "
                  f"epochs per block on {plan.recipe.train_size} samples, assuming {plan.predicted.assumes}")
    console.print(line("BP", bl.bp, plan.predicted.speedup_vs_bp))
    console.print(line("BP + checkpointing", bl.bp_checkpoint, plan.predicted.speedup_vs_bp_checkpoint))


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


def _head_text(aux) -> str:  # noqa: ANN001 - a schemas.AuxHead
    return "lin" if aux.kind == "linear" else f"{aux.kind[0]}{aux.width}"


if __name__ == "__main__":
    sys.exit(main())
