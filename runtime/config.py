"""What a run is asked to do: ``RunConfig`` (the method, the run directory,
the overrides of ``nf-run``'s flags) and ``RunPolicy``, the plan's exit
policy with those overrides applied."""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from neuroflux.schemas.plan import Plan

__all__ = ["Method", "RunConfig", "RunPolicy"]

Method = Literal["neuroflux", "bp", "bp-checkpoint", "bp-checkpoint-all", "bp-compile"]


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    out_dir: Path
    method: Method = "neuroflux"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    resume: bool = False
    force: bool = False
    """Run even if the model file changed since planning."""
    patience: int | None = None
    """Override the plan's exit policy (units without improvement; 0: full depth)."""
    tolerance: float | None = None
    epoch_patience: int | None = None
    """Override the plan's per-block epochs (0: every block runs its planned epochs)."""
    export_onnx: bool = True
    max_steps_per_epoch: int | None = None
    """Dry runs only (nf-bench --dry-run): cut every epoch after this many steps."""
    throughput_batch: int | None = None
    """Batch of the inference-throughput measurement (default: export.throughput's)."""
    loader_workers: int | None = None
    """DataLoader worker processes for datasets read from their source
    (default: ``data.default_loader_workers()``)."""
    command: str = field(default_factory=lambda: shlex.join(["nf-run", *sys.argv[1:]]))


@dataclass(frozen=True, kw_only=True)
class RunPolicy:
    """The plan's exit policy as this run applies it (``RunConfig``'s overrides win)."""

    patience: int
    """Adaptive depth: exits in a row without improvement before the run stops (0: full depth)."""
    tolerance: float
    """An accuracy gain counts as an improvement only above this."""
    epoch_patience: int
    """Per-block epochs: epochs without improvement before a block moves on (0: planned epochs)."""
    max_extra_epochs: int
    """Extra epochs one block may be granted (paid from the time banked by blocks that converged, and by the
    units the exit size limit skips)."""

    @classmethod
    def of(cls, plan: Plan, cfg: RunConfig) -> RunPolicy:
        ep = plan.exit_policy
        return cls(
            patience=ep.patience if cfg.patience is None else cfg.patience,
            tolerance=ep.tolerance if cfg.tolerance is None else cfg.tolerance,
            epoch_patience=ep.epoch_patience if cfg.epoch_patience is None else cfg.epoch_patience,
            max_extra_epochs=ep.max_extra_epochs,
        )
