"""Contract tests of the SGLang plugin against SGLang's own classes, on CPU (Triton interpreter).

The plugin is loaded through SGLang's entry-point mechanism, a real FusedMoE layer is built with exq's method,
its weights come from an exq checkpoint through the parameters' own weight loaders, and `forward` / `apply` run exq's
fused kernel; the reference is exq's torch path on the same checkpoint (float32 math).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

# Run by scripts/test_engines.sh in its own venv (SGLang installed); the main suite deselects them (-m "not engines").
pytestmark = pytest.mark.engines

PREFIX = "model.layers.1.mlp.experts"


@pytest.fixture(scope="module")
def checkpoint(demo_checkpoint) -> Path:
    return demo_checkpoint("6bpw")


@pytest.fixture(scope="module")
def sgl_runtime():
    """SGLang's process state for building layers on CPU: published server args, a 1-rank gloo group."""
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.runtime_context import SpawnRanks, publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path="dummy", device="cpu"), role="scheduler", ranks=SpawnRanks(world_rank=0))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(
        world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo"
    )
    initialize_model_parallel()


def test_entry_point_registers_the_method_and_the_cli_choice(checkpoint):
    from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    from exq.integrations.sglang_method import ExqConfig

    load_plugins()
    assert QUANTIZATION_METHODS["exq"] is ExqConfig and get_quantization_config("exq") is ExqConfig
    assert QUANTIZATION_CHOICES.count("exq") == 1
    args = prepare_server_args(["--model-path", str(checkpoint), "--quantization", "exq", "--device", "cpu"])
    assert args.quantization == "exq"


def _quant_config(checkpoint):
    from exq.integrations.sglang_method import ExqConfig

    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    return ExqConfig.from_config(qc | {"packed_modules_mapping": {}, "hf_config": None}), qc


def _layer(checkpoint, quant_config):
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    from exq.quant.checkpoint import QUANTIZED_FILE

    spec = quant_config.spec_for(PREFIX)
    layer = FusedMoE(
        num_experts=spec["num_experts"], hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        layer_id=1, top_k=4, params_dtype=torch.bfloat16, quant_config=quant_config, prefix=PREFIX,
    )  # fmt: skip
    from safetensors.torch import load_file

    params = dict(layer.named_parameters(prefix=PREFIX))
    loaded = 0
    for name, tensor in load_file(checkpoint / QUANTIZED_FILE).items():
        if name in params:  # what the models' load_weights do for names outside their expert mapping
            params[name].weight_loader(params[name], tensor)
            loaded += 1
    assert loaded == len(params)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def _reference(checkpoint, x, ids, w):
    import exq

    model = exq.load(checkpoint, device="cpu", dtype=torch.float32, kernels="off")
    experts = model.get_submodule(PREFIX)
    return experts(x.float(), ids.long(), w.float())


def _routing(t: int, e: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 128, generator=g).to(torch.bfloat16)
    logits = torch.randn(t, e, generator=g)
    w, ids = torch.topk(logits.softmax(-1), k)
    return x, logits, (w / w.sum(-1, keepdim=True)).float(), ids.to(torch.int32)


def test_fused_moe_layer_loads_the_checkpoint_and_matches_exq(checkpoint, sgl_runtime):
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    from exq.integrations.sglang_method import ExqMoEMethod

    cfg, _ = _quant_config(checkpoint)
    assert len({f for b in ("gate_up", "down") for f, _, _ in cfg.spec_for(PREFIX)[b]["slabs"]}) >= 2  # mixed layer
    layer = _layer(checkpoint, cfg)
    assert isinstance(layer.quant_method, ExqMoEMethod)
    x, logits, w, ids = _routing(7, 16, 4, 0)
    out = layer.forward(x, StandardTopKOutput(topk_weights=w, topk_ids=ids, router_logits=logits))
    ref = _reference(checkpoint, x, ids, w)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def _sharded(spec: dict, tensors: dict, ep: tuple[int, int], tp: tuple[int, int]):
    """exq's method on one (EP, TP) rank, driven the way FusedMoE drives it: local expert count and intermediate
    size, whole checkpoint slabs handed to each parameter's weight_loader."""
    from types import SimpleNamespace

    from torch import nn

    from exq.integrations.sglang_method import ExqMoEMethod

    method, layer = ExqMoEMethod(spec), nn.Module()
    layer.moe_ep_rank, layer.moe_ep_size = ep
    layer.moe_tp_rank, layer.moe_tp_size = tp
    method.create_weights(
        layer, spec["num_experts"] // ep[1], spec["hidden_size"], spec["intermediate_size"] // tp[1], torch.bfloat16
    )
    params = dict(layer.named_parameters(prefix=PREFIX))
    assert set(params) == {f"{PREFIX}.{k}" for k in tensors}
    for name, t in tensors.items():
        params[f"{PREFIX}.{name}"].weight_loader(params[f"{PREFIX}.{name}"], t)
    method.create_moe_runner(layer, SimpleNamespace(activation="silu"))
    method.process_weights_after_loading(layer)
    return method, layer


