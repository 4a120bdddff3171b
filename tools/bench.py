"""``nf-bench``: NeuroFlux against BP and BP with checkpointing, side by side.

For every model x budget it plans once with CP-SAT and once greedily, then
trains ``neuroflux``, ``neuroflux-greedy``, ``bp``, ``bp-checkpoint``
(budget-optimal: the batch and recomputed units that train fastest; where
that is plain BP, BP's run stands for it), ``bp-checkpoint-all`` (every
unit boundary) and ``bp-compile`` (torch.compile with an activation memory
budget, its batch and ratio measured first; not in ``--smoke``) on the same
data, seed and epochs, in this one process, and writes ``results.json`` and
``results.md``. Ratios are computed only between runs of one invocation.

    nf-bench --models small_cnn resnet18 --budgets 16MB 250MB --epochs 2 \\
        --data ../shared/data/fashion_mnist.npz --out bench-out
    nf-bench --preset cpu --list                  # a prepared matrix's cells
    nf-bench --preset cpu --cell vgg11-half-40MB  # some cells of it
    nf-bench --preset gpu --dry-run               # CPU, tiny data, one step per epoch
    nf-bench --smoke                              # the CI check of the harness

Plans can be made ahead, on a machine without the GPU, and run there without
a solver: ``--plan-only --plan-device cuda --device-profile GPU.json --out
plans``, then ``--plans plans`` (``tools/gpu/`` does this).

Exit status: 0 when every run finished, 1 when some run failed (its row says
why), 2 on a usage error. This module parses the flags; the cells and presets
are in ``bench_cells.py``, planning and training them in ``bench_run.py``,
targets, ratios and tables in ``bench_report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.datasets import DATA_ENV
from neuroflux.runtime.precision import MEMORY_FORMATS
from neuroflux.tools.bench_cells import METHODS, PRESETS, resolve_cells
from neuroflux.tools.bench_report import markdown, time_to_target
from neuroflux.tools.bench_run import DRY_LIMIT_ENV, BenchOptions, restored_env, run_bench

__all__ = ["build_parser", "main", "run_bench", "time_to_target"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nf-bench", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="a prepared matrix: cpu (half-width models, with the heads and depth ablation), "
        "gpu (each cell < 10 min on one H100), smoke",
    )
    ap.add_argument("--cell", nargs="+", default=None, help="run only these cells of the preset (see --list)")
    ap.add_argument("--list", action="store_true", help="print the preset's cells and exit")
    ap.add_argument("--models", nargs="+", default=["small_cnn"], help="zoo names or model files (name:factory)")
    ap.add_argument("--budgets", nargs="+", default=None, help="default: 16MB (smoke: 40MB)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--epochs", type=int, default=2)
    _add_data_args(ap)
    ap.add_argument(
        "--target",
        type=float,
        default=None,
        help="target val accuracy for time-to-target (default: BP's final accuracy minus one point)",
    )
    ap.add_argument(
        "--datasets",
        default="datasets",
        help="datasets function of every model file (e.g. datasets_imagenet: synthetic, throughput only)",
    )
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="every method's compute precision (the plans'; nf-plan --precision)",
    )
    ap.add_argument("--memory-format", choices=["auto", *MEMORY_FORMATS], default="auto")
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--out", default="bench-out")
    ap.add_argument(
        "--results",
        default=None,
        help="folder for results.json/results.md (default: --out); rewritten after every method",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny CI configuration: checks the harness, not speed")
    ap.add_argument("--plan-only", action="store_true", help="make the cells' plans (and plans.json indexes) and stop")
    ap.add_argument("--plans", default=None, help="run prepared plans from this --plan-only output, no solver needed")
    ap.add_argument(
        "--plan-device",
        choices=["cpu", "cuda"],
        default=None,
        help="device kind the plans target (default: the run device)",
    )
    ap.add_argument("--device-profile", default=None, help="device profile JSON for planning (e.g. the GPU's)")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU, tiny data, one step per epoch: checks a matrix before scarce GPU time is spent on it",
    )
    ap.add_argument("--skip-runs", nargs="*", default=[], help="cells to plan and load but not train")
    _add_variant_arg(ap)
    return ap


def _add_variant_arg(ap: argparse.ArgumentParser) -> None:
    """Extra NeuroFlux runs with other plan options."""
    ap.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar=("LABEL", "OPTION=VALUE"),
        help="an extra NeuroFlux run in every --models cell, planned with these plan options changed "
        "(PlanConfig's names: mostly nf-plan's flags with _ for -, --head-time-tolerance is tie_tolerance; "
        "e.g. --variant 'batch rule' batch_time_tolerance=0.1 patience=4); repeat for more",
    )


def _add_data_args(ap: argparse.ArgumentParser) -> None:
    """Which data, and how many seeds of it."""
    ap.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="run every cell once per seed (the plans' --seed: data order, initialisation), as CELL-seedN",
    )
    ap.add_argument("--data", default=None, help="Fashion-MNIST .npz (sets NEUROFLUX_DATA)")
    ap.add_argument("--limit", default=None, help="TRAIN[,VAL]: first samples only (sets NEUROFLUX_LIMIT)")


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
    if args.variant and args.preset:
        raise NeuroFluxError("--variant adds runs to --models cells; a preset's cells carry their own variants")
    args.variant = [parse_variant(v) for v in args.variant]
    _check_variant_labels([label for label, _ in args.variant])
    if args.plans is not None and not Path(args.plans).is_dir():
        raise NeuroFluxError(f"--plans {args.plans} is not a folder of prepared plans (nf-bench --plan-only --out DIR)")


#: Plan options a cell sets for all its runs (its budget, device, and --seeds), not a variant.
_CELL_OPTIONS = frozenset({"budget_bytes", "budget_text", "budget_source", "device_kind", "device_name", "seed"})


def _check_variant_labels(labels: list[str]) -> None:
    """Every variant gets its own run folder: labels that name the same one (``a b`` and ``a-b``) are refused."""
    from neuroflux.tools.bench_run import run_folder

    seen: dict[str, str] = {}
    for label in labels:
        slug = run_folder(f"neuroflux ({label})")
        if slug in seen:
            raise NeuroFluxError(
                f"--variant labels {seen[slug]!r} and {label!r} name the same run folder ({slug}); give them "
                "distinct labels"
            )
        seen[slug] = label


def parse_variant(words: list[str]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """``LABEL OPTION=VALUE ...`` as a cell variant: values read as JSON where
    they parse (numbers, true, null), as text otherwise; the options are
    checked against a plan config now, before any work."""
    from neuroflux.planner.config import PlanConfig, option_names

    label, *pairs = words
    if not pairs or "=" in label:
        raise NeuroFluxError(
            f"--variant {' '.join(words)}: give a label, then OPTION=VALUE pairs (e.g. --variant 'batch rule' "
            "batch_time_tolerance=0.1)"
        )
    allowed = [n for n in option_names() if n not in _CELL_OPTIONS]
    overrides: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in allowed:
            raise NeuroFluxError(
                f"--variant {label!r}: {pair!r} is not OPTION=VALUE with a plan option a variant may change "
                f"(the cell sets budget, device and seed); options: {', '.join(allowed)}"
            )
        try:
            overrides[name] = json.loads(text)
        except ValueError:
            overrides[name] = text
    try:
        PlanConfig.from_options(budget_bytes=1, budget_text="1B", **overrides)
    except (ValueError, TypeError) as e:
        raise NeuroFluxError(f"--variant {label!r}: {e}") from None
    return label, tuple(overrides.items())


def main(argv: list[str] | None = None) -> int:
    """0: every run finished; 1: some run failed (its row says why); 2: a usage error."""
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        with restored_env(DATA_ENV, DRY_LIMIT_ENV):
            results = _main(args)
    except NeuroFluxError as e:
        print(f"nf-bench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"nf-bench: error: {e.strerror or e} ({e.filename or ''}); check --out, --results and --plans",
            file=sys.stderr,
        )
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
            print(
                f"{c.name}: {c.model} @ {c.budget}, {c.epochs} epochs, methods {', '.join(c.methods)}"
                + (f", limit {c.limit}" if c.limit else "")
                + (f", {len(c.variants)} ablation runs" if c.variants else "")
                + (f"; options {', '.join(f'{k}={v}' for k, v in c.options)}" if c.options else "")
            )
        return None
    if args.data:
        os.environ[DATA_ENV] = str(Path(args.data).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    device: Literal["auto", "cuda", "cpu"] = "cpu" if args.dry_run else args.device  # --device's choices
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise NeuroFluxError("--device cuda but no CUDA device is available; use --device cpu or --dry-run")
    opts = BenchOptions(
        device=device,
        target=args.target,
        time_limit=args.time_limit,
        plan_device=args.plan_device,
        device_profile=args.device_profile,
        plans=Path(args.plans) if args.plans else None,
        plan_only=args.plan_only,
        max_steps=1 if args.dry_run else None,
        skip_runs=tuple(args.skip_runs),
        precision=args.precision,
        memory_format=args.memory_format,
    )
    return run_bench(
        cells=cells,
        out=out,
        opts=opts,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        results_dir=Path(args.results) if args.results else None,
    )


if __name__ == "__main__":
    sys.exit(main())
