"""Where a block's training step goes: its units' forward, its aux heads'
forward and backward, the whole backward, and the optimizer steps, measured
on this machine at the plan's batch; and what the plan's FLOP cost model
gives the heads (their FLOPs at the profile's throughput).

    python benchmarks/step_parts.py PLAN --block N [--batch B] [--steps 50] [-o parts.json]

The block's input is random data run through the earlier units (their
initial weights: the cost of a step does not depend on the values). Timings
are means over ``--steps`` steps after 10 warm-up steps, fp32, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from neuroflux.planner.step_meter import flop_counter
from neuroflux.runtime.assemble import assemble, open_model_file
from neuroflux.runtime.distributed import Dist
from neuroflux.runtime.host_memory import keep_freed_host_memory
from neuroflux.runtime.stages import build_stages
from neuroflux.schemas import load_plan


def _head_flops(trainer, out: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one head forward and backward on ``out`` (the planner's formulas)."""
    with flop_counter() as fc:
        F.cross_entropy(trainer.logits(out.detach()), y).backward()
    trainer.opt.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def _params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def measure(plan_path: Path, block: int, batch: int | None, steps: int) -> dict:
    torch.manual_seed(0)
    plan = load_plan(plan_path)
    asm = assemble(plan, open_model_file(plan, plan_path))
    stage = build_stages(plan, asm, method="neuroflux", dist=Dist())[block]
    b = batch or stage.batch_size
    x = torch.randn(b, *plan.model.input_shape)
    y = torch.randint(0, plan.model.num_classes, (b,))
    with torch.no_grad():
        for i in range(stage.unit_idx[0]):
            x = asm.units[i].eval()(x)
    parts = dict.fromkeys(("unit_forward", "head_forward_and_loss", "backward", "optimizer", "heads_alone"), 0.0)
    head_flops = 0
    for it in range(10 + steps):
        timed = it >= 10
        h = x
        for t in stage.trainers:
            t.train()
            t0 = time.perf_counter()
            out = t.unit(h.detach())
            t1 = time.perf_counter()
            loss = F.cross_entropy(t.logits(out), y)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            t.opt.step()
            t.opt.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            if timed:
                parts["unit_forward"] += t1 - t0
                parts["head_forward_and_loss"] += t2 - t1
                parts["backward"] += t3 - t2
                parts["optimizer"] += t4 - t3
            h = out.detach()
        if timed:  # the heads alone, forward and backward, on the units' outputs
            h = x
            for t in stage.trainers:
                with torch.no_grad():
                    out = t.unit(h)
                if t.head is None:  # the network's own classifier: no aux head to time
                    h = out
                    continue
                t0 = time.perf_counter()
                F.cross_entropy(t.logits(out), y).backward()
                parts["heads_alone"] += time.perf_counter() - t0
                t.opt.zero_grad(set_to_none=True)
                if it == 10:
                    head_flops += _head_flops(t, out, y)
                h = out
    ms = {k: 1000 * v / steps for k, v in parts.items()}
    step_ms = sum(ms[k] for k in ("unit_forward", "head_forward_and_loss", "backward", "optimizer"))
    flops_per_s = plan.profile.device_flops_per_s
    return {
        "plan": str(plan_path),
        "block": block,
        "units": stage.exits,
        "batch": b,
        "steps_timed": steps,
        "ms_per_step": {k: round(v, 2) for k, v in ms.items()},
        "step_ms": round(step_ms, 2),
        "heads_share_of_step": round(ms["heads_alone"] / step_ms, 3),
        "head_params": [_params(t.head) for t in stage.trainers],
        "unit_params": [_params(t.unit) for t in stage.trainers],
        "heads_flops_per_step": head_flops,
        "heads_ms_at_profile_throughput": round(1000 * head_flops / flops_per_s, 2) if flops_per_s else None,
        "profile_flops_per_s": flops_per_s,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("--block", type=int, nargs="+", default=[0])
    ap.add_argument("--batch", type=int, default=None, help="default: the plan's batch of the block")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("-o", "--out", type=Path, default=None)
    args = ap.parse_args(argv)
    keep_freed_host_memory()  # as nf-run runs on a CPU
    rows = [measure(args.plan, b, args.batch, args.steps) for b in args.block]
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
