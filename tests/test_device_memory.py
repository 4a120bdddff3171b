"""The device terms of the memory model (library workspace, step overhead,
activation scale), the optimizer step the planner profiles, and the runtime
keeping evaluation and cache writes at the planned batch. All on the CPU:
the CUDA values come from device profiles measured on a GPU."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import ROOT, plan_for, tiny_plan
from torch import nn

from neuroflux.errors import NeuroFluxError
from neuroflux.planner.config import CPU_BATCH_TIME_TOLERANCE
from neuroflux.planner.device_memory import (
    DEFAULT_CUDA_CALIBRATION,
    DEFAULT_CUDA_WORKSPACE_BYTES,
    measure_memory_calibration,
)
from neuroflux.planner.device_profile import load_profile, native_mixed_precisions
from neuroflux.runtime.train import UnitTrainer
from neuroflux.schemas import load_plan, plan_from_dict, plan_to_dict

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow


def test_cpu_calibration_is_exact() -> None:
    """The fake-tensor prediction of a reference step equals MemTracker's
    measurement on the CPU: no overhead, no scale (unfloored)."""
    cal = measure_memory_calibration(torch.device("cpu"), floor=False)
    assert cal.step_overhead_bytes == 0 and cal.activation_scale == 1.0


def _profile(tmp_path: Path, **fields) -> Path:
    base = json.loads((ROOT / "benchmarks" / "device-profiles" / "h200.json").read_text())
    for k in ("workspace_bytes", "step_overhead_bytes", "activation_scale"):
        base.pop(k)
    base.update(fields)
    p = tmp_path / "gpu.json"
    p.write_text(json.dumps(base))
    return p


def test_cuda_plan_includes_workspace_and_calibration(tmp_path: Path) -> None:
    ws, over, scale = 50 * 2**20, 3 * 2**20, 1.25
    prof = _profile(tmp_path, workspace_bytes=ws, step_overhead_bytes=over, activation_scale=scale)
    cpu_result, _ = plan_for(ROOT / "examples" / "small_cnn.py", tmp_path / "cpu", budget=120 * 2**20)
    result, _ = plan_for(
        ROOT / "examples" / "small_cnn.py", tmp_path, budget=120 * 2**20, device_kind="cuda", device_profile=str(prof)
    )
    plan, cpu = result.plan, cpu_result.plan
    assert (plan.device.workspace_bytes, plan.device.step_overhead_bytes, plan.device.activation_scale) == (
        ws,
        over,
        scale,
    )
    assert (cpu.device.workspace_bytes, cpu.device.step_overhead_bytes, cpu.device.activation_scale) == (0, 0, 1.0)
    # The batch rule is a CPU default only: off for a GPU until measured there.
    assert (plan.solver.batch_time_tolerance, cpu.solver.batch_time_tolerance) == (0.0, CPU_BATCH_TIME_TOLERANCE)
    for u, c in zip(plan.units, cpu.units):  # calibration applied to every unit's dyn terms, not to its state
        assert u.profile.static_bytes == c.profile.static_bytes
        assert u.profile.dyn_fixed_bytes == c.profile.dyn_fixed_bytes + over
        assert u.profile.dyn_per_sample_bytes == math.ceil(c.profile.dyn_per_sample_bytes * scale)
    cap = plan.budget_bytes * (1 - plan.device.margin_fraction)
    for b in plan.blocks:
        units = [plan.unit(n) for n in b.units]
        peak = (
            ws
            + sum(u.profile.static_bytes for u in units)
            + max(u.profile.dyn_fixed_bytes + u.profile.dyn_per_sample_bytes * b.batch_size for u in units)
        )
        assert b.predicted_peak_bytes == peak <= cap
    assert plan.baseline.bp.predicted_peak_bytes <= cap
    assert plan.baseline.bp.batch_size <= cpu.baseline.bp.batch_size


def test_cuda_plan_without_measured_terms_uses_the_defaults(tmp_path: Path) -> None:
    result, _ = plan_for(
        ROOT / "examples" / "small_cnn.py",
        tmp_path,
        budget=200 * 2**20,
        device_kind="cuda",
        device_profile=str(_profile(tmp_path)),
    )
    d = result.plan.device
    assert d.workspace_bytes == DEFAULT_CUDA_WORKSPACE_BYTES
    assert (d.step_overhead_bytes, d.activation_scale) == dataclasses.astuple(DEFAULT_CUDA_CALIBRATION)


def test_too_small_budget_names_the_workspace(tmp_path: Path) -> None:
    from neuroflux.planner.solve import InfeasibleBudget

    with pytest.raises(InfeasibleBudget, match="library workspace") as e:
        plan_for(
            ROOT / "examples" / "small_cnn.py",
            tmp_path,
            budget=40 * 2**20,
            device_kind="cuda",
            device_profile=str(_profile(tmp_path)),
        )
    assert e.value.min_budget_bytes > DEFAULT_CUDA_WORKSPACE_BYTES


def test_plans_of_schema_2_0_still_load(tmp_path: Path) -> None:
    plan, path, _ = tiny_plan(tmp_path)
    data = plan_to_dict(plan)
    data["schema_version"] = "2.0"
    for k in ("workspace_bytes", "step_overhead_bytes", "activation_scale"):
        del data["device"][k]
    old = plan_from_dict(data)
    assert old.device.workspace_bytes == 0 and old.device.activation_scale == 1.0
    assert load_plan(path) == plan


@pytest.mark.parametrize(
    "field,value", [("workspace_bytes", -1), ("step_overhead_bytes", -5), ("activation_scale", 0.9)]
)
def test_bad_profile_terms_are_refused(tmp_path: Path, field: str, value: float) -> None:
    with pytest.raises(NeuroFluxError, match="re-measure"):
        load_profile(_profile(tmp_path, **{field: value}))


@pytest.mark.parametrize("foreach", [False, True])
def test_weight_decay_in_place_matches_torch_sgd(foreach: bool) -> None:
    """UnitTrainer adds weight decay to the gradients itself (no gradient
    copy in the multi-tensor step); the update equals torch's SGD."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    b = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    b.load_state_dict(a.state_dict())
    t = UnitTrainer(
        a, None, lr=0.1, momentum=0.9, weight_decay=0.01, total_steps=100, schedule="constant", foreach=foreach
    )
    opt = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(4):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        t.step(x, y)
        nn.functional.cross_entropy(b(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    state = t.state_dict()  # a checkpoint never carries decay in SGD's groups, and loading one clears it
    state["opt"]["param_groups"][0]["weight_decay"] = 0.01
    t.load_state_dict(state)
    assert t.opt.param_groups[0]["weight_decay"] == 0.0


def test_foreach_profile_equals_the_loop_profile() -> None:
    """The step the planner profiles for CUDA (multi-tensor) peaks where the
    CPU loop does: linear in the batch, no gradient copy."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from neuroflux.planner.profile import SGDConfig, profile_step

    fake = FakeTensorMode()
    with fake:
        m = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10)
        )
    sgd = SGDConfig(weight_decay=5e-4)
    loop = profile_step(m, None, (3, 8, 8), 10, fake_mode=fake, sgd=sgd)
    multi = profile_step(m, None, (3, 8, 8), 10, fake_mode=fake, sgd=sgd, foreach=True)
    assert (loop.static_bytes, loop.dyn_fixed_bytes, loop.dyn_per_sample_bytes) == (
        multi.static_bytes,
        multi.dyn_fixed_bytes,
        multi.dyn_per_sample_bytes,
    )


def test_evaluation_and_cache_writes_run_at_the_planned_batch(tmp_path: Path, monkeypatch) -> None:
    """Inference at the training batch needs less than the training step the
    plan proved fits, so evaluation and cache writes stay inside the budget
    (they ran at 256 or more before, and broke the cap on an H200)."""
    from neuroflux.runtime import data as rdata
    from neuroflux.runtime.runner import RunConfig, run_plan

    plan, path, _ = tiny_plan(tmp_path, train=256)
    seen: list[int] = []
    orig = rdata.TensorCache.index_batches

    def spy(self, batch, *a, **k):
        seen.append(batch)
        return orig(self, batch, *a, **k)

    monkeypatch.setattr(rdata.TensorCache, "index_batches", spy)
    run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", export_onnx=False, throughput_batch=4))
    assert seen and set(seen) <= {b.batch_size for b in plan.blocks}


def test_nf_profile_cli(tmp_path: Path, capsys) -> None:
    from neuroflux.planner.device_profile import main as nf_profile

    out = tmp_path / "cpu.json"
    assert nf_profile(["--device", "cpu", "-o", str(out)]) == 0
    prof = load_profile(out)
    assert prof.kind == "cpu" and prof.source == "measured" and prof.workspace() == 0
    native = native_mixed_precisions(torch.device("cpu"))  # bf16 where this CPU has avx512_bf16 or AMX
    assert [p for p in ("bf16", "fp16") if prof.flops_for(p)] == native
    assert nf_profile(["-o", str(tmp_path / "missing" / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert nf_profile(["--device", "cuda", "-o", str(out)]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_nf_run_warns_when_the_plan_was_for_another_device(tmp_path: Path, caplog) -> None:
    from neuroflux.runtime.runner import RunConfig, run_plan
    from neuroflux.schemas import save_plan

    plan, path, _ = tiny_plan(tmp_path, train=64)
    gpu_plan = dataclasses.replace(plan, device=dataclasses.replace(plan.device, kind="cuda", name="NVIDIA H200"))
    save_plan(gpu_plan, path)
    with caplog.at_level("WARNING"):
        run_plan(
            gpu_plan,
            path,
            RunConfig(out_dir=tmp_path / "run", export_onnx=False, throughput_batch=4, max_steps_per_epoch=1),
        )
    assert "made for NVIDIA H200 and runs on the CPU" in caplog.text


def _cpu_profile(tmp_path: Path, **fields) -> Path:
    base = {"name": "test CPU", "kind": "cpu", "flops_per_s": 1e11, "op_overhead_s": 4e-6, "source": "measured"}
    p = tmp_path / "cpu.json"
    p.write_text(json.dumps({**base, "date": "2026-12-02", "torch": torch.__version__, **fields}))
    return p


def test_plans_time_steps_at_the_matmul_throughput_of_their_precision(tmp_path: Path, caplog) -> None:
    """A bf16 plan's cost model uses the profile's bf16 throughput; a profile
    without one falls back to fp32's and says so (the source and a warning)."""
    from neuroflux.planner.config import PlanConfig
    from neuroflux.planner.target import device_target

    def target(prof: Path, precision: str):
        cfg = PlanConfig.from_options(
            budget_bytes=2**26, budget_text="64MB", device_profile=str(prof), precision=precision
        )
        return device_target(cfg)

    with_bf16 = _cpu_profile(tmp_path, bf16_flops_per_s=2.5e11)
    assert target(with_bf16, "fp32").speed.flops_per_s == 1e11
    t = target(with_bf16, "bf16")
    assert t.speed.flops_per_s == 2.5e11 and "bf16 throughput" in t.speed_source and t.speed.op_overhead_s == 4e-6
    with caplog.at_level("WARNING"):
        t = target(_cpu_profile(tmp_path), "bf16")
    assert t.speed.flops_per_s == 1e11 and "no bf16 measured" in t.speed_source
    assert "no bf16 throughput" in caplog.text and "nf-profile" in caplog.text
    with pytest.raises(NeuroFluxError, match="re-measure"):
        load_profile(_cpu_profile(tmp_path, fp16_flops_per_s=-1.0))
    with pytest.raises(NeuroFluxError, match="not a number"):
        load_profile(_cpu_profile(tmp_path, bf16_flops_per_s="fast"))


def test_the_cached_profile_gets_a_precisions_throughput_measured_once(tmp_path: Path, monkeypatch) -> None:
    """This machine's cached profile (fp32) gains the bf16 throughput the first
    time a bf16 plan asks, keeps its fp32 numbers, and is not re-measured after."""
    from neuroflux.planner import device_profile

    monkeypatch.setenv("NEUROFLUX_CACHE", str(tmp_path))
    monkeypatch.setattr(device_profile, "native_mixed_precisions", lambda dev: [])  # an fp32-only first measurement
    first, path = device_profile.cached_profile("cpu")
    assert first.bf16_flops_per_s is None
    prof, again = device_profile.cached_profile("cpu", "bf16")
    assert again == path and prof.bf16_flops_per_s and prof.bf16_flops_per_s > 0
    assert (prof.flops_per_s, prof.op_overhead_s) == (first.flops_per_s, first.op_overhead_s)
    assert load_profile(path) == prof, "cached"
    monkeypatch.setattr(device_profile, "measure_mixed_flops", lambda *a, **k: pytest.fail("re-measured"))
    assert device_profile.cached_profile("cpu", "bf16")[0] == prof
