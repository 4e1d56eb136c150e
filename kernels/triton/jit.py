"""``@triton.jit`` helpers shared by the 3DNA kernels: window geometry, tile
coordinates, strided loads and stores, and the float32-accumulating dots (the
forward and dQ kernels' key walk is ``walk``).

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
def load_rows(ptr, row_off, row_ok, offs_d, s_d, D, EVEN_D: tl.constexpr, ALL_ROWS: tl.constexpr = False):
    """Load a [BLOCK_ROWS, BLOCK_D] tile; rows (unless ALL_ROWS: every row is inside, row_ok
    is ignored) and head dims past the ends read 0."""
    ptrs = ptr + row_off[:, None] + offs_d[None, :].to(tl.int64) * s_d  # [BLOCK_ROWS, BLOCK_D]
    if ALL_ROWS:
        if EVEN_D:
            return tl.load(ptrs)
        return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
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
def to_tf32(x):
    """float32 x rounded to TF32's 10 mantissa bits, to nearest even (what the tensor
    cores' TF32 inputs keep), as float32: the interpreter's stand-in for a TF32 dot."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + (0xFFF + ((bits >> 13) & 1))) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def dot(a, b, DOT: tl.constexpr, acc=None):
    """acc + a @ b with float32 accumulation (acc=None: a fresh product).

    DOT (``configs.dot_mode``) says how float32 operands multiply: "ieee" exactly on
    FMAs (PyTorch's default float32 matmul precision), "tf32" on the tensor cores
    (when PyTorch's own float32 matmuls may use TF32), "tf32-interp" the interpreter's
    emulation of it (operands rounded to TF32, exact products). 16-bit operands take
    the tensor cores' native dot, except "upcast" (interpreter + bf16 only): bf16
    tl.dot is broken in the interpreter; the operands are already rounded to bf16,
    so upcasting them is exact and reproduces the GPU's bf16 x bf16 -> fp32 product.
    """
    if DOT == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        if DOT == "tf32-interp":
            return tl.dot(to_tf32(a), to_tf32(b), acc, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=DOT)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def dot_acc(acc, a32, b, DOT: tl.constexpr):
    """acc + a32 @ b for a float32 tile a32 (P or dS) and b in the input dtype,
    accumulated in place (one accumulator layout, no temporary product tile).

    bfloat16 keeps 8 mantissa bits: rounding P and dS to it once made dK 2.5x
    less accurate than PyTorch's bf16 SDPA backward (which keeps P in fp32),
    failing the 2x rule (test_triton.py, causal 3x5x7: dK error 0.026 vs 0.010).
    Splitting a32 = hi + lo into two bf16 tiles and doing two dots gives 16
    bits (error 0.016); the forward's P @ V likewise (head dim 200, causal:
    output error 0.017 vs 0.006). float16 (11 bits) and float32 need no split.
    hi is a32 truncated to bf16 by clearing the low 16 bits, so it is exact in
    float32 without a conversion back (sm_90 SASS: one LOP3 per element instead of
    a F2F and an IMAD widening each); lo = a32 - hi is then exact too.
    """
    if b.dtype == tl.bfloat16:
        hi32 = (a32.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
        acc = dot(hi32.to(b.dtype), b, DOT, acc)
        return dot((a32 - hi32).to(b.dtype), b, DOT, acc)
    return dot(a32.to(b.dtype), b, DOT, acc)


@triton.jit
def to_store(x, dtype: tl.constexpr, DOT: tl.constexpr):
    """A float32 result in the output dtype, rounded to nearest even as the GPU's cast does.

    DOT "upcast" (interpreter + bf16): the interpreter's float32 -> bf16 cast truncates,
    which left outputs a whole bf16 ulp off (test_triton_windows.py, raster causal,
    dilated: error 0.0156 vs dense bf16's 0.0068); adding 0x7FFF plus the kept
    lowest bit to the bits first makes the truncation round to nearest even.
    """
    if DOT == "upcast":
        bits = x.to(tl.uint32, bitcast=True)
        x = (bits + (0x7FFF + ((bits >> 16) & 1))).to(tl.float32, bitcast=True)
    return x.to(dtype)
