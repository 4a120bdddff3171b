"""The polish (``nf-plan --polish``): the plan records every exit's
end-to-end step at a batch that fits, the record round-trips through the
schema and bad records are refused, the runtime's peak matches the
prediction, and a polished run resumes after a kill at any point with the
result of an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from helpers import ROOT, kill_after_event

import neuroflux.runtime.polish as polish_mod
from neuroflux.planner.cli import main as nf_plan
from neuroflux.runtime.config import RunConfig
from neuroflux.runtime.runner import run_plan
from neuroflux.schemas.plan import PlanError, load_plan, plan_from_dict, plan_to_dict

pytestmark = pytest.mark.slow

LIMIT = ("256", "64")
STEPS = 3


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("polish") / "plan.json"
    args = [str(ROOT / "examples" / "small_cnn.py"), "--budget", "16MB", "--polish", "0.5", "-o", str(path), "-q"]
    args += [
        "--train-size",
        LIMIT[0],
        "--val-size",
        LIMIT[1],
        "--epochs",
        "1",
        "--polish-lr-scale",
        "0.2",
        "--max-batch",
        "16",
    ]
    assert nf_plan(args) == 0
    return path


def test_the_plan_polishes_every_exit_at_a_batch_that_fits(plan_path: Path) -> None:
    plan = load_plan(plan_path)
    assert plan.polish is not None and plan.polish.epochs == 0.5 and plan.polish.lr_scale == 0.2
    assert [e.unit for e in plan.polish.exits] == [u.name for u in plan.units], "every exit fits at 16MB"
    for e in plan.polish.exits:
        assert e.predicted_peak_bytes <= plan.budget_bytes
        assert e.steps == math.ceil(0.5 * math.ceil(plan.recipe.train_size / e.batch_size))
        base = plan.recipe.lr * math.sqrt(e.batch_size / plan.recipe.base_batch_size)
        assert e.lr == pytest.approx(0.2 * base)
    last = plan.polish.exits[-1]
    assert (last.batch_size, last.predicted_peak_bytes) == (
        plan.baseline.bp.batch_size,
        plan.baseline.bp.predicted_peak_bytes,
    ), "the last exit's polish is BP's step"
    # Deeper prefixes hold more activations: the batch never grows with depth.
    batches = [e.batch_size for e in plan.polish.exits]
    assert batches == sorted(batches, reverse=True)


def test_the_polish_record_round_trips_and_bad_ones_are_refused(plan_path: Path) -> None:
    data = json.loads(plan_path.read_text())
    assert plan_to_dict(plan_from_dict(data)) == data
    older = {k: v for k, v in data.items() if k != "polish"} | {"schema_version": "2.5"}
    assert plan_from_dict(older).polish is None, "plans before 2.6 have no polish"
    for edit, words in (
        (lambda p: p["polish"].update(lr_scale=-1.0), "lr_scale"),
        (lambda p: p["polish"]["exits"][0].update(unit="u99"), "unknown or repeated"),
        (lambda p: p["polish"]["exits"][0].update(steps=0), "must be positive"),
        (lambda p: p["exit_policy"].update(min_reduction=1e6), "no exit is that many times smaller"),
    ):
        bad = json.loads(plan_path.read_text())
        edit(bad)
        with pytest.raises(PlanError, match=words):
            plan_from_dict(bad)


def test_a_bad_polish_flag_names_the_flag(tmp_path: Path, capsys) -> None:
    args = [str(ROOT / "examples" / "small_cnn.py"), "--budget", "16MB", "--polish", "-1", "-o", str(tmp_path / "p")]
    assert nf_plan(args) == 2
    err = capsys.readouterr().err
    assert "--polish" in err and "Traceback" not in err


def _run(path: Path, out: Path, **kw) -> dict:
    cfg = RunConfig(
        out_dir=out,
        device="cpu",
        export_onnx=False,
        loader_workers=0,
        max_steps_per_epoch=STEPS,
        throughput_batch=4,
        **kw,
    )
    return run_plan(load_plan(path), path, cfg)


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_polished_run_resumes_after_a_kill_with_the_uninterrupted_result(
    plan_path: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("NEUROFLUX_LIMIT", ",".join(LIMIT))
    whole = _run(plan_path, tmp_path / "whole")
    pol = whole["polish"]
    assert pol is not None and pol["exit"] == whole["final_exit"] and pol["steps"] == STEPS
    assert pol["measured_peak_bytes"] == pytest.approx(pol["predicted_peak_bytes"], rel=0.02)
    assert whole["final_accuracy"] == (pol["accuracy_after"] if pol["kept"] else pol["accuracy_before"])

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    for where in ("in the polish", "after the polish"):
        out = tmp_path / where.replace(" ", "-")
        with monkeypatch.context() as m:
            if where == "in the polish":  # killed between its training and its evaluation
                m.setattr(polish_mod, "_accuracy", interrupt)
            else:
                kill_after_event(m, "polish")
            with pytest.raises(KeyboardInterrupt):
                _run(plan_path, out)
        assert not (out / "summary.json").exists()
        resumed = _run(plan_path, out, resume=True)
        assert [e["event"] for e in _events(out)].count("polish") == 1, where
        keys = ("accuracy_before", "accuracy_after", "kept", "steps", "batch_size")
        assert {k: resumed["polish"][k] for k in keys} == {k: pol[k] for k in keys}, where
        assert resumed["final_accuracy"] == whole["final_accuracy"], where


def test_a_run_of_a_plan_without_polish_has_none(plan_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NEUROFLUX_LIMIT", ",".join(LIMIT))
    data = json.loads(plan_path.read_text())
    del data["polish"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    plan = load_plan(path)
    assert dataclasses.replace(plan).polish is None
    summary = _run(path, tmp_path / "run")
    assert summary["polish"] is None and "polish" not in [e["event"] for e in _events(tmp_path / "run")]
