"""NeuroFlux from Python: neuroflux.plan / train / load_plan / Plan.save
against the CLIs on the same model, model objects' fingerprints, import-path
models, and the quickstart script."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT

import neuroflux
from neuroflux.errors import NeuroFluxError
from neuroflux.planner.cli import main as nf_plan
from neuroflux.runtime.cli import main as nf_run
from neuroflux.schemas import load_plan

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow

TINY = Path(__file__).resolve().parent / "tiny_model.py"
FIXED = dict(device_flops_per_s=1e11, op_overhead_s=5e-6, time_limit_s=10)
CLI_FIXED = ["--device-tflops", "0.1", "--op-overhead-us", "5", "--time-limit", "10", "--device", "cpu", "-q"]


def _tiny():
    spec = importlib.util.spec_from_file_location("tiny_model_for_api", TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _decisions(plan):
    return (
        [(b.units, b.batch_size) for b in plan.blocks],
        [(u.name, None if u.aux is None else (u.aux.kind, u.aux.width)) for u in plan.units],
    )


def test_api_plan_of_a_model_object_equals_the_cli_plan_of_its_file(tmp_path: Path) -> None:
    out = tmp_path / "cli.json"
    assert nf_plan([str(TINY), "--budget", "2MB", "-o", str(out), "--epochs", "2", *CLI_FIXED]) == 0
    tiny = _tiny()
    plan = neuroflux.plan(
        tiny.Tiny(),
        budget="2MB",
        input_shape=tiny.INPUT_SHAPE,
        train_size=tiny.TRAIN,
        val_size=tiny.VAL,
        epochs=2,
        **FIXED,
    )
    cli = load_plan(out)
    assert _decisions(plan) == _decisions(cli)
    assert plan.model.source == "object" and plan.model.file.endswith(".Tiny") and cli.model.source == "file"
    plan.save(tmp_path / "api.json")
    assert _decisions(neuroflux.load_plan(tmp_path / "api.json")) == _decisions(plan)


def test_train_on_a_model_object_matches_nf_run_on_the_same_plan(tmp_path: Path) -> None:
    """Same decisions, same seed, same data: the same exit accuracies."""
    plan_file = tmp_path / "plan.json"
    common = ["--budget", "2MB", "--epochs", "1", "--strategy", "greedy", "--max-batch", "32", "--patience", "10"]
    assert nf_plan([str(TINY), "-o", str(plan_file), *common, *CLI_FIXED]) == 0
    assert nf_run([str(plan_file), "--out", str(tmp_path / "cli-run"), "--device", "cpu", "--no-onnx", "-q"]) == 0
    cli_summary = __import__("json").loads((tmp_path / "cli-run" / "summary.json").read_text())
    glibc = __import__("platform").libc_ver()[0] == "glibc"
    assert cli_summary["host_memory"] == ("kept" if glibc else "default")  # runtime.host_memory, on a CPU run

    tiny = _tiny()
    train_set, val_set = tiny.datasets()
    torch.manual_seed(0)  # the plan's seed: the weights nf-run's model file gives
    model = tiny.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = neuroflux.plan(
        model,
        budget="2MB",
        input_shape=tiny.INPUT_SHAPE,
        train_size=len(train_set),
        val_size=len(val_set),
        epochs=1,
        strategy="greedy",
        max_batch=32,
        patience=10,
        **FIXED,
    )
    assert _decisions(plan) == _decisions(load_plan(plan_file))
    result = neuroflux.train(plan, model, train_set, val_set, out=tmp_path / "api-run", device="cpu", export_onnx=False)
    got = {u: a for b in result.summary["blocks"] for u, a in b["exit_accuracies"].items()}
    want = {u: a for b in cli_summary["blocks"] for u, a in b["exit_accuracies"].items()}
    assert got == pytest.approx(want, abs=1e-9)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the object is left unchanged"
    x, _ = val_set[0]
    assert result.model(x[None]).shape == (1, tiny.NUM_CLASSES)
    assert result.summary["final_params"] == sum(p.numel() for p in result.model.parameters())


def test_a_model_object_on_another_device_plans_the_same(tmp_path: Path) -> None:
    """Planning copies only shapes and dtypes: a model on the meta device (as
    one on a GPU) gives the CPU object's plan, and is not moved."""
    tiny = _tiny()
    kw = dict(budget="2MB", input_shape=tiny.INPUT_SHAPE, train_size=512, val_size=128, epochs=1, **FIXED)
    on_meta = tiny.Tiny().to("meta")
    assert _decisions(neuroflux.plan(on_meta, **kw)) == _decisions(neuroflux.plan(tiny.Tiny(), **kw))
    assert next(on_meta.parameters()).device.type == "meta"


