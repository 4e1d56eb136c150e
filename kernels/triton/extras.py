"""``@triton.jit`` helpers of the grouped kv heads and the relative position bias
(docs/design.md section 8), shared by the forward, dQ and dK/dV kernels.

Grouped queries (GQA/MQA): query head h reads kv head h // group (``kv_head``);
no copy of k, v is made. The dK/dV kernel loops over a kv head's group itself.

Relative position bias: the term of key j for a query is bias[h, (j - l) // d + R]
per axis, l the key position of the query's leader. On both window paths that index
is linear in the walked coordinates (plain: j - c + R; table path: j' - l' + R with
l' the leader's re-laid index, ``relayout``'s ``ld`` table), so the flat index of a
[rows, cols] score tile is ``bias_rows`` (per query) + ``bias_cols`` (per key): one
add per element, then a masked gather (``bias_tile``). R comes from the bias's
shape, not from the extent the kernels get (capped at the axis lengths).
"""
from __future__ import annotations

import triton
import triton.language as tl

from nuwa3dna.kernels.triton.jit import C_LOG2E, centre


@triton.jit
def axis_leaders(TAB, axis: tl.constexpr, T, H, W, T2, H2, W2):
    """Pointer to the int32 leader table ``ld`` of ``axis`` (n entries), which ``relayout.packed``
    lays after the three axes' blocks."""
    LD = TAB + 3 * (T + T2 + H + H2 + W + W2)
    if axis == 1:
        LD += T
    elif axis == 2:
        LD += T + H
    return LD


@triton.jit
def kv_head(hd, group, GROUPED: tl.constexpr):
    """The kv head (int64) of query head ``hd`` (int64): hd // group with grouped queries
    (``group`` query heads per kv head; an int32 division: int64 divides in a subroutine)."""
    if GROUPED:
        return (hd.to(tl.int32) // group).to(tl.int64)
    return hd


@triton.jit
def leader(LD, x, ok, n, m, WIDE_IDX: tl.constexpr, TABLES: tl.constexpr):
    """Leader of walked query coordinate(s) ``x`` on one axis of n queries, m keys: the
    re-laid ``ld`` table at LD (``axis_leaders``) with TABLES, else the centre (stride 1)."""
    if TABLES:
        return tl.load(LD + x, mask=ok, other=0)
    return centre(x, n, m, WIDE_IDX)


@triton.jit
def bias_rows(lt, lh, lw, RT, RH, RW):
    """The query part of the bias index, from the query's leaders (walked coordinates).

    The bias (heads, 2RT+1, 2RH+1, 2RW+1), read flat per head, holds the term of key
    (a, b, c) for a query with leaders (lt, lh, lw) at ((a - lt + RT) * nH + b - lh + RH) * nW
    + c - lw + RW, nH = 2RH+1, nW = 2RW+1 (SPEC section 5: (j - l) // d + R per axis, which
    is j' - l' + R in the table path's re-laid coordinates, ``relayout``). That is this part
    plus ``bias_cols(a, b, c)``: a [rows, cols] tile of indices costs one add per element.
    """
    return ((RT - lt) * (2 * RH + 1) + RH - lh) * (2 * RW + 1) + RW - lw


@triton.jit
def bias_cols(a, b, c, RH, RW):
    """The key part of the bias index of walked key coordinates (a, b, c) (``bias_rows``)."""
    return (a * (2 * RH + 1) + b) * (2 * RW + 1) + c


@triton.jit
def bias_tile(BIAS, idx, vis):
    """The bias at the flat indices ``idx`` of one head's table at BIAS where ``vis`` (0
    elsewhere: indices outside the window may leave the table), float32, in the kernels'
    base-2 score units (x log2 e). A gather served by L1/L2: the table is small
    (147 entries per head at extent (1, 3, 3))."""
    return tl.load(BIAS + idx, mask=vis, other=0.0).to(tl.float32) * C_LOG2E


@triton.jit
def query_bias_rows(qt, qh, qw, t_ok, q_ok, T, H, W, T2, H2, W2, RT, RH, RW, TAB, WIDE_IDX: tl.constexpr,
                    TABLES: tl.constexpr):
    """[rows] query part of the bias index (``bias_rows``) of rows at walked coordinates; the
    frame ``qt`` (masked by ``t_ok``) is per row (forward, dQ) or one scalar (dK/dV's walk)."""
    if TABLES:
        LDT = axis_leaders(TAB, 0, T, H, W, T2, H2, W2)
        LDH = axis_leaders(TAB, 1, T, H, W, T2, H2, W2)
        LDW = axis_leaders(TAB, 2, T, H, W, T2, H2, W2)
    else:
        LDT, LDH, LDW = TAB, TAB, TAB
    return bias_rows(leader(LDT, qt, t_ok, T, T2, WIDE_IDX, TABLES), leader(LDH, qh, q_ok, H, H2, WIDE_IDX, TABLES),
                     leader(LDW, qw, q_ok, W, W2, WIDE_IDX, TABLES), RT, RH, RW)


@triton.jit
def key_bias_cols(KH: tl.constexpr, KW: tl.constexpr, RH, RW):
    """[KH * KW] loop-invariant key part of the bias index inside a 1 x KH x KW key tile;
    ``bias_cols(a, bb, c, RH, RW)`` of ``key_tile``'s origin adds the tile's."""
    offs_k = tl.arange(0, KH * KW)
    return bias_cols(0, offs_k // KW, offs_k % KW, RH, RW)


# Kept runtime ints, as jit.RUNTIME_SIZES: group sizes and radii of 1 would otherwise
# compile variants of their own.
EXTRA_SIZES = ("group", "RT", "RH", "RW")
