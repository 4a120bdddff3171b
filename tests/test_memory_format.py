"""The activations' memory format (``--memory-format``): channels_last by
default on a CPU target, contiguous on CUDA; weights laid out in place
(fake and meta parameters too, the ones the planner profiles); a run in
either layout trains the same numbers; old plans read as contiguous; a
device profile timed in the other layout is named. Peaks in both layouts
against MemTracker: test_memory.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from neuroflux.planner.cli import main as nf_plan
from neuroflux.planner.config import PlanConfig
from neuroflux.planner.device_profile import DeviceProfile, save_profile
from neuroflux.planner.target import device_target
from neuroflux.runtime import train as train_mod
from neuroflux.runtime.cli import main as nf_run
from neuroflux.runtime.config import RunConfig
from neuroflux.runtime.precision import Precision
from neuroflux.runtime.runner import run_plan
from neuroflux.schemas.plan import load_plan, plan_from_dict

CL = torch.channels_last


def _unit() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("where", ["real", "meta", "fake"])
def test_weights_are_laid_out_in_place_on_real_meta_and_fake_tensors(where: str) -> None:
    if where == "fake":
        with FakeTensorMode():
            m = _unit()
    else:
        m = _unit().to("meta") if where == "meta" else _unit()
    params = list(m.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    Precision("fp32", "cpu", "channels_last").format_modules(m, None)
    assert [id(p) for p in m.parameters()] == [id(p) for p in params], "the same Parameter objects"
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], m.parameters()))
    assert m[0].weight.is_contiguous(memory_format=CL) and not m[0].weight.is_contiguous()
    assert m[3].weight.is_contiguous(), "only 4-d weights change"
    x = Precision("fp32", "cpu", "channels_last").randn(2, (3, 6, 6), device="meta")
    assert x.is_contiguous(memory_format=CL) and x.shape == (2, 3, 6, 6)
    assert Precision().randn(2, (3, 6, 6), device="meta").is_contiguous()


def test_the_layout_defaults_to_the_targets_and_old_plans_read_as_contiguous(tmp_path: Path) -> None:
    base = dict(budget_bytes=10**9, budget_text="1GB")
    assert PlanConfig.from_options(**base).memory_format == "channels_last"
    assert PlanConfig.from_options(**base, device_kind="cuda").memory_format == "contiguous"
    assert PlanConfig.from_options(**base, memory_format="contiguous").memory_format == "contiguous"
    path = _demo_plan(tmp_path, "auto")
    data = json.loads(path.read_text())
    assert data["recipe"]["memory_format"] == "channels_last"
    del data["recipe"]["memory_format"]
    data["schema_version"] = "2.9"
    assert plan_from_dict(data).recipe.memory_format == "contiguous"
    # A layout nobody knows, edited into a plan, is refused by nf-run with exit 2 and what to do.
    data["recipe"]["memory_format"] = "nhwc"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert nf_run([str(bad), "--out", str(tmp_path / "run"), "-q", "--no-onnx", "--device", "cpu"]) == 2
    assert not (tmp_path / "run").exists()


def _demo_plan(tmp_path: Path, memory_format: str, *extra: str) -> Path:
    path = tmp_path / f"plan-{memory_format}.json"
    args = [str(ROOT / "examples" / "small_cnn.py"), "--budget", "16MB", "--memory-format", memory_format]
    args += ["--train-size", "96", "--val-size", "32", "--epochs", "2", "--max-batch", "16", "-q", "-o", str(path)]
    # Fixed speeds: the same plan in both layouts (a profile's speeds are per layout).
    args += ["--device-tflops", "0.1", "--op-overhead-us", "5", *extra]
    assert nf_plan(args) == 0
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", ["neuroflux", "bp"])
def test_a_channels_last_run_trains_the_numbers_a_contiguous_one_does(tmp_path: Path, monkeypatch, method) -> None:
    """The same plan in both layouts (the solver's inputs do not depend on the
    layout with fixed speeds): every step's input arrives laid out as the plan
    says, and the losses agree to float rounding."""
    monkeypatch.setenv("NEUROFLUX_LIMIT", "96,32")
    seen: list[tuple[bool, bool, bool]] = []
    step = train_mod.UnitTrainer.step

    def spy(self, x, y):
        conv = next((m for m in self.unit.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is not None:
            w = conv.weight
            seen.append((x.is_contiguous(memory_format=CL) and not x.is_contiguous(),
                         w.is_contiguous(memory_format=CL), w.is_contiguous()))  # fmt: skip
        return step(self, x, y)

    losses = {}
    # fp32 caches: an fp16 cache rounds a last-bit difference to a whole fp16 step, which later blocks amplify.
    plans = {fmt: _demo_plan(tmp_path, fmt, "--cache-dtype", "float32") for fmt in ("contiguous", "channels_last")}
    monkeypatch.setattr(train_mod.UnitTrainer, "step", spy)
    for fmt, path in plans.items():
        seen.clear()
        cfg = RunConfig(out_dir=tmp_path / fmt, device="cpu", export_onnx=False, loader_workers=0,
                        max_steps_per_epoch=3, method=method)  # fmt: skip
        run_plan(load_plan(path), path, cfg)
        recs = [json.loads(line) for line in (tmp_path / fmt / "metrics.jsonl").read_text().splitlines()]
        losses[fmt] = [x for r in recs if r["event"] == "epoch" for x in r["train_loss"]]
        # The data's 1-channel images (and a first conv's 1-channel weights) are in both layouts at once.
        # BP's only input is the data: it enters the first convolution as it is.
        if fmt == "channels_last":
            assert all(w_cl for _, w_cl, _ in seen) and (method == "bp" or any(x_cl for x_cl, _, _ in seen))
        else:
            assert not any(x_cl for x_cl, _, _ in seen) and all(w for _, _, w in seen)
    assert len(losses["contiguous"]) == len(losses["channels_last"]) > 0
    assert losses["channels_last"] == pytest.approx(losses["contiguous"], rel=1e-3)


def test_a_device_profile_timed_in_the_other_layout_is_named(tmp_path: Path, caplog) -> None:
    prof = DeviceProfile(name="cpu", kind="cpu", flops_per_s=1e11, op_overhead_s=1e-5, source="measured",
                         date="2026-12-03", torch="2", speed_method="step-fit", memory_format="contiguous")  # fmt: skip
    save_profile(prof, tmp_path / "p.json")
    cfg = PlanConfig.from_options(budget_bytes=10**9, budget_text="1GB", device_profile=str(tmp_path / "p.json"))
    with caplog.at_level(logging.WARNING):
        device_target(cfg)
    assert "nf-profile --memory-format channels_last" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        device_target(cfg.replace(memory_format="contiguous"))
    assert "memory-format" not in caplog.text
