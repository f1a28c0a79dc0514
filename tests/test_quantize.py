"""Calibration statistics, GPTQ, packed checkpoints and the runtime loader, on the demo model."""

from __future__ import annotations

import copy
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from conftest import DEMO_CORPUS, DEMO_MODEL

import exq
from exq.compiler import compile_plan
from exq.data.corpus import load_domains
from exq.errors import ExqError
from exq.formats import FORMATS
from exq.models import load_model, load_tokenizer, moe_layers
from exq.profiling import profile_domains
from exq.quant.apply import block_weights, fake_quantize, quantize_experts
from exq.quant.calibrate import collect_stats
from exq.quant.checkpoint import BASE_FILE, PLAN_FILE, QUANTIZED_FILE, write_checkpoint
from exq.quant.codec import quantize_rtn
from exq.quant.quantizers import quantize_gptq
from exq.runtime.experts import QuantizedBlock


@pytest.fixture(scope="module")
def demo():
    model = load_model(DEMO_MODEL, device="cpu")
    tok = load_tokenizer(DEMO_MODEL)
    domains = load_domains([DEMO_CORPUS / "austen.valid.txt.gz", DEMO_CORPUS / "kjv.valid.txt.gz"], tok, 4096)
    m32 = load_model(DEMO_MODEL, device="cpu", dtype="float32")
    stats = collect_stats(m32, domains, seq_len=256, batch_size=4, progress=False)
    prof = profile_domains(model, domains, seq_len=256, progress=False)
    prof32 = profile_domains(m32, domains, seq_len=256, progress=False)  # the stats' model routes in float32
    return model, m32, domains, stats, prof, prof32


def test_stats_count_the_routers_choices(demo):
    """Two independent mechanisms — the router hooks of the profiler and the expert capture of calibration — agree."""
    *_, stats, _, prof = demo
    for i, st in enumerate(stats):
        assert np.array_equal(st.n.numpy(), prof.counts(i))
        assert st.tokens == prof.tokens
        a = st.a_gate_up
        assert torch.allclose(a, a.transpose(1, 2))
        assert (torch.linalg.eigvalsh(a) > -1e-6 * a.abs().max()).all()
        assert (st.g_gate_up >= 0).all() and st.g_gate_up.sum() > 0


def test_gptq_reduces_routed_token_error_on_every_expert(demo):
    """||(W - W') X||^2 over each expert's own routed tokens: GPTQ below RTN for every expert with >= 64 tokens."""
    _, m32, _, stats, _, _ = demo
    checked = 0
    for m in moe_layers(m32):
        st = stats[m.index]
        for block in ("gate_up", "down"):
            w = block_weights(m, block)
            a = (st.a_gate_up if block == "gate_up" else st.a_down).float()
            for name in ("int4", "int3-asym"):
                fmt = FORMATS[name]
                rtn = w - quantize_rtn(fmt, w).dequantize()
                gptq = w - quantize_gptq(fmt, w, st.hessian(block), act_order=True).dequantize()
                e_rtn, e_gptq = (torch.einsum("eoi,eij,eoj->e", d, a, d) for d in (rtn, gptq))
                busy = st.n >= 64
                assert (e_gptq[busy] < e_rtn[busy]).all(), (m.index, block, name)
                checked += int(busy.sum())
    assert checked > 100


@pytest.fixture(scope="module")
def plan(demo):
    prof = demo[4]
    fmts = "bf16,int8,int4,int4-asym,int3-asym,int2-asym"
    art, _ = compile_plan(prof, "4.5bpw", granularity="block", formats=fmts)
    used = {f for p in art.experts for b in p.values() for f in b}
    assert len(used) >= 4  # a genuinely mixed plan
    return art


def _written(demo, plan, tmp_path, quantizer="gptq"):
    model, stats = demo[0], demo[3]
    tensors = quantize_experts(model, plan, stats, quantizer, progress=False)
    return write_checkpoint(model, plan, tensors, tmp_path / "ckpt", DEMO_MODEL, quantizer)


def test_checkpoint_bytes_equal_the_plan(demo, plan, tmp_path):
    out = _written(demo, plan, tmp_path)
    data = (out / QUANTIZED_FILE).read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    assert len(data) - 8 - header_len == plan.summary()["bytes"]  # tensor bytes: exactly the plan's accounting
    assert len(data) <= 1.01 * plan.summary()["bytes"]
    header = json.loads(data[8 : 8 + header_len])
    assert not any("gate_up_proj" in k or "down_proj" in k for k in header)  # no bf16 originals


