"""`exq` command line: one subcommand per pipeline stage.

User mistakes (ExqError) print one clear message and exit 2; with -v they also print the traceback. Heavy imports
happen inside each command, so `exq --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

from exq import __version__
from exq.errors import ExqError

log = logging.getLogger("exq")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_profile(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "profile",
        help="record how the router uses each expert on calibration text",
        description="Run calibration text through an MoE model and record, per MoE layer, the router's own choices: "
        "per-expert token counts and gate mass, routing entropies, and co-activation between consecutive MoE layers, "
        "in total and per corpus file.",
    )
    p.add_argument("--model", required=True, help="checkpoint folder (or Hugging Face id) of a supported MoE model")
    p.add_argument(
        "--corpus", required=True, nargs="+", metavar="FILE", help="text files (.txt or .txt.gz), one domain each"
    )
    p.add_argument("--tokens", required=True, type=_positive_int, help="total tokens, split evenly over the files")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="compute dtype (default: the checkpoint's)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--output", required=True, help="profile path, NAME.json (arrays go to NAME.npz)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG picture of the profile (NAME.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")

    def run(a: argparse.Namespace) -> int:
        from exq.profiling import profile

        prof = profile(
            a.model,
            a.corpus,
            a.tokens,
            seq_len=a.seq_len,
            batch_size=a.batch_size,
            dtype=a.dtype,
            device=a.device,
            progress=not a.quiet,
        )
        path = prof.save(a.output)
        written = [path, path.with_suffix(".npz")]
        if not a.no_plot:
            from exq.profiling.plot import plot_profile

            written.append(plot_profile(prof, path.with_suffix(".png")))
        if not a.quiet:
            print(_profile_table(prof))
            print("wrote " + ", ".join(map(str, written)))
        return 0

    return run


def _add_compile(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    p = sub.add_parser(
        "compile",
        help="allocate a format to every expert under an exact byte budget; emit layout and prefetch plan",
        description="Solve the precision allocation (a multiple-choice knapsack counted to the byte, scales and zero "
        "points included) from a routing profile and, when given, a measured sensitivity table; write a versioned "
        "plan with the layout permutation and prefetch schedule.",
    )
    p.add_argument("--profile", required=True, help="routing profile from `exq profile` (NAME.json)")
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
        default="expert",
        help="one format per expert, or per block (gate+up, down)",
    )
    p.add_argument("--solver", choices=["milp", "greedy"], default="milp")
    p.add_argument("--formats", help="candidate formats, comma-separated (default: all the runtime can run)")
    p.add_argument("--runtime", default="torch", help="where the plan must run (default torch)")
    p.add_argument("--include-shared", action="store_true", help="also allocate shared experts")
    p.add_argument("--include-attention", action="store_true", help="also allocate attention projections")
    p.add_argument(
        "--prefetch-candidates",
        type=_positive_int,
        default=8,
        help="successors kept per expert in the prefetch schedule (default 8)",
    )
    p.add_argument("--mip-gap", type=float, default=1e-4, help="relative optimality gap for milp (default 1e-4)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds for milp (default 60)")
    p.add_argument("--output", required=True, help="plan path (NAME.json)")

    def run(a: argparse.Namespace) -> int:
        from exq.compiler import Artifact, SensitivityTable, compile_plan
        from exq.compiler.budget import describe_bytes
        from exq.profiling import RoutingProfile

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
        )
        path = art.save(a.output)
        Artifact.load(path, model=prof.model)  # what we wrote must read back
        s = art.summary()
        print(
            f"cost source: {art.cost_source['kind']}; solver {sol.solver}: {sol.status}, objective {sol.objective:.6g},"
            f" bound {sol.bound:.6g}, gap {sol.gap:.2e}, {sol.seconds * 1e3:.1f} ms"
        )
        print(f"bytes: {describe_bytes(s['bytes'], s['params'])} of budget {a.budget} = {s['budget_bytes']:,}")
        print(f"units per format: {s['units_per_format']}")
        print(f"wrote {path}")
        return 0

    return run


def _add_diagnose(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
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


def _profile_table(prof) -> str:
    lines = [
        f"{prof.model['architecture']}: {prof.tokens} tokens over {len(prof.domains)} domain(s) "
        f"({', '.join(prof.domain_names)}), seq_len {prof.seq_len}",
        f"{'layer':>5} {'experts':>7} {'top-k':>5} {'H(share)/lnE':>12} {'H(token)':>9} {'max/uniform':>11} "
        f"{'unused':>6}",
    ]
    for s in prof.summary():
        lines.append(
            f"{s['layer_index']:>5} {s['num_experts']:>7} {s['top_k']:>5} {s['marginal_entropy_normalised']:>12.3f} "
            f"{s['mean_token_entropy']:>9.3f} {s['max_over_uniform_share']:>11.2f} {s['unused_experts']:>6}"
        )
    return "\n".join(lines)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(
        prog="exq",
        description="exq turns a Mixture-of-Experts LLM into a mixed-precision model fitted to its routing and its "
        "sensitivity, at an exact memory budget.",
    )
    parser.add_argument("--version", action="version", version=f"exq {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", title="stages", metavar="STAGE")
    commands = {"profile": _add_profile(sub), "compile": _add_compile(sub), "diagnose": _add_diagnose(sub)}
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    parser, commands = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return commands[args.command](args)
    except ExqError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"exq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
