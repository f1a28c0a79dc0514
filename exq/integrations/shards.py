"""One rank's share of a checkpoint's expert slabs, for engines that split a MoE layer over GPUs.

Expert parallel: a rank holds a contiguous range of experts, so each per-format slab keeps the rows of its local
experts (in layout order) and the local layout renumbers them. Tensor parallel: the intermediate dimension is split;
gate_up keeps rank r's rows of the gate half and of the up half, down keeps rank r's input columns (bytes of packed
codes and, for group formats, whole groups of scales / zero points; int8's per-channel scales are whole on every rank,
the engine sums the partial outputs). Engine-independent, so the SGLang and vLLM plugins share it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from exq.errors import ExqError
from exq.formats import Format
from exq.runtime.experts import slab_key


def local_layout(layout: dict, local: range) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the layout of the local experts, renumbered from 0; per slab key, the global slab rows they come from)."""
    order, slabs, kept = [], [], {}
    for fmt, start, count in layout["slabs"]:
        rows = [p - start for p in range(start, start + count) if layout["order"][p] in local]
        slabs.append((fmt, len(order), len(rows)))
        order += [layout["order"][start + r] - local.start for r in rows]
        kept[slab_key(fmt)] = torch.tensor(rows, dtype=torch.long)
    return {"order": order, "slabs": slabs}, kept


def _tp_slice(block: str, tensor: str, fmt: Format, t: torch.Tensor, inter: int, part: int, rank: int) -> torch.Tensor:
    if part == inter:
        return t
    if block == "gate_up":  # rows: gate [0, I), up [I, 2I)
        idx = torch.cat(
            [torch.arange(rank * part, (rank + 1) * part), inter + torch.arange(rank * part, (rank + 1) * part)]
        )
        return t.index_select(1, idx.to(t.device))
    if tensor in ("weight", "codes"):  # columns of the input dimension: elements, or packed bytes
        per = 1 if tensor == "weight" else fmt.bits / 8
        lo, hi = int(rank * part * per), int((rank + 1) * part * per)
        return t[:, :, lo:hi]
    if fmt.group_size is None:  # per-channel scales: the same on every rank
        return t
    g = part // fmt.group_size
    return t[:, :, rank * g : (rank + 1) * g]


def shard_loader(
    block: str, tensor: str, fmt: Format, rows: torch.Tensor, inter: int, part: int, tp_rank: int
) -> Callable[..., None]:
    """A weight_loader(param, loaded) that copies this rank's share of a whole checkpoint slab into `param`."""

    def load(param: torch.nn.Parameter, loaded: torch.Tensor, *args, **kwargs) -> None:
        share = _tp_slice(block, tensor, fmt, loaded.index_select(0, rows.to(loaded.device)), inter, part, tp_rank)
        if share.shape != param.shape:
            raise ExqError(
                f"exq slab {block}.{tensor} ({fmt.name}): this rank's share has shape {tuple(share.shape)}, "
                f"the layer expects {tuple(param.shape)}",
                "the checkpoint does not match the model's config",
            )
        param.data.copy_(share)
        param.exq_loaded = True

    return load
