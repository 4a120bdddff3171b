"""``nf-plan``'s command line: every flag, its default (``PlanConfig``'s) and
its help, in the order ``--help`` lists them (``planner/cli.py`` runs them)."""

from __future__ import annotations

import argparse
from typing import Any

from neuroflux.runtime.heads import HEAD_KINDS
from neuroflux.runtime.precision import MEMORY_FORMATS

__all__ = ["build_parser"]


def _default(name: str) -> Any:
    """A flag's default is PlanConfig's: one source per setting."""
    from neuroflux.planner.config import option_default

    return option_default(name)


def _add_memory_args(ap: argparse.ArgumentParser) -> None:
    """Host RAM, disk and the block boundaries: where activations live between blocks."""
    ap.add_argument(
        "--host-budget",
        "--cache-budget",
        dest="cache_budget",
        default=None,
        help="host RAM for activation caches (a block's source cache plus the one it writes) and, where "
        "they fit beside them, the stacked inputs (default: half of this machine's physical RAM)",
    )
    ap.add_argument(
        "--disk-budget",
        default=None,
        help="disk for activation caches (default: the free space where the plan is written, less 10%% "
        "and 1 GiB; give it when the run writes elsewhere)",
    )
    ap.add_argument(
        "--cache-location",
        choices=["auto", "ram", "disk", "recompute"],
        default=_default("cache_location"),
        help="what a block boundary may be: auto (the planner picks RAM cache, disk cache or recompute "
        "per boundary), ram or disk (that cache, or recompute), recompute (never cache)",
    )
    ap.add_argument(
        "--data-mode",
        choices=["auto", "stack", "stream"],
        default=_default("data_mode"),
        help="inputs stacked in RAM once (fast; per-sample random transforms are drawn once) or streamed "
        "through DataLoader workers on every pass; auto: stack when they fit the host budget",
    )
    ap.add_argument(
        "--cache-dtype",
        choices=["float16", "bfloat16", "float32"],
        default=_default("cache_dtype"),
        help="element type of cached activations (default: the precision's: bfloat16 for bf16, else float16)",
    )


def build_parser() -> argparse.ArgumentParser:
    """``nf-plan``'s flags, in the order ``--help`` lists them."""
    ap = argparse.ArgumentParser(
        prog="nf-plan",
        description="Plan block-wise local-learning training of a CNN under a GPU memory budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "model",
        help="model file, optionally with a factory (model.py, model.py:build_net), or an installed "
        "module's factory (mypkg.models:resnet18)",
    )
    ap.add_argument(
        "--budget",
        help="device memory for training tensors, e.g. 1GB, 512MiB, 1.5G, 1000000000 "
        "(default: free memory NVML reports on GPU 0)",
    )
    ap.add_argument(
        "-o",
        "--output",
        default=None,
        help="where to write the plan (default plan.json); with --sweep, a folder (default sweep)",
    )
    ap.add_argument(
        "--sweep",
        default=None,
        metavar="BUDGETS",
        help="plan at several budgets instead of --budget, profiling once: a list (100MB,200MB,1GB) or a "
        "log-spaced range LOW:HIGH:COUNT (100MB:2GB:6); writes one plan per budget, sweep.json and "
        "sweep.html (predicted time against budget for NeuroFlux, BP and BP with checkpointing)",
    )
    ap.add_argument(
        "--strategy",
        choices=["optimal", "greedy"],
        default=_default("strategy"),
        help="optimal: CP-SAT; greedy: our reconstruction of the paper's heuristic",
    )
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="target device kind")
    ap.add_argument(
        "--epochs", type=int, default=_default("epochs"), help="epochs per block (and for the BP baselines)"
    )
    _add_batch_args(ap)
    ap.add_argument(
        "--margin",
        type=float,
        default=_default("margin"),
        help="share of the budget kept free for allocator rounding and fragmentation",
    )
    _add_memory_args(ap)
    _add_solver_and_cost_args(ap)
    _add_head_and_exit_args(ap)
    _add_data_args(ap)
    _add_run_args(ap)
    return ap


def _add_batch_args(ap: argparse.ArgumentParser) -> None:
    """Candidate batch sizes, and the batch rule among them."""
    ap.add_argument("--min-batch", type=int, default=_default("min_batch"))
    ap.add_argument("--max-batch", type=int, default=None, help="default: min(512, train size / 32)")
    ap.add_argument(
        "--batch-time-tolerance",
        type=float,
        default=_default("batch_time_tolerance"),
        metavar="T",
        help="the batch rule: each block takes the smallest batch (the most optimizer steps, often more accurate "
        "at few epochs) whose predicted time is at most T above the solved batch's (0: the solved batch; "
        "default: 0.1 for a CPU, 0 for a GPU)",
    )


