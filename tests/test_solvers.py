"""Allocation solvers against brute force (hypothesis), against each other, and on bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exq.compiler.solvers import Infeasible, greedy, milp, solve
from exq.errors import ExqError


def brute_force(cost, nbytes, budget):
    best, best_choice = np.inf, None
    for choice in itertools.product(*[range(cost.shape[1])] * cost.shape[0]):
        c = [cost[u, f] for u, f in enumerate(choice)]
        b = [nbytes[u, f] for u, f in enumerate(choice)]
        if any(x < 0 for x in b) or not all(np.isfinite(c)) or sum(b) > budget:
            continue
        if sum(c) < best:
            best, best_choice = sum(c), choice
    return best, best_choice


@st.composite
def instances(draw, max_units=5, max_options=4):
    u = draw(st.integers(1, max_units))
    f = draw(st.integers(1, max_options))
    nbytes = np.array(draw(st.lists(st.integers(1, 60), min_size=u * f, max_size=u * f))).reshape(u, f)
    cost = np.array(draw(st.lists(st.floats(-5, 50, allow_nan=False), min_size=u * f, max_size=u * f))).reshape(u, f)
    holes = np.array(draw(st.lists(st.booleans(), min_size=u * f, max_size=u * f))).reshape(u, f)
    holes[:, 0] = False  # every unit keeps at least one option
    cost = np.where(holes & (np.arange(f) % 2 == 1), np.inf, cost)  # unknown cost
    nbytes = np.where(holes & (np.arange(f) % 2 == 0) & (np.arange(f) > 0), -1, nbytes)  # format cannot store it
    usable = (nbytes >= 0) & np.isfinite(cost)
    lo = int(np.where(usable, nbytes, 10**9).min(axis=1).sum())
    budget = draw(st.integers(lo, lo + 120))
    return cost.astype(np.float64), nbytes.astype(np.int64), budget


@settings(max_examples=300, deadline=None)
@given(instances())
def test_milp_equals_brute_force_and_greedy_is_feasible(inst):
    cost, nbytes, budget = inst
    opt, _ = brute_force(cost, nbytes, budget)
    ar = np.arange(cost.shape[0])
    m = milp(cost, nbytes, budget, mip_gap=0.0)
    g, _ = greedy(cost, nbytes, budget)
    for sol in (m, g):
        assert (nbytes[ar, sol.choice] >= 0).all() and np.isfinite(cost[ar, sol.choice]).all()
        assert int(nbytes[ar, sol.choice].sum()) == sol.nbytes <= budget
        assert sol.objective == pytest.approx(cost[ar, sol.choice].sum())
        assert sol.bound <= opt + 1e-9 * (1 + abs(opt))  # a lower bound is never above the optimum
    assert m.objective == pytest.approx(opt, rel=1e-9, abs=1e-9)
    assert g.objective >= opt - 1e-9 * (1 + abs(opt))


@pytest.mark.parametrize("seed", range(5))
def test_milp_never_worse_than_greedy_on_larger_instances(seed):
    rng = np.random.default_rng(seed)
    u, f = 400, 5
    nbytes = np.sort(rng.integers(100, 5000, size=(u, f)), axis=1)
    cost = np.sort(rng.lognormal(0, 1, size=(u, f)), axis=1)[:, ::-1] * rng.lognormal(0, 1, size=(u, 1))
    budget = int(nbytes[:, 2].sum())
    g, _ = greedy(cost, nbytes, budget)
    m = milp(cost, nbytes, budget, mip_gap=1e-6)
    assert m.objective <= g.objective + 1e-12
    assert m.nbytes <= budget and m.bound <= m.objective
    assert m.gap <= 1e-6 or m.status not in ("optimal", "within gap")


def test_deterministic():
    rng = np.random.default_rng(7)
    nbytes = rng.integers(10, 100, size=(300, 4))
    cost = rng.random((300, 4))
    budget = int(nbytes.mean(axis=1).sum())
    a, b = solve(cost, nbytes, budget, "milp"), solve(cost, nbytes, budget, "milp")
    assert np.array_equal(a.choice, b.choice) and a.objective == b.objective


def test_infeasible_reports_the_minimum():
    nbytes = np.array([[10, 20], [5, 7]])
    cost = np.array([[1.0, 0.0], [1.0, 0.0]])
    with pytest.raises(Infeasible) as info:
        greedy(cost, nbytes, 14)
    assert info.value.min_bytes == 15


def test_unit_without_usable_option():
    with pytest.raises(ExqError, match="unit 1 has no usable format"):
        greedy(np.array([[1.0], [np.inf]]), np.array([[3], [4]]), 100)


def test_unknown_solver():
    with pytest.raises(ExqError, match="unknown solver"):
        solve(np.zeros((1, 1)), np.ones((1, 1), dtype=np.int64), 5, "cplex")
