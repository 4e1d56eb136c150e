"""Forward of the CPU tile path: key-frame stationary, online softmax.

For one row tile and one key frame, the query tiles of every frame that sees
that key frame (2*e_t+1 of them, fewer at borders or when causal) are
consecutive rows of one (frames*bh*bw, D) matrix (``layout.tile_rows``), so one
bmm scores them all, each key/value halo is read once per frame rather than once
per query frame, and the bmm is taller (48 rows for cpu-mid, faster than 16).
The softmax runs online across key frames (running max, sum and rescaled
accumulator per query, FlashAttention style). Grouped queries (k, v with
Hk < Hq heads) keep k and v at Hk heads and stack a group's G query heads in
the same bmm (G times taller); a relative position bias replaces the window
mask by the per-call table of ``bias.TileBias`` (mask and bias in one add).

Numerics: scores, softmax and accumulation in float32 (float64 for float64
inputs, used by gradcheck). Nothing is (queries x keys): one chunk of scores of
about ``chunk_elems`` per worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nuwa3dna.kernels.cpu.bias import TileBias, radii, tile_index

from nuwa3dna.kernels.cpu.layout import relay, strips_kv, tile_rows, unrelay, untile_rows
from nuwa3dna.kernels.cpu.planner import PLAIN, CpuConfig, Geometry, plan, window_bias
from nuwa3dna.kernels.cpu.workers import on_lead, run, split
from nuwa3dna.kernels.cpu.workspace import Workspace, workspace
from nuwa3dna.kernels.windows import Options


@dataclass(frozen=True)
class Call:
    """What one forward or backward call shares between its setup and its loops."""
    g: Geometry
    acc: torch.dtype
    bias: torch.Tensor          # (1 + causal, nht, ns, nq, nk)
    ws: Workspace
    workers: int
    BH: int                     # batch * kv heads
    max_nf: int                 # most query frames stacked on one key frame
    G: int = 1                  # query heads per kv head, stacked in one bmm
    Hk: int = 1                 # kv heads
    rel: Optional[TileBias] = None      # relative position bias (with the mask), or None


def setup(q, k, extent, causal: bool, config: CpuConfig, workers: int, opts: Options = PLAIN,
          rel_bias=None) -> Call:
    B, T, H, W, heads, _ = q.shape
    Hk = k.shape[4]
    q_grid, kv_grid = (T, H, W), tuple(k.shape[1:4])
    g = plan(q_grid, kv_grid, tuple(extent), causal, config, opts)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    bias = window_bias(q_grid, kv_grid, tuple(extent), causal, g, acc, config.mask_cache_limit, opts)
    if bias.device != q.device:     # masks are built (and cached) on the CPU
        bias = bias.to(q.device)
    ws, rel = workspace(), None
    if rel_bias is not None:
        ti = tile_index(q_grid, kv_grid, tuple(extent), causal, g, opts, config.mask_cache_limit, radii(rel_bias))
        rel = TileBias(rel_bias, ti, Hk, acc, ws, q.device)
    return Call(g, acc, bias, ws, workers, B * Hk, g.max_nf, heads // Hk, Hk, rel)


def chunks(c: Call, config: CpuConfig, min_parts: int = 1):
    """Ranges of batch*kv head so that one chunk of scores (nf, BH_chunk*ns, G*nq, nk) is ~chunk_elems.
    With a bias a range never straddles two batch entries unless it holds whole ones (the
    bias then broadcasts over the batch: ``TileBias.add``)."""
    g = c.g
    per = max(1, c.max_nf * g.ns * c.G * g.bh * g.bw * g.lh * g.lw)
    step = max(1, min(-(-c.BH // min_parts), config.chunk_elems // per))
    if c.rel is None:
        return [(b0, min(c.BH, b0 + step)) for b0 in range(0, c.BH, step)]
    if step >= c.Hk:
        step -= step % c.Hk
        return [(b0, min(c.BH, b0 + step)) for b0 in range(0, c.BH, step)]
    return [(e + h0, e + min(c.Hk, h0 + step)) for e in range(0, c.BH, c.Hk) for h0 in range(0, c.Hk, step)]


@dataclass(frozen=True)
class Block:
    """One step of the tile loops: batch*head rows b0..b1 of row tile j against key frame a,
    with the query frames t0..t1 that see it stacked into M = nf*bh*bw rows."""
    b0: int
    b1: int
    j: int
    a: int
    t0: int
    t1: int
    n: int            # (b1 - b0) * strips: the bmm batch
    M: int
    nk: int
    halo: slice       # key rows of the tile's halo in the padded strip layout
    run: int = 0      # index of (a, t0, t1) in ``Geometry.runs``

    def queries(self, x: torch.Tensor, ns: int) -> torch.Tensor:
        """Rows of a ``tile_rows`` layout (nht, BH*ns, T, nq, *rest): an (n, M, *rest) view
        (a view, never a copy: the loops accumulate into it in place)."""
        return x[self.j, self.b0 * ns:self.b1 * ns, self.t0:self.t1].view(self.n, self.M, *x.shape[4:])

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """The halo of a strip layout (BH, ns, T2, h2p, lw, D): (n, nk, D)."""
        return x[self.b0:self.b1, :, self.a, self.halo].view(self.n, self.nk, x.shape[-1])


def blocks(g: Geometry, groups, G: int = 1):
    """The loop steps of ``groups`` (b0, b1, j), key frames in order (``Geometry.runs``: one step per
    contiguous run of query frames that see a key frame); frames nobody sees are skipped."""
    for b0, b1, j in groups:
        halo = slice(g.row_start[j], g.row_start[j] + g.lh)
        for r, (a, t0, t1) in enumerate(g.runs):
            yield Block(b0, b1, j, a, t0, t1, (b1 - b0) * g.ns, (t1 - t0) * G * g.bh * g.bw, g.lh * g.lw,
                        halo, r)


def add_window_bias(s: torch.Tensor, bias: torch.Tensor, j: int, own_frame_first: bool, G: int = 1) -> None:
    """Add row tile ``j``'s mask to scores ``s`` (b, ns, nf*G, nq, nk) in place. When the
    first stacked query frame is the key frame itself (causal), its G heads get the raster mask."""
    if own_frame_first:
        s[:, :, :G].add_(bias[1, j].unsqueeze(1))
        if s.shape[2] > G:
            s[:, :, G:].add_(bias[0, j].unsqueeze(1))
    else:
        s.add_(bias[0, j].unsqueeze(1))


def add_mask(s: torch.Tensor, c: Call, blk: Block, causal: bool) -> None:
    """Window mask (and relative position bias) of one block's scores s (n, M, nk), in place."""
    g = c.g
    if c.rel is not None:
        c.rel.add(s, blk)
    else:
        add_window_bias(s.view(blk.b1 - blk.b0, g.ns, -1, g.bh * g.bw, blk.nk), c.bias, blk.j,
                        causal and blk.t0 == blk.a, c.G)