@pytest.mark.parametrize("ep,tp", [(2, 1), (1, 2), (2, 2)])
def test_expert_and_tensor_parallel_ranks_sum_to_the_whole_layer(ep, tp):
    """Each rank keeps its experts (EP: others' ids arrive as -1) and its slice of the intermediate dimension (TP:
    gate and up rows, down columns, whole scale groups); the ranks' outputs add up to the layer (what the engine's
    all-reduce does)."""
    from types import SimpleNamespace

    from exq.kernels.synthetic import mixed_formats, random_experts

    fmts = mixed_formats(8, {"bf16": 0.25, "int8": 0.25, "int4": 0.25, "int4-asym": 0.25}, seed=3)
    ref_mod = random_experts(8, 128, 256, fmts, seed=4)
    spec = {"module": PREFIX, "num_experts": 8, "hidden_size": 128, "intermediate_size": 256,
            "gate_up": {"order": ref_mod.gate_up.order, "slabs": ref_mod.gate_up.slab_spec},
            "down": {"order": ref_mod.down.order, "slabs": ref_mod.down.slab_spec}}  # fmt: skip
    tensors = {k: v for k, v in ref_mod.state_dict().items() if ".slabs." in k}
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 128, generator=g).to(torch.bfloat16)
    w, ids = torch.topk(torch.randn(6, 8, generator=g).softmax(-1), 3)
    w = (w / w.sum(-1, keepdim=True)).float()
    total = torch.zeros(6, 128)
    per = 8 // ep
    for e_rank in range(ep):
        local = torch.where((ids >= e_rank * per) & (ids < (e_rank + 1) * per), ids - e_rank * per, -1)
        for t_rank in range(tp):
            method, layer = _sharded(spec, tensors, (e_rank, ep), (t_rank, tp))
            topk = SimpleNamespace(topk_weights=w, topk_ids=local.to(torch.int32))
            out = method.apply(layer, SimpleNamespace(hidden_states=x, topk_output=topk)).hidden_states
            total += out.float()
    ref = ref_mod(x.float(), ids, w)
    assert (total - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_tensor_parallel_needs_128_per_rank(checkpoint):
    from exq.errors import ExqError

    cfg, _ = _quant_config(checkpoint)
    spec = cfg.spec_for(PREFIX)  # intermediate 128: two ranks would get 64 each
    with pytest.raises(ExqError, match="multiple of 128"):
        _sharded(spec, {}, (0, 1), (0, 2))


def test_bad_checkpoints_are_refused_with_a_reason(checkpoint):
    from exq.errors import ExqError
    from exq.integrations.sglang import check_version
    from exq.integrations.sglang_method import ExqConfig

    _, qc = _quant_config(checkpoint)
    with pytest.raises(ExqError, match="int2-asym"):
        ExqConfig(qc | {"formats": qc["formats"] | {"int2-asym": {}}})
    with pytest.raises(ExqError, match="version"):
        ExqConfig(qc | {"checkpoint_version": 999})
    with pytest.raises(ExqError, match="no experts module"):
        ExqConfig(qc).spec_for("model.layers.99.mlp.experts")
    import sglang

    with pytest.raises(ExqError, match="not supported"):
        check_version("0.4.9")
    check_version(sglang.__version__)


def test_exq_serve_engine_sglang_builds_a_command_sglang_accepts(checkpoint):
    """`exq serve --engine sglang` hands over to SGLang's launcher with arguments SGLang's own parser takes."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    from exq.serve.engines import check_engine, command

    check_engine("sglang")
    argv = command("sglang", checkpoint, "127.0.0.1", 30000, ["--tp-size", "1"])
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    load_plugins()
    args = prepare_server_args([*argv[3:], "--device", "cpu"])
    assert (args.quantization, args.port, args.host, args.model_path) == ("exq", 30000, "127.0.0.1", str(checkpoint))
