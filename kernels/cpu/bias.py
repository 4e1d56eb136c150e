"""Relative position bias of the CPU backend: the index tables both strategies gather the bias with.

The bias (Hq, 2Rt+1, 2Rh+1, 2Rw+1) is added to the scaled score of each window
key at (j - l) // d + R per axis (``windows.axis_offsets``; l the key position
of the query's leader). Per head it is a table of P = (2Rt+1)(2Rh+1)(2Rw+1)
values; two slots are appended: P holds 0 (padded query rows of a tile: they
stay finite and are dropped) and P + 1 holds -inf (keys outside the window),
so one gather gives window mask and bias together and the backward's scatter
drops both slots. Only the index is cached (``planner.MASKS``, bounded by
``CpuConfig.mask_cache_limit``); the gathered values are per call.

Tile loops (``TileIndex``): per (row tile, strip, frame class, query, key) a slot,
(nht, ns, nC, nq, nk). A frame class is one (T-axis offset, own frame under raster
causality) pair; the query frames stacked on one key frame (a ``Geometry.runs``
step) map to classes, usually a contiguous ascending range (a view, no copy).
Per call the table is gathered into (nht, Hk, ns, nC, G, nq, nk): the layout of
a block's scores, so adding it costs what adding the window mask cost, and the
batch is broadcast. Size Hq * nC times the window mask: 9.4 MiB at cpu-mid
(8 heads, 3 classes, 4x4 tiles). d_bias: dS summed over the batch into a buffer
of that layout per worker, then one scatter (``index_add_``) per call.

Fused strategy (``flat_index``): an (Nq, Nk) int32 slot index; the kernel gets
``tab[heads][:, idx]`` as its float mask, one (heads, Nq, Nk) per block of heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

import torch

from nuwa3dna.kernels.cpu.planner import MASKS, PLAIN, Geometry, window_bias
from nuwa3dna.kernels.geometry import grid_coords, visible
from nuwa3dna.kernels.windows import Options, axis_offsets, bias_radius


def radii(bias: torch.Tensor) -> Tuple[int, int, int]:
    """R per axis of a bias table (Hq, 2Rt+1, 2Rh+1, 2Rw+1). From its shape, not from the
    extent: the op gets extents capped at the axis lengths, the bias keeps the user's R
    (``windows.bias_radius`` of the extent as given)."""
    return tuple((n - 1) // 2 for n in bias.shape[1:])


def _offsets(n: int, m: int, a: int, extent, opts: Options, R: int) -> torch.Tensor:
    """(n, m) bias index (j - l) // d + R of axis ``a`` (``windows.axis_offsets`` shifted to ``R``)."""
    kw = opts.axis(a, extent)
    return axis_offsets(n, m, **kw) + (R - bias_radius(kw["before"], kw["after"], kw["shift"]))


