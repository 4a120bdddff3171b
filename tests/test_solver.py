"""The CP-SAT model against an exact brute-force reference, and the greedy plan."""

from __future__ import annotations

import dataclasses
import random

import pytest
from reference import brute_force

from neuroflux.planner.problem import (
    AuxOption,
    Problem,
    Solution,
    UnitCost,
    candidate_batch_sizes,
    check_solution,
    min_feasible_budget_bytes,
    plan_time_s,
)
from neuroflux.planner.solve_cpsat import SolverConfig, solve_cpsat
from neuroflux.planner.solve_dp import solve_dp
from neuroflux.planner.solve_greedy import solve_greedy


def random_problem(rng: random.Random, *, n: int, monotone: bool = False, boundaries: bool = False) -> Problem:
    """Random instance. ``monotone``: narrower heads are never slower (as in
    profiled models); otherwise each option's fixed step time is random.
    ``boundaries``: RAM, disk and recompute boundaries, with tight host
    budgets and recompute costs (drawn last, so other instances are unchanged)."""
    units = []
    for i in range(n):
        per_sample = rng.choice([1, 2, 4, 8, 16]) * 1024 * rng.randint(1, 4)
        static = rng.randint(1, 64) * 1024 * 64
        if monotone:  # drawn only here, so the other instances keep their random stream
            fixed, per, dyn_fixed = rng.uniform(1e-4, 2e-3), rng.uniform(1e-6, 5e-5), rng.randint(0, 8) * 1024
        opts = []
        for j in range(rng.randint(1, 3)):  # widest first: more memory, more time
            shrink = 2**j
            opts.append(
                AuxOption(
                    kind="conv",
                    width=64 // shrink,
                    head_params=1000 // shrink,
                    static_bytes=static + 40960 // shrink,
                    dyn_fixed_bytes=dyn_fixed if monotone else rng.randint(0, 8) * 1024,
                    dyn_per_sample_bytes=per_sample + 4096 // shrink,
                    step_fixed_s=fixed * (1 + 0.2 / shrink) if monotone else rng.uniform(1e-4, 2e-3),
                    step_per_sample_s=(per if monotone else rng.uniform(1e-6, 5e-5)) * (1 + 0.1 / shrink),
                )
            )
        units.append(
            UnitCost(
                name=f"u{i}",
                options=tuple(opts),
                out_bytes_per_sample=rng.choice([256, 1024, 4096]),
                fwd_per_sample_s=rng.uniform(1e-7, 1e-5),
            )
        )
    batch_sizes = candidate_batch_sizes(min_batch=8, max_batch=rng.choice([32, 64, 256]))
    extra: dict = {}
    if boundaries:
        units = [
            dataclasses.replace(
                u,
                infer_static_bytes=rng.randint(1, 64) * 1024 * 32,
                infer_fixed_bytes=rng.randint(0, 8) * 1024,
                infer_per_sample_bytes=rng.choice([1, 4, 16]) * 1024,
                fwd_fixed_s=rng.uniform(0, 5e-4),
            )
            for u in units
        ]
        extra = dict(
            boundaries=("ram", "disk", "recompute"),
            disk_budget_bytes=rng.choice([0, 8, 32]) * 1024 * 1024,
            disk_bytes_per_s=rng.choice([1e8, 1e9]),
        )
    return Problem(
        **extra,
        units=tuple(units),
        batch_sizes=batch_sizes,
        train_size=rng.choice([1000, 5000]),
        val_size=500,
        epochs=rng.randint(1, 3),
        cap_bytes=rng.randint(4, 40) * 1024 * 1024,
        cache_budget_bytes=rng.choice([10**9, 12 * 1024 * 1024, 6 * 1024 * 1024]),
        max_blocks=rng.choice([None, None, 2, 3]),
        max_block_units=rng.choice([None, None, 1, 2]),
    )


