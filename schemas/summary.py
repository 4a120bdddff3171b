"""Typed run records: ``summary.json`` as ``nf-run`` (and ``neuroflux.train``)
writes it, and its one loader.

The published format is ``summary.schema.json``, generated from these
records (``python -m neuroflux.schemas.generate``). A finished run has
``status: "ok"`` and every field; a run that diverged has ``status:
"diverged"``, its ``error`` and the blocks it finished, and nothing after.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypedDict

from neuroflux.errors import NeuroFluxError
from neuroflux.schemas.typed_json import record_from_json, validate_record

__all__ = [
    "BlockResult",
    "CompileProbe",
    "CompileResult",
    "PolishResult",
    "Stopping",
    "Throughput",
    "TimeBreakdown",
    "RunSummary",
    "RunStateJSON",
    "load_summary",
    "summary_from_dict",
    "summary_to_dict",
    "summary_schema",
    "check_run_state",
]


@dataclass(frozen=True, kw_only=True)
class BlockResult:
    """One trained block (for a baseline, the whole model as block 0)."""

    index: int
    units: list[str]
    batch_size: int
    epochs: int
    """Epochs planned."""
    epochs_run: int
    measured_peak_bytes: int
    predicted_peak_bytes: int
    peak_source: str
    """torch.cuda.max_memory_allocated, or MemTracker over the first steps on a CPU."""
    exit_accuracies: dict[str, float]
    """Validation accuracy of every exit trained in this block."""
    exit_accuracy: float
    time_s: float
    elapsed_s: float
    """Run time when the block finished (resumed runs included)."""
    nvml_process_bytes: int | None = None
    """The process's GPU memory as NVML sees it (CUDA context included); CUDA only."""
    time_breakdown: TimeBreakdown | None = None
    """Where ``time_s`` went (runs before 2.5: absent)."""


@dataclass(frozen=True, kw_only=True)
class TimeBreakdown:
    """Where a block's time went, in seconds (a resumed block counts the
    epochs of every process that ran it). Added in 2.5."""

    train_s: float
    """Training epochs: the steps, the data they read and ``recompute_s``."""
    recompute_s: float
    """Part of ``train_s``: the frozen prefix a recompute boundary runs on every batch."""
    eval_s: float
    """Evaluating the block's exits on val after every epoch."""
    cache_write_s: float
    """Running the train and val sets through the block into the next block's cache."""
    checkpoint_s: float
    """Saving the checkpoint after every epoch."""


@dataclass(frozen=True, kw_only=True)
class Stopping:
    """Where adaptive depth stopped the run, why, and what that saved."""

    stopped_at_unit: str | None
    stopped_after_block: int | None
    full_depth: bool
    reason: str
    blocks_skipped: list[int]
    units_skipped: list[str]
    epochs_planned: dict[str, int]
    epochs_run: dict[str, int]
    saved_predicted_s: float
    saved_estimated_s: float
    """The predicted saving scaled by measured / predicted time of the blocks that ran."""
    patience_units: int
    epoch_patience: int
    tolerance: float


@dataclass(frozen=True, kw_only=True)
class Throughput:
    """Inference throughput of the final model against the original (cap lifted)."""

    final_images_per_s: float
    original_images_per_s: float
    speedup: float


@dataclass(frozen=True, kw_only=True)
class PolishResult:
    """The polish of the kept exit (``nf-plan --polish``): its prefix and
    head trained end to end after local learning. Added in 2.6."""

    exit: str
    batch_size: int
    steps: int
    """Optimizer steps taken (the plan's, or a dry run's fewer)."""
    lr: float
    accuracy_before: float
    accuracy_after: float
    """0 when the polish diverged (its weights are then undone)."""
    kept: bool
    """Whether the polished weights were kept: only when they are more accurate on val."""
    time_s: float
    """Training and the evaluation after it."""
    measured_peak_bytes: int
    predicted_peak_bytes: int


@dataclass(frozen=True, kw_only=True)
class CompileProbe:
    """One measured (ratio, batch) of bp-compile's search."""

    ratio: float
    batch_size: int
    peak_bytes: int | None
    """None: out of device memory."""
    step_s: float | None
    train_s: float | None
    """The plan's steps at this batch x the measured step time."""
    fits: bool
    workspace_bytes: int = 0
    """On a CPU, taken off the allocator's peak: the eager step's allocations beyond its tensors
    (convolution workspaces), which the plan's accounting leaves out for every method."""


@dataclass(frozen=True, kw_only=True)
class CompileResult:
    """bp-compile's search: the ratio and batch it trained, and every probe. Added in 2.7."""

    ratio: float
    batch_size: int
    peak_bytes: int
    """The chosen pair's measured peak (the stage's "predicted" peak)."""
    cap_bytes: int
    """The budget less the plan's margin: a pair fits when its peak is at most this."""
    workspace_bytes: int = 0
    """The chosen probe's CPU workspace, taken off its allocator peaks (the search's and training's)."""
    compile_s: float
    """Compiling, once per ratio searched."""
    search_s: float
    """The whole search (compiles and probes), part of the run's wall time."""
    probes: list[CompileProbe]


