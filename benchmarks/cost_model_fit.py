"""How well the planner's cost model predicts real training steps: every
unit of a plan's model with every aux head width the planner weighs, at two
batches, timed on this machine and priced with one or more device profiles.

    python benchmarks/cost_model_fit.py PLAN --profiles A.json B.json [--batches 8 48] [-o fit.json]

Each step is ``UnitTrainer.step`` (forward, head, loss, backward, SGD step),
the median of 15 calls (8 at the larger batch) after 3 warm-up calls, fp32,
on the CPU, with inputs made by running the earlier units. Its ops, FLOPs
and traffic are counted with the planner's StepMeter; a profile's predicted
time is ``DeviceSpeed.step_s`` with the profile's speeds. The report gives,
per profile, predicted over measured time: median, geometric-mean error
(a factor) and range.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from neuroflux.planner.device_profile import load_profile
from neuroflux.planner.heads import head_widths
from neuroflux.planner.profile import DeviceSpeed, SGDConfig, StepProfile, local_trainer, state_tensors
from neuroflux.planner.step_meter import StepMeter
from neuroflux.runtime.assemble import assemble, open_model_file
from neuroflux.runtime.heads import build_head
from neuroflux.runtime.host_memory import host_memory_setting, keep_freed_host_memory
from neuroflux.schemas import load_plan


def _seconds(t, x: torch.Tensor, y: torch.Tensor, reps: int) -> float:
    for _ in range(3):
        t.step(x, y)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        t.step(x, y)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _row(t, x: torch.Tensor, y: torch.Tensor, unit: int, width: int | None) -> dict:
    meter = StepMeter(state_tensors(t.modules(), t.opt, grads=False))
    with meter:
        t.step(x, y)
    s = _seconds(t, x, y, reps=15 if len(x) < 32 else 8)
    return dict(unit=unit, width=width, batch=len(x), ops=meter.ops, flops=meter.flops, traffic=meter.traffic, s=s)


def measure(plan_path: Path, batches: list[int]) -> list[dict]:
    torch.manual_seed(0)
    plan = load_plan(plan_path)
    asm = assemble(plan, open_model_file(plan, plan_path))
    classes = plan.model.num_classes
    h = torch.randn(max(batches), *plan.model.input_shape)
    rows = []
    for i, (unit, spec) in enumerate(zip(asm.units, plan.units)):
        widths: list[int | None] = [None] if spec.is_last else [w for _, w in head_widths(spec.output_shape)]
        for w in widths:
            head = None if w is None else build_head("pooled", spec.output_shape, w, classes)
            t = local_trainer(copy.deepcopy(unit), head, SGDConfig(lr=0.0))  # lr 0: the weights stay as built
            t.train(True)
            for b in batches:
                rows.append(_row(t, h[:b].clone(), torch.randint(0, classes, (b,)), i, w))
                print(rows[-1], file=sys.stderr, flush=True)
        with torch.no_grad():
            h = unit.eval()(h)
        unit.train()
    return rows


def predicted(row: dict, speed: DeviceSpeed) -> float:
    prof = StepProfile(
        static_bytes=0,
        dyn_fixed_bytes=0,
        dyn_per_sample_bytes=0,
        flops_fixed=float(row["flops"]),
        flops_per_sample=0.0,
        ops=row["ops"],
        traffic_fixed=float(row["traffic"]),
    )
    return speed.step_s(prof, row["batch"])


def report(rows: list[dict], profiles: list[Path]) -> dict:
    out = {}
    for path in profiles:
        prof = load_profile(path)
        speed = DeviceSpeed(
            flops_per_s=prof.flops_per_s,
            op_overhead_s=prof.op_overhead_s,
            bandwidth_bytes_per_s=prof.bandwidth_bytes_per_s,
        )
        ratios = [predicted(r, speed) / r["s"] for r in rows]
        out[str(path)] = {
            "speed_method": prof.speed_method or "microbench",
            "median_predicted_over_measured": round(statistics.median(ratios), 3),
            "geomean_error_factor": round(math.exp(statistics.fmean(abs(math.log(q)) for q in ratios)), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan", type=Path)
    ap.add_argument("--profiles", type=Path, nargs="+", required=True)
    ap.add_argument("--batches", type=int, nargs=2, default=[8, 48])
    ap.add_argument("-o", "--output", type=Path)
    args = ap.parse_args(argv)
    keep_freed_host_memory()  # as nf-run and nf-profile run on a CPU
    rows = measure(args.plan, args.batches)
    result = {
        "plan": str(args.plan),
        "model": load_plan(args.plan).model.file,
        "steps": len(rows),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host_memory": host_memory_setting(),
        "profiles": report(rows, args.profiles),
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    if args.output:
        args.output.write_text(text + "\n")
    print(json.dumps(result["profiles"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
