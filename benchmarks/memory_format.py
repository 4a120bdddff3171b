"""Training and inference steps in both activation layouts, on this machine:
every block of a plan (its units and heads, at the block's batch) and the
whole model as BP trains it (at BP's planned batch), contiguous (NCHW)
against channels_last (NHWC).

    python benchmarks/memory_format.py PLAN [--steps 15] [-o layouts.json]

Each block's input is random data run through the earlier units (the cost
of a step does not depend on the values); each figure is the median step
after 5 warm-up steps, fp32, with freed host memory kept as nf-run keeps it.
Layouts alternate block by block, so that a change in the machine's speed
during the run hits both.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from neuroflux.runtime.assemble import assemble, open_model_file
from neuroflux.runtime.distributed import Dist
from neuroflux.runtime.host_memory import keep_freed_host_memory
from neuroflux.runtime.precision import Precision
from neuroflux.runtime.stages import build_stages
from neuroflux.runtime.train import block_step
from neuroflux.schemas import load_plan

LAYOUTS = ("contiguous", "channels_last")


def _median_ms(fn, steps: int) -> float:
    times = []
    for i in range(5 + steps):
        t0 = time.perf_counter()
        fn()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _train_block(trainers, x: torch.Tensor, y: torch.Tensor) -> None:
    for t in trainers:
        t.train(True)
    block_step(trainers, [x], y)


@torch.inference_mode()
def _infer_block(trainers, x: torch.Tensor) -> None:
    h = x
    for t in trainers:
        t.train(False)
        h = t.unit(h)
        t.logits(h).argmax(1)


def _train_model(model, opt, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _block_row(plan, plan_path: Path, block: int, steps: int) -> dict:
    row: dict = {"block": block}
    for layout in LAYOUTS:
        torch.manual_seed(0)
        asm = assemble(plan, open_model_file(plan, plan_path))
        precision = Precision("fp32", "cpu", layout)
        stage = build_stages(plan, asm, method="neuroflux", dist=Dist(), precision=precision)[block]
        b = stage.batch_size
        x = torch.randn(b, *plan.model.input_shape)
        y = torch.randint(0, plan.model.num_classes, (b,))
        with torch.no_grad():
            for i in range(stage.unit_idx[0]):
                x = asm.units[i].eval()(precision.format_input(x))
        x = precision.format_input(x.contiguous())  # as the runner hands a batch over

        row.update(units=stage.exits, batch=b)
        row[layout] = {
            "train_ms": _median_ms(functools.partial(_train_block, stage.trainers, x, y), steps),
            "inference_ms": _median_ms(functools.partial(_infer_block, stage.trainers, x), steps),
        }
    row["train_speedup"] = row["contiguous"]["train_ms"] / row["channels_last"]["train_ms"]
    row["inference_speedup"] = row["contiguous"]["inference_ms"] / row["channels_last"]["inference_ms"]
    return row


def _bp_row(plan, plan_path: Path, steps: int) -> dict:
    b = plan.baseline.bp.batch_size
    row: dict = {"batch": b}
    for layout in LAYOUTS:
        torch.manual_seed(0)
        model = assemble(plan, open_model_file(plan, plan_path)).model
        precision = Precision("fp32", "cpu", layout)
        precision.format_modules(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = precision.format_input(torch.randn(b, *plan.model.input_shape))
        y = torch.randint(0, plan.model.num_classes, (b,))
        row[layout] = {"train_ms": _median_ms(functools.partial(_train_model, model, opt, x, y), steps)}
    row["train_speedup"] = row["contiguous"]["train_ms"] / row["channels_last"]["train_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args(argv)
    keep_freed_host_memory()  # as nf-run runs on a CPU
    plan = load_plan(args.plan)
    blocks = [_block_row(plan, args.plan, b.index, args.steps) for b in plan.blocks]
    per_sample = {
        layout: sum(r[layout]["train_ms"] / r["batch"] for r in blocks) for layout in LAYOUTS
    }  # one sample through every block: NeuroFlux's training work per sample at full depth
    bp = _bp_row(plan, args.plan, args.steps) if plan.baseline.bp.fits else None
    out = {
        "plan": str(args.plan),
        "model": plan.model.file,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "blocks": blocks,
        "neuroflux_train_ms_per_sample": per_sample,
        "neuroflux_train_speedup": per_sample["contiguous"] / per_sample["channels_last"],
        "bp": bp,
        "bp_train_ms_per_sample": None if bp is None else {k: bp[k]["train_ms"] / bp["batch"] for k in LAYOUTS},
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
