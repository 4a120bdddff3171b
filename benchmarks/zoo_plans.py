"""Plan every zoo model at fixed speed flags and record a digest of each plan.

    python benchmarks/zoo_plans.py -o /tmp/zoo/before.json --keep /tmp/zoo/before     # before a refactor
    python benchmarks/zoo_plans.py -o /tmp/zoo/after.json --check /tmp/zoo/before.json

Behaviour-preserving changes (module splits, renames) must leave every plan
byte-identical. Speed flags (``--device-tflops``, ``--op-overhead-us``) and the
host and disk budgets are fixed, so the plans depend on neither this machine's
load nor its free disk; the planner's own wall time is dropped before hashing
and the model file's relative path cut to its name (so worktrees compare).
``--check`` exits 1 and names the models whose plans differ. With ``--drop``
(fields a deliberate change added), the earlier run's plans are re-hashed
from the folder named as its digest file (``--keep X`` beside ``-o X.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXED = [
    "--device-tflops",
    "0.5",
    "--op-overhead-us",
    "20",
    "--host-budget",
    "8GB",
    "--disk-budget",
    "40GB",
    "--time-limit",
    "10",
    "-q",
]
#: (model, budget, extra flags): every example file, at budgets where each plans.
ZOO: list[tuple[str, str, list[str]]] = [
    ("small_cnn.py", "16MB", []),
    ("small_cnn.py", "64MB", ["--strategy", "greedy"]),
    ("vgg11.py:model_half", "40MB", ["--epochs", "3"]),
    ("vgg16.py", "350MB", []),
    ("resnet18.py:model_half", "80MB", ["--epochs", "3", "--train-size", "20000", "--val-size", "10000"]),
    ("resnet18.py", "1GB", ["--cache-location", "disk", "--train-size", "50000", "--val-size", "10000"]),
    ("resnet34.py:model_imagenet", "8GB", ["--train-size", "1281167", "--val-size", "50000"]),
    ("resnet101.py", "1GB", []),
    ("densenet121.py", "1GB", []),
    ("mobilenetv2.py", "100MB", []),
    ("shufflenetv2.py", "1GB", ["--head-kind", "conv"]),
]


def digest(plan: dict, *, drop: tuple[str, ...] = ()) -> str:
    plan = json.loads(json.dumps(plan))
    for path in drop:  # fields a deliberate change added (e.g. a schema version)
        *parents, last = path.split(".")
        node = plan
        for key in parents:
            node = node.get(key, {})
        node.pop(last, None)
    plan.get("solver", {}).pop("wall_time_s", None)
    # The model file's path is relative to the plan: equal for one checkout, not across worktrees.
    plan["model"]["file"] = Path(plan["model"]["file"]).name
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _kept(folder: Path, key: str) -> Path:
    return folder / (key.replace("/", "_").replace(" ", "_").replace(":", "-") + ".json")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", required=True, help="where to write {model: digest}")
    ap.add_argument("--check", help="an earlier --out to compare with")
    ap.add_argument("--keep", help="folder to keep the plans in (for a diff)")
    ap.add_argument(
        "--drop",
        default="",
        help="comma-separated dotted fields left out of both sides of --check "
        "(what a deliberate change added, e.g. schema_version,baseline.bp.shuffle_seed)",
    )
    args = ap.parse_args()
    rows = {}
    drop = tuple(f for f in args.drop.split(",") if f)
    with tempfile.TemporaryDirectory() as tmp:
        keep = Path(args.keep) if args.keep else Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        for model, budget, extra in ZOO:
            key = f"{model} {budget} {' '.join(extra)}".strip()
            out = _kept(keep, key)
            t0 = time.perf_counter()
            subprocess.run(
                ["nf-plan", str(ROOT / "examples" / model), "--budget", budget, "-o", str(out), *FIXED, *extra],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            rows[key] = digest(json.loads(out.read_text()), drop=drop)
            print(f"{time.perf_counter() - t0:6.1f} s  {rows[key][:12]}  {key}", flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    if args.check:
        before = json.loads(Path(args.check).read_text())
        if drop:  # the earlier run's kept plans, re-hashed without the dropped fields
            before = {
                k: digest(json.loads(_kept(Path(args.check).with_suffix(""), k).read_text()), drop=drop) for k in before
            }
        differ = [k for k in before if rows.get(k) != before[k]]
        if differ:
            print("plans differ:", *differ, sep="\n  ")
            return 1
        print(f"all {len(before)} plans byte-identical (less the planner's wall time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
