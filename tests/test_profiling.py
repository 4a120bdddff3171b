"""The planner's profiling against PyTorch's own accounting, and its shortcuts
against the long way: StepMeter against MemTracker and FlopCounterMode, the
composed per-head profiles against a full step per head, forked profiling
against a serial run."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from helpers import ROOT, plan_for
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from neuroflux.planner.heads import head_widths
from neuroflux.planner.parallel import map_forked
from neuroflux.planner.profile import (
    SGDConfig,
    StepMeter,
    profile_step,
    state_bytes,
    state_tensors,
)
from neuroflux.planner.profile_compose import profile_unit_options
from neuroflux.planner.step_meter import flop_counter
from neuroflux.planner.units import find_units, propagate_shapes
from neuroflux.runtime.graph import split_units, trace
from neuroflux.runtime.heads import build_head
from neuroflux.runtime.model_file import load_model_file
from neuroflux.runtime.modules import CheckpointedChain
from neuroflux.runtime.train import UnitTrainer

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow


def _units(model: str, fake: FakeTensorMode):
    mf = load_model_file(ROOT / "examples" / f"{model}.py")
    with fake:
        m = mf.build()
    shape = tuple(mf.input_shape())
    gm = trace(m, shape)
    propagate_shapes(gm, shape, fake)
    spans = find_units(gm)
    return gm, shape, spans, split_units(gm, [s.nodes for s in spans])


def _trainer(unit, head) -> UnitTrainer:
    t = UnitTrainer(unit, head, lr=0.1, momentum=0.9, weight_decay=5e-4, total_steps=100, schedule="constant")
    t.train(True)
    return t


@pytest.mark.parametrize("model", ["small_cnn", "resnet18", "mobilenetv2"])
def test_step_meter_equals_memtracker_and_flop_counter(model: str) -> None:
    """Real tensors, a unit with its head and the checkpointed whole model:
    the meter's peak is MemTracker's to the byte, its FLOPs FlopCounterMode's
    (with the convolution backward's formula corrected for groups, which
    MobileNetV2's depthwise convolutions need)."""
    torch.manual_seed(0)
    gm, shape, spans, mods = _units(model, FakeTensorMode())
    real_gm = trace(load_model_file(ROOT / "examples" / f"{model}.py").build(), shape)
    real_mods = split_units(real_gm, [s.nodes for s in spans])
    k = 1
    cases = [
        (real_mods[k], build_head("pooled", spans[k].output_shape, 16, 10), spans[k].input_shape),
        (CheckpointedChain(real_mods), None, shape),
    ]
    for unit, head, in_shape in cases:
        t = _trainer(unit, head)
        x, y = torch.randn(8, *in_shape), torch.randint(0, 10, (8,))
        t.step(x, y)  # momentum buffers
        tracker = MemTracker()
        tracker.track_external(*t.modules(), t.opt)
        gc.collect()
        gc.disable()
        try:
            with tracker:
                t.step(x, y)
            with flop_counter() as fc:  # alone: its module tracker keeps recomputed activations alive
                t.step(x, y)
            ref_peak = sum(d["Total"] for d in tracker.get_tracker_snapshot("peak").values())
            meter = StepMeter(state_tensors(t.modules(), t.opt, grads=False))
            with meter:
                t.step(x, y)
        finally:
            gc.enable()
        assert meter.peak == ref_peak, (type(unit).__name__, meter.peak, ref_peak)
        assert meter.flops == fc.get_total_flops() > 0
        assert meter.ops > 10


@pytest.mark.parametrize("flags", [None, (False, True, True, False)], ids=["every unit", "u1 and u2"])
def test_checkpointed_baseline_prediction_matches_a_real_step(flags) -> None:
    """The fake-tensor prediction of BP with activation checkpointing (of
    every unit, or of the units a budget-optimal baseline picks) equals
    MemTracker's accounting of the real step (the planner measured it with
    FlopCounterMode active too, whose module tracker keeps recomputed
    activations alive: half as much again)."""
    fake = FakeTensorMode()
    gm, shape, spans, mods = _units("small_cnn", fake)
    assert flags is None or len(flags) == len(mods)
    pred = profile_step(CheckpointedChain(mods, checkpointed=flags), None, shape, 10, fake_mode=fake)
    torch.manual_seed(0)
    real_gm = trace(load_model_file(ROOT / "examples" / "small_cnn.py").build(), shape)
    t = _trainer(CheckpointedChain(split_units(real_gm, [s.nodes for s in spans]), checkpointed=flags), None)
    b = 16
    x, y = torch.randn(b, *shape), torch.randint(0, 10, (b,))
    t.step(x, y)
    tracker = MemTracker()
    tracker.track_external(*t.modules(), t.opt)
    with tracker:
        t.step(torch.randn(b, *shape), torch.randint(0, 10, (b,)))
    real = sum(d["Total"] for d in tracker.get_tracker_snapshot("peak").values())
    assert state_bytes(t.modules(), t.opt) == pred.static_bytes
    assert abs(pred.peak_bytes(b) - real) <= 0.001 * real, (pred.peak_bytes(b), real)


@pytest.mark.parametrize(
    "model,head_kind,foreach",
    [
        ("small_cnn", "pooled", None),
        ("small_cnn", "conv", True),
        ("small_cnn", "dgl", None),
        ("small_cnn", "stage", True),
        ("resnet18", "pooled", True),
        ("resnet18", "conv", None),
        ("mobilenetv2", "pooled", None),
    ],
)
def test_composed_head_profiles_equal_a_full_step_per_head(model: str, head_kind: str, foreach) -> None:
    """One step of the unit and one of each head alone give every option's
    profile exactly as a full unit+head step does (memory to the byte, FLOPs,
    ops), on every unit but the last (the model's own head)."""
    fake = FakeTensorMode()
    _, _, spans, mods = _units(model, fake)
    units = list(zip(spans[:-1], mods[:-1]))
    if model == "mobilenetv2":
        units = units[::4]
    checked = 0
    for span, mod in units:
        with fake:
            heads = [build_head(k, span.output_shape, w, 10) for k, w in head_widths(span.output_shape, kind=head_kind)]
        sgd = SGDConfig(momentum=0.9, weight_decay=5e-4)
        direct = [profile_step(mod, h, span.input_shape, 10, fake_mode=fake, sgd=sgd, foreach=foreach) for h in heads]
        composed = profile_unit_options(
            mod, heads, span.input_shape, span.output_shape, 10, fake_mode=fake, sgd=sgd, foreach=foreach
        )
        assert composed == direct, span.index
        checked += len(heads)
    assert checked >= 8


def test_map_forked_returns_every_result_in_job_order() -> None:
    calls = []
    out = map_forked(lambda i: i * i, [3, 1, 2, 0], workers=2, on_done=calls.append)
    assert out == {0: 0, 1: 1, 2: 4, 3: 9}
    assert sorted(calls) == [0, 1, 2, 3]
    with pytest.raises(ZeroDivisionError):
        map_forked(lambda i: 1 // i, [1, 0], workers=2)


def test_plan_is_the_same_with_one_or_several_profiling_workers(tmp_path) -> None:
    plans = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        out.mkdir()
        _, path = plan_for(ROOT / "examples" / "resnet18.py", out, budget=150 * 10**6, workers=workers)
        plan = json.loads(path.read_text())
        plan["solver"].pop("wall_time_s")
        plans.append(plan)
    assert plans[0] == plans[1]
