"""``@triton.jit`` helpers shared by the 3DNA kernels: window geometry, tile
coordinates, strided loads and stores, the float32-accumulating dots, and the
key walk that the forward and dQ kernels share (``query_walk``, ``key_tile``, ``key_mask``).

Two window paths, chosen by the ``TABLES`` constexpr. Plain windows (every v2
option at its default) compute centres and windows in closed form. With v2
options (dilation, stride, per-axis causal, shifted or asymmetric windows) the
kernels walk re-laid coordinates and read each window from the tables of
``relayout`` (``axis_tables``), and the grid through its re-layout tables:
tile coordinates are re-laid, memory coordinates the grid's.

Index widths. Coordinates, sizes and raster indices are int32: the launcher
refuses grids of nearly 2**31 tokens (``launch.check_index_range``). The
window arithmetic multiplies two axis lengths (the centre ``i * n_kv``, the
query range ``(k + e + 1) * n_q``), which passes 2**31 from about 46,341
positions on one axis; with ``WIDE_IDX`` (set by the launcher exactly when
some axis needs it, ``launch.needs_wide_index``) those products are int64
and divided without a division instruction (``floor_div_wide``).
Memory offsets are always int64 (``token_offsets``).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Kernels may only read constexpr globals.
C_LOG2E = tl.constexpr(LOG2E)
C_LN2 = tl.constexpr(0.6931471805599453)
# Finite "minus infinity" for the running max: a row whose keys so far are all
# masked keeps m = -1e30, masked scores are -inf, so exp2(-inf - m) = 0 and
# exp2(m_old - m_new) is 1 (still masked) or 0 (first visible key): no NaN
# without a per-tile select. Real scores are > -1e30 for any finite input.
C_NEG_BIG = tl.constexpr(-1.0e30)

# Triton turns an int argument equal to 1 into a constant and tags multiples of
# 16: grid sizes, extents and head counts would then compile a new variant per
# shape class. They only enter integer index arithmetic, so they stay plain
# runtime ints; strides keep the specialisation (a head-dim stride of 1 is what
# makes loads vectorise).
RUNTIME_SIZES = ("T", "H", "W", "T2", "H2", "W2", "ET", "EH", "EW", "n_heads")


# ----------------------------------------------------------------------------- window geometry


@triton.jit
def floor_div_wide(x, d):
    """floor(x / d) as int64, for int64 x in [0, 2**63) and an int32 d > 0 with quotient < 2**32.

    Without a division instruction: ptxas expands int64 (and IEEE fp64) division
    into a subroutine call that costs each kernel ~30 registers throughout. An
    approximate fp32 reciprocal (<= 2 ulp, plus d's rounding to fp32) and one
    Newton step in fp64 give 1/d to ~2**-43, so trunc(x * (1/d)) is within one
    of the quotient (< 2**32); the int64 remainder fixes it.
    """
    dd = d.to(tl.int64)
    r = tl.math.fdiv(tl.full([], 1.0, tl.float32), d.to(tl.float32)).to(tl.float64)
    r = r * (2.0 - d.to(tl.float64) * r)
    c = (x.to(tl.float64) * r).to(tl.int64)
    rem = x - c * dd
    return tl.where(rem < 0, c - 1, tl.where(rem >= dd, c + 1, c))


@triton.jit
def centre(i, n_q, n_kv, WIDE_IDX: tl.constexpr):
    """Rescaled centre floor(i * n_kv / n_q) (geometry.centre); i >= 0, so C truncation == floor."""
    if WIDE_IDX:
        return floor_div_wide(i.to(tl.int64) * n_kv, n_q).to(tl.int32)
    return (i * n_kv) // n_q


@triton.jit
def window(c, e, n):
    """Window [c - e, c + e] of centre c clipped to the grid [0, n - 1]."""
    return tl.maximum(c - e, 0), tl.minimum(c + e, n - 1)


@triton.jit
def query_range(k_lo, k_last, n_q, n_kv, e, WIDE_IDX: tl.constexpr):
    """Queries [q0, q1) of one axis whose window reaches keys k_lo..k_last (geometry.query_range).

    centre(q) >= k_lo - e  <=>  q >= ceil((k_lo - e) * n_q / n_kv); the numerators
    are kept >= 0 so C-style integer division is the floor. They reach
    (n_kv + e) * n_q + n_kv, hence WIDE_IDX on long axes.
    """
    lo_c = k_lo - e
    hi_c = k_last + e + 1
    if WIDE_IDX:
        q0 = floor_div_wide(tl.maximum(lo_c, 0).to(tl.int64) * n_q + n_kv - 1, n_kv)
        q0 = tl.where(lo_c <= 0, 0, q0.to(tl.int32))
        q1 = tl.minimum(floor_div_wide(hi_c.to(tl.int64) * n_q + n_kv - 1, n_kv), n_q).to(tl.int32)
    else:
        q0 = tl.where(lo_c <= 0, 0, (lo_c * n_q + n_kv - 1) // n_kv)
        q1 = tl.minimum((hi_c * n_q + n_kv - 1) // n_kv, n_q)
    return q0, q1


@triton.jit
def axis_tables(TAB, axis: tl.constexpr, T, H, W, T2, H2, W2):
    """Pointers (LO, HI, PQ, PK, Q0, Q1) into the int32 window tables of ``axis`` (0, 1, 2 =
    t, h, w) in ``relayout.packed``'s layout: per axis lo, hi, pq (n each) then pk, q0, q1
    (m each), n, m the axis's query and key lengths."""
    if axis == 0:
        LO = TAB
        n = T
        m = T2
    elif axis == 1:
        LO = TAB + 3 * (T + T2)
        n = H
        m = H2
    else:
        LO = TAB + 3 * (T + T2 + H + H2)
        n = W
        m = W2
    return LO, LO + n, LO + 2 * n, LO + 3 * n, LO + 3 * n + m, LO + 3 * n + 2 * m


# ----------------------------------------------------------------------------- tiles, loads, stores


@triton.jit
def program_tile(pid, T, H, W, n_heads, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Program ``pid`` -> (bh, batch, head, tile origin t0, h0, w0, tile last t, h, w).

    Programs are ordered (batch, head, tile t, tile h, tile w), w fastest, so
    neighbouring programs own neighbouring tiles of one (batch, head).
    bh = batch * heads + head is the row of the (B, heads, T, H, W) statistics.
    """
    n_tw = tl.cdiv(W, BW)
    n_th = tl.cdiv(H, BH)
    n_tiles = tl.cdiv(T, BT) * n_th * n_tw
    bh = pid // n_tiles
    tile = pid % n_tiles
    t0 = (tile // (n_th * n_tw)) * BT
    h0 = ((tile // n_tw) % n_th) * BH
    w0 = (tile % n_tw) * BW
    return (bh, (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64), t0, h0, w0,
            tl.minimum(t0 + BT, T) - 1, tl.minimum(h0 + BH, H) - 1, tl.minimum(w0 + BW, W) - 1)


@triton.jit
def tile_coords(offs, t0, h0, w0, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Coordinates of the rows of a (BT x BH x BW) tile at (t0, h0, w0), raster order inside."""
    t = t0 + offs // (BH * BW)                                          # [BLOCK]
    h = h0 + (offs // BW) % BH                                          # [BLOCK]
    w = w0 + offs % BW                                                  # [BLOCK]
    return t, h, w


@triton.jit
def token_offsets(t, h, w, s_t, s_h, s_w):
    """int64 element offsets of tokens: a frame stride times a frame index can pass 2**31."""
    return tl.cast(t, tl.int64) * s_t + tl.cast(h, tl.int64) * s_h + tl.cast(w, tl.int64) * s_w


@triton.jit
def load_rows(ptr, row_off, row_ok, offs_d, s_d, D, EVEN_D: tl.constexpr):
    """Load a [BLOCK_ROWS, BLOCK_D] tile; rows and head dims past the ends read 0."""
    ptrs = ptr + row_off[:, None] + offs_d[None, :].to(tl.int64) * s_d  # [BLOCK_ROWS, BLOCK_D]
    if EVEN_D:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def store_rows(ptr, row_off, row_ok, offs_d, s_d, D, x, EVEN_D: tl.constexpr):
    """Store the [BLOCK_ROWS, BLOCK_D] tile x; rows and head dims past the ends are skipped."""
    ptrs = ptr + row_off[:, None] + offs_d[None, :].to(tl.int64) * s_d  # [BLOCK_ROWS, BLOCK_D]
    if EVEN_D:
        tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def tile_mask(row_ok, r0, r1, c0, c1, jr, jc):
    """[rows, cols] mask: row_ok and r0 <= jr <= r1 and c0 <= jc <= c1.

    The bounds are per row (one query's or one key's window, already shifted to
    the walked tile's local indices jr, jc, which are loop-invariant aranges), so
    each iteration only updates [rows] vectors: 4 integer compares per element.
    """
    return row_ok[:, None] & (jr[None, :] >= r0[:, None]) & (jr[None, :] <= r1[:, None]) \
        & (jc[None, :] >= c0[:, None]) & (jc[None, :] <= c1[:, None])


# ----------------------------------------------------------------------------- dots


@triton.jit
def dot(a, b, UPCAST_DOT: tl.constexpr, acc=None):
    """acc + a @ b with float32 accumulation (acc=None: a fresh product).

    UPCAST_DOT (interpreter + bf16 only): bf16 tl.dot is broken in the
    interpreter; the operands are already rounded to bf16, so upcasting them is
    exact and reproduces the GPU's bf16 x bf16 -> fp32 product.
    """
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        # Exact float32 products on FMAs: what the interpreter (the tests) computes.
        # tf32 misses the float32 tolerance; tf32x3 spilled from head dim 64 up
        # (dK/dV, 64x16 tiles: 20 bytes; head dim 128: >= 36 bytes at 16x16).
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def dot_acc(acc, a32, b, UPCAST_DOT: tl.constexpr):
    """acc + a32 @ b for a float32 tile a32 (P or dS) and b in the input dtype,
    accumulated in place (one accumulator layout, no temporary product tile).

    bfloat16 keeps 8 mantissa bits: rounding P and dS to it once made dK 2.5x
    less accurate than PyTorch's bf16 SDPA backward (which keeps P in fp32),
    failing the 2x rule (test_triton.py, causal 3x5x7: dK error 0.026 vs 0.010).
    Splitting a32 = hi + lo into two bf16 tiles and doing two dots gives 16
    bits (error 0.016); the forward's P @ V likewise (head dim 200, causal:
    output error 0.017 vs 0.006). float16 (11 bits) and float32 need no split.
    """
    hi = a32.to(b.dtype)
    acc = dot(hi, b, UPCAST_DOT, acc)
    if b.dtype == tl.bfloat16:
        acc = dot((a32 - hi.to(tl.float32)).to(b.dtype), b, UPCAST_DOT, acc)
    return acc


@triton.jit
def to_store(x, dtype: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """A float32 result in the output dtype, rounded to nearest even as the GPU's cast does.

    UPCAST_DOT (interpreter + bf16): the interpreter's float32 -> bf16 cast truncates,
    which left outputs a whole bf16 ulp off (test_triton_windows.py, raster causal,
    dilated: error 0.0156 vs dense bf16's 0.0068); adding 0x7FFF plus the kept
    lowest bit to the bits first makes the truncation round to nearest even.
    """
    if UPCAST_DOT:
        bits = x.to(tl.uint32, bitcast=True)
        x = (bits + (0x7FFF + ((bits >> 16) & 1))).to(tl.float32, bitcast=True)
    return x.to(dtype)


# ----------------------------------------------------------------------------- the key walk (forward, dQ)


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

    Returns (bh, b, hd, qt, qh, qw, q_ok, rq, walk, n_iter): the (batch * heads +
    head) statistics row, batch and head (int64); per query row [BLOCK_Q] its
    coordinates (re-laid with TABLES: ``grid_rows`` gives the grid's), on-grid
    flag and raster index; ``walk``, the loop-invariant state ``key_tile`` and
    ``key_mask`` read; and the number of key tiles to visit.
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
    walk = (a_lo, b_lo, c_lo, n_b, n_c, f_lo, f_hi, h_lo, h_hi, w_lo, w_hi, rq, jh, jw, jhw, keys)
    return bh, b, hd, qt, qh, qw, q_ok, rq, walk, n_iter


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
def key_tile(it, walk, K, V, sk, sv, offs_d, D, H2, W2, KH: tl.constexpr, KW: tl.constexpr,
             EVEN_D: tl.constexpr, TABLES: tl.constexpr):
    """Key tile ``it`` of the walk of ``query_walk``: its frame a, first row bb and
    column c (re-laid with TABLES), and its keys and values, [BLOCK_K, BLOCK_D] each
    (0 off the grid), read at their grid positions.

    K, V point at the (batch, head); sk, sv are their (t, h, w, d) strides. One
    flat loop over (frame, row tile, column tile) is one software-pipelined loop
    on the GPU, and no partial mask is hoisted out of inner loops into registers.
    """
    a_lo, b_lo, c_lo, n_b, n_c, f_lo, f_hi, h_lo, h_hi, w_lo, w_hi, rq, jh, jw, jhw, keys = walk
    a = a_lo + it // (n_b * n_c)
    bb = b_lo + ((it // n_c) % n_b) * KH
    c = c_lo + (it % n_c) * KW
    kh = bb + jh                                                        # [BLOCK_K]
    kw = c + jw                                                         # [BLOCK_K]
    k_ok = (kh < H2) & (kw < W2)                                        # [BLOCK_K]
    if TABLES:
        PKT, PKH, PKW, _, _, _, _, _, _ = keys
        ma = tl.load(PKT + a)                                           # grid coordinates
        mh = tl.load(PKH + kh, mask=k_ok, other=0)                      # [BLOCK_K]
        mw = tl.load(PKW + kw, mask=k_ok, other=0)                      # [BLOCK_K]
    else:
        ma, mh, mw = a, kh, kw
    k = load_rows(K, token_offsets(ma, mh, mw, sk[0], sk[1], sk[2]), k_ok,
                  offs_d, sk[3], D, EVEN_D)                             # [BLOCK_K, BLOCK_D]
    v = load_rows(V, token_offsets(ma, mh, mw, sv[0], sv[1], sv[2]), k_ok,
                  offs_d, sv[3], D, EVEN_D)                             # [BLOCK_K, BLOCK_D]
    return a, bb, c, k, v


@triton.jit
def key_mask(walk, a, bb, c, ET, H2, W2, CAUSAL: tl.constexpr, TABLES: tl.constexpr):
    """[BLOCK_Q, BLOCK_K] visibility of the key tile at (a, bb, c) (from ``key_tile``).
    TABLES: each key's query range per axis (the tables' q0, q1) against the rows'
    re-laid coordinates (rows and keys off the grid fall outside every range).
    Causal compares raster indices in the walked coordinates (re-laid with TABLES:
    within a window the grid's order, ``relayout``)."""
    a_lo, b_lo, c_lo, n_b, n_c, f_lo, f_hi, h_lo, h_hi, w_lo, w_hi, rq, jh, jw, jhw, keys = walk
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
