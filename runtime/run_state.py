"""A run's progress: the typed record the runner updates as it trains, and
its JSON form, the ``state`` of ``checkpoint.pt``.

The JSON form is the one ``neuroflux.schemas.summary.RunStateJSON`` describes
and ``check_run_state`` checks on load; ``to_json`` writes it key for key
as earlier versions did, and ``from_json`` reads what they wrote (fields
they did not have take their starting values)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from neuroflux.runtime.memory import nvml_process_bytes
from neuroflux.runtime.policy import BlockState, DepthState, new_depth_state
from neuroflux.schemas.summary import BlockResult, PolishResult

if TYPE_CHECKING:
    import torch

    from neuroflux.runtime.stages import Stage
    from neuroflux.schemas.plan import Plan

__all__ = ["Clock", "RunState", "StopRecord", "block_result", "block_result_json"]


@dataclass(kw_only=True)
class StopRecord:
    """Where adaptive depth stopped the run."""

    after_block: int
    at_unit: str
    """The last unit trained (the stopping block's last exit)."""
    best_exit: str | None
    blocks_skipped: list[int]
    units_skipped: list[str]
    skipped_predicted_s: float
    """The plan's predicted training time of the skipped blocks."""


@dataclass(kw_only=True)
class RunState:
    """What a checkpoint carries of a run's progress: enough to resume
    exactly where it stopped."""

    done: list[BlockResult] = field(default_factory=list)
    """One record per finished block."""
    epoch: int = 0
    """Epochs finished in the current block."""
    exit_acc: dict[str, float] = field(default_factory=dict)
    """Validation accuracy of every exit trained so far."""
    stopped: str | None = None
    """Adaptive depth's reason, once it stopped the run."""
    stop: StopRecord | None = None
    elapsed_s: float = 0.0
    """Run time so far (resumed runs included)."""
    train_s: float = 0.0
    """Time spent in training epochs (no evaluation, caches or export)."""
    depth: DepthState = field(default_factory=new_depth_state)
    """Adaptive depth's running state (runtime/policy.py)."""
    block: BlockState | None = None
    """The current block's epoch-policy state."""
    last_accs: dict[str, float] | None = None
    """The current block's exit accuracies after its last finished epoch."""
    bank_s: float = 0.0
    """Training time banked by blocks that converged early, and from the start by the units the exit size
    limit leaves untrained (spent on extra epochs)."""
    cache_digests: dict[str, str] = field(default_factory=dict)
    """Per disk cache (block index; ``index.rankR`` on other ranks), a digest
    of sampled bytes taken when it was written: a resume rebuilds a file
    that no longer matches."""
    failed: str | None = None
    """Set when the run diverged: it cannot be resumed."""
    polish: PolishResult | None = None
    """The kept exit's polish, once it ran (the checkpoint then holds its weights)."""

    def to_json(self) -> dict[str, Any]:
        """The checkpoint's ``state``: ``cache_digests`` and ``failed`` only once set."""
        out: dict[str, Any] = {
            "done": [block_result_json(b) for b in self.done],
            "epoch": self.epoch,
            "exit_acc": self.exit_acc,
            "stopped": self.stopped,
            "stop": None if self.stop is None else dataclasses.asdict(self.stop),
            "elapsed_s": self.elapsed_s,
            "train_s": self.train_s,
            "depth": self.depth,
            "block": self.block,
            "last_accs": self.last_accs,
            "bank_s": self.bank_s,
        }
        if self.cache_digests:
            out["cache_digests"] = self.cache_digests
        if self.failed is not None:
            out["failed"] = self.failed
        if self.polish is not None:
            out["polish"] = dataclasses.asdict(self.polish)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        """The record of a checkpoint's ``state`` (checked by ``load_checkpoint``);
        a block record or stop of another shape is a TypeError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["done"] = [BlockResult(**b) for b in data["done"]]
        if values.get("stop") is not None:
            values["stop"] = StopRecord(**values["stop"])
        if values.get("polish") is not None:
            values["polish"] = PolishResult(**values["polish"])
        if values.get("cache_digests") is None:
            values.pop("cache_digests", None)
        return cls(**values)


def block_result(
    plan: Plan,
    stage: Stage,
    accs: dict[str, float],
    *,
    peak: int,
    epochs_run: int,
    time_s: float,
    elapsed_s: float,
    device: torch.device,
) -> BlockResult:
    """The record of a finished stage: its exits' accuracies, measured
    peak (and where that measure comes from) beside the predicted one, and
    its times."""
    return BlockResult(
        index=stage.index,
        units=[plan.units[i].name for i in stage.unit_idx],
        batch_size=stage.batch_size,
        epochs=stage.epochs,
        epochs_run=epochs_run,
        measured_peak_bytes=peak,
        predicted_peak_bytes=stage.predicted_peak_bytes,
        peak_source="torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "profiler allocations less the eager step's workspace (first steps, CPU)"
        if stage.compile is not None
        else "MemTracker (first steps, CPU)",
        exit_accuracies=accs,
        exit_accuracy=max(accs.values()),
        time_s=time_s,
        elapsed_s=elapsed_s,
        nvml_process_bytes=nvml_process_bytes() if device.type == "cuda" else None,
    )


def block_result_json(b: BlockResult) -> dict[str, Any]:
    """A block's record as the checkpoint, metrics.jsonl and summary.json
    hold it: ``nvml_process_bytes`` only where NVML measured it."""
    out = dataclasses.asdict(b)
    if out["nvml_process_bytes"] is None:
        del out["nvml_process_bytes"]
    return out


class Clock:
    """Seconds of this run so far, resumed runs included."""

    def __init__(self, t_start: float, before: float) -> None:
        self.t_start, self.before = t_start, before

    def __call__(self) -> float:
        return self.before + time.perf_counter() - self.t_start
