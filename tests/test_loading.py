"""Loading checkpoints: broken or incomplete ones are refused with a clear error, never half-loaded."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file
from tiny_models import tiny_model

from exq.errors import ExqError
from exq.models import load_model, resolve_device
from exq.models.loading import resolve_dtype


@pytest.fixture
def sharded(tmp_path):
    model = tiny_model("olmoe", seed=31)
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    return tmp_path / "m", shards


def test_sharded_checkpoint_loads(sharded):
    path, _ = sharded
    assert load_model(path, device="cpu").config.model_type == "olmoe"


def test_missing_shard(sharded):
    path, shards = sharded
    (path / shards[1]).unlink()
    with pytest.raises(ExqError, match="cannot load the weights"):
        load_model(path, device="cpu")


def test_truncated_shard(sharded):
    path, shards = sharded
    data = (path / shards[0]).read_bytes()
    (path / shards[0]).write_bytes(data[: len(data) // 3])
    with pytest.raises(ExqError, match="cannot load the weights"):
        load_model(path, device="cpu")


def _drop_weight(tmp_path, which: str):
    model = tiny_model("qwen3_moe", seed=32)
    model.save_pretrained(tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(f)
    del tensors[next(k for k in tensors if which in k)]
    save_file(tensors, f, metadata={"format": "pt"})
    return tmp_path / "m"


def test_checkpoint_lacking_a_weight_is_not_randomly_filled(tmp_path):
    with pytest.raises(ExqError, match="lacks 1 weights"):
        load_model(_drop_weight(tmp_path, "post_attention_layernorm"), device="cpu")


def test_checkpoint_lacking_an_expert(tmp_path):
    with pytest.raises(ExqError, match="cannot load the weights"):
        load_model(_drop_weight(tmp_path, "experts"), device="cpu")


def test_bad_dtype_and_device():
    with pytest.raises(ExqError, match="unknown dtype"):
        resolve_dtype("int3")
    with pytest.raises(ExqError, match="unknown device"):
        resolve_device("tpu:banana")