@pytest.mark.parametrize("seed", range(24))
def test_cpsat_matches_brute_force(seed: int) -> None:
    p = random_problem(random.Random(seed), n=random.Random(seed).randint(2, 5))
    ref = brute_force(p)
    sol = solve_cpsat(p, SolverConfig(time_limit_s=20, seed=0, workers=2, tie_tolerance=0.0))
    if ref is None:
        assert sol.status == "infeasible", sol
        return
    assert sol.status == "optimal", sol.message
    assert check_solution(p, sol) == []
    # Objective terms are rounded to microseconds inside CP-SAT.
    assert sol.time_s == pytest.approx(ref[0], abs=1e-4 * p.n * 4 + 1e-6)


def test_enough_random_instances_are_feasible() -> None:
    """Guard against a generator that only makes trivial (infeasible) cases."""
    feasible = sum(
        brute_force(random_problem(random.Random(s), n=random.Random(s).randint(2, 5))) is not None for s in range(24)
    )
    assert feasible >= 20


def test_phase_two_prefers_widest_heads_at_equal_time() -> None:
    def opt(w: int, t: float) -> AuxOption:
        return AuxOption(
            kind="conv",
            width=w,
            head_params=w,
            static_bytes=1000,
            dyn_fixed_bytes=0,
            dyn_per_sample_bytes=100,
            step_fixed_s=t,
            step_per_sample_s=0.0,
        )

    u = UnitCost(name="u0", options=(opt(64, 1.0e-3), opt(32, 0.999e-3)), out_bytes_per_sample=4, fwd_per_sample_s=0)
    p = Problem(
        units=(u, u),
        batch_sizes=(8, 16),
        train_size=160,
        val_size=16,
        epochs=1,
        cap_bytes=10**6,
        cache_budget_bytes=10**9,
    )
    assert solve_cpsat(p, SolverConfig(tie_tolerance=0.0)).options == (1, 1)
    assert solve_cpsat(p, SolverConfig(tie_tolerance=0.01)).options == (0, 0)


def test_infeasible_budget_and_minimum() -> None:
    p = random_problem(random.Random(3), n=3)
    need = min_feasible_budget_bytes(p, margin_fraction=0.0)
    tight = Problem(**{**p.__dict__, "cap_bytes": need - 1, "max_blocks": None, "cache_budget_bytes": 10**12})
    ok = Problem(**{**p.__dict__, "cap_bytes": need, "max_blocks": None, "cache_budget_bytes": 10**12})
    assert solve_cpsat(tight).status == "infeasible"
    assert solve_cpsat(ok).status == "optimal"


def test_greedy_is_valid_and_never_beats_optimal() -> None:
    """On random problems where greedy finds a plan (at least 7 of 10: a
    vacuous run fails), the plan is valid and optimal is never slower; where
    greedy finds none, optimal still may, never the reverse."""
    feasible = 0
    for seed in range(10):
        p = random_problem(random.Random(100 + seed), n=5)
        p = Problem(**{**p.__dict__, "cache_budget_bytes": 10**12})
        g = solve_greedy(p)
        opt = solve_cpsat(p, SolverConfig(tie_tolerance=0.0))
        if g.status == "infeasible":
            continue
        feasible += 1
        assert opt.status == "optimal"
        assert check_solution(p, g) == []
        assert g.time_s == pytest.approx(plan_time_s(p, g.blocks, g.options))
        assert opt.time_s <= g.time_s + 1e-3
    assert feasible >= 7, f"only {feasible} of 10 random problems were feasible for greedy"


# ------------------------------------------------------------------ the exact dynamic program
@pytest.mark.parametrize("seed", range(24))
def test_dp_matches_brute_force_and_cpsat(seed: int) -> None:
    rng = random.Random(1000 + seed)
    p = random_problem(rng, n=rng.randint(2, 5), monotone=True)
    ref = brute_force(p)
    sol = solve_dp(p)
    assert sol is not None, "monotone options always have a lightest one"
    if ref is None:
        assert sol.status == "infeasible"
        return
    assert sol.status == "optimal" and check_solution(p, sol) == []
    assert sol.time_s == pytest.approx(ref[0], rel=1e-9)
    cp = solve_cpsat(p, SolverConfig(time_limit_s=20, seed=0, workers=2, tie_tolerance=0.0))
    assert cp.time_s == pytest.approx(sol.time_s, abs=1e-4 * p.n * 4 + 1e-6)


