"""`exq bench kernels`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from exq.commands.common import positive_int


def add(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    from exq.bench import DEFAULT_PLANS, PLANS, SHAPES, TOKENS

    p = sub.add_parser(
        "bench",
        help="kernel benchmarks against the HBM floor, SGLang's Triton INT4 path and bf16 (needs a GPU)",
        description="Time exq's fused MoE op per layer in CUDA graphs over several layers' weights, for all-INT4, "
        "all-BF16 and a mixed plan (10 % bf16, 20 % int8, 70 % int4), with floors measured in the same run.",
    )
    p.add_argument("what", choices=["kernels"])
    p.add_argument(
        "--shapes",
        nargs="+",
        default=list(SHAPES),
        metavar="SHAPE",
        help=f"layer shapes: {', '.join(SHAPES)} (default: all four), experts,hidden,intermediate,top_k sizes "
        "(NAME=60,2048,1408,4 names them), or a model: a checkpoint folder or hub id (its MoE layers' sizes, read "
        "from its config)",
    )
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
    p.add_argument(
        "--table",
        help="also write the run's winning configs as a kernel table (one GPU; an existing table of that GPU is "
        "updated, this run's cells replacing its own) for `exq compile --kernel-table`",
    )

    def run(a: argparse.Namespace) -> int:
        from exq.bench import report
        from exq.bench.kernels import run as bench
        from exq.bench.shapes import resolve_shapes
        from exq.errors import ExqError
        from exq.fileio import atomic_write_bytes
        from exq.kernels.tuning import load_table, table_from_results

        if a.layers < 8:
            raise ExqError("--layers must be at least 8 so that weights stream from HBM, not L2")
        shapes = resolve_shapes(a.shapes)  # a bad spec fails here, before any GPU work
        base = load_table(a.table) if a.table and Path(a.table).exists() else None
        if base is not None:
            import torch

            gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
            if gpu is not None and base["gpu"] != gpu:
                raise ExqError(f"kernel table {a.table} is for {base['gpu']}, this GPU is {gpu}", "one table per GPU")
        out = Path(a.output)
        result = bench(shapes, a.tokens, a.layers, a.reps, a.sglang_wheel, out, a.plans)
        md = report.markdown(result)
        atomic_write_bytes(out.with_suffix(".md"), (md + "\n").encode())
        report.plot(result, out.with_suffix(".png"))
        print(md)
        if a.table:
            table = table_from_results([(out.name, result)], base)
            atomic_write_bytes(Path(a.table), (json.dumps(table, indent=1) + "\n").encode())
            print(f"kernel table {a.table}: {len(table['entries'])} entries for {table['gpu']}")
        return 0

    return run
