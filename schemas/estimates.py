"""What the planner predicts and how it got there: the BP baselines at the same
budget, the predicted totals, and the solver's and the profiler's records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Baseline",
    "Baselines",
    "CompileBaseline",
    "CompileCandidate",
    "Polish",
    "PolishExit",
    "Predicted",
    "ProfileInfo",
    "SolverInfo",
]


@dataclass(frozen=True, kw_only=True)
class Baseline:
    """End-to-end training of the original model under the same budget."""

    batch_size: int
    """Largest candidate batch whose predicted peak fits (0: none fits)."""
    predicted_peak_bytes: int
    predicted_time_s: float
    epochs: int
    fits: bool
    lr: float
    """Peak learning rate, by the same batch-size rule as the blocks (0 when it does not fit)."""
    steps: int
    """Optimizer steps: epochs * ceil(train_size / batch_size) (the cosine schedule's length)."""
    shuffle_seed: int | None = None
    """Epoch ``e`` draws its batches with ``torch.Generator().manual_seed(shuffle_seed + e)``. Added in 2.4
    (older plans: the runtime derives it from ``recipe.seed``, as block 0's)."""
    checkpointed_units: list[str] | None = None
    """BP with checkpointing: the units recomputed in backward (the others keep their activations); None:
    every unit (``bp_checkpoint`` of plans before 2.6, and ``bp_checkpoint_all``). Added in 2.6."""


@dataclass(frozen=True, kw_only=True)
class CompileCandidate:
    """One batch the ``bp-compile`` baseline may train at, with the plan's rate and schedule for it."""

    batch_size: int
    lr: float
    steps: int


@dataclass(frozen=True, kw_only=True)
class CompileBaseline:
    """bp-compile's grid: BP under torch.compile with an activation memory budget, measured on the device.

    A compiled step's peak cannot be predicted from an eager trace (``torch._functorch.config.
    activation_memory_budget`` decides what it saves), so the plan lists the grid and the runtime measures
    it: for every ratio, the candidate batches in ascending order until one exceeds the budget; it trains
    the (batch, ratio) with the least measured training time among those that fit. Added in 2.7."""

    ratios: list[float]
    """``activation_memory_budget`` values to try, in (0, 1] (1: the compiler's own choice of what to save)."""
    candidates: list[CompileCandidate]
    """Ascending batch sizes."""
    epochs: int
    shuffle_seed: int


@dataclass(frozen=True, kw_only=True)
class Baselines:
    bp: Baseline
    bp_checkpoint: Baseline
    """BP with budget-optimal activation checkpointing: the batch and the units to recompute that train
    fastest under the budget (plans before 2.6: every unit boundary)."""
    bp_checkpoint_all: Baseline | None = None
    """BP with activation checkpointing at every unit boundary. Added in 2.6."""
    bp_compile: CompileBaseline | None = None
    """BP compiled with an activation memory budget, searched on the device at run time. Added in 2.7."""


@dataclass(frozen=True, kw_only=True)
class PolishExit:
    """The polish of one exit: its prefix of units and its head trained end to
    end, at the largest candidate batch whose predicted peak fits."""

    unit: str
    """The exit (the prefix is every unit up to it, the head is its aux head)."""
    batch_size: int
    predicted_peak_bytes: int
    predicted_time_s: float
    steps: int
    """Optimizer steps: ``ceil(epochs * ceil(train_size / batch_size))``."""
    lr: float
    """Peak learning rate: the recipe's rate at this batch times ``lr_scale`` (cosine to zero over ``steps``)."""


@dataclass(frozen=True, kw_only=True)
class Polish:
    """After local learning, the kept exit's prefix and head trained end to
    end for a fraction of an epoch at a small learning rate (``nf-plan
    --polish``). An exit absent from ``exits`` fits no candidate batch: it is
    kept unpolished. Added in 2.6 (older plans: no polish)."""

    epochs: float
    """Length of the polish in epochs of the training set (e.g. 0.5)."""
    lr_scale: float
    """The polish's peak rate relative to the recipe's rate at the same batch."""
    exits: list[PolishExit]


@dataclass(frozen=True, kw_only=True)
class Predicted:
    time_s: float
    speedup_vs_bp: float | None
    """None where BP fits no batch size within the budget."""
    speedup_vs_bp_checkpoint: float | None
    peak_bytes: int
    """Largest block peak."""
    assumes: str
    """What ``time_s`` assumes about stopping."""


@dataclass(frozen=True, kw_only=True)
class SolverInfo:
    strategy: Literal["optimal", "greedy"]
    engine: Literal["cp-sat", "dp", "greedy"]
    """What made the plan: CP-SAT (networks of up to 24 units, seeded with
    the dynamic program's plan), the exact dynamic program (deeper networks,
    or a CP-SAT timeout), or the greedy heuristic."""
    status: Literal["optimal", "feasible", "infeasible", "timeout"]
    """Of the time objective: ``optimal`` is proven least predicted time."""
    widths_status: Literal["optimal", "feasible", "skipped"]
    """Of the tie-break that widens aux heads within ``tie_tolerance``."""
    wall_time_s: float
    time_limit_s: float
    seed: int
    objective_time_s: float
    """Predicted training time of the chosen plan (after the head widening
    and the batch rule, each within its tolerance of the least time)."""
    lower_bound_s: float
    """Best proven lower bound on the least time (equals it when optimal)."""
    tie_tolerance: float
    """Aux widths were widened while time stays within this share."""
    num_variables: int
    num_constraints: int
    max_blocks: int | None
    min_batch_size: int
    max_batch_size: int
    batch_time_tolerance: float = 0.0
    """The batch rule: blocks took the smallest batch within this share of
    their solved time (0: the solved batches). Added in 2.8."""


@dataclass(frozen=True, kw_only=True)
class ProfileInfo:
    memory_source: Literal["fake", "measure"]
    cost_source: Literal["flops", "measure"]
    device_flops_per_s: float
    """Throughput assumed by the FLOP cost model (0 when measured)."""
    op_overhead_s: float
    """Fixed cost per dispatched op assumed by the FLOP cost model."""
    device_speed_source: str
    """Where the speeds came from: flags, a device profile file, or this
    machine's cached profile (measured once, so plans do not follow load)."""
    profile_batch_sizes: list[int]
    device_bandwidth_bytes_per_s: float = 0.0
    """Bandwidth at which the cost model prices the bytes a step's ops read
    and write (0: not measured, or times measured; traffic then costs nothing).
    Plans before schema 2.9 have none."""
