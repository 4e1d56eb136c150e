"""The 3DNA forward kernel: O = softmax over the visible keys of (Q K^T * scale), then V.

Online softmax (FlashAttention-2) in base 2 over the key tiles of the query
tile's box (``walk.query_walk``, ``walk.key_tile``, ``walk.key_mask``); the natural
log-sum-exp is saved for the backward.
"""
from __future__ import annotations

import triton
import triton.language as tl

from nuwa3dna.kernels.triton.extras import EXTRA_SIZES, bias_cols, bias_tile, key_bias_cols, kv_head, query_bias_rows
from nuwa3dna.kernels.triton.jit import C_LN2, C_NEG_BIG, RUNTIME_SIZES, dot, dot_acc, load_rows, store_rows, to_store, \
    token_offsets
from nuwa3dna.kernels.triton.walk import grid_rows, key_mask, key_tile, next_tile, query_walk


@triton.jit(do_not_specialize=RUNTIME_SIZES + EXTRA_SIZES)
def fwd_kernel(
    Q, K, V, O, LSE, TAB, BIAS,
    sq_b, sq_t, sq_h, sq_w, sq_n, sq_d,
    sk_b, sk_t, sk_h, sk_w, sk_n, sk_d,
    sv_b, sv_t, sv_h, sv_w, sv_n, sv_d,
    so_b, so_t, so_h, so_w, so_n, so_d,
    T, H, W, T2, H2, W2, ET, EH, EW, n_heads, group, RT, RH, RW, D, qk_scale,
    BT: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr, EVEN_D: tl.constexpr,
    WIDE_IDX: tl.constexpr, TABLES: tl.constexpr, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
    KEYS_INSIDE: tl.constexpr,
):
    """Forward of one query tile (BT x BH x BW queries, BLOCK_Q rows) of one (batch, head).

    Pointers: Q, O (B, T, H, W, heads, D); K, V (B, T2, H2, W2, heads, D), any
    strides (in elements); LSE float32 (B, heads, T, H, W) contiguous, natural log.
    ET, EH, EW: resolved radii. qk_scale = scale * log2(e). Key tiles are
    1 x KH x KW (one key frame per tile, so the frame test is per query row).
    TABLES (v2 window options): TAB int32 window tables (``relayout.packed``), tiles
    in re-laid coordinates, memory and LSE at grid positions; else TAB is None.
    GROUPED: K, V have heads / group heads, query head h reads kv head h // group.
    HAS_BIAS: BIAS (heads, 2RT+1, 2RH+1, 2RW+1) contiguous, added to each window key's
    score (``extras``), else None.
    KEYS_INSIDE (the launcher's ``plan.keys_inside``): every walked key tile lies inside
    the key grid, so key loads are unmasked.
    Grid: (B * heads * cdiv(T, BT) * cdiv(H, BH) * cdiv(W, BW),); consecutive
    programs are neighbouring query tiles of one (batch, head), whose key boxes
    overlap, so K/V are reused from L2.
    """
    BLOCK_Q: tl.constexpr = BT * BH * BW
    bh, b, hd, qt, qh, qw, q_ok, rq, walk, n_iter, (a, bb, c) = query_walk(
        tl.program_id(0), T, H, W, T2, H2, W2, ET, EH, EW, n_heads, TAB, BT, BH, BW, KH, KW, CAUSAL, WIDE_IDX,
        TABLES)
    offs_d = tl.arange(0, BLOCK_D)
    mt, mh, mw, _ = grid_rows(TAB, qt, qh, qw, q_ok, T, H, W, T2, H2, W2, TABLES)  # [BLOCK_Q] each
    q = load_rows(Q + b * sq_b + hd * sq_n, token_offsets(mt, mh, mw, sq_t, sq_h, sq_w),
                  q_ok, offs_d, sq_d, D, EVEN_D)                        # [BLOCK_Q, BLOCK_D]
    hk = kv_head(hd, group, GROUPED)
    K += b * sk_b + hk * sk_n
    V += b * sv_b + hk * sv_n
    if HAS_BIAS:
        BIAS += hd * ((2 * RT + 1) * (2 * RH + 1) * (2 * RW + 1))
        b_rows = query_bias_rows(qt, qh, qw, q_ok, q_ok, T, H, W, T2, H2, W2, RT, RH, RW, TAB, WIDE_IDX,
                                 TABLES)                                # [BLOCK_Q]
        b_cols = key_bias_cols(KH, KW, RH, RW)                          # [BLOCK_K]

    m_i = tl.full([BLOCK_Q], C_NEG_BIG, tl.float32)                     # [BLOCK_Q] running max (log2)
    l_i = tl.zeros([BLOCK_Q], tl.float32)                               # [BLOCK_Q] running sum
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)                      # [BLOCK_Q, BLOCK_D]
    for _ in range(0, n_iter):
        k, v = key_tile(a, bb, c, walk, K, V, (sk_t, sk_h, sk_w, sk_d), (sv_t, sv_h, sv_w, sv_d),
                        offs_d, D, H2, W2, KH, KW, EVEN_D, TABLES, KEYS_INSIDE)  # [BLOCK_K, BLOCK_D] each
        s = dot(q, tl.trans(k), DOT)                             # [BLOCK_Q, BLOCK_K] unscaled
        vis = key_mask(walk, a, bb, c, ET, H2, W2, CAUSAL, TABLES)      # [BLOCK_Q, BLOCK_K]
        if HAS_BIAS:
            idx = b_rows[:, None] + (bias_cols(a, bb, c, RH, RW) + b_cols)[None, :]  # [BLOCK_Q, BLOCK_K]
            s = tl.where(vis, s * qk_scale + bias_tile(BIAS, idx, vis), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))                       # [BLOCK_Q]
            p = tl.math.exp2(s - m_new[:, None])                        # [BLOCK_Q, BLOCK_K]
        else:
            # The scale enters after the row max (scale > 0 commutes with max) and in
            # exp2's argument, one FFMA per score instead of a multiply and a subtract.
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)            # [BLOCK_Q]
            p = tl.math.exp2(s * qk_scale - m_new[:, None])             # [BLOCK_Q, BLOCK_K]
        alpha = tl.math.exp2(m_i - m_new)                               # [BLOCK_Q]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = dot_acc(acc * alpha[:, None], p, v, DOT)           # [BLOCK_Q, BLOCK_D]
        m_i = m_new
        a, bb, c = next_tile(a, bb, c, walk, KH, KW)

    # Every query on the grid sees at least one key (its centre; its stride leader), so l_i > 0 there;
    # rows off the grid (l_i = 0) are never stored: 1 keeps them finite.
    l_i = tl.where(q_ok, l_i, 1.0)
    out = acc / l_i[:, None]                                            # [BLOCK_Q, BLOCK_D]
    mt, mh, mw, r_grid = grid_rows(TAB, qt, qh, qw, q_ok, T, H, W, T2, H2, W2, TABLES)
    store_rows(O + b * so_b + hd * so_n, token_offsets(mt, mh, mw, so_t, so_h, so_w), q_ok,
               offs_d, so_d, D, to_store(out, O.dtype.element_ty, DOT), EVEN_D)
    lse = (m_i + tl.math.log2(l_i)) * C_LN2                             # [BLOCK_Q] natural log
    tl.store(LSE + bh.to(tl.int64) * (T * H * W) + r_grid, lse, mask=q_ok)
