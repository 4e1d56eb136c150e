"""Exact counts of the score pairs the 3DNA kernels compute, for the tile planner
(``configs.plan_tiles``) and the static performance report.

Every loop iteration of the forward and dQ kernels scores a BLOCK_Q x BLOCK_K
tile, and of the dK/dV kernel a BLOCK_K x BLOCK_Q tile, padding rows included:
computed pairs = (loop iterations summed over programs) x BLOCK_Q x BLOCK_K.
The iteration counts here are the kernels' own formulas (``walk.query_walk``'s
``n_iter``, the dK/dV kernel's ``start`` and loop end), causal skips included,
in Python integers. They are separable per axis (the key box of a tile is a
product of per-axis intervals, and the causal terms are sums of products of
per-axis terms), so a count costs O(tiles per axis), not O(tiles).
tests/test_triton_launch.py checks them against a literal replay of the loops
that also checks every visible pair is computed.

The table path (v2 window options, ``relayout``) walks the same loops in re-laid
coordinates with its key boxes and query ranges read from the window tables:
pass ``tables`` (``relayout.window_tables``) and the count is that path's.

Pure Python (no Triton, no torch).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

Tile = Tuple[int, int, int]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def centre(i: int, n_q: int, n_kv: int) -> int:
    return i * n_kv // n_q


def query_range(k_lo: int, k_last: int, n_q: int, n_kv: int, e: int) -> Tuple[int, int]:
    """jit.query_range: queries [q0, q1) whose window reaches keys k_lo..k_last."""
    lo_c, hi_c = k_lo - e, k_last + e + 1
    q0 = 0 if lo_c <= 0 else (lo_c * n_q + n_kv - 1) // n_kv
    return q0, min((hi_c * n_q + n_kv - 1) // n_kv, n_q)


def _tiles(n: int, b: int) -> List[Tuple[int, int]]:
    """(origin, last index) of the tiles of length b on an axis of length n."""
    return [(o, min(o + b, n) - 1) for o in range(0, n, b)]


def _key_box(o: int, last: int, n_q: int, n_kv: int, e: int) -> Tuple[int, int]:
    """The walked key interval [lo, hi) of query tile o..last on one axis (walk.query_walk)."""
    return max(centre(o, n_q, n_kv) - e, 0), min(centre(last, n_q, n_kv) + e + 1, n_kv)


def _boxes(q_grid, kv_grid, extent, tables):
    """Per axis, the walked key interval of a query tile o..last (fwd/dQ): the closed form
    of ``walk.query_walk``, or the window tables' [lo[o], hi[last])."""
    if tables is None:
        return [lambda o, l, n=n, m=m, e=e: _key_box(o, l, n, m, e) for n, m, e in zip(q_grid, kv_grid, extent)]
    return [lambda o, l, t=t: (t.lo[o], t.hi[l]) for t in tables]


def _ranges(q_grid, kv_grid, extent, tables):
    """Per axis, the queries [q0, q1) whose windows reach key tile o..last (dK/dV)."""
    if tables is None:
        return [lambda o, l, n=n, m=m, e=e: query_range(o, l, n, m, e) for n, m, e in zip(q_grid, kv_grid, extent)]
    return [lambda o, l, t=t: (t.q0[o], t.q1[l]) for t in tables]


def _inside(lo: int, hi: int, k: int, n: int) -> int:
    """The walk's first key on one axis: a box [lo, hi) walked in tiles of k slides back
    inside the axis [0, n) where the tiles fit (walk.query_walk, plain windows)."""
    return max(min(lo, n - _cdiv(hi - lo, k) * k), 0)


def keys_inside(q_grid: Tile, kv_grid: Tile, extent: Tile, q_tile: Tile, k_tile: Tile) -> bool:
    """True when every key tile the forward and dQ kernels walk (plain windows) lies inside
    the key grid, so their key loads need no mask (their KEYS_INSIDE): per axis h, w, each
    query tile's box spans whole tiles that fit, n_b * KH <= H2 (frames are walked one by one)."""
    return all(_cdiv(hi - lo, k) * k <= m
               for n, m, e, b, k in zip(q_grid[1:], kv_grid[1:], extent[1:], q_tile[1:], k_tile[1:])
               for lo, hi in (_key_box(o, l, n, m, e) for o, l in _tiles(n, b)))


