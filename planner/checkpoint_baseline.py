"""The budget-optimal BP-with-checkpointing baseline (``bp-checkpoint``):
which units to recompute, and the batch, to train fastest under the budget.

1. What each unit's forward keeps for backward, at two batches, with and
   without checkpointing: one training-mode forward of the chain each, on
   fake tensors, its memory read after every unit. A unit's ``saving`` is
   the difference; its recompute costs one more inference forward.
2. At every candidate batch, the cheapest set of units whose savings cover
   the BP step's excess over the budget (``solve_checkpoint``: an exact
   knapsack), and its predicted time (BP's step plus the recomputes).
3. The candidates in order of predicted time, each verified by profiling
   the exact step of the chain it describes (the saving of a unit is not
   quite additive: a recomputed unit's activations come back during its
   backward). One over the budget asks the knapsack for its overshoot more;
   the first that fits is the baseline, timed from its own profile. A set
   that recomputes nothing is BP itself: BP's step, and the runtime trains
   the model as BP does. Should no candidate verify within ``MAX_VERIFY``
   profiles, every unit is recomputed (at the largest batch that fits).

Checkpointing every unit boundary, the old baseline, stays as
``bp-checkpoint-all``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from neuroflux.planner.baselines import baseline_at, unfit_baseline
from neuroflux.planner.config import PlanConfig
from neuroflux.planner.jobs import Profiled, ProfilingJobs
from neuroflux.planner.problem import Problem, block_steps
from neuroflux.planner.profile import StepProfile, on_meta_first
from neuroflux.planner.solve_checkpoint import choose_recompute
from neuroflux.planner.step_meter import StepMeter
from neuroflux.runtime.modules import CheckpointedChain
from neuroflux.schemas.plan import Baseline

__all__ = ["budget_checkpoint", "unit_retention"]

log = logging.getLogger(__name__)

#: Exact step profiles tried at most (each is a whole-model profile).
MAX_VERIFY = 6


def unit_retention(jobs: ProfilingJobs, *, checkpointed: bool) -> list[tuple[int, int]]:
    """Per unit, the bytes its training-mode forward leaves alive in the
    chain (activations saved for backward and its output) as (fixed,
    per_sample): every unit checkpointed, or none."""
    b1, b2 = jobs.batches
    units = list(jobs.unit_mods)

    def run(mode: Any, *mods: nn.Module) -> list[tuple[int, int]]:
        with mode:
            at = [_forward_marks(list(mods), jobs, b, checkpointed=checkpointed) for b in (b1, b2)]
        out = []
        for m1, m2 in zip(*at):
            per = max(0, -(-(m2 - m1) // (b2 - b1)))
            out.append((max(0, m1 - per * b1), per))
        return out

    return on_meta_first(run, units, jobs.fake, meta=not jobs.precision.mixed)


def _forward_marks(units: Sequence[nn.Module], jobs: ProfilingJobs, batch: int, *, checkpointed: bool) -> list[int]:
    """Bytes each unit's forward added to what stays alive, in order."""
    for u in units:
        u.train(True)
    dev = next((p.device for u in units for p in u.parameters()), torch.device("cpu"))
    jobs.precision.format_modules(*units)
    h = jobs.precision.randn(batch, jobs.meta.shape, device=dev)
    meter = StepMeter()
    added, before = [], 0
    with meter, jobs.precision.autocast():
        for u in units:
            h = checkpoint(u, h, use_reentrant=False) if checkpointed else u(h)
            added.append(meter.current - before)
            before = meter.current
    del h
    return added


