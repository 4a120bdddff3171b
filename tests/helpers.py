"""Shared test helpers: plan a model file in-process, quickly."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from neuroflux.planner.build import make_plan
from neuroflux.planner.config import PlanConfig
from neuroflux.schemas import save_plan

ROOT = Path(__file__).resolve().parents[1]


def kill_after_event(monkeypatch, event: str, *, count: int = 1) -> None:
    """The run dies (KeyboardInterrupt, past every handler) right after its
    ``count``-th ``event`` record is logged: what it checkpointed before is
    saved. Undo with ``monkeypatch.context()``."""
    from neuroflux.runtime.runner import Runner

    original, seen = Runner._log, []

    def log(self, record):
        original(self, record)
        seen.append(record["event"])
        if seen.count(event) == count:
            raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "_log", log)


def plan_for(model: str | Path, tmp_path: Path, *, budget: int = 10**9, **kw):
    cfg = PlanConfig.from_options(
        budget_bytes=budget, budget_text=str(budget), time_limit_s=10, device_flops_per_s=1e11, op_overhead_s=5e-6, **kw
    )
    result = make_plan(str(model), cfg, plan_dir=tmp_path)
    path = tmp_path / "plan.json"
    save_plan(result.plan, path)
    return result, path


def tiny_plan(
    tmp_path: Path,
    *,
    train: int = 512,
    epochs: int = 2,
    cache_location: str = "ram",
    cache_dtype: str = "float32",
    **kw,
):
    src = (
        (Path(__file__).resolve().parent / "tiny_model.py")
        .read_text()
        .replace("TRAIN, VAL = 512, 128", f"TRAIN, VAL = {train}, 128")
    )
    model = tmp_path / "tiny_model.py"
    model.write_text(src)
    result, path = plan_for(
        model,
        tmp_path,
        strategy="greedy",
        epochs=epochs,
        min_batch=8,
        max_batch=32,
        cache_location=cache_location,
        cache_dtype=cache_dtype,
        **{"patience": 10, "epoch_patience": 0, **kw},
    )
    return result.plan, path, model


def wait_for_metrics(path: Path, predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll a run's metrics.jsonl until ``predicate(records)`` holds; fail if
    ``proc`` ends first (with its stderr) or on the timeout."""
    import pytest

    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.is_file() and predicate([json.loads(line) for line in path.read_text().splitlines() if line.strip()]):
            return
        if proc.poll() is not None:
            err = proc.stderr.read()[-2000:] if proc.stderr else ""
            pytest.fail(f"the run ended (rc {proc.returncode}) before the awaited event: {err}")
        time.sleep(0.05)
    pytest.fail("timed out waiting for the run")
