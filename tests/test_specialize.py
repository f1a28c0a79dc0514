"""Pass D: expected rows per active expert against brute-force enumeration, table lookups, plans and the runtime."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import DEMO_MODEL, DEVICE

from exq.compiler.specialize import fit_config, rows_per_active_expert, specialize
from exq.kernels import GemmConfig, GemvConfig
from exq.kernels.tuning import choose, config_to_dict, layer_class, packaged_tables


def test_rows_per_active_expert_matches_enumeration():
    """top-1 routing: tokens are independent draws from the shares, so E[distinct experts] can be enumerated."""
    shares = np.array([0.6, 0.3, 0.1])
    for tokens in (1, 2, 3, 4):
        distinct = 0.0
        for draw in itertools.product(range(3), repeat=tokens):
            distinct += np.prod(shares[list(draw)]) * len(set(draw))
        assert rows_per_active_expert(shares, 1, tokens) == pytest.approx(tokens / distinct)


def test_skewed_routing_fills_experts_sooner():
    uniform = np.full(64, 1 / 64)
    skewed = np.r_[np.full(8, 0.1), np.full(56, 0.2 / 56)]
    assert rows_per_active_expert(skewed, 8, 16) > rows_per_active_expert(uniform, 8, 16) > 1


OLMOE = (64, 2048, 1024, 8)  # experts, hidden, intermediate, top_k
QWEN3 = (128, 2048, 768, 8)


def _table(*entries):
    """Entries (class, rows per expert, config[, dims, tokens]); dims default to OLMOE, tokens to 1."""
    rows = []
    for c, r, cfg, *rest in entries:
        dims, tokens = rest if rest else (OLMOE, 1)
        rows.append({"class": c, "rows_per_expert": r, "config": config_to_dict(cfg), "tokens": tokens,
                     "dims": dict(zip(("experts", "hidden", "intermediate", "top_k"), dims, strict=True))})  # fmt: skip
    return {"entries": rows}


def test_choose_takes_the_nearest_entry_in_log_rows():
    t = _table(("int4", 1.0, GemvConfig(32, 1)), ("int4", 8.0, GemmConfig(16)), ("int4", 64.0, GemmConfig(64)))
    assert choose(t, "int4", 1.2, QWEN3, 1) == GemvConfig(32, 1)
    assert choose(t, "int4", 3.0, QWEN3, 24) == GemmConfig(16)  # log-nearer to 8 than to 1
    assert choose(t, "int4", 500.0, QWEN3, 4096) == GemmConfig(64)
    assert choose(t, "bf16", 3.0, QWEN3, 24) is None


def test_choose_breaks_ties_by_layer_sizes_then_pairs():
    """Rows per active expert tie across shapes (every shape has 1.0 at T = 1; uniform routing gives 16 rows to
    qwen3 at T = 256 and to Mixtral at T = 64): the entry measured on the layer's own sizes wins wherever it is
    listed, then the one nearest in pairs; a nearer entry in rows still beats both (within 1 % counts as a tie)."""
    mixtral = (8, 4096, 14336, 2)
    t = _table(
        ("int4", 1.0, GemvConfig(64, 1, mma=True), (64, 2048, 1408, 6), 1),
        ("int4", 1.0, GemvConfig(64, 2, split_k=2), mixtral, 1),
        ("int4", 1.0, GemvConfig(32, 4), OLMOE, 1),
        ("int4", 16.0, GemmConfig(32, 128, 256), mixtral, 64),
        ("int4", 16.0, GemmConfig(16, 128, 256), QWEN3, 256),
    )
    assert choose(t, "int4", 1.0, OLMOE, 1) == GemvConfig(32, 4)  # its own entry, listed last of the three
    assert choose(t, "int4", 1.0, QWEN3, 1) == GemvConfig(32, 4)  # no own entry: olmoe's has its 8 pairs
    assert choose(t, "int4", 1.0, (60, 2048, 1408, 4), 1) == GemvConfig(64, 1, mma=True)  # 4 pairs: 6 nearer than 8
    assert choose(t, "int4", 1.0, (16, 1024, 512, 2), 1) == GemvConfig(64, 2, split_k=2)  # 2 pairs: Mixtral's
    assert choose(t, "int4", 16.0, QWEN3, 256) == GemmConfig(16, 128, 256)
    assert choose(t, "int4", 16.1, mixtral, 64) == GemmConfig(32, 128, 256)  # within 1 %: still a tie
    assert choose(t, "int4", 1.1, OLMOE, 2) == GemvConfig(32, 4)  # not a tie with 16: nearest rows first
    assert choose(t, "int4", 12.0, OLMOE, 100) == GemmConfig(16, 128, 256)  # 12 -> 16; 800 pairs: 2048 nearer than 128


def test_tables_name_their_schema_and_layer_sizes(tmp_path):
    """A table of the schema before layer sizes is refused with the command that upgrades it, which fills the
    sizes from the bench shape each entry names; an entry with sizes missing or zero is a named error."""
    import subprocess
    import sys
    from pathlib import Path

    from exq.errors import FormatError
    from exq.kernels.tuning import TABLE_FORMAT, TABLE_SCHEMA, validate_table

    entry = {"class": "int4", "shape": "qwen3-30b-a3b", "tokens": 1, "rows_per_expert": 1.0,
             "config": config_to_dict(GemvConfig(32, 4)), "us": 20.0}  # fmt: skip
    old = {"format": TABLE_FORMAT, "schema_version": 1, "gpu": "GPU X", "source": ["a.json"], "entries": [entry]}
    with pytest.raises(FormatError, match="schema 1") as err:
        validate_table(old, "old.json")
    assert "kernel_table.py --base old.json" in str(err.value.hint)
    (tmp_path / "old.json").write_text(json.dumps(old))
    script = Path(__file__).parents[1] / "benchmarks" / "kernel_table.py"
    subprocess.run([sys.executable, str(script), "--base", "old.json", "--output", "new.json"], cwd=tmp_path,
                   check=True, capture_output=True)  # fmt: skip
    new = validate_table(json.loads((tmp_path / "new.json").read_text()), "new.json")
    assert new["schema_version"] == TABLE_SCHEMA and new["source"] == ["a.json"]
    assert new["entries"][0]["dims"] == {"experts": 128, "hidden": 2048, "intermediate": 768, "top_k": 8}
    assert choose(new, "int4", 1.0, QWEN3, 1) == GemvConfig(32, 4)
    for bad in ({"experts": 128, "hidden": 2048}, {"experts": 0, "hidden": 2048, "intermediate": 768, "top_k": 8}):
        with pytest.raises(FormatError, match="bad entry"):
            validate_table(new | {"entries": [new["entries"][0] | {"dims": bad}]}, "new.json")
    with pytest.raises(FormatError, match="missing a field"):
        validate_table(new | {"entries": [{k: v for k, v in new["entries"][0].items() if k != "dims"}]}, "new.json")


def test_shipped_tables_plan_each_cell_its_own_entry():
    """Every packaged table's entry is what pass D plans for a layer of the shape and batch it was measured on
    (uniform routing, as measured): before the tie rule, 10 of the H100 table's cells took another shape's."""
    from exq.bench import SHAPES
    from exq.kernels.tuning import config_from_dict

    for table in packaged_tables().values():
        for e in table["entries"]:
            experts, hidden, inter, k = SHAPES[e["shape"]]
            rows = rows_per_active_expert(np.full(experts, 1 / experts), k, e["tokens"])
            planned = choose(table, e["class"], rows, (experts, hidden, inter, k), e["tokens"])
            assert fit_config(planned, hidden, inter) == fit_config(config_from_dict(e["config"]), hidden, inter), e


def test_configs_survive_tables_and_bench_records():
    """Table entries and the benchmark's config strings read back to the same config, the tensor-core GEMV flag
    included; an old entry without the flag is a CUDA-core GEMV."""
    from exq.errors import FormatError
    from exq.kernels.tuning import config_from_dict, parse_bench_config

    one = GemvConfig(64, 2, 4, 3, mma=True, one_launch=True)
    small = GemmConfig(128, 128, 64, 8, 3, fold_scales=True, small_m=16)  # 8 fields, the last an int: not swap_ab
    for cfg in (GemvConfig(64, 1, 4, 4, 2, mma=True), GemvConfig(32, 4), GemmConfig(64, 128, 128, 4, 3), one, small):
        assert config_from_dict(config_to_dict(cfg)) == cfg
        assert parse_bench_config(type(cfg).__name__ + str(tuple(cfg.as_dict().values()))) == cfg
    old = {"kind": "gemv", "block_n": 32, "groups_per_step": 1, "num_warps": 4, "num_stages": 2, "split_k": 1}
    assert config_from_dict(old) == GemvConfig(32, 1) and not config_from_dict(old).mma
    with pytest.raises(FormatError):
        parse_bench_config("GemvConfig(32, 1, maybe)")
    # the removed swapped tile: recorded off it still reads, on it is a clear error
    inline = GemmConfig(16, 64, 128, 4, 4, True)
    gemm = config_to_dict(inline)
    assert config_from_dict(gemm | {"swap_ab": False}) == inline
    assert parse_bench_config("GemmConfig(16, 64, 128, 4, 4, True, False, False)") == inline
    with pytest.raises(FormatError, match="removed variant"):
        config_from_dict(gemm | {"swap_ab": True})
    with pytest.raises(FormatError, match="removed variant"):
        parse_bench_config("GemmConfig(16, 64, 128, 4, 4, True, False, True)")
    # a field this version does not know (a newer table, a typo): named, not a TypeError from the constructor
    with pytest.raises(FormatError, match="expert_ordr"):
        config_from_dict(config_to_dict(one) | {"expert_ordr": True})
    assert config_from_dict(config_to_dict(replace(one, expert_order=True))).expert_order is True
    # a (gate_up, down) pair: each projection its own GEMV tile
    pair = (GemvConfig(128, 1, 4, 3, mma=True), GemvConfig(64, 2))
    stored = config_to_dict(pair)
    assert stored["down"] == config_to_dict(pair[1]) and config_from_dict(stored) == pair
    assert parse_bench_config(" + ".join(type(c).__name__ + str(tuple(c.as_dict().values())) for c in pair)) == pair
    with pytest.raises(FormatError, match="'down' must hold one config"):
        config_from_dict(stored | {"down": stored})
    with pytest.raises(FormatError):
        parse_bench_config("GemvConfig(32, 1, 4, 2, 1, False) + ")


def test_layer_class_and_fit():
    assert layer_class({"int4", "int4-asym"}) == "int4"
    assert layer_class({"bf16"}) == "bf16"
    assert layer_class({"int4", "bf16", "int8"}) == "mixed"
    assert layer_class({"int4", "int3"}) is None  # not in the tables: the op's default rule
    assert layer_class({"int4", "int2-asym"}) is None
    # each projection fitted to its own K (gate_up reduces over hidden, down over intermediate): one config when
    # both fit it, else a (gate_up, down) pair
    assert fit_config(GemvConfig(32, 4), 2048, 1024) == GemvConfig(32, 4)
    assert fit_config(GemvConfig(32, 4), 2048, 1408) == (GemvConfig(32, 4), GemvConfig(32, 1))  # 1408 = 11 x 128
    # 11 groups: no even split; 6 groups: split 6 (the largest that divides them), gate_up keeps 8
    assert fit_config(GemvConfig(32, 1, split_k=8), 2048, 1408)[1].split_k == 1
    assert fit_config(GemvConfig(32, 1, split_k=8), 2048, 768) == (
        GemvConfig(32, 1, split_k=8),
        GemvConfig(32, 1, split_k=6),
    )
    assert fit_config(GemmConfig(16, 64, 128), 4096, 192) == (GemmConfig(16, 64, 128), GemmConfig(16, 64, 64))
    # two-group steps where K allows them
    assert fit_config(GemmConfig(16, 128, 256), 2048, 1408) == (GemmConfig(16, 128, 256), GemmConfig(16, 128, 128))
    assert fit_config(GemmConfig(16, 128, 256), 2048, 768) == GemmConfig(16, 128, 256)
    assert fit_config((GemvConfig(32, 4), GemvConfig(32, 4)), 2048, 1408) == (GemvConfig(32, 4), GemvConfig(32, 1))
    for cfg in (GemvConfig(64, 4, split_k=4), GemmConfig(16, 128, 512)):  # every fitted K step divides its K
        for gate_up_in, down_in in ((2048, 1408), (4096, 384), (1536, 640), (768, 2944)):  # K % 128 == 0
            fitted = fit_config(cfg, gate_up_in, down_in)
            gu, dn = fitted if isinstance(fitted, tuple) else (fitted, fitted)
            assert gate_up_in % gu.k_step == 0 and down_in % dn.k_step == 0


def test_plans_carry_the_specialisation(demo_profile, tmp_path):
    from exq.compiler import Artifact, compile_plan
    from exq.errors import FormatError

    art, _ = compile_plan(demo_profile, "int4", formats="bf16,int8,int4,int4-asym,int3,int2-asym")
    assert set(art.kernels) == set(packaged_tables())
    for layers in art.kernels.values():
        for li, entry in enumerate(layers):
            fmts = set(art.experts[li]["gate_up"]) | set(art.experts[li]["down"])
            if fmts & {"int3", "int2-asym"}:  # torch (int2), or the op's default rule (int3)
                assert entry is None
            else:
                assert entry["class"] == layer_class(fmts) and "1" in entry["configs"]
    path = art.save(tmp_path / "plan.json")
    assert Artifact.load(path).kernels == art.kernels
    direct = specialize(art.model["structure"], art.experts, art.routing, packaged_tables())
    assert direct == art.kernels
    doc = json.loads(path.read_text())
    gpu = next(iter(doc["kernels"]))
    doc["kernels"][gpu] = doc["kernels"][gpu][:1]
    path.write_text(json.dumps(doc))
    with pytest.raises(FormatError):
        Artifact.load(path)


def test_a_planned_pair_reaches_the_op(monkeypatch):
    """A table entry with a config per projection survives pass D (each fitted to its own K) and the plan's check,
    and the runtime hands the op the pair."""
    from exq.compiler.artifact import check_kernels
    from exq.runtime.experts import planned_config

    table = _table(("int4", 1.0, (GemvConfig(32, 4), GemvConfig(64, 4))))
    structure = {"moe_layers": [{"hidden_size": 2048, "intermediate_size": 768, "num_experts": 64, "top_k": 8}]}
    plan = specialize(structure, [{"gate_up": ["int4"], "down": ["int4"]}], None, {"GPU X": table})
    assert check_kernels(plan, 1) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    # down reduces over 768 = 6 groups: 2 per step, not 4; gate_up over 2048 keeps 4
    layer_plan = {"GPU X": plan["GPU X"][0]}  # what the loader keeps on each MoE layer
    assert planned_config(layer_plan, 1, torch.device("cuda")) == (GemvConfig(32, 4), GemvConfig(64, 2))
    # a table without the layer's class plans nothing for it: the op's default rule, also for an empty entry
    assert specialize(structure, [{"gate_up": ["bf16"], "down": ["bf16"]}], None, {"GPU X": table}) == {"GPU X": [None]}
    assert planned_config({"GPU X": {"class": "int4", "configs": {}}}, 1, torch.device("cuda")) is None


def test_runtime_module_runs_the_fused_op(tmp_path):
    """QuantizedExperts with kernels on equals the reference path on transformers-style inputs."""
    from exq.kernels.synthetic import mixed_formats, random_experts

    mod = random_experts(8, 256, 128, mixed_formats(8, {"bf16": 0.25, "int8": 0.25, "int4": 0.5}), device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 256, generator=gen).to(torch.bfloat16).to(DEVICE)
    w, ids = torch.topk(torch.randn(6, 8, generator=gen).softmax(-1), 2)
    w, ids = w.to(DEVICE), ids.to(DEVICE)  # fp32 weights and int64 ids, as routers hand them over
    mod.kernels = "off"
    ref = mod(x, ids, w)
    mod.kernels = "on"
    out = mod(x, ids, w)
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2


def test_loaded_checkpoint_runs_the_fused_op(demo_profile, tmp_path, monkeypatch):
    """exq.load with kernels on and off: the same model to bf16 rounding."""
    import exq
    import exq.kernels.moe_op as op
    from exq.compiler import compile_plan
    from exq.models import load_model
    from exq.quant.apply import quantize_experts
    from exq.quant.checkpoint import write_checkpoint
    from exq.runtime.experts import QuantizedExperts

    art, _ = compile_plan(demo_profile, "int4", formats="bf16,int8,int4,int4-asym")
    model = load_model(DEMO_MODEL, device="cpu")
    out = write_checkpoint(
        model, art, quantize_experts(model, art, None, "rtn", False), tmp_path / "q", DEMO_MODEL, "rtn"
    )
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    calls = []
    real = op.fused_moe
    monkeypatch.setattr(op, "fused_moe", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits = {}
    for mode in ("off", "on"):
        q = exq.load(out, device=DEVICE, kernels="auto")
        for m in q.modules():
            if isinstance(m, QuantizedExperts):
                assert m.kernel_plan  # pass D's choices travel in the checkpoint
                m.kernels = mode
        logits[mode] = torch.log_softmax(q(input_ids=ids.to(DEVICE)).logits.float(), -1)
    from exq.eval.logits import eager_experts

    exq_mods = [m for m in q.modules() if isinstance(m, QuantizedExperts)]
    with eager_experts(q):  # evaluation compares every variant on the reference path
        assert all(m.kernels == "off" for m in exq_mods)
    assert all(m.kernels == "on" for m in exq_mods)
    kl = (logits["off"].exp() * (logits["off"] - logits["on"])).sum(-1).mean()
    assert len(calls) == len(art.experts)  # every MoE layer went through the op once, only with kernels on
    assert float(kl) < 1e-3


def test_kernel_table_merges_runs(tmp_path):
    """benchmarks/kernel_table.py: later files override a cell, files after --if-faster only with a faster time, and
    plans that are not table classes (int3) make no entry."""
    import subprocess
    import sys
    from pathlib import Path

    def row(plan, tokens, cfg, us):
        return {"shape": "olmoe-1b-7b", "plan": plan, "tokens": tokens, "exq_config": cfg, "exq_us": us}

    runs = {
        "a.json": [row("int4", 1, "GemvConfig(32, 4, 4, 2, 1, False)", 20.0),
                   row("int4", 4, "GemvConfig(64, 2, 4, 2, 1, False)", 50.0)],
        "b.json": [row("int4", 1, "GemvConfig(64, 1, 4, 4, 1, True)", 21.0),
                   row("int4", 4, "GemmConfig(16, 128, 256, 4, 3, True, False)", 49.0),
                   row("int3", 1, "GemvConfig(32, 1, 4, 2, 1, False)", 40.0)],
    }  # fmt: skip
    for name, rows in runs.items():
        (tmp_path / name).write_text(json.dumps({"device": "GPU X", "rows": rows}))
    script = Path(__file__).parents[1] / "benchmarks" / "kernel_table.py"

    def table(*args) -> dict:
        out = tmp_path / "t.json"
        subprocess.run([sys.executable, str(script), *args, "--output", str(out)], check=True, cwd=tmp_path,
                       capture_output=True)  # fmt: skip
        return {e["tokens"]: (e["config"], e["us"]) for e in json.loads(out.read_text())["entries"]}

    later = table("a.json", "b.json")
    assert later[1] == ({"kind": "gemv", **GemvConfig(64, 1, 4, 4, 1, True).as_dict()}, 21.0)
    faster = table("a.json", "--if-faster", "b.json")
    assert faster[1] == ({"kind": "gemv", **GemvConfig(32, 4, 4, 2).as_dict()}, 20.0)
    assert faster[4][1] == 49.0 and faster[4][0]["kind"] == "gemm"
    assert set(faster) == {1, 4}  # the int3 row made no entry
    # --base: a shipped table updated by a targeted run (here: only the faster T = 4 cell of b.json replaces a's)
    table("a.json")
    (tmp_path / "base.json").write_text((tmp_path / "t.json").read_text())
    updated = table("--base", str(tmp_path / "base.json"), "--if-faster", "b.json")
    assert updated[1][1] == 20.0 and updated[4][1] == 49.0
    assert json.loads((tmp_path / "t.json").read_text())["source"] == ["a.json", "b.json"]


def test_kernel_table_names_a_bad_input_and_writes_nothing(tmp_path):
    """benchmarks/kernel_table.py: a missing or malformed result or base table stops with a message naming the file,
    before the output is written."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "kernel_table.py"
    (tmp_path / "bad.json").write_text(json.dumps({"rows": "not a list"}))
    row = {"shape": "no-such-model", "plan": "int4", "tokens": 1, "exq_config": "GemvConfig(32, 4, 4, 2, 1, False)",
           "exq_us": 20.0}  # fmt: skip
    (tmp_path / "unknown.json").write_text(json.dumps({"device": "GPU X", "rows": [row]}))
    shapeless = {"class": "int4", "tokens": 1, "rows_per_expert": 1.0, "config": {}, "us": 1.0}
    old_table = {"format": "exq-kernel-table", "schema_version": 1, "gpu": "X", "source": [], "entries": [shapeless]}
    (tmp_path / "shapeless.json").write_text(json.dumps(old_table))
    out = tmp_path / "t.json"
    for args, said in (
        (["bad.json"], "bad.json is not an `exq bench kernels` result"),
        (["unknown.json"], "shape 'no-such-model' is not one of exq bench's shapes"),
        (["--base", "shapeless.json"], "shapeless.json: an entry without its shape"),
        (["missing.json"], "missing.json does not exist"),
        (["--base", "bad.json", "--if-faster", "missing.json"], "bad.json is not an exq kernel table"),
        ([], "no benchmark results given"),
    ):
        run = subprocess.run([sys.executable, str(script), *args, "--output", str(out)], cwd=tmp_path,
                             capture_output=True, text=True)  # fmt: skip
        assert run.returncode != 0 and said in run.stderr and "Traceback" not in run.stderr, run.stderr
        assert not out.exists()