@dataclass(frozen=True, kw_only=True)
class RunSummary:
    """A run's summary (``summary.json``)."""

    method: Literal["neuroflux", "bp", "bp-checkpoint", "bp-checkpoint-all", "bp-compile"]
    status: Literal["ok", "diverged"]
    blocks: list[BlockResult]
    command: str
    """What started the run (an nf-run command line, or the Python call)."""
    error: str | None = None
    """Why a diverged run stopped."""
    final_accuracy: float | None = None
    final_exit: str | None = None
    final_params: int | None = None
    original_params: int | None = None
    param_reduction: float | None = None
    wall_time_s: float | None = None
    train_time_s: float | None = None
    stopped_early: str | None = None
    """Adaptive depth's reason, when it stopped before the last block."""
    stopping: Stopping | None = None
    exit_accuracies: dict[str, float] = field(default_factory=dict)
    throughput: Throughput | None = None
    device: str | None = None
    budget_bytes: int | None = None
    budget_enforced: bool | None = None
    """Whether the CUDA allocator was capped at the budget."""
    torch: str | None = None
    world_size: int = 1
    """Processes that trained the run (torchrun's --nproc-per-node x --nnodes)."""
    host_memory: Literal["kept", "default"] | None = None
    """On CPU: ``kept``, freed large blocks kept for the next step (``runtime.host_memory``), or the C
    library's ``default`` (``NEUROFLUX_HOST_MEMORY=default``, or not glibc); None on CUDA."""
    polish: PolishResult | None = None
    """The kept exit's end-to-end polish; None when the plan has none or no batch fits it."""
    compile: CompileResult | None = None
    """bp-compile's search (other methods: None)."""


def summary_to_dict(s: RunSummary) -> dict[str, Any]:
    """JSON-ready, without the fields a diverged run does not have."""
    out = dataclasses.asdict(s)
    if s.status != "ok":
        out = {k: v for k, v in out.items() if k in ("method", "status", "blocks", "command", "error")}
    for b in out["blocks"]:
        if b.get("nvml_process_bytes") is None:
            b.pop("nvml_process_bytes", None)
    return out


@lru_cache(maxsize=1)
def summary_schema() -> dict[str, Any]:
    """The JSON Schema of summary.json (a finished run has every field)."""
    return json.loads(resources.files("neuroflux.schemas").joinpath("summary.schema.json").read_text())


def summary_from_dict(data: Any) -> RunSummary:
    """Validate ``data`` against the schema and build the typed record."""
    validate_record(data, summary_schema(), what="summary", fix="it was not written by this NeuroFlux's nf-run")
    return record_from_json(RunSummary, data)


def load_summary(path: str | os.PathLike[str]) -> RunSummary:
    """Read a run's ``summary.json`` (a file, or the run directory)."""
    p = Path(path)
    if p.is_dir():
        p = p / "summary.json"
    if not p.is_file():
        raise NeuroFluxError(f"{p}: no summary.json (is the run finished?)")
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NeuroFluxError(f"{p} is not valid UTF-8 JSON ({str(e)[:160]}); is it an nf-run summary?") from None
    except OSError as e:
        raise NeuroFluxError(f"cannot read {p} ({e.strerror})") from None
    if not isinstance(data, dict):
        raise NeuroFluxError(f"{p} holds a JSON {type(data).__name__}, not a run summary")
    return summary_from_dict(data)


class RunStateJSON(TypedDict, total=False):
    """What a checkpoint carries of a run's progress (``checkpoint.pt``'s
    ``state``): enough to resume exactly where it stopped."""

    done: list[dict[str, Any]]
    """A BlockResult (as a dict) per finished block."""
    epoch: int
    """Epochs finished in the current block."""
    exit_acc: dict[str, float]
    stopped: str | None
    """Adaptive depth's reason, once it stopped the run."""
    stop: dict[str, Any] | None
    """Where it stopped: after_block, at_unit, best_exit, blocks_skipped, units_skipped, skipped_predicted_s."""
    elapsed_s: float
    train_s: float
    depth: dict[str, Any]
    """Adaptive depth's running state (runtime/policy.py)."""
    block: dict[str, Any] | None
    """The current block's epoch-policy state."""
    last_accs: dict[str, float] | None
    bank_s: float
    """Training time banked by blocks that converged early, and from the start by the units the exit size
    limit leaves untrained (spent on extra epochs)."""
    failed: str
    """Set when the run diverged: it cannot be resumed."""
    polish: dict[str, Any] | None
    """The polish's record (a PolishResult as a dict), once it ran: a resume does not polish again."""
    cache_digests: dict[str, str]
    """Per disk cache (block index), a digest of sampled bytes taken when it
    was written: a resume rebuilds a file that no longer matches."""


#: The fields every saved state has, and their types (the loader checks them).
_REQUIRED_STATE = {"done": list, "epoch": int, "exit_acc": dict, "elapsed_s": float, "train_s": float}


def check_run_state(state: Any, where: str) -> RunStateJSON:
    """``state`` if it has RunStateJSON's required fields with their types; else a NeuroFluxError."""
    if not isinstance(state, dict):
        raise NeuroFluxError(f"{where}: the run state is a {type(state).__name__}, not a record")
    for key, tp in _REQUIRED_STATE.items():
        value = state.get(key)
        if not isinstance(value, tp) and not (tp is float and isinstance(value, int)):
            raise NeuroFluxError(f"{where}: state.{key} is missing or not a {tp.__name__}")
    unknown = set(state) - set(RunStateJSON.__annotations__)
    if unknown:
        raise NeuroFluxError(f"{where}: unknown state field(s) {sorted(unknown)}")
    return state  # type: ignore[return-value]
