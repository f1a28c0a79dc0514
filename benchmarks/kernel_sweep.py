"""A targeted kernel sweep: `exq bench kernels`'s measurement with a short candidate list per batch size.

    python benchmarks/kernel_sweep.py --shapes olmoe-1b-7b qwen3-30b-a3b --tokens 1 4 16 64 256 1024 \
        --plans int4 mixed --output docs/bench/kernels_h100_v9.json

Per (shape, plan, T): the tuned table's configuration (when it has the cell), the GEMV configs at decode sizes (a
config per projection too, see `exq.bench.kernels.per_projection`) and a few tensor-core row blocks beyond, plus
the default rule (`exq_default_us`), each timed as `exq bench
kernels` times it (CUDA graph over 8 layers' weights, median of the replays, floors measured in the same run). The
output has the bench format, so `benchmarks/kernel_table.py` reads it. With --sglang-wheel SGLang's default and
tuned int4 configs are timed in the same run, as `exq bench kernels` does; this is the short-budget version of it.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from exq.bench import PLANS, SHAPES, group_quantized
from exq.kernels.configs import GemmConfig as G
from exq.kernels.configs import GemvConfig

MMA = [  # v18: (64, 2, 4, 3, 1), two groups per K step, mixed plan at T = 4; v21: deeper pipelines at T = 1
    GemvConfig(*c, mma=True)
    for c in (
        (32, 1, 4, 4, 1),
        (64, 1, 4, 4, 1),
        (64, 1, 4, 3, 2),
        (128, 1, 4, 3, 1),
        (64, 2, 4, 3, 1),
        (64, 1, 4, 6, 1),
        (64, 2, 4, 5, 1),
    )
]
# v19: both projections in one launch (mixed plan at T = 4: olmoe 60.4 vs 63.8 us, qwen3 50.4 vs 55.4); v21: down
# in 128-column items (qwen3 mixed T = 4 49.9 vs 51.7 us); v22: wider items for int4 at T = 4 (olmoe 47.7 / qwen3
# 39.0 vs 49.7 / 41.2 us, docs/bench/v22/one_launch_pairs_h100.json)
ONE_LAUNCH = [
    GemvConfig(64, 2, 4, 3, mma=True, one_launch=True),
    GemvConfig(64, 1, 4, 3, mma=True, one_launch=True),
    (GemvConfig(64, 2, 4, 3, mma=True, one_launch=True), GemvConfig(128, 1, 4, 3, mma=True, one_launch=True)),
    (GemvConfig(128, 2, 4, 3, mma=True, one_launch=True), GemvConfig(128, 1, 4, 3, mma=True, one_launch=True)),
    (GemvConfig(64, 4, 4, 3, mma=True, one_launch=True), GemvConfig(128, 2, 4, 3, mma=True, one_launch=True)),
]
# v22: the same with the pairs' items in expert order (DeepSeek mixed T = 4 64.5 vs 68.1 us; qwen3 up to 3 us slower,
# docs/bench/v22/one_launch_expert_order_h100.json)
ONE_LAUNCH += [
    tuple(replace(c, expert_order=True) for c in p) if isinstance(p, tuple) else replace(p, expert_order=True)
    for p in ONE_LAUNCH
]
# group-quantized layers only; v15: 3 stages on gate_up at T = 1 (olmoe 21.5, qwen3 19.0 us); v21: whole-K steps
# (16 groups, one load burst per program) for Mixtral's down at T = 1
CUDA_CORES = [
    GemvConfig(32, 4, 4, 2),
    GemvConfig(64, 2, 4, 2),
    GemvConfig(32, 2, 4, 2),
    GemvConfig(32, 4, 4, 3),
    GemvConfig(16, 16, 4, 1),
    # v22: one launch with the items in grid order, CUDA cores on gate_up (paired with the tensor-core one-launch
    # configs per projection)
    GemvConfig(32, 4, 4, 3, one_launch=True),
]


def _inline(c: G) -> G:
    return replace(c, inline_dispatch=True)


def _fold(c: G) -> G:
    return replace(c, fold_scales=True)


def _small(c: G, rows: int) -> G:  # v24: an expert's partial last block on a smaller tile
    return replace(c, small_m=rows)


TWO_GROUPS = [G(16, 128, 256, 4, 3), _inline(G(16, 128, 256, 4, 3))]  # v14: int4 decode tiles, K % 256 == 0
DECODE_TILES = [*TWO_GROUPS, G(16, 64, 128, 4, 4), _inline(G(16, 64, 128, 4, 4))]
BY_TOKENS = {  # the rows per expert decide; these are the configs that won or came close in the v9 sweep
    16: [G(16, 128, 128, 4, 3), G(16, 64, 128, 4, 4), _inline(G(16, 128, 128, 4, 3)), _inline(G(16, 64, 128, 4, 4)),
         MMA[3], MMA[2], _inline(G(16, 128, 128, 4, 4)), *TWO_GROUPS],
    64: [*TWO_GROUPS, G(32, 128, 256, 4, 3), G(16, 128, 128, 4, 3), G(16, 64, 128, 4, 4), G(32, 64, 128, 4, 3),
         G(64, 128, 128, 4, 3),
         _inline(G(16, 128, 128, 4, 3)), _inline(G(16, 64, 128, 4, 4)), _inline(G(32, 64, 128, 4, 3)),
         _inline(G(16, 64, 128, 4, 5)), _inline(G(16, 32, 128, 4, 4)), _inline(G(16, 128, 128, 4, 4)),
         _small(G(32, 128, 256, 4, 3), 16), _small(G(32, 128, 128, 4, 3), 16), _small(G(64, 128, 128, 4, 3), 16),
         _small(G(64, 128, 128, 4, 3), 32)],
    256: [*TWO_GROUPS, G(16, 128, 128, 4, 3), G(32, 64, 128, 4, 3), G(64, 64, 128, 4, 3), G(64, 128, 128, 4, 3),
          G(16, 64, 128, 4, 4), G(16, 128, 128, 4, 4), _inline(G(32, 128, 128, 4, 3)), G(32, 128, 128, 4, 3),
          _fold(G(64, 128, 64, 4, 3)), _fold(G(64, 128, 128, 4, 3)), _fold(G(128, 128, 64, 8, 3)),
          _small(G(32, 128, 128, 4, 3), 16), _small(G(64, 128, 128, 4, 3), 32),
          _small(_fold(G(128, 128, 64, 8, 3)), 64), _small(_fold(G(128, 128, 64, 8, 3)), 16),
          _small(_fold(G(64, 128, 64, 4, 3)), 16), _small(_fold(G(64, 128, 64, 4, 4)), 16)],
    1024: [G(64, 128, 128, 4, 3), G(128, 128, 64, 8, 3), _fold(G(128, 128, 64, 8, 3)), _fold(G(128, 128, 64, 8, 4)),
           _fold(G(64, 128, 64, 4, 4)), _fold(G(128, 64, 64, 4, 3)),
           _small(_fold(G(128, 128, 64, 8, 3)), 16), _small(_fold(G(128, 128, 64, 8, 3)), 64),
           _small(_fold(G(128, 128, 64, 8, 4)), 16), _small(_fold(G(64, 128, 64, 4, 4)), 16)],
    4096: [G(64, 128, 128, 4, 3), G(128, 256, 64, 8, 3), _fold(G(128, 128, 64, 8, 3)), _fold(G(128, 128, 64, 8, 4)),
           _fold(G(128, 256, 64, 8, 3)), _small(_fold(G(128, 128, 64, 8, 3)), 16),
           _small(_fold(G(128, 128, 64, 8, 3)), 64)],
}  # fmt: skip


def table_configs(table: dict | None, plan: str, tokens: int, shape) -> list:
    """The tuned table's config of one bench cell (none without a table or entry)."""
    from exq.kernels.tuning import config_from_dict

    if table is None:
        return []
    key = (next(n for n, s in SHAPES.items() if s == shape), plan, tokens)
    return [config_from_dict(e["config"]) for e in table["entries"]
            if (e.get("shape"), e["class"], e.get("tokens")) == key]  # fmt: skip


