"""Mixed precision (``--precision bf16|fp16``) through the runtime: the demo
plan trains in bf16 with NeuroFlux and with BP and resumes after a kill,
a bf16 disk cache reads back bit for bit, fp16 scales each unit's loss and keeps its
scale across a resume, and a CPU without native support is refused with
what to do. Peaks under autocast are tested in test_memory.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, kill_after_event

from neuroflux.planner.cli import main as nf_plan
from neuroflux.runtime.cli import main as nf_run
from neuroflux.runtime.config import RunConfig
from neuroflux.runtime.data import CacheWriter, numpy_dtype
from neuroflux.runtime.precision import EMULATED_PRECISION_ENV, Precision
from neuroflux.runtime.runner import run_plan
from neuroflux.runtime.train import UnitTrainer
from neuroflux.schemas.plan import load_plan

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow

LIMIT = "96,32"
STEPS = 1
"""Steps per epoch: emulated bf16 (a CPU without native bf16, such as an
AVX2-only one) runs the demo's 128-channel convolutions at about 1 s a step."""


def _demo_plan(tmp_path: Path, precision: str, *extra: str) -> Path:
    path = tmp_path / "plan.json"
    args = [str(ROOT / "examples" / "small_cnn.py"), "--budget", "16MB", "--precision", precision, "-o", str(path)]
    args += ["--train-size", LIMIT.split(",")[0], "--val-size", LIMIT.split(",")[1], "--epochs", "2", "-q"]
    assert nf_plan([*args, "--max-batch", "16", *extra]) == 0
    return path


def _run(path: Path, out: Path, **kw) -> dict:
    cfg = RunConfig(out_dir=out, device="cpu", export_onnx=False, loader_workers=0, max_steps_per_epoch=STEPS, **kw)
    return run_plan(load_plan(path), path, cfg)


def test_bf16_neuroflux_and_bp_train_the_demo_plan_and_resume_after_a_kill(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NEUROFLUX_LIMIT", LIMIT)
    monkeypatch.setenv(EMULATED_PRECISION_ENV, "1")
    path = _demo_plan(tmp_path, "bf16")
    plan = load_plan(path)
    assert plan.recipe.precision == "bf16" and len(plan.blocks) >= 2
    dtypes = {b.cache.dtype for b in plan.blocks if b.cache is not None}
    assert dtypes <= {"bfloat16"}, "caches are stored at the compute precision"
    for method, event in (("neuroflux", "block"), ("bp", "epoch")):
        out = tmp_path / method
        with monkeypatch.context() as m:
            kill_after_event(m, event)
            with pytest.raises(KeyboardInterrupt):
                _run(path, out, method=method)
        assert not (out / "summary.json").exists()
        summary = _run(path, out, method=method, resume=True)
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        epochs = [(r["block"], r["epoch"]) for r in recs if r["event"] == "epoch"]
        assert len(epochs) == len(set(epochs)), f"{method}: an epoch ran twice: {epochs}"
        losses = [x for r in recs if r["event"] == "epoch" for x in r["train_loss"]]
        assert losses and all(math.isfinite(x) for x in losses), (method, losses)
        assert 0 <= summary["final_accuracy"] <= 1 and summary["blocks"][-1]["time_breakdown"]["train_s"] > 0


def test_a_bf16_disk_cache_holds_int16_bits_and_reads_back_exactly(tmp_path: Path) -> None:
    out = torch.randn(10, 3, 4, 4) * 100
    writer = CacheWriter(10, (3, 4, 4), dtype="bfloat16", location="disk", path=tmp_path / "block0.npy")
    writer.append(out[:6])
    writer.append(out[6:])
    cache = writer.finish(torch.arange(10), out_dtype=torch.bfloat16)
    assert np.load(tmp_path / "block0.npy", mmap_mode="r").dtype == numpy_dtype("bfloat16") == np.int16
    xb, yb = cache.take(torch.tensor([7, 0, 3]), torch.device("cpu"))
    assert xb.dtype == torch.bfloat16 and yb.tolist() == [7, 0, 3]
    assert torch.equal(xb, out[[7, 0, 3]].to(torch.bfloat16))


def test_fp16_scales_each_units_loss_and_a_checkpoint_keeps_the_scale() -> None:
    torch.manual_seed(0)
    unit = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU())
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
    fp16 = Precision("fp16", "cpu")

    def trainer() -> UnitTrainer:
        return UnitTrainer(
            unit, head, lr=0.05, momentum=0.9, weight_decay=5e-4, total_steps=10, schedule="constant", precision=fp16
        )

    t = trainer()
    assert t.scaler is not None
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    before = [p.detach().clone() for p in unit.parameters()]
    out, loss, _ = t.step(x, y)
    assert out.dtype == torch.float16 and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, unit.parameters())), "the step updated the unit"
    assert all(p.dtype == torch.float32 for p in unit.parameters()), "weights stay fp32"
    t.scaler.update(1024.0)  # a scale the default would not have
    again = trainer()
    again.load_state_dict(t.state_dict())
    assert again.scaler is not None and again.scaler.get_scale() == 1024.0


def test_a_cpu_without_native_bf16_is_refused_with_what_to_do(tmp_path: Path, monkeypatch, capsys) -> None:
    path = _demo_plan(tmp_path, "bf16")
    monkeypatch.delenv(EMULATED_PRECISION_ENV, raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert nf_run([str(path), "--out", str(tmp_path / "r"), "-q", "--no-onnx", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no native bf16" in err and "--precision fp32" in err and EMULATED_PRECISION_ENV in err
    assert "Traceback" not in err


def test_cost_measure_times_the_step_at_the_plans_precision() -> None:
    """``--cost measure`` times the real step under the plan's autocast, on the
    input dtype the unit really receives (a bf16 cache's), not an fp32 step."""
    from neuroflux.planner.profile import measure_step_time

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Linear(4 * 8 * 8, 3)
            self.seen: set[tuple[torch.dtype, torch.dtype]] = set()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            self.seen.add((x.dtype, y.dtype))
            return self.fc(y.flatten(1))

    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        probe = Probe()
        fixed, per = measure_step_time(
            probe,
            (2, 8, 8),
            3,
            device=torch.device("cpu"),
            batches=(2, 4),
            reps=1,
            precision=precision,
            input_dtype=dtype,
        )
        assert probe.seen == {(dtype, dtype)} and fixed >= 0 and per >= 0
