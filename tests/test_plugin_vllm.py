"""Contract tests of the vLLM plugin against vLLM's own classes, on CPU (Triton interpreter, VLLM_TARGET_DEVICE=cpu).

The plugin is loaded through vLLM's general-plugin mechanism; a real MoE layer (FusedMoEFactory -> MoERunner ->
RoutedExperts) is built with exq's method, loads an exq checkpoint through vLLM's own `load_weights` path, and
`apply` runs exq's fused kernel; the reference is exq's torch path on the same checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.engines  # run by scripts/test_engines.sh (vLLM installed); deselected in the main suite

PREFIX = "model.layers.1.mlp.experts"


@pytest.fixture(scope="module")
def checkpoint(demo_checkpoint) -> Path:
    return demo_checkpoint("6bpw")


@pytest.fixture(scope="module")
def vllm_context():
    """vLLM's process state for building a MoE layer on CPU: a current config and a 1-rank gloo group."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, "gloo")
        ensure_model_parallel_initialized(1, 1)
        yield


def _quant_config(checkpoint):
    from exq.integrations.vllm_method import ExqVllmConfig

    qc = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    return ExqVllmConfig.from_config(qc), qc


def _tensors(checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's slabs of the layer, named relative to the experts module (what vLLM's loader passes on)."""
    from safetensors.torch import load_file

    from exq.quant.checkpoint import QUANTIZED_FILE

    return {
        k.removeprefix(PREFIX + "."): v
        for k, v in load_file(checkpoint / QUANTIZED_FILE).items()
        if k.startswith(PREFIX + ".")
    }


def _reference(checkpoint, x, ids, w):
    import exq

    model = exq.load(checkpoint, device="cpu", dtype=torch.float32, kernels="off")
    return model.get_submodule(PREFIX)(x.float(), ids.long(), w.float())


def _routing(t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 128, generator=g).to(torch.bfloat16)
    w, ids = torch.topk(torch.randn(t, 16, generator=g).softmax(-1), 4)
    return x, (w / w.sum(-1, keepdim=True)).float(), ids.to(torch.int32)


def test_general_plugin_registers_the_method(checkpoint):
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_general_plugins

    from exq.integrations.vllm_method import ExqVllmConfig

    load_general_plugins()
    load_general_plugins()  # idempotent
    assert QUANTIZATION_METHODS.count("exq") == 1 and get_quantization_config("exq") is ExqVllmConfig


def test_moe_layer_loads_through_vllms_loader_and_matches_exq(checkpoint, vllm_context):
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory

    from exq.integrations.vllm_method import ExqVllmMoEMethod

    cfg, _ = _quant_config(checkpoint)
    runner = FusedMoEFactory(
        num_experts=16, top_k=4, hidden_size=128, intermediate_size=128, params_dtype=torch.bfloat16,
        quant_config=cfg, prefix=PREFIX,
    )  # fmt: skip
    experts = runner.routed_experts
    assert isinstance(experts.quant_method, ExqVllmMoEMethod)
    tensors = _tensors(checkpoint)
    loaded = set(runner.load_weights(iter(tensors.items())))  # what AutoWeightsLoader calls on the experts module
    assert loaded == {f"routed_experts.{k}" for k in tensors}
    assert {n for n, _ in runner.named_parameters()} >= loaded
    experts.quant_method.process_weights_after_loading(experts)
    x, w, ids = _routing(7, 0)
    out = experts.quant_method.apply(experts, x, w, ids, None, None)
    ref = _reference(checkpoint, x, ids, w)
    assert out.shape == ref.shape and (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
    # the whole layer as a model calls it: vLLM's router (softmax, top-4, renormalised) then exq's method
    from vllm.config import get_current_vllm_config
    from vllm.forward_context import set_forward_context

    logits = torch.randn(7, 16, generator=torch.Generator().manual_seed(3))
    w2, ids2 = torch.topk(logits.softmax(-1), 4)
    with set_forward_context(None, get_current_vllm_config()):
        out2 = runner(x, logits)
    ref2 = _reference(checkpoint, x, ids2, w2 / w2.sum(-1, keepdim=True))
    assert (out2.float() - ref2).abs().max() <= 2e-2 * ref2.abs().max()


def test_expert_parallel_ranks_map_global_ids_and_sum_to_the_layer(checkpoint, vllm_context):
    """Two EP ranks: each keeps 8 experts, maps vLLM's global ids through its expert_map (others -> -1); their
    outputs add up to the layer."""
    from types import SimpleNamespace

    from torch import nn

    from exq.integrations.vllm_method import ExqVllmMoEMethod

    cfg, _ = _quant_config(checkpoint)
    spec = cfg.experts[PREFIX]
    x, w, ids = _routing(9, 1)
    total = torch.zeros(9, 128)
    for rank in (0, 1):
        moe = SimpleNamespace(moe_parallel_config=SimpleNamespace(ep_rank=rank, ep_size=2, tp_rank=0, tp_size=1))
        method, layer = ExqVllmMoEMethod(moe, spec), nn.Module()
        layer.load_weights = lambda weights: iter(())  # vLLM's own loader: nothing of exq's reaches it
        method.create_weights(layer, 8, 128, 128, torch.bfloat16)
        assert set(layer.load_weights(iter(_tensors(checkpoint).items()))) == set(_tensors(checkpoint))
        method.process_weights_after_loading(layer)
        layer.expert_map = torch.full((16,), -1, dtype=torch.int32)
        layer.expert_map[rank * 8 : (rank + 1) * 8] = torch.arange(8, dtype=torch.int32)
        total += method.apply(layer, x, w, ids, None, None).float()
    ref = _reference(checkpoint, x, ids, w)
    assert (total - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_versions_and_shared_experts_are_refused_with_a_reason(checkpoint, vllm_context):
    from types import SimpleNamespace

    import vllm

    from exq.errors import ExqError
    from exq.integrations.vllm import check_version
    from exq.integrations.vllm_method import ExqVllmMoEMethod

    with pytest.raises(ExqError, match="not supported"):
        check_version("0.20.1")
    check_version(vllm.__version__)
    cfg, _ = _quant_config(checkpoint)
    method = ExqVllmMoEMethod(SimpleNamespace(), cfg.experts[PREFIX])
    with pytest.raises(ExqError, match="shared experts"):
        method.apply(SimpleNamespace(), *_routing(2, 2), shared_experts=object(), shared_experts_input=None)


def test_exq_serve_engine_vllm_builds_the_vllm_serve_command(checkpoint):
    import importlib.util

    from exq.serve.engines import check_engine, command

    check_engine("vllm")
    argv = command("vllm", checkpoint, "127.0.0.1", 30000, ["--tensor-parallel-size", "1"])
    assert argv[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", str(checkpoint)]
    assert argv[argv.index("--quantization") + 1] == "exq" and argv[argv.index("--port") + 1] == "30000"
    assert importlib.util.find_spec(argv[2]) is not None  # the module the command runs exists in this vLLM
