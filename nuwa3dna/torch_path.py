"""The fast PyTorch 3DNA path (CPU): tiled batched matmuls, recompute backward.

Layout. Queries are cut into tiles of 1 frame x ``bh`` rows x ``bw`` columns.
Keys and values are re-laid once per call into overlapping column *strips*:
strip s holds the ``lw`` key columns that the query columns s*bw..s*bw+bw-1
can see (``lw = bw + 2*e_w`` for self-attention), for every frame and row. In
that layout the keys a query tile sees in one key frame (``lh`` rows x ``lw``
columns) are one contiguous (lh*lw, D) matrix, so a whole row of tiles x
heads x batch is one ``torch.bmm`` on views, with no gather.

Forward (key-frame stationary). For one row tile and one key frame, the query
tiles of all the frames that see that key frame (2*e_t+1, fewer at borders or
when causal) are consecutive rows of one matrix, so one bmm scores them all
and each key/value halo is read once; the softmax runs online across key
frames (running max / sum / rescaled accumulator, FlashAttention style).
Backward (query-tile stationary): per query tile, the scores of its key
frames are recomputed from the saved log-sum-exp; dk/dv accumulate into strip
buffers that are summed back onto the grid at the end.

Masking. Visibility depends only on the tile's (row, strip) position and on
whether the key frame is the query frame (causal), never on the frame index
or batch/head, so one additive bias (0 / -inf) per (row tile, strip) is built
once per geometry, cached, and broadcast over frames, batch and heads. Keys in
padding (outside the grid) are zeros with bias -inf; padded queries get bias 0
so they stay finite and are dropped.

Threads. Work is split into a few contiguous parts run by worker threads,
each single-threaded inside torch (see ``_run`` for why).

Numerics: scores, softmax and accumulation in float32 (float64 for float64
inputs, used by gradcheck); fp16/bf16 inputs are up-cast while being re-laid,
which costs nothing extra since the re-layout copies anyway. Memory is linear
in tokens: strips are (bw + 2 e_w) / bw times k and v, plus one ~1 MiB chunk
of scores per worker; nothing is (queries x keys).

Untested here: speed (benchmarks/ measures it); the tile-size heuristic's
choice is only checked for correctness, not optimality; thread-safety of
concurrent calls from several user threads (scratch buffers are per thread,
the worker pool is shared and unlocked).
"""
from __future__ import annotations

import itertools
import math
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Tuple

import torch

from nuwa3dna.kernels.geometry import Grid, centre_int, query_range

# Score-chunk target in elements (batch*heads are split to stay near it). On
# cpu-mid, 20K-320K measured within noise of each other (benchmarks/NOTES.md);
# larger chunks mean fewer ops, so fewer Python round trips.
CHUNK_ELEMS = 320 * 1024

# Forward loop order: "key_frames" (default) or "query_tiles"; see nearby_forward.
FORWARD = "key_frames"
BACKWARD = "key_frames"

# Tile override for benchmarks/experiments: None lets ``choose_tiles`` decide.
TILE_OVERRIDE: Optional[Tuple[int, int]] = None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Workspace(threading.local):
    """Per-thread scratch buffers reused across calls.

    Fresh 50 MB tensors are page-faulted in on first touch: on this machine
    that cost ~0.4 ms per MB, i.e. ~80 ms of cpu-mid's forward for the strip
    copies alone, more than the copies themselves. Reusing buffers keeps the
    largest ones (strips, tiles) warm. They hold memory between calls (linear
    in tokens: about 8x the size of q for cpu-mid); ``clear_workspace()`` frees them.
    """

    def __init__(self):
        self.bufs = {}

    def get(self, name: str, shape, dtype, device) -> torch.Tensor:
        return _get(self.bufs, name, shape, dtype, device)


def _get(bufs: dict, name: str, shape, dtype, device) -> torch.Tensor:
    """A (shape, dtype) view of the scratch buffer ``name`` of ``bufs``, grown as needed.
    Worker threads are handed the calling thread's ``bufs`` explicitly."""
    numel = math.prod(shape)
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
        buf = torch.empty(numel, dtype=dtype, device=device)
        bufs[name] = buf
    return buf[:numel].view(shape)


@contextmanager
def _one_thread():
    """Run torch single-threaded here: parallelism comes from ``_run``'s workers,
    as many as torch had threads on entry."""
    prev = torch.get_num_threads()
    outer = getattr(_CALL, "workers", None)
    _CALL.workers = (_idle_cores(prev) if DYNAMIC_WORKERS else prev) if outer is None else outer
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
        _CALL.workers = outer


_WS = _Workspace()


def clear_workspace() -> None:
    """Free the scratch buffers this thread keeps between calls."""
    _WS.bufs.clear()


