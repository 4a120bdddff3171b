"""nf-plan end to end through argv, budgets, and the plan schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from helpers import ROOT

from neuroflux.planner.budget import parse_bytes
from neuroflux.planner.cli import main as nf_plan
from neuroflux.schemas import load_plan, schema
from neuroflux.schemas.generate import generate_schema

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow

ZOO = ["small_cnn", "vgg11", "vgg16", "resnet18", "resnet34", "mobilenetv2"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1GB", 10**9),
        ("1GiB", 2**30),
        ("512MB", 512 * 10**6),
        ("512MiB", 512 * 2**20),
        ("1.5G", 1_500_000_000),
        ("1000000", 10**6),
        (" 2 gib ", 2 * 2**30),
        ("64KiB", 65536),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1XB", "-1GB", "1.2.3G", "GB", "0.1"])
def test_parse_bytes_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="512MiB" if text != "0.1" else "less than one byte"):
        parse_bytes(text)


def test_committed_schema_matches_the_dataclasses() -> None:
    assert schema() == generate_schema(), "run: python -m neuroflux.schemas.generate"


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_plans_at_1gb(tmp_path: Path, name: str, capsys) -> None:
    out = tmp_path / "plan.json"
    # How long planning takes is a benchmark (benchmarks/plan_times.py), not an assertion.
    assert (
        nf_plan([str(ROOT / "examples" / f"{name}.py"), "--budget", "1GB", "-o", str(out), "--time-limit", "20"]) == 0
    )
    data = json.loads(out.read_text())
    jsonschema.validate(data, schema())
    plan = load_plan(out)
    assert isinstance(data["budget_bytes"], int) and data["budget_bytes"] == 10**9
    for b in data["blocks"]:
        assert b["predicted_peak_bytes"] <= data["budget_bytes"]
        assert isinstance(b["batch_size"], int) and isinstance(b["predicted_time_s"], float)
    for b in (plan.baseline.bp, plan.baseline.bp_checkpoint):  # the keys are the schema's; these are the values
        assert b.fits == (b.batch_size > 0) and (not b.fits or b.predicted_peak_bytes <= plan.budget_bytes)
    pr = plan.predicted
    assert pr.time_s == pytest.approx(sum(b.predicted_time_s for b in plan.blocks))
    assert pr.speedup_vs_bp is None or pr.speedup_vs_bp == pytest.approx(plan.baseline.bp.predicted_time_s / pr.time_s)
    assert all(b.predicted_peak_bytes <= plan.budget_bytes for b in plan.blocks)
    assert plan.solver.status == "optimal"
    shown = capsys.readouterr().out
    assert "predicted" in shown and "BP + checkpointing" in shown


def test_greedy_and_optimal_on_the_same_model(tmp_path: Path) -> None:
    model = str(ROOT / "examples" / "small_cnn.py")
    speed = ["--device-tflops", "0.1", "--op-overhead-us", "5"]  # one cost model for both plans
    assert nf_plan([model, "--budget", "30MB", "-o", str(tmp_path / "o.json"), "-q", *speed]) == 0
    assert (
        nf_plan([model, "--budget", "30MB", "-o", str(tmp_path / "g.json"), "-q", "--strategy", "greedy", *speed]) == 0
    )
    opt, greedy = load_plan(tmp_path / "o.json"), load_plan(tmp_path / "g.json")
    assert greedy.solver.strategy == "greedy" and opt.solver.strategy == "optimal"
    assert opt.predicted.time_s <= greedy.predicted.time_s * (1 + opt.solver.tie_tolerance) + 1e-9


def test_batch_rule_plans_smaller_batches_and_records_its_tolerance(tmp_path: Path) -> None:
    """``--batch-time-tolerance``: the same blocks at smaller batches (more
    steps), within the tolerance of the plan's time; the plan records it and
    validates against the schema."""
    model = str(ROOT / "examples" / "small_cnn.py")
    speed = ["--device-tflops", "0.1", "--op-overhead-us", "5", "--budget", "30MB", "-q"]
    assert nf_plan([model, "-o", str(tmp_path / "a.json"), "--batch-time-tolerance", "0", *speed]) == 0
    assert nf_plan([model, "-o", str(tmp_path / "b.json"), "--batch-time-tolerance", "0.5", *speed]) == 0
    fast, small = load_plan(tmp_path / "a.json"), load_plan(tmp_path / "b.json")
    jsonschema.validate(json.loads((tmp_path / "b.json").read_text()), schema())
    assert small.solver.batch_time_tolerance == 0.5 and fast.solver.batch_time_tolerance == 0.0
    assert [b.units for b in small.blocks] == [b.units for b in fast.blocks]
    pairs = [(s.batch_size, f.batch_size) for s, f in zip(small.blocks, fast.blocks)]
    assert all(s <= f for s, f in pairs) and any(s < f for s, f in pairs), pairs
    assert all(b.steps == b.epochs * -(-small.recipe.train_size // b.batch_size) for b in small.blocks)
    assert fast.predicted.time_s <= small.predicted.time_s <= fast.predicted.time_s * 1.5 + 1e-9


def test_budget_where_bp_cannot_train_still_plans(tmp_path: Path) -> None:
    """ResNet-18's params, grads and momentum alone exceed 120MB: BP cannot
    run at all, NeuroFlux splits the network into blocks that fit."""
    out = tmp_path / "p.json"
    assert nf_plan([str(ROOT / "examples" / "resnet18.py"), "--budget", "120MB", "-o", str(out), "-q"]) == 0
    plan = load_plan(out)
    assert len(plan.blocks) >= 2
    assert not plan.baseline.bp.fits and plan.predicted.speedup_vs_bp is None
    assert all(b.predicted_peak_bytes <= plan.budget_bytes * 0.9 for b in plan.blocks)


def test_stringent_budget_gives_larger_batches_than_bp(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    speed = ["--device-tflops", "0.2", "--op-overhead-us", "10"]  # a fixed cost model, not this machine's load
    speed += ["--batch-time-tolerance", "0"]  # the least-time batches (the CPU default trades some for more steps)
    assert nf_plan([str(ROOT / "examples" / "resnet18.py"), "--budget", "250MB", "-o", str(out), "-q", *speed]) == 0
    plan = load_plan(out)
    assert plan.baseline.bp.fits
    assert min(b.batch_size for b in plan.blocks) > plan.baseline.bp.batch_size
    assert plan.predicted.speedup_vs_bp > 1


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = "import torch\nfrom torch import nn\nINPUT_SHAPE=(1,8,8)\n"
D = ["--budget", "1GB", "--train-size", "64", "--val-size", "16"]  # the usual flags


@pytest.mark.parametrize(
    "source,argv_extra,message",
    [
        (None, D, "not found"),
        (GOOD + "def build():\n    return nn.Conv2d(1,2,3)\n", D, "has no model factory 'model()'"),
        (GOOD + "def model():\n    raise RuntimeError('boom')\n", D, "model() raised RuntimeError: boom"),
        (GOOD + "def model():\n    return nn.Conv2d(1, 2, 3)\n", D, "logits of shape (batch, classes)"),
        (GOOD + "def model():\n    return 3\n", D, "expected a torch.nn.Module"),
        (
            GOOD + "class M(nn.Module):\n    def __init__(s):\n        super().__init__(); s.c = nn.Conv2d(1,2,3)\n"
            "    def forward(s, x):\n        y = s.c(x)\n        return y.flatten(1) if y.sum() > 0 else y.flatten(1)\n"
            "def model():\n    return M()\n",
            D,
            "cannot trace",
        ),
        (GOOD + "syntax error here\n", D, "importing"),
        (
            GOOD + "def model():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n",
            ["--budget", "1XB", "--train-size", "64", "--val-size", "16"],
            "cannot read budget",
        ),
        (
            GOOD + "def model():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n",
            ["--train-size", "64", "--val-size", "16"],
            "no NVIDIA GPU",
        ),
        (
            GOOD + "def model():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n",
            ["--budget", "1GB"],
            "has no datasets()",
        ),
        (
            GOOD + "def model():\n    return nn.Sequential(nn.Conv2d(1, 64, 3), nn.Flatten(), nn.Linear(2304, 3))\n",
            ["--budget", "10KB", "--train-size", "100", "--val-size", "10"],
            "smallest budget that works is",
        ),
        (
            GOOD + "def model():\n    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), "
            "nn.Flatten(), nn.Linear(64, 3))\n",
            [*D, "--min-reduction", "1000"],
            "Pass --min-reduction",
        ),
        (GOOD + "def model():\n    return nn.Conv2d(1, 2, 3)\n", [*D, "--min-reduction", "0.5"], "--min-reduction"),
        (
            GOOD + "def model():\n    return nn.Conv2d(1, 2, 3)\n",
            [*D, "--batch-time-tolerance", "1.5"],
            "--batch-time-tolerance must be in [0, 1)",
        ),
    ],
)
def test_plan_cli_errors(tmp_path: Path, capsys, source, argv_extra, message) -> None:
    path = tmp_path / "missing.py" if source is None else write(tmp_path, "m.py", source)
    argv = [str(path), "-o", str(tmp_path / "p.json"), "-q", *argv_extra]
    assert nf_plan(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


def test_factory_override_and_size_flags(tmp_path: Path) -> None:
    src = (
        GOOD
        + "def build_net():\n    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))\n"
    )
    path = write(tmp_path, "m.py", src)
    out = tmp_path / "p.json"
    assert (
        nf_plan(
            [f"{path}:build_net", "--budget", "1GB", "--train-size", "64", "--val-size", "16", "-o", str(out), "-q"]
        )
        == 0
    )
    plan = load_plan(out)
    assert plan.model.factory == "build_net" and plan.model.num_classes == 3 and plan.recipe.train_size == 64


def test_measured_cost_model_on_cpu(tmp_path: Path) -> None:
    """--cost measure times real steps here instead of counting FLOPs."""
    src = GOOD + (
        "def model():\n    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),"
        " nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 3))\n"
    )
    path = write(tmp_path, "m.py", src)
    out = tmp_path / "p.json"
    assert (
        nf_plan(
            [
                str(path),
                "--budget",
                "1GB",
                "--train-size",
                "256",
                "--val-size",
                "32",
                "--cost",
                "measure",
                "--device",
                "cpu",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    plan = load_plan(out)
    assert plan.profile.cost_source == "measure" and plan.profile.device_flops_per_s == 0.0
    assert all(u.profile.step_fixed_s + u.profile.step_per_sample_s > 0 for u in plan.units)
    assert plan.baseline.bp.predicted_time_s > 0


def documented_pairs() -> list[tuple[str, str]]:
    """(model[:factory], datasets) pairs that README.md, BENCHMARKS.md and the
    nf-bench presets tell users to plan, other than a zoo file's default pair
    (test_every_zoo_model_plans_at_1gb plans those)."""
    import re

    from neuroflux.tools.bench_cells import PRESETS

    pairs = {(c.model, c.datasets) for cells in PRESETS.values() for c in cells}
    for doc in ("README.md", "BENCHMARKS.md"):
        for line in (ROOT / doc).read_text().splitlines():
            if not re.search(r"\bnf-(plan|bench)\b", line):
                continue
            ds = re.search(r"--datasets (\w+)", line)
            for m in re.finditer(
                r"(?:examples/)?\b(small_cnn|vgg11|vgg16|resnet18|resnet34|mobilenetv2)(?:\.py)?(:\w+)?", line
            ):
                pairs.add((m.group(1) + (m.group(2) or ""), ds.group(1) if ds else "datasets"))
    return sorted((m, d) for m, d in pairs if ":" in m or d != "datasets")


@pytest.mark.parametrize("model,datasets", documented_pairs())
def test_every_documented_factory_and_datasets_pair_plans(tmp_path: Path, model: str, datasets: str) -> None:
    """Each factory gets its own input shape (resnet34:model_imagenet is
    3x224x224, not the file's Fashion-MNIST 1x32x32)."""
    from neuroflux.tools.bench_cells import model_path

    out = tmp_path / "plan.json"
    rc = nf_plan(
        [
            model_path(model),
            "--datasets",
            datasets,
            "--budget",
            "8GB",
            "-o",
            str(out),
            "-q",
            "--time-limit",
            "5",
            "--device-tflops",
            "0.1",
            "--op-overhead-us",
            "5",
            "--epochs",
            "1",
        ]
    )
    assert rc == 0
    plan = load_plan(out)
    if "imagenet" in model:
        assert plan.model.input_shape == [3, 224, 224] and plan.model.num_classes == 1000


def _decisions(path: Path) -> dict:
    d = json.loads(path.read_text())
    return {
        "blocks": d["blocks"],
        "units": [(u["name"], u["aux"], u["profile"]) for u in d["units"]],
        "predicted": d["predicted"],
        "baseline": d["baseline"],
        "speed": d["profile"],
    }


def test_same_inputs_give_the_same_plan_whatever_the_load(tmp_path: Path, monkeypatch) -> None:
    """The device profile is measured once and cached: a second planning run
    (on a machine whose measured speed now differs) gives the same plan."""
    from neuroflux.planner import device_profile, profile, step_costs

    monkeypatch.setenv("NEUROFLUX_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    argv = [str(ROOT / "examples" / "small_cnn.py"), "--budget", "16MB", "-q", "--time-limit", "10"]
    assert nf_plan([*argv, "-o", str(a)]) == 0
    assert list((tmp_path / "cache").glob("device-*.json")), "the profile is cached"
    slower = profile.DeviceSpeed(flops_per_s=1.0, op_overhead_s=1.0)  # a loaded machine, if it were re-measured
    monkeypatch.setattr(step_costs, "measure_device_speed", lambda *a, **k: slower)
    monkeypatch.setattr(step_costs, "measure_step_costs", lambda *a, **k: (1.0, 1.0, 1.0, []))
    monkeypatch.setattr(device_profile, "measure_profile", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    assert nf_plan([*argv, "-o", str(b)]) == 0
    assert _decisions(a) == _decisions(b)
    assert "cached profile" in json.loads(a.read_text())["profile"]["device_speed_source"]


def test_device_profile_file_plans_for_another_device(tmp_path: Path) -> None:
    prof = ROOT / "benchmarks" / "device-profiles" / "h100-estimated.json"
    out = tmp_path / "plan.json"
    # 128MB: on CUDA the cuBLAS workspace (65 MiB) and the step calibration come on top of the CPU's 16MB
    assert (
        nf_plan(
            [
                str(ROOT / "examples" / "small_cnn.py"),
                "--budget",
                "128MB",
                "--device",
                "cuda",
                "-q",
                "--device-profile",
                str(prof),
                "-o",
                str(out),
                "--time-limit",
                "10",
            ]
        )
        == 0
    )
    plan = load_plan(out)
    assert plan.device.kind == "cuda" and plan.profile.device_flops_per_s == 4.0e13
    assert plan.device.workspace_bytes == 68157440 and plan.device.activation_scale == 1.109
    assert "h100-estimated.json" in plan.profile.device_speed_source


@pytest.mark.parametrize("dp_applies", [True, False])
def test_solver_timeout_falls_back_to_a_plan(tmp_path: Path, monkeypatch, caplog, dp_applies: bool) -> None:
    """Never "no plan" when a feasible one exists: the dynamic program's plan,
    or where it does not apply, the greedy one."""
    from neuroflux.planner import solve
    from neuroflux.planner.problem import Solution

    monkeypatch.setattr(
        solve, "solve_cpsat", lambda *a, **k: Solution(status="timeout", message="CP-SAT found no plan")
    )
    if not dp_applies:
        monkeypatch.setattr(solve, "solve_dp", lambda *a, **k: None)
    out = tmp_path / "plan.json"
    with caplog.at_level("WARNING"):
        assert (
            nf_plan(
                [
                    str(ROOT / "examples" / "small_cnn.py"),
                    "--budget",
                    "16MB",
                    "-q",
                    "-o",
                    str(out),
                    "--device-tflops",
                    "0.1",
                    "--op-overhead-us",
                    "5",
                ]
            )
            == 0
        )
    plan = load_plan(out)
    assert plan.blocks and plan.solver.engine == ("dp" if dp_applies else "greedy")
    assert plan.solver.status == ("optimal" if dp_applies else "feasible")
    assert any("CP-SAT found no plan" in r.message for r in caplog.records)


def test_a_plan_breaking_its_constraints_is_never_written(tmp_path: Path, monkeypatch, capsys) -> None:
    """Every plan is checked against the problem it solves (check_solution)
    before it is written, whichever engine made it: here a solver bug that
    puts the whole network in one block at a batch far over the budget."""
    import dataclasses

    from neuroflux.planner import solve

    real = solve.solve

    def broken(problem, cfg):
        sol, engine = real(problem, cfg)
        whole = dataclasses.replace(sol.blocks[0], start=0, end=problem.n - 1, batch_size=problem.batch_sizes[-1])
        return dataclasses.replace(sol, blocks=(whole,)), engine

    monkeypatch.setattr("neuroflux.planner.build.solve", broken)
    out = tmp_path / "plan.json"
    args = [str(ROOT / "examples" / "small_cnn.py"), "--budget", "16MB", "-q", "-o", str(out)]
    # --batch-time-tolerance 0: the broken solution reaches the check as the solver returned it.
    assert nf_plan([*args, "--device-tflops", "0.1", "--op-overhead-us", "5", "--batch-time-tolerance", "0"]) == 2
    err = capsys.readouterr().err
    assert "internal error" in err and "breaks its own constraints" in err and "> cap" in err, err
    assert not out.exists()


def test_deep_model_plans_with_the_dynamic_program(tmp_path: Path) -> None:
    """A 26-unit network (26 convs) plans past CP-SAT's size with the exact
    dynamic program (8 channels: one head width per unit, so it profiles fast)."""
    model = tmp_path / "deep.py"
    model.write_text(
        "import torch\nfrom torch import nn\nINPUT_SHAPE = (1, 8, 8)\n"
        "def model():\n"
        "    layers = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()]\n"
        "    for _ in range(25):\n"
        "        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]\n"
        "    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))\n"
    )
    out = tmp_path / "plan.json"
    assert (
        nf_plan(
            [
                str(model),
                "--budget",
                "4MB",
                "-q",
                "-o",
                str(out),
                "--train-size",
                "2048",
                "--val-size",
                "256",
                "--device-tflops",
                "0.1",
                "--op-overhead-us",
                "5",
            ]
        )
        == 0
    )
    plan = load_plan(out)
    assert len(plan.units) > 24 and plan.solver.engine == "dp" and plan.solver.status == "optimal"
    assert plan.solver.wall_time_s < 10, "the solver's share (the whole run's time is benchmarks/plan_times.py's)"


def test_sweep_profiles_once_and_more_budget_is_never_slower(tmp_path: Path, capsys) -> None:
    import math

    from neuroflux.planner.sweep import parse_sweep

    out = tmp_path / "sweep"
    assert (
        nf_plan(
            [
                str(ROOT / "examples" / "small_cnn.py"),
                "--sweep",
                "4MB:256MB:6",
                "-o",
                str(out),
                "--device-tflops",
                "0.1",
                "--op-overhead-us",
                "5",
                "--train-size",
                "2048",
                "--val-size",
                "256",
                "--time-limit",
                "10",
            ]
        )
        == 0
    )
    report = capsys.readouterr().out
    assert "budget sweep" in report and "too small" in report  # 4MB has no plan, and says why
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["budget_bytes"] for r in rows] == [b for b, _ in parse_sweep("4MB:256MB:6")]
    planned = [r for r in rows if r["plan_file"]]
    assert rows[0]["plan_file"] is None and len(planned) >= 4
    for r in planned:
        plan = load_plan(out / r["plan_file"])
        assert plan.budget_bytes == r["budget_bytes"] and plan.predicted.time_s == r["neuroflux_time_s"]
    least = [r["neuroflux_least_time_s"] for r in planned]
    assert all(t is not None for t in least)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(least, least[1:])), least  # more budget never predicts slower
    bp = [r["bp_time_s"] for r in planned if r["bp_time_s"]]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(bp, bp[1:]))
    assert "<svg" in (out / "sweep.html").read_text() and math.isfinite(least[-1])


