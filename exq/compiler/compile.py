"""Profile (+ measured costs) + budget -> a compiled plan: allocation, layout and prefetch in one call."""

from __future__ import annotations

import logging
import math

import numpy as np

from exq.compiler.artifact import Artifact
from exq.compiler.budget import describe_bytes, parse_budget
from exq.compiler.costs import FrequencyProxy, SensitivityTable
from exq.compiler.layout import layer_layout
from exq.compiler.prefetch import build_schedule
from exq.compiler.solvers import Infeasible, Solution, solve
from exq.compiler.specialize import specialize
from exq.compiler.units import BLOCKS, build_units, bytes_table, unit_bytes
from exq.errors import ExqError
from exq.formats import FORMATS, parse_formats, runtime_formats
from exq.kernels.tuning import packaged_tables
from exq.models.fingerprint import check_same_model
from exq.profiling.routing_profile import RoutingProfile

log = logging.getLogger(__name__)


def compile_plan(
    profile: RoutingProfile,
    budget: str,
    *,
    sensitivity: SensitivityTable | None = None,
    granularity: str = "expert",
    solver: str = "milp",
    formats: str | list[str] | None = None,
    runtime: str = "torch",
    include_shared: bool = False,
    include_attention: bool = False,
    prefetch_candidates: int = 8,
    mip_gap: float = 1e-4,
    time_limit: float = 60.0,
    kernel_tables: dict | None = None,
) -> tuple[Artifact, Solution]:
    """Allocate a format to every unit under the budget and emit the plan with its layout and prefetch schedule.

    Costs come from the measured `sensitivity` table when given, else from the frequency proxy (a baseline).
    `formats` are the candidates (default: those the table measured, or all the runtime can run; bf16 always).
    `kernel_tables` ({gpu: table}, `exq.kernels.tuning.kernel_tables`) feed pass D; default: the shipped ones.
    """
    if sensitivity is not None:
        check_same_model(sensitivity.model, profile.model, "the sensitivity table (vs the profile)")
    if formats is None:
        names = [f.name for f in runtime_formats(runtime)]
        if sensitivity is not None:
            names = [n for n in names if n == "bf16" or n in sensitivity.formats]
        fmts = parse_formats(names, runtime)
    else:
        fmts = parse_formats(formats, runtime)
    if prefetch_candidates < 1:
        raise ExqError(f"prefetch candidates must be >= 1, got {prefetch_candidates}")
    spec = parse_budget(budget)
    units = build_units(profile.model["structure"], granularity, include_shared, include_attention)
    nbytes = bytes_table(units, fmts)
    source = sensitivity if sensitivity is not None else FrequencyProxy(profile)
    cost = source.cost_table(units, fmts)
    cost = np.where(nbytes >= 0, cost, np.inf)

    params = sum(u.params for u in units)
    whole = {}
    for name, fmt in FORMATS.items():
        sizes = [unit_bytes(u, fmt) for u in units]
        if all(s is not None for s in sizes):
            whole[name] = sum(sizes)
    allowed = spec.resolve(whole, params)
    try:
        sol = solve(cost, nbytes, allowed, solver, mip_gap=mip_gap, time_limit=time_limit)
    except Infeasible as e:
        raise ExqError(
            f"budget {spec.spec} = {describe_bytes(allowed, params)} is infeasible with formats "
            f"{', '.join(f.name for f in fmts)}",
            f"the smallest feasible budget is {describe_bytes(e.min_bytes, params)}, e.g. --budget "
            f"{math.ceil(8e4 * e.min_bytes / params) / 1e4:.4f}bpw",
        ) from e
    log.info(
        "%s: objective %.6g, %s, gap %.2e, %.3f s",
        sol.solver,
        sol.objective,
        describe_bytes(sol.nbytes, params),
        sol.gap,
        sol.seconds,
    )

    structure = profile.model["structure"]
    experts = [{b: ["bf16"] * int(layer["num_experts"]) for b in BLOCKS} for layer in structure["moe_layers"]]
    shared = [None] * len(structure["moe_layers"]) if include_shared else None
    attention = [None] * len(structure["attention"]) if include_attention else None
    for u, f in zip(units, sol.choice.tolist(), strict=True):
        name = fmts[f].name
        if u.kind == "expert":
            for b in BLOCKS if u.block == "expert" else (u.block,):
                experts[u.layer][b][u.expert] = name
        elif u.kind == "shared":
            shared[u.layer] = name
        else:
            attention[u.layer] = name
    layout = [
        {b: layer_layout(plan[b], profile.frequency(li), profile.coselection(li)) for b in BLOCKS}
        for li, plan in enumerate(experts)
    ]
    art = Artifact(
        model=profile.model,
        granularity=granularity,
        runtime=runtime,
        candidates=[f.name for f in fmts],
        budget={"spec": spec.spec, "bytes": allowed},
        experts=experts,
        shared=shared,
        attention=attention,
        layout=layout,
        prefetch={"candidates": prefetch_candidates, "transitions": build_schedule(profile, prefetch_candidates)},
        cost_source=source.describe(),
        solver=sol.stats() | {"mip_gap": mip_gap} if solver == "milp" else sol.stats(),
        inputs={
            "profile_sha256": profile.content_sha256,
            "sensitivity_sha256": sensitivity.content_sha256 if sensitivity is not None else None,
        },
        routing=[[round(float(x), 6) for x in profile.share(li)] for li in range(len(profile.layers))],
    )
    tables = packaged_tables() if kernel_tables is None else kernel_tables
    art.kernels = specialize(profile.model["structure"], experts, art.routing, tables)
    art.validate()
    return art, sol
