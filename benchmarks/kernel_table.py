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

import numpy as np

from exq.bench import SHAPES
from exq.bench.report import read_result
from exq.compiler.specialize import rows_per_active_expert
from exq.errors import ExqError, FormatError
from exq.fileio import atomic_write_bytes, read_json
from exq.kernels.tuning import (
    CLASSES,
    DIMS,
    TABLE_FORMAT,
    TABLE_SCHEMA,
    config_to_dict,
    parse_bench_config,
    validate_table,
)


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


def _dims(shape: str) -> dict:
    if shape not in SHAPES:
        raise FormatError(f"shape {shape!r} is not one of exq bench's shapes ({', '.join(SHAPES)})")
    return dict(zip(DIMS, SHAPES[shape], strict=True))


def _upgraded(t: dict, path: Path) -> dict:
    """A schema-1 table (entries without their layer's sizes) as schema 2: the sizes of the bench shape each
    entry names."""
    if isinstance(t, dict) and t.get("schema_version") == 1 and isinstance(t.get("entries"), list):
        try:
            entries = [e | {"dims": _dims(e["shape"])} for e in t["entries"]]
        except (KeyError, TypeError) as err:
            raise FormatError(f"{path}: an entry without its shape ({err})", "rebuild it from the results") from err
        return t | {"schema_version": TABLE_SCHEMA, "entries": entries}
    return t


def build(a: argparse.Namespace) -> None:
    cells, gpu, sources = {}, None, []
    if a.base is not None:
        base = validate_table(_upgraded(read_json(a.base, "kernel table"), a.base), str(a.base))
        gpu, sources = base["gpu"], list(base["source"])
        cells = {(e["shape"], e["class"], e["tokens"]): e for e in base["entries"]}
    for path in a.results + a.if_faster:
        r = read_result(path)
        gpu = gpu or r["device"]
        if r["device"] != gpu:
            raise SystemExit(f"{path} was measured on {r['device']}, not {gpu}")
        for row in r["rows"]:
            if row["plan"] not in CLASSES:  # e.g. the int3 plans: their layers share the "mixed" class
                continue
            cfg, us = parse_bench_config(row.get("exq_config")), row["exq_us"]
            if cfg is None and row.get("exq_default_config"):  # the default rule won: its configs (as recorded)
                gu, dn = (parse_bench_config(n) for n in row["exq_default_config"])
                cfg = gu if gu == dn else (gu, dn)
            if cfg is None and row.get("exq_sweep"):  # a run that did not record them: the best swept config
                name, us = min(row["exq_sweep"].items(), key=lambda kv: kv[1])
                cfg = parse_bench_config(name)
            if cfg is None:
                continue
            dims = _dims(row["shape"])
            uniform = np.full(dims["experts"], 1.0 / dims["experts"])  # the benchmark's routing
            key = (row["shape"], row["plan"], row["tokens"])
            if path in a.if_faster and key in cells and cells[key]["us"] <= us:
                continue
            cells[key] = {
                "class": row["plan"],
                "shape": row["shape"],
                "tokens": row["tokens"],
                "rows_per_expert": round(rows_per_active_expert(uniform, dims["top_k"], row["tokens"]), 4),
                "dims": dims,
                "config": config_to_dict(cfg),
                "us": round(us, 2),
            }
    table = {
        "format": TABLE_FORMAT,
        "schema_version": TABLE_SCHEMA,
        "gpu": gpu,
        "source": sources + [p.name for p in a.results + a.if_faster],
        "entries": sorted(cells.values(), key=lambda c: (c["class"], c["rows_per_expert"], c["shape"])),
    }
    validate_table(table, str(a.output))
    atomic_write_bytes(a.output, (json.dumps(table, indent=1) + "\n").encode())
    print(f"wrote {a.output}: {len(cells)} entries for {gpu}")


if __name__ == "__main__":
    main()
