"""``nf-run plan.json``: execute a plan (or a baseline of it).

Trains the plan's model as the plan says, block by block (units, batch,
epochs, learning rate, caches, exits), into a run directory: it writes
``checkpoint.pt`` after every epoch, ``metrics.jsonl``, ``summary.json``,
``final_model.pt`` and ``final_model.onnx``. The model file is the one the
plan names; a model changed since planning is refused unless ``--force``.

Main flags:

- ``--out DIR``: the run directory (default: a new folder under ``runs/``);
- ``--resume``: continue the interrupted run in ``--out`` (same plan,
  overrides and number of processes);
- ``--baseline bp|bp-checkpoint|bp-checkpoint-all|bp-compile``: train the whole model end to end instead,
  at the batch the plan found to fit;
- ``--device auto|cuda|cpu``; ``--nproc N``: N processes on this machine
  (torchrun, run for you);
- ``--patience``, ``--epoch-patience``, ``--tolerance``: override the plan's
  exit policy; ``--no-onnx``; ``-q``: no progress bars or table.

Example::

    nf-plan model.py --budget 1GB -o plan.json
    nf-run plan.json --out runs/model
    nf-run plan.json --out runs/model --resume        # after an interruption
    nf-run plan.json --baseline bp --out runs/model-bp

Exit status: 0 done, 2 an error the message says how to fix, 3 training
diverged (``summary.json`` says so), 130 interrupted (``--resume`` continues).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from neuroflux.errors import NeuroFluxError

if TYPE_CHECKING:
    from neuroflux.runtime.config import Method

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="nf-run",
        description="Train a model as its NeuroFlux plan says.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("plan", help="plan file written by nf-plan")
    ap.add_argument(
        "--baseline",
        choices=["bp", "bp-checkpoint", "bp-checkpoint-all", "bp-compile"],
        default=None,
        help="train the original model end to end instead, at the batch the plan found to fit "
        "(bp-compile: torch.compile with an activation memory budget, its batch and ratio measured here first)",
    )
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--out", default=None, help="run directory (default: a new folder under runs/)")
    ap.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    ap.add_argument("--force", action="store_true", help="run even if the model file changed since planning")
    ap.add_argument(
        "--patience",
        type=int,
        default=None,
        help="override the plan's adaptive depth: exits in a row without improvement before stopping (0: full depth)",
    )
    ap.add_argument(
        "--epoch-patience",
        type=int,
        default=None,
        help="override the plan's per-block epochs: epochs without improvement before a block moves on "
        "(0: planned epochs)",
    )
    ap.add_argument("--tolerance", type=float, default=None, help="override the plan's exit tolerance")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX export of the final model")
    ap.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        metavar="N",
        help="DataLoader worker processes reading the dataset (default: one per core beyond the "
        "trainer's, at most 8; 0 reads in the training process)",
    )
    ap.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train on N processes on this machine: runs torchrun --standalone --nproc-per-node N for you "
        "(one per GPU; see README, 'Several processes and GPUs')",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars or table")
    return ap


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler's stop) ends the run like Ctrl-C: same resume
    hint. Only the first signal interrupts: later SIGTERMs and SIGINTs are
    ignored while the run saves and exits (a second one mid-cleanup would
    otherwise end it with a traceback, or 143 before the handler exists)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():

        def handler(signum, frame):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _SIGNALLED.append(signum)
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


_SIGNALLED: list[int] = []
"""Signals this process took: then it is exiting, and keeps ignoring more."""


def _saved_handlers():
    """The process's SIGTERM and SIGINT handlers, to restore after main()
    (tests call it in-process)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)


def _check_overrides(args: argparse.Namespace) -> str | None:
    """The same ranges nf-plan enforces for the settings nf-run may override."""
    import math

    for name in ("patience", "epoch_patience", "loader_workers"):
        value = getattr(args, name)
        if value is not None and value < 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {value}"
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and 0 <= args.tolerance <= 1):
        return f"--tolerance must be a number in [0, 1] (accuracy), got {args.tolerance}"
    if args.nproc is not None and args.nproc < 1:
        return "--nproc must be >= 1"
    return None


def _launch(argv: list[str], n: int) -> int:
    """torchrun on ``n`` processes; a SIGTERM or Ctrl-C here is passed on to
    it (it stops its workers, which checkpoint) and waited for: nothing is
    orphaned, and the run directory's lock is free when this returns."""
    import signal
    import subprocess

    proc = subprocess.Popen(_torchrun_argv(argv, n))
    stopped = []

    def forward(signum, frame):
        stopped.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM if len(stopped) == 1 else signal.SIGKILL)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches torchrun and its workers directly (one process group)
    rc = proc.wait()
    if stopped:
        print(
            "\nnf-run: interrupted; torchrun and its workers stopped. Continue with the same command and --resume "
            "--out DIR",
            file=sys.stderr,
        )
        return 130
    return rc


