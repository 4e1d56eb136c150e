"""Fused Triton kernels of 3D Nearby Attention (3DNA), forward and backward.

Reads top-down: jit helpers, the forward kernel, the backward kernels
(preprocess delta, dK/dV, dQ), the tile planner and launch table, launchers,
the autograd Function and ``triton_nearby_attention`` (called by ``nuwa3dna.ops``).

Semantics are those of SPEC.md section 1 / ``nuwa3dna.geometry``: the query
(t, h, w) of grid (T, H, W) is centred at (t*T2//T, h*H2//H, w*W2//W) in the
key grid (T2, H2, W2); a key is visible iff it lies within the (clipped)
window of radius ``extent`` on every axis and, when causal, its raster index is
<= the query's.

Tiling. A program owns a 3D query tile (BT x BH x BW queries, flattened to
BLOCK_Q rows) of one (batch, head). The tile's windows, unioned per axis, form a
key box (centres are monotone in the query index, so the union of the per-axis
windows is one interval per axis); the program walks that box in one flat,
software-pipelined loop over 1 x KH x KW key tiles with runtime bounds and
builds the visibility mask from coordinates, so no (queries x keys) tensor
exists anywhere. Causal: key tiles whose first key comes after the tile's last
query are a tail of the walk and are never visited. Tile shapes come from a
cost model on the actual grids (``plan_tiles``); block sizes, warps and stages
from a per-arch table checked by ``kernels/report.py`` (``CONFIG_TABLE``).

Backward (FlashAttention-2): ``delta = rowsum(dO * O)`` in a preprocess
kernel; dK/dV with one program per 3D key tile that walks the query tiles
whose windows reach it (the inverse of the rescaled centre map, as
``geometry.query_range``; causal skips a head of that walk); dQ like the
forward. Every output element is written by exactly one program:
deterministic, no atomics.

Numerics: scores and softmax in float32, exponent in base 2 (the scale is
premultiplied by log2(e)); the saved log-sum-exp is the natural one, float32,
shape (B, heads, T, H, W). bf16 P and dS enter their dots as a hi + lo pair of
bf16 tiles (``_dot_acc``); float32 dots are exact (``input_precision="ieee"``).

Untested here: the compiled GPU path is never run in this project's CI (no
GPU); it is compiled ahead of time for sm_80/sm_90 by ``kernels/report.py``.
Under the Triton interpreter bf16 ``tl.dot`` returns garbage (it multiplies the
raw 16-bit patterns), so the interpreter path upcasts bf16 tiles to float32
before every dot (UPCAST_DOT); the native bf16 dot is only compiled, not run.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from nuwa3dna.kernels.env import interpreter_enabled

LOG2E = 1.4426950408889634
# Kernels may only read constexpr globals.
C_LOG2E = tl.constexpr(LOG2E)
C_LN2 = tl.constexpr(0.6931471805599453)
# Finite "minus infinity" for the running max: a row whose keys so far are all
# masked keeps m = -1e30, masked scores are -inf, so exp2(-inf - m) = 0 and
# exp2(m_old - m_new) is 1 (still masked) or 0 (first visible key): no NaN
# without a per-tile select. Real scores are > -1e30 for any finite input.
C_NEG_BIG = tl.constexpr(-1.0e30)


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _centre(i, n_q, n_kv):
    """Rescaled centre floor(i * n_kv / n_q); i >= 0, so C truncation == floor."""
    return (i * n_kv) // n_q


@triton.jit
def _tile_coords(offs, t0, h0, w0, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Coordinates of the rows of a (BT x BH x BW) tile at (t0, h0, w0), raster order inside."""
    t = t0 + offs // (BH * BW)                                          # [BLOCK]
    h = h0 + (offs // BW) % BH                                          # [BLOCK]
    w = w0 + offs % BW                                                  # [BLOCK]
    return t, h, w


@triton.jit
def _token_offsets(t, h, w, s_t, s_h, s_w):
    """int64 element offsets of tokens: a frame stride times a frame index can pass 2**31."""
    return tl.cast(t, tl.int64) * s_t + tl.cast(h, tl.int64) * s_h + tl.cast(w, tl.int64) * s_w


@triton.jit
def _load_rows(ptr, row_off, row_ok, offs_d, s_d, D, EVEN_D: tl.constexpr):
    """Load a [BLOCK_ROWS, BLOCK_D] tile; rows and head dims past the ends read 0."""
    ptrs = ptr + row_off[:, None] + offs_d[None, :].to(tl.int64) * s_d
    if EVEN_D:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _store_rows(ptr, row_off, row_ok, offs_d, s_d, D, x, EVEN_D: tl.constexpr):
    ptrs = ptr + row_off[:, None] + offs_d[None, :].to(tl.int64) * s_d
    if EVEN_D:
        tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dot(a, b, UPCAST_DOT: tl.constexpr, acc=None):
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
def _dot_acc(acc, a32, b, UPCAST_DOT: tl.constexpr):
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
    acc = _dot(hi, b, UPCAST_DOT, acc)
    if b.dtype == tl.bfloat16:
        acc = _dot((a32 - hi.to(tl.float32)).to(b.dtype), b, UPCAST_DOT, acc)
    return acc


@triton.jit
def _tile_mask(row_ok, r0, r1, c0, c1, jr, jc):
    """[rows, cols] mask: row_ok and r0 <= jr <= r1 and c0 <= jc <= c1.

    The bounds are per row (one query's or one key's window, already shifted to
    the walked tile's local indices jr, jc, which are loop-invariant aranges), so
    each iteration only updates [rows] vectors: 4 integer compares per element.
    """
    return row_ok[:, None] & (jr[None, :] >= r0[:, None]) & (jr[None, :] <= r1[:, None]) \
        & (jc[None, :] >= c0[:, None]) & (jc[None, :] <= c1[:, None])


@triton.jit
def _window_lo_hi(c, e, n):
    """Window [c - e, c + e] of centre c clipped to the grid [0, n - 1]."""
    return tl.maximum(c - e, 0), tl.minimum(c + e, n - 1)


@triton.jit
def _key_tiles(t0, h0, w0, t_last, h_last, w_last, T, H, W, T2, H2, W2, ET, EH, EW,
               KH: tl.constexpr, KW: tl.constexpr, CAUSAL: tl.constexpr):
    """Key tiles (1 x KH x KW) covering the box seen by queries t0..t_last x h0..h_last x w0..w_last.

    Returns the box origin (a_lo, b_lo, c_lo), the row/column tile counts per
    frame and the number of tiles to visit in raster order. Causal (same grid,
    so the tile's last query (t_last, h_last, w_last) is its latest): the tiles
    whose first key comes after that query are exactly a tail of the raster
    order, so they are cut from the count and never visited.
    """
    a_lo = tl.maximum(_centre(t0, T, T2) - ET, 0)
    a_hi = tl.minimum(_centre(t_last, T, T2) + ET + 1, T2)
    b_lo = tl.maximum(_centre(h0, H, H2) - EH, 0)
    b_hi = tl.minimum(_centre(h_last, H, H2) + EH + 1, H2)
    c_lo = tl.maximum(_centre(w0, W, W2) - EW, 0)
    c_hi = tl.minimum(_centre(w_last, W, W2) + EW + 1, W2)
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
    return a_lo, b_lo, c_lo, n_b, n_c, n_iter


@triton.jit
def _query_range(k_lo, k_last, n_q, n_kv, e):
    """Queries [q0, q1) of one axis whose window reaches keys k_lo..k_last (geometry.query_range).

    centre(q) >= k_lo - e  <=>  q >= ceil((k_lo - e) * n_q / n_kv); the numerators
    are kept >= 0 so C-style integer division is the floor.
    """
    lo_c = k_lo - e
    q0 = tl.where(lo_c <= 0, 0, (lo_c * n_q + n_kv - 1) // n_kv)
    q1 = tl.minimum(((k_last + e + 1) * n_q + n_kv - 1) // n_kv, n_q)
    return q0, q1


# ----------------------------------------------------------------------------- forward

# Triton turns an int argument equal to 1 into a constant and tags multiples of
# 16: grid sizes, extents and head counts would then compile a new variant per
# shape class. They only enter integer index arithmetic, so they stay plain
# runtime ints; strides keep the specialisation (a head-dim stride of 1 is what
# makes loads vectorise).
_RUNTIME_SIZES = ("T", "H", "W", "T2", "H2", "W2", "ET", "EH", "EW", "n_heads")


@triton.jit
def _query_tile(pid, T, H, W, n_heads, BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """(batch*head, batch, head, tile origin, tile last coords) of program ``pid``."""
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


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _fwd_kernel(
    Q, K, V, O, LSE,
    sq_b, sq_t, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_t, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_t, sv_h, sv_w, sv_n, sv_d,
    so_b, so_t, so_h, so_w, so_n, so_d,
    T, H, W, T2, H2, W2, ET, EH, EW, n_heads, D, qk_scale,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Forward: O = softmax_visible(Q K^T * scale) V, and the natural log-sum-exp.

    Pointers: Q, O (B, T, H, W, heads, D); K, V (B, T2, H2, W2, heads, D), any
    strides (in elements); LSE float32 (B, heads, T, H, W) contiguous.
    qk_scale = scale * log2(e). Query tile BT x BH x BW; key tiles 1 x KH x KW
    (one key frame per tile, so the frame test is per query row).
    Grid: (B * heads * cdiv(T, BT) * cdiv(H, BH) * cdiv(W, BW),); consecutive
    programs are neighbouring query tiles of one (batch, head), whose key boxes
    overlap, so K/V are reused from L2.
    """
    BLOCK_Q: tl.constexpr = BT * BH * BW
    BLOCK_K: tl.constexpr = KH * KW
    bh, b, hd, t0, h0, w0, t_last, h_last, w_last = _query_tile(tl.program_id(0), T, H, W, n_heads,
                                                                BT, BH, BW)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    qt, qh, qw = _tile_coords(offs_q, t0, h0, w0, BT, BH, BW)           # [BLOCK_Q] each
    q_ok = (qt < T) & (qh < H) & (qw < W)                               # [BLOCK_Q]
    q = _load_rows(Q + b * sq_b + hd * sq_n, _token_offsets(qt, qh, qw, sq_t, sq_h, sq_w),
                   q_ok, offs_d, sq_d, D, EVEN_D)                       # [BLOCK_Q, BLOCK_D]
    K += b * sk_b + hd * sk_n
    V += b * sv_b + hd * sv_n
    # Per-query windows, loop invariant; the upper bounds also hide keys off the grid.
    ct = _centre(qt, T, T2)                                             # [BLOCK_Q]
    h_lo, h_hi = _window_lo_hi(_centre(qh, H, H2), EH, H2)              # [BLOCK_Q] each
    w_lo, w_hi = _window_lo_hi(_centre(qw, W, W2), EW, W2)
    rq = (qt * H + qh) * W + qw                                         # [BLOCK_Q] raster (< 2**31)
    jh = offs_k // KW                                                   # [BLOCK_K] row in key tile
    jw = offs_k % KW                                                    # [BLOCK_K]
    jhw = jh * W2 + jw                                                  # [BLOCK_K] raster offset in tile

    m_i = tl.full([BLOCK_Q], C_NEG_BIG, tl.float32)                     # running max (log2 units)
    l_i = tl.zeros([BLOCK_Q], tl.float32)                               # running sum
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)                      # [BLOCK_Q, BLOCK_D]

    a_lo, b_lo, c_lo, n_b, n_c, n_iter = _key_tiles(t0, h0, w0, t_last, h_last, w_last, T, H, W,
                                                    T2, H2, W2, ET, EH, EW, KH, KW, CAUSAL)
    # One flat loop over the key tiles of the box (frame, row tile, column tile in
    # raster order): one software-pipelined loop on the GPU, and no partial mask
    # hoisted out of inner loops into registers.
    for it in range(0, n_iter):
        a = a_lo + it // (n_b * n_c)
        bb = b_lo + ((it // n_c) % n_b) * KH
        c = c_lo + (it % n_c) * KW
        frame_ok = tl.abs(a - ct) <= ET                                 # [BLOCK_Q]
        kh = bb + jh                                                    # [BLOCK_K]
        kw = c + jw                                                     # [BLOCK_K]
        k_ok = (kh < H2) & (kw < W2)
        k_off = _token_offsets(a, kh, kw, sk_t, sk_h, sk_w)
        k = _load_rows(K, k_off, k_ok, offs_d, sk_d, D, EVEN_D)         # [BLOCK_K, BLOCK_D]
        v = _load_rows(V, _token_offsets(a, kh, kw, sv_t, sv_h, sv_w), k_ok,
                       offs_d, sv_d, D, EVEN_D)                         # [BLOCK_K, BLOCK_D]
        s = _dot(q, tl.trans(k), UPCAST_DOT) * qk_scale                 # [BLOCK_Q, BLOCK_K]
        vis = _tile_mask(frame_ok, h_lo - bb, h_hi - bb, w_lo - c, w_hi - c, jh, jw)  # [BLOCK_Q, BLOCK_K]
        if CAUSAL:
            vis = vis & (jhw[None, :] <= (rq - ((a * H2 + bb) * W2 + c))[:, None])
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))                           # [BLOCK_Q]
        p = tl.math.exp2(s - m_new[:, None])                            # [BLOCK_Q, BLOCK_K]
        alpha = tl.math.exp2(m_i - m_new)                               # [BLOCK_Q]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot_acc(acc * alpha[:, None], p, v, UPCAST_DOT)          # [BLOCK_Q, BLOCK_D]
        m_i = m_new

    # Every query on the grid sees at least its own centre, so l_i > 0 there;
    # rows off the grid (l_i = 0) are never stored: 1 keeps them finite.
    l_i = tl.where(q_ok, l_i, 1.0)
    out = acc / l_i[:, None]                                            # [BLOCK_Q, BLOCK_D]
    _store_rows(O + b * so_b + hd * so_n, _token_offsets(qt, qh, qw, so_t, so_h, so_w), q_ok,
                offs_d, so_d, D, out.to(O.dtype.element_ty), EVEN_D)
    lse = (m_i + tl.math.log2(l_i)) * C_LN2                             # [BLOCK_Q] natural log
    tl.store(LSE + bh.to(tl.int64) * (T * H * W) + rq, lse, mask=q_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=("T", "H", "W", "n_heads"))
def _bwd_preprocess_kernel(
    O, DO, DELTA,
    so_b, so_t, so_h, so_w, so_n, so_d,
    sdo_b, sdo_t, sdo_h, sdo_w, sdo_n, sdo_d,
    T, H, W, n_heads, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """delta = rowsum(dO * O) in float32.

    Pointers: O, DO (B, T, H, W, heads, D) any strides; DELTA float32
    (B, heads, T, H, W) contiguous. Grid: (B * heads * cdiv(T*H*W, BLOCK_N),).
    """
    pid = tl.program_id(0)
    n_q = T * H * W
    n_blocks = tl.cdiv(n_q, BLOCK_N)
    bh = pid // n_blocks
    r = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)              # [BLOCK_N] raster
    ok = r < n_q
    t = r // (H * W)
    h = (r // W) % H
    w = r % W
    b = (bh // n_heads).to(tl.int64)
    hd = (bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * so_b + hd * so_n, _token_offsets(t, h, w, so_t, so_h, so_w), ok,
                   offs_d, so_d, D, EVEN_D).to(tl.float32)              # [BLOCK_N, BLOCK_D]
    do = _load_rows(DO + b * sdo_b + hd * sdo_n, _token_offsets(t, h, w, sdo_t, sdo_h, sdo_w), ok,
                    offs_d, sdo_d, D, EVEN_D).to(tl.float32)            # [BLOCK_N, BLOCK_D]
    tl.store(DELTA + bh.to(tl.int64) * n_q + r, tl.sum(o * do, 1), mask=ok)


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_b, sq_t, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_t, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_t, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_t, sdo_h, sdo_w, sdo_n, sdo_d,
    sdk_b, sdk_t, sdk_h, sdk_w, sdk_n, sdk_d,
    sdv_b, sdv_t, sdv_h, sdv_w, sdv_n, sdv_d,
    T, H, W, T2, H2, W2, ET, EH, EW, n_heads, D, scale, qk_scale,
    BH: tl.constexpr, BW: tl.constexpr, KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr, EVEN_D: tl.constexpr,
    DO_DK: tl.constexpr, DO_DV: tl.constexpr,
):
    """dK, dV of one 3D key tile (KT x KH x KW), summed over every query whose window reaches it.

    DO_DK / DO_DV select the outputs: both in one pass normally; at head dim
    256 two fp32 [64, 256] accumulators (256 registers/thread on one
    warpgroup) cannot fit, so the launcher runs a dK pass and a dV pass.

    Pointers: Q, DO (B, T, H, W, heads, D); K, V, DK, DV (B, T2, H2, W2, heads, D);
    any strides; LSE (natural) and DELTA float32 (B, heads, T, H, W) contiguous.
    The queries are walked in 1 x BH x BW tiles over the ranges of
    ``geometry.query_range`` per axis (rescaled centres inverted).
    Grid: (B * heads * cdiv(T2, KT) * cdiv(H2, KH) * cdiv(W2, KW),).
    """
    BLOCK_Q: tl.constexpr = BH * BW
    BLOCK_K: tl.constexpr = KT * KH * KW
    bh, b, hd, a0, b0, c0, a_last, b_last, c_last = _query_tile(tl.program_id(0), T2, H2, W2, n_heads,
                                                                KT, KH, KW)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    kt, kh, kw = _tile_coords(offs_k, a0, b0, c0, KT, KH, KW)           # [BLOCK_K] each
    k_ok = (kt < T2) & (kh < H2) & (kw < W2)
    k = _load_rows(K + b * sk_b + hd * sk_n, _token_offsets(kt, kh, kw, sk_t, sk_h, sk_w), k_ok,
                   offs_d, sk_d, D, EVEN_D)                             # [BLOCK_K, BLOCK_D]
    if DO_DK:
        v = _load_rows(V + b * sv_b + hd * sv_n, _token_offsets(kt, kh, kw, sv_t, sv_h, sv_w), k_ok,
                       offs_d, sv_d, D, EVEN_D)                         # [BLOCK_K, BLOCK_D]
    Q += b * sq_b + hd * sq_n
    DO += b * sdo_b + hd * sdo_n
    LSE += bh.to(tl.int64) * (T * H * W)
    DELTA += bh.to(tl.int64) * (T * H * W)
    rk = (kt * H2 + kh) * W2 + kw                                       # [BLOCK_K] raster
    # Per key, the queries that see it per axis (loop invariant, half-open).
    qt0, qt1 = _query_range(kt, kt, T, T2, ET)                          # [BLOCK_K] each
    qh0, qh1 = _query_range(kh, kh, H, H2, EH)
    qw0, qw1 = _query_range(kw, kw, W, W2, EW)
    ih = offs_q // BW                                                   # [BLOCK_Q] row in query tile
    iw = offs_q % BW                                                    # [BLOCK_Q]
    ihw = ih * W + iw                                                   # [BLOCK_Q] raster offset in tile

    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)                       # [BLOCK_K, BLOCK_D]
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)                       # [BLOCK_K, BLOCK_D]

    t_lo, t_hi = _query_range(a0, a_last, T, T2, ET)
    h_lo, h_hi = _query_range(b0, b_last, H, H2, EH)
    w_lo, w_hi = _query_range(c0, c_last, W, W2, EW)
    n_h = tl.cdiv(h_hi - h_lo, BH)
    n_w = tl.cdiv(w_hi - w_lo, BW)
    start = 0
    if CAUSAL:
        # Same grid, so a0, b0, c0 lie in their query ranges. The query tiles wholly
        # before the key tile's first key (a0, b0, c0) are a head of the raster order:
        # frames before a0, in frame a0 the row tiles ending above row b0, and, in a
        # row tile ending exactly at b0, the column tiles ending left of c0.
        skip_h = (b0 - h_lo) // BH
        ends_at_b0 = tl.minimum(h_lo + (skip_h + 1) * BH, h_hi) - 1 == b0
        skip_w = tl.where(ends_at_b0, (c0 - w_lo) // BW, 0)
        start = (a0 - t_lo) * n_h * n_w + skip_h * n_w + skip_w
    # One flat loop over query tiles (frame, row tile, column tile in raster order).
    for it in range(start, (t_hi - t_lo) * n_h * n_w):
        t = t_lo + it // (n_h * n_w)
        h = h_lo + ((it // n_w) % n_h) * BH
        w = w_lo + (it % n_w) * BW
        frame_ok = (t >= qt0) & (t < qt1) & k_ok                        # [BLOCK_K]
        qh = h + ih                                                     # [BLOCK_Q]
        qw = w + iw                                                     # [BLOCK_Q]
        # Queries past the range ends see nothing of this key tile.
        q_ok = (qh < h_hi) & (qw < w_hi)
        q = _load_rows(Q, _token_offsets(t, qh, qw, sq_t, sq_h, sq_w), q_ok,
                       offs_d, sq_d, D, EVEN_D)                         # [BLOCK_Q, BLOCK_D]
        do = _load_rows(DO, _token_offsets(t, qh, qw, sdo_t, sdo_h, sdo_w), q_ok,
                        offs_d, sdo_d, D, EVEN_D)                       # [BLOCK_Q, BLOCK_D]
        rq = (t * H + qh) * W + qw                                      # [BLOCK_Q]
        lse2 = tl.load(LSE + rq, mask=q_ok, other=0.0) * C_LOG2E        # [BLOCK_Q]
        # The range ends h_hi, w_hi also hide the tile's queries past them.
        vis_t = _tile_mask(frame_ok, qh0 - h, tl.minimum(qh1, h_hi) - h - 1,
                           qw0 - w, tl.minimum(qw1, w_hi) - w - 1, ih, iw)  # [BLOCK_K, BLOCK_Q]
        if CAUSAL:
            vis_t = vis_t & (ihw[None, :] >= (rk - ((t * H + h) * W + w))[:, None])
        s_t = _dot(k, tl.trans(q), UPCAST_DOT) * qk_scale               # [BLOCK_K, BLOCK_Q]
        p_t = tl.where(vis_t, tl.math.exp2(s_t - lse2[None, :]), 0.0)
        if DO_DV:
            dv = _dot_acc(dv, p_t, do, UPCAST_DOT)                      # [BLOCK_K, BLOCK_D]
        if DO_DK:
            delta = tl.load(DELTA + rq, mask=q_ok, other=0.0)           # [BLOCK_Q]
            dp_t = _dot(v, tl.trans(do), UPCAST_DOT)                    # [BLOCK_K, BLOCK_Q]
            ds_t = p_t * (dp_t - delta[None, :])                        # [BLOCK_K, BLOCK_Q]
            dk = _dot_acc(dk, ds_t, q, UPCAST_DOT)                      # [BLOCK_K, BLOCK_D]

    if DO_DK:
        _store_rows(DK + b * sdk_b + hd * sdk_n, _token_offsets(kt, kh, kw, sdk_t, sdk_h, sdk_w), k_ok,
                    offs_d, sdk_d, D, (dk * scale).to(DK.dtype.element_ty), EVEN_D)
    if DO_DV:
        _store_rows(DV + b * sdv_b + hd * sdv_n, _token_offsets(kt, kh, kw, sdv_t, sdv_h, sdv_w), k_ok,
                    offs_d, sdv_d, D, dv.to(DV.dtype.element_ty), EVEN_D)


@triton.jit(do_not_specialize=_RUNTIME_SIZES)
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sq_b, sq_t, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_t, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_t, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_t, sdo_h, sdo_w, sdo_n, sdo_d,
    sdq_b, sdq_t, sdq_h, sdq_w, sdq_n, sdq_d,
    T, H, W, T2, H2, W2, ET, EH, EW, n_heads, D, scale, qk_scale,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, UPCAST_DOT: tl.constexpr, EVEN_D: tl.constexpr,
):
    """dQ of one 3D query tile: walks the same key box and 1 x KH x KW key tiles as the forward.

    Pointers: Q, DO, DQ (B, T, H, W, heads, D); K, V (B, T2, H2, W2, heads, D);
    any strides; LSE (natural) and DELTA float32 (B, heads, T, H, W) contiguous.
    Grid: (B * heads * cdiv(T, BT) * cdiv(H, BH) * cdiv(W, BW),).
    """
    BLOCK_Q: tl.constexpr = BT * BH * BW
    BLOCK_K: tl.constexpr = KH * KW
    bh, b, hd, t0, h0, w0, t_last, h_last, w_last = _query_tile(tl.program_id(0), T, H, W, n_heads,
                                                                BT, BH, BW)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    qt, qh, qw = _tile_coords(offs_q, t0, h0, w0, BT, BH, BW)           # [BLOCK_Q] each
    q_ok = (qt < T) & (qh < H) & (qw < W)
    q = _load_rows(Q + b * sq_b + hd * sq_n, _token_offsets(qt, qh, qw, sq_t, sq_h, sq_w),
                   q_ok, offs_d, sq_d, D, EVEN_D)                       # [BLOCK_Q, BLOCK_D]
    do = _load_rows(DO + b * sdo_b + hd * sdo_n, _token_offsets(qt, qh, qw, sdo_t, sdo_h, sdo_w),
                    q_ok, offs_d, sdo_d, D, EVEN_D)                     # [BLOCK_Q, BLOCK_D]
    rq = (qt * H + qh) * W + qw                                         # [BLOCK_Q]
    lse2 = tl.load(LSE + bh.to(tl.int64) * (T * H * W) + rq, mask=q_ok, other=0.0) * C_LOG2E  # [BLOCK_Q]
    delta = tl.load(DELTA + bh.to(tl.int64) * (T * H * W) + rq, mask=q_ok, other=0.0)  # [BLOCK_Q]
    K += b * sk_b + hd * sk_n
    V += b * sv_b + hd * sv_n
    ct = _centre(qt, T, T2)                                             # [BLOCK_Q]
    h_lo, h_hi = _window_lo_hi(_centre(qh, H, H2), EH, H2)              # [BLOCK_Q] each
    w_lo, w_hi = _window_lo_hi(_centre(qw, W, W2), EW, W2)
    jh = offs_k // KW                                                   # [BLOCK_K] row in key tile
    jw = offs_k % KW                                                    # [BLOCK_K]
    jhw = jh * W2 + jw                                                  # [BLOCK_K] raster offset in tile

    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)                       # [BLOCK_Q, BLOCK_D]
    a_lo, b_lo, c_lo, n_b, n_c, n_iter = _key_tiles(t0, h0, w0, t_last, h_last, w_last, T, H, W,
                                                    T2, H2, W2, ET, EH, EW, KH, KW, CAUSAL)
    # One flat loop over the key tiles of the box (frame, row tile, column tile in
    # raster order): one software-pipelined loop on the GPU, and no partial mask
    # hoisted out of inner loops into registers.
    for it in range(0, n_iter):
        a = a_lo + it // (n_b * n_c)
        bb = b_lo + ((it // n_c) % n_b) * KH
        c = c_lo + (it % n_c) * KW
        frame_ok = tl.abs(a - ct) <= ET                                 # [BLOCK_Q]
        kh = bb + jh                                                    # [BLOCK_K]
        kw = c + jw
        k_ok = (kh < H2) & (kw < W2)
        k = _load_rows(K, _token_offsets(a, kh, kw, sk_t, sk_h, sk_w), k_ok,
                       offs_d, sk_d, D, EVEN_D)                         # [BLOCK_K, BLOCK_D]
        v = _load_rows(V, _token_offsets(a, kh, kw, sv_t, sv_h, sv_w), k_ok,
                       offs_d, sv_d, D, EVEN_D)                         # [BLOCK_K, BLOCK_D]
        vis = _tile_mask(frame_ok, h_lo - bb, h_hi - bb, w_lo - c, w_hi - c, jh, jw)  # [BLOCK_Q, BLOCK_K]
        if CAUSAL:
            vis = vis & (jhw[None, :] <= (rq - ((a * H2 + bb) * W2 + c))[:, None])
        s = _dot(q, tl.trans(k), UPCAST_DOT) * qk_scale                 # [BLOCK_Q, BLOCK_K]
        p = tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)         # [BLOCK_Q, BLOCK_K]
        dp = _dot(do, tl.trans(v), UPCAST_DOT)                          # [BLOCK_Q, BLOCK_K]
        ds = p * (dp - delta[:, None])                                  # [BLOCK_Q, BLOCK_K]
        dq = _dot_acc(dq, ds, k, UPCAST_DOT)                            # [BLOCK_Q, BLOCK_D]

    _store_rows(DQ + b * sdq_b + hd * sdq_n, _token_offsets(qt, qh, qw, sdq_t, sdq_h, sdq_w), q_ok,
                offs_d, sdq_d, D, (dq * scale).to(DQ.dtype.element_ty), EVEN_D)


# EVEN_D drops the head-dim mask when D is already a power of two >= 16 (D = 32,
# 64, 128, 256: every NÜWA size), so loads vectorise without a predicate per lane.
_EVEN_D = {"EVEN_D": lambda args: args["D"] == args["BLOCK_D"]}
fwd_kernel = triton.heuristics(_EVEN_D)(_fwd_kernel)
bwd_preprocess_kernel = triton.heuristics(_EVEN_D)(_bwd_preprocess_kernel)
bwd_dkdv_kernel = triton.heuristics(_EVEN_D)(_bwd_dkdv_kernel)
bwd_dq_kernel = triton.heuristics(_EVEN_D)(_bwd_dq_kernel)


# ----------------------------------------------------------------------------- tile planning

Tile = Tuple[int, int, int]


@dataclass(frozen=True)
class LaunchConfig:
    """Everything compile-time about one kernel launch (shared with kernels/report.py).

    ``q_tile`` / ``k_tile`` are (t, h, w) tile shapes; for the dK/dV kernel
    ``k_tile`` is the program's key tile and ``q_tile`` the query tile walked inside.
    """
    kernel: str
    q_tile: Tile
    k_tile: Tile
    block_d: int
    num_warps: int
    num_stages: int
    split_dkdv: bool = False    # dK/dV kernel only: a dK pass and a dV pass (head dim 256)

    @property
    def block_q(self) -> int:
        return math.prod(self.q_tile)

    @property
    def block_k(self) -> int:
        return math.prod(self.k_tile)


def block_d_for(D: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot needs K >= 16)."""
    return max(16, triton.next_power_of_2(D))


def _shapes(n: int, grid: Tuple[int, int, int], max_t: Optional[int] = None):
    """(t, h, w) power-of-two shapes with t*h*w == n and no factor beyond the grid's
    next power of two, except that w takes the excess when the grid is smaller than n."""
    caps = [triton.next_power_of_2(g) for g in grid]
    if max_t is not None:
        caps[0] = min(caps[0], max_t)
    out = []
    for i, j in itertools.product(range(n.bit_length()), repeat=2):
        bt, bh = 1 << i, 1 << j
        if n % (bt * bh) or bt > caps[0] or bh > caps[1]:
            continue
        bw = n // (bt * bh)
        if bw <= caps[2] or (bt == caps[0] and bh == caps[1]):
            out.append((bt, bh, bw))
    return out


def _span(block: int, n_from: int, n_to: int, e: int) -> int:
    """Length of the union of windows (radius e in a grid of n_to) of ``block`` consecutive
    indices of a grid of n_from: the centres of b neighbours span <= ceil((b-1)*n_to/n_from)+1."""
    return min(n_to, -(-(block - 1) * n_to // n_from) + 1 + 2 * e)


def _work(outer: Tile, inner: Tile, outer_grid, inner_grid, extent_like) -> int:
    """Rows x columns computed: (number of outer tiles) x (inner rows walked per outer tile)."""
    n_outer = math.prod(-(-g // b) for g, b in zip(outer_grid, outer))
    per_tile = 1
    for b, k, g_out, g_in, e in zip(outer, inner, outer_grid, inner_grid, extent_like):
        box = _span(b, g_out, g_in, e)
        per_tile *= -(-box // k) * k
    return n_outer * math.prod(outer) * per_tile


@functools.lru_cache(maxsize=256)
def plan_tiles(outer_grid, inner_grid, extent_like, block_outer: int, block_inner: int):
    """Tile shapes (outer, inner) minimising the computed (row, column) pairs.

    The walked (inner) tile is one frame deep, so its frame test is per row.
    Keys computed per query, 64 x 64 tiles, from ``_work``: gpu-large (16x48x48,
    extent (1,3,3), 147 visible): 1x8x8 or 2x2x16 queries with 1x4x16 / 1x8x8
    keys 768 (17% visible), 1x4x16 960, 1x1x64 1536 (the planner takes 2x2x16,
    the wider tie). nuwa-video (10x21x21, extent 3, all 10 frames in reach):
    16x2x2 queries 1124 keys per query, 2x4x8 2006, 1x8x8 2341 (before causal
    skipping, which the model ignores). Text grids (1x1xL) get 1x1x64 tiles.
    """
    best = None
    for outer in _shapes(block_outer, outer_grid):
        for inner in _shapes(block_inner, inner_grid, max_t=1):
            w = _work(outer, inner, outer_grid, inner_grid, extent_like)
            key = (w, -outer[2], -inner[2])     # ties: wider rows (contiguous rows of the grid)
            if best is None or key < best[0]:
                best = (key, outer, inner)
    return best[1], best[2]


def _inverse_extent(q_grid, kv_grid, extent):
    """Per axis, a radius in query units covering the queries that reach a key (for planning)."""
    return tuple(-(-(e * q + q) // kv) for e, q, kv in zip(extent, q_grid, kv_grid))


# Launch table: arch -> dtype class -> kernel -> padded head dim ->
# (outer rows, inner rows, num_warps, num_stages[, split dK/dV]). "outer" is what
# a program owns (queries; keys for dK/dV), "inner" the tile it walks. Every
# entry compiles with zero spills (python -m nuwa3dna.kernels.report); on sm_90
# the 16-bit entries keep 64 accumulator rows per warpgroup so the dots become
# wgmma. 8 warps on a 64-row tile make Triton 3.9 pick different warp layouts
# for chained dots on sm_90 and shuttle accumulators between them (spills), so
# sm_90 keeps 4 warps and shrinks the walked tile at large head dims instead.
_T16_SM90 = {
    "fwd": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 3),
            256: (64, 16, 4, 2)},
    "dq": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 2),
           256: (64, 16, 4, 2)},
    # Head dim 256: dK and dV accumulators (2 x 64x256 fp32) exceed one warpgroup's
    # registers, so two passes of 32 key rows (mma.sync, no wgmma at M = 32).
    "dkdv": {16: (64, 32, 4, 3), 32: (64, 32, 4, 3), 64: (64, 32, 4, 3), 128: (64, 16, 4, 2),
             256: (32, 16, 4, 2, True)},
}
_T16_SM80 = {
    "fwd": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 16, 4, 3),
            256: (64, 32, 8, 1)},
    "dq": {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (64, 32, 4, 3),
           256: (64, 32, 8, 2)},
    "dkdv": {16: (64, 32, 8, 3), 32: (64, 32, 8, 3), 64: (64, 32, 8, 3), 128: (32, 16, 4, 2),
             256: (64, 16, 8, 1, True)},
}
# float32 runs exact FMA dots (see _dot): small tiles, no wgmma; not a speed target.
_T32_SM90 = {
    "fwd": {16: (32, 32, 4, 2), 32: (64, 32, 4, 2), 64: (32, 32, 4, 2), 128: (16, 16, 4, 1),
            256: (16, 16, 4, 1)},
    "dq": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 4, 2),
           256: (16, 16, 4, 1)},
    "dkdv": {16: (32, 16, 4, 2), 32: (32, 16, 4, 2), 64: (32, 16, 4, 2), 128: (32, 16, 4, 2),
             256: (16, 16, 4, 1, True)},
}
_T32_SM80 = {
    "fwd": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 16, 4, 2), 128: (32, 16, 4, 1),
            256: (16, 16, 8, 1)},
    "dq": {16: (64, 32, 4, 2), 32: (64, 32, 4, 2), 64: (64, 16, 4, 2), 128: (32, 16, 4, 1),
           256: (16, 16, 8, 1)},
    "dkdv": {16: (32, 16, 4, 2), 32: (64, 16, 4, 2), 64: (32, 16, 4, 2), 128: (16, 16, 8, 1, True),
             256: (16, 16, 8, 1, True)},
}
CONFIG_TABLE = {
    90: {"16bit": _T16_SM90, "fp32": _T32_SM90},
    80: {"16bit": _T16_SM80, "fp32": _T32_SM80},
}


def device_arch(device) -> int:
    """Config family of a device: 90 for Hopper and newer, 80 below; 90 off-GPU
    (interpreter, report), where only the tile shapes matter."""
    if getattr(device, "type", None) == "cuda":
        return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80
    return 90


def pick_configs(q_grid, kv_grid, extent, D: int, dtype: torch.dtype, arch: int = 90):
    """Launch configs of the four kernels on ``arch`` (90 or 80); the report compiles exactly these.

    Rows per program, rows walked, warps and stages come from CONFIG_TABLE by
    dtype class and padded head dim (64 x 64 at D <= 64 in 16-bit); the (t, h, w)
    shapes of those tiles from plan_tiles on the actual grids.
    """
    q_grid, kv_grid, extent = tuple(q_grid), tuple(kv_grid), tuple(extent)
    block_d = block_d_for(D)
    table = CONFIG_TABLE[arch]["fp32" if dtype == torch.float32 else "16bit"]
    out = {}
    for kind in ("fwd", "dq"):
        outer, inner, warps, stages = table[kind][block_d]
        q_tile, k_tile = plan_tiles(q_grid, kv_grid, extent, outer, inner)
        out[kind] = LaunchConfig(kind, q_tile, k_tile, block_d, warps, stages)
    outer, inner, warps, stages, *split = table["dkdv"][block_d]
    k_tile, q_tile = plan_tiles(kv_grid, q_grid, _inverse_extent(q_grid, kv_grid, extent), outer, inner)
    out["dkdv"] = LaunchConfig("dkdv", q_tile, k_tile, block_d, warps, stages, bool(split and split[0]))
    # delta is a streaming row sum: 2048 / block_d rows keep 16 values per thread
    # and tensor (64 rows at D=64 float32 spilled on sm_90).
    rows = min(128, max(16, 2048 // block_d))
    out["preprocess"] = LaunchConfig("preprocess", (1, 1, rows), (1, 1, 1), block_d, 4, 1)
    return out


def upcast_dot(dtype: torch.dtype) -> bool:
    """True only in the interpreter for bf16, whose tl.dot there returns garbage."""
    return dtype == torch.bfloat16 and interpreter_enabled()


# ----------------------------------------------------------------------------- launchers
#
# Each ``*_launch`` returns (kernel, grid, args, meta) and launches nothing, so
# kernels/report.py compiles exactly what the launchers run.


def _n_tiles(grid, tile) -> int:
    return math.prod(-(-g // b) for g, b in zip(grid, tile))


def _meta(cfg: LaunchConfig, causal: bool, dtype) -> dict:
    # The walked tile is one frame deep (fwd/dq: keys, dkdv: queries); see plan_tiles.
    tiles = (dict(BH=cfg.q_tile[1], BW=cfg.q_tile[2], KT=cfg.k_tile[0], KH=cfg.k_tile[1], KW=cfg.k_tile[2])
             if cfg.kernel == "dkdv" else
             dict(BT=cfg.q_tile[0], BH=cfg.q_tile[1], BW=cfg.q_tile[2], KH=cfg.k_tile[1], KW=cfg.k_tile[2]))
    return dict(**tiles, BLOCK_D=cfg.block_d, CAUSAL=causal, UPCAST_DOT=upcast_dot(dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def fwd_launch(q, k, v, out, lse, extent, causal, scale, arch=None):
    B, T, H, W, n_heads, D = q.shape
    T2, H2, W2 = k.shape[1:4]
    cfg = pick_configs((T, H, W), (T2, H2, W2), extent, D, q.dtype, arch or device_arch(q.device))["fwd"]
    grid = (B * n_heads * _n_tiles((T, H, W), cfg.q_tile),)
    args = [q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            T, H, W, T2, H2, W2, *extent, n_heads, D, scale * LOG2E]
    return fwd_kernel, grid, args, _meta(cfg, causal, q.dtype)


def preprocess_launch(q, out, dout, delta, arch=None):
    B, T, H, W, n_heads, D = q.shape
    arch = arch or device_arch(q.device)
    cfg = pick_configs((T, H, W), (T, H, W), (0, 0, 0), D, q.dtype, arch)["preprocess"]
    grid = (B * n_heads * triton.cdiv(T * H * W, cfg.block_q),)
    args = [out, dout, delta, *out.stride(), *dout.stride(), T, H, W, n_heads, D]
    meta = dict(BLOCK_N=cfg.block_q, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return bwd_preprocess_kernel, grid, args, meta


def dkdv_launches(q, k, v, dout, lse, delta, dk, dv, extent, causal, scale, arch=None):
    """One launch (dK and dV together) or two (a dK pass, a dV pass; see split_dkdv)."""
    B, T, H, W, n_heads, D = q.shape
    T2, H2, W2 = k.shape[1:4]
    cfg = pick_configs((T, H, W), (T2, H2, W2), extent, D, q.dtype, arch or device_arch(q.device))["dkdv"]
    grid = (B * n_heads * _n_tiles((T2, H2, W2), cfg.k_tile),)
    args = [q, k, v, dout, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
            T, H, W, T2, H2, W2, *extent, n_heads, D, scale, scale * LOG2E]
    meta = _meta(cfg, causal, q.dtype)
    passes = [(True, False), (False, True)] if cfg.split_dkdv else [(True, True)]
    return [(bwd_dkdv_kernel, grid, args, dict(meta, DO_DK=a, DO_DV=b)) for a, b in passes]


def dq_launch(q, k, v, dout, lse, delta, dq, extent, causal, scale, arch=None):
    B, T, H, W, n_heads, D = q.shape
    T2, H2, W2 = k.shape[1:4]
    cfg = pick_configs((T, H, W), (T2, H2, W2), extent, D, q.dtype, arch or device_arch(q.device))["dq"]
    grid = (B * n_heads * _n_tiles((T, H, W), cfg.q_tile),)
    args = [q, k, v, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
            T, H, W, T2, H2, W2, *extent, n_heads, D, scale, scale * LOG2E]
    return bwd_dq_kernel, grid, args, _meta(cfg, causal, q.dtype)


def _run(spec):
    kernel, grid, args, meta = spec
    kernel[grid](*args, **meta)


def stats_shape(q) -> Tuple[int, ...]:
    """Shape of the float32 log-sum-exp and delta buffers: (B, heads, T, H, W)."""
    B, T, H, W, n_heads, _ = q.shape
    return (B, n_heads, T, H, W)


def nearby_attention_forward(q, k, v, extent, causal: bool, scale: float,
                             out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None):
    """Launch the forward; returns (out, lse). ``out`` (any strides) and ``lse``
    (contiguous float32, ``stats_shape(q)``) may be preallocated, e.g. NaN-poisoned by tests."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty(stats_shape(q), dtype=torch.float32, device=q.device)
    _run(fwd_launch(q, k, v, out, lse, extent, causal, scale))
    return out, lse


def nearby_attention_backward(q, k, v, out, lse, dout, extent, causal: bool, scale: float,
                              dq=None, dk=None, dv=None, delta=None):
    """Launch preprocess, dK/dV and dQ; returns (dq, dk, dv). Buffers may be preallocated."""
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if delta is None:
        delta = torch.empty(stats_shape(q), dtype=torch.float32, device=q.device)
    _run(preprocess_launch(q, out, dout, delta))
    for spec in dkdv_launches(q, k, v, dout, lse, delta, dk, dv, extent, causal, scale):
        _run(spec)
    _run(dq_launch(q, k, v, dout, lse, delta, dq, extent, causal, scale))
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd


class NearbyAttentionFunction(torch.autograd.Function):
    """3DNA with the fused kernels; inputs already validated by nuwa3dna.checks."""

    @staticmethod
    def forward(ctx, q, k, v, extent, causal, scale):
        out, lse = nearby_attention_forward(q, k, v, extent, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.extent, ctx.causal, ctx.scale = extent, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = nearby_attention_backward(q, k, v, out, lse, dout, ctx.extent, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


def triton_nearby_attention(q, k, v, extent, causal: bool, scale: float) -> torch.Tensor:
    """3DNA via the fused Triton kernels; ``extent`` resolved (three ints), ``scale`` a float."""
    return NearbyAttentionFunction.apply(q, k, v, tuple(int(e) for e in extent), bool(causal), float(scale))
