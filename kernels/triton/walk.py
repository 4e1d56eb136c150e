"""The key walk that the forward and dQ kernels share: a query tile's key box
(``query_walk``), stepped one 1 x KH x KW key tile at a time (``next_tile``), its keys
and values (``key_tile``) and their visibility (``key_mask``).

Plain windows compute the box in closed form, the table path (TABLES, v2 window
options) reads it from the window tables (``jit`` module docstring). The loop
carries the tile's (frame, row, column), so an iteration does no division (sm_90 SASS,
gpu-large bf16 forward: 740 instructions per iteration before, 539 after, for 12 HGMMA).
"""
from __future__ import annotations

import triton
import triton.language as tl

from nuwa3dna.kernels.triton.jit import axis_tables, centre, load_rows, program_tile, tile_coords, tile_mask, \
    token_offsets, window


@triton.jit
def query_walk(pid, T, H, W, T2, H2, W2, ET, EH, EW, n_heads, TAB,
               BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, KH: tl.constexpr,
               KW: tl.constexpr, CAUSAL: tl.constexpr, WIDE_IDX: tl.constexpr, TABLES: tl.constexpr):
    """Prologue of the forward and dQ kernels: program ``pid``'s query tile and its key walk.

    The tile's windows, unioned per axis, form a key box (centres are monotone
    in the query index, so the union is one interval per axis), walked in 1 x KH
    x KW key tiles in raster order. Causal (same grid, so the tile's last query
    is its latest): the tiles whose first key comes after that query are a tail
    of the walk and are cut from ``n_iter``. TABLES: the same in re-laid
    coordinates, windows and key box read from the tables at TAB (``axis_tables``;
    their lo, hi are monotone too), so the causal cut is unchanged (``relayout``).

    Returns (bh, b, hd, qt, qh, qw, q_ok, rq, walk, n_iter, first): the (batch *
    heads + head) statistics row, batch and head (int64); per query row [BLOCK_Q]
    its coordinates (re-laid with TABLES: ``grid_rows`` gives the grid's), on-grid
    flag and raster index; ``walk``, the loop-invariant state ``key_tile``,
    ``key_mask`` and ``next_tile`` read; the number of key tiles to visit; and the
    first tile's (frame, row, column), which the loop carries and ``next_tile``
    steps: no division per iteration (three runtime divisions cost ~80 SASS
    instructions per iteration on sm_90, a ninth of the gpu-large forward loop).
    """
    BLOCK_Q: tl.constexpr = BT * BH * BW
    BLOCK_K: tl.constexpr = KH * KW
    if CAUSAL:
        # Later query tiles walk more keys (the windows of early ones are clipped
        # by the grid's start): launch them first so the longest programs do not
        # start last. The reversal keeps neighbouring programs on neighbouring
        # tiles (L2 reuse of K/V is unchanged).
        pid = tl.num_programs(0) - 1 - pid
    bh, b, hd, t0, h0, w0, t_last, h_last, w_last = program_tile(pid, T, H, W, n_heads, BT, BH, BW)
    qt, qh, qw = tile_coords(tl.arange(0, BLOCK_Q), t0, h0, w0, BT, BH, BW)  # [BLOCK_Q] each
    q_ok = (qt < T) & (qh < H) & (qw < W)                               # [BLOCK_Q]
    rq = (qt * H + qh) * W + qw                                         # [BLOCK_Q] raster
    if TABLES:
        LOT, HIT, _, PKT, Q0T, Q1T = axis_tables(TAB, 0, T, H, W, T2, H2, W2)
        LOH, HIH, _, PKH, Q0H, Q1H = axis_tables(TAB, 1, T, H, W, T2, H2, W2)
        LOW, HIW, _, PKW, Q0W, Q1W = axis_tables(TAB, 2, T, H, W, T2, H2, W2)
        # No per-row windows: ``key_mask`` tests each key's query range (q0, q1)
        # against the rows' (re-laid) coordinates, which, unlike loaded per-row
        # bounds, cost no registers across the loop (the compiler recomputes them).
        f_lo, f_hi, h_lo, h_hi, w_lo, w_hi = qt, qt, qh, qh, qw, qw
    else:
        # Per-query windows; the upper bounds also hide keys off the grid.
        f_lo = centre(qt, T, T2, WIDE_IDX)                              # [BLOCK_Q] the frame centre
        f_hi = f_lo
        h_lo, h_hi = window(centre(qh, H, H2, WIDE_IDX), EH, H2)        # [BLOCK_Q] each
        w_lo, w_hi = window(centre(qw, W, W2, WIDE_IDX), EW, W2)        # [BLOCK_Q] each
    offs_k = tl.arange(0, BLOCK_K)
    jh = offs_k // KW                                                   # [BLOCK_K] row in key tile
    jw = offs_k % KW                                                    # [BLOCK_K] column in key tile
    jhw = jh * W2 + jw                                                  # [BLOCK_K] raster offset in tile

    if TABLES:
        a_lo = tl.load(LOT + t0)                                        # the key box
        a_hi = tl.load(HIT + t_last)
        b_lo = tl.load(LOH + h0)
        b_hi = tl.load(HIH + h_last)
        c_lo = tl.load(LOW + w0)
        c_hi = tl.load(HIW + w_last)
        keys = (PKT, PKH, PKW, Q0T, Q1T, Q0H, Q1H, Q0W, Q1W)
    else:
        a_lo = tl.maximum(centre(t0, T, T2, WIDE_IDX) - ET, 0)          # the key box
        a_hi = tl.minimum(centre(t_last, T, T2, WIDE_IDX) + ET + 1, T2)
        b_lo = tl.maximum(centre(h0, H, H2, WIDE_IDX) - EH, 0)
        b_hi = tl.minimum(centre(h_last, H, H2, WIDE_IDX) + EH + 1, H2)
        c_lo = tl.maximum(centre(w0, W, W2, WIDE_IDX) - EW, 0)
        c_hi = tl.minimum(centre(w_last, W, W2, WIDE_IDX) + EW + 1, W2)
        keys = (0, 0, 0, 0, 0, 0, 0, 0, 0)
    n_b = tl.cdiv(b_hi - b_lo, KH)
    n_c = tl.cdiv(c_hi - c_lo, KW)
    if not TABLES:
        # Slide the walked tiles back inside the grid where they fit (n_b * KH <= H2):
        # they still cover the box, and with KEYS_INSIDE (the launcher's check that they
        # fit for every tile, ``plan.keys_inside``) key loads need no mask.
        b_lo = tl.maximum(tl.minimum(b_lo, H2 - n_b * KH), 0)
        c_lo = tl.maximum(tl.minimum(c_lo, W2 - n_c * KW), 0)
    if CAUSAL:
        # Frames before t_last: all tiles; frame t_last: row tiles starting at or
        # above h_last; in a row tile starting exactly at h_last, column tiles
        # starting at or left of w_last.
        rows = (h_last - b_lo) // KH + 1
        last_row_starts_at_h = b_lo + (rows - 1) * KH == h_last
        cols = tl.where(last_row_starts_at_h, (w_last - c_lo) // KW + 1, n_c)
        n_iter = (t_last - a_lo) * n_b * n_c + (rows - 1) * n_c + cols
    else:
        n_iter = (a_hi - a_lo) * n_b * n_c
    walk = (b_lo, c_lo, b_lo + n_b * KH, c_lo + n_c * KW, f_lo, f_hi, h_lo, h_hi, w_lo, w_hi, rq, jh, jw, jhw,
            keys)
    return bh, b, hd, qt, qh, qw, q_ok, rq, walk, n_iter, (a_lo, b_lo, c_lo)


@triton.jit
def grid_rows(TAB, qt, qh, qw, q_ok, T, H, W, T2, H2, W2, TABLES: tl.constexpr):
    """Grid coordinates and raster index of the query rows ``query_walk`` returned (re-laid
    with TABLES: read from the tables' pq, 0 off the grid), for loads and stores: [BLOCK_Q]
    each. The kernels ask twice, before and after their loop, so that no loaded row vector
    stays live across it."""
    if TABLES:
        _, _, PQT, _, _, _ = axis_tables(TAB, 0, T, H, W, T2, H2, W2)
        _, _, PQH, _, _, _ = axis_tables(TAB, 1, T, H, W, T2, H2, W2)
        _, _, PQW, _, _, _ = axis_tables(TAB, 2, T, H, W, T2, H2, W2)
        mt = tl.load(PQT + qt, mask=q_ok, other=0)                      # [BLOCK_Q]
        mh = tl.load(PQH + qh, mask=q_ok, other=0)                      # [BLOCK_Q]
        mw = tl.load(PQW + qw, mask=q_ok, other=0)                      # [BLOCK_Q]
        return mt, mh, mw, (mt * H + mh) * W + mw
    else:
        return qt, qh, qw, (qt * H + qh) * W + qw


@triton.jit
def next_tile(a, bb, c, walk, KH: tl.constexpr, KW: tl.constexpr):
    """The key tile after (a, bb, c) in the walk's raster order (columns, rows, frames)."""
    b_lo, c_lo, b_end, c_end, f_lo, f_hi, h_lo, h_hi, w_lo, w_hi, rq, jh, jw, jhw, keys = walk
    c = c + KW
    row_done = c >= c_end
    c = tl.where(row_done, c_lo, c)
    bb = tl.where(row_done, bb + KH, bb)
    frame_done = bb >= b_end
    return tl.where(frame_done, a + 1, a), tl.where(frame_done, b_lo, bb), c


@triton.jit
def key_tile(a, bb, c, walk, K, V, sk, sv, offs_d, D, H2, W2, KH: tl.constexpr, KW: tl.constexpr,
             EVEN_D: tl.constexpr, TABLES: tl.constexpr, KEYS_INSIDE: tl.constexpr):
    """Keys and values of the walk's key tile at frame a, first row bb and column c
    (re-laid with TABLES), [BLOCK_K, BLOCK_D] each (0 off the grid), read at their
    grid positions.

    K, V point at the (batch, head); sk, sv are their (t, h, w, d) strides. One
    flat loop over (frame, row tile, column tile) is one software-pipelined loop
    on the GPU, and no partial mask is hoisted out of inner loops into registers.
    Plain windows: a row's offset is the tile origin's (scalar int64 products, once per
    iteration) plus its place in the tile (loop-invariant). Carrying the origin offsets
    across iterations instead saved 22 of 539 instructions per iteration but took ptxas
    from 182 to 221 registers at gpu-large and spilled 8-24 B in 8 more AOT configs.
    KEYS_INSIDE (plain windows): every walked tile lies inside the grid, so the loads
    are unmasked (24 of 541 SASS instructions per iteration at gpu-large, sm_90).
    """
    b_lo, c_lo, b_end, c_end, f_lo, f_hi, h_lo, h_hi, w_lo, w_hi, rq, jh, jw, jhw, keys = walk
    k_ok = (jh < H2 - bb) & (jw < W2 - c)                               # [BLOCK_K]; KEYS_INSIDE: unused
    if TABLES:
        PKT, PKH, PKW, _, _, _, _, _, _ = keys
        ma = tl.load(PKT + a)                                           # grid coordinates
        mh = tl.load(PKH + bb + jh, mask=k_ok, other=0)                 # [BLOCK_K]
        mw = tl.load(PKW + c + jw, mask=k_ok, other=0)                  # [BLOCK_K]
        k_rows = token_offsets(ma, mh, mw, sk[0], sk[1], sk[2])         # [BLOCK_K]
        v_rows = token_offsets(ma, mh, mw, sv[0], sv[1], sv[2])         # [BLOCK_K]
    else:
        k_rows = token_offsets(a, bb, c, sk[0], sk[1], sk[2]) \
            + (jh.to(tl.int64) * sk[1] + jw.to(tl.int64) * sk[2])        # [BLOCK_K]
        v_rows = token_offsets(a, bb, c, sv[0], sv[1], sv[2]) \
            + (jh.to(tl.int64) * sv[1] + jw.to(tl.int64) * sv[2])        # [BLOCK_K]
    k = load_rows(K, k_rows, k_ok, offs_d, sk[3], D, EVEN_D, KEYS_INSIDE)  # [BLOCK_K, BLOCK_D]
    v = load_rows(V, v_rows, k_ok, offs_d, sv[3], D, EVEN_D, KEYS_INSIDE)  # [BLOCK_K, BLOCK_D]
    return k, v


@triton.jit
def key_mask(walk, a, bb, c, ET, H2, W2, CAUSAL: tl.constexpr, TABLES: tl.constexpr):
    """[BLOCK_Q, BLOCK_K] visibility of the key tile at (a, bb, c) (from ``key_tile``).
    TABLES: each key's query range per axis (the tables' q0, q1) against the rows'
    re-laid coordinates (rows and keys off the grid fall outside every range).
    Causal compares raster indices in the walked coordinates (re-laid with TABLES:
    within a window the grid's order, ``relayout``)."""
    b_lo, c_lo, b_end, c_end, f_lo, f_hi, h_lo, h_hi, w_lo, w_hi, rq, jh, jw, jhw, keys = walk
    if TABLES:
        _, _, _, Q0T, Q1T, Q0H, Q1H, Q0W, Q1W = keys
        qt, qh, qw = f_lo, h_lo, w_lo                                   # [BLOCK_Q] re-laid rows
        kh = bb + jh                                                    # [BLOCK_K]
        kw = c + jw                                                     # [BLOCK_K]
        k_ok = (kh < H2) & (kw < W2)                                    # [BLOCK_K]
        frame_ok = (qt >= tl.load(Q0T + a)) & (qt < tl.load(Q1T + a))   # [BLOCK_Q]
        h0 = tl.load(Q0H + kh, mask=k_ok, other=0)                      # [BLOCK_K] each
        h1 = tl.load(Q1H + kh, mask=k_ok, other=0)
        w0 = tl.load(Q0W + kw, mask=k_ok, other=0)
        w1 = tl.load(Q1W + kw, mask=k_ok, other=0)
        vis = frame_ok[:, None] & (qh[:, None] >= h0[None, :]) & (qh[:, None] < h1[None, :]) \
            & (qw[:, None] >= w0[None, :]) & (qw[:, None] < w1[None, :])  # [BLOCK_Q, BLOCK_K]
    else:
        frame_ok = tl.abs(a - f_lo) <= ET                               # [BLOCK_Q] (f_lo: the centre)
        vis = tile_mask(frame_ok, h_lo - bb, h_hi - bb, w_lo - c, w_hi - c, jh, jw)  # [BLOCK_Q, BLOCK_K]
    if CAUSAL:
        vis = vis & (jhw[None, :] <= (rq - ((a * H2 + bb) * W2 + c))[:, None])
    return vis
