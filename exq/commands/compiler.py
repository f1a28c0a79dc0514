"""`exq compile` and `exq diagnose`."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from exq.commands.common import add_kernel_table, positive_int


def add_compile(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "compile",
        help="allocate a format to every expert under an exact byte budget; emit layout and prefetch plan",
        description="Solve the precision allocation (a multiple-choice knapsack counted to the byte, scales and zero "
        "points included) from a routing profile and, when given, a measured sensitivity table; write a versioned "
        "plan with the layout permutation and prefetch schedule.",
    )
    src = p.add_argument_group("inputs: a profile (+ a sensitivity table), or a model and calibration text (pipeline)")
    src.add_argument("--profile", help="routing profile from `exq profile` (NAME.json)")
    src.add_argument(
        "--model", help="pipeline mode: profile + sensitivity + compile, each stage cached next to --output"
    )
    src.add_argument("--corpus", nargs="+", metavar="FILE", help="pipeline mode: calibration text (train/valid)")
    src.add_argument("--tokens", type=positive_int, default=32768, help="pipeline mode: calibration tokens")
    src.add_argument("--probe-tokens", type=positive_int, default=8192, help="pipeline mode: held-out probe tokens")
    p.add_argument(
        "--sensitivity",
        help="sensitivity table from `exq sensitivity`; without it the frequency proxy (a baseline) is used",
    )
    p.add_argument(
        "--budget",
        required=True,
        help="int4 (uniform int4-g128 bytes), 4.25bpw, or a size like 3.2GB (bytes of the allocated units)",
    )
    p.add_argument(
        "--granularity",
        choices=["expert", "block"],
        default="block",
        help="one format per block (gate+up, down; default) or per expert",
    )
    p.add_argument("--solver", choices=["milp", "greedy"], default="milp")
    p.add_argument("--formats", help="candidate formats, comma-separated (default: all the runtime can run)")
    p.add_argument("--runtime", default="torch", help="where the plan must run (default torch)")
    p.add_argument("--include-shared", action="store_true", help="also allocate shared experts")
    p.add_argument("--include-attention", action="store_true", help="also allocate attention projections")
    p.add_argument(
        "--prefetch-candidates",
        type=positive_int,
        default=8,
        help="successors kept per expert in the prefetch schedule (default 8)",
    )
    p.add_argument("--mip-gap", type=float, default=1e-4, help="relative optimality gap for milp (default 1e-4)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds for milp (default 60)")
    add_kernel_table(p, "pass D plans with them, merged into the shipped table of the same GPU")
    p.add_argument("--output", required=True, help="plan path (NAME.json)")

    def run(a: argparse.Namespace) -> int:
        from exq.compiler import SensitivityTable, compile_plan
        from exq.errors import ExqError
        from exq.kernels.tuning import kernel_tables
        from exq.profiling import RoutingProfile

        if (a.profile is None) == (a.model is None):
            raise ExqError("give either --profile (compile a profile) or --model with --corpus (run the pipeline)")
        tables = kernel_tables(a.kernel_table)  # a bad table fails before any model work
        if a.model is not None:
            from exq.pipeline import compile_from_model

            if not a.corpus:
                raise ExqError("--model needs --corpus (calibration text)")
            art, sol, cached = compile_from_model(
                a.model,
                a.corpus,
                a.budget,
                a.output,
                tokens=a.tokens,
                probe_tokens=a.probe_tokens,
                formats=a.formats,
                granularity=a.granularity,
                solver=a.solver,
                kernel_tables=tables,
            )
            print("stages reused from cache: " + (", ".join(k for k, v in cached.items() if v) or "none"))
            return _report(art, sol, a.budget, a.output)
        prof = RoutingProfile.load(a.profile)
        table = SensitivityTable.load(a.sensitivity, model=prof.model) if a.sensitivity else None
        art, sol = compile_plan(
            prof,
            a.budget,
            sensitivity=table,
            granularity=a.granularity,
            solver=a.solver,
            formats=a.formats,
            runtime=a.runtime,
            include_shared=a.include_shared,
            include_attention=a.include_attention,
            prefetch_candidates=a.prefetch_candidates,
            mip_gap=a.mip_gap,
            time_limit=a.time_limit,
            kernel_tables=tables,
        )
        art.save(a.output)
        return _report(art, sol, a.budget, a.output)

    def _report(art, sol, budget: str, output: str) -> int:
        from exq.compiler import Artifact
        from exq.compiler.budget import describe_bytes

        Artifact.load(output, model=art.model)  # what we wrote must read back
        s = art.summary()
        print(
            f"cost source: {art.cost_source['kind']}; solver {sol.solver}: {sol.status}, objective {sol.objective:.6g},"
            f" bound {sol.bound:.6g}, gap {sol.gap:.2e}, {sol.seconds * 1e3:.1f} ms"
        )
        print(f"bytes: {describe_bytes(s['bytes'], s['params'])} of budget {budget} = {s['budget_bytes']:,}")
        print(f"units per format: {s['units_per_format']}")
        print(f"wrote {output}")
        return 0

    return run


def add_diagnose(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "diagnose",
        help="summarise routing concentration and predictability (and a compiled plan)",
        description="Per MoE layer: routing entropy, hot-set coverage, next-layer predictability, and an estimate of "
        "what a routing-aware allocation can hope to gain; with --artifact, the plan's formats.",
    )
    p.add_argument("--profile", required=True)
    p.add_argument("--artifact", help="a compiled plan of the same model")
    p.add_argument("--output", help="folder for diagnose.json and diagnose.png")

    def run(a: argparse.Namespace) -> int:
        from exq.compiler import Artifact
        from exq.compiler.diagnose import diagnose, format_report
        from exq.profiling import RoutingProfile

        prof = RoutingProfile.load(a.profile)
        art = Artifact.load(a.artifact, model=prof.model) if a.artifact else None
        report = diagnose(prof, art, a.output)
        print(format_report(report))
        if a.output:
            print(f"wrote {a.output}/diagnose.json and diagnose.png")
        return 0

    return run
