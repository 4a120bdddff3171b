"""nf-run: the runtime against plain PyTorch, caching, resume, bad input."""

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
from helpers import tiny_plan, wait_for_metrics

from neuroflux.runtime.cli import main as nf_run
from neuroflux.runtime.heads import build_head
from neuroflux.runtime.runner import RunConfig, Runner, run_plan

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def test_unit_matches_plain_pytorch_local_learning(tmp_path: Path) -> None:
    plan, path, model_path = tiny_plan(tmp_path)
    assert len(plan.blocks) == 3
    run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    trained = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)

    # The same unit trained by hand in eager PyTorch: same init, same batches.
    sys.path.insert(0, str(tmp_path))
    import importlib

    tiny = importlib.import_module("tiny_model")
    r, b0 = plan.recipe, plan.blocks[0]
    torch.manual_seed(r.seed)
    net = tiny.model()
    u0 = plan.units[0]
    torch.manual_seed(r.seed + 1)  # heads are seeded apart from the model (runtime/assemble.py)
    head = build_head(u0.aux.kind, u0.output_shape, u0.aux.width, plan.model.num_classes)
    params = [net.conv1.weight, net.conv1.bias, net.bn1.weight, net.bn1.bias, *head.parameters()]
    opt = torch.optim.SGD(params, lr=b0.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, b0.steps) / b0.steps)))
    train, _ = tiny.datasets()
    x_all, y_all = train.tensors
    first_grad = None
    for epoch in range(b0.epochs):
        gen = torch.Generator().manual_seed(r.seed * 1_000_003 + 0 * 1009 + epoch)
        perm = torch.randperm(len(y_all), generator=gen)
        for i in range(0, len(perm), b0.batch_size):
            idx = perm[i : i + b0.batch_size]
            out = F.max_pool2d(F.relu(net.bn1(net.conv1(x_all[idx]))), 2)
            loss = F.cross_entropy(head(out), y_all[idx])
            loss.backward()
            if first_grad is None:
                first_grad = net.conv1.weight.grad.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
    model_state = trained["model"]
    key = next(k for k in model_state if k.endswith("conv1.weight"))
    torch.testing.assert_close(model_state[key], net.conv1.weight.detach(), rtol=1e-5, atol=1e-6)
    for name, p in head.named_parameters():
        torch.testing.assert_close(trained["heads"][0][name], p.detach(), rtol=1e-5, atol=1e-6)

    # Gradients of the first step, through the runtime's own trainer.
    from neuroflux.runtime.assemble import assemble
    from neuroflux.runtime.model_file import load_model_file
    from neuroflux.runtime.train import UnitTrainer

    asm = assemble(plan, load_model_file(model_path))
    t = UnitTrainer(
        asm.units[0], asm.heads[0], lr=0.0, momentum=0.0, weight_decay=0.0, total_steps=1, schedule="constant"
    )
    grads = {}
    w = asm.units[0].get_submodule("conv1").weight
    w.register_hook(lambda g: grads.setdefault("w", g.clone()))
    gen = torch.Generator().manual_seed(r.seed * 1_000_003)
    idx = torch.randperm(len(y_all), generator=gen)[: b0.batch_size]
    t.step(x_all[idx], y_all[idx])
    torch.testing.assert_close(grads["w"], first_grad, rtol=1e-5, atol=1e-7)


def test_later_blocks_never_run_earlier_modules(tmp_path: Path, monkeypatch) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    current = {"stage": None}
    calls: list[tuple[int, str]] = []
    original_run_stage = Runner._run_stage

    def run_stage(self, stage, *a, **k):
        current["stage"] = stage.index
        if stage.index == 0:  # hook the first block's modules once they exist
            for i in stage.unit_idx:
                stage.trainers[i].unit.register_forward_hook(
                    lambda m, inp, out, i=i: calls.append((current["stage"], f"u{i}"))
                )
        try:
            return original_run_stage(self, stage, *a, **k)
        finally:
            current["stage"] = None  # after training: export and throughput may run anything

    monkeypatch.setattr(Runner, "_run_stage", run_stage)
    run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    assert calls, "hooks never fired"
    assert {stage for stage, _ in calls if stage is not None} == {0}, (
        "a module of block 0 ran while a later block trained"
    )


