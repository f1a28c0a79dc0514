"""`exq bench kernels`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from exq.commands.common import positive_int


def add(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from exq.bench import DEFAULT_PLANS, PLANS, SHAPES, TOKENS

    p = sub.add_parser(
        "bench",
        help="kernel benchmarks against the HBM floor, SGLang's Triton INT4 path and bf16 (needs a GPU)",
        description="Time exq's fused MoE op per layer in CUDA graphs over several layers' weights, for all-INT4, "
        "all-BF16 and a mixed plan (10 %% bf16, 20 %% int8, 70 %% int4), with floors measured in the same run.",
    )
    p.add_argument("what", choices=["kernels"])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--tokens", nargs="+", type=positive_int, default=list(TOKENS))
    p.add_argument(
        "--plans",
        nargs="+",
        choices=list(PLANS),
        default=list(DEFAULT_PLANS),
        help="format plans to time (int3 / mixed-int3 only when named)",
    )
    p.add_argument("--layers", type=positive_int, default=8, help="distinct layers per CUDA graph (default 8)")
    p.add_argument("--reps", type=positive_int, default=50, help="graph replays; the median is reported")
    p.add_argument("--sglang-wheel", help="an sglang wheel (pip download sglang --no-deps) for the INT4 baseline")
    p.add_argument("--output", default="runs/bench/kernels.json", help="JSON (a .md table and a .png beside it)")

    def run(a: argparse.Namespace) -> int:
        from exq.bench import report
        from exq.bench.kernels import run as bench
        from exq.errors import ExqError
        from exq.fileio import atomic_write_bytes

        if a.layers < 8:
            raise ExqError("--layers must be at least 8 so that weights stream from HBM, not L2")
        out = Path(a.output)
        result = bench(a.shapes, a.tokens, a.layers, a.reps, a.sglang_wheel, out, a.plans)
        md = report.markdown(result)
        atomic_write_bytes(out.with_suffix(".md"), (md + "\n").encode())
        report.plot(result, out.with_suffix(".png"))
        print(md)
        return 0

    return run
