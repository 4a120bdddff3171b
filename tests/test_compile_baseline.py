"""``bp-compile``: the plan's grid (batches with their rates, ratios) and its
checks; the CPU peak of a step from the profiler's allocation record against
MemTracker's; the search on the device (the fastest pair that fits, nothing
over the cap) and its training; a resume trains the same choice without
searching again."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import kill_after_event, tiny_plan
from torch._dynamo.utils import counters

import neuroflux.runtime.compile_baseline as cb
import neuroflux.runtime.runner as runner_mod
from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.config import RunConfig
from neuroflux.runtime.memory import allocation_peak, tracked_step
from neuroflux.runtime.runner import run_plan
from neuroflux.runtime.train import StepStats, UnitTrainer
from neuroflux.schemas.plan import PlanError, plan_from_dict, plan_to_dict, save_plan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compile")
    plan, path, model = tiny_plan(tmp, epochs=1)
    return plan, path


def test_the_plan_lists_the_grid_from_below_bps_batch_with_its_rates(planned) -> None:
    plan, _ = planned
    bc = plan.baseline.bp_compile
    assert bc is not None and bc.ratios == [1.0, 0.5, 0.2]
    batches = [c.batch_size for c in bc.candidates]
    assert batches == sorted(set(batches)) and batches[0] <= plan.baseline.bp.batch_size
    for c in bc.candidates:
        assert c.steps == bc.epochs * math.ceil(plan.recipe.train_size / c.batch_size)
        assert c.lr == pytest.approx(plan.recipe.lr * math.sqrt(c.batch_size / plan.recipe.base_batch_size))
    assert plan_from_dict(plan_to_dict(plan)) == plan


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"ratios": [0.0]}, "ratios"),
        ({"ratios": [1.5]}, "ratios"),
        ({"candidates": "reversed"}, "ascend"),
        ({"shuffle_seed": -1}, "shuffle_seed"),
    ],
)
def test_a_bad_grid_is_refused_at_load(planned, edit, words) -> None:
    plan, _ = planned
    data = plan_to_dict(plan)
    grid = data["baseline"]["bp_compile"]
    for k, v in edit.items():
        grid[k] = grid[k][::-1] if v == "reversed" else v
    with pytest.raises(PlanError, match=words):
        plan_from_dict(data)


def test_the_profiler_peak_of_an_eager_step_is_memtrackers() -> None:
    from tiny_model import Tiny

    torch.manual_seed(0)
    model = Tiny()
    t = UnitTrainer(model, None, lr=0.1, momentum=0.9, weight_decay=5e-4, total_steps=10, schedule="cosine")
    x, y = torch.randn(32, 1, 16, 16), torch.randint(0, 4, (32,))
    t.step(x, y)  # the optimizer's state exists from here on
    tracked = tracked_step([t], [x.clone()], y, StepStats(1, torch.device("cpu")), prefix=torch.nn.Identity())
    from neuroflux.runtime.memory import live_bytes

    x2 = x.clone()
    alive = live_bytes([model], [t.opt], [x2, y])
    measured = alive + allocation_peak(lambda: t.step(x2, y))
    assert measured == pytest.approx(tracked, rel=0.03)


def _run(path: Path, out: Path, **kw) -> dict:
    from neuroflux.schemas.plan import load_plan

    cfg = RunConfig(
        out_dir=out, method="bp-compile", device="cpu", export_onnx=False, loader_workers=0, throughput_batch=4, **kw
    )
    return run_plan(load_plan(path), path, cfg)


def _with_grid(plan, path: Path, *, ratios, batches, budget: int | None = None) -> Path:
    bc = plan.baseline.bp_compile
    grid = dataclasses.replace(bc, ratios=ratios, candidates=[c for c in bc.candidates if c.batch_size in batches])
    edited = dataclasses.replace(plan, baseline=dataclasses.replace(plan.baseline, bp_compile=grid))
    if budget is not None:
        device = dataclasses.replace(edited.device, budget_bytes=budget)
        edited = dataclasses.replace(edited, budget_bytes=budget, device=device)
    out = path.with_name(f"plan-{'-'.join(map(str, batches))}-{budget}.json")
    save_plan(edited, out)
    return out


def test_bp_compile_trains_the_fastest_pair_that_fits_and_resumes_without_searching(
    planned, tmp_path: Path, monkeypatch
) -> None:
    plan, path = planned
    small, large = (c.batch_size for c in plan.baseline.bp_compile.candidates[:2])
    both = _with_grid(plan, path, ratios=[1.0, 0.5], batches=[small, large])
    # Timing decides the choice; here ratio 0.5 is made to look twice as slow, so that the choice is not the
    # last ratio searched: its model is compiled again under its own ratio before training.
    probe = cb._probe

    def slower_at_half(*a, **k):
        p, first = probe(*a, **k)
        # (and the smaller batch slower too: the choice is then (1.0, large) whatever the machine's load)
        slow = p.train_s and (p.ratio == 0.5 or p.batch_size == small)
        return (dataclasses.replace(p, train_s=p.train_s * 2) if slow else p), first

    monkeypatch.setattr(cb, "_probe", slower_at_half)
    graphs: list[int] = []
    stage_of = runner_mod.compile_stage

    def counted(*a, **k):
        stage = stage_of(*a, **k)
        graphs.append(counters["stats"]["unique_graphs"])
        return stage

    monkeypatch.setattr(runner_mod, "compile_stage", counted)
    s = _run(both, tmp_path / "both")
    monkeypatch.undo()
    rec = s["compile"]
    assert s["method"] == "bp-compile" and [(p["ratio"], p["batch_size"]) for p in rec["probes"]] == [
        (1.0, small),
        (1.0, large),
        (0.5, small),
        (0.5, large),
    ]
    assert all(p["fits"] for p in rec["probes"]) and (rec["ratio"], rec["batch_size"]) == (1.0, large)
    assert (
        rec["batch_size"]
        == min((p for p in rec["probes"] if p["ratio"] == 1.0), key=lambda p: p["train_s"])["batch_size"]
    )
    assert s["blocks"][0]["batch_size"] == rec["batch_size"]
    assert counters["stats"]["unique_graphs"] == graphs[0], "training compiled nothing outside the chosen ratio"
    # Training's first steps peak where the search measured them (the same compiled step, the profiler's count).
    assert s["blocks"][0]["measured_peak_bytes"] == pytest.approx(rec["peak_bytes"], rel=0.05)
    assert json.loads((tmp_path / "both" / cb.SEARCH_FILE).read_text())["batch_size"] == rec["batch_size"]

    # A budget between the two batches' peaks: the larger is measured, refused, and the smaller trains.
    peaks = {p["batch_size"]: p["peak_bytes"] for p in rec["probes"]}
    margin = plan.device.margin_fraction
    between = int((peaks[small] + peaks[large]) / 2 / (1 - margin))
    tight = _with_grid(plan, path, ratios=[1.0], batches=[small, large], budget=between)
    s = _run(tight, tmp_path / "tight")
    assert [p["fits"] for p in s["compile"]["probes"]] == [True, False]
    assert s["compile"]["batch_size"] == small and s["compile"]["cap_bytes"] < peaks[large]

    # Killed after its first epoch; the resume reads the search's choice and does not search again.
    one = _with_grid(plan, path, ratios=[1.0], batches=[small])
    two_epochs = one.with_name("two-epochs.json")
    p1 = plan_from_dict(json.loads(one.read_text()))
    bc = p1.baseline.bp_compile
    grid = dataclasses.replace(
        bc, epochs=2, candidates=[dataclasses.replace(bc.candidates[0], steps=2 * bc.candidates[0].steps)]
    )
    save_plan(dataclasses.replace(p1, baseline=dataclasses.replace(p1.baseline, bp_compile=grid)), two_epochs)
    whole = _run(two_epochs, tmp_path / "whole")
    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        kill_after_event(m, "epoch")
        with pytest.raises(KeyboardInterrupt):
            _run(two_epochs, out)

    def no_search(*a, **k):
        raise AssertionError("a resume must not search again")

    chosen = json.loads((out / cb.SEARCH_FILE).read_text())
    monkeypatch.setattr(cb, "_search", no_search)
    resumed = _run(two_epochs, out, resume=True)
    assert resumed["compile"] == chosen and chosen["batch_size"] == small
    assert resumed["final_accuracy"] == pytest.approx(whole["final_accuracy"], abs=1e-9)


def test_bp_compile_refuses_torchrun_and_a_plan_without_its_grid(planned, tmp_path: Path) -> None:
    plan, path = planned
    old = dataclasses.replace(plan, baseline=dataclasses.replace(plan.baseline, bp_compile=None))
    p = tmp_path / "old.json"
    save_plan(old, p)
    with pytest.raises(NeuroFluxError, match="re-plan"):
        _run(p, tmp_path / "old")
    from neuroflux.runtime.distributed import Dist

    with pytest.raises(NeuroFluxError, match="torchrun"):
        cb.compile_stage(plan, None, device=torch.device("cpu"), dist=Dist(rank=0, world=2), precision=None,
                         out=tmp_path, resume=False)  # fmt: skip


def test_a_resume_refuses_a_search_record_that_is_a_link_or_not_one(planned, tmp_path: Path) -> None:
    plan, _ = planned
    bc, cap = plan.baseline.bp_compile, 1000
    path = tmp_path / cb.SEARCH_FILE
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    path.symlink_to(target)
    with pytest.raises(NeuroFluxError, match="not a regular file"):
        cb._searched(path, bc, cap=cap)
    path.unlink()
    for garbled in ("{not json", "[]", '{"ratio": 1.0}'):
        path.write_text(garbled)
        with pytest.raises(NeuroFluxError, match="not a bp-compile search record"):
            cb._searched(path, bc, cap=cap)
