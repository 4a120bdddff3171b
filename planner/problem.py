"""The planning problem as plain typed data: no torch, no solver.

The front end (``trace``, ``profile``) turns a model into a ``Problem``; every
strategy (CP-SAT, greedy, the brute-force reference in the tests) turns a
``Problem`` into a ``Solution``, evaluated by the same functions here.

Cost model, for a block of units ``s..e`` trained at batch ``b`` with aux
option ``o_u`` per unit:

- peak bytes = sum_u static(u, o_u) + max_u [dyn_fixed(u, o_u) + dyn_per_sample(u, o_u) * b]
  (all units' params, buffers and optimizer state stay resident; units step
  one after the other, so only one unit's activations and gradients are alive);
- time = epochs * ceil(N / b) * sum_u [step_fixed(u, o_u) + step_per_sample(u, o_u) * b]
  + (N + N_val) * sum_u fwd_per_sample(u) + cache bytes / cache bandwidth
  (the last term and the train part of the pass are skipped for the last block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

__all__ = [
    "AuxOption",
    "UnitCost",
    "Problem",
    "BlockChoice",
    "Solution",
    "SolveStatus",
    "block_peak_bytes",
    "block_time_s",
    "block_allowed",
    "cache_bytes",
    "plan_time_s",
    "check_solution",
    "min_feasible_budget_bytes",
    "candidate_batch_sizes",
]

SolveStatus = Literal["optimal", "feasible", "infeasible", "timeout"]


@dataclass(frozen=True, kw_only=True)
class AuxOption:
    """One aux-head choice for a unit, with the unit+head step costs."""

    kind: str
    width: int
    head_params: int
    static_bytes: int
    dyn_fixed_bytes: int
    dyn_per_sample_bytes: int
    step_fixed_s: float
    step_per_sample_s: float

    def dyn_bytes(self, batch: int) -> int:
        return self.dyn_fixed_bytes + self.dyn_per_sample_bytes * batch

    def step_s(self, batch: int) -> float:
        return self.step_fixed_s + self.step_per_sample_s * batch


@dataclass(frozen=True, kw_only=True)
class UnitCost:
    name: str
    options: tuple[AuxOption, ...]
    """Widest head first; the preferred choice at equal time."""
    out_bytes_per_sample: int
    """One sample of this unit's output in the cache dtype."""
    fwd_per_sample_s: float

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"unit {self.name} has no aux options")


@dataclass(frozen=True, kw_only=True)
class Problem:
    units: tuple[UnitCost, ...]
    batch_sizes: tuple[int, ...]
    """Candidate batch sizes, ascending."""
    train_size: int
    val_size: int
    epochs: int
    cap_bytes: int
    """Usable device memory for tensors: budget * (1 - margin) - workspace_bytes."""
    cache_budget_bytes: int
    cache_bytes_per_s: float = 2e9
    max_blocks: int | None = None
    max_block_units: int | None = None
    """Longest block, in units: block ends are where adaptive depth can stop."""
    workspace_bytes: int = 0
    """Library workspaces held all run (cuBLAS on CUDA), already taken out
    of ``cap_bytes``; a plan's reported peaks add it back."""

    def __post_init__(self) -> None:
        if not self.units:
            raise ValueError("a problem needs at least one unit")
        if list(self.batch_sizes) != sorted(set(self.batch_sizes)) or not self.batch_sizes or self.batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes must be ascending, distinct and >= 1, got {self.batch_sizes}")
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        if self.max_block_units is not None and self.max_block_units < 1:
            raise ValueError("max_block_units must be >= 1")

    @property
    def n(self) -> int:
        return len(self.units)


@dataclass(frozen=True, kw_only=True)
class BlockChoice:
    start: int
    end: int
    """Inclusive unit indices."""
    batch_size: int


@dataclass(frozen=True, kw_only=True)
class Solution:
    status: SolveStatus
    """Of the time objective: ``optimal`` means proven least predicted time."""
    widths_status: Literal["optimal", "feasible", "skipped"] = "skipped"
    """Of the widest-heads tie-break (phase 2 of CP-SAT)."""
    blocks: tuple[BlockChoice, ...] = ()
    options: tuple[int, ...] = ()
    """Chosen option index per unit."""
    time_s: float = math.inf
    lower_bound_s: float = 0.0
    wall_time_s: float = 0.0
    num_variables: int = 0
    num_constraints: int = 0
    message: str = ""
    """Why, for infeasible or timeout results."""
    stats: dict[str, float] = field(default_factory=dict)