def _halo(n_q: int, n_kv: int, e: int, b: int) -> Tuple[int, int]:
    """(tiles, max key span) along one axis for tiles of ``b`` queries."""
    tiles = -(-n_q // b)
    span = 0
    for j in range(tiles):
        lo, hi = j * b, min(n_q, j * b + b) - 1
        span = max(span, centre_int(hi, n_q, n_kv) - centre_int(lo, n_q, n_kv) + 2 * e + 1)
    return tiles, span


# Relative bmm speed by rows per tile (nq), measured with (nq x 64) @ (64 x 112)
# batched on this 2-core AVX-512 machine: 4 -> 74, 8 -> 106, 16 -> 137, 32 -> 160 GFLOP/s.
def _mm_rate(nq: int) -> float:
    pts = ((1, 20.0), (4, 74.0), (8, 106.0), (16, 137.0), (32, 160.0), (64, 170.0))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if nq <= x1:
            return y0 + (y1 - y0) * (nq - x0) / (x1 - x0)
    return pts[-1][1]


def choose_tiles(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: bool) -> Tuple[int, int]:
    """Pick (bh, bw) minimising modelled time per query: the key halo each query
    pays for (matmul work and softmax work), divided by the bmm rate at that tile
    height, plus a per-chunk Python overhead. For cpu-mid (e=3,3) it picks 4x4
    (49% of computed scores are useful), which measured fastest of 4x4, 2x8,
    4x8, 2x4, 3x3, 3x4, 4x6, 5x5, 2x2 (171 ms vs 191-242 ms, 1 thread)."""
    if TILE_OVERRIDE is not None:
        return TILE_OVERRIDE
    return _choose_tiles(tuple(q_grid), tuple(kv_grid), tuple(extent), bool(causal))


@lru_cache(maxsize=256)
def _choose_tiles(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: bool) -> Tuple[int, int]:
    _, H, W = q_grid
    _, H2, W2 = kv_grid
    best = None
    for bh in range(1, min(H, 16) + 1):
        for bw in range(1, min(W, 16) + 1):
            nq = bh * bw
            if nq > 64 or (nq < 8 and (bh < H or bw < W)):
                continue
            nht, lh = _halo(H, H2, extent[1], bh)
            ns, lw = _halo(W, W2, extent[2], bw)
            lh, lw = min(lh, H2 + 2 * extent[1]), min(lw, W2 + 2 * extent[2])
            padded_q = nht * bh * ns * bw
            keys = lh * lw
            # per computed score: 2 matmuls of D, plus ~4 elementwise passes
            # (softmax) worth about 30 flops of matmul time each at these sizes.
            cost = padded_q * keys * (1.0 / _mm_rate(nq) + 30.0 / 128.0 / 137.0)
            cost += nht * 2e3 / 137.0            # ~15 ops x ~10 us per chunk, in the same units
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
    frames: Tuple[Tuple[int, int], ...]   # per query frame, key frames [a0, a1)
    qframes: Tuple[Tuple[int, int], ...]  # per key frame, query frames [t0, t1) that see it


@lru_cache(maxsize=64)
def geometry(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: bool, bh: int, bw: int) -> Geometry:
    T, H, W = q_grid
    T2, H2, W2 = kv_grid
    et, eh, ew = extent
    nht, lh = _halo(H, H2, eh, bh)
    ns, lw = _halo(W, W2, ew, bw)
    rows = [centre_int(j * bh, H, H2) - eh for j in range(nht)]
    cols = [centre_int(s * bw, W, W2) - ew for s in range(ns)]
    pad_top = max(0, -min(rows))
    h2p = max(pad_top + H2, max(rows) + pad_top + lh)
    frames = []
    for t in range(T):
        c = centre_int(t, T, T2)
        a0, a1 = max(0, c - et), min(T2, c + et + 1)
        if causal:
            a1 = min(a1, t + 1)
        frames.append((a0, a1))
    qframes = []
    for a in range(T2):
        t0, t1 = query_range(a, a + 1, T, T2, et)
        if causal:
            t0 = max(t0, a)
        qframes.append((t0, t1) if t0 < t1 else (0, 0))
    return Geometry(bh, bw, nht, ns, lh, lw, pad_top, h2p,
                    tuple(r + pad_top for r in rows), tuple(cols), tuple(frames), tuple(qframes))


@lru_cache(maxsize=64)
def _bias(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: bool, bh: int, bw: int,
          dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (1 + causal, nht, ns, bh*bw, lh*lw): 0 visible, -inf hidden.

    Index 0 is for key frames other than the query's (window only); index 1
    (causal only) for the query's own frame, adding the raster condition,
    which within one frame only compares (row, col). Padded queries see 0.
    Size is linear in H*W (about 1 MiB for cpu-mid), independent of T, B, heads.
    """
    g = geometry(q_grid, kv_grid, extent, causal, bh, bw)
    _, H, W = q_grid
    _, H2, W2 = kv_grid
    _, eh, ew = extent
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
    ok = ((b >= 0) & (b < H2) & (c >= 0) & (c < W2)
          & ((b - ch).abs() <= eh) & ((c - cw).abs() <= ew))
    pad_q = (h >= H) | (w >= W)
    masks = [ok]
    if causal:
        masks.append(ok & (b * W2 + c <= h * W + w))
    out = torch.stack([torch.where(m | pad_q, 0.0, float("-inf")) for m in masks])
    return out.reshape(len(masks), g.nht, g.ns, bh * bw, g.lh * g.lw).to(dtype).contiguous()


def _setup(q, k, extent, causal):
    B, T, H, W, heads, D = q.shape
    kv_grid = tuple(k.shape[1:4])
    q_grid = (T, H, W)
    bh, bw = choose_tiles(q_grid, kv_grid, tuple(extent), causal)
    g = geometry(q_grid, kv_grid, tuple(extent), causal, bh, bw)
    return q_grid, kv_grid, g


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
    if scale != 1.0:
        torch.mul(src, scale, out=out)
    else:
        out.copy_(src)


def _tile_q(x: torch.Tensor, g: Geometry, dtype, name: str, scale: float = 1.0) -> torch.Tensor:
    """(B, T, H, W, heads, *rest) -> tile layout (T, nht, B*heads*ns, bh*bw, *rest), zero padded."""
    B, T, _, _, heads = x.shape[:5]
    rest = tuple(x.shape[5:])
    src = _split_tiles(x, g).permute((1, 2, 0, 6, 4, 3, 5) + tuple(range(7, 7 + len(rest))))
    out = _WS.get(name, src.shape, dtype, x.device)
    _copy_scaled(src, out, scale)
    return out.reshape((T, g.nht, B * heads * g.ns, g.bh * g.bw) + rest)


def _untile_q(xt: torch.Tensor, g: Geometry, shape, dtype, scale: float = 1.0) -> torch.Tensor:
    """Inverse of ``_tile_q``: tile layout -> (B, T, H, W, heads, *rest) contiguous."""
    B, T, H, W, heads = shape[:5]
    rest = tuple(shape[5:])
    Hp, Wp = g.nht * g.bh, g.ns * g.bw
    src = xt.reshape((T, g.nht, B, heads, g.ns, g.bh, g.bw) + rest)
    src = src.permute((2, 0, 1, 5, 4, 6, 3) + tuple(range(7, 7 + len(rest))))
    out = torch.empty((B, T, Hp, Wp, heads) + rest, dtype=dtype, device=xt.device)
    dst = out.view((B, T, g.nht, g.bh, g.ns, g.bw, heads) + rest)
    _copy_scaled(src, dst, scale)
    return out if (Hp, Wp) == (H, W) else out[:, :, :H, :W].contiguous()


def _tile_rows(x: torch.Tensor, g: Geometry, dtype, name: str, scale: float = 1.0) -> torch.Tensor:
    """(B, T, H, W, heads, *rest) -> (nht, B*heads*ns, T, bh*bw, *rest), zero padded: for
    one row tile and batch*head*strip, consecutive frames are consecutive rows."""
    B, T, _, _, heads = x.shape[:5]
    rest = tuple(x.shape[5:])
    src = _split_tiles(x, g).permute((2, 0, 6, 4, 1, 3, 5) + tuple(range(7, 7 + len(rest))))
    out = _WS.get(name, src.shape, dtype, x.device)
    _copy_scaled(src, out, scale)
    return out.reshape((g.nht, B * heads * g.ns, T, g.bh * g.bw) + rest)


def _untile_rows(xt: torch.Tensor, g: Geometry, shape, dtype, scale: float = 1.0) -> torch.Tensor:
    """Inverse of ``_tile_rows``: (nht, BH*ns, T, nq, *rest) -> (B, T, H, W, heads, *rest)."""
    B, T, H, W, heads = shape[:5]
    rest = tuple(shape[5:])
    Hp, Wp = g.nht * g.bh, g.ns * g.bw
    src = xt.reshape((g.nht, B, heads, g.ns, T, g.bh, g.bw) + rest)
    src = src.permute((1, 4, 0, 5, 3, 6, 2) + tuple(range(7, 7 + len(rest))))
    out = torch.empty((B, T, Hp, Wp, heads) + rest, dtype=dtype, device=xt.device)
    dst = out.view((B, T, g.nht, g.bh, g.ns, g.bw, heads) + rest)
    _copy_scaled(src, dst, scale)
    return out if (Hp, Wp) == (H, W) else out[:, :, :H, :W].contiguous()


def _strips(x: torch.Tensor, g: Geometry, dtype, name: str, bufs: Optional[dict] = None) -> torch.Tensor:
    """(B, T2, H2, W2, heads, D) -> strip layout (B*heads, ns, T2, h2p, lw, D), zeros outside the grid.

    Two copies: one to a zero-bordered (B, heads, T2, h2p, Wpad, D) grid, then
    one per strip, each moving contiguous runs of lw*D values (a direct
    permute-and-slice copy per strip measured 34 ms for cpu-mid's k, this 10 ms).
    """
    B, T2, H2, W2, heads, D = x.shape
    left = max(0, -min(g.col_start))
    wpad = max(left + W2, max(g.col_start) + left + g.lw)
    top, bot = g.pad_top, g.pad_top + H2
    bufs = _WS.bufs if bufs is None else bufs
    grid = _get(bufs, "grid_" + name, (B, heads, T2, g.h2p, wpad, D), dtype, x.device)
    grid[:, :, :, :top].zero_()
    grid[:, :, :, bot:].zero_()
    grid[:, :, :, top:bot, :left].zero_()
    grid[:, :, :, top:bot, left + W2:].zero_()
    grid[:, :, :, top:bot, left:left + W2].copy_(x.permute(0, 4, 1, 2, 3, 5))
    out = _get(bufs, name, (B, heads, g.ns, T2, g.h2p, g.lw, D), dtype, x.device)
    for s, c0 in enumerate(g.col_start):
        out[:, :, s].copy_(grid[:, :, :, :, left + c0:left + c0 + g.lw])
    return out.reshape(B * heads, g.ns, T2, g.h2p, g.lw, D)


def _unstrip(xs: torch.Tensor, g: Geometry, shape, dtype) -> torch.Tensor:
    """Sum a strip-layout gradient back onto the key grid: (B, T2, H2, W2, heads, D)."""
    B, T2, H2, W2, heads, D = shape
    xs = xs.reshape(B, heads, g.ns, T2, g.h2p, g.lw, D)
    left = max(0, -min(g.col_start))
    wpad = max(left + W2, max(g.col_start) + left + g.lw)
    grid = _WS.get("grid_k", (B, heads, T2, g.h2p, wpad, D), xs.dtype, xs.device).zero_()
    for s, c0 in enumerate(g.col_start):
        grid[:, :, :, :, left + c0:left + c0 + g.lw] += xs[:, :, s]
    out = torch.empty(shape, dtype=dtype, device=xs.device)
    top = g.pad_top
    out.copy_(grid[:, :, :, top:top + H2, left:left + W2].permute(0, 2, 3, 4, 1, 5))
    return out


def _strips_kv(k: torch.Tensor, v: torch.Tensor, g: Geometry, dtype):
    """Strip layouts of k and v, built by two workers in parallel."""
    bufs, res = _WS.bufs, {}

    def fn(items):
        for name, x in items:
            res[name] = _strips(x, g, dtype, name, bufs)
    _run(fn, [[("k", k)], [("v", v)]])
    return res["k"], res["v"]


def _chunks(g: Geometry, BH: int, nf: int, min_parts: int = 1):
    """Split B*heads so that one chunk of scores (nf, BH_chunk*ns, nq, nk) is ~CHUNK_ELEMS."""
    per = max(1, nf * g.ns * g.bh * g.bw * g.lh * g.lw)
    step = max(1, min(-(-BH // min_parts), CHUNK_ELEMS // per))
    return [(b0, min(BH, b0 + step)) for b0 in range(0, BH, step)]


def _split(xs: list, n: int) -> List[list]:
    """``xs`` cut into at most ``n`` contiguous, non-empty, near-equal parts."""
    n = max(1, min(n, len(xs)))
    cuts = [len(xs) * i // n for i in range(n + 1)]
    return [xs[a:b] for a, b in zip(cuts, cuts[1:])]


# Worker threads. Many small ops that each fork/join 2 OpenMP threads stall on
# every barrier when the cores are shared: measured with the machine's load at
# ~6, cpu-mid forward took 1.26 s with 2 OpenMP threads and 0.38 s with 1.
# So each worker runs its share of tiles single-threaded (torch releases the
# GIL inside ops) and the workers meet only once, at the end of the call.
_POOL: Optional[ThreadPoolExecutor] = None
PARTS_PER_WORKER = 4


_CALL = threading.local()     # per calling thread: worker count fixed on entry


# Like OpenMP's dynamic adjustment (OMP_DYNAMIC, which libgomp bases on the
# load average too): workers beyond the idle cores only add thread hand-offs.
# Measured on the shared 2-core box at load 3-6: cpu-mid forward 226 ms wall
# with 1 worker, 323 ms with 2; nuwa-image 6 ms vs 15 ms.
# Off by default: the load average also counts our own workers, so a long run
# throttles itself. Measured on the quiet box, 2 threads: cpu-mid-4x took
# 730 ms with it on after 2 minutes of benchmarks (1 worker) and 411 ms with it
# off (cpu-mid 92 ms, so 4.47x for 4x tokens). Turn it on for shared machines.
DYNAMIC_WORKERS = False


def _idle_cores(threads: int) -> int:
    try:
        load = os.getloadavg()[0]
    except OSError:
        return threads
    # The calling thread itself counts about 1 in the load average.
    return max(1, min(threads, round(threads - (load - 1.0))))


def _workers() -> int:
    # Read on entry, before ``_one_thread`` sets torch's count to 1 for the ops.
    n = getattr(_CALL, "workers", None)
    return max(1, torch.get_num_threads() if n is None else n)


def _single_threaded(fn, arg):
    torch.set_num_threads(1)      # per-thread OpenMP/MKL setting in this worker
    with torch.no_grad():         # grad mode is per thread; the caller's is off
        fn(arg)


def _run(fn, parts: List[list]) -> None:
    """Run ``fn(groups)`` on a few threads, ops single-threaded; the threads pull
    ``parts`` (lists of work items) from a shared queue until it is empty, so a
    thread the OS deschedules does not hold the others up: with static halves,
    one descheduled worker made the whole call wait for it."""
    parts = [p for p in parts if p]
    nw = min(_workers(), len(parts))
    if nw <= 1:
        with torch.no_grad():
            fn(itertools.chain.from_iterable(parts))
        return
    global _POOL
    if _POOL is None or _POOL._max_workers < nw - 1:
        _POOL = ThreadPoolExecutor(max_workers=nw - 1, thread_name_prefix="nuwa3dna")
    todo = queue.SimpleQueue()
    for p in parts:
        todo.put(p)

    def pull():
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                return
            yield from p

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [_POOL.submit(_single_threaded, fn, pull()) for _ in range(nw - 1)]
        with torch.no_grad():
            fn(pull())
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(prev)


def nearby_forward(q, k, v, extent: Grid, causal: bool, scale: float):
    with _one_thread(), torch.no_grad():
        return _nearby_forward(q, k, v, extent, causal, scale)


def nearby_backward(dout, q, k, v, out, lse, extent: Grid, causal: bool, scale: float):
    """Backward by recomputation; returns (dq, dk, dv) in the inputs' dtype. Unchecked."""
    with _one_thread(), torch.no_grad():
        return _nearby_backward(dout, q, k, v, out, lse, extent, causal, scale)


def _nearby_forward(q, k, v, extent: Grid, causal: bool, scale: float):
    """Forward, key-frame stationary: returns (out in q's dtype, lse (B, T, H, W, heads)).

    For one row tile and one key frame, the query tiles of every frame that sees
    that key frame (2*e_t+1 of them) are stacked into one (frames*bh*bw, D)
    matrix: each key/value halo is read once per frame instead of once per
    query frame, and the bmm is taller (48 rows for cpu-mid, faster than 16).
    The softmax runs online across key frames (running max, sum and
    rescaled accumulator per query, FlashAttention style). Unchecked.
    """
    if FORWARD == "query_tiles":
        return nearby_forward_query_tiles(q, k, v, extent, causal, scale)
    B, T, H, W, heads, D = q.shape
    q_grid, kv_grid, g = _setup(q, k, extent, causal)
    acc = _acc_dtype(q.dtype)
    BH, ns, nq, nk = B * heads, g.ns, g.bh * g.bw, g.lh * g.lw
    T2 = k.shape[1]
    qs = _tile_rows(q, g, acc, "q", scale)                 # (nht, BH*ns, T, nq, D), pre-scaled
    ks, vs = _strips_kv(k, v, g, acc)                      # (BH, ns, T2, h2p, lw, D)
    bias = _bias(q_grid, kv_grid, tuple(extent), causal, g.bh, g.bw, acc)
    # Online-softmax state. A query no key frame reached keeps l = 0 and comes
    # out 0/0 = NaN: the accumulator's poison.
    os_ = _WS.get("o", qs.shape, acc, q.device).zero_()
    mst = _WS.get("m", qs.shape[:-1], acc, q.device).fill_(float("-inf"))
    lst = _WS.get("l", qs.shape[:-1], acc, q.device).zero_()
    max_nf = max(t1 - t0 for t0, t1 in g.qframes)
    chunks = _chunks(g, BH, max_nf)
    size = max_nf * (chunks[0][1] - chunks[0][0]) * ns * nq * nk

    def work(groups):
        buf = torch.empty(size, dtype=acc, device=q.device)
        for b0, b1, j in groups:
            r0 = g.row_start[j]
            n = (b1 - b0) * ns
            rows = slice(b0 * ns, b1 * ns)
            for a in range(T2):
                t0, t1 = g.qframes[a]
                nf = t1 - t0
                if nf <= 0:
                    continue
                M = nf * nq
                qc = qs[j, rows, t0:t1].reshape(n, M, D)
                kc = ks[b0:b1, :, a, r0:r0 + g.lh].reshape(n, nk, D)
                vc = vs[b0:b1, :, a, r0:r0 + g.lh].reshape(n, nk, D)
                s = buf[:n * M * nk].view(n, M, nk)
                torch.bmm(qc, kc.transpose(1, 2), out=s)
                sv = s.view(b1 - b0, ns, nf, nq, nk)
                if causal and t0 == a:           # first stacked frame is the key frame itself
                    sv[:, :, :1].add_(bias[1, j].unsqueeze(1))
                    if nf > 1:
                        sv[:, :, 1:].add_(bias[0, j].unsqueeze(1))
                else:
                    sv.add_(bias[0, j].unsqueeze(1))
                mc = mst[j, rows, t0:t1].reshape(n, M)
                lc = lst[j, rows, t0:t1].reshape(n, M)
                oc = os_[j, rows, t0:t1].reshape(n, M, D)
                m_new = torch.maximum(mc, s.amax(-1))
                alpha = mc.sub_(m_new).exp_()    # exp(m_old - m_new); 0 on the first frame
                s.sub_(m_new.unsqueeze(-1)).exp_()
                lc.mul_(alpha).add_(s.sum(-1))
                oc.mul_(alpha.unsqueeze(-1)).baddbmm_(s, vc)
                mc.copy_(m_new)

    groups = [(b0, b1, j) for b0, b1 in chunks for j in range(g.nht)]
    _run(work, _split(groups, PARTS_PER_WORKER * _workers()))
    os_.div_(lst.unsqueeze(-1))
    out = _untile_rows(os_, g, q.shape, q.dtype)
    lse = _untile_rows(lst.log_().add_(mst), g, q.shape[:5], acc)
    return out, lse


def nearby_forward_query_tiles(q, k, v, extent: Grid, causal: bool, scale: float):
    """Forward, query-tile stationary (the first version, kept for comparison in
    benchmarks/NOTES.md): returns (out in q's dtype, lse (B, T, H, W, heads) float32/64). Unchecked."""
    B, T, H, W, heads, D = q.shape
    q_grid, kv_grid, g = _setup(q, k, extent, causal)
    acc = _acc_dtype(q.dtype)
    BH, ns, nq, nk = B * heads, g.ns, g.bh * g.bw, g.lh * g.lw
    qs = _tile_q(q, g, acc, "q", scale)                    # (T, nht, BH*ns, nq, D), pre-scaled
    ks, vs = _strips(k, g, acc, "k"), _strips(v, g, acc, "v")   # (BH, ns, T2, h2p, lw, D)
    bias = _bias(q_grid, kv_grid, tuple(extent), causal, g.bh, g.bw, acc)
    os_ = _WS.get("o", qs.shape, acc, q.device).fill_(float("nan"))    # poisoned: every tile must write
    lse = _WS.get("lse", qs.shape[:-1], acc, q.device).fill_(float("nan"))
    max_nf = max(a1 - a0 for a0, a1 in g.frames)
    chunks = _chunks(g, BH, max_nf)
    size = max_nf * (chunks[0][1] - chunks[0][0]) * ns * nq * nk

    def work(items):
        buf = torch.empty(size, dtype=acc, device=q.device)
        for t, j, b0, b1 in items:
            a0, a1 = g.frames[t]
            nf = a1 - a0
            same = causal and (a1 - 1 == t)
            r0 = g.row_start[j]
            n = (b1 - b0) * ns
            qc = qs[t, j, b0 * ns:b1 * ns]
            s = buf[:nf * n * nq * nk].view(nf, n, nq, nk)
            for i in range(nf):
                kc = ks[b0:b1, :, a0 + i, r0:r0 + g.lh].reshape(n, nk, D)
                torch.bmm(qc, kc.transpose(1, 2), out=s[i])
            sv = s.view(nf, b1 - b0, ns, nq, nk)
            if same:
                if nf > 1:
                    sv[:nf - 1].add_(bias[0, j])
                sv[nf - 1].add_(bias[1, j])
            else:
                sv.add_(bias[0, j])
            m = s.amax(dim=(0, 3), keepdim=True)
            s.sub_(m).exp_()
            l = s.sum(dim=(0, 3))
            oc = os_[t, j, b0 * ns:b1 * ns]
            for i in range(nf):
                vc = vs[b0:b1, :, a0 + i, r0:r0 + g.lh].reshape(n, nk, D)
                if i == 0:
                    torch.bmm(s[0], vc, out=oc)
                else:
                    oc.baddbmm_(s[i], vc)
            oc.div_(l.unsqueeze(-1))
            lc = lse[t, j, b0 * ns:b1 * ns]
            torch.log(l, out=lc)
            lc.add_(m.view(n, nq))

    # Batch*head outermost: one head's strips (~6 MB of k and v for cpu-mid)
    # stay in cache while its frames and row tiles sweep over them.
    items = [(t, j, b0, b1) for b0, b1 in chunks for j in range(g.nht) for t in range(T)]
    _run(work, _split(items, _workers()))
    out = _untile_q(os_, g, q.shape, q.dtype)
    lse_nat = _untile_q(lse, g, q.shape[:5], acc)
    return out, lse_nat


def _nearby_backward(dout, q, k, v, out, lse, extent: Grid, causal: bool, scale: float):
    """Backward by recomputation, key-frame stationary like the forward: for one
    row tile and key frame, the stacked query frames' probabilities are
    recomputed from the saved log-sum-exp in one bmm; dk/dv of that key halo
    come out of one bmm each (inner dim frames*bh*bw). Products are formed in
    contiguous scratch and added into the strided accumulators (MKL's in-place
    path on strided batches was ~3x slower per op). Returns (dq, dk, dv) in
    the inputs' dtype. Unchecked."""
    if BACKWARD == "query_tiles":
        return nearby_backward_query_tiles(dout, q, k, v, out, lse, extent, causal, scale)
    B, T, H, W, heads, D = q.shape
    q_grid, kv_grid, g = _setup(q, k, extent, causal)
    acc = _acc_dtype(q.dtype)
    BH, ns, nq, nk = B * heads, g.ns, g.bh * g.bw, g.lh * g.lw
    T2 = k.shape[1]
    qs = _tile_rows(q, g, acc, "q", scale)                 # (nht, BH*ns, T, nq, D)
    dos = _tile_rows(dout, g, acc, "do")
    ks, vs = _strips_kv(k, v, g, acc)
    # delta = rowsum(dO * O): the softmax-Jacobian term of every query.
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    deltas = _tile_rows(delta, g, acc, "delta")             # (nht, BH*ns, T, nq)
    lses = _tile_rows(lse, g, acc, "lse")
    bias = _bias(q_grid, kv_grid, tuple(extent), causal, g.bh, g.bw, acc)
    dqs = _WS.get("dq", qs.shape, acc, q.device).zero_()
    dks = _WS.get("dk", ks.shape, acc, q.device).zero_()
    dvs = _WS.get("dv", vs.shape, acc, q.device).zero_()
    max_nf = max(t1 - t0 for t0, t1 in g.qframes)
    chunks = _chunks(g, BH, max_nf, min_parts=PARTS_PER_WORKER * _workers())
    n_max = (chunks[0][1] - chunks[0][0]) * ns
    size = n_max * max_nf * nq * nk

    def work(groups):
        pbuf, dpbuf = (torch.empty(size, dtype=acc, device=q.device) for _ in range(2))
        tq = torch.empty(n_max * max_nf * nq * D, dtype=acc, device=q.device)
        tk = torch.empty(n_max * nk * D, dtype=acc, device=q.device)
        for b0, b1, j in groups:
            r0 = g.row_start[j]
            n = (b1 - b0) * ns
            rows = slice(b0 * ns, b1 * ns)
            for a in range(T2):
                t0, t1 = g.qframes[a]
                nf = t1 - t0
                if nf <= 0:
                    continue
                M = nf * nq
                qc = qs[j, rows, t0:t1].reshape(n, M, D)
                doc = dos[j, rows, t0:t1].reshape(n, M, D)
                kc = ks[b0:b1, :, a, r0:r0 + g.lh].reshape(n, nk, D)
                vc = vs[b0:b1, :, a, r0:r0 + g.lh].reshape(n, nk, D)
                p = pbuf[:n * M * nk].view(n, M, nk)
                dp = dpbuf[:n * M * nk].view(n, M, nk)
                torch.bmm(qc, kc.transpose(1, 2), out=p)
                torch.bmm(doc, vc.transpose(1, 2), out=dp)
                pv = p.view(b1 - b0, ns, nf, nq, nk)
                if causal and t0 == a:
                    pv[:, :, :1].add_(bias[1, j].unsqueeze(1))
                    if nf > 1:
                        pv[:, :, 1:].add_(bias[0, j].unsqueeze(1))
                else:
                    pv.add_(bias[0, j].unsqueeze(1))
                p.sub_(lses[j, rows, t0:t1].reshape(n, M, 1)).exp_()
                dp.sub_(deltas[j, rows, t0:t1].reshape(n, M, 1)).mul_(p)     # dS
                tmp_q = tq[:n * M * D].view(n, M, D)
                tmp_k = tk[:n * nk * D].view(n, nk, D)
                dqs[j, rows, t0:t1].view(n, M, D).add_(torch.bmm(dp, kc, out=tmp_q))
                dks[b0:b1, :, a, r0:r0 + g.lh].view(n, nk, D).add_(
                    torch.bmm(dp.transpose(1, 2), qc, out=tmp_k))
                dvs[b0:b1, :, a, r0:r0 + g.lh].view(n, nk, D).add_(
                    torch.bmm(p.transpose(1, 2), doc, out=tmp_k))

    # Key halos of neighbouring row tiles overlap, so the dk/dv accumulations of
    # two workers must never meet: workers own disjoint batch*head ranges.
    parts = [[(b0, b1, j) for b0, b1 in part for j in range(g.nht)]
             for part in _split(chunks, PARTS_PER_WORKER * _workers())]
    _run(work, parts)
    dq = _untile_rows(dqs, g, q.shape, q.dtype, scale)
    dk = _unstrip(dks, g, k.shape, k.dtype)
    dv = _unstrip(dvs, g, v.shape, v.dtype)
    return dq, dk, dv


def nearby_backward_query_tiles(dout, q, k, v, out, lse, extent: Grid, causal: bool, scale: float):
    """Backward, query-tile stationary (the first version, kept for comparison). Unchecked."""
    B, T, H, W, heads, D = q.shape
    q_grid, kv_grid, g = _setup(q, k, extent, causal)
    acc = _acc_dtype(q.dtype)
    BH, ns, nq, nk = B * heads, g.ns, g.bh * g.bw, g.lh * g.lw
    qs = _tile_q(q, g, acc, "q", scale)
    dos = _tile_q(dout, g, acc, "do")
    ks, vs = _strips(k, g, acc, "k"), _strips(v, g, acc, "v")
    # delta = rowsum(dO * O): the softmax-Jacobian term of every query, in float32.
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    deltas = _tile_q(delta, g, acc, "delta")                # (T, nht, BH*ns, nq)
    lses = _tile_q(lse, g, acc, "lse")
    bias = _bias(q_grid, kv_grid, tuple(extent), causal, g.bh, g.bw, acc)
    dqs = _WS.get("dq", qs.shape, acc, q.device).fill_(float("nan"))      # poisoned
    dks = _WS.get("dk", ks.shape, acc, q.device).zero_()
    dvs = _WS.get("dv", vs.shape, acc, q.device).zero_()
    max_nf = max(a1 - a0 for a0, a1 in g.frames)
    chunks = _chunks(g, BH, max_nf, min_parts=_workers())
    size = max_nf * (chunks[0][1] - chunks[0][0]) * ns * nq * nk

    def work(items):
        pbuf, dpbuf = (torch.empty(size, dtype=acc, device=q.device) for _ in range(2))
        for t, j, b0, b1 in items:
            a0, a1 = g.frames[t]
            nf = a1 - a0
            same = causal and (a1 - 1 == t)
            r0 = g.row_start[j]
            n = (b1 - b0) * ns
            qc = qs[t, j, b0 * ns:b1 * ns]
            doc = dos[t, j, b0 * ns:b1 * ns]
            p = pbuf[:nf * n * nq * nk].view(nf, n, nq, nk)
            dp = dpbuf[:nf * n * nq * nk].view(nf, n, nq, nk)
            kcs = [ks[b0:b1, :, a0 + i, r0:r0 + g.lh].reshape(n, nk, D) for i in range(nf)]
            vcs = [vs[b0:b1, :, a0 + i, r0:r0 + g.lh].reshape(n, nk, D) for i in range(nf)]
            for i in range(nf):
                torch.bmm(qc, kcs[i].transpose(1, 2), out=p[i])
                torch.bmm(doc, vcs[i].transpose(1, 2), out=dp[i])
            pv = p.view(nf, b1 - b0, ns, nq, nk)
            if same:
                if nf > 1:
                    pv[:nf - 1].add_(bias[0, j])
                pv[nf - 1].add_(bias[1, j])
            else:
                pv.add_(bias[0, j])
            p.sub_(lses[t, j, b0 * ns:b1 * ns].unsqueeze(-1)).exp_()
            # dS = P * (dP - delta)
            dp.sub_(deltas[t, j, b0 * ns:b1 * ns].unsqueeze(-1)).mul_(p)
            dqc = dqs[t, j, b0 * ns:b1 * ns]
            for i in range(nf):
                if i == 0:
                    torch.bmm(dp[0], kcs[0], out=dqc)
                else:
                    dqc.baddbmm_(dp[i], kcs[i])
                dks[b0:b1, :, a0 + i, r0:r0 + g.lh].view(n, nk, D).baddbmm_(dp[i].transpose(1, 2), qc)
                dvs[b0:b1, :, a0 + i, r0:r0 + g.lh].view(n, nk, D).baddbmm_(p[i].transpose(1, 2), doc)

    # Key halos of neighbouring tiles overlap, so the dk/dv accumulations of two
    # workers must never meet: workers own disjoint batch*head ranges (chunks
    # are cut so that there are at least as many ranges as workers).
    parts = [[(t, j, b0, b1) for b0, b1 in part for t in range(T) for j in range(g.nht)]
             for part in _split(chunks, _workers())]
    _run(work, parts)
    dq = _untile_q(dqs, g, q.shape, q.dtype, scale)
    dk = _unstrip(dks, g, k.shape, k.dtype)
    dv = _unstrip(dvs, g, v.shape, v.dtype)
    return dq, dk, dv


class _NearbyAttentionFn(torch.autograd.Function):
    """Autograd for the torch path: saves q, k, v, out, lse; recomputes the rest."""

    @staticmethod
    def forward(ctx, q, k, v, extent, causal, scale):
        out, lse = nearby_forward(q, k, v, extent, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (extent, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = nearby_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None


def torch_nearby_attention(q, k, v, extent: Grid, causal: bool, scale: float) -> torch.Tensor:
    """3DNA with resolved ``extent`` (three ints) and numeric ``scale``; unchecked."""
    extent = tuple(int(e) for e in extent)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _NearbyAttentionFn.apply(q, k, v, extent, bool(causal), float(scale))
    return nearby_forward(q, k, v, extent, bool(causal), float(scale))[0]
