"""Load a local (or hub) checkpoint with errors that say what is wrong, checking support before reading weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from exq.errors import ExqError
from exq.models.registry import adapter_for

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ExqError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExqError(f"device {device} requested but this torch build sees no CUDA GPU", "use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    if dtype in (None, "auto"):
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ExqError(f"unknown dtype {dtype!r}", f"use auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def context_len(model: nn.Module, wanted: int | None, default: int) -> int:
    """The sequence length to use: what the user asked for, else `default` cut to the model's context."""
    if wanted is not None:
        return wanted
    max_pos = getattr(model.config, "max_position_embeddings", None)
    return min(default, max_pos) if max_pos else default


def is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.splitext(name)[1]


def load_config(path: str | Path):
    from transformers import AutoConfig

    name = str(path)
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ExqError(f"model path {p} is a file; give the checkpoint folder (with config.json)")
        if not (p / "config.json").is_file():
            raise ExqError(f"model folder {p} has no config.json", "point --model at a Hugging Face checkpoint folder")
    elif not is_hub_id(name):
        raise ExqError(f"model path {name} does not exist", "give a checkpoint folder or a Hugging Face id (org/name)")
    try:
        return AutoConfig.from_pretrained(str(p) if p.exists() else name)
    except (OSError, ValueError, KeyError) as e:
        raise ExqError(f"cannot read the model config of {name}: {e}") from e


def load_model(path: str | Path, *, dtype: str | torch.dtype | None = "auto", device: str | None = "auto") -> nn.Module:
    """A transformers causal LM in eval mode; refuses unsupported or dense models before loading any weights."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = load_config(path)
    adapter_for(config)
    dev = resolve_device(device)
    p = Path(str(path)).expanduser()
    source = str(p) if p.exists() else str(path)
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype), output_loading_info=True)
    except Exception as e:  # torch, safetensors and transformers each raise their own types for a broken checkpoint
        raise ExqError(
            f"cannot load the weights of {path}: {type(e).__name__}: {e}",
            "check that every shard is present and complete",
        ) from e
    finally:
        hf_logging.enable_progress_bar()
    missing = info.get("missing_keys") or []
    if missing:
        raise ExqError(
            f"checkpoint {path} lacks {len(missing)} weights (e.g. {sorted(missing)[0]}); loading it would leave them "
            "randomly initialised",
            "check that every shard listed in model.safetensors.index.json is present",
        )
    log.info("loaded %s (%s, %s) on %s", path, type(model).__name__, model.dtype, dev)
    model.requires_grad_(False)  # exq never trains weights; stages that need activation gradients ask for them
    return model.to(dev).eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise ExqError(
            f"cannot load a tokenizer from {path}: {e}",
            "the checkpoint folder needs tokenizer.json / tokenizer_config.json",
        ) from e
