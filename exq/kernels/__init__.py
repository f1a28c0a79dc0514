"""Stage 4: fused mixed-precision MoE kernels (Triton). Needs the `gpu` extra; CPU runs use TRITON_INTERPRET=1."""

from exq.kernels.fused_moe import GemmConfig, GemvConfig, KernelBlock, fused_moe, kernel_block, kernel_blocks

__all__ = ["GemmConfig", "GemvConfig", "KernelBlock", "fused_moe", "kernel_block", "kernel_blocks"]
