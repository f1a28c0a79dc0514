"""`exq bench kernels` on any model's shape, and the kernel table a run writes feeding pass D (`exq compile
--kernel-table`): a user of a GPU exq ships no table for measures one and plans with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DEMO_MODEL

from exq.bench import SHAPES
from exq.bench.shapes import resolve_shapes
from exq.cli import main
from exq.errors import ExqError, FormatError
from exq.kernels import GemmConfig, GemvConfig
from exq.kernels.tuning import config_from_dict, kernel_tables, packaged_tables, table_from_results

SHARED_MODELS = Path(__file__).parents[2] / "shared" / "models"


def test_shapes_by_name_sizes_and_model_folder():
    """A model folder's shapes are those of its MoE layers as exq's adapters see them on the loaded model (the
    reference: the real weights' sizes), read here from the config alone."""
    from exq.models import load_model
    from exq.models.registry import moe_layers

    got = resolve_shapes(["qwen3-30b-a3b", "qwen1.5=60,2048,1408,4", "8,4096,14336,2", str(DEMO_MODEL)])
    assert got["qwen3-30b-a3b"] == SHAPES["qwen3-30b-a3b"]
    assert got["qwen1.5"] == (60, 2048, 1408, 4) and got["e8-h4096-i14336-k2"] == (8, 4096, 14336, 2)
    loaded = {(m.num_experts, m.hidden_size, m.intermediate_size, m.top_k) for m in moe_layers(load_model(DEMO_MODEL))}
    assert got[DEMO_MODEL.name] in loaded and len(loaded) == 1
    for name in ("olmoe-mini", "qwen3moe-mini"):  # two families, when the shared fixtures are beside the checkout
        if (SHARED_MODELS / name).is_dir():
            layers = moe_layers(load_model(SHARED_MODELS / name, device="cpu"))
            want = {(m.num_experts, m.hidden_size, m.intermediate_size, m.top_k) for m in layers}
            assert set(resolve_shapes([str(SHARED_MODELS / name)]).values()) == want


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3"])
def test_every_supported_family_gives_its_layers_shapes(family, tmp_path):
    """Each family's config (sizes made whole groups of 128) read on the meta device gives the sizes of the MoE
    layers of the same model built for real (dense layers and shared experts left out)."""
    import copy

    from tiny_models import tiny_configs
    from transformers import AutoModelForCausalLM

    from exq.models.registry import moe_layers

    config = copy.deepcopy(tiny_configs()[family])
    config.hidden_size = 128
    for field in ("intermediate_size", "moe_intermediate_size"):
        if getattr(config, field, None):
            setattr(config, field, 128)
    config.save_pretrained(tmp_path / family)
    built = {(m.num_experts, m.hidden_size, m.intermediate_size, m.top_k)
             for m in moe_layers(AutoModelForCausalLM.from_config(config))}  # fmt: skip
    assert resolve_shapes([str(tmp_path / family)]) == {family: next(iter(built))} and len(built) == 1


@pytest.mark.parametrize(
    ("spec", "said"),
    [
        ("nope", "not a known shape, a model folder or E,H,I,K sizes"),
        ("60,2048,1400,4", "intermediate 1400 not a multiple of 128"),
        ("1,2,3", "give four integers"),
        ("a=4,128,x,2", "give four integers"),
        ("a=4,128,128,8", "top_k (8) at most the experts (4)"),
    ],
)
def test_bad_shape_specs_are_named(spec, said):
    with pytest.raises(ExqError, match="shape") as err:
        resolve_shapes([spec])
    assert said in str(err.value)


def test_a_hub_model_that_cannot_be_read_is_named(monkeypatch):
    """org/name is read as a hub model's config; offline and not cached, that is a clear error, no traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExqError, match="cannot read the model config of nobody-here/no-such-moe"):
        resolve_shapes(["nobody-here/no-such-moe"])


def test_two_shapes_of_one_name_are_refused():
    with pytest.raises(ExqError, match="two shapes are named 'x'"):
        resolve_shapes(["x=8,128,128,2", "x=16,128,128,2"])


def test_bench_cli_names_a_bad_shape_before_any_gpu_work(capsys, tmp_path):
    assert main(["bench", "kernels", "--shapes", "60,2048,1400,4", "--output", str(tmp_path / "k.json")]) != 0
    err = capsys.readouterr().err
    assert "not a multiple of 128" in err and "Traceback" not in err
    assert not (tmp_path / "k.json").exists()


def _result(device: str, rows: list[dict]) -> dict:
    return {"device": device, "torch": "t", "triton": "t", "sglang": None, "layers_per_graph": 8, "reps": 50,
            "floors": {"copy_bytes_per_s": 3e12, "bf16_flops": 7e14}, "rows": rows}  # fmt: skip


def _row(shape: str, dims: tuple, tokens: int, cfg, us: float, plan: str = "int4") -> dict:
    from exq.bench.kernels import config_name

    return {"shape": shape, "dims": list(dims), "plan": plan, "tokens": tokens, "pairs": tokens * dims[3],
            "exq_us": us, "exq_config": config_name(cfg), "hbm_floor_us": 1.0, "compute_floor_us": 0.1,
            "exq_pct_of_hbm_floor": 100 / us}  # fmt: skip


def test_bench_table_option_writes_and_updates_a_table(monkeypatch, tmp_path, capsys):
    """`--table`: the run's winners become a table of its GPU (custom shapes keyed by their recorded sizes); a second
    run updates it, its own cells replacing those of the first."""
    import exq.bench.kernels as bk

    dims = (32, 256, 128, 4)
    first_rows = [_row("mine", dims, 1, GemvConfig(32, 4), 9.0), _row("mine", dims, 64, GemmConfig(16, 64, 128), 30.0)]
    runs = iter(
        [_result("GPU X", first_rows), _result("GPU X", [_row("mine", dims, 64, GemmConfig(32, 64, 128), 25.0)])]
    )
    seen = []

    def fake_run(shapes, tokens, layers, reps, wheel, output, plans):
        seen.append(shapes)
        result = next(runs)
        output.write_text(json.dumps(result))
        return result

    monkeypatch.setattr(bk, "run", fake_run)
    table_path = tmp_path / "gpu-x.json"
    args = ["bench", "kernels", "--shapes", "mine=32,256,128,4", "--output", str(tmp_path / "r.json")]
    assert main([*args, "--table", str(table_path)]) == 0
    assert seen[0] == {"mine": dims}
    first = json.loads(table_path.read_text())
    assert first["gpu"] == "GPU X" and len(first["entries"]) == 2
    assert all(e["dims"] == {"experts": 32, "hidden": 256, "intermediate": 128, "top_k": 4} for e in first["entries"])
    assert main([*args, "--table", str(table_path)]) == 0
    entries = {e["tokens"]: e for e in json.loads(table_path.read_text())["entries"]}
    assert config_from_dict(entries[64]["config"]) == GemmConfig(32, 64, 128) and entries[64]["us"] == 25.0
    assert config_from_dict(entries[1]["config"]) == GemvConfig(32, 4)  # kept from the first run
    assert "kernel table" in capsys.readouterr().out


def test_bench_table_option_refuses_a_bad_table_before_running(monkeypatch, tmp_path, capsys):
    """`--table` naming a file that is not a kernel table, or one of another GPU, stops before the benchmark runs
    and leaves the file as it was."""
    import torch

    import exq.bench.kernels as bk

    monkeypatch.setattr(bk, "run", lambda *a, **k: pytest.fail("the benchmark ran"))
    args = ["bench", "kernels", "--shapes", "mine=32,256,128,4", "--output", str(tmp_path / "r.json"), "--table"]
    (tmp_path / "notes.json").write_text('{"rows": []}')
    assert main([*args, str(tmp_path / "notes.json")]) != 0
    assert "not an exq kernel table" in capsys.readouterr().err
    assert (tmp_path / "notes.json").read_text() == '{"rows": []}'
    rows = [_row("mine", (32, 256, 128, 4), 1, GemvConfig(32, 4), 9.0)]
    (tmp_path / "y.json").write_text(json.dumps(table_from_results([("r.json", _result("GPU Y", rows))])))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    assert main([*args, str(tmp_path / "y.json")]) != 0
    err = capsys.readouterr().err
    assert "is for GPU Y, this GPU is GPU X" in err and "Traceback" not in err


def test_a_users_table_feeds_pass_d(demo_profile, tmp_path, capsys):
    """A table measured on another GPU for the demo model's own shape: `exq compile --kernel-table` plans that GPU
    with the table's configs, beside the shipped tables; a table of a shipped GPU is merged into its shipped one."""
    from exq.compiler import Artifact
    from exq.compiler.specialize import BATCH_SIZES

    dims = _demo_dims()
    gemv, gemm = GemvConfig(32, 1), GemmConfig(16, 64, 128)  # K steps that fit the demo's 128 / 128 reductions
    rows = [_row("demo", dims, 1, gemv, 5.0), _row("demo", dims, 64, gemm, 20.0)]
    table = table_from_results([("r.json", _result("GPU X", rows))])
    (tmp_path / "x.json").write_text(json.dumps(table))
    profile = tmp_path / "profile.json"
    demo_profile.save(profile)
    out = tmp_path / "plan.json"
    args = ["compile", "--profile", str(profile), "--budget", "int4", "--formats", "bf16,int4", "--output", str(out)]
    assert main([*args, "--kernel-table", str(tmp_path / "x.json")]) == 0
    kernels = Artifact.load(out).kernels
    assert set(kernels) == {"GPU X", *packaged_tables()}
    planned = [layer for layer in kernels["GPU X"] if layer is not None]
    assert planned and all(layer["class"] == "int4" for layer in planned)
    for layer in planned:
        assert config_from_dict(layer["configs"]["1"]) == gemv
        assert config_from_dict(layer["configs"][str(BATCH_SIZES[-1])]) == gemm
    # on a GPU exq ships a table for, the user's cells join it: the demo's shape plans its own measured configs
    h100, shipped = next(iter(packaged_tables().items()))
    (tmp_path / "h100.json").write_text(json.dumps(table | {"gpu": h100}))
    merged = kernel_tables([tmp_path / "h100.json"])
    assert set(merged) == set(packaged_tables())
    assert len(merged[h100]["entries"]) == len(shipped["entries"]) + len(table["entries"])
    assert main([*args, "--kernel-table", str(tmp_path / "h100.json")]) == 0
    mine = Artifact.load(out).kernels[h100]
    assert config_from_dict(next(layer for layer in mine if layer)["configs"]["1"]) == gemv
    assert Artifact.load(out).kernels[h100] != compile_default_h100(demo_profile, h100)
    # a cell is its layer sizes, class and batch, whatever the run named the shape
    replaced = table_from_results([("r.json", _result(h100, [_row("my-olmoe", SHAPES["olmoe-1b-7b"], 1, gemv, 1.0)]))])
    (tmp_path / "olmoe.json").write_text(json.dumps(replaced))
    entries = kernel_tables([tmp_path / "olmoe.json"])[h100]["entries"]
    cells = {(tuple(e["dims"].values()), e["class"], e["tokens"]): e for e in entries}
    assert cells[SHAPES["olmoe-1b-7b"], "int4", 1]["us"] == 1.0 and len(entries) == len(shipped["entries"])
    with pytest.raises(FormatError, match="both kernel tables for GPU X"):
        kernel_tables([tmp_path / "x.json", tmp_path / "x.json"])
    (tmp_path / "bad.json").write_text("{}")
    assert main([*args, "--kernel-table", str(tmp_path / "bad.json")]) != 0
    assert "not an exq kernel table" in capsys.readouterr().err


def compile_default_h100(profile, gpu: str) -> list:
    from exq.compiler import compile_plan

    art, _ = compile_plan(profile, "int4", formats="bf16,int4")
    return art.kernels[gpu]


def test_tables_of_two_gpus_do_not_mix():
    rows = [_row("olmoe-1b-7b", SHAPES["olmoe-1b-7b"], 1, GemvConfig(32, 4), 9.0)]
    with pytest.raises(FormatError, match="measured on GPU Y, not GPU X"):
        table_from_results([("a.json", _result("GPU X", rows)), ("b.json", _result("GPU Y", rows))])


def test_load_and_serve_plan_a_checkpoint_again_with_a_users_table(demo_checkpoint, tmp_path, monkeypatch, capsys):
    """A table measured after quantizing reaches a checkpoint without re-quantizing: `exq.load(kernel_tables=...)`
    plans every MoE layer again from the checkpoint's plan; the runtime then takes the table's configs on that GPU,
    and the shipped GPU's plan comes out as stored. `exq serve --kernel-table` checks the table before anything."""
    import types

    import torch

    from exq.runtime import load
    from exq.runtime.experts import QuantizedExperts, planned_config

    ckpt = demo_checkpoint("4.5bpw")
    plain = {n: m.kernel_plan for n, m in load(ckpt, device="cpu").named_modules() if isinstance(m, QuantizedExperts)}
    gemv, gemm = GemvConfig(32, 1), GemmConfig(16, 64, 128)
    rows = [_row("demo", _demo_dims(), t, cfg, us, plan) for plan in ("int4", "mixed")
            for t, cfg, us in ((1, gemv, 5.0), (64, gemm, 20.0))]  # fmt: skip
    (tmp_path / "x.json").write_text(json.dumps(table_from_results([("r.json", _result("GPU X", rows))])))
    model = load(ckpt, device="cpu", kernel_tables=[tmp_path / "x.json"])
    replanned = {n: m.kernel_plan for n, m in model.named_modules() if isinstance(m, QuantizedExperts)}
    assert replanned.keys() == plain.keys() and plain
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    for name, plan in replanned.items():
        assert {gpu: plan[gpu] for gpu in plain[name]} == plain[name]  # the shipped GPUs: as stored
        assert "GPU X" not in plain[name]
        assert planned_config(plan, 1, types.SimpleNamespace(type="cuda")) == gemv
        assert planned_config(plan, 300, types.SimpleNamespace(type="cuda")) == gemm
    from exq.serve import build

    _, engine = build(ckpt, device="cpu", max_batch=1, own_engine=False, kernel_tables=[tmp_path / "x.json"])
    served = {n: m.kernel_plan for n, m in engine.model.named_modules() if isinstance(m, QuantizedExperts)}
    assert served == replanned
    (tmp_path / "bad.json").write_text("[]")
    for extra in (["--kernel-table", str(tmp_path / "bad.json")], ["--engine", "vllm", "--kernel-table", "x.json"]):
        assert main(["serve", "--model", str(ckpt), "--port", "1", *extra]) != 0
        err = capsys.readouterr().err
        assert ("not an exq kernel table" in err or "exq's own engine" in err) and "Traceback" not in err


def _demo_dims() -> tuple:
    from exq.models import load_model
    from exq.models.registry import moe_layers

    m = moe_layers(load_model(DEMO_MODEL))[0]
    return m.num_experts, m.hidden_size, m.intermediate_size, m.top_k
