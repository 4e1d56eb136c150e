"""The ground truth of 3DNA: an explicit boolean mask and SDPA (``backend="dense"``),
and a brute-force loop over queries that the dense path is itself tested against.

The dense path allocates a (queries x keys) mask and score matrix: it is for
correctness and small problems only. Every other path must agree with it.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from nuwa3dna.checks import uses_forward_ad
from nuwa3dna.kernels.geometry import Grid, grid_coords, resolve_extent, visible


def nearby_mask(q_grid: Grid, kv_grid: Grid, extent, causal=False, device=None, *, dilation=1, stride=1,
                border: str = "clip", after=None) -> torch.Tensor:
    """The (Nq, Nk) boolean 3DNA mask, True where a key is visible; raster order.

    ``causal``: a bool (raster order) or a 3-tuple of bools (per axis); ``dilation``,
    ``stride``: ints or 3-tuples; ``border``: "clip" or "shift" (docs/design.md
    section 7). ``after`` (internal): radii after the leader where they differ from
    ``extent`` (NATTEN's even kernels). Options are not validated here.
    """
    extent = resolve_extent(extent, kv_grid)
    if after is not None:
        after = resolve_extent(after, kv_grid)
    return visible(grid_coords(q_grid, device), grid_coords(kv_grid, device),
                   q_grid, kv_grid, extent, causal, dilation=dilation, stride=stride, border=border,
                   after=after)


def dense_nearby_attention(q, k, v, extent, causal=False, scale=None, *, dilation=1, stride=1,
                           border: str = "clip", after=None) -> torch.Tensor:
    """3DNA by masking full attention; inputs and options as ``nearby_attention``, unchecked.

    Runs SDPA in the inputs' own dtype, so in fp16/bf16 it is also the
    "PyTorch low-precision run" that tolerances are derived from.
    """
    B, T, H, W, heads, D = q.shape
    kv_grid = tuple(k.shape[1:4])
    mask = nearby_mask((T, H, W), kv_grid, extent, causal, device=q.device, dilation=dilation, stride=stride,
                       border=border, after=after)
    qh, kh, vh = (x.flatten(1, 3).transpose(1, 2) for x in (q, k, v))   # [B, heads, N, D]
    scale = D ** -0.5 if scale is None else scale
    if uses_forward_ad(q, k, v):
        # SDPA's CPU kernels have no forward-AD formula; the same maths in plain ops has.
        s = (qh @ kh.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))     # [B, heads, Nq, Nk]
        out = torch.softmax(s, dim=-1) @ vh
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(B, T, H, W, heads, D)


def _three(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x, x)


def _axis_keys(p, n, m, e, a, d, s, causal, shift):
    """docs/design.md section 7 for one axis, as written: the key positions query p sees.
    e, a: radii before/after the leader (e None: the whole axis)."""
    c = p * m // n
    S = [j for j in range(m) if j % d == c % d]
    if e is None:
        window = S
    else:
        L, g, K = len(S), S.index(c), e + a + 1
        leader = min((g // s) * s + (s - 1 if causal else s // 2), L - 1)
        if shift and causal:
            window = S[max(0, leader - K + 1):leader + 1]
        elif shift:
            start = min(max(leader - e, 0), L - K)
            window = S if L <= K else S[start:start + K]
        elif causal:
            window = S[max(0, leader - e):leader + 1]
        else:
            window = S[max(0, leader - e):leader + a + 1]
    return [j for j in window if not causal or j <= p]


def brute_force_keys(query, q_grid, kv_grid, extent, causal=False, *, dilation=1, stride=1,
                     border: str = "clip", after=None):
    """The keys (a, b, c) that query (t, h, w) sees, from the definition alone (no ``geometry``)."""
    extent, dil, st = _three(extent), _three(dilation), _three(stride)
    after = extent if after is None else _three(after)
    per_axis = causal if isinstance(causal, (tuple, list)) else (False,) * 3
    axes = [_axis_keys(query[i], q_grid[i], kv_grid[i], extent[i], after[i], dil[i], st[i], per_axis[i],
                       border == "shift") for i in range(3)]
    T, H, W = q_grid
    (T2, H2, W2), (t, h, w) = kv_grid, query
    return [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]
            if causal is not True or (a * H2 + b) * W2 + c <= (t * H + h) * W + w]


def brute_force_mask(q_grid, kv_grid, extent, causal=False, **options) -> torch.Tensor:
    """``nearby_mask`` from ``brute_force_keys``, one query at a time (tiny grids only)."""
    rows, cols = [], []
    for i, query in enumerate(itertools.product(*map(range, q_grid))):
        keys = _flat(brute_force_keys(query, q_grid, kv_grid, extent, causal, **options), kv_grid)
        rows += [i] * len(keys)
        cols += keys
    mask = torch.zeros(math.prod(q_grid), math.prod(kv_grid), dtype=torch.bool)
    mask[rows, cols] = True
    return mask


def _flat(keys, kv_grid):
    """Raster indices of (a, b, c) keys."""
    _, H2, W2 = kv_grid
    return [(a * H2 + b) * W2 + c for a, b, c in keys]


def brute_force_nearby_attention(q, k, v, extent, causal=False, scale=None, **options) -> torch.Tensor:
    """3DNA straight from its definition (docs/design.md sections 1 and 7), one query at a
    time, in float64; options as ``nearby_attention`` (and the internal ``after``).

    Tiny sizes only: it is the check on the dense path's mask, not a backend.
    """
    B, T, H, W, heads, D = q.shape
    kv_grid = tuple(k.shape[1:4])
    scale = D ** -0.5 if scale is None else scale
    q64, k64, v64 = q.double().flatten(1, 3), k.double().flatten(1, 3), v.double().flatten(1, 3)
    rows = []
    for i, query in enumerate(itertools.product(range(T), range(H), range(W))):
        keys = torch.tensor(_flat(brute_force_keys(query, (T, H, W), kv_grid, extent, causal, **options), kv_grid),
                            dtype=torch.long, device=q.device)
        ks, vs = k64[:, keys], v64[:, keys]                              # [B, n, heads, D]
        s = torch.einsum("bhd,bnhd->bhn", q64[:, i], ks) * scale
        p = torch.softmax(s, dim=-1)
        rows.append(torch.einsum("bhn,bnhd->bhd", p, vs))
    return torch.stack(rows, dim=1).reshape(q.shape).to(q.dtype)
