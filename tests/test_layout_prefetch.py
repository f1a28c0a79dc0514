"""Layout and prefetch passes on hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest

from exq.compiler.layout import check_layout, layer_layout
from exq.compiler.prefetch import build_schedule, hit_rate, predict


def test_layout_groups_formats_and_chains_co_selected_experts():
    formats = ["int4", "bf16", "int4", "int8", "int4", "int4"]
    freq = np.array([0.9, 0.1, 0.5, 0.3, 0.2, 0.4])
    cosel = np.zeros((6, 6))
    cosel[0, 4] = cosel[4, 0] = 50  # 0 is hottest; 4 is its closest partner
    cosel[4, 5] = cosel[5, 4] = 30
    cosel[5, 2] = cosel[2, 5] = 10
    lay = layer_layout(formats, freq, cosel)
    # slabs in registry order: bf16, int8, int4
    assert lay["slabs"] == [["bf16", 0, 1], ["int8", 1, 1], ["int4", 2, 4]]
    assert lay["order"] == [1, 3, 0, 4, 5, 2]
    assert check_layout(lay, formats) is None


def test_layout_ties_fall_back_to_frequency_then_id():
    lay = layer_layout(["int4"] * 4, np.array([0.1, 0.3, 0.3, 0.2]), np.zeros((4, 4)))
    assert lay["order"] == [1, 2, 3, 0]


@pytest.mark.parametrize(
    ("layout", "why"),
    [
        ({"order": [0, 0, 1], "slabs": [["int4", 0, 3]]}, "permutation"),
        ({"order": [0, 1, 2], "slabs": [["int4", 0, 2]]}, "cover"),
        ({"order": [0, 1, 2], "slabs": [["int8", 0, 3]]}, "does not hold"),
    ],
)
def test_bad_layouts(layout, why):
    assert why in check_layout(layout, ["int4", "int4", "int4"])


def test_predict_scores_successors_of_the_active_set():
    rows = [[[0, 0.9], [1, 0.1]], [[1, 0.6], [2, 0.5]], [[2, 0.7]]]  # successors of experts 0, 1, 2
    active = np.array([[0, 1], [2, 1]])
    # token 0: scores {0: .9, 1: .7, 2: .5} -> top 2 = {0, 1}; token 1: {1: .6, 2: 1.2} -> {2, 1}
    fetched = predict(rows, 4, active, per_active=1)
    assert fetched.tolist() == [[True, True, False, False], [False, True, True, False]]


def test_hit_rate_perfectly_predictable_routing():
    rng = np.random.default_rng(0)
    succ = rng.permutation(8)  # expert i at layer 0 always leads to succ[i] at layer 1
    first = np.array([rng.choice(8, 2, replace=False) for _ in range(500)])
    trace = [first, succ[first]]
    rows = [[[int(succ[i]), 1.0]] for i in range(8)]
    freq = [np.bincount(first.ravel(), minlength=8) / 500, np.bincount(succ[first].ravel(), minlength=8) / 500]
    ours, static = hit_rate([rows], trace, per_active=1, frequency=freq)
    assert ours == [1.0]
    assert static[0] < 0.5  # 2 of 8 roughly uniform experts


def test_schedule_from_profile_matches_conditional_probabilities(demo_profile):
    sched = build_schedule(demo_profile, candidates=3)
    assert len(sched) == len(demo_profile.layers) - 1
    p = demo_profile.next_layer_probability(0)
    for i, row in enumerate(sched[0]):
        assert len(row) <= 3
        ps = [q for _, q in row]
        assert ps == sorted(ps, reverse=True)
        for j, q in row:
            assert q == pytest.approx(p[i, j], abs=5e-5)
        if demo_profile.counts(0)[i]:
            assert ps[0] == pytest.approx(p[i].max(), abs=5e-5)
