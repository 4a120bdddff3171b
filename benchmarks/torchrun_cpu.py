"""nf-run on one process with 2 threads against torchrun with 2 processes of
1 thread each, on the same plan (default: the README demo's), CPU.

    python benchmarks/torchrun_cpu.py -o benchmarks/results/cpu-torchrun-2x1-vs-1x2.json

On a GPU machine the same comparison is ``nf-run plan.json`` against
``torchrun --standalone --nproc-per-node N -m neuroflux.runtime.cli plan.json``
(README, "Several processes and GPUs").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--model", default=str(ROOT / "examples" / "small_cnn.py"))
    ap.add_argument("--budget", default="16MB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plan = Path(tmp) / "plan.json"
        subprocess.run(
            ["nf-plan", args.model, "--budget", args.budget, "-o", str(plan), "-q", "--device", "cpu"], check=True
        )
        run = [sys.executable, "-m", "neuroflux.runtime.cli", str(plan), "--device", "cpu", "-q", "--no-onnx"]
        one_s = _run([*run, "--out", f"{tmp}/one"], {"OMP_NUM_THREADS": "2"})
        two_s = _run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node=2",
                "-m",
                "neuroflux.runtime.cli",
                str(plan),
                "--device",
                "cpu",
                "-q",
                "--no-onnx",
                "--out",
                f"{tmp}/two",
            ],
            {"OMP_NUM_THREADS": "1"},
        )
        one = json.loads(Path(f"{tmp}/one/summary.json").read_text())
        two = json.loads(Path(f"{tmp}/two/summary.json").read_text())
        plan_data = json.loads(plan.read_text())

    def row(s: dict, wall: float) -> dict:
        return {
            "wall_s": wall,
            "train_s": s["train_time_s"],
            "final_accuracy": s["final_accuracy"],
            "final_exit": s["final_exit"],
            "exit_accuracies": s["exit_accuracies"],
            "epochs_run": s["stopping"]["epochs_run"],
            "world_size": s["world_size"],
        }

    result = {
        "what": "nf-run, 1 process x 2 threads, against torchrun, 2 processes x 1 thread (gloo), same plan",
        "model": os.path.relpath(args.model, ROOT),
        "budget": args.budget,
        "blocks": [(b["units"], b["batch_size"]) for b in plan_data["blocks"]],
        "cpu": f"{os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "one_process_2_threads": row(one, one_s),
        "two_processes_1_thread": row(two, two_s),
        "speedup": one_s / two_s,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
