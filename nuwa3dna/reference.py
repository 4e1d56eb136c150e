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
from nuwa3dna.kernels.windows import axis_causal, axis_offsets, per_axis


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


def bias_index(q_grid: Grid, kv_grid: Grid, extent, bias_shape, causal=False, device=None, *, dilation=1,
               stride=1, border: str = "clip", after=None) -> torch.Tensor:
    """(Nq, Nk) int64: the flat index into a relative position bias of shape ``bias_shape``
    ((2R_t+1, 2R_h+1, 2R_w+1), the user's extent) of each (query, key) pair
    (``windows.axis_offsets`` per axis); meaningful where ``nearby_mask`` is True."""
    extent = resolve_extent(extent, kv_grid)
    after = extent if after is None else resolve_extent(after, kv_grid)
    dil, st, caus = per_axis(dilation), per_axis(stride), axis_causal(causal)
    qc, kc = grid_coords(q_grid, device), grid_coords(kv_grid, device)
    idx = None
    for a, size in enumerate(bias_shape):
        off = axis_offsets(q_grid[a], kv_grid[a], extent[a], after[a], dil[a], st[a], caus[a],
                           border == "shift", device, radius=(size - 1) // 2)[qc[:, a]][:, kc[:, a]]  # [Nq, Nk]
        idx = off if idx is None else idx * size + off
    return idx


def dense_nearby_attention(q, k, v, extent, causal=False, scale=None, *, dilation=1, stride=1,
                           border: str = "clip", after=None, bias=None, additional_keys=None,
                           additional_values=None, return_lse: bool = False):
    """3DNA by masking full attention; inputs and options as ``nearby_attention``, unchecked.

    Runs SDPA in the inputs' own dtype, so in fp16/bf16 it is also the
    "PyTorch low-precision run" that tolerances are derived from. Grouped kv heads
    are repeated, global tokens appended to the keys (one softmax), the bias
    gathered into a float mask; ``return_lse`` adds the log-sum-exp (B, T, H, W, Hq)
    in float32 (float64 for float64 inputs), computed from the same scores.
    """
    B, T, H, W, heads, D = q.shape
    kv_grid = tuple(k.shape[1:4])
    options = dict(dilation=dilation, stride=stride, border=border, after=after)
    mask = nearby_mask((T, H, W), kv_grid, extent, causal, device=q.device, **options)
    qh, kh, vh = (x.flatten(1, 3).transpose(1, 2) for x in (q, k, v))   # [B, heads, N, D]
    scale = D ** -0.5 if scale is None else scale
    plain = bias is None and additional_keys is None and not return_lse and k.shape[4] == heads
    if plain and not uses_forward_ad(q, k, v):
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(B, T, H, W, heads, D)
    group = heads // k.shape[4]
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    fmask = torch.zeros(mask.shape, dtype=q.dtype if bias is None else bias.dtype, device=q.device)
    fmask = fmask.masked_fill(~mask, float("-inf"))                      # [Nq, Nk]
    if bias is not None:
        idx = bias_index((T, H, W), kv_grid, extent, tuple(bias.shape[1:]), causal, q.device, **options)
        fmask = fmask + bias.flatten(1)[:, idx]                           # [heads, Nq, Nk]
    if additional_keys is not None:
        ak, av = (x.transpose(1, 2).repeat_interleave(group, dim=1) for x in (additional_keys, additional_values))
        kh, vh = torch.cat([kh, ak], dim=2), torch.cat([vh, av], dim=2)
        fmask = torch.cat([fmask, fmask.new_zeros(fmask.shape[:-1] + (ak.shape[2],))], dim=-1)
    if uses_forward_ad(q, k, v):
        # SDPA's CPU kernels have no forward-AD formula; the same maths in plain ops has.
        s = qh @ kh.transpose(-1, -2) * scale + fmask                      # [B, heads, Nq, Nk]
        out = torch.softmax(s, dim=-1) @ vh
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=fmask.to(q.dtype), scale=scale)
    out = out.transpose(1, 2).reshape(B, T, H, W, heads, D)
    if not return_lse:
        return out
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (qh.to(acc) @ kh.to(acc).transpose(-1, -2)) * scale + fmask.to(acc)   # [B, heads, Nq, Nk]
    lse = torch.logsumexp(s, dim=-1).transpose(1, 2).reshape(B, T, H, W, heads)
    return out, lse


def _three(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x, x)


