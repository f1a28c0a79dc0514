"""exq's runtime modules: MoE experts (and linear layers) whose weights are stored in exq formats.

`QuantizedExperts` replaces a transformers v5 experts module (same forward signature). Each block (gate_up, down)
keeps one slab per format, experts in the plan's layout order. This is the plain-torch reference path: it dequantizes
a block's slabs and then computes exactly like transformers' eager experts loop, so a checkpoint that stores bf16
experts gives bit-identical logits to the original model run with `experts_implementation="eager"`. Fused kernels
run behind the same module (`forward` picks them on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exq.formats import FORMATS, Format
from exq.quant.codec import dequantize, unpack

BLOCKS = ("gate_up", "down")


def slab_key(fmt_name: str) -> str:
    return fmt_name.replace("-", "_")


class Slab(nn.Module):
    """count matrices [count, out, in] of one format: packed codes, scales, zero points (or the bf16 weights)."""

    def __init__(self, fmt: Format, count: int, out_features: int, in_features: int, device=None) -> None:
        super().__init__()
        self.fmt, self.count, self.out_features, self.in_features = fmt, count, out_features, in_features
        if not fmt.quantized:
            self.register_buffer(
                "weight", torch.empty(count, out_features, in_features, dtype=torch.bfloat16, device=device)
            )
            return
        g = 1 if fmt.group_size is None else in_features // fmt.group_size
        packed = in_features * fmt.bits // 8
        self.register_buffer("codes", torch.empty(count, out_features, packed, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(count, out_features, g, dtype=torch.float16, device=device))
        if not fmt.symmetric:
            self.register_buffer("zeros", torch.empty(count, out_features, g, dtype=torch.uint8, device=device))

    scale_override: torch.Tensor | None = None  # set by scale tuning: scales = base_scales * exp(override)

    def dequantized(self, dtype: torch.dtype, index: torch.Tensor | None = None) -> torch.Tensor:
        """The weights [count, out, in], or only the matrices at `index` (decode touches a few experts)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or index is None else t[index]

        if not self.fmt.quantized:
            return pick(self.weight).to(dtype)
        codes = unpack(pick(self.codes), self.fmt.bits, self.in_features)
        scales = self.scales if self.scale_override is None else self.base_scales * self.scale_override.exp()
        return dequantize(self.fmt, codes, pick(scales), pick(getattr(self, "zeros", None)), torch.float32).to(dtype)


