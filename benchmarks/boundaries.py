"""What a recompute boundary costs against a cache, and streaming's host memory, in one run.

    python benchmarks/boundaries.py -o benchmarks/results/cpu-boundaries.json

One model, one budget, three plans that differ only in their boundaries
(``--cache-location ram`` with fp32 caches, and ``recompute``; the same
blocks and batches, checked) and a third that streams its inputs under a
host budget far below their size. Each plan is trained by ``nf-run`` in a
fresh process, one after the other; the table gives per block the measured
and predicted seconds, the recompute/cache ratio of both, and each run's
peak RSS (the trainer process, ``ru_maxrss``) against its host budget.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_RSS = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def _run(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and the peak RSS (bytes) of the largest process of ``cmd``."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _RSS, *cmd], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    rss = next(int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("MAXRSS_KIB"))
    return time.perf_counter() - t0, rss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--model", default="examples/vgg11.py:model_half")
    ap.add_argument("--budget", default="100MB")
    ap.add_argument("--epochs", default="2")
    ap.add_argument("--limit", default="6000,1000", help="NEUROFLUX_LIMIT: train,val samples")
    ap.add_argument("--stream-host-budget", default="8MB")
    args = ap.parse_args()
    env = {**os.environ, "NEUROFLUX_LIMIT": args.limit, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    model = str(ROOT / args.model.split(":")[0]) + (":" + args.model.split(":")[1] if ":" in args.model else "")
    variants = {
        "cache": ["--cache-location", "ram", "--cache-dtype", "float32"],
        "recompute": ["--cache-location", "recompute"],
        "stream": [
            "--cache-location",
            "ram",
            "--cache-dtype",
            "float32",
            "--host-budget",
            args.stream_host_budget,
            "--data-mode",
            "stream",
        ],
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, flags in variants.items():
            plan = Path(tmp) / f"{name}.json"
            subprocess.run(
                [
                    "nf-plan",
                    model,
                    "--budget",
                    args.budget,
                    "--epochs",
                    args.epochs,
                    "--device-tflops",
                    "0.05",
                    "--op-overhead-us",
                    "20",
                    *flags,
                    "-o",
                    str(plan),
                    "-q",
                ],
                check=True,
                env=env,
                stdout=subprocess.DEVNULL,
            )
            p = json.loads(plan.read_text())
            wall, rss = _run(
                [
                    "nf-run",
                    str(plan),
                    "--out",
                    str(Path(tmp) / f"run-{name}"),
                    "--device",
                    "cpu",
                    "--no-onnx",
                    "-q",
                    "--patience",
                    "0",
                    "--epoch-patience",
                    "0",
                ],
                env,
            )
            s = json.loads((Path(tmp) / f"run-{name}" / "summary.json").read_text())
            rows[name] = {
                "data_mode": p["data"]["mode"],
                "input_bytes": p["data"]["input_bytes"],
                "host_budget_bytes": p["device"]["cache_budget_bytes"],
                "peak_rss_bytes": rss,
                "wall_s": wall,
                "final_accuracy": s["final_accuracy"],
                "exit_accuracies": s["exit_accuracies"],
                "blocks": [
                    {
                        "index": b["index"],
                        "input": b["input"]["kind"],
                        "recompute_units": b["input"]["recompute_units"],
                        "batch": b["batch_size"],
                        "predicted_s": b["predicted_time_s"],
                        "predicted_recompute_s": b["input"]["recompute_s"],
                        "measured_s": r["time_s"],
                        "predicted_peak_bytes": b["predicted_peak_bytes"],
                        "measured_peak_bytes": r["measured_peak_bytes"],
                    }
                    for b, r in zip(p["blocks"], s["blocks"])
                ],
            }
            print(name, json.dumps({k: v for k, v in rows[name].items() if k != "blocks"}), flush=True)
    c, r = rows["cache"]["blocks"], rows["recompute"]["blocks"]
    assert [b["batch"] for b in c] == [b["batch"] for b in r], "the two plans must differ only in their boundaries"
    ratios = [
        {
            "block": a["index"],
            "recomputes": b["recompute_units"],
            "measured_ratio": b["measured_s"] / a["measured_s"],
            "predicted_ratio": b["predicted_s"] / a["predicted_s"],
        }
        for a, b in zip(c, r)
    ]
    import torch

    out = {
        "command": " ".join(["python", "benchmarks/boundaries.py", *sys.argv[1:]]),
        "model": args.model,
        "budget": args.budget,
        "epochs": args.epochs,
        "limit": args.limit,
        "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "runs": rows,
        "recompute_vs_cache": ratios,
        "benchmark_process_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for x in ratios:
        print(
            f"block {x['block']} recomputing {x['recomputes']}: measured {x['measured_ratio']:.2f}x, "
            f"predicted {x['predicted_ratio']:.2f}x the cached block's time"
        )


if __name__ == "__main__":
    main()
