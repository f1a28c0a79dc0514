"""The Triton kernels compile for an H100 (sm_90) on a machine without a GPU.

The interpreter runs kernels as Python, so it accepts code the GPU compiler rejects (returns of two shapes under a
constexpr branch, for one); compiling each kernel variant to a cubin catches that class of error in CI. The tests
set TRITON_INTERPRET on CPU, so the compiler runs in a child process that imports the kernels without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

VARIANTS = {  # name -> (kernel, block_m, block_n, block_k, warps, formats, flags)
    "decode tile, inline dispatch": ("gemm", 16, 64, 128, 4, "int4", {"ROUTE_PP": 512}),
    "decode tile, one format at slot id": ("gemm", 16, 128, 256, 4, "int4", {"ROUTE_PP": 512, "ONE_FORMAT": 2}),
    "prefill tile, one format at slot id": ("gemm", 128, 128, 64, 8, "int4", {"FOLD": True, "ONE_FORMAT": 2}),
    "CUDA-core GEMV, one format at slot id": ("gemv", 0, 64, 128, 4, "int4", {"MMA": False, "GPS": 2, "ONE_FORMAT": 2}),
    "CUDA-core GEMV, whole-K step": ("gemv", 0, 16, 2048, 4, "int4", {"MMA": False, "GPS": 16, "ONE_FORMAT": 2}),
    "decode tile, every format, grouped row blocks": ("gemm", 16, 64, 128, 4, "all", {"GROUP": 8}),
    "32-row tile, every format, inline dispatch": ("gemm", 32, 128, 128, 4, "all", {"ROUTE_PP": 1024}),
    "decode tile, two groups per K iteration": ("gemm", 16, 128, 256, 4, "all", {"ROUTE_PP": 512}),
    "prefill tile, scales folded": ("gemm", 128, 128, 64, 8, "all", {"FOLD": True}),
    "tensor-core GEMV, every format": ("gemv", 0, 64, 128, 4, "all", {}),
    "tensor-core GEMV, two groups per K step": ("gemv", 0, 64, 256, 4, "all", {"GPS": 2}),
    "CUDA-core GEMV, every format, 2-group K steps": ("gemv", 0, 32, 128, 4, "all", {"MMA": False, "GPS": 2}),
    "one-launch decode, every format": ("decode", 0, 64, 256, 4, "all", {}),
    "one-launch decode, CUDA cores, int4": ("decode", 0, 32, 512, 4, "int4", {"MMA1": False, "MMA2": False}),
    "one-launch decode, items by atomic ticket": ("decode", 0, 64, 256, 4, "all", {"TICKET": True}),
    "one-launch decode, pairs in expert order": ("decode", 0, 64, 256, 4, "int4", {"SORT_PP": 32}),
    "decode tile, int3-only layer (byte gathers)": ("gemm", 16, 64, 128, 4, "int3", {"ROUTE_PP": 512}),
    "tensor-core GEMV, int3-only layer": ("gemv", 0, 64, 128, 4, "int3", {}),
    "prefill tile, int3-only layer (words)": ("gemm", 128, 128, 64, 8, "int3", {"FOLD": True}),
    "prefill tile, 16-row tile for partial blocks": ("gemm", 128, 128, 64, 8, "all", {"FOLD": True, "SMALL_M": 16}),
    "prefill tile, 64-row tile for partial blocks": ("gemm", 128, 128, 64, 8, "int4", {"FOLD": True, "SMALL_M": 64}),
    "32-row tile, 16-row partial blocks, top-k sum": (
        "gemm",
        32,
        128,
        128,
        4,
        "all",
        {"SMALL_M": 16, "GATED": False, "MUL_W": True, "A_DIV": 1, "FINISH_K": 8},
    ),
    # v26: gate_up lets the down launch start early, down waits for it first (the PTX must hold the instruction)
    "decode gate_up tile, down may launch early": (
        "gemm",
        16,
        128,
        256,
        4,
        "int4",
        {"PDL": 1, "_PTX": "griddepcontrol.launch_dependents"},
    ),
    "decode down tile launched early, top-k sum": (
        "gemm",
        16,
        128,
        128,
        4,
        "all",
        {"PDL": 2, "GATED": False, "MUL_W": True, "A_DIV": 1, "FINISH_K": 8, "_PTX": "griddepcontrol.wait"},
    ),
    # v27: gate_up launched early after the one-launch dispatch, letting down start early in turn: both instructions
    "decode gate_up tile launched early, down may launch early": (
        "gemm",
        16,
        128,
        256,
        4,
        "int4",
        {"PDL": 3, "_PTX": ["griddepcontrol.wait", "griddepcontrol.launch_dependents"]},
    ),
    "sorted dispatch, gate_up may launch early": (
        "dispatch",
        16,
        0,
        0,
        4,
        "",
        {"PDL": True, "_PTX": "griddepcontrol.launch_dependents"},
    ),
    "sorted dispatch, 1024 pairs on 256 experts": ("dispatch", 16, 0, 0, 4, "", {"PP": 1024, "EP": 512, "NBP": 2048}),
    "sorted dispatch, int64 ids": ("dispatch", 32, 0, 0, 4, "", {"_PTRS": {"ids_ptr": "*i64"}}),
    # 2 chunks sorted side by side (the tile dispatch.chunk_tile gives), the last program's ticket (one thread's
    # acquire-release atomic) and its L1-bypassing reads of the other chunks' keys and counts
    "chunk-sorted dispatch, the last program places every chunk": (
        "dispatch",
        16,
        0,
        0,
        8,
        "",
        {"CHUNKS": True, "_TILE": (2, 64), "NBP": 1024, "_PTX": ["atom.global.gpu.acq_rel.add", "ld.global.cg"]},
    ),
    "chunk-sorted dispatch, 8 experts in 2 chunks (failed on Triton 3.6 with a 16-column tile)": (
        "dispatch",
        128,
        0,
        0,
        4,
        "",
        {"CHUNKS": True, "_TILE": (2, 8), "NBP": 16},
    ),
    "prefill gate_up tile zeroing the counters": ("gemm", 128, 128, 64, 8, "int4", {"FOLD": True, "ZCH": 64}),
    "prefill down tile, top-k sum in the epilogue": (
        "gemm",
        128,
        128,
        64,
        8,
        "int4",
        {"FOLD": True, "ONE_FORMAT": 2, "GATED": False, "MUL_W": True, "A_DIV": 1, "FINISH_K": 8},
    ),
    "decode down tile, every format, inline, top-k sum": (
        "gemm",
        16,
        64,
        128,
        4,
        "all",
        {"ROUTE_PP": 512, "GATED": False, "MUL_W": True, "A_DIV": 1, "FINISH_K": 6},
    ),
}

CHILD = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from exq.kernels import dispatch, moe_gemm, moe_gemv

PTRS = {"a_ptr": "*bf16", "a32_ptr": "*i32", "c_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
        "topk_w_ptr": "*bf16", "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "ids_ptr": "*i32", "fs_ptr": "*i32",
        "w16": "*bf16", "w8": "*u8", "s8": "*fp16", "w4": "*u8", "s4": "*fp16", "wa": "*u8",
        "sa": "*fp16", "za": "*u8", "w3": "*i32", "s3": "*fp16", "w3a": "*i32", "s3a": "*fp16", "z3a": "*u8",
        "mid_ptr": "*bf16", "mid32_ptr": "*i32", "keys_ptr": "*i32", "counts_ptr": "*i32", "ticket_ptr": "*i32",
        "sync_ptr": "*i32", "fs1": "*i32", "fs2": "*i32"}
for pre in ("g", "d"):  # moe_decode_kernel: gate_up's slabs, then down's
    PTRS |= {pre + (n[1:] if n[0] == "w" else n): PTRS[n]
             for n in "w16 w8 s8 w4 s4 wa sa za w3 s3 w3a s3a z3a".split()}
FORMATS = {"int4": dict(HAS_BF16=False, HAS_INT8=False, HAS_INT4=True, HAS_INT4_ASYM=False, HAS_INT3=False,
                        HAS_INT3_ASYM=False),
           "all": dict(HAS_BF16=True, HAS_INT8=True, HAS_INT4=True, HAS_INT4_ASYM=True, HAS_INT3=True,
                       HAS_INT3_ASYM=True),
           "int3": dict(HAS_BF16=False, HAS_INT8=False, HAS_INT4=False, HAS_INT4_ASYM=False, HAS_INT3=True,
                        HAS_INT3_ASYM=True)}
MAGIC = dict(DT=tl.bfloat16, MAGIC_BITS=0x4300, MAGIC_BASE=128, PTX=True)

def compile_sm90(fn, consts, warps, ptrs=PTRS):
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in ptrs}
    src = ASTSource(fn, sig, {(names.index(n),): v for n, v in consts.items()}, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=3))

out = {}
for name, (kind, bm, bn, bk, warps, fmts, flags) in json.loads(sys.argv[1]).items():
    if kind == "gemm":
        fn = moe_gemm.moe_gemm_kernel
        consts = dict(N=2048, K=2048, A_DIV=8, GATED=True, MUL_W=False, BM=bm, BN=bn, BK=bk,
                      INTERLEAVE=bm >= 64, ROUTE_PP=0, FOLD=False, GROUP=1, ONE_FORMAT=-1,
                      FINISH_K=0, ZCH=0, SMALL_M=0, PDL=0)
    elif kind == "decode":
        fn = moe_gemv.moe_decode_kernel
        consts = dict(H=2048, INTER=1024, A_BF16=True, TOP_K=8, KP=8, BN1=bn, GPS1=bk // 128, MMA1=True, ONE1=-1,
                      BN2=bn, GPS2=1, MMA2=True, ONE2=-1, TICKET=False, SORT_PP=0)
        has = {p + k[4:]: v for k, v in FORMATS[fmts].items() for p in ("G_", "D_")}  # each projection's HAS_*
    elif kind == "dispatch":
        fn = dispatch._dispatch_sorted
        consts = dict(BLOCK_M=bm, PP=512, EP=128, NBP=128, FILL=2048, PDL=False, CHUNKS=False)
    else:
        fn = moe_gemv.moe_gemv_kernel
        consts = dict(N=2048, K=2048, A_BF16=True, A_DIV=8, GATED=True, MUL_W=False, BN=bn, GPS=1, SPLIT=1,
                      TOP_K=8, KSP=8, ZERO_NT=32, ZERO_NTP=32, MMA=True, ONE_FORMAT=-1)
    if kind != "dispatch":
        consts |= MAGIC | (has if kind == "decode" else FORMATS[fmts])
    consts |= flags
    if "_TILE" in consts:  # (chunks, experts): the chunk tile dispatch_sorted launches with
        consts["NCHP"], consts["EP"] = dispatch.chunk_tile(*consts.pop("_TILE"), warps)
    need = consts.pop("_PTX", [])  # instructions the variant must compile to
    need = [need] if isinstance(need, str) else need
    ptrs = PTRS | consts.pop("_PTRS", {})  # pointer types other than the op's
    try:
        k = compile_sm90(fn, consts, warps, ptrs)
        missing = [n for n in need if n not in k.asm["ptx"]]
        out[name] = "ok" if k.asm["cubin"] and not missing else f"no cubin or no {missing}"
    except Exception as err:  # the compiler's message is the test's failure message
        out[name] = f"{type(err).__name__}: {str(err)[-1500:]}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps(VARIANTS)], capture_output=True, text=True,
                         env=env, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kernel_variant_compiles_for_sm90(compiled, name):
    assert compiled[name] == "ok", compiled[name]