def budget_checkpoint(problem: Problem, pr: Profiled, cfg: PlanConfig) -> Baseline:
    """The fastest (batch, recomputed units) at which BP with checkpointing fits ``problem``'s budget."""
    jobs = pr.jobs
    assert jobs is not None, "a Profiled made by profile_model"
    n = len(problem.units)
    if pr.bp_prof.peak_bytes(problem.batch_sizes[-1]) <= problem.cap_bytes:
        return _record(problem, pr, cfg, problem.batch_sizes[-1], (False,) * n, pr.bp_prof)  # BP at the largest
    if "retention" not in pr.checkpointing:  # budgets planned from one profiling share it
        pr.checkpointing["retention"] = (
            unit_retention(jobs, checkpointed=False),
            unit_retention(jobs, checkpointed=True),
        )
    candidates = _candidates(problem, pr, *pr.checkpointing["retention"])
    tried = 0
    while candidates and tried < MAX_VERIFY:
        c = _next(candidates)
        if not any(c.flags):  # nothing recomputed: BP itself (the runtime trains the model as BP does)
            return _record(problem, pr, cfg, c.batch, c.flags, pr.bp_prof)
        tried += 1
        prof = pr.checkpointing.get(c.flags) or jobs.chain_job(c.flags)
        pr.checkpointing[c.flags] = prof
        over = prof.peak_bytes(c.batch) - problem.cap_bytes
        if over <= 0:
            return _record(problem, pr, cfg, c.batch, c.flags, prof)
        # Ask for the overshoot more, and for more than this set's own estimate: another set.
        log.debug("checkpointing %s at batch %d is %d bytes over; asking for more", c.flags, c.batch, over)
        c.need = max(c.need + over, sum(s for s, f in zip(c.savings, c.flags) if f) + 1)
        flags = choose_recompute(c.savings, c.costs, c.need)
        if flags is None:
            candidates.remove(c)
        else:
            c.flags, c.time_s = flags, c.time_of(flags)
    # Nothing verified in time: every unit recomputed, at the largest batch it fits (a member of the search space).
    fitting = [b for b in problem.batch_sizes if pr.ck_prof.peak_bytes(b) <= problem.cap_bytes]
    if fitting:
        return _record(problem, pr, cfg, fitting[-1], (True,) * n, pr.ck_prof)
    return unfit_baseline(problem, cfg, pr.ck_prof, [u.name for u in problem.units])


@dataclass
class _Candidate:
    """A batch, the units the knapsack recomputes there, and the predicted time of that."""

    batch: int
    need: int
    savings: list[int]
    costs: list[float]
    bp_step_s: float
    steps: int
    flags: tuple[bool, ...]
    time_s: float = 0.0

    def time_of(self, flags: tuple[bool, ...]) -> float:
        return self.steps * (self.bp_step_s + sum(c for c, f in zip(self.costs, flags) if f))


def _candidates(problem: Problem, pr: Profiled, kept: list[Any], ck: list[Any]) -> list[_Candidate]:
    """At every candidate batch where recomputing every unit fits, the knapsack's cheapest set."""
    out = []
    for b in problem.batch_sizes:
        if pr.ck_prof.peak_bytes(b) > problem.cap_bytes:
            continue  # not even recomputing every unit fits: no subset will
        savings = [(f + p * b) - (fc + pc * b) for (f, p), (fc, pc) in zip(kept, ck)]
        costs = [u.fwd_fixed_s + u.fwd_per_sample_s * b for u in problem.units]
        need = pr.bp_prof.peak_bytes(b) - problem.cap_bytes
        flags = choose_recompute(savings, costs, need)
        if flags is not None:
            c = _Candidate(
                b, need, savings, costs, pr.target.speed.step_s(pr.bp_prof, b), block_steps(problem, b), flags
            )
            c.time_s = c.time_of(flags)
            out.append(c)
    return out


#: Predicted times this close count as equal (the cost model's own noise, e.g. a last partial batch
#: counted whole): among them the fewest recomputed units go first, then the largest batch.
TIE = 0.005


def _next(candidates: list[_Candidate]) -> _Candidate:
    """The fastest candidate; within ``TIE`` of it, the fewest recomputed units, then the largest batch."""
    best = min(c.time_s for c in candidates)
    tied = [c for c in candidates if c.time_s <= best * (1 + TIE)]
    return min(tied, key=lambda c: (sum(c.flags), -c.batch, c.time_s))


def _record(
    problem: Problem, pr: Profiled, cfg: PlanConfig, b: int, flags: Sequence[bool], prof: StepProfile
) -> Baseline:
    """The baseline at batch ``b`` recomputing the flagged units, timed from its own step profile (or, under
    ``--cost measure``, from timing the real chain)."""
    real = None
    if pr.real is not None:
        assert pr.jobs is not None and pr.jobs.real_mods is not None
        real = CheckpointedChain(pr.jobs.real_mods, checkpointed=flags)
    units = [u.name for u, f in zip(problem.units, flags) if f]
    return baseline_at(problem, pr, cfg, b, prof, real=real, checkpointed_units=units)