class QuantizedBlock(nn.Module):
    """One block (gate_up or down) of every expert of a layer, stored as per-format slabs in layout order."""

    def __init__(self, layout: dict, out_features: int, in_features: int, device=None) -> None:
        super().__init__()
        self.order = list(layout["order"])  # storage position -> expert id
        self.slab_spec = [(str(f), int(s), int(c)) for f, s, c in layout["slabs"]]
        self.slabs = nn.ModuleDict(
            {slab_key(f): Slab(FORMATS[f], c, out_features, in_features, device) for f, _, c in self.slab_spec}
        )
        self.register_buffer(
            "position", torch.empty(len(self.order), dtype=torch.long, device=device), persistent=False
        )
        if self.position.device.type != "meta":
            self.reset_positions()

    def reset_positions(self) -> None:
        """position[e] = storage position of expert e (derived from the layout, so never saved)."""
        inv = [0] * len(self.order)
        for pos, e in enumerate(self.order):
            inv[e] = pos
        self.position.copy_(torch.tensor(inv, dtype=torch.long))

    def store_in_id_order(self) -> None:
        """Put a one-format block's experts in id order (slot = expert id) in memory.

        The layout pass orders a slab by heat and co-selection; with one slab that order buys the GPU nothing, and in
        id order the fused kernels skip the (format, slot) table loads that sit between the routing ids and the
        first weight bytes (v16: T = 1 7-10 % faster). Mixed blocks keep their slabs: their experts must be
        looked up anyway."""
        if len(self.slab_spec) != 1 or self.order == list(range(len(self.order))):
            return
        slab = next(iter(self.slabs.values()))
        with torch.no_grad():
            for t in (*slab.buffers(recurse=False), *slab.parameters(recurse=False)):  # engines hold parameters
                t.copy_(t[self.position])  # row e <- the storage position of expert e
        self.order = list(range(len(self.order)))
        self.reset_positions()

    def formats(self) -> list[str]:
        out = [""] * len(self.order)
        for f, start, count in self.slab_spec:
            for pos in range(start, start + count):
                out[self.order[pos]] = f
        return out

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """[E, out, in] in expert-id order."""
        stacked = torch.cat([self.slabs[slab_key(f)].dequantized(dtype) for f, _, _ in self.slab_spec])
        return stacked[self.position]

    def dequantized_experts(self, experts: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """The [out, in] weights of `experts` only, in that order: one dequantization per slab that holds any."""
        where = {}  # slab key -> [(i, index in slab)]
        for i, e in enumerate(experts):
            pos = self.order.index(e) if self.position.device.type == "meta" else int(self.position[e])
            f, start = next((f, s) for f, s, c in self.slab_spec if s <= pos < s + c)
            where.setdefault(slab_key(f), []).append((i, pos - start))
        out: list[torch.Tensor] = [None] * len(experts)  # type: ignore[list-item]
        for key, items in where.items():
            w = self.slabs[key].dequantized(dtype, torch.tensor([j for _, j in items], dtype=torch.long))
            for (i, _), m in zip(items, w, strict=True):
                out[i] = m
        return out


class QuantizedExperts(nn.Module):
    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        act_fn: nn.Module,
        layout: dict,
        dtype: torch.dtype = torch.bfloat16,
        device=None,
    ) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, intermediate_size
        self.act_fn = act_fn
        self.compute_dtype = dtype
        self.gate_up = QuantizedBlock(layout["gate_up"], 2 * intermediate_size, hidden_size, device)
        self.down = QuantizedBlock(layout["down"], hidden_size, intermediate_size, device)

    kernels: str = "auto"  # "auto": the fused op on a GPU when it can run this layer; "on": always; "off": never
    kernel_plan: dict = {}  # noqa: RUF012 - replaced per instance by the loader: {gpu: {"class", "configs"}}

    def kernel_supported(self) -> bool:
        from exq.kernels.configs import KERNEL_FORMATS

        names = {f for b in (self.gate_up, self.down) for f, _, _ in b.slab_spec}
        return names <= set(KERNEL_FORMATS) and self.hidden_dim % 128 == 0 and self.intermediate_dim % 128 == 0

    def _use_kernel(self, hidden: torch.Tensor) -> bool:
        if self.kernels == "off" or hidden.dtype not in (torch.bfloat16, torch.float16):
            return False
        if self.kernels == "on":
            return True
        if not hidden.is_cuda or not self.kernel_supported():
            return False
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True

    def kernel_config(self, tokens: int, device: torch.device):
        return planned_config(self.kernel_plan, tokens, device)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self._use_kernel(hidden_states):
            from exq.kernels import fused_moe

            cfg = self.kernel_config(hidden_states.shape[0], hidden_states.device)
            return fused_moe(hidden_states, top_k_weights, top_k_index, self, config=cfg)
        return self._reference(hidden_states, top_k_index, top_k_weights)

    def _reference(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """transformers' eager experts loop (one matmul pair per routed expert, never per token), dequantizing only
        the experts this batch routes to."""
        dtype = hidden_states.dtype
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist()
        hit = [e for e in hit if e != self.num_experts]  # num_experts: the expert-parallel placeholder id
        gate_up = self.gate_up.dequantized_experts(hit, dtype)
        down = self.down.dequantized_experts(hit, dtype)
        for e, w13, w2 in zip(hit, gate_up, down, strict=True):
            slot, tok = torch.where(mask[e])
            gate, up = F.linear(hidden_states[tok], w13).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, w2) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def planned_config(plan: dict, tokens: int, device: torch.device):
    """Pass D's choice for this GPU and batch size: the entry of the smallest planned batch >= tokens (None: the
    op's default rule)."""
    from exq.kernels.tuning import config_from_dict

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    entry = plan.get(name) if name else None
    if not entry or not entry.get("configs"):
        return None
    sizes = sorted(int(t) for t in entry["configs"])
    pick = next((t for t in sizes if t >= tokens), sizes[-1])
    return config_from_dict(entry["configs"][str(pick)])


class QuantizedLinear(nn.Module):
    """nn.Linear with its weight in an exq format (shared experts and attention, when a plan allocates them)."""

    def __init__(self, fmt: Format, out_features: int, in_features: int, bias: bool, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.slab = Slab(fmt, 1, out_features, in_features, device)
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.slab.dequantized(x.dtype)[0], self.bias)
