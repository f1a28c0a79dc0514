"""Precision allocation: a multiple-choice knapsack. Each unit takes exactly one format; minimise the summed cost
subject to the summed bytes <= budget.

greedy — each unit's options reduced to the lower convex hull of (bytes, cost); hull segments taken in order of cost
         drop per byte (the Lagrangian / LP-relaxation order) while they fit, then later segments that still fit.
         The LP relaxation's optimum comes out of the same pass and is reported as a lower bound.
milp   — exact, with HiGHS. The greedy result is the incumbent; the LP dual price fixes every option whose reduced
         cost exceeds the incumbent's gap (such an option cannot be in any better solution), so HiGHS only branches
         over the few units near the price line.

Both are deterministic: sorted ties break on unit index, HiGHS runs single-threaded with a fixed seed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from exq.errors import ExqError

SOLVERS = ("greedy", "milp")


class Infeasible(ExqError):
    def __init__(self, min_bytes: int, budget: int) -> None:
        super().__init__(f"budget of {budget:,} bytes is below the smallest possible plan ({min_bytes:,} bytes)")
        self.min_bytes = min_bytes
        self.budget = budget


@dataclass
class Solution:
    choice: np.ndarray  # [U] chosen option per unit
    objective: float
    nbytes: int
    bound: float  # proven lower bound on the optimal objective
    status: str
    solver: str
    seconds: float

    @property
    def gap(self) -> float:
        """(objective - bound) / |objective|: 0 means proven optimal."""
        return max(0.0, self.objective - self.bound) / max(abs(self.objective), 1e-300)

    def stats(self) -> dict:
        """Deterministic statistics (no timing), as recorded in an artifact."""
        return {
            "solver": self.solver,
            "status": self.status,
            "objective": float(self.objective),
            "bound": float(self.bound),
            "gap": float(self.gap),
        }


def _label(objective: float, bound: float, otherwise: str) -> str:
    return "optimal" if objective - bound <= 1e-9 * (abs(objective) + 1e-300) else otherwise


def _check(cost: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    if cost.shape != nbytes.shape or cost.ndim != 2:
        raise ValueError(f"cost {cost.shape} and bytes {nbytes.shape} must both be [units, options]")
    avail = np.isfinite(cost) & (nbytes >= 0)
    empty = np.flatnonzero(~avail.any(axis=1))
    if empty.size:
        raise ExqError(f"unit {int(empty[0])} has no usable format (no format can store it, or no cost is known)")
    return avail


def _hull(cost: np.ndarray, nbytes: np.ndarray, avail: np.ndarray):
    """Per unit, the lower convex hull of its (bytes, cost) options, from fewest bytes to lowest cost.

    Returns (order, stack, size): options sorted by bytes, hull points as positions in that order, hull lengths.
    """
    u_n, f_n = cost.shape
    big = np.iinfo(np.int64).max
    b_key = np.where(avail, nbytes, big)
    c_key = np.where(avail, cost, np.inf)
    order = np.lexsort((c_key, b_key))  # along the last axis: bytes ascending, then cost
    b = np.take_along_axis(b_key, order, 1).astype(np.float64)
    c = np.take_along_axis(c_key, order, 1)
    ok = np.take_along_axis(avail, order, 1)
    ar = np.arange(u_n)
    stack = np.zeros((u_n, f_n), dtype=np.int64)  # position 0 (fewest bytes) always starts the hull
    size = np.ones(u_n, dtype=np.int64)
    for j in range(1, f_n):
        top = stack[ar, size - 1]
        cand = ok[:, j] & (c[:, j] < c[ar, top])  # a point that is not cheaper than the top is dominated
        for _ in range(f_n):
            top = stack[ar, size - 1]
            sec = stack[ar, np.maximum(size - 2, 0)]
            bt, ct, bs, cs = b[ar, top], c[ar, top], b[ar, sec], c[ar, sec]
            with np.errstate(invalid="ignore"):
                cross = (ct - cs) * (b[:, j] - bt) - (c[:, j] - ct) * (bt - bs)
            pop = cand & (size >= 2) & (cross >= 0)  # top is on or above the chord sec -> j
            if not pop.any():
                break
            size -= pop
        top = stack[ar, size - 1]
        same = cand & (b[:, j] == b[ar, top])  # only possible when the hull is one point long
        stack[ar[same], size[same] - 1] = j
        push = cand & ~same
        stack[ar[push], size[push]] = j
        size += push
    return order, stack, size, b, c


def greedy(cost: np.ndarray, nbytes: np.ndarray, budget: int) -> tuple[Solution, float]:
    """Greedy on the convex hulls. Returns (solution, lambda): lambda is the LP dual price of a byte."""
    t0 = time.perf_counter()
    avail = _check(cost, nbytes)
    order, stack, size, b, c = _hull(cost, nbytes, avail)
    u_n = cost.shape[0]
    ar = np.arange(u_n)
    base_bytes = int(nbytes[ar, order[ar, stack[:, 0]]].sum())
    if base_bytes > budget:
        raise Infeasible(base_bytes, budget)
    # hull segments k-1 -> k of every unit, by cost drop per byte (ties: unit, then k)
    seg_u, seg_k = np.nonzero(np.arange(cost.shape[1])[None, 1:] < size[:, None])
    seg_k = seg_k + 1
    frm, to = stack[seg_u, seg_k - 1], stack[seg_u, seg_k]
    d_bytes = (b[seg_u, to] - b[seg_u, frm]).astype(np.int64)
    d_cost = c[seg_u, frm] - c[seg_u, to]
    eff = d_cost / d_bytes
    s = np.lexsort((seg_k, seg_u, -eff))
    left = budget - base_bytes
    cum = np.cumsum(d_bytes[s])
    n_fit = int(np.searchsorted(cum, left, side="right"))
    level = np.zeros(u_n, dtype=np.int64)
    taken = s[:n_fit]
    np.maximum.at(level, seg_u[taken], seg_k[taken])
    if n_fit:
        left -= int(cum[n_fit - 1])
    lam = float(eff[s[n_fit]]) if n_fit < len(s) else 0.0
    # the LP relaxation takes the first segment that does not fit fractionally
    lp_obj = float(c[ar, stack[:, 0]].sum() - d_cost[taken].sum())
    if n_fit < len(s):
        lp_obj -= d_cost[s[n_fit]] * left / d_bytes[s[n_fit]]
        blocked = np.zeros(u_n, dtype=bool)
        blocked[seg_u[s[n_fit]]] = True
        for i in s[n_fit + 1 :].tolist():  # later, smaller segments that still fit
            u = seg_u[i]
            if blocked[u]:
                continue
            if seg_k[i] == level[u] + 1 and d_bytes[i] <= left:
                level[u] = seg_k[i]
                left -= int(d_bytes[i])
            else:
                blocked[u] = True
    choice = order[ar, stack[ar, level]]
    obj = float(cost[ar, choice].sum())
    used = int(nbytes[ar, choice].sum())
    bound = obj if n_fit == len(s) else min(lp_obj, obj)  # all hull segments taken: every unit at its cheapest
    sol = Solution(choice, obj, used, bound, _label(obj, bound, "feasible"), "greedy", time.perf_counter() - t0)
    return sol, lam


def milp(
    cost: np.ndarray, nbytes: np.ndarray, budget: int, mip_gap: float = 1e-4, time_limit: float = 60.0
) -> Solution:
    """Exact MILP (HiGHS) after reduced-cost fixing around the greedy incumbent."""
    import highspy

    t0 = time.perf_counter()
    inc, lam = greedy(cost, nbytes, budget)
    avail = _check(cost, nbytes)
    u_n = cost.shape[0]
    lagr = np.where(avail, cost + lam * np.where(avail, nbytes, 0), np.inf)
    best = lagr.min(axis=1)
    bound = float(best.sum() - lam * budget)  # Lagrangian bound = the LP relaxation's optimum
    slack = inc.objective - bound
    tol = 1e-9 * (abs(inc.objective) + 1.0)
    alive = avail & (lagr - best[:, None] <= slack + tol)
    multi = alive.sum(axis=1) > 1
    if not multi.any():  # no other option of any unit can reach the incumbent's cost: it is optimal
        return Solution(
            inc.choice, inc.objective, inc.nbytes, inc.objective, "optimal", "milp", time.perf_counter() - t0
        )
    if slack <= mip_gap * abs(inc.objective):
        status = _label(inc.objective, bound, "within gap")
        return Solution(inc.choice, inc.objective, inc.nbytes, bound, status, "milp", time.perf_counter() - t0)

    ar = np.arange(u_n)
    fixed = ~multi
    fixed_bytes = int(nbytes[ar[fixed], inc.choice[fixed]].sum())
    fixed_cost = float(cost[ar[fixed], inc.choice[fixed]].sum())
    cu, cf = np.nonzero(alive & multi[:, None])  # candidate columns, row-major: deterministic order
    rows = np.cumsum(multi) - 1
    n, r = len(cu), int(multi.sum())
    scale = float(np.abs(cost[cu, cf]).max()) or 1.0
    g = int(np.gcd.reduce(nbytes[cu, cf])) or 1

    h = highspy.Highs()
    for k, v in {
        "output_flag": False,
        "threads": 1,
        "random_seed": 0,
        "presolve": "off",
        "mip_rel_gap": float(mip_gap),
        "mip_abs_gap": 1e-12,
        "time_limit": float(time_limit),
    }.items():
        h.setOptionValue(k, v)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = n, r + 1
    lp.offset_ = fixed_cost / scale
    lp.col_cost_ = cost[cu, cf] / scale
    lp.col_lower_, lp.col_upper_ = np.zeros(n), np.ones(n)
    lp.row_lower_ = np.concatenate([np.ones(r), [-highspy.kHighsInf]])
    lp.row_upper_ = np.concatenate([np.ones(r), [float((budget - fixed_bytes) // g)]])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(0, 2 * n + 1, 2, dtype=np.int32)
    idx = np.empty(2 * n, dtype=np.int32)
    idx[0::2], idx[1::2] = rows[cu], r
    val = np.empty(2 * n)
    val[0::2], val[1::2] = 1.0, nbytes[cu, cf] / g
    lp.a_matrix_.index_, lp.a_matrix_.value_ = idx, val
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n
    h.passModel(lp)
    start = highspy.HighsSolution()
    start.col_value = (inc.choice[cu] == cf).astype(np.float64).tolist()
    h.setSolution(start)
    h.run()
    info = h.getInfo()
    status = h.modelStatusToString(h.getModelStatus())
    dual = info.mip_dual_bound * scale if np.isfinite(info.mip_dual_bound) else -np.inf
    choice = inc.choice.copy()
    x = np.asarray(h.getSolution().col_value)
    if x.size == n:
        pick = np.round(x) > 0.5
        ok = np.bincount(rows[cu[pick]], minlength=r)
        cand = inc.choice.copy()
        cand[cu[pick]] = cf[pick]
        if (ok == 1).all() and int(nbytes[ar, cand].sum()) <= budget and cost[ar, cand].sum() <= inc.objective:
            choice = cand
    obj = float(cost[ar, choice].sum())
    final_bound = min(obj, max(bound, dual))
    label = _label(obj, final_bound, "within gap" if status == "Optimal" else status.lower())
    return Solution(choice, obj, int(nbytes[ar, choice].sum()), final_bound, label, "milp", time.perf_counter() - t0)


def solve(
    cost: np.ndarray,
    nbytes: np.ndarray,
    budget: int,
    solver: str = "milp",
    mip_gap: float = 1e-4,
    time_limit: float = 60.0,
) -> Solution:
    if solver == "greedy":
        return greedy(cost, nbytes, budget)[0]
    if solver == "milp":
        return milp(cost, nbytes, budget, mip_gap=mip_gap, time_limit=time_limit)
    raise ExqError(f"unknown solver {solver!r}", f"use one of {', '.join(SOLVERS)}")