def test_summary_files_and_onnx_predictions(tmp_path: Path, monkeypatch) -> None:
    from neuroflux.runtime.caches import KEEP_CACHES_ENV

    ort = pytest.importorskip("onnxruntime")
    monkeypatch.setenv(KEEP_CACHES_ENV, "1")  # the disk cache is checked below (by default it is deleted after use)
    plan, path, _ = tiny_plan(tmp_path, epochs=1, cache_location="disk", cache_dtype="float16")
    out = tmp_path / "run"
    assert nf_run([str(path), "--out", str(out), "--device", "cpu", "-q"]) == 0
    s = json.loads((out / "summary.json").read_text())
    for key in ("method", "final_accuracy", "final_exit", "final_params", "original_params", "wall_time_s", "blocks"):
        assert key in s
    for b in s["blocks"]:
        assert {"batch_size", "measured_peak_bytes", "predicted_peak_bytes", "exit_accuracy", "time_s"} <= set(b)
        assert b["measured_peak_bytes"] <= plan.budget_bytes
    assert s["method"] == "neuroflux" and 0 <= s["final_accuracy"] <= 1
    assert s["final_params"] <= s["original_params"]
    assert (out / "cache" / "block0.npy").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {rec["event"] for rec in lines} >= {"epoch", "block"}

    # The exported early-exit model predicts what the torch model predicts.
    from neuroflux.runtime.assemble import assemble, open_model_file
    from neuroflux.runtime.modules import Chain

    asm = assemble(plan, open_model_file(plan, path))
    k = plan.unit(s["final_exit"]).index
    final = Chain(asm.units[: k + 1], asm.heads[k])
    final.load_state_dict(torch.load(out / "final_model.pt"))
    x = torch.randn(6, *plan.model.input_shape)
    sess = ort.InferenceSession(str(out / "final_model.onnx"))
    onnx_out = sess.run(None, {"input": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx_out), final.eval()(x).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("baseline", ["bp", "bp-checkpoint", "bp-checkpoint-all"])
def test_baselines_write_the_same_files(tmp_path: Path, baseline: str) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    out = tmp_path / baseline
    assert nf_run([str(path), "--baseline", baseline, "--out", str(out), "--device", "cpu", "-q", "--no-onnx"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == baseline
    assert s["final_params"] == s["original_params"]
    assert s["blocks"][0]["batch_size"] == getattr(plan.baseline, baseline.replace("-", "_")).batch_size


def _nf_run_proc(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "neuroflux.runtime.cli", *args, "-q", "--no-onnx", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_sigkill_after_first_block_resumes_without_repeating(tmp_path: Path) -> None:
    plan, path, _ = tiny_plan(tmp_path, train=4096, epochs=3, cache_location="disk")
    out = tmp_path / "run"
    proc = _nf_run_proc(str(path), "--out", str(out))
    wait_for_metrics(out / "metrics.jsonl", lambda recs: any(r["event"] == "block" for r in recs), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "the run finished before it was killed; the test proves nothing"
    assert nf_run([str(path), "--resume", "--out", str(out), "--device", "cpu", "-q", "--no-onnx"]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [(r["block"], r["epoch"]) for r in recs if r["event"] == "epoch"]
    assert len(epochs) == len(set(epochs)), f"an epoch ran twice: {epochs}"
    assert set(epochs) == {(b, e) for b in range(len(plan.blocks)) for e in range(1, 4)}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_leaves_a_resumable_run(tmp_path: Path, sig) -> None:
    """Ctrl-C and SIGTERM (a scheduler's stop) end the same way: exit 130, the resume hint."""
    plan, path, _ = tiny_plan(tmp_path, train=2048, epochs=2)
    out = tmp_path / "run"
    proc = _nf_run_proc(str(path), "--out", str(out))
    wait_for_metrics(out / "metrics.jsonl", lambda recs: any(r["event"] == "epoch" for r in recs), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert nf_run([str(path), "--resume", "--out", str(out), "--device", "cpu", "-q", "--no-onnx"]) == 0
    assert (out / "summary.json").is_file()


def test_changed_model_file_is_refused(tmp_path: Path, capsys) -> None:
    plan, path, model = tiny_plan(tmp_path, epochs=1)
    model.write_text(model.read_text() + "\n# edited\n")
    assert nf_run([str(path), "--out", str(tmp_path / "r"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "changed since it was planned" in err and "--force" in err
    assert nf_run([str(path), "--out", str(tmp_path / "r2"), "-q", "--force", "--no-onnx", "--device", "cpu"]) == 0


def test_corrupt_and_newer_plans_are_refused(tmp_path: Path, capsys) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    data = json.loads(path.read_text())
    bad = tmp_path / "corrupt.json"
    bad.write_text(path.read_text()[:200])
    assert nf_run([str(bad), "-q"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    data_newer = {**data, "schema_version": "9.0"}
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(data_newer))
    assert nf_run([str(newer), "-q"]) == 2
    assert "newer than this NeuroFlux" in capsys.readouterr().err
    data_bad = {**data, "blocks": [{**data["blocks"][0], "batch_size": "large"}] + data["blocks"][1:]}
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps(data_bad))
    assert nf_run([str(invalid), "-q"]) == 2
    assert "blocks/0/batch_size" in capsys.readouterr().err
    assert nf_run([str(tmp_path / "missing.json"), "-q"]) == 2
    assert "not found" in capsys.readouterr().err


def test_resume_needs_a_checkpoint_and_out_must_be_fresh(tmp_path: Path, capsys) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    assert nf_run([str(path), "--resume", "--out", str(tmp_path / "empty"), "-q"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("x")
    assert nf_run([str(path), "--out", str(used), "-q"]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("rule,expected", [("sqrt", 0.2), ("linear", 0.4), ("none", 0.1)])
def test_lr_for_batch_scales_from_the_base_batch(rule: str, expected: float) -> None:
    from neuroflux.planner.config import lr_for_batch

    assert lr_for_batch(0.1, 512, base=128, rule=rule) == pytest.approx(expected)
    assert lr_for_batch(0.1, 128, base=128, rule=rule) == pytest.approx(0.1)
    with pytest.raises(KeyError):
        lr_for_batch(0.1, 64, base=128, rule="cubic")