def query_tile_iterations(q_grid: Sequence[int], kv_grid: Sequence[int], extent: Sequence[int], causal: bool,
                          q_tile: Tile, k_tile: Tile, tables=None) -> int:
    """Loop iterations summed over the query tiles of one (batch, head): forward and dQ kernels.

    ``k_tile`` is 1 x KH x KW. Causal (same grids): frames before the tile's last
    frame in full, then in that frame the row tiles up to the one holding the
    tile's last row, and in that row tile, if it starts exactly at that row, the
    column tiles up to the last column (walk.query_walk).
    """
    (T, H, W) = q_grid
    (BT, BH, BW), (_, KH, KW) = q_tile, k_tile
    box_t, box_h, box_w = _boxes(q_grid, kv_grid, extent, tables)
    ts, hs, ws = _tiles(T, BT), _tiles(H, BH), _tiles(W, BW)
    n_a = [hi - lo for lo, hi in (box_t(o, l) for o, l in ts)]
    boxes_h = [(box_h(o, l), l) for o, l in hs]
    boxes_w = [(box_w(o, l), l) for o, l in ws]
    n_b = [_cdiv(hi - lo, KH) for (lo, hi), _ in boxes_h]
    n_c = [_cdiv(hi - lo, KW) for (lo, hi), _ in boxes_w]
    if tables is None:      # the walk's first key row and column (the causal cut depends on them)
        boxes_h = [((_inside(lo, hi, KH, kv_grid[1]), hi), l) for (lo, hi), l in boxes_h]
        boxes_w = [((_inside(lo, hi, KW, kv_grid[2]), hi), l) for (lo, hi), l in boxes_w]
    if not causal:
        return sum(n_a) * sum(n_b) * sum(n_c)
    before = sum(l - box_t(o, l)[0] for o, l in ts)                     # t_last - a_lo
    rows = [(l - lo) // KH + 1 for (lo, _), l in boxes_h]
    starts = sum(lo + (r - 1) * KH == l for ((lo, _), l), r in zip(boxes_h, rows))
    cols = sum((l - lo) // KW + 1 for (lo, _), l in boxes_w)
    NT, NH = len(ts), len(hs)
    return (before * sum(n_b) * sum(n_c) + NT * sum(r - 1 for r in rows) * sum(n_c)
            + NT * (starts * cols + (NH - starts) * sum(n_c)))


def key_tile_iterations(q_grid: Sequence[int], kv_grid: Sequence[int], extent: Sequence[int], causal: bool,
                        q_tile: Tile, k_tile: Tile, tables=None) -> int:
    """Loop iterations summed over the key tiles of one (batch, head): the dK/dV kernel.

    ``k_tile`` is the program's KT x KH x KW key tile, ``q_tile`` the walked 1 x BH x BW
    query tile. Causal: the head of the walk before the key tile's first key is skipped.
    """
    (T2, H2, W2) = kv_grid
    (_, BH, BW), (KT, KH, KW) = q_tile, k_tile
    range_t, range_h, range_w = _ranges(q_grid, kv_grid, extent, tables)
    ts, hs, ws = _tiles(T2, KT), _tiles(H2, KH), _tiles(W2, KW)
    rt = [(o, range_t(o, l)) for o, l in ts]
    rh = [(o, range_h(o, l)) for o, l in hs]
    rw = [(o, range_w(o, l)) for o, l in ws]
    n_t = [max(0, hi - lo) for _, (lo, hi) in rt]
    n_h = [max(0, _cdiv(hi - lo, BH)) for _, (lo, hi) in rh]
    n_w = [max(0, _cdiv(hi - lo, BW)) for _, (lo, hi) in rw]
    total = sum(n_t) * sum(n_h) * sum(n_w)
    if not causal:
        return total
    skip_t = sum(o - lo for o, (lo, _) in rt)
    skip_h = [(o - lo) // BH for o, (lo, _) in rh]
    ends = sum(min(lo + (s + 1) * BH, hi) - 1 == o for (o, (lo, hi)), s in zip(rh, skip_h))
    skip_w = sum((o - lo) // BW for o, (lo, _) in rw)
    NT = len(ts)
    return total - (skip_t * sum(n_h) * sum(n_w) + NT * sum(skip_h) * sum(n_w) + NT * ends * skip_w)


def computed_pairs(kind: str, q_grid, kv_grid, extent, causal: bool, q_tile: Tile, k_tile: Tile,
                   tables=None) -> int:
    """Score pairs one (batch, head) computes in kernel ``kind`` ("fwd", "dq" or "dkdv"),
    padding rows and masked pairs included; ``tables``: the table path's (v2 options)."""
    count = key_tile_iterations if kind == "dkdv" else query_tile_iterations
    if kind == "dkdv":
        block = q_tile[1] * q_tile[2] * k_tile[0] * k_tile[1] * k_tile[2]
    else:
        block = q_tile[0] * q_tile[1] * q_tile[2] * k_tile[1] * k_tile[2]
    return count(tuple(q_grid), tuple(kv_grid), tuple(extent), bool(causal), tuple(q_tile),
                 tuple(k_tile), tables) * block
