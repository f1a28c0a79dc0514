"""Pass D, layer specialisation: each layer's kernel configuration per batch size, chosen from its routing.

How many rows an expert's weights serve in one step decides the kernel: while most experts see about one token a
GEMV path that skips dispatch wins, a few tokens want small tensor-core row blocks, many want large tiles (measured:
docs/perf-notes.md). With a profile we know how skewed each layer's routing is, so for a batch of T tokens the
expected number of distinct experts touched is sum_e 1 - (1 - q_e)^T (q_e: the chance a token picks expert e, its
share of routed slots times top-k) and rows per active expert = T k / that. Skewed layers reach large row blocks at
smaller T than uniform ones. The choice itself comes from a tuned table per GPU and layer class (exq.kernels.tuning).
"""

from __future__ import annotations

import dataclasses

import numpy as np

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def rows_per_active_expert(shares: np.ndarray, top_k: int, tokens: int) -> float:
    q = np.clip(np.asarray(shares, dtype=np.float64) * top_k, 0.0, 1.0)
    active = float(np.sum(1.0 - (1.0 - q) ** tokens))
    return tokens * top_k / max(active, 1e-9)


def fit_config(cfg, gate_up_in: int, down_in: int):
    """The table's config adjusted to this layer's reduction sizes, each projection to its own (gate_up reduces over
    the hidden size, down over the intermediate size; a K step must divide its K): one config when both come out
    the same, else a (gate_up, down) pair. v16 (H100, DeepSeek-V2-Lite, I = 1408 = 11 x 128): gate_up keeps the
    two-group K step that down cannot take, 4-6 % faster at T = 16 / 64 than halving both."""
    if isinstance(cfg, tuple):
        return _fit_one(cfg[0], gate_up_in), _fit_one(cfg[1], down_in)
    gate_up, down = _fit_one(cfg, gate_up_in), _fit_one(cfg, down_in)
    return gate_up if gate_up == down else (gate_up, down)


def _fit_one(cfg, k_in: int):
    from exq.kernels.configs import GemvConfig

    if isinstance(cfg, GemvConfig):
        g, split = cfg.groups_per_step, cfg.split_k
        while g > 1 and k_in % (128 * g * split):
            g //= 2
        while split > 1 and k_in % (128 * g * split):
            split -= 1
        return dataclasses.replace(cfg, groups_per_step=g, split_k=split)
    k = cfg.block_k
    while k > 16 and k_in % k:
        k //= 2
    return dataclasses.replace(cfg, block_k=k)


def specialize(structure: dict, experts: list[dict], routing: list[list[float]] | None, tables: dict) -> dict:
    """{gpu: [per MoE layer: {"class", "configs": {T: config dict}} or None (no table class: the layer runs in
    torch, or with int3 experts on the op's default rule)]}."""
    from exq.kernels.tuning import choose, config_to_dict, layer_class

    out = {}
    for gpu, table in tables.items():
        layers = []
        for li, meta in enumerate(structure["moe_layers"]):
            cls = layer_class(set(experts[li]["gate_up"]) | set(experts[li]["down"]))
            if cls is None or meta["hidden_size"] % 128 or meta["intermediate_size"] % 128:
                layers.append(None)
                continue
            e, k = int(meta["num_experts"]), int(meta["top_k"])
            dims = (e, int(meta["hidden_size"]), int(meta["intermediate_size"]), k)
            shares = np.asarray(routing[li]) if routing is not None else np.full(e, 1.0 / e)
            configs = {}
            for t in BATCH_SIZES:
                cfg = choose(table, cls, rows_per_active_expert(shares, k, t), dims, t)
                if cfg is not None:
                    configs[str(t)] = config_to_dict(fit_config(cfg, meta["hidden_size"], meta["intermediate_size"]))
            layers.append({"class": cls, "configs": configs} if configs else None)
        out[gpu] = layers
    return out
