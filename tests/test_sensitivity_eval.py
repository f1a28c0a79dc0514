"""Sensitivity tables, the compile pipeline, quantize and eval commands, end to end on the demo model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DEMO_CORPUS, DEMO_MODEL

from exq.cli import main
from exq.compiler import Artifact, SensitivityTable
from exq.data.corpus import Domain, load_domains, split_domains
from exq.eval import evaluate
from exq.eval.logits import eager_experts, logprobs, token_kl
from exq.models import load_model, load_tokenizer
from exq.quant.sensitivity import measure_sensitivity

VALID = [str(DEMO_CORPUS / "austen.valid.txt.gz"), str(DEMO_CORPUS / "kjv.valid.txt.gz")]
TEST = [str(DEMO_CORPUS / "austen.test.txt.gz"), str(DEMO_CORPUS / "kjv.test.txt.gz")]


@pytest.fixture(scope="module")
def small():
    model = load_model(DEMO_MODEL, device="cpu")
    tok = load_tokenizer(DEMO_MODEL)
    calib, probe = split_domains(load_domains(VALID, tok, 3072), 2048)
    return model, tok, calib, probe


def test_sensitivity_layer_totals_are_the_measured_kl(small):
    model, _, calib, probe = small
    table, report, _ = measure_sensitivity(model, calib, probe, "bf16,int8,int4,int2-asym", progress=False)
    assert table.routed.shape == (4, 16, 2, 4)
    assert (table.routed[..., 0] == 0).all()  # bf16
    assert np.isfinite(table.routed).all() and (table.routed >= 0).all()
    # each (layer, block, format) total is the probe's measured KL; measure one again independently
    for p in report.probes:
        b = ("gate_up", "down").index(p["block"])
        f = table.formats.index(p["format"])
        assert table.routed[p["moe_layer"], :, b, f].sum() == pytest.approx(max(p["measured_kl"], 0), rel=1e-9)
    int2 = [p["measured_kl"] for p in report.probes if p["format"] == "int2-asym"]
    int8 = [p["measured_kl"] for p in report.probes if p["format"] == "int8"]
    assert min(int2) > max(int8)  # 2-bit hurts more than 8-bit everywhere
    # the report's number is a real KL of the perturbed model
    from exq.quant.apply import block_weights, quantize_stack, write_block

    m = __import__("exq.models", fromlist=["moe_layers"]).moe_layers(model)[1]
    w = block_weights(m, "down")
    with torch.no_grad(), eager_experts(model):
        work = [(0, d.tokens[: d.tokens.numel() // 256 * 256].view(-1, 256)) for d in probe]
        ref = logprobs(model, work)
        write_block(
            m,
            "down",
            quantize_stack(__import__("exq.formats").formats.FORMATS["int2-asym"], w, "rtn")
            .dequantize()
            .to(model.dtype),
        )
        kl_rtn = np.mean([float(token_kl(r, o).mean()) for r, o in zip(ref, logprobs(model, work), strict=True)])
        write_block(m, "down", w.to(model.dtype))
    measured = next(
        p["measured_kl"]
        for p in report.probes
        if p["moe_layer"] == 1 and p["block"] == "down" and p["format"] == "int2-asym"
    )
    assert 0 < measured < kl_rtn * 1.5  # GPTQ'd int2 is no worse than plain RTN int2 (+ margin for token split)


def test_eval_reference_is_exact_and_rtn_hurts(small):
    model, tok, _, _ = small
    domains = load_domains(TEST, tok, 2048)
    report, variants = evaluate(model, domains, progress=False, batch_size=4)
    rows = {r["name"]: r for r in report["variants"]}
    assert rows["bf16"]["kl_mean"] == 0 and rows["bf16"]["top1_agreement"] == 1.0
    rtn = rows["uniform int4 RTN"]
    assert rtn["kl_mean"] > 0 and rtn["recovery"] == pytest.approx(0.0)
    assert rtn["bits_per_weight"] == pytest.approx(4.125)
    # perplexity recomputed by hand from the variant's own log-probs
    work = [(i, d.tokens[: d.tokens.numel() // 256 * 256].view(-1, 256)) for i, d in enumerate(domains)]
    with eager_experts(variants[1].model):
        lps = logprobs(variants[1].model, work)
    for (i, b), lp in zip(work, lps, strict=True):
        nll = -lp[:, :-1].gather(-1, b[:, 1:, None]).mean()
        assert float(torch.exp(nll)) == pytest.approx(rtn["ppl_per_domain"][domains[i].name], rel=1e-4)


def test_pipeline_commands_end_to_end(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    args = [
        "compile",
        "--model",
        str(DEMO_MODEL),
        "--corpus",
        *VALID,
        "--tokens",
        "2048",
        "--probe-tokens",
        "1024",
        "--budget",
        "4.5bpw",
        "--formats",
        "bf16,int8,int4,int3-asym",
        "--output",
        str(plan),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reused from cache: none" in out
    assert (tmp_path / "profile.json").is_file() and (tmp_path / "sensitivity.json").is_file()
    args[args.index("4.5bpw")] = "4bpw"  # another budget, same stage files
    args[-1] = str(tmp_path / "plan4.json")
    assert main(args) == 0
    assert "reused from cache: profile, sensitivity" in capsys.readouterr().out
    art = Artifact.load(plan)
    assert art.cost_source["kind"] == "sensitivity" and art.summary()["bits_per_weight"] <= 4.5
    table = SensitivityTable.load(tmp_path / "sensitivity.json")
    assert table.method["calibration"]["tokens"] == 2048

    q = tmp_path / "q"
    assert main(["quantize", "--model", str(DEMO_MODEL), "--artifact", str(plan), "--output", str(q)]) == 0
    assert "planned" in capsys.readouterr().out
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "exq" and cfg["quantization_config"]["quantizer"] == "gptq"

    rep = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "--model",
                str(DEMO_MODEL),
                "--quantized",
                str(q),
                "--corpus",
                *TEST,
                "--tokens",
                "2048",
                "--output",
                str(rep),
            ]
        )
        == 0
    )
    report = json.loads((rep / "report.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert names[0] == "bf16" and "uniform int4 RTN" in names and any(n.startswith("exq 4.5bpw") for n in names)
    assert (rep / "pareto.png").read_bytes()[:4] == b"\x89PNG" and (rep / "plan-0.png").is_file()
    assert "| exq 4.5bpw" in (rep / "report.md").read_text()


def test_pipeline_errors(tmp_path, capsys):
    assert main(["compile", "--model", str(DEMO_MODEL), "--budget", "int4", "--output", str(tmp_path / "p.json")]) == 2
    assert "--corpus" in capsys.readouterr().err
    assert main(["compile", "--budget", "int4", "--output", str(tmp_path / "p.json")]) == 2
    assert "either --profile" in capsys.readouterr().err
    assert (
        main(
            [
                "quantize",
                "--model",
                str(DEMO_MODEL),
                "--artifact",
                str(tmp_path / "none.json"),
                "--output",
                str(tmp_path / "q"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "--model", str(DEMO_MODEL), "--corpus", *TEST, "--output", str(tmp_path / "e")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_quantize_refuses_a_plan_of_another_model(tmp_path, capsys, demo_profile):
    from tiny_models import tiny_model

    from exq.compiler import compile_plan
    from exq.profiling import profile_domains

    other = tiny_model("qwen2_moe_h128", seed=4)
    prof = profile_domains(other, [Domain("d", None, torch.randint(0, 96, (128,)))], seq_len=64, progress=False)
    compile_plan(prof, "int4")[0].save(tmp_path / "other.json")
    code = main(
        [
            "quantize",
            "--model",
            str(DEMO_MODEL),
            "--artifact",
            str(tmp_path / "other.json"),
            "--output",
            str(tmp_path / "q"),
        ]
    )
    assert code == 2 and "another model" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_whole_pipeline_on_another_architecture(tmp_path, capsys):
    """DeepSeek-V3 (sigmoid router, group-limited top-k, shared expert, a dense first layer): every command runs."""
    import shutil

    from tiny_models import tiny_model

    model = tiny_model("deepseek_v3_h128", seed=6).to(torch.bfloat16)
    src = tmp_path / "dsv3"
    model.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO_MODEL / f, src / f)
    plan = tmp_path / "plan.json"
    assert (
        main(
            [
                "compile",
                "--model",
                str(src),
                "--corpus",
                *VALID,
                "--tokens",
                "1024",
                "--probe-tokens",
                "512",
                "--budget",
                "3.5bpw",
                "--formats",
                "bf16,int8,int4,int3-asym,int2-asym",
                "--output",
                str(plan),
            ]
        )
        == 0
    )
    assert main(["quantize", "--model", str(src), "--artifact", str(plan), "--output", str(tmp_path / "q")]) == 0
    assert (
        main(
            [
                "eval",
                "--model",
                str(src),
                "--quantized",
                str(tmp_path / "q"),
                "--artifact",
                str(plan),
                "--corpus",
                *TEST,
                "--tokens",
                "1024",
                "--output",
                str(tmp_path / "e"),
            ]
        )
        == 0
    )
    rows = {v["name"]: v for v in json.loads((tmp_path / "e" / "report.json").read_text())["variants"]}
    exq_rows = [v for k, v in rows.items() if k.startswith("exq")]
    assert len(exq_rows) == 2 and all(v["bits_per_weight"] <= 3.5 for v in exq_rows)
    # the checkpoint and the in-memory fake quantization of the same plan are the same model
    assert exq_rows[0]["kl_mean"] == pytest.approx(exq_rows[1]["kl_mean"], rel=1e-6)