def test_dp_declines_problems_without_a_lightest_option() -> None:
    def opt(t: float, m: int) -> AuxOption:
        return AuxOption(
            kind="conv",
            width=8,
            head_params=1,
            static_bytes=m,
            dyn_fixed_bytes=0,
            dyn_per_sample_bytes=1,
            step_fixed_s=t,
            step_per_sample_s=0.0,
        )

    p = Problem(
        units=(UnitCost(name="u0", options=(opt(1.0, 10), opt(2.0, 5)), out_bytes_per_sample=1, fwd_per_sample_s=0.0),),
        batch_sizes=(8,),
        train_size=8,
        val_size=8,
        epochs=1,
        cap_bytes=10**6,
        cache_budget_bytes=10**9,
    )
    assert solve_dp(p) is None


@pytest.mark.parametrize("seed", range(12))
def test_dp_plans_crossing_options_like_brute_force(seed: int) -> None:
    """EfficientNet-B0's u23: a narrower head has fewer bytes per sample but
    more fixed bytes (its peak falls in another phase of the step), so no
    option is lightest term by term; one is at every allowed batch size, and
    the DP must then be exact."""
    rng = random.Random(5000 + seed)
    p = random_problem(rng, n=rng.randint(2, 4), monotone=True)
    lo = min(p.batch_sizes)
    units = []
    for u in p.units:
        # Narrower options move 1 KiB per sample into the fixed term, less than it saves at the smallest batch.
        units.append(
            dataclasses.replace(
                u,
                options=tuple(
                    dataclasses.replace(
                        o,
                        dyn_fixed_bytes=o.dyn_fixed_bytes + j * (lo - 1) * 1024,
                        dyn_per_sample_bytes=o.dyn_per_sample_bytes - j * 2048,
                    )
                    for j, o in enumerate(u.options)
                ),
            )
        )
    p = dataclasses.replace(p, units=tuple(units))
    crossing = [u for u in p.units if len(u.options) > 1]
    assert all(o.dyn_fixed_bytes > u.options[0].dyn_fixed_bytes for u in crossing for o in u.options[1:])
    _dp_matches_brute_force(p)


def _dp_matches_brute_force(p: Problem) -> Solution | None:
    """The dynamic program plans ``p`` (it has a lightest option per unit),
    finds the brute force's least time, and its plan is valid; returns the
    plan (None where no plan exists)."""
    ref = brute_force(p)
    sol = solve_dp(p)
    assert sol is not None
    if ref is None:
        assert sol.status == "infeasible"
        return None
    assert sol.status == "optimal" and check_solution(p, sol) == [], check_solution(p, sol)
    assert sol.time_s == pytest.approx(ref[0], rel=1e-9)
    return sol


def test_dp_widening_stays_within_the_tolerance_and_fits() -> None:
    rng = random.Random(7)
    for _ in range(20):
        p = random_problem(rng, n=6, monotone=True)
        base = solve_dp(p)
        if base is None or base.status != "optimal":
            continue
        wide = solve_dp(p, tie_tolerance=0.1)
        assert check_solution(p, wide) == []
        assert wide.time_s <= base.time_s * 1.1 + 1e-9
        assert sum(wide.options) <= sum(base.options)


def test_deep_network_plans_to_the_optimum_in_seconds() -> None:
    """150 units (ResNet-152 / DenseNet scale), 2 cores: the dynamic program
    proves the least-time plan well under 10 s."""
    import time

    p = random_problem(random.Random(3), n=150, monotone=True)
    p = Problem(
        **{
            **p.__dict__,
            "cap_bytes": 200 * 1024 * 1024,
            "cache_budget_bytes": 10**12,
            "max_blocks": None,
            "max_block_units": 50,
        }
    )
    t0 = time.perf_counter()
    sol = solve_dp(p, tie_tolerance=0.1)
    assert time.perf_counter() - t0 < 10
    assert sol.status == "optimal" and check_solution(p, sol) == []


