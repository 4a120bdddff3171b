"""Planning every network of kuangliu/pytorch-cifar (MIT), end to end.

    python benchmarks/cifar_networks.py --repo PATH -o benchmarks/results/cpu-cifar-networks.json

PATH is a checkout of https://github.com/kuangliu/pytorch-cifar or its bare git
directory (then ``models/`` is exported from HEAD into a temporary folder). The
repository's code is imported from there, never copied into this one.

For each network a two-line model file (``from models import *``, one
constructor call, 3x32x32 input, 10 classes) is planned by
``nf-plan FILE --budget 1GB --train-size 50000 --val-size 10000 -q`` in a fresh
process (default flags otherwise), and this records its exit status, wall time,
units, blocks, each block's input kind (``blocks[i].input.kind`` where the plan
has it) and, on failure, the last line of its stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The networks of the repository's main.py list (one constructor per family,
# as written there), without ShuffleNetG2 (broken upstream), plus the families
# that models/__init__.py exports and main.py does not name.
NETWORKS: dict[str, str] = {
    "VGG19": "VGG('VGG19')",
    "ResNet18": "ResNet18()",
    "ResNet50": "ResNet50()",
    "PreActResNet18": "PreActResNet18()",
    "GoogLeNet": "GoogLeNet()",
    "DenseNet121": "DenseNet121()",
    "ResNeXt29_2x64d": "ResNeXt29_2x64d()",
    "MobileNet": "MobileNet()",
    "MobileNetV2": "MobileNetV2()",
    "DPN26": "DPN26()",
    "DPN92": "DPN92()",
    "SENet18": "SENet18()",
    "ShuffleNetV2": "ShuffleNetV2(1)",
    "EfficientNetB0": "EfficientNetB0()",
    "RegNetX_200MF": "RegNetX_200MF()",
    "SimpleDLA": "SimpleDLA()",
    "DLA": "DLA()",
    "PNASNetB": "PNASNetB()",
    "LeNet": "LeNet()",
}
# Not run unless named with --only.
EXTRA: dict[str, str] = {"ShuffleNetG2": "ShuffleNetG2()"}

MODEL_FILE = """\
import sys
sys.path.insert(0, {root!r})
from models import *  # noqa: F401,F403 - kuangliu/pytorch-cifar

INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


def model():
    return {ctor}
"""


def _git(git_dir: str | None, cwd: str | None, *args: str) -> str | None:
    cmd = ["git", *(["--git-dir", git_dir] if git_dir else []), *args]
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def models_root(repo: Path, tmp: Path) -> tuple[Path, str | None]:
    """The folder holding ``models/`` and the repository's commit."""
    if (repo / "models" / "__init__.py").is_file():
        return repo, _git(None, str(repo), "rev-parse", "HEAD")
    if (repo / "HEAD").is_file() and (repo / "objects").is_dir():  # a bare git directory
        root = tmp / "pytorch-cifar"
        root.mkdir()
        archive = subprocess.run(
            ["git", "--git-dir", str(repo), "archive", "HEAD", "models"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
        return root, _git(str(repo), None, "rev-parse", "HEAD")
    sys.exit(f"--repo {repo}: neither a checkout with models/ nor a git directory")


def plan_one(name: str, ctor: str, root: Path, tmp: Path, args: argparse.Namespace) -> dict:
    work = tmp / name
    work.mkdir()
    model_file = work / f"{name.lower()}.py"
    model_file.write_text(MODEL_FILE.format(root=str(root), ctor=ctor))
    plan = work / "plan.json"
    cmd = [
        sys.executable,
        "-m",
        "neuroflux.planner.cli",
        str(model_file),
        "--budget",
        args.budget,
        "--train-size",
        str(args.train_size),
        "--val-size",
        str(args.val_size),
        "-o",
        str(plan),
        "-q",
    ]
    row: dict = {"network": name, "constructor": ctor}
    t0 = time.perf_counter()
    # Own session, so a timeout ends the planner and the profiling workers it started.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=args.timeout)
        row["status"] = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        row["status"] = "timeout"
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    row["exit_code"] = proc.returncode
    lines = [ln for ln in (err or "").splitlines() if ln.strip()]
    row["error"] = lines[-1].strip() if row["status"] != "ok" and lines else None
    if row["status"] == "ok" and plan.is_file():
        d = json.loads(plan.read_text())
        blocks = d.get("blocks", [])
        solver = d.get("solver", {})
        row.update(
            units=len(d.get("units", [])),
            blocks=len(blocks),
            block_units=[len(b.get("units", [])) for b in blocks],
            batch_sizes=[b.get("batch_size") for b in blocks],
            input_kinds=[(b.get("input") or {}).get("kind") for b in blocks],
            boundaries=[(b.get("cache") or {}).get("location", "recompute") for b in blocks[:-1]],
            cache_ram_bytes=(d.get("data") or {}).get("peak_cache_ram_bytes"),
            cache_disk_bytes=(d.get("data") or {}).get("peak_cache_disk_bytes"),
            data_mode=(d.get("data") or {}).get("mode"),
            engine=solver.get("engine"),
            solver_status=solver.get("status"),
            solver_s=solver.get("wall_time_s"),
        )
    return row


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("network", "status", "wall", "units", "blocks", "block inputs", "boundaries"):
        t.add_column(col, justify="right" if col in ("wall", "units", "blocks") else "left")
    for r in rows:
        kinds = r.get("input_kinds")
        inputs = "-" if kinds is None else (",".join(k or "?" for k in kinds) if any(kinds) else "(not in plan)")
        t.add_row(
            r["network"],
            r["status"],
            f"{r['wall_s']:.1f} s",
            str(r.get("units", "-")),
            str(r.get("blocks", "-")),
            inputs,
            ",".join(r.get("boundaries") or []) or "-",
        )
    console = Console()
    console.print(t)
    for r in rows:
        if r["status"] != "ok":
            console.print(f"{r['network']}: {r['error'] or r['status']}", markup=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help="kuangliu/pytorch-cifar checkout or bare git directory")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--budget", default="1GB")
    ap.add_argument("--train-size", type=int, default=50_000)
    ap.add_argument("--val-size", type=int, default=10_000)
    ap.add_argument("--only", help=f"comma-separated names, of: {', '.join([*NETWORKS, *EXTRA])}")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per nf-plan (default: 120)")
    args = ap.parse_args(argv)

    known = {**NETWORKS, **EXTRA}
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(NETWORKS)
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"unknown networks {unknown}; known: {', '.join(known)}")

    import torch

    out = Path(args.out)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="nf-cifar-") as tmp:
        root, commit = models_root(Path(args.repo).resolve(), Path(tmp))
        header = {
            "command": " ".join(["python", "benchmarks/cifar_networks.py", *(sys.argv[1:] if argv is None else argv)]),
            "nf_plan": f"nf-plan MODEL --budget {args.budget} --train-size {args.train_size} "
            f"--val-size {args.val_size} -q",
            "timeout_s": args.timeout,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": f"cpu ({os.cpu_count()} cores, {platform.machine()})",
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "repo": "https://github.com/kuangliu/pytorch-cifar",
            "repo_commit": commit,
        }
        for name in names:
            rows.append(plan_one(name, known[name], root, Path(tmp), args))
            print(json.dumps(rows[-1]), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")  # after each, so a stop keeps rows
    ok = sum(r["status"] == "ok" for r in rows)
    print_table(rows, f"nf-plan on kuangliu/pytorch-cifar, budget {args.budget}: {ok}/{len(rows)} planned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
