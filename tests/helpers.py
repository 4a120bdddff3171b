"""Shared test helpers: plan a model file in-process, quickly."""

from __future__ import annotations

from pathlib import Path

from neuroflux.planner.build import PlanConfig, make_plan
from neuroflux.schemas import save_plan

ROOT = Path(__file__).resolve().parents[1]


def plan_for(model: str | Path, tmp_path: Path, *, budget: int = 10**9, **kw):
    cfg = PlanConfig(budget_bytes=budget, budget_text=str(budget), time_limit_s=10,
                     device_flops_per_s=1e11, op_overhead_s=5e-6, **kw)
    result = make_plan(str(model), cfg, plan_dir=tmp_path)
    path = tmp_path / "plan.json"
    save_plan(result.plan, path)
    return result, path


def tiny_plan(tmp_path: Path, *, train: int = 512, epochs: int = 2, cache_location: str = "ram", cache_dtype: str = "float32",
              **kw):
    src = (Path(__file__).resolve().parent / "tiny_model.py").read_text().replace("TRAIN, VAL = 512, 128", f"TRAIN, VAL = {train}, 128")
    model = tmp_path / "tiny_model.py"
    model.write_text(src)
    result, path = plan_for(model, tmp_path, strategy="greedy", epochs=epochs, min_batch=8, max_batch=32,
                            cache_location=cache_location, cache_dtype=cache_dtype, **{"patience": 10, "epoch_patience": 0, **kw})
    return result.plan, path, model