def _torchrun_argv(argv: list[str], n: int) -> list[str]:
    """This command under torchrun on ``n`` local processes, without --nproc."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "-m",
        "neuroflux.runtime.cli",
        *rest,
    ]


def main(argv: list[str] | None = None) -> int:
    import signal

    saved = _saved_handlers()
    try:
        return _main(sys.argv[1:] if argv is None else argv)
    finally:
        if saved is not None and not _SIGNALLED:
            signal.signal(signal.SIGTERM, saved[0])
            signal.signal(signal.SIGINT, saved[1])


def _main(argv: list[str]) -> int:
    launching = "--nproc" in " ".join(argv)
    if not launching:
        _sigterm_as_interrupt()  # first: a signal during imports and parsing is an interrupt too
    args = build_parser().parse_args(argv)
    problem = _check_overrides(args)
    if problem:
        print(f"nf-run: error: {problem}", file=sys.stderr)
        return 2
    if args.nproc is not None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print("nf-run: error: --nproc under torchrun: give torchrun's --nproc-per-node instead", file=sys.stderr)
            return 2
        if args.nproc > 1:
            return _launch(argv, args.nproc)
        _sigterm_as_interrupt()
    logging.basicConfig(level=logging.WARNING, format="nf-run: %(message)s")
    out = None
    try:
        from neuroflux.schemas import load_plan

        plan = load_plan(args.plan)
        method: Method = args.baseline or "neuroflux"  # --baseline's choices
        if args.resume and args.out is None:
            raise NeuroFluxError("--resume needs --out DIR: the run directory to continue")
        out = (
            Path(args.out)
            if args.out
            else Path("runs") / f"{Path(args.plan).stem}-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        return _run(args, plan, method, out)
    except NeuroFluxError as e:
        from neuroflux.runtime.runner import Diverged

        if isinstance(e, Diverged):
            print(f"nf-run: run failed: {e}. No final model was written; summary.json says so.", file=sys.stderr)
            return 3
        print(f"nf-run: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the run directory turned read-only or full mid-run (user paths are checked up front)
        where = f" in {out}" if out else ""
        print(
            f"nf-run: error: cannot write {e.filename or 'a file'}{where} ({e.strerror or e}); the last checkpoint is "
            f"kept: make the run directory writable (or free space there), then run again with --resume",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        where = f" --out {out}" if out else ""
        again = f"nf-run {args.plan} --resume{where}" + (f" --baseline {args.baseline}" if args.baseline else "")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            again = f"the same torchrun command (--nproc-per-node {os.environ['WORLD_SIZE']} in all) with: {again}"
        print(f"\nnf-run: interrupted; finished epochs are saved. Continue with {again}", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, plan, method: Method, out: Path) -> int:
    import torch

    from neuroflux.runtime.progress import progress_bars
    from neuroflux.runtime.runner import RunConfig, run_plan

    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 alone reports
    bar = progress_bars(enabled=main_rank and not args.quiet)
    cfg = RunConfig(
        out_dir=out,
        method=method,
        device=args.device,
        resume=args.resume,
        force=args.force,
        patience=args.patience,
        tolerance=args.tolerance,
        epoch_patience=args.epoch_patience,
        export_onnx=not args.no_onnx,
        loader_workers=args.loader_workers,
    )
    try:
        summary = run_plan(plan, Path(args.plan), cfg, bar=bar)
    except torch.OutOfMemoryError as e:
        raise NeuroFluxError(
            f"out of GPU memory under the {plan.device.budget_text} budget ({e.__class__.__name__}); the last "
            f"checkpoint in {out} is kept. Re-plan with a larger --margin (now {plan.device.margin_fraction}) or "
            f"budget, then start a new run"
        ) from e
    if main_rank:
        if not args.quiet:
            print_summary(summary)
        print(f"run directory: {out}")
    return 0


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from neuroflux.common import format_bytes

    procs = f" x {s['world_size']} processes" if s.get("world_size", 1) > 1 else ""
    t = Table(title=f"{s['method']} on {s['device']}{procs}: summary")
    for col in ("block", "units", "batch", "time", "peak measured / predicted", "exit accuracy (val)"):
        t.add_column(col, justify="left" if col in ("units", "exit accuracy (val)") else "right")
    for b in s["blocks"]:
        units = b["units"][0] + (f"..{b['units'][-1]}" if len(b["units"]) > 1 else "")
        exits = " ".join(f"{u}:{a:.3f}" for u, a in b["exit_accuracies"].items())
        t.add_row(
            str(b["index"]),
            units,
            str(b["batch_size"]),
            f"{b['time_s']:.1f} s",
            f"{format_bytes(b['measured_peak_bytes'])} / {format_bytes(b['predicted_peak_bytes'])}",
            exits,
        )
    c = Console()
    c.print(t)
    st = s.get("stopping") or {}
    if s["stopped_early"]:
        c.print(f"adaptive depth: {s['stopped_early']}; skipped units {', '.join(st.get('units_skipped', []))}")
    if st and s["method"] == "neuroflux":
        ran, planned = st["epochs_run"], st["epochs_planned"]
        epochs = " ".join(f"b{k}:{ran[k]}/{planned[k]}" for k in ran)
        c.print(
            f"epochs run/planned per block: {epochs}; training time saved by stopping: "
            f"{st['saved_estimated_s']:.1f} s (estimated)"
        )
    c.print(
        f"final model: exit {s['final_exit']}, val accuracy {s['final_accuracy']:.4f}, "
        f"{s['final_params']:,} params vs {s['original_params']:,} original ({s['param_reduction']:.1f}x fewer), "
        f"inference {s['throughput']['speedup']:.2f}x the original's throughput; wall time {s['wall_time_s']:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
