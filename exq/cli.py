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
    commands = {"profile": _add_profile(sub)}
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
