"""The layer shapes `exq bench kernels` times: the issue's four named models, sizes given as `E,H,I,K`, or a model
(checkpoint folder or hub id) whose MoE layers are read from its config, so a user can time the shape they serve.

A shape is (experts, hidden, intermediate, top_k). The model form builds the model on the meta device (no weights
read, any size) and asks exq's adapters for its MoE layers: the same layers `exq profile` and `exq.load` see.
"""

from __future__ import annotations

import re
from pathlib import Path

from exq.bench import SHAPES
from exq.errors import ExqError

Shape = tuple[int, int, int, int]
GROUP = 128  # the int4 / int3 group: the kernels reduce over whole groups
_SIZES = re.compile(r"(?:(?P<name>[A-Za-z0-9][\w.-]*)=)?(?P<dims>[^=]+)")


def resolve_shapes(specs: list[str]) -> dict[str, Shape]:
    """{name: shape} for every spec, in order; a model folder gives one entry per distinct MoE layer shape."""
    out: dict[str, Shape] = {}
    for spec in specs:
        for name, shape in _one_spec(spec).items():
            if name in out and out[name] != shape:
                raise ExqError(f"two shapes are named {name!r}: {out[name]} and {shape}", "name them: NAME=E,H,I,K")
            out[name] = shape
    return out


def _one_spec(spec: str) -> dict[str, Shape]:
    if spec in SHAPES:
        return {spec: SHAPES[spec]}
    if Path(spec).expanduser().is_dir() or _hub_model(spec):
        return model_shapes(spec)
    m = _SIZES.fullmatch(spec)
    if m is None or "," not in spec:
        raise ExqError(
            f"shape {spec!r} is not a known shape, a model folder or E,H,I,K sizes",
            f"give one of {', '.join(SHAPES)}, a checkpoint folder with config.json, or e.g. my-model=60,2048,1408,4",
        )
    try:
        dims = tuple(int(v) for v in m["dims"].split(","))
    except ValueError:
        dims = ()
    if len(dims) != 4:
        raise ExqError(f"shape {spec!r}: give four integers, experts,hidden,intermediate,top_k (e.g. 60,2048,1408,4)")
    shape = check_shape(spec, dims)  # type: ignore[arg-type]
    return {m["name"] or "e{}-h{}-i{}-k{}".format(*shape): shape}


def _hub_model(spec: str) -> bool:
    """org/name with no sizes in it: a model on the Hugging Face hub, whose config alone is fetched (or cached)."""
    from exq.models.loading import is_hub_id

    return "," not in spec and "=" not in spec and is_hub_id(spec)


def check_shape(what: str, shape: Shape) -> Shape:
    e, h, i, k = shape
    if min(shape) < 1 or k > e:
        raise ExqError(f"shape {what}: sizes must be positive and top_k ({k}) at most the experts ({e})")
    bad = [f"{n} {v}" for n, v in (("hidden", h), ("intermediate", i)) if v % GROUP]
    if bad:
        raise ExqError(
            f"shape {what}: {' and '.join(bad)} not a multiple of {GROUP}",
            f"exq's kernels reduce over whole groups of {GROUP}; layers of other sizes run in torch, with nothing to "
            "time here",
        )
    return shape


def model_shapes(path: str | Path) -> dict[str, Shape]:
    """The distinct (experts, hidden, intermediate, top_k) of a checkpoint's MoE layers, named after its folder (and
    the sizes, when its layers differ)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from exq.models.loading import load_config
    from exq.models.registry import adapter_for, moe_layers

    config = load_config(path)
    adapter_for(config)  # an unsupported or dense model says so here
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # from_config's notes about unused config fields are not the user's concern
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # transformers raises many types for a config it cannot build
        raise ExqError(f"cannot build the model of {path} from its config: {type(err).__name__}: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    found = list(dict.fromkeys((m.num_experts, m.hidden_size, m.intermediate_size, m.top_k) for m in moe_layers(model)))
    base = Path(path).expanduser().resolve().name
    return {
        (base if len(found) == 1 else "{}-e{}-h{}-i{}-k{}".format(base, *s)): check_shape(f"{base} {s}", s)
        for s in found
    }
