"""Tile plan of the CPU path: tile shape, per-call geometry and the window masks.

Queries are cut into tiles of 1 frame x ``bh`` rows x ``bw`` columns. Keys and
values are re-laid into overlapping column strips (``layout.strips``): strip s
holds the ``lw`` key columns that query columns s*bw .. s*bw+bw-1 can see, so
the keys a query tile sees in one key frame (``lh`` rows x ``lw`` columns) are
one contiguous (lh*lw, D) matrix.

Any window (the v2 options of docs/design.md section 7, ``windows.Options``):
a row tile's halo is the union of its queries' key windows on that axis (first
to last visible key, from the closed-form ``windows.axis_windows``), the mask is
the exact per-axis visibility (``windows.axis_mask``), and the query frames
that see one key frame, an arbitrary set then, are cut into contiguous runs
(``Geometry.runs``), one stacked bmm each. Plain windows keep today's plan.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Tuple

import torch

from nuwa3dna.kernels.geometry import Grid, centre_int, query_range
from nuwa3dna.kernels.windows import Options, axis_mask, axis_windows

PLAIN = Options()


@dataclass(frozen=True)
class CpuConfig:
    """Tunables of the CPU path (one frozen object; ``DEFAULT`` is what the op uses).

    chunk_elems: score elements per chunk (batch*heads are split to stay near
        it); 20K-320K measured within noise on cpu-mid, larger means fewer ops.
    parts_per_worker: work is cut into this many parts per worker thread, pulled
        from a queue, so a descheduled thread does not hold the call up.
    tiles: (bh, bw) query tile, or None to let ``choose_tiles`` decide.
    max_workers: cap on worker threads (None: torch's thread count of the caller).
    workspace_limit: bytes of scratch one thread keeps between calls.
    mask_cache_limit: bytes of cached window masks, over all geometries.
    fused_max_scores, fused_max_scores_wide, fused_wide_fraction: where the
        fused-kernel strategy (``sdpa``) replaces the tile loops: one head's
        Nq*Nk at most the first, or at most the second with at least that
        fraction visible (measured crossover, ``sdpa`` module doc).
    fused_bias_mask_bytes: with a relative position bias the fused strategy's mask is
        per head; kernel calls take at most this many bytes of it (fewer heads per
        call): 16 MiB holds 8 heads at ``fused_max_scores`` in float32; a call costs
        ~0.1 ms of set-up, a head at the wide limit ~10 ms of work.
    """
    chunk_elems: int = 320 * 1024
    parts_per_worker: int = 4
    tiles: Optional[Tuple[int, int]] = None
    max_workers: Optional[int] = None
    workspace_limit: int = 1 << 30
    mask_cache_limit: int = 64 << 20
    fused_max_scores: int = 1 << 19
    fused_max_scores_wide: int = 1 << 22
    fused_wide_fraction: float = 0.25
    fused_bias_mask_bytes: int = 16 << 20


DEFAULT = CpuConfig()


def _halo(n_q: int, n_kv: int, e: int, b: int) -> Tuple[int, int]:
    """(tiles, max key span) along one axis for tiles of ``b`` queries."""
    tiles = -(-n_q // b)
    span = 0
    for j in range(tiles):
        lo, hi = j * b, min(n_q, j * b + b) - 1
        span = max(span, centre_int(hi, n_q, n_kv) - centre_int(lo, n_q, n_kv) + 2 * e + 1)
    return tiles, span


def axis_perms(n_q: int, n_kv: int, d: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The residue re-layout of a dilated axis: (query order, key order), each new index -> original
    index, () when ``d`` is 1. Keys are sorted by (j mod d, j), queries by (centre mod d, p): a
    query sees keys of its centre's residue only, so its dilated window becomes a contiguous run
    of the re-laid keys and a tile of re-laid queries (mostly of one residue) has a halo of about
    the tile plus one window, not the 2x-per-axis union of interleaved residues."""
    if d == 1:
        return (), ()
    q = sorted(range(n_q), key=lambda p: ((p * n_kv // n_q) % d, p))
    k = sorted(range(n_kv), key=lambda j: (j % d, j))
    return tuple(q), tuple(k)


def _axis_spans(n_q: int, n_kv: int, b: int, kw: dict) -> Tuple[int, int, Tuple[int, ...]]:
    """Any window: (tiles, max key span, first key per tile) along one axis for tiles of ``b``
    queries, in the plan's coordinates (``axis_perms`` on a dilated axis); a tile's span runs
    from its queries' first visible key to their last."""
    first, end = _axis_bounds(n_q, n_kv, tuple(sorted(kw.items())))
    tiles = -(-n_q // b)
    span, firsts = 0, []
    for j in range(tiles):
        own = [(a, z) for a, z in zip(first[j * b:j * b + b], end[j * b:j * b + b]) if z > a]
        if not own:                      # no query of the tile sees a key on this axis
            firsts.append(0)
            continue
        lo, hi = min(a for a, _ in own), max(z for _, z in own)
        firsts.append(lo)
        span = max(span, hi - lo)
    return tiles, max(span, 1), tuple(firsts)


@lru_cache(maxsize=256)
def _axis_bounds(n_q: int, n_kv: int, kw: tuple) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Per query of one axis in the plan's order, its first visible key and last + 1, in the plan's
    key order (``windows.axis_windows``, re-laid by ``axis_perms``); first >= end: none."""
    kw = dict(kw)
    d = kw["dilation"]
    start, stop = axis_windows(n_q, n_kv, **kw)
    start, stop = start.tolist(), stop.tolist()
    qp, kp = axis_perms(n_q, n_kv, d)
    if not qp:
        return tuple(start), tuple(z - d + 1 if z > a else a for a, z in zip(start, stop))
    kinv = [0] * n_kv
    for i, j in enumerate(kp):
        kinv[j] = i
    first, end = [], []
    for p in qp:
        a, z = start[p], stop[p]
        if z > a:
            first.append(kinv[a])
            end.append(kinv[z - d] + 1)
        else:
            first.append(0)
            end.append(0)
    return tuple(first), tuple(end)


def _mm_rate(nq: int) -> float:
    """Relative bmm speed by rows per tile, measured with (nq x 64) @ (64 x 112) batched
    on the 2-core AVX-512 machine: 4 -> 74, 8 -> 106, 16 -> 137, 32 -> 160 GFLOP/s."""
    pts = ((1, 20.0), (4, 74.0), (8, 106.0), (16, 137.0), (32, 160.0), (64, 170.0))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if nq <= x1:
            return y0 + (y1 - y0) * (nq - x0) / (x1 - x0)
    return pts[-1][1]


@lru_cache(maxsize=256)
def choose_tiles(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: bool, opts: Options = PLAIN) -> Tuple[int, int]:
    """Pick (bh, bw) minimising modelled time per query: the key halo each query
    pays for (matmul and softmax work) over the bmm rate at that tile height,
    plus a per-chunk Python overhead. For cpu-mid it picks 4x4 (49% of computed
    scores useful), measured fastest of nine shapes (benchmarks/NOTES.md)."""
    _, H, W = q_grid
    _, H2, W2 = kv_grid
    best = None
    for bh in range(1, min(H, 16) + 1):
        for bw in range(1, min(W, 16) + 1):
            nq = bh * bw
            if nq > 64 or (nq < 8 and (bh < H or bw < W)):
                continue
            if opts.plain:
                nht, lh = _halo(H, H2, extent[1], bh)
                ns, lw = _halo(W, W2, extent[2], bw)
                lh, lw = min(lh, H2 + 2 * extent[1]), min(lw, W2 + 2 * extent[2])
            else:
                nht, lh, _ = _axis_spans(H, H2, bh, opts.axis(1, extent))
                ns, lw, _ = _axis_spans(W, W2, bw, opts.axis(2, extent))
            # Per computed score: 2 matmuls of D plus ~4 elementwise passes
            # (softmax), each worth about 30 matmul flops at these sizes.
            cost = nht * bh * ns * bw * lh * lw * (1.0 / _mm_rate(nq) + 30.0 / 128.0 / 137.0)
            cost += nht * 2e3 / 137.0            # ~15 ops x ~10 us per chunk, same units
            cost *= 1.0 + 0.05 * (lw / bw)       # strip copies
            if best is None or cost < best[0]:
                best = (cost, bh, bw)
    return best[1], best[2]


@dataclass(frozen=True)
class Geometry:
    bh: int
    bw: int
    nht: int            # row tiles
    ns: int             # column strips
    lh: int             # key rows per tile halo
    lw: int             # key columns per strip
    pad_top: int        # zero rows above the key grid in the strip layout
    h2p: int            # padded key rows
    row_start: Tuple[int, ...]    # per row tile, first halo row in padded rows
    col_start: Tuple[int, ...]    # per strip, first key column (may be < 0)
    runs: Tuple[Tuple[int, int, int], ...]    # (key frame a, t0, t1): contiguous query frames seeing a,
                                              # key frames in order (the loops' steps)
    # Residue re-layout of dilated axes (``axis_perms``; () = identity): new index -> original,
    # for query rows, key rows, query columns, key columns, query frames, key frames. Rows,
    # columns, halos, masks and runs above are in the re-laid coordinates.
    perms: Tuple[Tuple[int, ...], ...] = ((), (), (), (), (), ())

    @property
    def max_nf(self) -> int:
        """Most query frames stacked on one key frame in one step."""
        return max((t1 - t0 for _, t0, t1 in self.runs), default=1)

    @property
    def left(self) -> int:
        """Zero columns left of the key grid in the padded grid the strips are cut from."""
        return max(0, -min(self.col_start))

    def wpad(self, W2: int) -> int:
        return max(self.left + W2, max(self.col_start) + self.left + self.lw)


@lru_cache(maxsize=64)
def geometry(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: bool, bh: int, bw: int,
             opts: Options = PLAIN) -> Geometry:
    """The plan for tiles of ``bh`` x ``bw`` queries; ``causal`` is raster order, ``opts`` any window."""
    if not opts.plain:
        return _geometry_general(q_grid, kv_grid, extent, causal, bh, bw, opts)
    T, H, W = q_grid
    T2, H2, W2 = kv_grid
    et, eh, ew = extent
    nht, lh = _halo(H, H2, eh, bh)
    ns, lw = _halo(W, W2, ew, bw)
    rows = [centre_int(j * bh, H, H2) - eh for j in range(nht)]
    cols = [centre_int(s * bw, W, W2) - ew for s in range(ns)]
    pad_top = max(0, -min(rows))
    h2p = max(pad_top + H2, max(rows) + pad_top + lh)
    runs = []
    for a in range(T2):
        t0, t1 = query_range(a, a + 1, T, T2, et)
        if causal:
            t0 = max(t0, a)
        if t0 < t1:
            runs.append((a, t0, t1))
    return Geometry(bh, bw, nht, ns, lh, lw, pad_top, h2p,
                    tuple(r + pad_top for r in rows), tuple(cols), tuple(runs))


def _geometry_general(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: bool, bh: int, bw: int,
                      opts: Options) -> Geometry:
    """Any window: halos are the unions of the tile's windows, query frames exact runs."""
    T, H, W = q_grid
    T2, H2, W2 = kv_grid
    nht, lh, rows = _axis_spans(H, H2, bh, opts.axis(1, extent))
    ns, lw, cols = _axis_spans(W, W2, bw, opts.axis(2, extent))
    h2p = max(H2, max(rows) + lh)
    sees = axis_mask(T, T2, **opts.axis(0, extent))            # (T, T2): query frame t sees key frame a
    if causal:                                                 # raster order: no key frame after the query's
        sees &= torch.ones(T, T2, dtype=torch.bool).tril()
    qt, kt = axis_perms(T, T2, opts.dilation[0])               # dilated frames: runs of one residue
    if qt:                                                     # (self-attention: qt == kt, so t == a
        sees = sees[list(qt)][:, list(kt)]                     # still marks the query's own frame)
    runs = []
    for a in range(T2):
        ts = torch.nonzero(sees[:, a]).flatten().tolist()
        t0 = None
        for i, t in enumerate(ts):
            if t0 is None:
                t0 = t
            if i + 1 == len(ts) or ts[i + 1] != t + 1:
                runs.append((a, t0, t + 1))
                t0 = None
    perms = axis_perms(H, H2, opts.dilation[1]) + axis_perms(W, W2, opts.dilation[2]) + (qt, kt)
    return Geometry(bh, bw, nht, ns, lh, lw, 0, h2p, tuple(rows), tuple(cols), tuple(runs), perms)


def plan(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: bool, config: CpuConfig,
         opts: Options = PLAIN) -> Geometry:
    if opts.plain:       # today's calls, unchanged
        bh, bw = config.tiles or choose_tiles(q_grid, kv_grid, extent, causal)
        return geometry(q_grid, kv_grid, extent, causal, bh, bw)
    bh, bw = config.tiles or choose_tiles(q_grid, kv_grid, extent, causal, opts)
    return geometry(q_grid, kv_grid, extent, causal, bh, bw, opts)


def _window_bias(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: bool, g: Geometry,
                 dtype: torch.dtype, opts: Options = PLAIN) -> torch.Tensor:
    _, H, W = q_grid
    _, H2, W2 = kv_grid
    _, eh, ew = extent
    bh, bw = g.bh, g.bw
    j = torch.arange(g.nht)[:, None, None, None, None, None]
    s = torch.arange(g.ns)[None, :, None, None, None, None]
    y = torch.arange(bh)[None, None, :, None, None, None]
    x = torch.arange(bw)[None, None, None, :, None, None]
    i = torch.arange(g.lh)[None, None, None, None, :, None]
    l = torch.arange(g.lw)[None, None, None, None, None, :]
    h = j * bh + y
    w = s * bw + x
    b = torch.tensor(g.row_start)[j] - g.pad_top + i
    c = torch.tensor(g.col_start)[s] + l
    ch = torch.div(h * H2, H, rounding_mode="floor")
    cw = torch.div(w * W2, W, rounding_mode="floor")
    inside = (b >= 0) & (b < H2) & (c >= 0) & (c < W2)
    pad_q = (h >= H) | (w >= W)
    if opts.plain:
        ok = inside & ((b - ch).abs() <= eh) & ((c - cw).abs() <= ew)
    else:       # the exact per-axis windows (dilation, stride, shift, per-axis causal on H and W)
        mh = axis_mask(H, H2, **opts.axis(1, extent))
        mw = axis_mask(W, W2, **opts.axis(2, extent))
        qh, kh, qw, kw = (torch.tensor(x, dtype=torch.long) if x else None for x in g.perms[:4])
        h, w = h.clamp(max=H - 1), w.clamp(max=W - 1)         # padded queries: any row, masked below
        b, c = b.clamp(0, H2 - 1), c.clamp(0, W2 - 1)         # outside the grid: masked by ``inside``
        if qh is not None:                                    # back to original coordinates
            h, b = qh[h], kh[b]
        if qw is not None:
            w, c = qw[w], kw[c]
        ok = inside & mh[h, b] & mw[w, c]
    masks = [ok]
    if causal:
        masks.append(ok & (b * W2 + c <= h * W + w))
    out = torch.stack([torch.where(m | pad_q, 0.0, float("-inf")) for m in masks])
    return out.reshape(len(masks), g.nht, g.ns, bh * bw, g.lh * g.lw).to(dtype).contiguous()


class _MaskCache:
    """LRU of window masks, bounded by bytes (a mask larger than the bound is not kept)."""

    def __init__(self):
        self.items: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple, make, limit: int) -> torch.Tensor:
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                return hit
        with torch.inference_mode(False):
            value = make()
        size = value.numel() * value.element_size()
        with self.lock:
            if size <= limit:
                self.items[key] = value
                while self.nbytes() > limit:
                    self.items.popitem(last=False)
        return value

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.items.values())

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


MASKS = _MaskCache()


def window_bias(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: bool, g: Geometry,
                dtype: torch.dtype, limit: int, opts: Options = PLAIN) -> torch.Tensor:
    """Additive mask (1 + causal, nht, ns, bh*bw, lh*lw): 0 visible, -inf hidden.

    Visibility depends only on the tile's (row, strip) position and on whether
    the key frame is the query's (causal), never on the frame, batch or head, so
    one mask per geometry is broadcast over all of them. Index 0 is for key
    frames other than the query's (window only); index 1 (causal only) for the
    query's own frame, adding the raster condition. Padded queries see 0 (they
    stay finite and are dropped). Linear in H*W: about 1 MiB for cpu-mid.
    """
    key = (q_grid, kv_grid, extent, causal, g, dtype) + (() if opts.plain else (opts,))
    return MASKS.get(key, lambda: _window_bias(q_grid, kv_grid, extent, causal, g, dtype, opts), limit)