def guarded(body, q, k, extent, causal: bool, config: CpuConfig, opts: Options = PLAIN, rel_bias=None):
    """Run ``body(call)`` for one forward or backward on the lead worker (``workers.on_lead``),
    trimming the workspace afterwards."""
    def run_call(workers):
        c = setup(q, k, extent, causal, config, workers, opts, rel_bias)
        try:
            return body(c)
        finally:
            c.ws.trim(config.workspace_limit)
    return on_lead(run_call, q.device, config.max_workers)


def forward(q, k, v, extent, causal: bool, scale: float, config: CpuConfig, opts: Options = PLAIN,
            rel_bias=None):
    """Returns (out in q's dtype, lse (B, T, H, W, heads) in the accumulation dtype). Unchecked.
    ``causal``: raster order; ``opts``: any other window option; k, v may have fewer heads than
    q (a divisor); ``rel_bias``: the relative position bias (Hq, 2Rt+1, 2Rh+1, 2Rw+1) or None."""
    return guarded(lambda c: _forward(q, k, v, causal, scale, c, config), q, k, extent, causal, config, opts,
                   rel_bias)


def _forward(q, k, v, causal, scale, c: Call, config: CpuConfig):
    g, acc, ws = c.g, c.acc, c.ws
    ns, nk = g.ns, g.lh * g.lw
    q, k, v = relay(q, g, "q"), relay(k, g, "k"), relay(v, g, "k")      # dilated axes by residue
    qs = tile_rows(q, g, acc, ws, "q", scale, c.G)         # (nht, BHk*ns, T, G*nq, D), pre-scaled
    ks, vs = strips_kv(k, v, g, acc, ws, c.workers)        # (BH, ns, T2, h2p, lw, D)
    # Online-softmax state. A query no key frame reached keeps l = 0 and comes
    # out 0/0 = NaN: the accumulator's poison.
    os_ = ws.get("o", qs.shape, acc, q.device).zero_()
    mst = ws.get("m", qs.shape[:-1], acc, q.device).fill_(float("-inf"))
    lst = ws.get("l", qs.shape[:-1], acc, q.device).zero_()
    parts = chunks(c, config)
    size = c.max_nf * max(b1 - b0 for b0, b1 in parts) * ns * c.G * g.bh * g.bw * nk

    def work(groups):
        buf = torch.empty(size, dtype=acc, device=q.device)
        for blk in blocks(g, groups, c.G):
            n, M = blk.n, blk.M
            s = buf[:n * M * nk].view(n, M, nk)                        # [n, M, nk]
            torch.bmm(blk.queries(qs, ns), blk.keys(ks).transpose(1, 2), out=s)
            add_mask(s, c, blk, causal)
            mc, lc, oc = blk.queries(mst, ns), blk.queries(lst, ns), blk.queries(os_, ns)
            m_new = torch.maximum(mc, s.amax(-1))
            alpha = mc.sub_(m_new).exp_()    # exp(m_old - m_new); 0 on the first frame
            s.sub_(m_new.unsqueeze(-1)).exp_()
            lc.mul_(alpha).add_(s.sum(-1))
            oc.mul_(alpha.unsqueeze(-1)).baddbmm_(s, blk.keys(vs))
            mc.copy_(m_new)

    groups = [(b0, b1, j) for b0, b1 in parts for j in range(g.nht)]
    run(work, split(groups, config.parts_per_worker * c.workers), c.workers)
    os_.div_(lst.unsqueeze(-1))
    out = untile_rows(os_, g, q.shape, q.dtype, groups=c.G)
    lse = untile_rows(lst.log_().add_(mst), g, q.shape[:5], acc, groups=c.G)
    return unrelay(out, g, "q"), unrelay(lse, g, "q")