def candidates(table: dict | None):
    from exq.compiler.specialize import fit_config

    def pick(plan: str, tokens: int, shape) -> list:
        _, h, i, _ = shape
        out = table_configs(table, plan, tokens, shape)
        near = min(BY_TOKENS, key=lambda t: abs(t - tokens))
        # v22: tensor-core row blocks at decode sizes too; experts too big for L2 shared by several pairs (Mixtral at
        # T = 4) are read once per row block there, once per pair by the GEMVs
        decode = MMA + ONE_LAUNCH + (CUDA_CORES if group_quantized(plan) else []) + DECODE_TILES
        out += decode if tokens <= 4 else BY_TOKENS[near]
        if plan == "bf16":  # no int4 scales to fold: the same kernel
            out = [replace(c, fold_scales=False) if isinstance(c, G) else c for c in out]

        # each projection's K step fitted to its own K (a pair where they differ), as pass D fits the table's
        return list(dict.fromkeys(fit_config(c, h, i) for c in out))

    return pick


def dispatch_variants(table: dict):
    """The table's config of each cell and the same tiles with the other dispatch (inline <-> a dispatch launch) on
    each GEMM projection: what to re-time when the dispatch itself changed (v27), without a whole sweep."""
    from exq.kernels.configs import INLINE_DISPATCH_PAIRS

    def flip(c, pairs: int):
        if not isinstance(c, G) or (not c.inline_dispatch and (c.small_m or pairs > INLINE_DISPATCH_PAIRS)):
            return c
        return replace(c, inline_dispatch=not c.inline_dispatch)

    def pick(plan: str, tokens: int, shape) -> list:
        pairs = tokens * shape[3]
        out = []
        for c in table_configs(table, plan, tokens, shape):
            out += [c, tuple(flip(x, pairs) for x in c) if isinstance(c, tuple) else flip(c, pairs)]
        return list(dict.fromkeys(out))

    return pick


def main() -> None:
    import torch

    from exq.bench.kernels import run
    from exq.kernels.tuning import packaged_tables

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["olmoe-1b-7b", "qwen3-30b-a3b"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 256, 1024])
    ap.add_argument("--plans", nargs="+", choices=list(PLANS), default=["int4", "mixed"])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--output", type=Path, default=Path("runs/bench/kernel_sweep.json"))
    ap.add_argument("--sglang-wheel", default=None, help="time SGLang's Triton int4 path too (default + tuned)")
    ap.add_argument("--dispatch-variants", action="store_true",
                    help="only the table's config per cell and its tiles with the other dispatch")  # fmt: skip
    a = ap.parse_args()
    table = packaged_tables().get(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    if a.dispatch_variants and table is None:
        raise SystemExit("--dispatch-variants re-times the tuned table's cells: this GPU has no table")
    pick = dispatch_variants(table) if a.dispatch_variants else candidates(table)
    run(a.shapes, a.tokens, 8, a.reps, a.sglang_wheel, a.output, tuple(a.plans), pick)


if __name__ == "__main__":
    main()