def candidate_batch_sizes(*, min_batch: int, max_batch: int) -> tuple[int, ...]:
    """Powers of two and 1.5x powers of two in [min_batch, max_batch], plus
    ``min_batch`` itself (multiples of 8 from 8 on)."""
    if min_batch < 1 or max_batch < min_batch:
        raise ValueError(f"need 1 <= min_batch <= max_batch, got {min_batch}, {max_batch}")
    out = {min_batch}
    p = 1
    while p <= max_batch:
        for c in (p, 3 * p // 2):
            if min_batch <= c <= max_batch and c >= 1:
                out.add(c)
        p *= 2
    return tuple(sorted(out))


def cache_bytes(p: Problem, end: int) -> int:
    """Bytes of the cache holding unit ``end``'s outputs for train and val."""
    return (p.train_size + p.val_size) * p.units[end].out_bytes_per_sample


def block_peak_bytes(p: Problem, start: int, end: int, batch: int, options: Sequence[int]) -> int:
    units = range(start, end + 1)
    static = sum(p.units[u].options[options[u]].static_bytes for u in units)
    return static + max(p.units[u].options[options[u]].dyn_bytes(batch) for u in units)


def block_steps(p: Problem, batch: int) -> int:
    return p.epochs * math.ceil(p.train_size / batch)


def block_time_s(p: Problem, start: int, end: int, batch: int, options: Sequence[int]) -> float:
    units = range(start, end + 1)
    train = block_steps(p, batch) * sum(p.units[u].options[options[u]].step_s(batch) for u in units)
    return train + pass_time_s(p, start, end)


def pass_time_s(p: Problem, start: int, end: int) -> float:
    """Cost of the pass after training: val for the exits, plus the train
    set and the cache write when a block follows."""
    fwd = sum(p.units[u].fwd_per_sample_s for u in range(start, end + 1))
    if end == p.n - 1:
        return p.val_size * fwd
    return (p.train_size + p.val_size) * fwd + cache_bytes(p, end) / p.cache_bytes_per_s


def plan_time_s(p: Problem, blocks: Sequence[BlockChoice], options: Sequence[int]) -> float:
    return sum(block_time_s(p, b.start, b.end, b.batch_size, options) for b in blocks)


def block_allowed(p: Problem, start: int, end: int) -> bool:
    """Units ``start..end`` may form a block: no longer than
    ``max_block_units``, and its caches fit (memory is checked apart)."""
    if p.max_block_units is not None and end - start + 1 > p.max_block_units:
        return False
    return block_cache_ok(p, start, end)


def block_cache_ok(p: Problem, start: int, end: int) -> bool:
    """The block's input cache and output cache fit the cache budget together."""
    inp = cache_bytes(p, start - 1) if start > 0 else 0
    out = cache_bytes(p, end) if end < p.n - 1 else 0
    return inp + out <= p.cache_budget_bytes


def check_solution(p: Problem, s: Solution) -> list[str]:
    """Every violated constraint of a solution, as messages (empty: valid)."""
    errs: list[str] = []
    if len(s.options) != p.n:
        return [f"{len(s.options)} options for {p.n} units"]
    pos = 0
    for b in s.blocks:
        if b.start != pos or b.end < b.start:
            errs.append(f"blocks are not contiguous at unit {pos}")
        pos = b.end + 1
        if b.batch_size not in p.batch_sizes:
            errs.append(f"batch {b.batch_size} is not a candidate")
        peak = block_peak_bytes(p, b.start, b.end, b.batch_size, s.options)
        if peak > p.cap_bytes:
            errs.append(f"block {b.start}..{b.end} peak {peak} > cap {p.cap_bytes}")
        if not block_cache_ok(p, b.start, b.end):
            errs.append(f"block {b.start}..{b.end} caches exceed the cache budget")
        if p.max_block_units is not None and b.end - b.start + 1 > p.max_block_units:
            errs.append(f"block {b.start}..{b.end} is longer than {p.max_block_units} units")
    if pos != p.n:
        errs.append(f"blocks cover {pos} of {p.n} units")
    if p.max_blocks is not None and len(s.blocks) > p.max_blocks:
        errs.append(f"{len(s.blocks)} blocks > max {p.max_blocks}")
    return errs


def min_feasible_budget_bytes(p: Problem, *, margin_fraction: float) -> int:
    """Smallest budget for which some plan fits device memory: every unit
    alone at the smallest batch with its narrowest head (ignores the cache
    budget and max_blocks)."""
    b = p.batch_sizes[0]
    need = 0
    for u in p.units:
        need = max(need, min(o.static_bytes + o.dyn_bytes(b) for o in u.options))
    return math.ceil((need + p.workspace_bytes) / (1.0 - margin_fraction))