# ------------------------------------------------------------------ boundaries: RAM, disk, recompute
@pytest.mark.parametrize("seed", range(30))
def test_dp_with_boundaries_matches_brute_force(seed: int) -> None:
    """With every boundary kind and tight host budgets, the dynamic program
    finds the brute force's least time, and its plan is valid."""
    rng = random.Random(5000 + seed)
    p = random_problem(rng, n=rng.randint(2, 5), monotone=True, boundaries=True)
    sol = _dp_matches_brute_force(p)
    if sol is None:
        return
    g = solve_greedy(p)
    if g.status != "infeasible":
        assert check_solution(p, g) == [] and g.time_s >= sol.time_s - 1e-9


def test_boundary_instances_use_every_kind() -> None:
    """Guard: the random instances exercise disk and recompute boundaries, and
    recompute rescues plans the caches alone cannot make."""
    kinds, rescued = set(), 0
    for seed in range(30):
        rng = random.Random(5000 + seed)
        p = random_problem(rng, n=rng.randint(2, 5), monotone=True, boundaries=True)
        sol = solve_dp(p)
        if sol.status == "optimal":
            kinds |= {b.boundary for b in sol.blocks[:-1]}
            cached_only = solve_dp(dataclasses.replace(p, boundaries=("ram", "disk")))
            rescued += cached_only.status == "infeasible"
    assert kinds == {"ram", "disk", "recompute"}, kinds
    assert rescued >= 1


def test_recompute_always_plans_when_one_unit_fits() -> None:
    """No host budget at all: every boundary recomputes, and the plan costs
    the prefix's forward per epoch."""
    u = UnitCost(
        name="u",
        options=(
            AuxOption(
                kind="conv",
                width=8,
                head_params=8,
                static_bytes=1000,
                dyn_fixed_bytes=0,
                dyn_per_sample_bytes=100,
                step_fixed_s=1e-3,
                step_per_sample_s=0.0,
            ),
        ),
        out_bytes_per_sample=4096,
        fwd_per_sample_s=1e-5,
        fwd_fixed_s=1e-4,
        infer_static_bytes=500,
        infer_per_sample_bytes=50,
    )
    p = Problem(
        units=(u, u, u),
        batch_sizes=(8, 16),
        train_size=160,
        val_size=16,
        epochs=2,
        cap_bytes=10**6,
        cache_budget_bytes=0,
        boundaries=("ram", "disk", "recompute"),
        max_block_units=1,
    )
    sol = solve_dp(p)
    assert sol.status == "optimal" and [b.boundary for b in sol.blocks[:-1]] == ["recompute", "recompute"]
    assert check_solution(p, sol) == []
    # Block 2 recomputes units 0 and 1 on 2 epochs of 160 samples (2 * 160 * 2e-5 s), and pays their
    # fixed forward cost on each of its 2 * 10 steps at batch 16 (20 * 2e-4 s), on top of its own steps.
    from neuroflux.planner.problem import recompute_time_s

    assert recompute_time_s(p, 0, 2, 16) == pytest.approx(2 * 160 * 2e-5 + 20 * 2e-4)
    assert solve_dp(dataclasses.replace(p, boundaries=("ram",))).status == "infeasible"


def test_a_cpsat_timeout_falls_back_to_a_greedy_plan_that_recomputes(monkeypatch) -> None:
    """With no dynamic-program plan, a greedy plan with a recompute boundary
    cannot seed CP-SAT (outside its all-RAM model) but is still the plan
    written when CP-SAT times out: never "no plan" when one exists."""
    from neuroflux.planner import solve as engines
    from neuroflux.planner.config import PlanConfig
    from neuroflux.planner.problem import BlockChoice, Solution

    p = dataclasses.replace(random_problem(random.Random(3), n=3), boundaries=("ram", "recompute"))
    blocks = (
        BlockChoice(start=0, end=0, batch_size=8, boundary="recompute"),
        BlockChoice(start=1, end=2, batch_size=8),
    )
    greedy = Solution(status="feasible", blocks=blocks, options=(0, 0, 0), time_s=1.0)
    hints = []
    monkeypatch.setattr(engines, "solve_greedy", lambda problem: greedy)
    monkeypatch.setattr(engines, "solve_dp", lambda *a, **k: None)
    monkeypatch.setattr(
        engines, "solve_cpsat", lambda *a, hint=None, **k: hints.append(hint) or Solution(status="timeout")
    )
    sol, engine = engines.solve(p, PlanConfig.from_options(budget_bytes=1, budget_text="1"))
    assert hints == [None], "a plan with a recompute boundary is no hint for CP-SAT"
    assert engine == "greedy" and sol.status == "feasible" and sol.blocks == blocks
    assert "CP-SAT timed out" in sol.message


