"""Quantizers, each over a stack of matrices [E, out, in] at once (all experts of a layer in one call).

rtn   round to nearest, full group range.
clip  per-group range shrink chosen from a grid to minimise sum_k d_k (w_k - w'_k)^2, where d is the diagonal of the
      input second moment (how much each input column matters); d = 1 without calibration data.
gptq  GPTQ (Frantar et al. 2022): columns quantized left to right, each one's rounding error spread over the columns
      not yet quantized through the inverse Hessian of the layer's inputs, so the output error ||(W - W') X|| is
      minimised rather than the weight error. Group scales are set (with the clip search) when a group is entered, from
      the already error-corrected weights. Hessians are per expert, from the tokens routed to it (see calibrate.py).

Written here rather than taken from a GPTQ library: those quantize one nn.Linear at a time on CUDA, while experts are
stacked 3-D parameters that must be quantized as a batch, on CPU as well as GPU, in exq's own formats.
"""

from __future__ import annotations

import torch

from exq.formats import Format
from exq.quant.codec import Quantized, codes_for, group_size, levels, params_from_range, quantize_rtn

CLIP_GRID = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76, 0.73, 0.7, 0.65, 0.6, 0.55, 0.5)
QUANTIZERS = ("rtn", "clip", "gptq")


def _group_error(fmt: Format, wg: torch.Tensor, dg: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Weighted squared error of each group [..., G, g] at per-group clip ratios [..., G]."""
    lo, hi = wg.amin(-1) * clip, wg.amax(-1) * clip
    scale, zero = params_from_range(fmt, lo, hi)
    z = None if zero is None else zero[..., None]
    deq = levels(fmt, codes_for(fmt, wg, scale[..., None], z), scale[..., None], z)
    return ((wg - deq) ** 2 * dg).sum(-1)


def search_clip(fmt: Format, w: torch.Tensor, d: torch.Tensor | None = None, grid=CLIP_GRID) -> torch.Tensor:
    """Per-group clip ratios [..., out, G] minimising the d-weighted error (d: [..., in], broadcast over out)."""
    in_f = w.shape[-1]
    g = group_size(fmt, in_f)
    wg = w.float().reshape(*w.shape[:-1], in_f // g, g)
    dg = torch.ones_like(wg) if d is None else d.float().reshape(*d.shape[:-1], 1, in_f // g, g).expand_as(wg)
    best_err = torch.full(wg.shape[:-1], float("inf"), device=w.device)
    best = torch.ones(wg.shape[:-1], device=w.device)
    for c in grid:
        clip = torch.full_like(best, c)
        err = _group_error(fmt, wg, dg, clip)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best


def quantize_clip(fmt: Format, w: torch.Tensor, d: torch.Tensor | None = None) -> Quantized:
    return quantize_rtn(fmt, w, clip=search_clip(fmt, w, d))


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 per matrix, H damped by damp x mean(diag); more damping where it fails."""
    n = h.shape[-1]
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    mean_diag = torch.diagonal(h, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[..., None, None]
    for scale in (1.0, 10.0, 100.0, 1000.0):
        low, info = torch.linalg.cholesky_ex(h + damp * scale * mean_diag * eye)
        if not bool((info != 0).any()):
            hinv = torch.cholesky_inverse(low)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if not bool((info != 0).any()):
                return u
    raise RuntimeError("GPTQ Hessian is not positive definite even with heavy damping")


def quantize_gptq(
    fmt: Format, w: torch.Tensor, h: torch.Tensor, damp: float = 0.01, clip: bool = True, act_order: bool = False
) -> Quantized:
    """GPTQ over a stack: w [E, out, in], h [E, in, in] (mean x x^T of each matrix's inputs).

    act_order: visit columns by decreasing Hessian diagonal (each expert its own order) with group scales fixed
    beforehand from the original weights ("static groups"), so storage stays plain group-wise.
    """
    if act_order:
        return _gptq_act_order(fmt, w, h, damp, clip)
    e_n, out_f, in_f = w.shape
    g = group_size(fmt, in_f)
    w = w.to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    dead = torch.diagonal(h, dim1=-2, dim2=-1) <= 0
    if dead.any():  # inputs that never fire: any value is exact, quantize them as zero
        w.masked_fill_(dead[:, None, :], 0.0)
        hd = torch.diagonal(h, dim1=-2, dim2=-1)
        hd.masked_fill_(dead, 1.0)
    diag = torch.diagonal(h, dim1=-2, dim2=-1).clone()
    hinv = _inverse_cholesky(h, damp)
    codes = torch.zeros(e_n, out_f, in_f, dtype=torch.uint8, device=w.device)
    n_groups = in_f // g
    scales = torch.zeros(e_n, out_f, n_groups, dtype=torch.float16, device=w.device)
    zeros = None if fmt.symmetric else torch.zeros(e_n, out_f, n_groups, dtype=torch.uint8, device=w.device)
    block = g if g <= 256 else 128
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = w[..., i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # entering a group: its scale from the error-corrected weights
                gi = col // g
                wg = torch.cat([w1[..., i:], w[..., i2:]], dim=-1)[..., :g].float()
                cl = None
                if clip:
                    cl = search_clip(fmt, wg, diag[:, col : col + g].float())[..., 0]
                lo, hi = wg.amin(-1), wg.amax(-1)
                if cl is not None:
                    lo, hi = lo * cl, hi * cl
                sc, zr = params_from_range(fmt, lo, hi)
                scales[..., gi] = sc
                zero_f = None if zr is None else zr.to(torch.float64)
                if zeros is not None:
                    zeros[..., gi] = zr.to(torch.uint8)
                sc64 = sc.to(torch.float64)
            wc = w1[..., i]
            c = codes_for(fmt, wc, sc64, zero_f)
            codes[..., col] = c.to(torch.uint8)
            q = levels(fmt, c, sc64, zero_f).to(torch.float64)
            d = hinv1[:, i, i][:, None]
            err = (wc - q) / d
            w1[..., i:] -= err[..., None] * hinv1[:, i, i:][:, None, :]
            err1[..., i] = err
        w[..., i2:] -= err1 @ hinv[:, i1:i2, i2:]
    return Quantized(fmt, codes, scales, zeros)


def _gptq_act_order(fmt: Format, w: torch.Tensor, h: torch.Tensor, damp: float, clip: bool) -> Quantized:
    e_n, out_f, in_f = w.shape
    g = group_size(fmt, in_f)
    w = w.to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    dead = torch.diagonal(h, dim1=-2, dim2=-1) <= 0
    if dead.any():
        w.masked_fill_(dead[:, None, :], 0.0)
        torch.diagonal(h, dim1=-2, dim2=-1).masked_fill_(dead, 1.0)
    diag = torch.diagonal(h, dim1=-2, dim2=-1).clone()
    # static groups from the original weights
    wg = w.float().reshape(e_n, out_f, in_f // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)
    if clip:
        cl = search_clip(fmt, w.float(), diag.float())
        lo, hi = lo * cl, hi * cl
    scales, zr = params_from_range(fmt, lo, hi)
    zeros = None if zr is None else zr.to(torch.uint8)
    perm = torch.argsort(diag, dim=-1, descending=True, stable=True)  # [E, in]
    inv = torch.argsort(perm, dim=-1)
    wp = torch.gather(w, 2, perm[:, None, :].expand(-1, out_f, -1))
    hp = torch.gather(
        torch.gather(h, 1, perm[:, :, None].expand(-1, -1, in_f)), 2, perm[:, None, :].expand(-1, in_f, -1)
    )
    hinv = _inverse_cholesky(hp, damp)
    grp = perm // g  # group of each visited column [E, in]
    sc64 = scales.to(torch.float64)
    z64 = None if zr is None else zr.to(torch.float64)
    codes_p = torch.zeros(e_n, out_f, in_f, dtype=torch.uint8, device=w.device)
    block = 128
    ar = torch.arange(e_n, device=w.device)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = wp[..., i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            gi = grp[:, i1 + i]  # [E]
            s_col = sc64[ar, :, gi]  # [E, out]
            z_col = None if z64 is None else z64[ar, :, gi]
            wc = w1[..., i]
            c = codes_for(fmt, wc, s_col, z_col)
            codes_p[..., i1 + i] = c.to(torch.uint8)
            q = levels(fmt, c, s_col, z_col).to(torch.float64)
            err = (wc - q) / hinv1[:, i, i][:, None]
            w1[..., i:] -= err[..., None] * hinv1[:, i, i:][:, None, :]
            err1[..., i] = err
        wp[..., i2:] -= err1 @ hinv[:, i1:i2, i2:]
    codes = torch.gather(codes_p, 2, inv[:, None, :].expand(-1, out_f, -1))
    return Quantized(fmt, codes, scales, zeros)