def _axis_keys(p, n, m, e, a, d, s, causal, shift):
    """docs/design.md section 7 for one axis, as written: (the key positions query p sees,
    the key position of its leader). e, a: radii before/after the leader (e None: the
    whole axis, no leader)."""
    c = p * m // n
    S = [j for j in range(m) if j % d == c % d]
    lead = None
    if e is None:
        window = S
    else:
        L, g, K = len(S), S.index(c), e + a + 1
        leader = min((g // s) * s + (s - 1 if causal else s // 2), L - 1)
        lead = S[leader]
        if shift and causal:
            window = S[max(0, leader - K + 1):leader + 1]
        elif shift:
            start = min(max(leader - e, 0), L - K)
            window = S if L <= K else S[start:start + K]
        elif causal:
            window = S[max(0, leader - e):leader + 1]
        else:
            window = S[max(0, leader - e):leader + a + 1]
    return [j for j in window if not causal or j <= p], lead


def brute_force_window(query, q_grid, kv_grid, extent, causal=False, *, dilation=1, stride=1,
                       border: str = "clip", after=None):
    """[((a, b, c), (o_t, o_h, o_w))]: the keys query (t, h, w) sees, from the definition alone
    (no ``geometry``), each with its bias offset (key - leader) // dilation + R per axis
    (R = max(before, after) clipped, before + after shifted; None on a whole axis)."""
    extent, dil, st = _three(extent), _three(dilation), _three(stride)
    after = extent if after is None else _three(after)
    per_axis_causal = causal if isinstance(causal, (tuple, list)) else (False,) * 3
    axes = []
    for i in range(3):
        keys, lead = _axis_keys(query[i], q_grid[i], kv_grid[i], extent[i], after[i], dil[i], st[i],
                                per_axis_causal[i], border == "shift")
        if extent[i] is None:
            axes.append([(j, None) for j in keys])
            continue
        R = extent[i] + after[i] if border == "shift" else max(extent[i], after[i])
        axes.append([(j, (j - lead) // dil[i] + R) for j in keys])
    T, H, W = q_grid
    (T2, H2, W2), (t, h, w) = kv_grid, query
    return [((a, b, c), (oa, ob, oc)) for a, oa in axes[0] for b, ob in axes[1] for c, oc in axes[2]
            if causal is not True or (a * H2 + b) * W2 + c <= (t * H + h) * W + w]


def brute_force_keys(query, q_grid, kv_grid, extent, causal=False, **options):
    """The keys (a, b, c) that query (t, h, w) sees, from the definition alone (no ``geometry``)."""
    return [key for key, _ in brute_force_window(query, q_grid, kv_grid, extent, causal, **options)]


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


def brute_force_nearby_attention(q, k, v, extent, causal=False, scale=None, *, bias=None, additional_keys=None,
                                 additional_values=None, return_lse: bool = False, **options):
    """3DNA straight from its definition (docs/design.md sections 1 and 7), one query at a
    time, in float64; options as ``nearby_attention`` (and the internal ``after``): grouped
    kv heads, the bias added per window key at its offsets, global tokens joined to the
    window keys, ``return_lse`` the (B, T, H, W, Hq) log-sum-exp (float64).

    Tiny sizes only: it is the check on the dense path's mask, not a backend.
    """
    B, T, H, W, heads, D = q.shape
    kv_grid = tuple(k.shape[1:4])
    scale = D ** -0.5 if scale is None else scale
    group = heads // k.shape[4]
    q64 = q.double().flatten(1, 3)                                                   # [B, Nq, heads, D]
    k64, v64 = (x.double().flatten(1, 3).repeat_interleave(group, dim=2) for x in (k, v))
    if additional_keys is not None:
        ak, av = (x.double().repeat_interleave(group, dim=2) for x in (additional_keys, additional_values))
    rows, lses = [], []
    for i, query in enumerate(itertools.product(range(T), range(H), range(W))):
        window = brute_force_window(query, (T, H, W), kv_grid, extent, causal, **options)
        keys = torch.tensor(_flat([key for key, _ in window], kv_grid), dtype=torch.long, device=q.device)
        ks, vs = k64[:, keys], v64[:, keys]                              # [B, n, heads, D]
        s = torch.einsum("bhd,bnhd->bhn", q64[:, i], ks) * scale
        if bias is not None:
            offsets = torch.tensor([off for _, off in window], dtype=torch.long, device=q.device)
            s = s + bias.double()[:, offsets[:, 0], offsets[:, 1], offsets[:, 2]]    # [heads, n]
        if additional_keys is not None:
            s = torch.cat([s, torch.einsum("bhd,bnhd->bhn", q64[:, i], ak) * scale], dim=-1)
            vs = torch.cat([vs, av], dim=1)
        p = torch.softmax(s, dim=-1)
        rows.append(torch.einsum("bhn,bnhd->bhd", p, vs))
        lses.append(torch.logsumexp(s, dim=-1))
    out = torch.stack(rows, dim=1).reshape(q.shape).to(q.dtype)
    if return_lse:
        return out, torch.stack(lses, dim=1).reshape(q.shape[:5])
    return out
