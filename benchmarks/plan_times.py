"""Planning time of the zoo's deep networks, end to end (trace, profile, solve).

    python benchmarks/plan_times.py -o benchmarks/results/cpu-plan-times.json

Runs ``nf-plan M --budget 1GB -q`` for each model in a fresh process (so
imports and caches count as a user would see them) and records wall time,
units, engine, status and the solver's own time from the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["resnet101.py", "resnet101.py:model_152", "densenet121.py", "shufflenetv2.py", "mobilenetv2.py"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--budget", default="1GB")
    ap.add_argument("--models", nargs="+", default=MODELS)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models:
            plan = Path(tmp) / "plan.json"
            t0 = time.perf_counter()
            subprocess.run(
                ["nf-plan", str(ROOT / "examples" / m), "--budget", args.budget, "-o", str(plan), "-q"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            wall = time.perf_counter() - t0
            d = json.loads(plan.read_text())
            s = d["solver"]
            rows.append(
                {
                    "model": m,
                    "units": len(d["units"]),
                    "engine": s["engine"],
                    "status": s["status"],
                    "solver_s": s["wall_time_s"],
                    "end_to_end_s": wall,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    import torch

    out = {
        "command": " ".join(["python", "benchmarks/plan_times.py", *sys.argv[1:]]),
        "budget": args.budget,
        "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
