"""Layouts of the CPU path: query tiles stacked by frame, and key/value column strips.

``tile_rows``: (B, T, H, W, heads, *rest) -> (nht, B*kv_heads*ns, T, G*bh*bw, *rest):
for one row tile and (batch, kv head, strip), consecutive frames are consecutive
rows, so the query tiles of every frame that sees one key frame are one matrix;
with grouped queries (G = heads / kv_heads > 1) the G query heads of a group sit
inside each frame's rows, so one bmm scores the whole group against its keys.
``strips``: (B, T2, H2, W2, heads, D) -> (B*heads, ns, T2, h2p, lw, D), zeros
outside the grid: the keys a tile sees in one key frame are one contiguous
(lh*lw, D) matrix. All copies land in the calling thread's workspace, up-cast to
the accumulation dtype on the way (the copy happens anyway).
"""
from __future__ import annotations

import torch

from nuwa3dna.kernels.cpu.planner import Geometry
from nuwa3dna.kernels.cpu.workers import run
from nuwa3dna.kernels.cpu.workspace import Workspace


def _split_tiles(x: torch.Tensor, g: Geometry) -> torch.Tensor:
    """(B, T, H, W, heads, *rest) -> zero-padded view (B, T, nht, bh, ns, bw, heads, *rest)."""
    B, T, H, W, heads = x.shape[:5]
    rest = tuple(x.shape[5:])
    Hp, Wp = g.nht * g.bh, g.ns * g.bw
    if (Hp, Wp) != (H, W):
        xp = x.new_zeros((B, T, Hp, Wp, heads) + rest)
        xp[:, :, :H, :W] = x
        x = xp
    return x.reshape((B, T, g.nht, g.bh, g.ns, g.bw, heads) + rest)


