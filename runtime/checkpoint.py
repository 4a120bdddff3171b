"""``checkpoint.pt``: what it holds, written atomically (a temp file, then
renamed), loaded safely, and restored into a run.

It holds the method, the plan key (``plan_key``: the plan's decisions that
change the result), the number of processes, the model's and the heads'
weights, the current stage's optimizers (None between stages) and the run's
progress (``RunState.to_json()``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neuroflux.common import atomic_write
from neuroflux.errors import NeuroFluxError
from neuroflux.runtime.assemble import Assembled
from neuroflux.runtime.config import RunPolicy
from neuroflux.runtime.run_state import RunState
from neuroflux.runtime.train import UnitTrainer
from neuroflux.schemas.plan import Plan
from neuroflux.schemas.summary import check_run_state

if TYPE_CHECKING:
    from neuroflux.runtime.stages import Stage

__all__ = ["atomic_torch_save", "load_checkpoint", "plan_key", "save_checkpoint", "restore_checkpoint"]

log = logging.getLogger(__name__)

_CKPT_KEYS = {"method": str, "plan_sha": str, "model": dict, "heads": list, "state": dict}


def plan_key(plan: Plan, policy: RunPolicy) -> str:
    """Digest of every plan decision that changes the result (not the
    solver's timings): a resume must continue the same training."""
    p = plan
    exit_policy = dataclasses.asdict(p.exit_policy)
    if exit_policy.get("min_reduction") == 1.0:  # the default: keys of plans before 2.6 stay as they were
        del exit_policy["min_reduction"]
    key = {
        "model": p.model.sha256,
        "recipe": dataclasses.asdict(p.recipe),
        "exit": exit_policy,
        "heads": [None if u.aux is None else dataclasses.asdict(u.aux) for u in p.units],
        "blocks": [dataclasses.asdict(b) for b in p.blocks],
        "units": [u.nodes for u in p.units],
        "overrides": [policy.patience, policy.tolerance, policy.epoch_patience],
    }
    if p.polish is not None:
        key["polish"] = dataclasses.asdict(p.polish)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(
    path: Path,
    *,
    method: str,
    plan_key: str,
    world_size: int,
    asm: Assembled,
    state: RunState,
    trainers: list[UnitTrainer] | None,
) -> None:
    """The run as it stands; ``trainers``: the current stage's, mid-stage (None between stages)."""
    atomic_torch_save(
        {
            "world_size": world_size,
            "method": method,
            "plan_sha": plan_key,
            "model": asm.model.state_dict(),
            "heads": [None if h is None else h.state_dict() for h in asm.heads],
            "trainers": None if trainers is None else [t.state_dict() for t in trainers],
            "state": state.to_json(),
        },
        path,
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint, loaded with ``weights_only=True`` (tensors and
    plain containers only: a crafted pickle cannot run code), then checked
    for the structure the runner writes. Anything else is a NeuroFluxError."""
    hint = "it is not a NeuroFlux checkpoint or it is truncated; start a new run with another --out"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, OSError ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise NeuroFluxError(f"cannot load {path} ({type(e).__name__}: {first[:160]}); {hint}") from None
    if not isinstance(ckpt, dict):
        raise NeuroFluxError(f"{path} holds a {type(ckpt).__name__}, not a run checkpoint; {hint}")
    for key, tp in _CKPT_KEYS.items():
        if not isinstance(ckpt.get(key), tp):
            raise NeuroFluxError(f"{path} lacks '{key}' ({tp.__name__}); {hint}")
    try:
        check_run_state(ckpt["state"], str(path))
    except NeuroFluxError as e:
        raise NeuroFluxError(f"{e}; {hint}") from None
    return ckpt


def restore_checkpoint(ckpt: dict[str, Any], asm: Assembled, stages: list[Stage], *, run_dir: Path) -> RunState:
    """Weights, heads and the current stage's optimizers from ``ckpt``, and
    the run's progress; contents that do not fit this plan's model (other
    tensors, shapes, counts) are refused, never half-loaded."""
    try:
        state = RunState.from_json(ckpt["state"])
        k = len(state.done)
        if len(ckpt["heads"]) != len(asm.heads) or k > len(stages):
            raise ValueError(
                f"{len(ckpt['heads'])} heads and {k} finished stages for {len(asm.heads)} units "
                f"and {len(stages)} stages"
            )
        asm.model.load_state_dict(ckpt["model"])
        for h, hs in zip(asm.heads, ckpt["heads"]):
            if h is not None and hs is not None:
                h.load_state_dict(hs)
        if k < len(stages) and ckpt.get("trainers"):
            _restore_trainers(stages[k].trainers, ckpt["trainers"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise NeuroFluxError(
            f"the checkpoint in {run_dir} does not fit this plan's model ({first}); it was "
            "damaged, or written by another model or by a NeuroFlux version that trained other units: "
            "start a new --out"
        ) from None
    log.info("resuming at stage %d, epoch %d", k, state.epoch)
    return state


def _restore_trainers(trainers: list[UnitTrainer], saved: list[Any]) -> None:
    """The stage's optimizers and schedules; a momentum buffer of another shape is a ValueError."""
    if len(saved) != len(trainers):
        raise ValueError(f"{len(saved)} optimizer states for {len(trainers)} units")
    for t, ts in zip(trainers, saved):
        t.load_state_dict(ts)
        for p, st in t.opt.state.items():
            buf = st.get("momentum_buffer")
            if buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != p.shape):
                raise ValueError(
                    f"a momentum buffer of shape {getattr(buf, 'shape', None)} for a "
                    f"parameter of shape {tuple(p.shape)}"
                )
