"""Allocation solver speed on a synthetic Qwen3-30B-A3B-sized problem.

    python benchmarks/solver_speed.py [--repeats 7] [--output docs/bench/solver_speed.json]

48 MoE layers x 128 experts x 2 blocks (gate_up [1536, 2048], down [2048, 768]) = 12,288 units, 5 formats
(bf16, int8, int4, int3-asym, int2-asym) with exact byte counts. Costs: per-format noise x a lognormal per-block
sensitivity x a lognormal per-expert routing weight, plus per-(unit, format) jitter, so no two units are alike.
Times `solve()` only (the inputs are built once), median of --repeats runs, for greedy and milp (default gap 1e-4),
at three budgets; then milp at gap 1e-6 with a 10 s limit to show how far from proven optimality the fast answer is.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from exq.compiler.solvers import solve
from exq.compiler.units import build_units, bytes_table
from exq.formats import parse_formats

FORMATS = "bf16,int8,int4,int3-asym,int2-asym"
NOISE = {"bf16": 0.0, "int8": 4.0**-8, "int4": 4.0**-4, "int3-asym": 0.7 * 4.0**-3, "int2-asym": 0.7 * 4.0**-2}


def problem(seed: int = 0):
    structure = {
        "moe_layers": [
            {"num_experts": 128, "hidden_size": 2048, "intermediate_size": 768, "shared": []} for _ in range(48)
        ],
        "attention": [],
    }
    fmts = parse_formats(FORMATS)
    units = build_units(structure, "block")
    nbytes = bytes_table(units, fmts)
    rng = np.random.default_rng(seed)
    routing = rng.lognormal(0, 0.8, size=(48, 128))
    sens = rng.lognormal(0, 1.0, size=len(units))
    weight = np.array([routing[u.layer, u.expert] for u in units]) * sens
    cost = weight[:, None] * np.array([NOISE[f.name] for f in fmts])[None, :] * rng.lognormal(0, 0.2, nbytes.shape)
    cost[:, 0] = 0.0
    params = sum(u.params for u in units)
    return cost, nbytes, params, len(units)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--output", type=Path)
    a = ap.parse_args()
    cost, nbytes, params, n_units = problem()
    int4 = int(nbytes[:, 2].sum())
    budgets = {"int4": int4, "3.25bpw": int(params * 3.25 / 8), "4.5bpw": int(params * 4.5 / 8)}
    rows = []
    for name, budget in budgets.items():
        for solver in ("greedy", "milp"):
            times, sol = [], None
            for _ in range(a.repeats):
                t = time.perf_counter()
                sol = solve(cost, nbytes, budget, solver)
                times.append(time.perf_counter() - t)
            rows.append(
                {
                    "budget": name,
                    "solver": solver,
                    "median_ms": round(1e3 * statistics.median(times), 2),
                    "max_ms": round(1e3 * max(times), 2),
                    "status": sol.status,
                    "objective": sol.objective,
                    "gap": sol.gap,
                    "bytes": sol.nbytes,
                    "budget_bytes": budget,
                }
            )
            print(json.dumps(rows[-1]))
        t = time.perf_counter()
        tight = solve(cost, nbytes, budget, "milp", mip_gap=1e-6, time_limit=10.0)
        rows.append(
            {
                "budget": name,
                "solver": "milp gap 1e-6 (10 s limit)",
                "median_ms": round(1e3 * (time.perf_counter() - t), 1),
                "status": tight.status,
                "objective": tight.objective,
                "gap": tight.gap,
                "bytes": tight.nbytes,
                "budget_bytes": budget,
            }
        )
        print(json.dumps(rows[-1]))
    res = {
        "problem": f"{n_units} units (48 layers x 128 experts x 2 blocks) x 5 formats ({FORMATS})",
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "repeats": a.repeats,
        "rows": rows,
    }
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
