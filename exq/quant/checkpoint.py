"""The exq checkpoint: a folder that transformers' config machinery reads and `exq.load` turns into a working model.

    config.json                 the model's config + quantization_config {quant_method: "exq", ...}
    exq-quantized.safetensors   every allocated unit in its format: per layer and block one slab per format
                                (`...experts.gate_up.slabs.int4.codes|scales|zeros`, bf16 slabs as `.weight`),
                                experts in the plan's layout order; allocated attention / shared linears likewise
    model.safetensors           everything else, in its original dtype (embeddings, norms, routers, ...)
    exq-plan.json               the compiled plan it was made from (hash recorded in quantization_config)
    tokenizer + generation config, copied from the source model

The bf16 originals of quantized units are not kept. The size of exq-quantized.safetensors is the plan's byte count plus
the safetensors header. The folder is written under a temporary name and renamed, so it is complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from exq import __version__
from exq.compiler.artifact import Artifact
from exq.errors import ExqError
from exq.fileio import current_umask, dumps_json, sha256_file
from exq.formats import FORMATS
from exq.models import moe_layers

CHECKPOINT_VERSION = 1
QUANTIZED_FILE = "exq-quantized.safetensors"
BASE_FILE = "model.safetensors"
PLAN_FILE = "exq-plan.json"
_COPY = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def _base_state(model: nn.Module, skip_prefixes: list[str], skip_keys: set[str]) -> dict[str, torch.Tensor]:
    """The state dict minus quantized parts, each storage saved once (tied weights are re-tied on load)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        if k in skip_keys or any(k.startswith(p) for p in skip_prefixes):
            continue
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            continue
        seen.add(ptr)
        out[k] = v.detach().contiguous().cpu()
    return out


def base_state(model: nn.Module, artifact: Artifact) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint keeps as is: all but the routed experts and the linears the plan quantizes."""
    from exq.quant.apply import allocated_linears

    names = {id(mod): n for n, mod in model.named_modules()}
    skip_prefixes = [names[id(m.experts)] + "." for m in moe_layers(model)]
    skip_keys = {f"{n}.{p}" for n, _, _ in allocated_linears(model, artifact) for p in ("weight", "bias")}
    return _base_state(model, skip_prefixes, skip_keys)


def quantization_config(model: nn.Module, artifact: Artifact, quantizer: str, plan_sha: str) -> dict:
    from exq.quant.apply import allocated_linears

    names = {id(mod): n for n, mod in model.named_modules()}
    used = sorted(
        {f for plan in artifact.experts for b in plan.values() for f in b}
        | {f for f in (artifact.shared or []) + (artifact.attention or []) if f}
    )
    return {
        "quant_method": "exq",
        "checkpoint_version": CHECKPOINT_VERSION,
        "exq_version": __version__,
        "plan_sha256": plan_sha,
        "runtime": artifact.runtime,
        "quantizer": quantizer,
        "formats": {f: FORMATS[f].definition() for f in used},
        "bytes": artifact.summary()["bytes"],
        "experts": [
            {
                "moe_layer": m.index,
                "layer_index": m.layer_index,
                "module": names[id(m.experts)],
                "num_experts": m.num_experts,
                "hidden_size": m.hidden_size,
                "intermediate_size": m.intermediate_size,
                "gate_up": artifact.layout[m.index]["gate_up"],
                "down": artifact.layout[m.index]["down"],
                "formats": artifact.experts[m.index],
                # pass D's configurations for this layer, per GPU (the runtime takes the one it runs on)
                "kernels": {gpu: layers[m.index] for gpu, layers in (artifact.kernels or {}).items()},
            }
            for m in moe_layers(model)
        ],
        "linears": [
            {
                "module": n,
                "format": f,
                "out_features": lin.out_features,
                "in_features": lin.in_features,
                "bias": lin.bias is not None,
            }
            for n, lin, f in allocated_linears(model, artifact)
        ],
    }


def write_checkpoint(
    model: nn.Module,
    artifact: Artifact,
    quantized: dict[str, torch.Tensor],
    out_dir: str | Path,
    source_dir: str | Path | None,
    quantizer: str,
    overwrite: bool = False,
) -> Path:

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExqError(f"output {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExqError(f"output folder {out_dir} is not empty", "choose another folder or pass --overwrite")
    base = base_state(model, artifact)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
        save_file(quantized, tmp / QUANTIZED_FILE, metadata={"format": "exq", "version": str(CHECKPOINT_VERSION)})
        save_file(base, tmp / BASE_FILE, metadata={"format": "pt"})
        artifact.save(tmp / PLAN_FILE)
        config = model.config.to_dict()
        config.pop("_name_or_path", None)
        config["quantization_config"] = quantization_config(model, artifact, quantizer, sha256_file(tmp / PLAN_FILE))
        (tmp / "config.json").write_bytes(dumps_json(config))
        if source_dir is not None and Path(source_dir).is_dir():
            for name in _COPY:
                if (Path(source_dir) / name).is_file():
                    shutil.copyfile(Path(source_dir) / name, tmp / name)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def check_quantization_config(qc, where: str) -> None:
    """An exq quantization_config of the version and formats this exq reads (shared with the engine plugins)."""
    if not isinstance(qc, dict) or qc.get("quant_method") != "exq":
        raise ExqError(
            f"{where} is not an exq checkpoint (no quantization_config with quant_method 'exq')",
            "load plain checkpoints with transformers, or quantize this one with `exq quantize`",
        )
    version = qc.get("checkpoint_version")
    if version != CHECKPOINT_VERSION:
        raise ExqError(
            f"{where} is an exq checkpoint of version {version}; this exq reads version {CHECKPOINT_VERSION}",
            "upgrade exq" if isinstance(version, int) and version > CHECKPOINT_VERSION else "re-quantize it",
        )
    unknown = [f for f in qc.get("formats", {}) if f not in FORMATS]
    if unknown:
        raise ExqError(f"checkpoint {where} uses unknown format(s) {', '.join(unknown)}", "upgrade exq")
    for name, spec in qc.get("formats", {}).items():
        if spec != FORMATS[name].definition():
            raise ExqError(f"checkpoint {where} defines {name} differently from this exq", "re-quantize it")


def read_quantization_config(path: Path) -> tuple[dict, dict]:
    """(config dict, quantization_config) of an exq checkpoint folder, checked."""
    if not path.is_dir():
        raise ExqError(f"quantized model {path} does not exist or is not a folder")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ExqError(f"{path} has no config.json; it is not a checkpoint folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExqError(
            f"cannot read {cfg_path}: {e}", "the checkpoint is corrupt; re-create it with `exq quantize`"
        ) from e
    qc = config.get("quantization_config")
    check_quantization_config(qc, str(path))
    missing = [f for f in (QUANTIZED_FILE, BASE_FILE, PLAN_FILE) if not (path / f).is_file()]
    if missing:
        raise ExqError(f"checkpoint {path} is missing {', '.join(missing)}", "re-create it with `exq quantize`")
    if sha256_file(path / PLAN_FILE) != qc.get("plan_sha256"):
        raise ExqError(f"{path / PLAN_FILE} does not match the checkpoint's config (hash mismatch)", "re-quantize it")
    return config, qc
