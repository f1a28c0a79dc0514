"""Kernel configurations and the formats the kernels read (no Triton needed: the compiler and tables use them)."""

from __future__ import annotations

from dataclasses import dataclass

# format name -> the code the kernels branch on (moe_op.KernelBlock.fmt_slot's top byte)
KERNEL_FORMATS = {"bf16": 0, "int8": 1, "int4": 2, "int4-asym": 3, "int3": 4, "int3-asym": 5}
# the candidate formats when `exq serve` quantizes for a GPU: int3 experts run in the fused op too, but a layer of
# them takes 2.0-2.4x the int4 layer's time (v15, H100, olmoe shape, T = 1-1024), so plans reach for int3 only when
# asked (--formats)
SERVING_FORMATS = ("bf16", "int8", "int4", "int4-asym")

# GemmConfig.inline_dispatch applies up to this many (token, slot) pairs, the op dispatches as usual beyond: each
# program reads all the ids, so its prologue grows with them (measured a wash at 512 pairs, a gain at <= 256)
INLINE_DISPATCH_PAIRS = 1024

# the tensor-core GEMM walks its 1-D grid a row block at a time (all column tiles of one block, then the next);
# when one expert's weights for a projection exceed GROUP_WEIGHT_BYTES, the next block of the same expert would
# re-read them from HBM, so GROUP_ROW_BLOCKS blocks take each column tile together instead. Measured on Mixtral
# (v12): 1.10x at T = 64 (16-row blocks), 1.10x mixed at T = 256 (64-row); with 128-row blocks (T = 1024) a wash
# for int4 and 0.87x for the mixed plan, so not past GROUP_MAX_BLOCK_M
GROUP_WEIGHT_BYTES = 16 << 20
GROUP_ROW_BLOCKS = 8
GROUP_MAX_BLOCK_M = 64

# the down GEMM sums top-k in its epilogue (the last program per token and column tile) for row blocks up to this
# size; bigger tiles keep the separate sum: at one CTA per SM the epilogue's store -> fence -> count -> reload runs
# exposed in every program (v17, H100: the 128-row tile 8-15 % slower at T = 1024-4096 with it)
TOPK_SUM_MAX_BLOCK_M = 32

# the down GEMM (row blocks up to this size) is launched as a programmatic dependent of gate_up on Hopper: its
# launch and its programs' start overlap gate_up's last programs, and each waits for gate_up's end in its first
# instruction. v26 (H100, table configs, same process): 0.2-1.7 % faster at T = 16-256 in all 18 cells measured
# (olmoe / qwen3 / DeepSeek, int4 and mixed) and again in a second run; with 128-row blocks (T = 1024) 0.4-3.1 %
# slower in 5 of 6; for experts that outgrow L2 (Mixtral, T = 16-256) -0.3 to +1.3 %, so not for those either
PDL_MAX_BLOCK_M = 64

# GemvConfig.expert_order ranks the pairs in every program ([pairs, pairs] comparisons); beyond this many pairs the
# items keep pair order (one launch is measured slower from 48 pairs anyway, v19)
EXPERT_ORDER_MAX_PAIRS = 64


@dataclass(frozen=True)
class GemmConfig:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128  # a divisor of 128, or a multiple: several groups per K iteration (the int4 decode tiles)
    num_warps: int = 4
    num_stages: int = 3
    inline_dispatch: bool = False  # each program finds its pairs in topk_ids: no dispatch launch (<= 1024 pairs)
    # int4 group scales multiplied into the decoded weights (in the dot type) so the dot accumulates in place: one
    # [BM, BN] accumulator instead of two, which the big prefill tiles need
    fold_scales: bool = False
    # > 0 (dispatched blocks only): a block whose real rows fit in its first small_m (an expert's last, partial
    # block) runs a small_m-row tile instead, a power of two below block_m. v24 (H100, grouped int4 GEMMs under
    # random routing): the 128-row tile with 16- or 64-row partial blocks 3-10 % faster at T = 1024, the 32-row one
    # with 16 5-6 % at T = 256
    small_m: int = 0

    @property
    def k_step(self) -> int:
        """The inputs one K step covers: a projection's in_features must be a multiple."""
        return self.block_k

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class GemvConfig:
    """The decode path: one program per (pair, column tile), CUDA-core FMAs, no dispatch."""

    block_n: int = 64
    groups_per_step: int = 2  # K step = 128 x this (mma: int4 / int3 experts; bf16 / int8 ones step 128 inside it)
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1  # > 1: K cut in this many parts, partial sums finished by a reduce kernel
    mma: bool = False  # the dot product on tensor cores (a 16-row tile holding the pair's row), not CUDA cores
    # gate_up and down in one launch (`moe_decode_kernel`): set on both projections' configs, which then share
    # num_warps / num_stages (gate_up's) and take no split_k
    one_launch: bool = False
    # one launch only: the pairs' work items in expert order (a rank computed in every program, up to
    # EXPERT_ORDER_MAX_PAIRS pairs), so pairs that share an expert read its weights back to back, the second from L2
    expert_order: bool = False

    @property
    def k_step(self) -> int:
        """The inputs one program's K steps cover over all splits: a projection's in_features must be a multiple."""
        return 128 * self.groups_per_step * self.split_k

    def as_dict(self) -> dict:
        return dict(vars(self))


Config = GemmConfig | GemvConfig