@pytest.mark.parametrize("seed", range(8))
def test_cpsat_taking_the_dps_least_time_plan_as_phase_one_plans_the_same(seed: int) -> None:
    """``proven=True``: CP-SAT skips phase 1 (the dynamic program proved the
    least time) and widens heads from there; the plan is as good as when
    CP-SAT proves phase 1 itself, in time and in heads."""
    p = random_problem(random.Random(3000 + seed), n=4, monotone=True)
    least = solve_dp(p)
    if least is None or least.status != "optimal":
        pytest.skip("no feasible plan for this instance")
    cfg = SolverConfig(time_limit_s=20, seed=0, workers=2, tie_tolerance=0.1)
    full = solve_cpsat(p, cfg, hint=least)
    skipped = solve_cpsat(p, cfg, hint=least, proven=True)
    assert check_solution(p, skipped) == [] and skipped.status == "optimal"
    assert skipped.stats["phase1_wall_s"] == 0.0
    assert sum(skipped.options) == sum(full.options)
    assert skipped.time_s == pytest.approx(full.time_s, rel=1e-6)


def test_batch_rule_takes_the_smallest_batch_within_the_tolerance() -> None:
    """``--batch-time-tolerance``: the solved partition, boundaries and heads
    stay; every block takes the smallest candidate batch (checked against
    every smaller one) whose predicted time is within the tolerance of its
    solved time, and the plan still fits."""
    from neuroflux.planner.problem import block_sources, plan_time_s
    from neuroflux.planner.solve_batches import prefer_small_batches

    rng = random.Random(5)
    changed = solved = 0
    for i in range(40):
        p = random_problem(rng, n=5, monotone=True, boundaries=i % 2 == 1)
        s = solve_dp(p)
        if s is None or s.status != "optimal":
            continue
        solved += 1
        assert prefer_small_batches(p, s, 0.0) is s
        for tol in (0.05, 0.5):
            r = prefer_small_batches(p, s, tol)
            assert check_solution(p, r) == [] and r.options == s.options
            assert [(b.start, b.end, b.boundary) for b in r.blocks] == [(b.start, b.end, b.boundary) for b in s.blocks]
            for b, rb, src in zip(s.blocks, r.blocks, block_sources(s.blocks)):
                ok = [c for c in p.batch_sizes if c <= b.batch_size and _batch_within(p, s.options, b, src, c, tol)]
                assert rb.batch_size == min(ok), (rb, ok)
            assert r.time_s == pytest.approx(plan_time_s(p, r.blocks, r.options))
            assert r.time_s <= s.time_s * (1 + tol) + 1e-9
            changed += r.blocks != s.blocks
    assert solved >= 10 and changed > 0, (solved, changed)


def _batch_within(p: Problem, options, b, src: int, batch: int, tol: float) -> bool:
    """Block ``b`` at ``batch`` fits the device and takes at most ``1 + tol`` times its time at its own batch."""
    from neuroflux.planner.problem import block_peak_bytes, block_time_s

    def t(c: int) -> float:
        return block_time_s(p, b.start, b.end, c, options, src=src, boundary=b.boundary)

    fits = block_peak_bytes(p, b.start, b.end, batch, options, src=src) <= p.cap_bytes
    return fits and t(batch) <= t(b.batch_size) * (1 + tol)