def _copy_scaled(src: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """out = src * scale, with the product formed in out's dtype: scaling a bf16 q
    before the up-cast rounds q*scale to 8 bits (errors up to 6.6x dense's)."""
    out.copy_(src)
    if scale != 1.0:
        out.mul_(scale)


def tile_rows(x: torch.Tensor, g: Geometry, dtype, ws: Workspace, name: str,
              scale: float = 1.0, groups: int = 1) -> torch.Tensor:
    """(B, T, H, W, heads, *rest) -> (nht, B*(heads/groups)*ns, T, groups*bh*bw, *rest) in ``dtype``,
    zero padded; ``groups`` consecutive heads (one kv head's query heads) share rows."""
    B, T, _, _, heads = x.shape[:5]
    rest = tuple(x.shape[5:])
    if groups == 1:
        src = _split_tiles(x, g).permute((2, 0, 6, 4, 1, 3, 5) + tuple(range(7, 7 + len(rest))))
    else:
        src = _split_tiles(x, g).unflatten(6, (heads // groups, groups))
        src = src.permute((2, 0, 6, 4, 1, 7, 3, 5) + tuple(range(8, 8 + len(rest))))
    out = ws.get(name, src.shape, dtype, x.device)
    _copy_scaled(src, out, scale)
    return out.reshape((g.nht, B * heads // groups * g.ns, T, groups * g.bh * g.bw) + rest)


def untile_rows(xt: torch.Tensor, g: Geometry, shape, dtype, scale: float = 1.0,
                groups: int = 1) -> torch.Tensor:
    """Inverse of ``tile_rows``: (nht, BHk*ns, T, G*nq, *rest) -> (B, T, H, W, heads, *rest), new memory."""
    B, T, H, W, heads = shape[:5]
    rest = tuple(shape[5:])
    Hp, Wp = g.nht * g.bh, g.ns * g.bw
    if groups == 1:
        src = xt.reshape((g.nht, B, heads, g.ns, T, g.bh, g.bw) + rest)
        src = src.permute((1, 4, 0, 5, 3, 6, 2) + tuple(range(7, 7 + len(rest))))
    else:
        src = xt.reshape((g.nht, B, heads // groups, g.ns, T, groups, g.bh, g.bw) + rest)
        src = src.permute((1, 4, 0, 6, 3, 7, 2, 5) + tuple(range(8, 8 + len(rest))))
    out = torch.empty((B, T, Hp, Wp, heads) + rest, dtype=dtype, device=xt.device)
    dst = out.view((B, T, g.nht, g.bh, g.ns, g.bw) + tuple(src.shape[6:]))
    if scale != 1.0:
        torch.mul(src, scale, out=dst)     # src is in the accumulation dtype
    else:
        dst.copy_(src)
    return out if (Hp, Wp) == (H, W) else out[:, :, :H, :W].contiguous()


def strips(x: torch.Tensor, g: Geometry, dtype, ws: Workspace, name: str) -> torch.Tensor:
    """(B, T2, H2, W2, heads, D) -> (B*heads, ns, T2, h2p, lw, D), zeros outside the grid (k and v
    keep their own head count: grouped queries never copy them per query head).

    Two copies: one to a zero-bordered (B, heads, T2, h2p, wpad, D) grid, then one
    per strip, each moving contiguous runs of lw*D values (a direct
    permute-and-slice copy per strip measured 34 ms for cpu-mid's k, this 10 ms).
    """
    B, T2, H2, W2, heads, D = x.shape
    left, wpad = g.left, g.wpad(W2)
    top, bot = g.pad_top, g.pad_top + H2
    grid = ws.get("grid_" + name, (B, heads, T2, g.h2p, wpad, D), dtype, x.device)
    grid[:, :, :, :top].zero_()
    grid[:, :, :, bot:].zero_()
    grid[:, :, :, top:bot, :left].zero_()
    grid[:, :, :, top:bot, left + W2:].zero_()
    grid[:, :, :, top:bot, left:left + W2].copy_(x.permute(0, 4, 1, 2, 3, 5))
    out = ws.get(name, (B, heads, g.ns, T2, g.h2p, g.lw, D), dtype, x.device)
    for s, c0 in enumerate(g.col_start):
        out[:, :, s].copy_(grid[:, :, :, :, left + c0:left + c0 + g.lw])
    return out.reshape(B * heads, g.ns, T2, g.h2p, g.lw, D)


def strips_kv(k: torch.Tensor, v: torch.Tensor, g: Geometry, dtype, ws: Workspace, workers: int):
    """Strip layouts of k and v, built by two workers in parallel."""
    res = {}

    def fn(items):
        for name, x in items:
            res[name] = strips(x, g, dtype, ws, name)
    run(fn, [[("k", k)], [("v", v)]], workers)
    return res["k"], res["v"]


def unstrip(xs: torch.Tensor, g: Geometry, shape, dtype, ws: Workspace) -> torch.Tensor:
    """Sum a strip-layout gradient back onto the key grid: (B, T2, H2, W2, heads, D)."""
    B, T2, H2, W2, heads, D = shape
    xs = xs.reshape(B, heads, g.ns, T2, g.h2p, g.lw, D)
    left = g.left
    grid = ws.get("grid_k", (B, heads, T2, g.h2p, g.wpad(W2), D), xs.dtype, xs.device).zero_()
    for s, c0 in enumerate(g.col_start):
        grid[:, :, :, :, left + c0:left + c0 + g.lw] += xs[:, :, s]
    out = torch.empty(shape, dtype=dtype, device=xs.device)
    top = g.pad_top
    out.copy_(grid[:, :, :, top:top + H2, left:left + W2].permute(0, 2, 3, 4, 1, 5))
    return out


def _perm_axes(g: Geometry, side: str):
    """Re-layouts of dims 1, 2, 3 (frames, rows, columns) of one side."""
    p = g.perms
    return (p[4], p[0], p[2]) if side == "q" else (p[5], p[1], p[3])


def relay(x: torch.Tensor, g: Geometry, side: str) -> torch.Tensor:
    """(B, T, H, W, ...) of the queries (``side="q"``) or keys/values ("k") in the plan's frame, row
    and column order: the residue re-layout of dilated axes (``planner.axis_perms``); x itself if none."""
    for dim, perm in zip((1, 2, 3), _perm_axes(g, side)):
        if perm:
            x = x.index_select(dim, torch.tensor(perm, dtype=torch.long, device=x.device))
    return x


def unrelay(x: torch.Tensor, g: Geometry, side: str) -> torch.Tensor:
    """Inverse of ``relay``: back to the grid's order."""
    for dim, perm in zip((1, 2, 3), _perm_axes(g, side)):
        if perm:
            inv = torch.empty(len(perm), dtype=torch.long)
            inv[torch.tensor(perm, dtype=torch.long)] = torch.arange(len(perm))
            x = x.index_select(dim, inv.to(x.device))
    return x
