"""nf-run on 2 processes with torchrun and gloo (CPU): the same update as one
process on the ranks' batches together, sharded caches, exit accuracies of
one process, rank 0's files, a killed rank resumable, the demo's accuracy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, plan_for, wait_for_metrics

from neuroflux.runtime.assemble import assemble
from neuroflux.runtime.caches import KEEP_CACHES_ENV
from neuroflux.runtime.cli import main as nf_run
from neuroflux.runtime.heads import build_head
from neuroflux.runtime.model_file import load_model_file
from neuroflux.runtime.modules import Chain
from neuroflux.schemas import load_plan

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow

#: The tests' tiny model without BatchNorm: with it, per-rank batch statistics
#: would (rightly, as with DistributedDataParallel) differ from one process's.
NO_BN = (
    (Path(__file__).resolve().parent / "tiny_model.py")
    .read_text()
    .replace("        self.bn1 = nn.BatchNorm2d(8)\n", "")
    .replace("F.relu(self.bn1(self.conv1(x)))", "F.relu(self.conv1(x))")
)


def _torchrun(*args: str, nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEUROFLUX_DIST_TIMEOUT": "60", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "neuroflux.runtime.cli",
            *args,
            "--device",
            "cpu",
            "-q",
            "--no-onnx",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _plan(tmp_path: Path, **kw):
    model = tmp_path / "tiny_nobn.py"
    model.write_text(NO_BN)
    result, path = plan_for(
        model,
        tmp_path,
        budget=2 * 10**6,
        strategy="greedy",
        min_batch=8,
        max_batch=16,
        patience=10,
        epoch_patience=0,
        **kw,
    )
    return result.plan, path, model


def test_two_ranks_train_as_one_process_on_their_batches_together(tmp_path: Path) -> None:
    plan, path, model = _plan(tmp_path, epochs=1, cache_location="disk", cache_dtype="float32")
    os.environ[KEEP_CACHES_ENV] = "1"  # read back below; a run deletes disk caches once no block reads them
    try:
        proc = _torchrun(str(path), "--out", str(tmp_path / "run"))
        out, err = proc.communicate(timeout=300)
    finally:
        del os.environ[KEEP_CACHES_ENV]
    assert proc.returncode == 0, err[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["world_size"] == 2

    # Each rank's disk cache holds only its shard: train n//2, val every other sample.
    mf = load_model_file(model)
    train, val = mf.datasets()
    n, nv = len(train), len(val)
    for rank in (0, 1):
        rows = np.load(run / "cache" / f"block0.rank{rank}.npy", mmap_mode="r").shape[0]
        assert rows == n // 2 + len(range(rank, nv, 2))
    assert not (run / "cache" / "block0.npy").exists()

    # The reference: unit 0 trained in one process on the mean of the two ranks' losses
    # (each rank's batch through the head on its own: the head's BatchNorm normalises per rank).
    r, b0, u0 = plan.recipe, plan.blocks[0], plan.units[0]
    torch.manual_seed(r.seed)
    net = mf.build()
    torch.manual_seed(r.seed + 1)
    head = build_head(u0.aux.kind, u0.output_shape, u0.aux.width, plan.model.num_classes)
    params = [net.conv1.weight, net.conv1.bias, *head.parameters()]
    steps = b0.epochs * -(-(n // 2) // b0.batch_size)
    opt = torch.optim.SGD(params, lr=b0.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    x_all, y_all = train.tensors
    shards = [torch.arange(rank, n, 2)[: n // 2] for rank in (0, 1)]
    for epoch in range(b0.epochs):
        perm = torch.randperm(n // 2, generator=torch.Generator().manual_seed(b0.shuffle_seed + epoch))
        for i in range(0, n // 2, b0.batch_size):
            losses = []
            for s in shards:
                idx = s[perm[i : i + b0.batch_size]]
                losses.append(F.cross_entropy(head(F.max_pool2d(F.relu(net.conv1(x_all[idx])), 2)), y_all[idx]))
            (sum(losses) / len(losses)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
    key = next(k for k in ckpt["model"] if k.endswith("conv1.weight"))
    torch.testing.assert_close(ckpt["model"][key], net.conv1.weight.detach(), rtol=1e-4, atol=1e-5)
    for name, p in head.named_parameters():  # parameters; running statistics are rank 0's own
        torch.testing.assert_close(ckpt["heads"][0][name], p.detach(), rtol=1e-4, atol=1e-5)

    # Exit accuracies are one process's on the same weights (counts all-reduced over the val shards).
    asm = assemble(plan, mf)
    asm.model.load_state_dict(ckpt["model"])
    for h, hs in zip(asm.heads, ckpt["heads"]):
        if h is not None:
            h.load_state_dict(hs)
    xv, yv = val.tensors
    with torch.no_grad():
        for k, unit in enumerate(plan.units):
            exit_model = Chain(asm.units[: k + 1], asm.heads[k]).eval()
            acc = (exit_model(xv).argmax(1) == yv).float().mean().item()
            assert summary["exit_accuracies"][unit.name] == pytest.approx(acc, abs=1e-6), unit.name
    # Rank 0 alone wrote the run's files.
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for m in metrics if m["event"] == "block") == len(plan.blocks)


def _worker_pids(parent: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_killed_rank_stops_the_run_and_it_resumes_with_the_same_ranks(tmp_path: Path, capsys) -> None:
    plan, path, _ = _plan(tmp_path, epochs=3)
    run = tmp_path / "run"
    proc = _torchrun(str(path), "--out", str(run), env={"NEUROFLUX_LIMIT": ""})
    wait_for_metrics(run / "metrics.jsonl", lambda recs: any(r["event"] == "epoch" for r in recs), proc)
    workers = _worker_pids(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    proc.communicate(timeout=180)
    assert proc.returncode != 0
    if (run / "summary.json").exists():
        pytest.skip("the run finished before a rank was killed")
    assert nf_run([str(path), "--resume", "--out", str(run), "--device", "cpu", "-q", "--no-onnx"]) == 2
    assert "trained on 2 processes" in capsys.readouterr().err
    proc = _torchrun(str(path), "--out", str(run), "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [(r["block"], r["epoch"]) for r in recs if r["event"] == "epoch"]
    assert len(epochs) == len(set(epochs)), f"an epoch ran twice: {epochs}"
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2


def test_demo_plan_on_two_ranks_is_within_3_points_of_one_process(tmp_path: Path) -> None:
    """The README demo's plan (small CNN, 16 MB) on 1,000 of the shipped images, 2 epochs (seeded: the
    comparison is the same on every run)."""
    env = {"NEUROFLUX_LIMIT": "1000,1000"}
    plan_file = tmp_path / "plan.json"
    from neuroflux.planner.cli import main as nf_plan

    assert (
        nf_plan(
            [
                str(ROOT / "examples" / "small_cnn.py"),
                "--budget",
                "16MB",
                "-o",
                str(plan_file),
                "-q",
                "--train-size",
                "1000",
                "--val-size",
                "1000",
                "--epochs",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    os.environ["NEUROFLUX_LIMIT"] = env["NEUROFLUX_LIMIT"]
    try:
        assert nf_run([str(plan_file), "--out", str(tmp_path / "one"), "--device", "cpu", "-q", "--no-onnx"]) == 0
    finally:
        os.environ.pop("NEUROFLUX_LIMIT")
    # Two ranks the way a user asks for them: nf-run --nproc 2 starts torchrun.
    proc = subprocess.run(
        [sys.executable, "-m", "neuroflux.runtime.cli", str(plan_file), "--nproc", "2", "--out", str(tmp_path / "two"),
         "--device", "cpu", "--no-onnx"],
        capture_output=True, text=True, timeout=400,
        env={**os.environ, "OMP_NUM_THREADS": "1", "NEUROFLUX_DIST_TIMEOUT": "60", **env},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["world_size"] == 2 and load_plan(plan_file).model.num_classes == 10
    assert abs(one["final_accuracy"] - two["final_accuracy"]) <= 0.03, (one["final_accuracy"], two["final_accuracy"])


def test_nproc_must_be_positive(tmp_path: Path) -> None:
    """(``--nproc 2`` itself runs in the demo test above.)"""
    _, path, _ = _plan(tmp_path, epochs=1)
    assert nf_run([str(path), "--nproc", "0", "--out", str(tmp_path / "r0")]) == 2
