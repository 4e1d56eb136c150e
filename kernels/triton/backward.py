"""The 3DNA backward kernels (FlashAttention-2): preprocess, dK/dV, dQ.

``delta = rowsum(dO * O)`` in a preprocess kernel; dK/dV with one program
per 3D key tile that walks the query tiles whose windows reach it (the
inverse of the rescaled centre map, as ``geometry.query_range``, or with
TABLES the window tables' q0, q1; causal skips a head of that walk); dQ walks
the forward's key box (``walk.query_walk``).
Every output element is written by exactly one program: deterministic, no atomics,
except the relative position bias's gradient (``bwd_dq_kernel``: atomic adds).
"""
from __future__ import annotations

import triton
import triton.language as tl

from nuwa3dna.kernels.triton.extras import (
    EXTRA_SIZES, bias_cols, bias_tile, key_bias_cols, kv_head, query_bias_rows)
from nuwa3dna.kernels.triton.jit import (
    C_LOG2E, RUNTIME_SIZES, axis_tables, dot, dot_acc, load_rows, program_tile, query_range, store_rows, tile_coords,
    tile_mask, to_store, token_offsets)
from nuwa3dna.kernels.triton.walk import grid_rows, key_mask, key_tile, next_tile, query_walk


@triton.jit(do_not_specialize=("T", "H", "W", "n_heads"))
def bwd_preprocess_kernel(
    O, DO, DELTA,
    so_b, so_t, so_h, so_w, so_n, so_d,
    sdo_b, sdo_t, sdo_h, sdo_w, sdo_n, sdo_d,
    T, H, W, n_heads, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """delta = rowsum(dO * O) in float32, BLOCK_N queries (raster order) per program.

    Pointers: O, DO (B, T, H, W, heads, D) any strides (dO may be broadcast,
    stride 0); DELTA float32 (B, heads, T, H, W) contiguous.
    Grid: (B * heads * cdiv(T*H*W, BLOCK_N),).
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
    o = load_rows(O + b * so_b + hd * so_n, token_offsets(t, h, w, so_t, so_h, so_w), ok,
                  offs_d, so_d, D, EVEN_D).to(tl.float32)               # [BLOCK_N, BLOCK_D]
    do = load_rows(DO + b * sdo_b + hd * sdo_n, token_offsets(t, h, w, sdo_t, sdo_h, sdo_w), ok,
                   offs_d, sdo_d, D, EVEN_D).to(tl.float32)             # [BLOCK_N, BLOCK_D]
    tl.store(DELTA + bh.to(tl.int64) * n_q + r, tl.sum(o * do, 1), mask=ok)


@triton.jit
def dkdv_query_walk(dk, dv, k, v, Q, DO, LSE, DELTA, BIAS, b_cols, start, stop, t_lo, h_lo, w_lo, h_hi, w_hi,
                    n_h, n_w, ranges, k_ok, rk, ih, iw, ihw, q_tabs, sq, sdo, steps, group, offs_d, D, T, H, W,
                    T2, H2, W2, TAB, RT, RH, RW, qk_scale, BH: tl.constexpr, BW: tl.constexpr,
                    CAUSAL: tl.constexpr, DOT: tl.constexpr, EVEN_D: tl.constexpr,
                    WIDE_IDX: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, TABLES: tl.constexpr,
                    GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The dK/dV kernel's walk: dk, dv ([BLOCK_K, BLOCK_D] float32) plus the query tiles
    start..stop - 1 of the raster walk of 1 x BH x BW tiles over the queries
    [t_lo, .) x [h_lo, h_hi) x [w_lo, w_hi) (n_h x n_w tiles per frame). Q, DO point at the
    (batch, query head), LSE and DELTA at its statistics row, BIAS at its bias table (HAS_BIAS;
    ``b_cols`` [BLOCK_K] the keys' part of the index). ``ranges``: per key [BLOCK_K] the
    queries that see it per axis (qt0, qt1, qh0, qh1, qw0, qw1); ``q_tabs`` the tables' pq
    pointers (TABLES); ``sq``, ``sdo`` the (t, h, w, d) strides.

    GROUPED: the same walk for ``group`` consecutive query heads, Q, DO, ... at the first;
    ``steps`` = (head strides of Q and DO, statistics row length, bias table size). One flat
    loop of group x (stop - start) iterations, head-major: a loop nest (the group outside)
    spilled where this does not (gpu-large bf16 head dim 64 on sm_80: 48 bytes).
    """
    qt0, qt1, qh0, qh1, qw0, qw1 = ranges
    PQT, PQH, PQW = q_tabs
    sq_t, sq_h, sq_w, sq_d = sq
    sdo_t, sdo_h, sdo_w, sdo_d = sdo
    if GROUPED:
        n_walk = stop - start
        lo, hi = 0, group * n_walk
    else:
        lo, hi = start, stop
    Q0, DO0, LSE0, DELTA0, BIAS0 = Q, DO, LSE, DELTA, BIAS
    # One flat loop over query tiles (frame, row tile, column tile in raster order).
    for i in range(lo, hi):
        if GROUPED:
            g = (i // n_walk).to(tl.int64)                              # the group's g-th query head
            it = start + i % n_walk
            Q = Q0 + g * steps[0]
            DO = DO0 + g * steps[1]
            LSE = LSE0 + g * steps[2]
            DELTA = DELTA0 + g * steps[2]
            if HAS_BIAS:
                BIAS = BIAS0 + g * steps[3]
        else:
            it = i
        t = t_lo + it // (n_h * n_w)
        h = h_lo + ((it // n_w) % n_h) * BH
        w = w_lo + (it % n_w) * BW
        frame_ok = (t >= qt0) & (t < qt1) & k_ok                        # [BLOCK_K]
        qh = h + ih                                                     # [BLOCK_Q]
        qw = w + iw                                                     # [BLOCK_Q]
        # Queries past the range ends see nothing of this key tile.
        q_ok = (qh < h_hi) & (qw < w_hi)                                # [BLOCK_Q]
        if TABLES:
            mt = tl.load(PQT + t)                                       # grid coordinates
            mh = tl.load(PQH + qh, mask=q_ok, other=0)                  # [BLOCK_Q]
            mw = tl.load(PQW + qw, mask=q_ok, other=0)                  # [BLOCK_Q]
        else:
            mt, mh, mw = t, qh, qw
        q = load_rows(Q, token_offsets(mt, mh, mw, sq_t, sq_h, sq_w), q_ok,
                      offs_d, sq_d, D, EVEN_D)                          # [BLOCK_Q, BLOCK_D]
        do = load_rows(DO, token_offsets(mt, mh, mw, sdo_t, sdo_h, sdo_w), q_ok,
                       offs_d, sdo_d, D, EVEN_D)                        # [BLOCK_Q, BLOCK_D]
        rq = (mt * H + mh) * W + mw                                     # [BLOCK_Q] grid raster
        lse2 = tl.load(LSE + rq, mask=q_ok, other=0.0) * C_LOG2E        # [BLOCK_Q]
        # The range ends h_hi, w_hi also hide the tile's queries past them.
        vis_t = tile_mask(frame_ok, qh0 - h, tl.minimum(qh1, h_hi) - h - 1,
                          qw0 - w, tl.minimum(qw1, w_hi) - w - 1, ih, iw)  # [BLOCK_K, BLOCK_Q]
        if CAUSAL:
            vis_t = vis_t & (ihw[None, :] >= (rk - ((t * H + h) * W + w))[:, None])
        s_t = dot(k, tl.trans(q), DOT) * qk_scale                # [BLOCK_K, BLOCK_Q]
        if HAS_BIAS:
            b_rows = query_bias_rows(t, qh, qw, True, q_ok, T, H, W, T2, H2, W2, RT, RH, RW, TAB, WIDE_IDX,
                                     TABLES)                            # [BLOCK_Q]
            s_t += bias_tile(BIAS, b_cols[:, None] + b_rows[None, :], vis_t)  # [BLOCK_K, BLOCK_Q]
        p_t = tl.where(vis_t, tl.math.exp2(s_t - lse2[None, :]), 0.0)   # [BLOCK_K, BLOCK_Q]
        if DO_DV:
            dv = dot_acc(dv, p_t, do, DOT)                       # [BLOCK_K, BLOCK_D]
        if DO_DK:
            delta = tl.load(DELTA + rq, mask=q_ok, other=0.0)           # [BLOCK_Q]
            dp_t = dot(v, tl.trans(do), DOT)                     # [BLOCK_K, BLOCK_Q]
            ds_t = p_t * (dp_t - delta[None, :])                        # [BLOCK_K, BLOCK_Q]
            dk = dot_acc(dk, ds_t, q, DOT)                       # [BLOCK_K, BLOCK_D]
    return dk, dv


@triton.jit(do_not_specialize=RUNTIME_SIZES + EXTRA_SIZES)
def bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, TAB, BIAS,
    sq_b, sq_t, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_t, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_t, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_t, sdo_h, sdo_w, sdo_n, sdo_d,
    sdk_b, sdk_t, sdk_h, sdk_w, sdk_n, sdk_d,
    sdv_b, sdv_t, sdv_h, sdv_w, sdv_n, sdv_d,
    T, H, W, T2, H2, W2, ET, EH, EW, n_heads, group, RT, RH, RW, D, scale, qk_scale,
    BH: tl.constexpr, BW: tl.constexpr, KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr, EVEN_D: tl.constexpr,
    WIDE_IDX: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, TABLES: tl.constexpr,
    GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """dK, dV of one 3D key tile (KT x KH x KW), summed over every query whose window reaches it.

    DO_DK / DO_DV select the outputs: both in one pass normally; at head dim
    256 two fp32 [64, 256] accumulators (256 registers/thread on one
    warpgroup) cannot fit, so the launcher runs a dK pass and a dV pass.

    Pointers: Q, DO (B, T, H, W, heads, D); K, V, DK, DV (B, T2, H2, W2, heads, D);
    any strides; LSE (natural) and DELTA float32 (B, heads, T, H, W) contiguous.
    The queries are walked in 1 x BH x BW tiles over the ranges of
    ``geometry.query_range`` per axis (rescaled centres inverted). TABLES (v2
    window options): key and query tiles in re-laid coordinates, the ranges read
    from the tables at TAB (``relayout``), memory at grid positions; else TAB is None.
    GROUPED: ``n_heads`` is K's heads and Q has ``group`` times as many; a program walks
    the query tiles of each of its kv head's query heads in turn (``dkdv_query_walk``) and
    sums in registers: one writer per dK/dV element, no atomics, K/V loaded once.
    HAS_BIAS: BIAS (query heads, 2RT+1, 2RH+1, 2RW+1) contiguous (``extras``), else None.
    Grid: (B * kv heads * cdiv(T2, KT) * cdiv(H2, KH) * cdiv(W2, KW),).
    """
    BLOCK_Q: tl.constexpr = BH * BW
    BLOCK_K: tl.constexpr = KT * KH * KW
    bh, b, hd, a0, b0, c0, a_last, b_last, c_last = program_tile(tl.program_id(0), T2, H2, W2, n_heads,
                                                                 KT, KH, KW)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    kt, kh, kw = tile_coords(tl.arange(0, BLOCK_K), a0, b0, c0, KT, KH, KW)  # [BLOCK_K] each
    k_ok = (kt < T2) & (kh < H2) & (kw < W2)                            # [BLOCK_K]
    if TABLES:
        _, _, PQT, PKT, Q0T, Q1T = axis_tables(TAB, 0, T, H, W, T2, H2, W2)
        _, _, PQH, PKH, Q0H, Q1H = axis_tables(TAB, 1, T, H, W, T2, H2, W2)
        _, _, PQW, PKW, Q0W, Q1W = axis_tables(TAB, 2, T, H, W, T2, H2, W2)
        mkt = tl.load(PKT + kt, mask=k_ok, other=0)                     # [BLOCK_K] grid coordinates
        mkh = tl.load(PKH + kh, mask=k_ok, other=0)                     # [BLOCK_K]
        mkw = tl.load(PKW + kw, mask=k_ok, other=0)                     # [BLOCK_K]
    else:
        mkt, mkh, mkw = kt, kh, kw
    k = load_rows(K + b * sk_b + hd * sk_n, token_offsets(mkt, mkh, mkw, sk_t, sk_h, sk_w), k_ok,
                  offs_d, sk_d, D, EVEN_D)                              # [BLOCK_K, BLOCK_D]
    if DO_DK:
        v = load_rows(V + b * sv_b + hd * sv_n, token_offsets(mkt, mkh, mkw, sv_t, sv_h, sv_w), k_ok,
                      offs_d, sv_d, D, EVEN_D)                          # [BLOCK_K, BLOCK_D]
    else:
        v = k                                                           # unused (the dV pass)
    if GROUPED:
        # The group's first query head (dkdv_query_walk steps through the group): its
        # statistics row is (b * heads + hd * group) = bh * group.
        Q += b * sq_b + hd * group * sq_n
        DO += b * sdo_b + hd * group * sdo_n
        LSE += bh.to(tl.int64) * group * (T * H * W)
        DELTA += bh.to(tl.int64) * group * (T * H * W)
    else:
        Q += b * sq_b + hd * sq_n
        DO += b * sdo_b + hd * sdo_n
        LSE += bh.to(tl.int64) * (T * H * W)
        DELTA += bh.to(tl.int64) * (T * H * W)
    rk = (kt * H2 + kh) * W2 + kw                                       # [BLOCK_K] raster (walked coordinates)
    # Per key, the queries that see it per axis (loop invariant, half-open).
    if TABLES:
        qt0 = tl.load(Q0T + kt, mask=k_ok, other=0)                     # [BLOCK_K] each
        qt1 = tl.load(Q1T + kt, mask=k_ok, other=0)
        qh0 = tl.load(Q0H + kh, mask=k_ok, other=0)
        qh1 = tl.load(Q1H + kh, mask=k_ok, other=0)
        qw0 = tl.load(Q0W + kw, mask=k_ok, other=0)
        qw1 = tl.load(Q1W + kw, mask=k_ok, other=0)
    else:
        qt0, qt1 = query_range(kt, kt, T, T2, ET, WIDE_IDX)             # [BLOCK_K] each
        qh0, qh1 = query_range(kh, kh, H, H2, EH, WIDE_IDX)
        qw0, qw1 = query_range(kw, kw, W, W2, EW, WIDE_IDX)
    ih = offs_q // BW                                                   # [BLOCK_Q] row in query tile
    iw = offs_q % BW                                                    # [BLOCK_Q]
    ihw = ih * W + iw                                                   # [BLOCK_Q] raster offset in tile

    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)                       # [BLOCK_K, BLOCK_D]
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)                       # [BLOCK_K, BLOCK_D]

    if TABLES:                                                          # the tile's query ranges
        t_lo, t_hi = tl.load(Q0T + a0), tl.load(Q1T + a_last)
        h_lo, h_hi = tl.load(Q0H + b0), tl.load(Q1H + b_last)
        w_lo, w_hi = tl.load(Q0W + c0), tl.load(Q1W + c_last)
    else:
        t_lo, t_hi = query_range(a0, a_last, T, T2, ET, WIDE_IDX)
        h_lo, h_hi = query_range(b0, b_last, H, H2, EH, WIDE_IDX)
        w_lo, w_hi = query_range(c0, c_last, W, W2, EW, WIDE_IDX)
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
    stop = (t_hi - t_lo) * n_h * n_w
    ranges = (qt0, qt1, qh0, qh1, qw0, qw1)
    q_tabs = (PQT, PQH, PQW) if TABLES else (TAB, TAB, TAB)
    sq, sdo = (sq_t, sq_h, sq_w, sq_d), (sdo_t, sdo_h, sdo_w, sdo_d)
    n_bias = (2 * RT + 1) * (2 * RH + 1) * (2 * RW + 1)
    b_cols = bias_cols(kt, kh, kw, RH, RW) if HAS_BIAS else kt          # [BLOCK_K]
    if HAS_BIAS:
        BIAS += (hd * group if GROUPED else hd) * n_bias
    dk, dv = dkdv_query_walk(
        dk, dv, k, v, Q, DO, LSE, DELTA, BIAS, b_cols, start, stop, t_lo, h_lo, w_lo, h_hi, w_hi, n_h, n_w,
        ranges, k_ok, rk, ih, iw, ihw, q_tabs, sq, sdo, (sq_n, sdo_n, T * H * W, n_bias), group, offs_d, D,
        T, H, W, T2, H2, W2, TAB, RT, RH, RW, qk_scale, BH, BW, CAUSAL, DOT, EVEN_D, WIDE_IDX, DO_DK,
        DO_DV, TABLES, GROUPED, HAS_BIAS)

    if DO_DK:
        store_rows(DK + b * sdk_b + hd * sdk_n, token_offsets(mkt, mkh, mkw, sdk_t, sdk_h, sdk_w), k_ok,
                   offs_d, sdk_d, D, to_store(dk * scale, DK.dtype.element_ty, DOT), EVEN_D)
    if DO_DV:
        store_rows(DV + b * sdv_b + hd * sdv_n, token_offsets(mkt, mkh, mkw, sdv_t, sdv_h, sdv_w), k_ok,
                   offs_d, sdv_d, D, to_store(dv, DV.dtype.element_ty, DOT), EVEN_D)


@triton.jit(do_not_specialize=RUNTIME_SIZES + EXTRA_SIZES)
def bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, TAB, BIAS, DBIAS,
    sq_b, sq_t, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_t, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_t, sv_h, sv_w, sv_n, sv_d,
    sdo_b, sdo_t, sdo_h, sdo_w, sdo_n, sdo_d,
    sdq_b, sdq_t, sdq_h, sdq_w, sdq_n, sdq_d,
    T, H, W, T2, H2, W2, ET, EH, EW, n_heads, group, RT, RH, RW, D, scale, qk_scale,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr, EVEN_D: tl.constexpr,
    WIDE_IDX: tl.constexpr, TABLES: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
    KEYS_INSIDE: tl.constexpr,
):
    """dQ of one 3D query tile: walks the same key box and 1 x KH x KW key tiles as the forward
    (TABLES and TAB, GROUPED and group, HAS_BIAS and BIAS as there).

    KEYS_INSIDE as the forward's (unmasked key loads).
    HAS_BIAS: also the bias's gradient, dS summed per (query head, table entry) into DBIAS
    (float32 (heads, 2RT+1, 2RH+1, 2RW+1) contiguous, zeroed) by one relaxed atomic add per
    visible score. Why: the bias gradient is a scatter (every score adds to the entry of its
    offset) and Triton has no in-register scatter-add; FlexAttention's captured-buffer
    gradients do the same. Cost: one RED.ADD.F32 per visible pair, landing on
    (2RT+1)(2RH+1)(2RW+1) addresses per head (147 at extent (1, 3, 3)), which the L2's
    atomic units serialise: at an assumed one per clock per L2 slice (kernels/perf.py,
    ``ATOMICS_PER_S``) cpu-mid's 7.9M visible pairs cost ~47 us on an H100, about the
    plain backward's own predicted time (48 us), so ``report --perf`` predicts the bias's
    backward at ~2x the plain one. The order of the adds varies from run to run: d_bias is
    not bit-reproducible (dq, dk, dv still are). No (queries x keys) tensor exists.

    Pointers: Q, DO, DQ (B, T, H, W, heads, D); K, V (B, T2, H2, W2, heads, D);
    any strides; LSE (natural) and DELTA float32 (B, heads, T, H, W) contiguous.
    Grid: (B * heads * cdiv(T, BT) * cdiv(H, BH) * cdiv(W, BW),).
    """
    BLOCK_Q: tl.constexpr = BT * BH * BW
    bh, b, hd, qt, qh, qw, q_ok, rq, walk, n_iter, (a, bb, c) = query_walk(
        tl.program_id(0), T, H, W, T2, H2, W2, ET, EH, EW, n_heads, TAB, BT, BH, BW, KH, KW, CAUSAL, WIDE_IDX,
        TABLES)
    offs_d = tl.arange(0, BLOCK_D)
    mt, mh, mw, r_grid = grid_rows(TAB, qt, qh, qw, q_ok, T, H, W, T2, H2, W2, TABLES)  # [BLOCK_Q] each
    q = load_rows(Q + b * sq_b + hd * sq_n, token_offsets(mt, mh, mw, sq_t, sq_h, sq_w),
                  q_ok, offs_d, sq_d, D, EVEN_D)                        # [BLOCK_Q, BLOCK_D]
    do = load_rows(DO + b * sdo_b + hd * sdo_n, token_offsets(mt, mh, mw, sdo_t, sdo_h, sdo_w),
                   q_ok, offs_d, sdo_d, D, EVEN_D)                      # [BLOCK_Q, BLOCK_D]
    row = bh.to(tl.int64) * (T * H * W)
    lse2 = tl.load(LSE + row + r_grid, mask=q_ok, other=0.0) * C_LOG2E  # [BLOCK_Q]
    delta = tl.load(DELTA + row + r_grid, mask=q_ok, other=0.0)         # [BLOCK_Q]
    hk = kv_head(hd, group, GROUPED)
    K += b * sk_b + hk * sk_n
    V += b * sv_b + hk * sv_n
    if HAS_BIAS:
        n_bias = (2 * RT + 1) * (2 * RH + 1) * (2 * RW + 1)
        BIAS += hd * n_bias
        DBIAS += hd * n_bias
        b_rows = query_bias_rows(qt, qh, qw, q_ok, q_ok, T, H, W, T2, H2, W2, RT, RH, RW, TAB, WIDE_IDX,
                                 TABLES)                                # [BLOCK_Q]
        b_cols = key_bias_cols(KH, KW, RH, RW)                          # [BLOCK_K]

    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)                       # [BLOCK_Q, BLOCK_D]
    for _ in range(0, n_iter):
        k, v = key_tile(a, bb, c, walk, K, V, (sk_t, sk_h, sk_w, sk_d), (sv_t, sv_h, sv_w, sv_d),
                        offs_d, D, H2, W2, KH, KW, EVEN_D, TABLES, KEYS_INSIDE)  # [BLOCK_K, BLOCK_D] each
        vis = key_mask(walk, a, bb, c, ET, H2, W2, CAUSAL, TABLES)      # [BLOCK_Q, BLOCK_K]
        s = dot(q, tl.trans(k), DOT) * qk_scale                  # [BLOCK_Q, BLOCK_K]
        if HAS_BIAS:
            idx = b_rows[:, None] + (bias_cols(a, bb, c, RH, RW) + b_cols)[None, :]  # [BLOCK_Q, BLOCK_K]
            s += bias_tile(BIAS, idx, vis)
        p = tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)         # [BLOCK_Q, BLOCK_K]
        dp = dot(do, tl.trans(v), DOT)                           # [BLOCK_Q, BLOCK_K]
        ds = p * (dp - delta[:, None])                                  # [BLOCK_Q, BLOCK_K]
        if HAS_BIAS:
            tl.atomic_add(DBIAS + idx, ds, mask=vis, sem="relaxed")
        dq = dot_acc(dq, ds, k, DOT)                             # [BLOCK_Q, BLOCK_D]
        a, bb, c = next_tile(a, bb, c, walk, KH, KW)

    mt, mh, mw, _ = grid_rows(TAB, qt, qh, qw, q_ok, T, H, W, T2, H2, W2, TABLES)
    store_rows(DQ + b * sdq_b + hd * sdq_n, token_offsets(mt, mh, mw, sdq_t, sdq_h, sdq_w), q_ok,
               offs_d, sdq_d, D, to_store(dq * scale, DQ.dtype.element_ty, DOT), EVEN_D)
