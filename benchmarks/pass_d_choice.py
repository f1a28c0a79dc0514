"""How good are pass D's kernel picks, on the shapes the table was tuned on and on shapes it never saw? (GPU only.)

Pass D (`exq.compiler.specialize`) plans each layer's configs from a tuned table (`exq.kernels.tuning.choose`). Per
(shape, plan, tokens) cell, this times in the same CUDA-graph measurement as `exq bench kernels` (8 layers'
weights, median of the replays, best of two rounds in alternating order):

- `best_us`: the table's own entry for the cell (the best of the sweep that built it, when run on that GPU);
- `planned_us` / `unseen_us`: what pass D plans (`choose`) from the whole table / with every entry of this shape
  left out (a model the table never saw);
- `rows_only_us` / `rows_only_unseen_us`: the same with the rule before v20 (nearest in rows per active expert
  alone, ties to the first entry listed);
- `same_shape_us`: the entry of this shape nearest in rows (v20, not taken: 7.5 % off between the table's T);
- `sizes_unseen_us`: the entry of other shapes nearest in rows, pairs and layer sizes (log distance, sizes at half
  weight; v20, not taken: up to 3.2x off on Mixtral);
- `default_us`: the op's default rule (what a GPU without a table gets).

Configs that coincide are timed once. Uniform routing, as the table's cells were measured. Each row also names the
fastest config it timed in the fields `exq bench kernels` results have (`exq_config` / `exq_us`, or the default
rule's `exq_default_config`; `exq_sweep`), so `benchmarks/kernel_table.py --if-faster` can add the cells to a table.

    python benchmarks/pass_d_choice.py --shapes olmoe-1b-7b qwen3-30b-a3b deepseek-v2-lite mixtral-8x7b \
        --tokens 1 4 16 64 256 1024 --plans int4 mixed bf16 --output runs/bench/pass_d_choice.json

(docs/bench/v20/pass_d_choice_h100.json holds the H100 runs: the commands and the data.)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from exq.bench import PLANS, SHAPES
from exq.fileio import atomic_write_bytes


def rows_only(table: dict, cls: str, rows: float):
    """The lookup before v20: nearest entry in log rows per active expert, ties to the first listed."""
    from exq.kernels.tuning import config_from_dict

    entries = [e for e in table["entries"] if e["class"] == cls]
    if not entries:
        return None
    return config_from_dict(min(entries, key=lambda e: abs(math.log(e["rows_per_expert"]) - math.log(rows)))["config"])


def same_shape(table: dict, cls: str, rows: float, dims: tuple[int, int, int, int]):
    """Measured and not taken (v20): the entry measured on a layer of these sizes nearest in log rows."""
    from exq.kernels.tuning import DIMS

    mine = [e for e in table["entries"] if e["dims"] == dict(zip(DIMS, dims, strict=True))]
    return rows_only({**table, "entries": mine}, cls, rows)


def nearest_by_sizes(table: dict, cls: str, rows: float, dims: tuple[int, int, int, int], tokens: int):
    """Measured and not taken (v20): the class's entry nearest in log rows, log pairs and half the log distance of
    the hidden and intermediate sizes, whatever shape it was measured on."""
    from exq.kernels.tuning import config_from_dict

    entries = [e for e in table["entries"] if e["class"] == cls]
    if not entries:
        return None
    _, hidden, inter, k = dims

    def distance(e: dict) -> float:
        d = e["dims"]
        return (
            abs(math.log(e["rows_per_expert"] / rows))
            + abs(math.log(e["tokens"] * d["top_k"] / (tokens * k)))
            + 0.5 * abs(math.log(d["hidden"] / hidden))
            + 0.5 * abs(math.log(d["intermediate"] / inter))
        )

    return config_from_dict(min(entries, key=distance)["config"])


def picks(table: dict, name: str, plan: str, tokens: int) -> dict:
    """Each rule's config for one cell (None: the rule has no entry and the op's default rule picks)."""
    import numpy as np

    from exq.compiler.specialize import fit_config, rows_per_active_expert
    from exq.kernels.tuning import choose, config_from_dict, layer_class

    e, h, i, k = SHAPES[name]
    cls = layer_class({f for f, share in PLANS[plan].items() if share > 0})
    rows = rows_per_active_expert(np.full(e, 1.0 / e), k, tokens)
    unseen = {**table, "entries": [x for x in table["entries"] if x["shape"] != name]}
    own = [x for x in table["entries"] if (x["shape"], x["class"], x["tokens"]) == (name, cls, tokens)]
    out = {
        "best": config_from_dict(own[0]["config"]) if own else None,
        "planned": choose(table, cls, rows, (e, h, i, k), tokens),
        "unseen": choose(unseen, cls, rows, (e, h, i, k), tokens),
        "rows_only": rows_only(table, cls, rows),
        "rows_only_unseen": rows_only(unseen, cls, rows),
        "same_shape": same_shape(table, cls, rows, (e, h, i, k)),
        "sizes_unseen": nearest_by_sizes(unseen, cls, rows, (e, h, i, k), tokens),
    }
    return {key: None if c is None else fit_config(c, h, i) for key, c in out.items()}


def table_fields(times: dict[str, float], plan: str, tokens: int, shape) -> dict:
    """The fastest of the timed configs ({name or "default": us}) as a benchmark result records its best."""
    from exq.bench.kernels import config_name, default_configs

    fastest = min(times, key=times.__getitem__)
    return {
        "exq_us": times[fastest],
        "exq_config": None if fastest == "default" else fastest,
        "exq_default_config": [config_name(c) for c in default_configs(plan, tokens, shape)],
        "exq_sweep": {name: us for name, us in times.items() if name != "default"},
    }


def main() -> None:
    import torch

    from exq.bench.kernels import config_name, graph_time_us, layer_stack, measure_floors, routing, touched_bytes
    from exq.kernels import fused_moe
    from exq.kernels.tuning import packaged_tables

    tables = packaged_tables()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=next(iter(tables), None), help=f"a packaged table's GPU: {sorted(tables)}")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["olmoe-1b-7b", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 256, 1024])
    ap.add_argument("--plans", nargs="+", choices=list(PLANS), default=["int4", "mixed", "bf16"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--output", type=Path, default=Path("runs/bench/pass_d_choice.json"))
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("pass_d_choice.py times CUDA kernels: run it on a machine with a GPU")
    if a.table not in tables:
        raise SystemExit(f"no packaged kernel table for {a.table!r}; packaged: {sorted(tables)}")
    if min(a.tokens) < 1 or a.reps < 1:
        raise SystemExit(f"--tokens and --reps must be at least 1, got {a.tokens} and {a.reps}")
    floors = measure_floors()
    rows = []
    for name in a.shapes:
        e, h, i, k = SHAPES[name]
        for plan in a.plans:
            mods = layer_stack(name, plan)
            for t in a.tokens:
                chosen = picks(tables[a.table], name, plan, t)
                named = {key: (config_name(c), c) for key, c in chosen.items() if c is not None}
                named["default"] = ("default", None)  # config None: the op's default rule
                distinct = dict(named.values())
                x = torch.randn(t, h, dtype=torch.bfloat16, device="cuda")
                routes = [routing(t, e, k, seed=1000 * t + s) for s in range(8)]
                times: dict[str, float] = {}
                for order in (list(distinct), list(distinct)[::-1]):  # two rounds, alternating order
                    for cname in order:
                        c = distinct[cname]

                        def step(j, c=c, x=x, routes=routes, mods=mods):
                            return fused_moe(x, *routes[j], mods[j], config=c)

                        us = graph_time_us(step, 8, a.reps)
                        times[cname] = min(times.get(cname, math.inf), us)
                touched = sum(touched_bytes(m, r[1], h, i) for m, r in zip(mods, routes, strict=True)) / len(mods)
                floor = 1e6 * touched / floors.copy_bytes_per_s
                row = {"shape": name, "plan": plan, "tokens": t, "hbm_floor_us": floor}
                for key in [*chosen, "default"]:
                    cname = named[key][0] if key in named else None
                    row[key + "_config"] = cname
                    row[key + "_us"] = None if cname is None else times[cname]
                row |= table_fields(times, plan, t, (e, h, i, k))
                print(json.dumps(row), flush=True)
                rows.append(row)
            del mods
            torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "table": a.table, "copy_bytes_per_s": floors.copy_bytes_per_s,
           "rows": rows}  # fmt: skip
    a.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(a.output, json.dumps(out, indent=1).encode())


if __name__ == "__main__":
    main()
