"""Which units the BP-with-checkpointing baseline recomputes (torch-free).

A checkpointed unit keeps only its input through the forward and recomputes
its activations in backward: it frees ``saving`` bytes of retained
activations at the cost of one more forward of the unit. At a given batch,
the baseline must free at least ``need`` bytes (its peak without
checkpointing minus the budget); the cheapest set of units that frees them
is a 0-1 knapsack (minimise the recompute time, cover the bytes), solved
exactly with CP-SAT, deterministically (one worker, a fixed seed).
"""

from __future__ import annotations

from collections.abc import Sequence

from ortools.sat.python import cp_model

__all__ = ["choose_recompute"]

#: Costs are solved in whole microseconds (CP-SAT is an integer solver).
_US = 1e6


def choose_recompute(
    savings: Sequence[int], costs: Sequence[float], need: int, *, time_limit_s: float = 10.0
) -> tuple[bool, ...] | None:
    """One flag per unit: recompute it. The set frees at least ``need`` bytes
    (``savings[i]`` each) at the least total ``costs`` (seconds); at equal
    cost, the fewest units. All False when nothing needs freeing; None when
    recomputing every unit that saves something does not free enough."""
    n = len(savings)
    if len(costs) != n:
        raise ValueError(f"{len(costs)} costs for {n} savings")
    if need <= 0:
        return (False,) * n
    useful = [i for i in range(n) if savings[i] > 0]
    if sum(savings[i] for i in useful) < need:
        return None
    model = cp_model.CpModel()
    x = {i: model.new_bool_var(f"r{i}") for i in useful}
    model.add(sum(int(savings[i]) * x[i] for i in useful) >= int(need))
    # Lexicographic: time first (scaled past any count of units), then the number of units.
    weight = n + 1
    model.minimize(sum((round(costs[i] * _US) * weight + 1) * x[i] for i in useful))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    solver.parameters.max_time_in_seconds = time_limit_s
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return tuple(i in x and bool(solver.value(x[i])) for i in range(n))
