"""The ground truth of 3DNA: an explicit boolean mask and SDPA (``backend="dense"``),
and a brute-force loop over queries that the dense path is itself tested against.

The dense path allocates a (queries x keys) mask and score matrix: it is for
correctness and small problems only. Every other path must agree with it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nuwa3dna.checks import uses_forward_ad
from nuwa3dna.kernels.geometry import Grid, grid_coords, resolve_extent, visible


def nearby_mask(q_grid: Grid, kv_grid: Grid, extent, causal: bool = False, device=None) -> torch.Tensor:
    """The (Nq, Nk) boolean 3DNA mask, True where a key is visible; raster order."""
    extent = resolve_extent(extent, kv_grid)
    return visible(grid_coords(q_grid, device), grid_coords(kv_grid, device),
                   q_grid, kv_grid, extent, causal)


def dense_nearby_attention(q, k, v, extent, causal: bool = False, scale=None) -> torch.Tensor:
    """3DNA by masking full attention; inputs as ``nearby_attention``, unchecked.

    Runs SDPA in the inputs' own dtype, so in fp16/bf16 it is also the
    "PyTorch low-precision run" that tolerances are derived from.
    """
    B, T, H, W, heads, D = q.shape
    kv_grid = tuple(k.shape[1:4])
    mask = nearby_mask((T, H, W), kv_grid, extent, causal, device=q.device)
    qh, kh, vh = (x.flatten(1, 3).transpose(1, 2) for x in (q, k, v))   # [B, heads, N, D]
    scale = D ** -0.5 if scale is None else scale
    if uses_forward_ad(q, k, v):
        # SDPA's CPU kernels have no forward-AD formula; the same maths in plain ops has.
        s = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))     # [B, heads, Nq, Nk]
        out = torch.softmax(s, dim=-1) @ vh
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(B, T, H, W, heads, D)


def brute_force_nearby_attention(q, k, v, extent, causal: bool = False, scale=None) -> torch.Tensor:
    """3DNA straight from its definition (docs/design.md section 1), one query at a time, in float64.

    Tiny sizes only: it is the check on the dense path's mask, not a backend.
    """
    B, T, H, W, heads, D = q.shape
    T2, H2, W2 = k.shape[1:4]
    et, eh, ew = resolve_extent(extent, (T2, H2, W2))
    scale = D ** -0.5 if scale is None else scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for t in range(T):
        for h in range(H):
            for w in range(W):
                ct, ch, cw = t * T2 // T, h * H2 // H, w * W2 // W
                keys = [(a, b, c)
                        for a in range(T2) for b in range(H2) for c in range(W2)
                        if abs(a - ct) <= et and abs(b - ch) <= eh and abs(c - cw) <= ew
                        and (not causal or (a * H2 + b) * W2 + c <= (t * H + h) * W + w)]
                ks = torch.stack([k64[:, a, b, c] for a, b, c in keys], dim=1)   # [B, n, heads, D]
                vs = torch.stack([v64[:, a, b, c] for a, b, c in keys], dim=1)
                s = torch.einsum("bhd,bnhd->bhn", q64[:, t, h, w], ks) * scale
                p = torch.softmax(s, dim=-1)
                out[:, t, h, w] = torch.einsum("bhn,bnhd->bhd", p, vs)
    return out.to(q.dtype)
