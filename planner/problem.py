"""The planning problem as plain typed data: no torch, no solver.

The front end (``trace``, ``profile``) turns a model into a ``Problem``; every
strategy (the exact dynamic program, CP-SAT, greedy, the brute-force
reference in the tests) turns a ``Problem`` into a ``Solution``, evaluated by
the same functions here.

Cost model, for a block of units ``s..e`` trained at batch ``b`` with aux
option ``o_u`` per unit:

- peak bytes = sum_u static(u, o_u) + max_u [dyn_fixed(u, o_u) + dyn_per_sample(u, o_u) * b]
  (all units' params, buffers and optimizer state stay resident; units step
  one after the other, so only one unit's activations and gradients are alive);
- time = epochs * ceil(N / b) * sum_u [step_fixed(u, o_u) + step_per_sample(u, o_u) * b]
  + (N + N_val) * sum_u fwd_per_sample(u) + cache bytes / cache bandwidth
  (the last term and the train part of the pass are skipped for the last block).

Block boundaries. After a block (not the last), the next block's input is
one of three ``Boundary`` kinds:

- ``ram``: the block's outputs for train and val are written once to a RAM
  cache (host RAM: ``cache_budget_bytes``);
- ``disk``: the same cache in a memory-mapped file (``disk_budget_bytes``);
- ``recompute``: no cache. The next block reads the *source* of this one (the
  last cache before it, or the dataset) and runs the frozen units between,
  in inference mode, on every batch.

A block whose source is unit ``c``'s input (``c`` < start: units
``c..start-1`` recomputed, the *prefix*) pays, on top of the above,

- memory: the prefix's parameters and buffers (``infer_static_bytes``) plus
  ``max(max_u dyn(u, b), max_{v in prefix} infer(v, b))`` in place of the
  block's largest dynamic term (the prefix runs before the step; its output
  is the block's input, already counted in ``dyn``);
- time: ``epochs * N * sum_v fwd_per_sample(v) + steps * sum_v fwd_fixed(v)``
  for training, and the same prefix forward in the pass after training
  (val, plus train when a cache is written).

Host use while a block runs: its source cache plus the output cache it
writes, each counted against the budget of its location. Raw inputs are not
counted here: the plan stacks them in RAM only where what is left allows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

__all__ = [
    "AuxOption",
    "UnitCost",
    "Problem",
    "BlockChoice",
    "Boundary",
    "BOUNDARIES",
    "block_sources",
    "source_kind",
    "host_use",
    "Solution",
    "SolveStatus",
    "WidthsStatus",
    "block_peak_bytes",
    "block_time_s",
    "block_allowed",
    "ram_pair_ok",
    "host_ok",
    "recompute_time_s",
    "cache_bytes",
    "plan_time_s",
    "check_solution",
    "min_feasible_budget_bytes",
    "candidate_batch_sizes",
]

SolveStatus = Literal["optimal", "feasible", "infeasible", "timeout"]
WidthsStatus = Literal["optimal", "feasible", "skipped"]
"""Of the widest-heads tie-break (phase 2 of CP-SAT)."""
Boundary = Literal["ram", "disk", "recompute"]
"""How the next block gets its input: a RAM cache, a disk cache, or recomputation."""
BOUNDARIES: tuple[Boundary, ...] = get_args(Boundary)


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
    fwd_fixed_s: float = 0.0
    """Fixed cost of one inference forward (its ops' dispatch overhead):
    paid per step by a block that recomputes this unit."""
    infer_static_bytes: int = 0
    """Parameters and buffers of the unit alone (no head, no optimizer
    state): what it holds on the device while recomputed for a later block."""
    infer_fixed_bytes: int = 0
    infer_per_sample_bytes: int = 0
    """Peak of one inference forward beyond the weights: input,
    intermediates and output at batch ``b`` = fixed + per_sample * b."""

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"unit {self.name} has no aux options")

    def infer_bytes(self, batch: int) -> int:
        return self.infer_fixed_bytes + self.infer_per_sample_bytes * batch


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
    """Host RAM for caches: a block's source cache plus the one it writes."""
    cache_bytes_per_s: float = 2e9
    disk_budget_bytes: int = 0
    """Disk for caches, counted like ``cache_budget_bytes``."""
    disk_bytes_per_s: float = 5e8
    boundaries: tuple[Boundary, ...] = ("ram",)
    """Boundary kinds a plan may use (the planner offers all three)."""
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
        if not self.boundaries or any(k not in BOUNDARIES for k in self.boundaries):
            raise ValueError(f"boundaries must be a non-empty subset of {BOUNDARIES}, got {self.boundaries}")

    @property
    def n(self) -> int:
        return len(self.units)


@dataclass(frozen=True, kw_only=True)
class BlockChoice:
    start: int
    end: int
    """Inclusive unit indices."""
    batch_size: int
    boundary: Boundary = "ram"
    """How the next block gets its input (ignored for the last block)."""


@dataclass(frozen=True, kw_only=True)
class Solution:
    status: SolveStatus
    """Of the time objective: ``optimal`` means proven least predicted time."""
    widths_status: WidthsStatus = "skipped"
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


def block_sources(blocks: Sequence[BlockChoice]) -> list[int]:
    """Per block, the first unit it must recompute: its own start when it
    reads a cache (or the dataset, for the first block), else the source of
    the block before it."""
    src: list[int] = []
    for i, b in enumerate(blocks):
        src.append(b.start if i == 0 or blocks[i - 1].boundary != "recompute" else src[-1])
    return src


def source_kind(blocks: Sequence[BlockChoice], src: int) -> Boundary | None:
    """Where the cache a block reads (unit ``src - 1``'s outputs) lives:
    the boundary after the block ending there; None for the dataset."""
    return None if src == 0 else next(b.boundary for b in blocks if b.end == src - 1)


def _prefix(p: Problem, src: int, start: int) -> tuple[int, float, list[UnitCost]]:
    units = list(p.units[src:start])
    return sum(u.infer_static_bytes for u in units), sum(u.fwd_per_sample_s for u in units), units


def prefix_fixed_s(p: Problem, src: int, start: int) -> float:
    return sum(u.fwd_fixed_s for u in p.units[src:start])


def block_peak_bytes(
    p: Problem, start: int, end: int, batch: int, options: Sequence[int], *, src: int | None = None
) -> int:
    """Device peak of the block ``start..end`` at ``batch``; ``src`` < start:
    units ``src..start-1`` are recomputed for it (see the module docstring)."""
    units = range(start, end + 1)
    static = sum(p.units[u].options[options[u]].static_bytes for u in units)
    dyn = max(p.units[u].options[options[u]].dyn_bytes(batch) for u in units)
    if src is None or src >= start:
        return static + dyn
    pstatic, _, prefix = _prefix(p, src, start)
    return static + pstatic + max(dyn, max(u.infer_bytes(batch) for u in prefix))


def block_steps(p: Problem, batch: int) -> int:
    return p.epochs * math.ceil(p.train_size / batch)


def block_time_s(
    p: Problem,
    start: int,
    end: int,
    batch: int,
    options: Sequence[int],
    *,
    src: int | None = None,
    boundary: Boundary = "ram",
) -> float:
    units = range(start, end + 1)
    train = block_steps(p, batch) * sum(p.units[u].options[options[u]].step_s(batch) for u in units)
    return train + recompute_time_s(p, src, start, batch) + pass_time_s(p, start, end, src=src, boundary=boundary)


def recompute_time_s(p: Problem, src: int | None, start: int, batch: int) -> float:
    """Training-time cost of recomputing units ``src..start-1`` on every
    batch: their forward per sample on every training sample, and their
    fixed per-forward cost on every step."""
    if src is None or src >= start:
        return 0.0
    return p.epochs * p.train_size * _prefix(p, src, start)[1] + block_steps(p, batch) * prefix_fixed_s(p, src, start)


def pass_time_s(p: Problem, start: int, end: int, *, src: int | None = None, boundary: Boundary = "ram") -> float:
    """Cost of the pass after training: val for the exits, plus the train
    set and the cache write when the next block reads a cache. A recomputed
    prefix runs in the pass too."""
    fwd = sum(p.units[u].fwd_per_sample_s for u in range(start, end + 1))
    if src is not None and src < start:
        fwd += _prefix(p, src, start)[1]
    if end == p.n - 1 or boundary == "recompute":
        return p.val_size * fwd
    bandwidth = p.disk_bytes_per_s if boundary == "disk" else p.cache_bytes_per_s
    return (p.train_size + p.val_size) * fwd + cache_bytes(p, end) / bandwidth


def host_use(p: Problem, src: int, src_kind: Boundary | None, end: int, boundary: Boundary | None) -> dict[str, int]:
    """Host bytes held while a block runs: its source cache (unit ``src-1``'s
    outputs, of ``src_kind``; none when it reads the dataset) and the cache
    it writes after unit ``end`` (``boundary``; none for the last block or
    a recompute boundary), per location."""
    use = {"ram": 0, "disk": 0}
    if src > 0 and src_kind in use:
        use[src_kind] += cache_bytes(p, src - 1)
    if end < p.n - 1 and boundary in use:
        use[boundary] += cache_bytes(p, end)
    return use


def host_ok(p: Problem, src: int, src_kind: Boundary | None, end: int, boundary: Boundary | None) -> bool:
    use = host_use(p, src, src_kind, end, boundary)
    return use["ram"] <= p.cache_budget_bytes and use["disk"] <= p.disk_budget_bytes


def plan_time_s(p: Problem, blocks: Sequence[BlockChoice], options: Sequence[int]) -> float:
    srcs = block_sources(blocks)
    return sum(
        block_time_s(p, b.start, b.end, b.batch_size, options, src=s, boundary=b.boundary) for b, s in zip(blocks, srcs)
    )


def block_allowed(p: Problem, start: int, end: int) -> bool:
    """Units ``start..end`` may form a block: no longer than ``max_block_units``
    (block ends are where adaptive depth can stop)."""
    return p.max_block_units is None or end - start + 1 <= p.max_block_units


def ram_pair_ok(p: Problem, start: int, end: int) -> bool:
    """With RAM caches at both ends, the block's input and output caches fit
    host RAM together (the all-RAM model CP-SAT solves)."""
    return host_ok(p, start, "ram", end, "ram")


def check_solution(p: Problem, s: Solution) -> list[str]:
    """Every violated constraint of a solution, as messages (empty: valid)."""
    errs: list[str] = []
    if len(s.options) != p.n:
        return [f"{len(s.options)} options for {p.n} units"]
    pos = 0
    srcs = block_sources(s.blocks)
    for b, src in zip(s.blocks, srcs):
        if b.start != pos or b.end < b.start:
            errs.append(f"blocks are not contiguous at unit {pos}")
        pos = b.end + 1
        if b.batch_size not in p.batch_sizes:
            errs.append(f"batch {b.batch_size} is not a candidate")
        if b.end < p.n - 1 and b.boundary not in p.boundaries:
            errs.append(f"block {b.start}..{b.end} ends in a {b.boundary} boundary, not one of {p.boundaries}")
        peak = block_peak_bytes(p, b.start, b.end, b.batch_size, s.options, src=src)
        if peak > p.cap_bytes:
            errs.append(f"block {b.start}..{b.end} peak {peak} > cap {p.cap_bytes}")
        if not host_ok(p, src, source_kind(s.blocks, src), b.end, b.boundary):
            errs.append(f"block {b.start}..{b.end} caches exceed the host RAM or disk budget")
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
