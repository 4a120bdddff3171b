"""The GPU runbook's dry run: tools/gpu/prepare.sh then tools/gpu/run.sh
--dry-run, on this CPU with tiny data and one step per epoch, so that a
broken runbook is caught before scarce GPU time is spent on it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from helpers import ROOT

# Plans and trains real models end to end: the full suite's, not the fast loop's (-m "not slow").
pytestmark = pytest.mark.slow


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA.is_file(), reason="needs ../shared/data/fashion_mnist.npz")
def test_gpu_runbook_dry_run(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "NF_GPU_DIR": str(tmp_path / "gpu"),
        "NF_DRY_OUT": str(tmp_path / "out"),
        "NEUROFLUX_DATA": str(SHARED_DATA),
        "NEUROFLUX_CACHE": str(tmp_path / "cache"),
        # The cell run below; the others differ only in model, budget and options (a real prepare plans them
        # all; tests/test_plan_cli.py plans the ImageNet-shaped ResNet-34 on its own).
        "NF_GPU_CELLS": "resnet18-350MB-levers",
    }
    prep = subprocess.run(
        ["bash", str(ROOT / "tools/gpu/prepare.sh"), "--no-wheels"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert prep.returncode == 0, prep.stdout + prep.stderr
    assert "travelling size" in prep.stdout
    # The GPU image has no ortools and no pydot: the run must not need them.
    blocker = tmp_path / "no_solver"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys, importlib.abc\n"
        "class _Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('ortools', 'pydot'):\n"
        "            raise ModuleNotFoundError(name + ' is not on the GPU machine')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    run_env = {**env, "PYTHONPATH": os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    # One cell runs through the script here, with issue 19's levers, to keep the suite short.
    run = subprocess.run(
        ["bash", str(ROOT / "tools/gpu/run.sh"), "--dry-run", "resnet18-350MB-levers"],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    cells = {c["name"]: c for c in results["cells"]}
    from neuroflux.tools.bench_cells import PRESETS

    assert set(cells) == {"resnet18-350MB-levers"}
    planned = {p.name for p in (tmp_path / "gpu" / "plans").iterdir() if (p / "plans.json").is_file()}
    assert planned == set(env["NF_GPU_CELLS"].split()) <= {c.name for c in PRESETS["gpu"]}, "prepare.sh plans them"
    for name, cell in cells.items():
        for method, run_ in cell["runs"].items():
            assert "error" not in run_, (name, method, run_)
            assert run_["cap_held"] and run_["measured_peak_bytes"] > 0
        # The levers reached the plan the GPU trains: stage heads, a polish of every small exit, the size limit.
        plan = json.loads(next((tmp_path / "gpu" / "plans" / name).glob("plan-0.json")).read_text())
        assert {u["aux"]["kind"] for u in plan["units"] if u["aux"]} == {"stage"}
        assert plan["polish"]["exits"] and plan["exit_policy"]["min_reduction"] == 10.0
