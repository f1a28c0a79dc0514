"""Turn `exq bench kernels` results into a tuned kernel table (exq/kernels/tuned/NAME.json).

    python benchmarks/kernel_table.py docs/bench/kernels_h100_{olmoe_qwen3,decode_v3,dsv2lite_mixtral,splitk_v5}.json \
        docs/bench/kernels_h100_decode_v6{,_dsv2_mixtral}.json docs/bench/kernels_h100_{gemm_v7,decode_v8}.json \
        --output exq/kernels/tuned/h100.json

Every (shape, plan, tokens) cell whose best configuration is known becomes an entry (one config, or a (gate_up,
down) pair; where the default rule won: its configurations as the run recorded them, `exq_default_config`, else
the best swept one from `exq_sweep`), keyed by the layer class and the rows per active expert of that run
(uniform routing: E_active = E (1 - (1 - k/E)^T)). Files later on the command line override earlier ones for the
same cell (newer kernels); files after --if-faster replace a cell only with a faster time (a targeted run that
timed a few candidates must not replace a full sweep's better pick); experiment files stay out (their configs may
no longer exist). Only the plans that are table classes (int4, mixed, bf16) make entries, each with its shape's sizes
(pass D's lookup weighs them). --base starts from an existing table's cells (its sources are not re-read), so a
targeted run can update a shipped table; a schema-1 base (entries without sizes) is upgraded on the way:

    python benchmarks/kernel_table.py --base exq/kernels/tuned/h100.json --if-faster docs/bench/NEW.json \
        --output exq/kernels/tuned/h100.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from exq.bench.report import read_result
from exq.errors import ExqError
from exq.fileio import atomic_write_bytes, read_json
from exq.kernels.tuning import table_from_results, upgraded_table, validate_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="*", type=Path)
    ap.add_argument("--base", type=Path, default=None, help="an existing table whose cells the results update")
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--if-faster", nargs="+", type=Path, default=[], help="results that replace a cell only if faster")
    a = ap.parse_args()
    if not a.results and not a.if_faster and a.base is None:
        raise SystemExit("no benchmark results given: name `exq bench kernels` / kernel_sweep.py JSON files")
    try:
        build(a)
    except ExqError as err:  # a missing or malformed input file: its message, not a traceback
        raise SystemExit(f"error: {err}") from err


def build(a: argparse.Namespace) -> None:
    base = None
    if a.base is not None:
        base = validate_table(upgraded_table(read_json(a.base, "kernel table"), str(a.base)), str(a.base))
    results = [(p.name, read_result(p)) for p in a.results + a.if_faster]
    table = table_from_results(results, base, if_faster=tuple(p.name for p in a.if_faster))
    atomic_write_bytes(a.output, (json.dumps(table, indent=1) + "\n").encode())
    print(f"wrote {a.output}: {len(table['entries'])} entries for {table['gpu']}")


if __name__ == "__main__":
    main()
