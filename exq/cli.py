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


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[[argparse.Namespace], int]]]:
    parser = argparse.ArgumentParser(
        prog="exq",
        description="exq turns a Mixture-of-Experts LLM into a mixed-precision model fitted to its routing and its "
        "sensitivity, at an exact memory budget.",
    )
    parser.add_argument("--version", action="version", version=f"exq {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", title="stages", metavar="STAGE")
    from exq.commands import bench, compiler, evaluate, profile, quantize, serve

    commands = {
        "profile": profile.add(sub),
        "sensitivity": quantize.add_sensitivity(sub),
        "compile": compiler.add_compile(sub),
        "quantize": quantize.add_quantize(sub),
        "eval": evaluate.add(sub),
        "diagnose": compiler.add_diagnose(sub),
        "bench": bench.add(sub),
        "serve": serve.add(sub),
    }
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
