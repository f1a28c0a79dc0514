"""SGLang's Triton INT4 MoE path, loaded at benchmark time from an `sglang` wheel (never vendored).

`pip download sglang --no-deps` gives the wheel; we read two modules' source from it, take the functions the INT4
path runs (`fused_moe_kernel_gptq_awq`, the helper it calls, and `get_default_config`) and compile them in a small
namespace. That avoids importing SGLang (which needs its CUDA extension and ~20 packages) while running its kernel
code unchanged, launched with the arguments `invoke_fused_moe_kernel` passes for `use_int4_w4a16=True,
block_shape=[0, 128]`.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import torch

from exq.errors import ExqError

KERNEL_MODULE = "sglang/kernels/ops/moe/fused_moe_triton_kernels.py"
CONFIG_MODULE = "sglang/srt/layers/moe/moe_runner/triton_utils/fused_moe_triton_config.py"


def _functions(source: str, names: set[str]) -> str:
    tree = ast.parse(source)
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    missing = names - {n.name for n in keep}
    if missing:
        raise ExqError(f"the sglang wheel has no {', '.join(sorted(missing))}; its layout changed", _FIX)
    return "\n\n".join(ast.get_source_segment(source, n, padded=False) for n in keep)


_FIX = "pass a wheel from `pip download sglang==0.5.23 --no-deps` (the version the benchmark was written against)"


def load(wheel: str | Path) -> types.SimpleNamespace:
    try:
        with zipfile.ZipFile(wheel) as z:
            missing = [m for m in (KERNEL_MODULE, CONFIG_MODULE) if m not in z.namelist()]
            if missing:
                raise ExqError(f"{wheel} has no {', '.join(missing)}: not an sglang wheel of a known layout", _FIX)
            kernels = z.read(KERNEL_MODULE).decode()
            config = z.read(CONFIG_MODULE).decode()
    except FileNotFoundError:
        raise ExqError(f"no sglang wheel at {wheel}", _FIX) from None
    except zipfile.BadZipFile:
        raise ExqError(f"{wheel} is not a wheel (not a zip archive)", _FIX) from None
    # ast drops decorators from get_source_segment of the def line; re-apply triton.jit to the kernels
    src = _functions(kernels, {"write_zeros_to_output", "fused_moe_kernel_gptq_awq"})
    src = src.replace("def write_zeros_to_output", "@triton.jit\ndef write_zeros_to_output")
    src = src.replace("def fused_moe_kernel_gptq_awq", "@triton.jit\ndef fused_moe_kernel_gptq_awq")
    # triton.jit reads its source from a real module file
    path = Path(tempfile.mkdtemp(prefix="exq-sglang-")) / "sglang_int4_moe.py"
    path.write_text("import triton\nimport triton.language as tl\n\n" + src)
    spec = importlib.util.spec_from_file_location("exq_sglang_int4_moe", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    cfg_ns: dict = {
        "Optional": object,
        "List": object,
        "Dict": object,
        "_is_hip": False,
        "_use_low_smem_fp8_default": lambda: False,
        "get_exec": lambda: types.SimpleNamespace(
            deterministic=types.SimpleNamespace(enable_deterministic_inference=False)
        ),
    }
    exec(_functions(config, {"get_default_config"}), cfg_ns)
    return types.SimpleNamespace(
        kernel=mod.fused_moe_kernel_gptq_awq, default_config=cfg_ns["get_default_config"], version=Path(wheel).name
    )


def align(topk_ids: torch.Tensor, experts: int, block_m: int):
    """SGLang's moe_align_block_size contract (sorted ids padded with numel, -1 for unused blocks), built in torch."""
    from exq.kernels.dispatch import dispatch_torch

    p = topk_ids.numel()
    em = p + experts * (block_m - 1)
    em = -(-em // block_m) * block_m
    d = dispatch_torch(topk_ids, experts, block_m)
    sorted_ids = torch.full((em,), p, dtype=torch.int32, device=topk_ids.device)
    n = min(em, d.sorted_pairs.numel())
    sorted_ids[:n] = d.sorted_pairs[:n]
    expert_ids = torch.full((em // block_m,), -1, dtype=torch.int32, device=topk_ids.device)
    be = torch.where(d.block_expert >= experts, -1, d.block_expert)
    nb = min(expert_ids.numel(), be.numel())
    expert_ids[:nb] = be[:nb]
    used = (d.block_expert < experts).sum().to(torch.int32).reshape(1) * block_m
    return sorted_ids, expert_ids, used


def gemm(sgl, a, b, c, scales, topk_weights, sorted_ids, expert_ids, post, pairs, mul_routed, top_k, config):
    """One call of the INT4 GEMM exactly as SGLang's invoke_fused_moe_kernel makes it (no zero points)."""
    import triton
    import triton.language as tl

    cfg = dict(config)
    compute = tl.bfloat16 if a.dtype == torch.bfloat16 else tl.float16
    grid = (triton.cdiv(sorted_ids.shape[0], cfg["BLOCK_SIZE_M"]) * triton.cdiv(b.shape[1], cfg["BLOCK_SIZE_N"]),)
    k = a.shape[1]
    sgl.kernel[grid](
        a, b, c, scales, None, topk_weights, sorted_ids, expert_ids, post,
        b.shape[1], k, sorted_ids.shape[0], pairs,
        a.stride(0), a.stride(1), b.stride(0), b.stride(2), b.stride(1), c.stride(-2), c.stride(-1),
        scales.stride(0), scales.stride(2), scales.stride(1), 0, 0, 0,
        group_size=128, MUL_ROUTED_WEIGHT=mul_routed, top_k=top_k, compute_type=compute, has_zp=False,
        use_int4_w4a16=True, use_int8_w8a16=False, even_Ks=k % cfg["BLOCK_SIZE_K"] == 0, **cfg,
    )  # fmt: skip
