"""Pass C, prefetch: which experts of layer l+1 to fetch early, given the experts layer l chose.

The schedule keeps, for every (l, i), the `candidates` experts j of layer l+1 most likely to follow, with
p = P(j chosen at l+1 | i chosen at l) from the profile's co-activation counts (experts never routed in calibration
fall back to the next layer's marginal frequencies). At run time a token's active set S at layer l scores each j by
sum_{i in S} p(j | i) and fetches the top M = m x |S|: for a budget of M fetches that maximises the expected number
of hits under the schedule's probabilities. `hit_rate` measures it on held-out routing against a static baseline
(always the M hottest experts of layer l+1).
"""

from __future__ import annotations

import numpy as np

from exq.profiling.routing_profile import RoutingProfile


def build_schedule(prof: RoutingProfile, candidates: int = 8) -> list[list[list[list[float]]]]:
    """schedule[l][i] = [[j, p], ...] sorted by p, highest first (p rounded to 1e-4 for a stable file)."""
    out = []
    for li in range(len(prof.layers) - 1):
        p = prof.next_layer_probability(li)
        fallback = prof.frequency(li + 1)
        unused = prof.counts(li) == 0
        p[unused] = fallback
        m = min(candidates, p.shape[1])
        rows = []
        for i in range(p.shape[0]):
            top = np.lexsort((np.arange(p.shape[1]), -p[i]))[:m]  # by p desc, then id
            rows.append([[int(j), round(float(p[i, j]), 4)] for j in top if p[i, j] > 0])
        out.append(rows)
    return out


def _dense(rows: list[list[list[float]]], n_next: int) -> np.ndarray:
    mat = np.zeros((len(rows), n_next))
    for i, row in enumerate(rows):
        for j, p in row:
            mat[i, int(j)] = p
    return mat


def predict(rows: list, n_next: int, active: np.ndarray, per_active: int) -> np.ndarray:
    """active [T, k] expert ids at layer l -> [T, n_next] bool: the experts fetched for layer l+1."""
    mat = _dense(rows, n_next)
    score = mat[active].sum(axis=1)  # [T, n_next]
    m = min(per_active * active.shape[1], n_next)
    # deterministic top-m: by score, ties to lower id
    idx = np.argsort(-score - np.arange(n_next) * 1e-12, axis=1, kind="stable")[:, :m]
    fetched = np.zeros_like(score, dtype=bool)
    np.put_along_axis(fetched, idx, True, axis=1)
    return fetched


def hit_rate(schedule: list, trace: list[np.ndarray], per_active: int, frequency: list[np.ndarray] | None = None):
    """Fraction of layer l+1's chosen experts that were fetched, per transition, on a routing trace.

    trace[l]: [T, k_l] expert ids chosen at MoE layer l for the same T tokens. With `frequency` (per layer), also the
    static baseline: the M hottest experts of layer l+1, M = per_active x k_l.
    """
    ours, static = [], []
    for li, rows in enumerate(schedule):
        nxt = trace[li + 1]
        n_next = max(int(nxt.max()) + 1, max((int(j) for r in rows for j, _ in r), default=0) + 1)
        if frequency is not None:
            n_next = len(frequency[li + 1])
        fetched = predict(rows, n_next, trace[li], per_active)
        ours.append(float(np.take_along_axis(fetched, nxt, axis=1).mean()))
        if frequency is not None:
            m = min(per_active * trace[li].shape[1], n_next)
            hot = np.zeros(n_next, dtype=bool)
            hot[np.lexsort((np.arange(n_next), -frequency[li + 1]))[:m]] = True
            static.append(float(hot[nxt].mean()))
    return ours, static
