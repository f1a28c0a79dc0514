"""Stage 4: fused mixed-precision MoE kernels (Triton). Needs the `gpu` extra; CPU runs use TRITON_INTERPRET=1.

Imports are lazy so that the compiler can read kernel configurations and tuned tables without Triton installed.
"""

from exq.kernels.configs import GemmConfig, GemvConfig

__all__ = ["GemmConfig", "GemvConfig", "KernelBlock", "fused_moe", "kernel_block", "kernel_blocks"]


def __getattr__(name: str):
    if name in ("KernelBlock", "fused_moe", "kernel_block", "kernel_blocks"):
        import importlib

        module = importlib.import_module("exq.kernels.moe_op")

        return getattr(module, name)
    raise AttributeError(f"module 'exq.kernels' has no attribute {name!r}")