def _add_run_args(ap: argparse.ArgumentParser) -> None:
    """How planning itself runs."""
    ap.add_argument(
        "--workers",
        type=int,
        default=_default("workers"),
        help="processes that profile units (default 0: every core; the plan is the same for any number)",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar or table")


def _add_solver_and_cost_args(ap: argparse.ArgumentParser) -> None:
    """The solver's limits and seed, the cost model that times steps, and the base learning rate."""
    ap.add_argument("--max-blocks", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=_default("time_limit_s"), help="CP-SAT seconds per solve phase")
    ap.add_argument("--seed", type=int, default=_default("seed"), help="solver and training seed")
    ap.add_argument(
        "--cost",
        choices=["flops", "measure"],
        default=_default("cost"),
        help="step times from FLOPs and device throughput, or measured real steps",
    )
    ap.add_argument(
        "--device-profile",
        default=None,
        help="device profile JSON for --cost flops, e.g. a GPU's measured with `python -m "
        "neuroflux.planner.device_profile --device cuda -o gpu.json` (default: this machine's, measured "
        "once and cached, so plans do not change with load)",
    )
    ap.add_argument(
        "--device-tflops", type=float, default=None, help="throughput for --cost flops (overrides the profile)"
    )
    ap.add_argument(
        "--op-overhead-us",
        type=float,
        default=None,
        help="fixed cost per dispatched op for --cost flops (default: the profile's); with "
        "--device-tflops and no --device-profile it makes plans independent of this machine's load (traffic "
        "then costs nothing: only a profile measures a bandwidth)",
    )
    ap.add_argument(
        "--lr", type=float, default=_default("lr"), help="base learning rate at batch 128 (sqrt-scaled per block)"
    )
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=_default("precision"),
        help="compute precision of every method: fp32, or mixed precision (fp32 weights, autocast forward) "
        "in bf16 or fp16 (fp16 with a loss scaler per unit); steps are profiled at it",
    )
    ap.add_argument(
        "--memory-format",
        choices=["auto", *MEMORY_FORMATS],
        default=_default("memory_format"),
        help="layout of every method's activations: auto (default) is channels_last on a CPU target (oneDNN's "
        "native layout, faster there), contiguous on CUDA; steps are profiled in it",
    )
    ap.add_argument(
        "--polish",
        type=float,
        default=_default("polish_epochs"),
        metavar="EPOCHS",
        help="after local learning, train the kept exit (its units and head) end to end for this many epochs "
        "(e.g. 0.5) at the largest batch proven to fit the budget; 0: no polish",
    )
    ap.add_argument(
        "--polish-lr-scale",
        type=float,
        default=_default("polish_lr_scale"),
        help="the polish's peak learning rate relative to the recipe's at its batch (cosine to zero)",
    )


def _add_head_and_exit_args(ap: argparse.ArgumentParser) -> None:
    """Aux heads and the accuracy rule; the exit policy and the block length that gives it places to stop."""
    _add_head_args(ap)
    _add_exit_args(ap)


def _add_head_args(ap: argparse.ArgumentParser) -> None:
    """Aux heads and the accuracy rule that widens them."""
    ap.add_argument(
        "--head-kind",
        choices=list(HEAD_KINDS),
        default=_default("head_kind"),
        help="aux head family: pooled (pool to 4x4, 1x1-conv MLP; cheap, so wide), conv (3x3 conv at full "
        "resolution), dgl (DGL's published head: pool to 8x8, 1x1 convs, pool to 2x2, 3-layer MLP) or stage "
        "(AugLocal-style: two 3x3 convs like a following stage, the first strided; the strongest exits)",
    )
    ap.add_argument(
        "--head-time-tolerance",
        type=float,
        default=_default("tie_tolerance"),
        help="accuracy rule for aux heads: take the widest heads whose plan is at most this share slower "
        "than the fastest (0: least time, narrowest heads)",
    )


def _add_exit_args(ap: argparse.ArgumentParser) -> None:
    """The exit policy, and the block length that gives adaptive depth places to stop."""
    ap.add_argument(
        "--patience",
        type=int,
        default=_default("patience"),
        help="adaptive depth: exits (units) in a row without improvement before training stops "
        "(0: full depth; default: a quarter of the units, at least 2)",
    )
    ap.add_argument(
        "--epoch-patience",
        type=int,
        default=_default("epoch_patience"),
        help="per-block epochs: epochs without exit improvement before a block moves on (0: planned epochs)",
    )
    ap.add_argument(
        "--max-extra-epochs",
        type=int,
        default=_default("max_extra_epochs"),
        help="epochs a still-improving block may add, paid from time that converged blocks saved and from the "
        "units --min-reduction skips",
    )
    ap.add_argument(
        "--min-reduction",
        type=float,
        default=_default("min_reduction"),
        metavar="X",
        help="keep only an exit with at least X times fewer parameters than the model (e.g. 10); training "
        "stops at the last exit that small (1: any exit)",
    )
    ap.add_argument(
        "--max-block-units",
        type=int,
        default=None,
        help="longest block in units (default: a third of the units, so adaptive depth has places to "
        "stop; 0: no limit)",
    )
    ap.add_argument(
        "--tolerance", type=float, default=_default("tolerance"), help="accuracy within which exits count as equal"
    )
    ap.add_argument(
        "--prefer",
        choices=["shallowest", "best"],
        default=_default("prefer"),
        help="exit to keep: the best, or the shallowest within --tolerance of it (smaller, a little less accurate)",
    )


def _add_data_args(ap: argparse.ArgumentParser) -> None:
    """The data, where the model file does not give it."""
    ap.add_argument(
        "--input-shape",
        default=None,
        metavar="C,H,W",
        help="one sample's shape, e.g. 3,224,224 (default: the model file's INPUT_SHAPE, else a sample's)",
    )
    ap.add_argument("--train-size", type=int, default=None, help="needed only if the model file has no datasets()")
    ap.add_argument("--val-size", type=int, default=None)
    ap.add_argument("--datasets", default=_default("datasets"), help="name of the datasets function in the model file")