def test_pass_d_choice_script_compares_the_rules(monkeypatch):
    """benchmarks/pass_d_choice.py: on the shipped H100 table the rule before v20 gave qwen3's int4 T = 256 cell
    Mixtral's 32-row tile (both at 16 rows per expert) and every T = 1 cell DeepSeek's entry; pass D's rule gives
    each its own entry, which is what the script times as `best`. Without a GPU it stops with a message."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "pass_d_choice.py"
    monkeypatch.syspath_prepend(str(script.parent))
    import pass_d_choice

    table = packaged_tables()["NVIDIA H100 80GB HBM3"]
    qwen = pass_d_choice.picks(table, "qwen3-30b-a3b", "int4", 256)
    assert qwen["planned"] == qwen["best"] == GemmConfig(16, 128, 256, 4, 3)
    assert qwen["rows_only"] == GemmConfig(32, 128, 256, 4, 3, small_m=16)  # Mixtral T = 64 (v25)
    olmoe = pass_d_choice.picks(table, "olmoe-1b-7b", "bf16", 1)
    deepseek = pass_d_choice.picks(table, "deepseek-v2-lite", "bf16", 1)
    assert olmoe["planned"] == olmoe["best"] != deepseek["best"] == olmoe["rows_only"]
    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
        assert run.returncode != 0 and "machine with a GPU" in run.stderr and "Traceback" not in run.stderr


def test_pass_d_choice_rows_feed_the_table(tmp_path):
    """pass_d_choice.py records a cell's fastest timed config as a benchmark result does: a named config, or the
    default rule's two configs when it won; kernel_table.py turns either into the entry pass D then plans."""
    import subprocess
    import sys
    from pathlib import Path

    from exq.bench import SHAPES
    from exq.kernels.tuning import config_from_dict

    script = Path(__file__).parents[1] / "benchmarks"
    sys.path.insert(0, str(script))
    try:
        from pass_d_choice import table_fields
    finally:
        sys.path.remove(str(script))
    tile = "GemmConfig(16, 128, 256, 4, 3, True, False)"
    won = table_fields({tile: 50.0, "default": 55.0}, "int4", 4, SHAPES["olmoe-1b-7b"])
    assert won["exq_config"] == tile and won["exq_us"] == 50.0 and won["exq_sweep"] == {tile: 50.0}
    lost = table_fields({tile: 60.0, "default": 55.0}, "int4", 4, SHAPES["olmoe-1b-7b"])
    assert lost["exq_config"] is None and lost["exq_us"] == 55.0 and len(lost["exq_default_config"]) == 2
    rows = [{"shape": "olmoe-1b-7b", "plan": "int4", "tokens": 4} | won,
            {"shape": "qwen3-30b-a3b", "plan": "int4", "tokens": 4} | lost]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps({"device": "GPU X", "rows": rows}))
    subprocess.run([sys.executable, str(script / "kernel_table.py"), "r.json", "--output", "t.json"], cwd=tmp_path,
                   check=True, capture_output=True)  # fmt: skip
    entries = {e["shape"]: e for e in json.loads((tmp_path / "t.json").read_text())["entries"]}
    assert config_from_dict(entries["olmoe-1b-7b"]["config"]) == GemmConfig(16, 128, 256, 4, 3, True)
    from exq.bench.kernels import config_name

    gu, dn = lost["exq_default_config"]
    qwen = config_from_dict(entries["qwen3-30b-a3b"]["config"])
    assert config_name(qwen) == (gu if gu == dn else f"{gu} + {dn}")
    assert entries["qwen3-30b-a3b"]["us"] == 55.0
