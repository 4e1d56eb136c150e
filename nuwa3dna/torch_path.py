"""The PyTorch 3DNA path: tiled, never materialises queries x keys.

Each query tile (one frame x a block of rows x a block of columns) sees a box
of keys (its window's union, clipped); the box is sliced out of the key grid
(no copy of the whole grid), scored, masked from coordinates and softmaxed in
float32. Autograd runs through the tiles.
"""
from __future__ import annotations

import torch

from .geometry import Grid, grid_coords, key_range, visible

TILE_H, TILE_W = 8, 8


def torch_nearby_attention(q, k, v, extent: Grid, causal: bool, scale: float) -> torch.Tensor:
    """3DNA with resolved ``extent`` (three ints) and numeric ``scale``; unchecked."""
    B, T, H, W, heads, D = q.shape
    T2, H2, W2 = k.shape[1:4]
    q_grid, kv_grid = (T, H, W), (T2, H2, W2)
    et, eh, ew = extent
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = []
    for t in range(T):
        a0, a1 = key_range(t, t + 1, T, T2, et)
        if causal:
            a1 = min(a1, t + 1)
        row_tiles = []
        for h0 in range(0, H, TILE_H):
            h1 = min(H, h0 + TILE_H)
            b0, b1 = key_range(h0, h1, H, H2, eh)
            col_tiles = []
            for w0 in range(0, W, TILE_W):
                w1 = min(W, w0 + TILE_W)
                c0, c1 = key_range(w0, w1, W, W2, ew)
                qt = q[:, t, h0:h1, w0:w1].reshape(B, -1, heads, D)            # [B, nq, heads, D]
                kt = k[:, a0:a1, b0:b1, c0:c1].reshape(B, -1, heads, D)        # [B, nk, heads, D]
                vt = v[:, a0:a1, b0:b1, c0:c1].reshape(B, -1, heads, D)
                qc = grid_coords((1, h1 - h0, w1 - w0), q.device) + torch.tensor([t, h0, w0], device=q.device)
                kc = grid_coords((a1 - a0, b1 - b0, c1 - c0), q.device) + torch.tensor([a0, b0, c0], device=q.device)
                mask = visible(qc, kc, q_grid, kv_grid, extent, causal)           # [nq, nk]
                s = torch.einsum("bqhd,bkhd->bhqk", qt.to(acc), kt.to(acc)) * scale
                s = s.masked_fill(~mask, float("-inf"))
                p = torch.softmax(s, dim=-1)
                o = torch.einsum("bhqk,bkhd->bqhd", p, vt.to(acc))
                col_tiles.append(o.reshape(B, h1 - h0, w1 - w0, heads, D))
            row_tiles.append(torch.cat(col_tiles, dim=2))
        rows.append(torch.cat(row_tiles, dim=1))
    return torch.stack(rows, dim=1).to(q.dtype)
