"""Fused MoE kernels against plain torch: dispatch against a brute-force sort, the op against fp32 math on the
dequantized weights. On CPU the kernels run under TRITON_INTERPRET=1 (set in conftest); EXQ_TEST_DEVICE=cuda runs
the same tests on a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from exq.errors import ExqError
from exq.kernels import GemmConfig, GemvConfig, fused_moe
from exq.kernels.dispatch import dispatch, dispatch_torch, max_blocks
from exq.kernels.synthetic import mixed_formats, random_experts

ALL = {"bf16": 0.25, "int8": 0.25, "int4": 0.25, "int4-asym": 0.25}


def brute_force_dispatch(ids: list[list[int]], experts: int, block_m: int) -> tuple[list[int], list[int]]:
    flat = [e for row in ids for e in row]
    p = len(flat)
    nb = max_blocks(p, experts, block_m)
    pairs, owners = [], []
    for e in range(experts):
        mine = [i for i, x in enumerate(flat) if x == e]
        while mine:
            chunk, mine = mine[:block_m], mine[block_m:]
            pairs += chunk + [p] * (block_m - len(chunk))
            owners.append(e)
    pairs += [p] * (nb * block_m - len(pairs))
    owners += [experts] * (nb - len(owners))
    return pairs, owners


@pytest.mark.parametrize("tokens,k,experts,block_m", [(1, 8, 64, 16), (7, 2, 8, 16), (33, 4, 16, 16), (64, 8, 128, 32)])
def test_dispatch_matches_brute_force(tokens, k, experts, block_m):
    gen = torch.Generator().manual_seed(tokens)
    # skewed routing: a few hot experts, many empty ones
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]) % max(k, experts // 3)
    want = brute_force_dispatch(ids.tolist(), experts, block_m)
    for impl in (dispatch, dispatch_torch):
        d = impl(ids.to(DEVICE).int(), experts, block_m)
        assert (d.sorted_pairs.tolist(), d.block_expert.tolist()) == want, impl.__name__


def test_dispatch_drops_ids_of_other_ranks():
    ids = torch.tensor([[0, -1], [5, 1], [1, 9]], dtype=torch.int32)  # 8 local experts: -1 and 9 are not ours
    pairs, owners = brute_force_dispatch([[0, 99], [5, 1], [1, 99]], 8, 16)
    for impl in (dispatch, dispatch_torch):
        d = impl(ids.to(DEVICE), 8, 16)
        assert d.block_expert.tolist() == owners
        assert d.sorted_pairs.tolist() == pairs


def reference(x, w, ids, mod) -> torch.Tensor:
    """fp32 math on the dequantized weights, every (token, slot) pair at once."""
    gu = mod.gate_up.dequantized(torch.float32)[ids]  # [T, k, 2I, H]
    dn = mod.down.dequantized(torch.float32)[ids]  # [T, k, H, I]
    h = torch.einsum("tkoh,th->tko", gu, x.float())
    g, u = h.chunk(2, dim=-1)
    y = torch.einsum("tkhi,tki->tkh", dn, F.silu(g) * u)
    return (y * w.float()[..., None]).sum(1)


def rel_err(out, ref) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def routing(tokens, experts, k, seed, hidden, dtype):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    logits = torch.randn(tokens, experts, generator=gen) * 2
    w, ids = torch.topk(logits.softmax(-1), k)
    return x.to(DEVICE), (w / w.sum(-1, keepdim=True)).to(dtype).to(DEVICE), ids.to(DEVICE)


@pytest.mark.parametrize(
    "shares,dtype,tokens,config",
    [
        (ALL, torch.bfloat16, 5, None),
        (ALL, torch.float16, 1, None),
        (ALL, torch.bfloat16, 33, GemmConfig(32, 32, 64, 4, 2)),
        ({"int4": 1.0}, torch.bfloat16, 3, None),
        ({"bf16": 1.0}, torch.float16, 7, GemmConfig(16, 32, 128, 4, 2)),
        ({"int8": 0.5, "int4-asym": 0.5}, torch.bfloat16, 2, None),
        (ALL, torch.float16, 40, GemmConfig(64, 64, 128, 4, 2)),  # row blocks of 64: nibbles re-interleaved
        ({"int4": 0.5, "int4-asym": 0.5}, torch.float16, 9, GemmConfig(16, 64, 64, 4, 2)),
        # int4 A read as int32 words and int8 codes decoded by exponent bits, bf16 activations, an expert over 16 rows
        ({"int8": 0.5, "int4": 0.5}, torch.bfloat16, 17, GemmConfig(16, 128, 128, 4, 3)),
        (ALL, torch.bfloat16, 3, GemvConfig(32, 1, 4, 2)),  # the decode path, every format
        (ALL, torch.float16, 2, (GemvConfig(64, 2, 4, 2), GemvConfig(64, 1, 4, 2))),  # K steps of 2 groups
        (ALL, torch.bfloat16, 3, (GemvConfig(32, 1, 4, 2, split_k=2), GemvConfig(32, 1, 4, 2))),  # split gate_up
    ],
)
def test_fused_moe_matches_torch(shares, dtype, tokens, config):
    experts, hidden, inter, k = 8, 256, 128, 2
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, shares, seed=tokens), device=DEVICE, seed=1)
    x, w, ids = routing(tokens, experts, k, tokens, hidden, dtype)
    out = fused_moe(x, w, ids, mod, config=config)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2
    if tokens * k < experts:
        assert len(set(ids.flatten().tolist())) < experts  # some experts received no token


@pytest.mark.parametrize("dtype,split", [(torch.bfloat16, 2), (torch.float16, 2)])
def test_split_k_gemv_reduces_partials_and_top_k(dtype, split):
    """Both projections split along K: partial sums, silu*up and the weighted top-k sum in the reduce kernels."""
    experts, hidden, inter, k = 8, 256, 256, 3
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, ALL, seed=7), device=DEVICE, seed=4)
    x, w, ids = routing(5, experts, k, 3 if dtype == torch.float16 else 2, hidden, dtype)
    out = fused_moe(x, w, ids, mod, config=GemvConfig(64, 1, 4, 2, split_k=split))
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2
    foreign = ids.clone()
    foreign[:, -1] = -1  # a slot of another rank adds nothing
    out = fused_moe(x, w, foreign, mod, config=GemvConfig(64, 1, 4, 2, split_k=split), expert_parallel=True)
    assert rel_err(out, reference(x, w[:, :-1], ids[:, :-1], mod)) < 1e-2


@pytest.mark.parametrize(
    "fmt,dtype,config",
    [
        ("int4", torch.bfloat16, GemvConfig(32, 1, 4, 2)),
        ("int4-asym", torch.float16, GemvConfig(64, 2, 4, 2)),
        ("int4", torch.float16, GemvConfig(32, 1, 4, 2, split_k=2)),  # one K step per split
        ("int4-asym", torch.bfloat16, GemvConfig(16, 2, 2, 2)),
    ],
)
def test_gemv_single_int4_format(fmt, dtype, config):
    """The GEMV path on layers of one int4 format (the case the runtime sends it), both activation dtypes: the
    int32-word activation split and the mantissa-bit nibble decode against fp32 torch math."""
    experts, hidden, inter, k = 8, 512, 256, 2
    mod = random_experts(experts, hidden, inter, [fmt] * experts, device=DEVICE, seed=5)
    x, w, ids = routing(3, experts, k, 11, hidden, dtype)
    out = fused_moe(x, w, ids, mod, config=config)
    assert rel_err(out, reference(x, w, ids, mod)) < 1e-2


def test_expert_parallel_ids_contribute_nothing():
    experts, hidden, inter = 8, 128, 128
    mod = random_experts(experts, hidden, inter, mixed_formats(experts, ALL), device=DEVICE, seed=2)
    x, w, ids = routing(4, experts, 2, 3, hidden, torch.bfloat16)
    foreign = ids.clone()
    foreign[:, 1] = -1  # the second choice lives on another rank
    out = fused_moe(x, w, foreign, mod, expert_parallel=True)
    ref = reference(x, w[:, :1], ids[:, :1], mod)
    assert rel_err(out, ref) < 1e-2


def test_errors_name_the_problem():
    mod = random_experts(4, 128, 128, ["int4"] * 4, device=DEVICE)
    x, w, ids = routing(2, 4, 2, 0, 128, torch.bfloat16)
    with pytest.raises(ExqError, match="activation"):
        fused_moe(x, w, ids, mod, activation="gelu")
    with pytest.raises(ExqError, match="bf16 or fp16"):
        fused_moe(x.float(), w, ids, mod)
    with pytest.raises(ExqError, match="hidden size"):
        fused_moe(torch.randn(2, 256, dtype=torch.bfloat16, device=DEVICE), w, ids, mod)
    int3 = random_experts(4, 128, 128, ["int4"] * 4, device=DEVICE)
    int3.gate_up.slab_spec[0] = ("int3", 0, 4)
    with pytest.raises(ExqError, match="no fused kernel"):
        fused_moe(x, w, ids, int3)


def test_bench_without_a_gpu_says_so(capsys, tmp_path, monkeypatch):
    from exq.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "kernels", "--output", str(tmp_path / "k.json")]) != 0
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main(["bench", "kernels", "--layers", "4"]) != 0
    assert "at least 8" in capsys.readouterr().err
    assert not (tmp_path / "k.json").exists()