def test_save_load_gives_identical_logits(demo, plan, tmp_path):
    stats = demo[3]
    out = _written(demo, plan, tmp_path)
    loaded = exq.load(out, device="cpu")
    reference = load_model(DEMO_MODEL, device="cpu")
    restore = fake_quantize(reference, plan, stats, "gptq", progress=False)
    reference.set_experts_implementation("eager")
    x = torch.randint(0, 4096, (3, 97), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=x).logits, reference(input_ids=x).logits)
    restore()


def test_all_bf16_checkpoint_matches_the_original_exactly(demo, tmp_path):
    model, prof = demo[0], demo[4]
    art, _ = compile_plan(prof, "16bpw", formats="bf16")
    out = write_checkpoint(
        model, art, quantize_experts(model, art, None, "rtn", progress=False), tmp_path / "b", DEMO_MODEL, "rtn"
    )
    loaded = exq.load(out, device="cpu")
    # the layout pass ordered each slab by heat; one-format blocks are loaded in expert-id order (slot = id)
    assert any(blk["order"] != sorted(blk["order"]) for lay in art.layout for blk in lay.values())
    blocks = [m for m in loaded.modules() if isinstance(m, QuantizedBlock)]
    assert blocks and all(b.order == list(range(len(b.order))) for b in blocks)
    ref = load_model(DEMO_MODEL, device="cpu")
    ref.set_experts_implementation("eager")
    x = torch.randint(0, 4096, (2, 64))
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=x).logits, ref(input_ids=x).logits)


def test_loader_errors(demo, plan, tmp_path):
    out = _written(demo, plan, tmp_path, quantizer="clip")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = (broken / QUANTIZED_FILE).read_bytes()
    (broken / QUANTIZED_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ExqError, match="corrupt or truncated"):
        exq.load(broken, device="cpu")
    (broken / BASE_FILE).unlink()
    with pytest.raises(ExqError, match=r"missing model\.safetensors"):
        exq.load(broken, device="cpu")
    shutil.rmtree(broken)
    shutil.copytree(out, broken)
    (broken / PLAN_FILE).write_text((broken / PLAN_FILE).read_text() + " ")
    with pytest.raises(ExqError, match="hash mismatch"):
        exq.load(broken, device="cpu")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_version"] = 9
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExqError, match="upgrade exq"):
        exq.load(broken, device="cpu")
    with pytest.raises(ExqError, match="not an exq checkpoint"):
        exq.load(DEMO_MODEL, device="cpu")
    with pytest.raises(ExqError, match="does not exist"):
        exq.load(tmp_path / "nothing", device="cpu")


def test_output_folder_is_protected(demo, plan, tmp_path):
    out = _written(demo, plan, tmp_path, quantizer="clip")
    with pytest.raises(ExqError, match="not empty"):
        _written(demo, plan, tmp_path, quantizer="clip")
    assert (out / QUANTIZED_FILE).is_file()


def test_scale_tuning_lowers_the_fitted_kl_and_changes_only_scales(demo, plan):
    from exq.eval.logits import eager_experts, logprobs, mean_kl
    from exq.quant.checkpoint import base_state, quantization_config
    from exq.quant.tune import tune_scales
    from exq.runtime.load import assemble

    model, stats, domains = demo[0], demo[3], demo[2]
    tensors = quantize_experts(model, plan, stats, "gptq", progress=False)
    qmodel = assemble(
        copy.deepcopy(model.config),
        quantization_config(model, plan, "gptq", ""),
        base_state(model, plan) | tensors,
        device="cpu",
        dtype=model.dtype,
    )
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    work = [(0, domains[0].tokens[: 4 * 128].view(4, 128))]
    with eager_experts(model):
        ref = logprobs(model, work)
        kl0 = mean_kl(ref, logprobs(qmodel, work))
        losses = tune_scales(qmodel, model, [domains[0]], 10, lr=5e-3, seq_len=128, batch_size=4, progress=False)
        kl1 = mean_kl(ref, logprobs(qmodel, work))
    assert len(losses) == 10 and kl1 < kl0
    after = qmodel.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(".scales") for k in changed)
    assert all(after[k].dtype == torch.float16 for k in changed)
