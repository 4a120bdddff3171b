"""From a plan and its model file to executable units and heads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.graph import split_units, trace
from neuroflux.runtime.heads import build_head
from neuroflux.runtime.model_file import ModelFile, ModelObject, load_model_file, sha256_of
from neuroflux.schemas.plan import Plan

__all__ = ["check_model_file", "Assembled", "model_path", "open_model_file", "assemble"]


@dataclass
class Assembled:
    model: nn.Module
    units: list[fx.GraphModule]
    """fx GraphModules sharing parameters with ``model``."""
    heads: list[nn.Module | None]
    """Aux head per unit (None for the last: it ends in the model's head)."""


def model_path(plan: Plan, plan_path: Path) -> Path:
    p = Path(plan.model.file)
    return p if p.is_absolute() else (plan_path.parent / p).resolve()


def check_model_file(plan: Plan, plan_path: Path, *, force: bool = False) -> None:
    """Refuse a plan whose model file is missing or changed (unless
    ``force``), without running the file: views that need only the plan
    check it this way (an installed module is checked by its import, which
    runs it, so it is left to the views that need the model)."""
    if plan.model.source != "file":
        return
    path = model_path(plan, plan_path)
    if not path.is_file():
        raise NeuroFluxError(f"the plan's model file {path} is missing; restore it or re-plan")
    digest = sha256_of(path)
    if digest != plan.model.sha256 and not force:
        raise NeuroFluxError(
            f"model file {path} changed since it was planned (sha256 {digest[:12]}..., plan has "
            f"{plan.model.sha256[:12]}...); re-plan with nf-plan, or pass --force to show the old plan"
        )


def open_model_file(plan: Plan, plan_path: Path, *, force: bool = False) -> ModelFile:
    """Load the plan's model file (or installed module); refuse a changed
    one unless ``force``."""
    if plan.model.source == "object":
        raise NeuroFluxError(
            f"this plan was made in Python from a {plan.model.file} object, not from a model file; train it from "
            "Python: neuroflux.train(plan, model, train_set, val_set)"
        )
    if plan.model.source == "import":
        mf = load_model_file(f"{plan.model.file}:{plan.model.factory}", datasets=plan.model.datasets)
        path, digest = mf.path, mf.sha256
    else:
        path = model_path(plan, plan_path)
        if not path.is_file():
            raise NeuroFluxError(f"the plan's model file {path} is missing; restore it or re-plan")
        digest = sha256_of(path)
    if digest != plan.model.sha256 and not force:
        raise NeuroFluxError(
            f"model file {path} changed since it was planned (sha256 {digest[:12]}..., plan has "
            f"{plan.model.sha256[:12]}...); re-plan with nf-plan, or pass --force to run the old plan anyway"
        )
    if plan.model.source == "import":
        return mf
    return load_model_file(path, factory=plan.model.factory, datasets=plan.model.datasets)


def check_model_object(plan: Plan, source: ModelObject, *, force: bool = False) -> None:
    """Refuse a model object whose structure is not the planned one."""
    if plan.model.source != "object":
        raise NeuroFluxError(
            f"this plan was made from {plan.model.file}; run it with nf-run, or re-plan the model "
            "object with neuroflux.plan(model, ...)"
        )
    if source.sha256 != plan.model.sha256 and not force:
        raise NeuroFluxError(
            f"the {source.label} model differs from the one planned (fingerprint {source.sha256[:12]}..., plan has "
            f"{plan.model.sha256[:12]}...: parameter names, shapes or dtypes changed); re-plan it with "
            "neuroflux.plan(model, ...), or pass force=True to run the old plan anyway"
        )


def assemble(plan: Plan, mf: ModelFile | ModelObject, *, seed: int | None = None) -> Assembled:
    """Build the model (seeded), split it into the plan's units, build heads
    (seeded apart, so they are the same whether the model was built here or
    given as an object)."""
    seed = plan.recipe.seed if seed is None else seed
    torch.manual_seed(seed)
    model = mf.build()
    gm = trace(model, plan.model.input_shape)
    units = split_units(gm, [u.nodes for u in plan.units])
    torch.manual_seed(seed + 1)
    heads: list[nn.Module | None] = []
    for u in plan.units:
        heads.append(
            None if u.aux is None else build_head(u.aux.kind, u.output_shape, u.aux.width, plan.model.num_classes)
        )
    return Assembled(model=gm, units=units, heads=heads)


def load_final_model(plan: Plan, mf: ModelFile | ModelObject, run_dir: Path, summary: dict) -> nn.Module:
    """The run's final model (``final_model.pt``) as a module: for NeuroFlux
    the network up to the chosen exit with that exit's head, for a baseline
    the whole network."""
    from neuroflux.runtime.modules import Chain

    asm = assemble(plan, mf)
    if summary["method"] == "neuroflux":
        k = plan.unit(summary["final_exit"]).index
        model: nn.Module = Chain(asm.units[: k + 1], asm.heads[k])
    else:
        model = asm.model
    model.load_state_dict(torch.load(Path(run_dir) / "final_model.pt", map_location="cpu", weights_only=True))
    return model.eval()
