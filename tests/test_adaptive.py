"""Adaptive depth and per-block epochs: the rules on scripted accuracies, and
the runner acting on them (stop, skip, resume)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import kill_after_event, tiny_plan

from neuroflux.runtime.policy import (
    depth_should_stop,
    epoch_decision,
    new_block_state,
    new_depth_state,
    observe_exits,
)
from neuroflux.runtime.runner import RunConfig, Runner, run_plan
from neuroflux.schemas.plan import load_plan

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow

TOL = 0.005


# ------------------------------------------------------------------ rules
def test_depth_stops_on_a_plateau_counted_in_units() -> None:
    d = new_depth_state()
    observe_exits(d, [("u0", 0.80), ("u1", 0.85)], tolerance=TOL)
    assert not depth_should_stop(d, patience=2, is_last_block=False)
    observe_exits(d, [("u2", 0.852), ("u3", 0.849)], tolerance=TOL)  # two units within tolerance of the best
    assert d["stall"] == 2 and d["best_exit"] == "u1"
    assert depth_should_stop(d, patience=2, is_last_block=False)
    assert not depth_should_stop(d, patience=2, is_last_block=True), "nothing left to skip after the last block"
    assert not depth_should_stop(d, patience=0, is_last_block=False), "patience 0 means full depth"


def test_depth_does_not_stop_while_exits_improve() -> None:
    d = new_depth_state()
    for i, acc in enumerate([0.70, 0.74, 0.78, 0.80, 0.83, 0.86]):
        observe_exits(d, [(f"u{i}", acc)], tolerance=TOL)
        assert not depth_should_stop(d, patience=1, is_last_block=False)
    # An improvement after a stall resets it: stalls must be in a row.
    observe_exits(d, [("u6", 0.86), ("u7", 0.90), ("u8", 0.90)], tolerance=TOL)
    assert d["stall"] == 1 and d["best_exit"] == "u7"


def test_block_converges_on_an_epoch_plateau_and_banks_its_time() -> None:
    blk = new_block_state(0, epochs=5)
    kw = dict(tolerance=TOL, epoch_patience=1, max_extra=2, bank_s=0.0, epoch_s=10.0)
    assert epoch_decision(blk, 0.80, epochs_done=1, **kw) == ("continue", 0.0)
    assert epoch_decision(blk, 0.84, epochs_done=2, **kw) == ("continue", 0.0)
    assert epoch_decision(blk, 0.842, epochs_done=3, **kw) == ("converged", 20.0)  # 2 unrun epochs banked


def test_improving_block_takes_extra_epochs_only_when_the_bank_pays() -> None:
    blk = new_block_state(1, epochs=2)
    kw = dict(tolerance=TOL, epoch_patience=1, max_extra=1, epoch_s=10.0)
    assert epoch_decision(blk, 0.80, epochs_done=1, bank_s=0.0, **kw)[0] == "continue"
    assert epoch_decision(blk, 0.85, epochs_done=2, bank_s=5.0, **kw) == ("done", 0.0), "bank too small"
    blk = new_block_state(1, epochs=2)
    epoch_decision(blk, 0.80, epochs_done=1, bank_s=0.0, **kw)
    assert epoch_decision(blk, 0.85, epochs_done=2, bank_s=25.0, **kw) == ("extended", -10.0)
    assert blk["limit"] == 3
    assert epoch_decision(blk, 0.90, epochs_done=3, bank_s=15.0, **kw) == ("done", 0.0), "max_extra reached"


def test_epoch_patience_zero_runs_the_planned_epochs() -> None:
    blk = new_block_state(0, epochs=3)
    for e in (1, 2, 3):
        assert epoch_decision(
            blk, 0.5, epochs_done=e, tolerance=TOL, epoch_patience=0, max_extra=2, bank_s=1e9, epoch_s=1.0
        ) == ("planned", 0.0)


# ------------------------------------------------------------------ the runner on scripted accuracies
def script_exits(monkeypatch, table: dict[tuple[int, int], dict[str, float]]) -> list[tuple[int, int]]:
    """Replace val evaluation: block b's exits after its e-th epoch score
    ``table[b, e]`` (the last scripted epoch repeats). Returns the calls."""
    calls: list[tuple[int, int]] = []
    seen: dict[int, int] = {}

    def fake_eval(self, stage, val):
        seen[stage.index] = seen.get(stage.index, 0) + 1
        calls.append((stage.index, seen[stage.index]))
        e = seen[stage.index]
        while (stage.index, e) not in table:
            e -= 1
        return dict(table[stage.index, e])

    monkeypatch.setattr(Runner, "_eval_exits", fake_eval)
    return calls


PLATEAU = {
    (0, 1): {"u0": 0.60},
    (0, 2): {"u0": 0.80},
    (1, 1): {"u1": 0.70},
    (1, 2): {"u1": 0.801},
    (2, 1): {"u2": 0.95},
}
RISING = {
    (0, 1): {"u0": 0.60},
    (0, 2): {"u0": 0.70},
    (1, 1): {"u1": 0.75},
    (1, 2): {"u1": 0.80},
    (2, 1): {"u2": 0.85},
    (2, 2): {"u2": 0.90},
}


def test_run_stops_on_a_scripted_plateau_and_says_where_and_why(tmp_path: Path, monkeypatch) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=2, patience=1)
    assert [b.units for b in plan.blocks] == [["u0"], ["u1"], ["u2"]]
    calls = script_exits(monkeypatch, PLATEAU)
    s = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    assert [c[0] for c in calls] == [0, 0, 1, 1], "block 2 never trains"
    st = s["stopping"]
    assert st["stopped_at_unit"] == "u1" and st["stopped_after_block"] == 1 and not st["full_depth"]
    assert st["blocks_skipped"] == [2] and st["units_skipped"] == ["u2"]
    assert st["saved_predicted_s"] == pytest.approx(plan.blocks[2].predicted_time_s)
    assert "u0 at 0.8000" in s["stopped_early"]
    assert s["final_exit"] == "u1" and s["final_accuracy"] == pytest.approx(0.801), "the best exit is kept"
    events = [json.loads(x)["event"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert events.count("early_stop") == 1 and events.count("block") == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopping"]["stopped_at_unit"] == "u1"


def test_run_goes_full_depth_while_exits_improve(tmp_path: Path, monkeypatch) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=2, patience=1)
    script_exits(monkeypatch, RISING)
    s = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    assert s["stopped_early"] is None and s["stopping"]["full_depth"]
    assert s["stopping"]["epochs_run"] == {"0": 2, "1": 2, "2": 2} and s["stopping"]["saved_predicted_s"] == 0
    assert s["final_exit"] == "u2"


def test_converged_block_moves_on_and_banks_epochs_for_an_improving_one(tmp_path: Path, monkeypatch) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=3, patience=0, epoch_patience=1, max_extra_epochs=1)
    table = {
        (0, 1): {"u0": 0.6},
        (0, 2): {"u0": 0.6},  # converged after 2 of 3 epochs
        (1, 1): {"u1": 0.6},
        (1, 2): {"u1": 0.6},  # converged too
        (2, 1): {"u2": 0.7},
        (2, 2): {"u2": 0.8},
        (2, 3): {"u2": 0.9},
        (2, 4): {"u2": 0.95},
    }
    script_exits(monkeypatch, table)
    s = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    assert s["stopping"]["epochs_run"] == {"0": 2, "1": 2, "2": 4}, "one extra epoch, paid by the two saved"
    decisions = [json.loads(x).get("decision") for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert decisions.count("converged") == 2 and decisions.count("extended") == 1
    assert s["final_accuracy"] == pytest.approx(0.95)


def test_early_stopped_run_resumes_to_the_same_result(tmp_path: Path, monkeypatch) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=2, patience=1)
    script_exits(monkeypatch, PLATEAU)
    ref = run_plan(plan, path, RunConfig(out_dir=tmp_path / "ref", device="cpu", export_onnx=False))

    # Interrupted after the stop was checkpointed, before the final model was written.
    original_finish = Runner._finish

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    calls = script_exits(monkeypatch, PLATEAU)
    monkeypatch.setattr(Runner, "_finish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    assert not (tmp_path / "run" / "summary.json").exists()
    monkeypatch.setattr(Runner, "_finish", original_finish)
    n_before = len(calls)
    s = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False, resume=True))
    assert len(calls) == n_before, "a stopped run trains nothing more on resume"
    for key in ("final_exit", "final_accuracy", "stopped_early", "final_params"):
        assert s[key] == ref[key], key
    assert s["stopping"]["blocks_skipped"] == [2]
    a = torch.load(tmp_path / "ref" / "final_model.pt")
    b = torch.load(tmp_path / "run" / "final_model.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_prefer_shallowest_keeps_the_earliest_exit_within_tolerance(tmp_path: Path, monkeypatch) -> None:
    plan, path, _ = tiny_plan(tmp_path, epochs=2, patience=1, prefer="shallowest")
    script_exits(monkeypatch, PLATEAU)
    s = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    assert s["final_exit"] == "u0" and s["final_accuracy"] == pytest.approx(0.80)


def test_prefer_best_keeps_the_most_accurate_exit(tmp_path: Path, monkeypatch) -> None:
    """The design's rule: the best exit, the shallower one on a tie."""
    plan, path, _ = tiny_plan(tmp_path, epochs=2, patience=10, prefer="best")
    script_exits(monkeypatch, {(0, 1): {"u0": 0.60}, (1, 1): {"u1": 0.90}, (2, 1): {"u2": 0.90}})
    s = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    assert s["final_exit"] == "u1" and s["final_accuracy"] == pytest.approx(0.90)
    assert s["final_params"] < s["original_params"]