def test_a_changed_model_object_is_refused(tmp_path: Path) -> None:
    tiny = _tiny()
    plan = neuroflux.plan(
        tiny.Tiny(), budget="2MB", input_shape=tiny.INPUT_SHAPE, train_size=512, val_size=128, epochs=1, **FIXED
    )
    changed = tiny.Tiny()
    changed.fc = torch.nn.Linear(32, 7)
    train_set, val_set = tiny.datasets()
    with pytest.raises(NeuroFluxError, match="differs from the one planned"):
        neuroflux.train(plan, changed, train_set, val_set, out=tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()
    plan.save(tmp_path / "plan.json")  # and nf-run says where such a plan is run from
    assert nf_run([str(tmp_path / "plan.json"), "--out", str(tmp_path / "r2"), "-q"]) == 2


def test_api_errors_say_what_to_change() -> None:
    tiny = _tiny()
    with pytest.raises(TypeError, match="unknown plan option"):
        neuroflux.plan(tiny.Tiny(), budget="2MB", input_shape=(1, 16, 16), train_size=8, val_size=8, epoch=3)
    with pytest.raises(NeuroFluxError, match="input-shape|INPUT_SHAPE|datasets"):
        neuroflux.plan(tiny.Tiny(), budget="2MB", train_size=8, val_size=8)
    with pytest.raises(TypeError, match="nn.Module"):
        neuroflux.plan(42, budget="2MB")


def test_an_import_path_model_plans(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "site" / "mymodels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        TINY.read_text()
        .replace("INPUT_SHAPE = (1, 16, 16)\n", "")
        .replace("def datasets():", "def _unused_datasets():")
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = tmp_path / "plan.json"
    argv = [
        "mymodels.nets:model",
        "--budget",
        "2MB",
        "--train-size",
        "512",
        "--val-size",
        "128",
        "-o",
        str(out),
        *CLI_FIXED,
    ]
    assert nf_plan([*argv, "--input-shape", "1,16,16"]) == 0
    plan = load_plan(out)
    assert (
        plan.model.source == "import" and plan.model.file == "mymodels.nets" and plan.model.input_shape == [1, 16, 16]
    )
    assert nf_plan(argv) == 2  # no INPUT_SHAPE in the module and none given
    assert nf_plan([*argv, "--input-shape", "1,x,16"]) == 2
    assert nf_plan(["nosuchpkg.nets:model", "--budget", "2MB", "-o", str(out), *CLI_FIXED]) == 2


def test_quickstart_script_runs(tmp_path: Path) -> None:
    env = {**os.environ, "NEUROFLUX_LIMIT": "256,128"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "api_quickstart.py"), str(tmp_path / "qs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NeuroFlux: val accuracy" in proc.stdout and "BP       : val accuracy" in proc.stdout
    assert (tmp_path / "qs" / "plan.json").is_file() and (tmp_path / "qs" / "final_model_full.pt").is_file()


def test_views_of_a_plan_made_from_an_object(tmp_path: Path, capsys) -> None:
    """DOT, GraphML and HTML need only the plan; ONNX needs the object (from Python)."""
    from neuroflux.tools.graph_cli import main as nf_graph

    tiny = _tiny()
    model = tiny.Tiny()
    plan = neuroflux.plan(
        model, budget="2MB", input_shape=tiny.INPUT_SHAPE, train_size=512, val_size=128, epochs=1, **FIXED
    )
    plan.save(tmp_path / "plan.json")
    for ext in ("html", "dot", "graphml"):
        assert nf_graph([str(tmp_path / "plan.json"), "-o", str(tmp_path / f"plan.{ext}")]) == 0
    assert nf_graph([str(tmp_path / "plan.json"), "-o", str(tmp_path / "plan.onnx")]) == 2
    assert "neuroflux.export_onnx" in capsys.readouterr().err
    import onnx

    out = neuroflux.export_onnx(plan, model, tmp_path / "api.onnx")
    m = onnx.load(str(out))
    assert {p.value for n in m.graph.node for p in n.metadata_props if p.key == "neuroflux.unit"} == {
        u.name for u in plan.units
    }