def table(bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(Hq, P + 2) in ``dtype``: the flattened bias, then the 0 and -inf slots."""
    flat = bias.reshape(bias.shape[0], -1).to(dtype)
    extra = torch.tensor([0.0, float("-inf")], dtype=dtype, device=bias.device).expand(flat.shape[0], 2)
    return torch.cat([flat, extra], 1)


@dataclass(frozen=True)
class TileIndex:
    idx: torch.Tensor                                 # (nht, ns, nC, nq, nk) int64 slots
    runs: Tuple[Union[slice, torch.Tensor], ...]      # per ``Geometry.runs`` step: its frames' classes

    def numel(self) -> int:                           # for the cache's byte bound
        return self.idx.numel()

    def element_size(self) -> int:
        return self.idx.element_size()


def _frame_classes(g: Geometry, q_grid, kv_grid, extent, causal: bool, opts: Options, Rt: int):
    """Classes (T offset, own frame) sorted so the query frames of a run (t ascending: offset
    descending) are usually consecutive classes; per run the class of each of its frames."""
    off_t = _offsets(q_grid[0], kv_grid[0], 0, extent, opts, Rt)
    qt, kt = g.perms[4], g.perms[5]
    per_run = []
    for a, t0, t1 in g.runs:
        ka = kt[a] if kt else a
        per_run.append([(int(off_t[qt[t] if qt else t, ka]), causal and t == a) for t in range(t0, t1)])
    classes = sorted({c for run in per_run for c in run}, key=lambda c: (-c[0], not c[1]))
    pos = {c: i for i, c in enumerate(classes)}
    runs = []
    for run in per_run:
        ids = [pos[c] for c in run]
        if ids == list(range(ids[0], ids[0] + len(ids))):
            runs.append(slice(ids[0], ids[0] + len(ids)))
        else:
            runs.append(torch.tensor(ids, dtype=torch.long))
    return classes, tuple(runs)


def _tile_index(q_grid, kv_grid, extent, causal: bool, g: Geometry, opts: Options, limit: int,
                R) -> TileIndex:
    _, H, W = q_grid
    _, H2, W2 = kv_grid
    Rt, Rh, Rw = R
    nH, nW = 2 * Rh + 1, 2 * Rw + 1
    P = (2 * Rt + 1) * nH * nW
    bh, bw = g.bh, g.bw
    j = torch.arange(g.nht)[:, None, None, None, None, None]
    s = torch.arange(g.ns)[None, :, None, None, None, None]
    h = j * bh + torch.arange(bh)[None, None, :, None, None, None]
    w = s * bw + torch.arange(bw)[None, None, None, :, None, None]
    b = torch.tensor(g.row_start)[j] - g.pad_top + torch.arange(g.lh)[None, None, None, None, :, None]
    c = torch.tensor(g.col_start)[s] + torch.arange(g.lw)[None, None, None, None, None, :]
    pad_q = (h >= H) | (w >= W)
    h, w, b, c = h.clamp(max=H - 1), w.clamp(max=W - 1), b.clamp(0, H2 - 1), c.clamp(0, W2 - 1)
    for dim, (qp, kp) in ((0, g.perms[0:2]), (1, g.perms[2:4])):      # back to original coordinates
        if qp:
            qp, kp = torch.tensor(qp, dtype=torch.long), torch.tensor(kp, dtype=torch.long)
            if dim == 0:
                h, b = qp[h], kp[b]
            else:
                w, c = qp[w], kp[c]
    spatial = _offsets(H, H2, 1, extent, opts, Rh)[h, b] * nW + _offsets(W, W2, 2, extent, opts, Rw)[w, c]
    shape = (g.nht, g.ns, bh * bw, g.lh * g.lw)
    spatial, pad_q = spatial.reshape(shape), pad_q.expand(*spatial.shape).reshape(shape)
    hidden = window_bias(q_grid, kv_grid, extent, causal, g, torch.float32, limit, opts) == float("-inf")
    classes, runs = _frame_classes(g, q_grid, kv_grid, extent, causal, opts, Rt)
    idx = torch.stack([torch.where(pad_q, P, torch.where(hidden[int(own)], P + 1, spatial + t * nH * nW))
                       for t, own in classes], 2)
    return TileIndex(idx.contiguous(), runs)


def tile_index(q_grid, kv_grid, extent, causal: bool, g: Geometry, opts: Options, limit: int, R) -> TileIndex:
    """The cached slot index of the tile loops (module doc) for a bias of radii ``R``."""
    key = ("bias-tiles", q_grid, kv_grid, extent, causal, g, R) + (() if opts.plain else (opts,))
    return MASKS.get(key, lambda: _tile_index(q_grid, kv_grid, extent, causal, g, opts, limit, R), limit)


class TileBias:
    """One call's gathered bias in the tile loops' layout, and the block-level add and gradient."""

    def __init__(self, bias: torch.Tensor, ti: TileIndex, kv_heads: int, dtype, ws, device):
        self.ti, self.Hk, self.Hq = ti, kv_heads, bias.shape[0]
        self.G = self.Hq // kv_heads
        nht, ns, nC, nq, nk = ti.idx.shape
        idx = ti.idx.to(device)
        self.idx = idx
        tab = table(bias, dtype)
        self.P = tab.shape[1] - 2
        # One 1-D gather per head (1.3 ms for cpu-mid's 8 heads; a 2-D index_select 5.7 ms),
        # then into the score layout (Hk, ns, classes, G, nq, nk) per row tile.
        self.values = ws.get("bias", (nht, self.Hk, ns, nC, self.G, nq, nk), dtype, device)
        dst = self.values.view(nht, self.Hk, ns, nC, self.G, nq * nk)
        for hq in range(self.Hq):
            dst[:, hq // self.G, :, :, hq % self.G].copy_(tab[hq].index_select(0, idx.view(-1)).view(
                nht, ns, nC, nq * nk))
        self.shape = (ns, self.G, nq, nk)

    def _select(self, x: torch.Tensor, blk) -> torch.Tensor:
        cls = self.ti.runs[blk.run]
        return x[:, :, cls] if isinstance(cls, slice) else x.index_select(2, cls.to(x.device))

    def _rows(self, blk):
        """Batch*kv-head rows b0..b1 of a block: (whole cycles of Hk, or the kv heads h0..h1 of one entry)."""
        nb, h0 = blk.b1 - blk.b0, blk.b0 % self.Hk
        return nb, h0, h0 == 0 and nb % self.Hk == 0

    def add(self, s: torch.Tensor, blk) -> None:
        """Add bias and window mask to a block's scores s (n, M, nk), in place."""
        ns, G, nq, nk = self.shape
        nb, h0, cycles = self._rows(blk)
        sel = self._select(self.values[blk.j], blk)                    # (Hk, ns, nf, G, nq, nk)
        if cycles:
            s.view(nb // self.Hk, self.Hk, ns, -1, G, nq, nk).add_(sel)
        else:
            s.view(nb, ns, -1, G, nq, nk).add_(sel[h0:h0 + nb])

    def new_grad(self) -> torch.Tensor:
        return torch.zeros(self.values.shape, dtype=self.values.dtype, device=self.values.device)

    def accumulate(self, ds: torch.Tensor, blk, grad: torch.Tensor) -> None:
        """grad (a ``new_grad`` buffer) += a block's dS (n, M, nk), summed over its batch entries."""
        ns, G, nq, nk = self.shape
        nb, h0, cycles = self._rows(blk)
        if cycles:
            ds = ds.view(nb // self.Hk, self.Hk, ns, -1, G, nq, nk)
            ds = ds.sum(0) if ds.shape[0] > 1 else ds[0]
            dst = grad[blk.j]
        else:
            ds = ds.view(nb, ns, -1, G, nq, nk)
            dst = grad[blk.j, h0:h0 + nb]
        cls = self.ti.runs[blk.run]
        if isinstance(cls, slice):
            dst[:, :, cls].add_(ds)
        else:
            dst.index_add_(2, cls.to(ds.device), ds)

    def grad(self, grads, bias: torch.Tensor) -> torch.Tensor:
        """d_bias (like ``bias``) from the workers' ``new_grad`` buffers: one scatter per call."""
        total = grads[0]
        for x in grads[1:]:
            total.add_(x)
        per_head = total.permute(1, 4, 0, 2, 3, 5, 6).reshape(self.Hq, -1)    # (Hq, nht*ns*nC*nq*nk)
        out = torch.zeros(self.Hq, self.P + 2, dtype=total.dtype, device=total.device)
        out.index_add_(1, self.idx.view(-1), per_head)
        return out[:, :self.P].reshape(bias.shape).to(bias.dtype)


def _flat_index(q_grid, kv_grid, extent, causal: bool, opts: Options, R) -> torch.Tensor:
    Rt, Rh, Rw = R
    nH, nW = 2 * Rh + 1, 2 * Rw + 1
    P = (2 * Rt + 1) * nH * nW
    qc, kc = grid_coords(q_grid), grid_coords(kv_grid)
    idx = None
    for a, mult in ((0, nH * nW), (1, nW), (2, 1)):
        off = _offsets(q_grid[a], kv_grid[a], a, extent, opts, R[a])[qc[:, a]][:, kc[:, a]] * mult
        idx = off if idx is None else idx + off
    ok = visible(qc, kc, q_grid, kv_grid, extent, opts.causal(causal), **opts.kwargs())
    return torch.where(ok, idx, P + 1).to(torch.int32)


def flat_index(q_grid, kv_grid, extent, causal: bool, opts: Options, limit: int, R) -> torch.Tensor:
    """(Nq, Nk) int32 slots of the fused strategy's per-head mask (module doc) for radii ``R``, cached."""
    key = ("bias-flat", q_grid, kv_grid, extent, causal, R) + (() if opts.plain else (opts,))
    return MASKS.get(key, lambda: _flat_index(q_grid, kv_grid, extent, causal, opts, R), limit)
