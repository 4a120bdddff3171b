"""The budget-optimal BP-with-checkpointing baseline: its knapsack against
brute force, the plan's choice against every (batch, recomputed units)
profiled exactly, and the runtime training the units the plan names."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
from helpers import ROOT, tiny_plan

from neuroflux.planner.build import make_plan
from neuroflux.planner.config import PlanConfig
from neuroflux.planner.jobs import profile_model
from neuroflux.planner.solve_checkpoint import choose_recompute
from neuroflux.runtime.cli import main as nf_run


def _brute(savings, costs, need):
    best = None
    for flags in itertools.product([False, True], repeat=len(savings)):
        if sum(s for s, f in zip(savings, flags) if f) >= need:
            key = (round(sum(c for c, f in zip(costs, flags) if f) * 1e6), sum(flags))
            best = key if best is None or key < best else best
    return best


def test_the_knapsack_is_the_brute_force_optimum() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 8)
        savings = [rng.choice([0, rng.randint(1, 1000)]) for _ in range(n)]
        costs = [rng.randint(1, 50) / 1000 for _ in range(n)]
        need = rng.randint(-10, sum(savings) + 100)
        flags = choose_recompute(savings, costs, need)
        best = _brute(savings, costs, need)
        if need <= 0:
            assert flags == (False,) * n
        elif best is None:
            assert flags is None, (savings, need)
        else:
            assert flags is not None and sum(s for s, f in zip(savings, flags) if f) >= need
            got = (round(sum(c for c, f in zip(costs, flags) if f) * 1e6), sum(flags))
            assert got == best, (savings, costs, need, flags)


@pytest.mark.slow
def test_the_plan_picks_the_fastest_batch_and_units_that_fit(monkeypatch) -> None:
    """At 20MB with batches 16-32 BP fits no batch; every (batch, recomputed
    units) is profiled exactly, and the plan's baseline is the fastest that fits."""
    monkeypatch.setenv("NEUROFLUX_LIMIT", "2000,500")
    model = str(ROOT / "examples" / "small_cnn.py")
    cfg = PlanConfig.from_options(
        budget_bytes=20_000_000,
        budget_text="20MB",
        budget_source="flag",
        device_kind="cpu",
        min_batch=16,
        max_batch=32,
        epochs=1,
        strategy="greedy",
    )
    res = make_plan(model, cfg)
    bl, problem = res.plan.baseline, res.problem
    assert not bl.bp.fits and bl.bp_checkpoint.fits and bl.bp_checkpoint_all is not None
    pr = profile_model(model, cfg, lambda *a: None)
    assert pr.jobs is not None
    names = [u.name for u in res.plan.units]
    options = []
    for b in problem.batch_sizes:
        for flags in itertools.product([False, True], repeat=len(names)):
            prof = pr.jobs.chain_job(flags)
            if prof.peak_bytes(b) <= problem.cap_bytes:
                steps = problem.epochs * -(-problem.train_size // b)
                options.append((steps * pr.target.speed.step_s(prof, b), b, [n for n, f in zip(names, flags) if f]))
    fastest = min(options, key=lambda o: o[0])
    ck = bl.bp_checkpoint
    assert (ck.predicted_time_s, ck.batch_size, ck.checkpointed_units) == pytest.approx(fastest)
    assert ck.predicted_time_s < bl.bp_checkpoint_all.predicted_time_s, "recomputing every unit is slower"
    assert ck.predicted_peak_bytes <= res.plan.budget_bytes


@pytest.mark.slow
def test_the_runtime_recomputes_the_units_the_plan_names(tmp_path: Path, monkeypatch) -> None:
    """A hand-picked recompute set trains, and reaches the stage's chain."""
    import neuroflux.runtime.stages as stages

    plan, path, _ = tiny_plan(tmp_path, epochs=1)
    data = json.loads(path.read_text())
    names = [u["name"] for u in data["units"]]
    data["baseline"]["bp_checkpoint"]["checkpointed_units"] = names[:1]
    path.write_text(json.dumps(data))
    seen = []
    original = stages.CheckpointedChain

    def spy(units, head=None, *, checkpointed=None):
        seen.append(checkpointed)
        return original(units, head, checkpointed=checkpointed)

    monkeypatch.setattr(stages, "CheckpointedChain", spy)
    for method, flags in (("bp-checkpoint", [True] + [False] * (len(names) - 1)), ("bp-checkpoint-all", None)):
        out = tmp_path / method
        argv = [str(path), "--baseline", method, "--out", str(out), "--device", "cpu", "-q", "--no-onnx"]
        assert nf_run(argv) == 0
        assert seen[-1] == flags
        assert json.loads((out / "summary.json").read_text())["method"] == method
    data["baseline"]["bp_checkpoint"]["checkpointed_units"] = ["u99"]
    path.write_text(json.dumps(data))
    assert nf_run([str(path), "--baseline", "bp-checkpoint", "--out", str(tmp_path / "bad"), "-q"]) == 2
