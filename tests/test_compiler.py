"""Compiling plans: budgets honoured to the byte (counted independently), determinism, sensitivity tables, artifact
validation and every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from exq.compiler import Artifact, SensitivityTable, compile_plan
from exq.compiler.units import BLOCKS
from exq.data.corpus import Domain
from exq.errors import ExqError, FormatError
from exq.fileio import dumps_json, seal
from exq.profiling import profile_domains

# bytes per [out, in] matrix, written out independently of exq.formats
HAND_BYTES = {
    "bf16": lambda o, i: 2 * o * i,
    "int8": lambda o, i: o * i + 2 * o,
    "int4": lambda o, i: o * i // 2 + o * (i // 128) * 2,
    "int4-asym": lambda o, i: o * i // 2 + o * (i // 128) * 3,
    "int3": lambda o, i: o * i * 3 // 8 + o * (i // 128) * 2,
    "int3-asym": lambda o, i: o * i * 3 // 8 + o * (i // 128) * 3,
    "int2-asym": lambda o, i: o * i // 4 + o * (i // 128) * 3,
}


def independent_bytes(plan_json: dict) -> tuple[int, int]:
    """(bytes, params) of a written plan, from its JSON alone."""
    st = plan_json["model"]["structure"]
    total = params = 0
    for layer, plan in zip(st["moe_layers"], plan_json["plan"]["experts"], strict=True):
        h, i = layer["hidden_size"], layer["intermediate_size"]
        for e in range(layer["num_experts"]):
            total += HAND_BYTES[plan["gate_up"][e]](2 * i, h) + HAND_BYTES[plan["down"][e]](h, i)
            params += 3 * h * i
    for layer, fmt in zip(st["moe_layers"], plan_json["plan"]["shared"] or [], strict=False):
        for _, o, i in layer["shared"]:
            total, params = total + HAND_BYTES[fmt](o, i), params + o * i
    for linears, fmt in zip(st["attention"], plan_json["plan"]["attention"] or [], strict=False):
        for _, o, i in linears:
            total, params = total + HAND_BYTES[fmt](o, i), params + o * i
    return total, params


@pytest.mark.parametrize("budget", ["int4", "4.5bpw", "3.25bpw", "2.6bpw", "8bpw", "1MB"])
@pytest.mark.parametrize("solver", ["greedy", "milp"])
@pytest.mark.parametrize("granularity", ["expert", "block"])
def test_budget_respected_to_the_byte(demo_profile, tmp_path, budget, solver, granularity):
    art, sol = compile_plan(demo_profile, budget, solver=solver, granularity=granularity)
    path = art.save(tmp_path / "plan.json")
    written = json.loads(path.read_text())
    used, params = independent_bytes(written)
    assert used == written["summary"]["bytes"] == sol.nbytes
    assert used <= written["budget"]["bytes"]
    if budget == "int4":
        assert written["budget"]["bytes"] == params * 33 // 64  # 4.125 bits per weight
    if budget.endswith("bpw"):
        assert written["budget"]["bytes"] == int(params * float(budget[:-3]) / 8)
    Artifact.load(path, model=demo_profile.model)


def test_milp_not_worse_than_greedy_and_plans_use_the_budget(demo_profile):
    for budget in ("int4", "3.5bpw", "5bpw"):
        g = compile_plan(demo_profile, budget, solver="greedy")[1]
        m = compile_plan(demo_profile, budget, solver="milp")[1]
        assert m.objective <= g.objective + 1e-12
        assert m.bound <= m.objective


def test_deterministic_bytes(demo_profile, tmp_path):
    a = compile_plan(demo_profile, "3.5bpw", granularity="block")[0].save(tmp_path / "a.json")
    b = compile_plan(demo_profile, "3.5bpw", granularity="block")[0].save(tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()


def test_block_granularity_and_layout(demo_profile):
    art, _ = compile_plan(demo_profile, "3.5bpw", granularity="block", formats="int8,int4,int3-asym")
    for plan, lay in zip(art.experts, art.layout, strict=True):
        for b in BLOCKS:
            order, slabs = lay[b]["order"], lay[b]["slabs"]
            assert sorted(order) == list(range(len(plan[b])))
            for name, start, count in slabs:
                assert {plan[b][e] for e in order[start : start + count]} == {name}


def test_infeasible_budget_names_the_smallest(demo_profile):
    with pytest.raises(ExqError, match="infeasible") as info:
        compile_plan(demo_profile, "3bpw", formats="bf16,int8,int4")
    assert "smallest feasible budget" in str(info.value) and "4.1250 bits per weight" in str(info.value)


def test_unknown_format_and_bad_options(demo_profile):
    with pytest.raises(ExqError, match="unknown format"):
        compile_plan(demo_profile, "int4", formats="int4,fp4")
    with pytest.raises(ExqError, match="unknown granularity"):
        compile_plan(demo_profile, "int4", granularity="layer")
    with pytest.raises(ExqError, match="no shared experts"):
        compile_plan(demo_profile, "int4", include_shared=True)


def random_table(prof, formats, seed=0) -> SensitivityTable:
    rng = np.random.default_rng(seed)
    layers = prof.model["structure"]["moe_layers"]
    e = max(layer["num_experts"] for layer in layers)
    noise = {
        "bf16": 0.0,
        "int8": 1e-4,
        "int4": 4e-3,
        "int4-asym": 3e-3,
        "int3": 2e-2,
        "int3-asym": 1.5e-2,
        "int2-asym": 1e-1,
    }
    routed = np.array([noise[f] for f in formats]) * rng.lognormal(0, 1.5, size=(len(layers), e, 2, 1))
    return SensitivityTable(model=prof.model, formats=list(formats), routed=routed, method={"quantizer": "test"})


def test_sensitivity_table_drives_the_plan(demo_profile, tmp_path):
    fmts = ["bf16", "int8", "int4", "int3-asym"]
    table = random_table(demo_profile, fmts)
    path = table.save(tmp_path / "sens.json")
    loaded = SensitivityTable.load(path, model=demo_profile.model)
    assert np.array_equal(loaded.routed, table.routed)
    art, sol = compile_plan(demo_profile, "int4", sensitivity=loaded)
    assert art.cost_source["kind"] == "sensitivity" and art.inputs["sensitivity_sha256"] == table.content_sha256
    # the plan's objective is the table's cost of its choices
    total = sum(
        table.routed[li, e, b, fmts.index(plan["gate_up"][e])]
        for li, plan in enumerate(art.experts)
        for e in range(len(plan["gate_up"]))
        for b in range(2)
    )
    assert sol.objective == pytest.approx(total)
    # the most damaged expert under int4 gets more bits than int4 when the budget allows
    worst = np.unravel_index(np.argmax(table.routed[..., fmts.index("int4")].sum(axis=2)), table.routed.shape[:2])
    art5, _ = compile_plan(demo_profile, "5bpw", sensitivity=loaded)
    assert art5.experts[worst[0]]["gate_up"][worst[1]] in ("bf16", "int8")


def test_sensitivity_table_errors(demo_profile, tmp_path):
    table = random_table(demo_profile, ["int8", "int4"])
    with pytest.raises(ExqError, match="no costs for format"):
        compile_plan(demo_profile, "int4", sensitivity=table, formats="int4,int3-asym")
    path = table.save(tmp_path / "s.json")
    other = tiny_model("olmoe")
    from exq.models import fingerprint, moe_layers

    with pytest.raises(FormatError, match="another model"):
        SensitivityTable.load(path, model=fingerprint(other, moe_layers(other)))
    with pytest.raises(FormatError, match="routed shape"):
        SensitivityTable(model=demo_profile.model, formats=["int4"], routed=np.zeros((1, 2, 2, 1)))
    with pytest.raises(FormatError, match="unknown format"):
        SensitivityTable(model=demo_profile.model, formats=["int5"], routed=np.zeros((4, 16, 2, 1)))
    with pytest.raises(FormatError, match="bf16 costs must be 0"):
        SensitivityTable(model=demo_profile.model, formats=["bf16"], routed=np.ones((4, 16, 2, 1)))
    p = tmp_path / "s.json"
    p.write_text(p.read_text()[:100])
    with pytest.raises(FormatError, match="not valid JSON"):
        SensitivityTable.load(p)


def test_profile_and_table_of_different_models(demo_profile):
    other = tiny_model("qwen2_moe_h128", seed=5)
    prof = profile_domains(other, [Domain("d", None, torch.randint(0, 96, (64,)))], seq_len=32, progress=False)
    with pytest.raises(FormatError, match="another model"):
        compile_plan(prof, "int4", sensitivity=random_table(demo_profile, ["int4"]))


def test_shared_and_attention_units(tmp_path):
    model = tiny_model("qwen2_moe_h128", seed=3)
    prof = profile_domains(model, [Domain("d", None, torch.randint(0, 96, (256,)))], seq_len=64, progress=False)
    art, _ = compile_plan(prof, "4.5bpw", include_shared=True, include_attention=True)
    assert len(art.shared) == 2 and len(art.attention) == 2 and all(art.shared) and all(art.attention)
    written = json.loads(art.save(tmp_path / "p.json").read_text())
    used, params = independent_bytes(written)
    assert used == written["summary"]["bytes"] <= written["budget"]["bytes"]
    assert written["summary"]["params"] == params
    assert Artifact.load(tmp_path / "p.json").attention == art.attention


def _reseal(path, edit):
    h = json.loads(path.read_text())
    edit(h)
    path.write_bytes(dumps_json(seal(h)))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: h["plan"]["experts"][0]["gate_up"].__setitem__(0, "int5"), "unknown format"),
        (lambda h: h["plan"]["experts"][0].__setitem__("gate_up", ["bf16"] * 16), "granularity|layout"),
        (lambda h: h["budget"].__setitem__("bytes", 1000), "over the budget"),
        (lambda h: h["summary"].__setitem__("bytes", 1), "records 1 bytes"),
        (lambda h: h["layout"][1]["down"].__setitem__("order", [*range(15), 0]), "permutation"),
        (lambda h: h.pop("prefetch"), "missing a field"),
        (lambda h: h.__setitem__("schema_version", 2), "schema version 2"),
    ],
    ids=["unknown-format", "granularity", "over-budget", "bytes-mismatch", "layout", "missing", "schema"],
)
def test_corrupt_artifacts(demo_profile, tmp_path, edit, match):
    path = compile_plan(demo_profile, "int4")[0].save(tmp_path / "p.json")
    _reseal(path, edit)
    with pytest.raises(FormatError, match=match):
        Artifact.load(path)


def test_hand_edited_or_truncated_artifact(demo_profile, tmp_path):
    path = compile_plan(demo_profile, "int4")[0].save(tmp_path / "p.json")
    text = path.read_text()
    path.write_text(text.replace('"int4"', '"int8"', 1))
    with pytest.raises(FormatError, match="modified after it was written"):
        Artifact.load(path)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(FormatError, match="not valid JSON"):
        Artifact.load(path)
