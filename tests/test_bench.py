"""nf-bench smoke configuration: the harness runs and reports every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ROOT

from neuroflux.planner.budget import parse_bytes
from neuroflux.planner.config import PlanConfig
from neuroflux.tools.bench import build_parser
from neuroflux.tools.bench import main as nf_bench
from neuroflux.tools.bench_cells import METHODS, PRESETS, model_path, resolve_cells
from neuroflux.tools.bench_report import time_to_target

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow


def test_smoke_benchmark_reports_every_method(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NEUROFLUX_DATA", raising=False)
    monkeypatch.delenv("NEUROFLUX_LIMIT", raising=False)
    assert nf_bench(["--smoke", "--budgets", "40MB", "--out", str(tmp_path)]) == 0
    assert "NEUROFLUX_LIMIT" not in __import__("os").environ, "nf-bench must restore the environment"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"].startswith("cpu") and results["torch"]
    (cell,) = results["cells"]
    assert set(cell["runs"]) == {"neuroflux", "neuroflux-greedy", "bp", "bp-checkpoint", "bp-checkpoint-all"}
    if cell["runs"]["bp-checkpoint"].get("same_as") == "bp":  # budget-optimal checkpointing chose plain BP
        assert cell["runs"]["bp-checkpoint"]["wall_time_s"] == cell["runs"]["bp"]["wall_time_s"]
    for method, run in cell["runs"].items():
        assert "error" not in run, (method, run)
        assert 0 <= run["final_accuracy"] <= 1 and run["wall_time_s"] > 0
        assert run["measured_peak_bytes"] <= cell["budget_bytes"]
    nf, bp = cell["runs"]["neuroflux"], cell["runs"]["bp"]
    assert nf["speedup_vs_bp_wall"] == pytest.approx(bp["wall_time_s"] / nf["wall_time_s"], rel=1e-3)
    assert cell["target_rule"] == "BP final - 1 point"
    strongest = cell["strongest_baseline"]
    assert strongest.startswith("bp") and cell["runs"][strongest]["final_accuracy"] == max(
        v["final_accuracy"] for m, v in cell["runs"].items() if m.startswith("bp")
    )
    assert "speedup_vs_strongest_to_target" in nf
    assert cell["target_accuracy"] == pytest.approx(cell["runs"]["bp"]["final_accuracy"] - 0.01)
    assert cell["runs"]["neuroflux"]["stopped_at_unit"] and cell["runs"]["neuroflux"]["epochs_run"]
    md = (tmp_path / "results.md").read_text()
    assert "#### small_cnn-40MB" in md and "| neuroflux |" in md


def test_a_skipped_cell_is_planned_and_loaded_not_trained(tmp_path: Path, monkeypatch) -> None:
    """``--skip-runs`` (the GPU runbook's dry run skips the ImageNet-shaped cell this way)."""
    monkeypatch.delenv("NEUROFLUX_DATA", raising=False)
    monkeypatch.delenv("NEUROFLUX_LIMIT", raising=False)
    args = ["--smoke", "--budgets", "40MB", "--methods", "neuroflux", "bp", "--out", str(tmp_path)]
    assert nf_bench([*args, "--skip-runs", "small_cnn-40MB"]) == 0
    (cell,) = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert cell["planned_only"] and not cell["runs"] and "neuroflux" in cell["plans"]
    speed = cell["speed_profile"]  # why two machines' plans of one cell may differ in their batches
    assert speed["cost_source"] == "flops" and speed["device_flops_per_s"] > 0 and speed["device_speed_source"]
    assert not (tmp_path / "small_cnn-40MB" / "neuroflux").exists(), "nothing was trained"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_parse_and_name_real_models(preset: str) -> None:
    """Every preset cell names a model file and factory that exist, a budget
    that parses and known methods; --list prints them without running."""
    cells = resolve_cells(build_parser().parse_args(["--preset", preset]))
    assert cells and len({c.name for c in cells}) == len(cells)
    for c in cells:
        path, _, factory = model_path(c.model).partition(":")
        src = Path(path).read_text()
        assert f"def {factory or 'model'}(" in src and f"def {c.datasets}(" in src, c
        assert parse_bytes(c.budget) > 0 and c.epochs >= 1
        assert set(c.methods) <= set(METHODS)
        for _, overrides in c.variants:
            PlanConfig.from_options(budget_bytes=1, budget_text="1", **{**dict(c.options), **dict(overrides)})
    one = cells[0].name
    assert [c.name for c in resolve_cells(build_parser().parse_args(["--preset", preset, "--cell", one]))] == [one]
    assert nf_bench(["--preset", preset, "--list"]) == 0
    seeded = resolve_cells(build_parser().parse_args(["--preset", preset, "--cell", one, "--seeds", "0", "1"]))
    assert [(c.name, dict(c.options)["seed"]) for c in seeded] == [(f"{one}-seed0", 0), (f"{one}-seed1", 1)]


def test_gpu_preset_cells_are_stringent_and_loose() -> None:
    names = [c.name for c in PRESETS["gpu"]]
    assert any(n.startswith("resnet18") for n in names) and any(n.startswith("vgg16") for n in names)
    assert len({c.budget for c in PRESETS["gpu"] if c.model == "resnet18"}) == 2
    assert len({c.budget for c in PRESETS["gpu"] if c.model == "vgg16"}) == 2


def test_cpu_bf16_preset_runs_every_baseline_at_the_cells_precision() -> None:
    """Issue 20's bf16 rows: each CPU cell (and the mobile one) with NeuroFlux, BP, budget-optimal
    checkpointing and bp-compile, all in bf16, from one invocation per cell."""
    cells = PRESETS["cpu-bf16"]
    assert {(c.model, c.budget) for c in PRESETS["cpu"]} < {(c.model, c.budget) for c in cells}
    for c in cells:
        assert dict(c.options)["precision"] == "bf16", c.name
        assert {"neuroflux", "bp", "bp-checkpoint", "bp-compile"} <= set(c.methods), c.name


def test_unknown_preset_cell_is_a_clear_error(capsys) -> None:
    assert nf_bench(["--preset", "cpu", "--cell", "nope"]) == 2
    assert "has no cell nope" in capsys.readouterr().err


def test_time_to_target_reads_blocks_and_epochs() -> None:
    metrics = [
        {"event": "epoch", "elapsed_s": 1.0},
        {"event": "block", "elapsed_s": 2.0, "exit_accuracies": {"u0": 0.5, "u1": 0.7}},
        {"event": "block", "elapsed_s": 5.0, "exit_accuracies": {"u2": 0.9}},
    ]
    assert time_to_target(metrics, 0.7) == 2.0
    assert time_to_target(metrics, 0.8) == 5.0
    assert time_to_target(metrics, 0.95) is None
    assert time_to_target([{"event": "epoch", "elapsed_s": 3.0, "val_acc": 0.6}], 0.6) == 3.0


def test_shared_profiling_gives_the_plans_made_apart(tmp_path: Path) -> None:
    """nf-bench profiles a model once for its cells and variants
    (make_plan_shared): each plan equals the one make_plan makes alone,
    but for the solver's wall time, and the profile is made once."""
    from neuroflux.planner.build import make_plan, make_plan_shared
    from neuroflux.schemas.plan import plan_to_dict

    def comparable(plan):
        d = plan_to_dict(plan)
        d["solver"].pop("wall_time_s")
        return d

    profiles: dict = {}
    model = str(ROOT / "examples" / "small_cnn.py")
    for budget, strategy in [(40_000_000, "optimal"), (40_000_000, "greedy"), (200_000_000, "optimal")]:
        cfg = PlanConfig.from_options(
            budget_bytes=budget,
            budget_text=str(budget),
            strategy=strategy,
            device_flops_per_s=1e11,
            op_overhead_s=5e-6,
            disk_budget_bytes=0,
            time_limit_s=10,
        )
        alone = make_plan(model, cfg, plan_dir=tmp_path).plan
        shared = make_plan_shared(model, cfg, plan_dir=tmp_path, profiles=profiles).plan
        assert comparable(shared) == comparable(alone), (budget, strategy)
    assert len(profiles) == 1


def test_precision_reaches_every_plan_of_a_cell(tmp_path: Path, monkeypatch) -> None:
    """``nf-bench --precision bf16`` plans every method at bf16 (the baselines run at the plan's precision)."""
    monkeypatch.delenv("NEUROFLUX_DATA", raising=False)
    assert nf_bench(["--smoke", "--plan-only", "--precision", "bf16", "--out", str(tmp_path)]) == 0
    plans = sorted(tmp_path.rglob("plan-*.json"))
    assert plans and {json.loads(p.read_text())["recipe"]["precision"] for p in plans} == {"bf16"}


def test_variants_plan_extra_neuroflux_runs_with_their_options(tmp_path: Path, capsys) -> None:
    """``--variant LABEL OPTION=VALUE ...``: one more NeuroFlux plan per cell,
    with those options; bad options are refused before any work."""
    args = ["--smoke", "--plan-only", "--out", str(tmp_path)]
    variant = ["--variant", "small batches", "batch_time_tolerance=0.5", "patience=3"]
    assert nf_bench([*args, *variant]) == 0
    (cell_dir,) = [p.parent for p in tmp_path.rglob("plans.json")]
    index = json.loads((cell_dir / "plans.json").read_text())
    assert {"neuroflux", "neuroflux (small batches)"} <= set(index) and len(index) == 3  # and neuroflux-greedy
    base, var = (json.loads((cell_dir / index[k]).read_text()) for k in ("neuroflux", "neuroflux (small batches)"))
    assert (var["solver"]["batch_time_tolerance"], var["exit_policy"]["patience"]) == (0.5, 3)
    assert base["solver"]["batch_time_tolerance"] != 0.5
    # A variant may replace an option the invocation gives, the device profile too.
    slow = ROOT / "benchmarks" / "device-profiles" / "cpu-amd-epyc-avx2-2t-microbench-2026-12-02.json"
    fast = ROOT / "benchmarks" / "device-profiles" / "cpu-amd-epyc-avx2-2t-2026-12-02.json"
    out = tmp_path / "profiles"
    variant = ["--variant", "other profile", f"device_profile={slow}"]
    assert nf_bench(["--smoke", "--plan-only", "--out", str(out), "--device-profile", str(fast), *variant]) == 0
    (cell_dir,) = [p.parent for p in out.rglob("plans.json")]
    index = json.loads((cell_dir / "plans.json").read_text())
    sources = {k: json.loads((cell_dir / index[k]).read_text())["profile"]["device_speed_source"] for k in index}
    assert str(fast) in sources["neuroflux"] and str(slow) in sources["neuroflux (other profile)"]
    capsys.readouterr()
    for bad, says in (
        (["--variant", "x", "no_such_option=1"], "not OPTION=VALUE with a plan option"),
        (["--variant", "x", "budget_bytes=5"], "the cell sets budget"),
        (["--variant", "a b", "patience=3", "--variant", "a-b", "patience=4"], "name the same run folder"),
        (["--variant", "x", "patience=-5"], "patience"),
        (["--variant", "x"], "give a label"),
        (["--preset", "cpu", "--variant", "x", "patience=3"], "a preset's cells carry their own"),
    ):
        assert nf_bench([*bad, "--out", str(tmp_path / "bad")]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