@pytest.mark.parametrize(
    "spec,message",
    [
        ("100MB:1GB", "LOW:HIGH:COUNT"),
        ("1GB:100MB:3", "HIGH must be larger"),
        ("1GB,1000MB", "twice"),
        ("1GB,lots", "sweep budget"),
    ],
)
def test_sweep_spec_errors(spec: str, message: str, capsys) -> None:
    assert nf_plan([str(ROOT / "examples" / "small_cnn.py"), "--sweep", spec, "-q"]) == 2
    assert message in capsys.readouterr().err


def test_cpu_defaults_resolve_into_the_plan(tmp_path: Path) -> None:
    """A CPU plan's defaults are recorded resolved: the batch rule at
    ``CPU_BATCH_TIME_TOLERANCE`` and a patience of a quarter of the units (at
    least 2); flags given explicitly are recorded as given."""
    from neuroflux.planner.config import CPU_BATCH_TIME_TOLERANCE, auto_patience

    model = str(ROOT / "examples" / "small_cnn.py")
    speed = ["--device-tflops", "0.1", "--op-overhead-us", "5", "--budget", "30MB", "-q"]
    assert nf_plan([model, "-o", str(tmp_path / "d.json"), *speed]) == 0
    assert nf_plan([model, "-o", str(tmp_path / "e.json"), "--patience", "3", *speed]) == 0
    d, e = load_plan(tmp_path / "d.json"), load_plan(tmp_path / "e.json")
    assert d.solver.batch_time_tolerance == CPU_BATCH_TIME_TOLERANCE
    assert d.exit_policy.patience == auto_patience(len(d.units)) >= 2
    assert e.exit_policy.patience == 3
