"""From a plan and its model file to executable units and heads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.graph import split_units, trace
from neuroflux.runtime.heads import build_head
from neuroflux.runtime.model_file import ModelFile, load_model_file, sha256_of
from neuroflux.schemas.plan import Plan

__all__ = ["Assembled", "model_path", "open_model_file", "assemble"]


@dataclass
class Assembled:
    model: nn.Module
    units: list[nn.Module]
    """fx GraphModules sharing parameters with ``model``."""
    heads: list[nn.Module | None]
    """Aux head per unit (None for the last: it ends in the model's head)."""


def model_path(plan: Plan, plan_path: Path) -> Path:
    p = Path(plan.model.file)
    return p if p.is_absolute() else (plan_path.parent / p).resolve()


def open_model_file(plan: Plan, plan_path: Path, *, force: bool = False) -> ModelFile:
    """Load the plan's model file; refuse a changed file unless ``force``."""
    path = model_path(plan, plan_path)
    if not path.is_file():
        raise NeuroFluxError(f"the plan's model file {path} is missing; restore it or re-plan")
    digest = sha256_of(path)
    if digest != plan.model.sha256 and not force:
        raise NeuroFluxError(
            f"model file {path} changed since it was planned (sha256 {digest[:12]}..., plan has "
            f"{plan.model.sha256[:12]}...); re-plan with nf-plan, or pass --force to run the old plan anyway"
        )
    return load_model_file(path, factory=plan.model.factory, datasets=plan.model.datasets)


def assemble(plan: Plan, mf: ModelFile, *, seed: int | None = None) -> Assembled:
    """Build the model (seeded), split it into the plan's units, build heads."""
    torch.manual_seed(plan.recipe.seed if seed is None else seed)
    model = mf.build()
    gm = trace(model, plan.model.input_shape)
    units = split_units(gm, [u.nodes for u in plan.units])
    heads: list[nn.Module | None] = []
    for u in plan.units:
        heads.append(None if u.aux is None else build_head(u.aux.kind, u.output_shape, u.aux.width, plan.model.num_classes))
    return Assembled(model=gm, units=units, heads=heads)
