"""3D rotary positions with learned, mixed-axis frequencies (RoPE-Mixed, Heo et al. 2024, in 3D).

Optional for ``NearbyAttention3D(rotary=True)`` self-attention: queries and
keys are rotated pairwise by angles that are a learned linear function of the
token's (t, h, w) coordinate, so a score depends on the RELATIVE offset of
query and key. Why a 3DNA model wants it: NÜWA-style absolute position tables
make "attend one token to the left of me" a different lookup at each of the
64 positions of an 8 x 8 frame; with rotary it is one phase, so e.g. a caption's
direction can select which neighbour of the previous frame a token copies.

Layout: a head's D channels hold P = D // 2 pairs (channel i with channel
i + P); pair p of head h turns by ``freqs[h, p] . (t, h, w)`` radians. The
standard init is axial: pair p follows axis p % 3 at a magnitude falling
geometrically from pi/2 to pi/32 rad per token (windows are a few tokens wide,
so slower pairs would barely turn); training then mixes the axes.

Untested: rotary in the Triton backend's custom-op graphs under torch.compile
(the rotation is plain torch before the op, so nothing there is special).
"""
from __future__ import annotations

import math

import torch


def init_freqs(heads: int, dim_head: int) -> torch.Tensor:
    """(heads, dim_head // 2, 3) standard axial frequencies (radians per token)."""
    pairs = dim_head // 2
    f = torch.zeros(heads, pairs, 3)
    for p in range(pairs):
        level = (p // 3) / max(1, (pairs - 1) // 3)       # 0 .. 1 over the pairs of one axis
        f[:, p, p % 3] = (math.pi / 2) * (1 / 16) ** level
    return f


def grid_positions(grid, device=None) -> torch.Tensor:
    """(T, H, W, 3) float (t, h, w) coordinates of a token grid."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def rotate(x: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., heads, D) at ``positions`` (..., 3) by ``freqs`` (heads, P, 3).

    ``positions`` broadcasts against x's leading dims (e.g. (T, H, W, 3) for a
    (B, T, H, W, heads, D) grid, or (3,) for one decoding step). An odd D keeps
    its last channel unrotated. Computed in at least float32, returned in x's dtype.
    """
    P = freqs.shape[1]
    ct = torch.promote_types(x.dtype, torch.float32)
    angle = torch.einsum("...a,hpa->...hp", positions.to(ct), freqs.to(ct))   # [..., heads, P]
    cos, sin = angle.cos(), angle.sin()
    xf = x.to(ct)
    x1, x2, rest = xf[..., :P], xf[..., P:2 * P], xf[..., 2 * P:]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)
    return out.to(x.dtype)
