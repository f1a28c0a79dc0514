"""Benchmarks that ship as commands (`exq bench ...`): measured against floors taken in the same run."""

SHAPES = {  # (experts, hidden, intermediate, top_k)
    "olmoe-1b-7b": (64, 2048, 1024, 8),
    "qwen3-30b-a3b": (128, 2048, 768, 8),
    "mixtral-8x7b": (8, 4096, 14336, 2),
    "deepseek-v2-lite": (64, 2048, 1408, 6),
}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
PLANS = {
    "int4": {"int4": 1.0},
    "mixed": {"bf16": 0.1, "int8": 0.2, "int4": 0.7},
    "bf16": {"bf16": 1.0},
    # int3 experts in the same op (not among the three plans, so not timed unless asked for)
    "int3": {"int3": 1.0},
    "mixed-int3": {"bf16": 0.1, "int8": 0.2, "int4": 0.4, "int3": 0.3},
}
DEFAULT_PLANS = ("int4", "mixed", "bf16")


def group_quantized(plan: str) -> bool:
    """Only group-quantized experts: the plans whose sweeps also time the CUDA-core GEMV (far slower with bf16 /
    int8 experts)."""
    from exq.formats import FORMATS

    return all(FORMATS[f].group_size for f in PLANS[plan])