def test_min_reduction_keeps_only_a_small_exit_and_stops_after_the_last_one(tmp_path: Path, monkeypatch) -> None:
    """``--min-reduction``: an exit too large is never kept, however accurate,
    and no block past the last small exit trains."""
    plan, path, _ = tiny_plan(tmp_path, epochs=2, patience=10)
    sizes = {u.name: plan.model.params / plan.exit_params(u.name) for u in plan.units}
    assert sizes["u0"] > sizes["u1"] > 1, sizes
    data = json.loads(path.read_text())
    data["exit_policy"]["min_reduction"] = (sizes["u0"] + sizes["u1"]) / 2  # only u0 is small enough
    path.write_text(json.dumps(data))

    plan = load_plan(path)
    assert plan.allowed_exits() == ["u0"]
    calls = script_exits(monkeypatch, RISING)
    s = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    assert {c[0] for c in calls} == {0}, "no block past the last small exit trains"
    assert s["final_exit"] == "u0" and s["param_reduction"] >= plan.exit_policy.min_reduction
    assert "--min-reduction" in s["stopped_early"] and s["stopping"]["blocks_skipped"] == [1, 2]


def test_blocks_the_size_limit_skips_pay_for_extra_epochs_of_an_improving_block(tmp_path: Path, monkeypatch) -> None:
    """Issue 19's lever: the predicted training time of the blocks past the
    last small exit starts the bank, and a block still improving at its last
    planned epoch takes extra epochs from it; without the size limit (or with
    ``max_extra_epochs`` 0) the same scripted block takes none."""
    from neuroflux.runtime.stages import size_limit_bank_s, steps_per_epoch

    plan, path, _ = tiny_plan(tmp_path, epochs=2, patience=10, epoch_patience=1, max_extra_epochs=10)
    sizes = {u.name: plan.model.params / plan.exit_params(u.name) for u in plan.units}
    data = json.loads(path.read_text())
    improving = {(0, e): {"u0": 0.3 + 0.05 * e} for e in range(1, 13)}

    def run(name: str, min_reduction: float, max_extra: int) -> dict:
        data["exit_policy"].update(min_reduction=min_reduction, max_extra_epochs=max_extra)
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(data))
        script_exits(monkeypatch, {**RISING, **improving})
        return load_plan(p), run_plan(load_plan(p), p, RunConfig(out_dir=tmp_path / name, device="cpu",
                                                                 export_onnx=False))  # fmt: skip

    small = (sizes["u0"] + sizes["u1"]) / 2  # only u0 is small enough
    limited, s = run("limited", small, 10)
    assert limited.blocks_past_size_limit() == [1, 2]
    per_step = {b.index: sum(limited.unit(u).profile.step_fixed_s + limited.unit(u).profile.step_per_sample_s
                             * b.batch_size for u in b.units) for b in limited.blocks}  # fmt: skip
    steps = {b.index: steps_per_epoch(limited.recipe.train_size, batch_size=b.batch_size) for b in limited.blocks}
    bank = size_limit_bank_s(limited)
    assert bank == pytest.approx(sum(limited.blocks[i].epochs * steps[i] * per_step[i] for i in (1, 2)))
    paid = int(bank // (steps[0] * per_step[0]))
    assert 1 <= paid < 10, "the bank, not max_extra_epochs, limits the extra epochs here"
    assert s["stopping"]["epochs_run"] == {"0": 2 + paid} and s["final_exit"] == "u0"
    assert s["stopping"]["blocks_skipped"] == [1, 2]
    # Killed after its first extra epoch, the run resumes with the bank it had (not a fresh one on top).
    with monkeypatch.context() as m:
        kill_after_event(m, "epoch", count=3)
        with pytest.raises(KeyboardInterrupt):
            run("limited-killed", small, 10)
    script_exits(monkeypatch, {(0, e): {"u0": 0.3 + 0.05 * (e + 3)} for e in range(1, 10)})  # from epoch 4 on
    cfg = RunConfig(out_dir=tmp_path / "limited-killed", device="cpu", export_onnx=False, resume=True)
    resumed = run_plan(limited, tmp_path / "limited-killed.json", cfg)
    assert resumed["stopping"]["epochs_run"] == {"0": 2 + paid}
    _, s_off = run("limited-no-extra", small, 0)
    assert s_off["stopping"]["epochs_run"] == {"0": 2}
    any_size, s_any = run("any", 1.0, 10)
    assert any_size.blocks_past_size_limit() == [] and size_limit_bank_s(any_size) == 0.0
    assert s_any["stopping"]["epochs_run"]["0"] == 2, "no bank: block 0 keeps its planned epochs"


def test_the_size_limit_trains_a_block_only_up_to_its_last_small_exit(tmp_path: Path, monkeypatch) -> None:
    """Units past the last small exit of the block the run stops in are
    never trained (no exit of theirs could be kept, and no gradient flows
    back from them): the block's peak is predicted for the units it trains
    and measured as predicted, and their time starts the bank, which pays
    extra epochs of the still-improving block and is reported as saved."""
    import dataclasses

    from helpers import plan_for

    from neuroflux.runtime.stages import predicted_epoch_s, size_limit_bank_s, steps_per_epoch

    model = tmp_path / "tiny_model.py"
    model.write_text((Path(__file__).resolve().parent / "tiny_model.py").read_text())
    plan, path = plan_for(model, tmp_path, strategy="optimal", max_block_units=None, epochs=3, min_batch=8,
                          max_batch=32, cache_location="ram", patience=10, epoch_patience=0)  # fmt: skip
    plan = plan.plan
    assert [b.units for b in plan.blocks] == [["u0", "u1", "u2"]], "one block of all three units"
    data = json.loads(path.read_text())
    sizes = [plan.model.params / plan.exit_params(u) for u in ("u0", "u1")]
    data["exit_policy"]["min_reduction"] = sum(sizes) / 2  # only u0 is small enough
    path.write_text(json.dumps(data))
    plan = load_plan(path)
    assert plan.units_past_size_limit() == ["u1", "u2"] and plan.blocks_past_size_limit() == []
    b = plan.blocks[0]
    steps = steps_per_epoch(plan.recipe.train_size, batch_size=b.batch_size)
    tail = [plan.unit(u).profile for u in ("u1", "u2")]
    tail_s = 3 * steps * sum(u.step_fixed_s + u.step_per_sample_s * b.batch_size for u in tail)
    assert size_limit_bank_s(plan) == pytest.approx(tail_s)
    s = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    (blk,) = s["blocks"]
    assert blk["units"] == ["u0"] and set(blk["exit_accuracies"]) == {"u0"}
    trimmed = plan.block_peak_bytes(dataclasses.replace(b, units=["u0"]))
    assert blk["predicted_peak_bytes"] == trimmed < b.predicted_peak_bytes
    assert abs(blk["measured_peak_bytes"] - trimmed) <= 4096, (blk["measured_peak_bytes"], trimmed)
    assert s["stopping"]["units_skipped"] == ["u1", "u2"] and "--min-reduction" in s["stopped_early"]
    assert s["stopping"]["saved_predicted_s"] == pytest.approx(tail_s), "epochs as planned: the tail's time is saved"

    # Still improving at its last planned epoch, the block takes the extra epochs the tail's time pays for.
    data["exit_policy"].update(epoch_patience=1, max_extra_epochs=2)
    path.write_text(json.dumps(data))
    plan = load_plan(path)
    script_exits(monkeypatch, {(0, e): {"u0": 0.2 + 0.02 * e} for e in range(1, 9)})
    s = run_plan(plan, path, RunConfig(out_dir=tmp_path / "extra", device="cpu", export_onnx=False))
    epoch_s = predicted_epoch_s(plan, SimpleNamespace(unit_idx=[0], batch_size=b.batch_size))
    assert tail_s >= 2 * epoch_s, "the tail's time pays for both extra epochs"
    assert s["stopping"]["epochs_run"] == {"0": 3 + 2}
    saved = s["stopping"]["saved_predicted_s"]
    assert saved == pytest.approx(tail_s - 2 * epoch_s) and saved >= 0, "the tail paid for the extra epochs"


def test_a_trimmed_block_that_recomputes_its_input_is_predicted_from_above(tmp_path: Path) -> None:
    """The block the size limit stops in, reading a recomputed input: the
    plan prices the recompute pass against the whole block's largest step,
    so its trimmed peak is the whole block's less the untrained units'
    resident state, an upper bound the measured peak stays under."""
    from helpers import plan_for

    model = tmp_path / "tiny_model.py"
    model.write_text((Path(__file__).resolve().parent / "tiny_model.py").read_text())
    plan, path = plan_for(model, tmp_path, strategy="optimal", max_block_units=2, epochs=1, min_batch=8,
                          max_batch=32, cache_location="recompute", patience=10)  # fmt: skip
    plan = plan.plan
    assert [(b.units, b.source().kind) for b in plan.blocks] == [(["u0"], "data"), (["u1", "u2"], "recompute")]
    data = json.loads(path.read_text())
    data["exit_policy"]["min_reduction"] = (plan.model.params / plan.exit_params("u1") + 1) / 2  # u0, u1 small
    path.write_text(json.dumps(data))
    plan = load_plan(path)
    assert plan.units_past_size_limit() == ["u2"]
    s = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    blk = s["blocks"][1]
    assert blk["units"] == ["u1"] and s["stopping"]["units_skipped"] == ["u2"]
    bound = plan.blocks[1].predicted_peak_bytes - plan.unit("u2").profile.static_bytes
    assert blk["predicted_peak_bytes"] == bound
    assert blk["measured_peak_bytes"] <= bound, (blk["measured_peak_bytes"], bound)


def test_resume_rebuilds_a_ram_cache_and_ends_as_an_uninterrupted_run(tmp_path: Path, monkeypatch, caplog) -> None:
    """A RAM cache dies with the process: resuming after block 0 recomputes
    block 0's outputs from its checkpointed weights, and block 1 then trains
    on exactly what it would have seen. Block 1's own cache is not rebuilt
    through its untrained units (it is written when block 1 has trained)."""
    plan, path, _ = tiny_plan(tmp_path, epochs=1, patience=10, cache_location="ram")
    assert len(plan.blocks) == 3 and plan.blocks[0].cache.location == "ram"
    ref = run_plan(plan, path, RunConfig(out_dir=tmp_path / "ref", device="cpu", export_onnx=False))

    original = Runner._run_stage
    ran: list[int] = []

    def stop_after_block_0(self, stage, *a, **k):
        if stage.index == 1:
            raise KeyboardInterrupt
        ran.append(stage.index)
        return original(self, stage, *a, **k)

    monkeypatch.setattr(Runner, "_run_stage", stop_after_block_0)
    with pytest.raises(KeyboardInterrupt):
        run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False))
    assert ran == [0] and not (tmp_path / "run" / "summary.json").exists()
    monkeypatch.setattr(Runner, "_run_stage", original)
    with caplog.at_level("INFO", logger="neuroflux.runtime.caches"):
        s = run_plan(plan, path, RunConfig(out_dir=tmp_path / "run", device="cpu", export_onnx=False, resume=True))
    rebuilt = [r.getMessage() for r in caplog.records if "recomputing the output cache" in r.getMessage()]
    assert rebuilt == ["recomputing the output cache of block 0 from the finished blocks"], rebuilt
    assert s["exit_accuracies"] == ref["exit_accuracies"]
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["block"] for r in recs if r["event"] == "epoch"] == [0, 1, 2], "block 0 is not trained again"
    a, b = torch.load(tmp_path / "ref" / "final_model.pt"), torch.load(tmp_path / "run" / "final_model.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_default_patience_is_a_quarter_of_the_units() -> None:
    """Networks of up to 11 units keep 2; the many small units of mobile
    networks (18-19) get 4, so a plateau inside one stage does not end
    training before the next stage's exits are seen."""
    from neuroflux.planner.config import PlanConfig, auto_patience

    assert [auto_patience(n) for n in (1, 5, 8, 9, 11, 12, 18, 19, 40)] == [2, 2, 2, 2, 2, 3, 4, 4, 10]
    cfg = PlanConfig.from_options(budget_bytes=1, budget_text="1B")
    assert cfg.patience(18) == 4 and cfg.replace(patience=0).patience(18) == 0
