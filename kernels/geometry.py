"""Window geometry of 3DNA, shared by every backend and by the model's KV cache.

A query at (t, h, w) of a grid of shape (T, H, W) is centred in the key grid
(T', H', W') at floor(t*T'/T) (and likewise per axis); key (a, b, c) is visible
iff it lies within ``extent`` of that centre on every axis (clipped at the
borders), and, when causal, its raster index is <= the query's.

The v2 options (dilation, stride, per-axis causal, shifted borders; docs/design.md
section 7) live per axis in ``nuwa3dna.kernels.windows``; ``visible`` and
``count_visible`` take them as keywords and keep today's code for the defaults.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from nuwa3dna.kernels.windows import Causal, count_general, is_plain, visible_general

Extent = Union[int, None, Sequence[Optional[int]]]
Grid = Tuple[int, int, int]


def resolve_extent(extent: Extent, kv_grid: Grid) -> Grid:
    """Turn a user extent (already validated) into three int radii.

    ``None`` means the whole axis; any radius >= size - 1 covers the whole key
    axis whatever the centre, so radii are capped at ``size - 1``. Capping keeps
    every backend's tile search and mask arithmetic small.
    """
    if extent is None or isinstance(extent, int):
        extent = (extent,) * 3
    return tuple(
        (n - 1) if (e is None or e > n - 1) else int(e) for e, n in zip(extent, kv_grid)
    )


def centre(index: torch.Tensor, q_size: int, kv_size: int) -> torch.Tensor:
    """Rescaled centre floor(index * kv_size / q_size) of query coordinates."""
    return torch.div(index * kv_size, q_size, rounding_mode="floor")


def centre_int(index: int, q_size: int, kv_size: int) -> int:
    return index * kv_size // q_size


def key_range(lo: int, hi: int, q_size: int, kv_size: int, radius: int) -> Tuple[int, int]:
    """Half-open key range [a0, a1) that the queries lo..hi-1 of one axis can see."""
    a0 = max(0, centre_int(lo, q_size, kv_size) - radius)
    a1 = min(kv_size, centre_int(hi - 1, q_size, kv_size) + radius + 1)
    return a0, a1


def query_range(a_lo: int, a_hi: int, q_size: int, kv_size: int, radius: int) -> Tuple[int, int]:
    """Half-open range [q0, q1) of query indices whose window reaches keys a_lo..a_hi-1.

    Centres are monotone in the query index, so the queries form one run.
    Returns (0, 0) if none does.
    """
    # Smallest q with centre(q) >= a_lo - radius; largest q with centre(q) <= a_hi - 1 + radius.
    lo_c = a_lo - radius
    hi_c = a_hi - 1 + radius
    # centre(q) >= c  <=>  q*kv >= c*q_size  <=>  q >= ceil(c*q_size/kv)
    q0 = max(0, -((-lo_c * q_size) // kv_size))
    # centre(q) <= c  <=>  q*kv < (c+1)*q_size  <=>  q <= ceil((c+1)*q_size/kv) - 1
    q1 = min(q_size, -((-(hi_c + 1) * q_size) // kv_size))
    return (q0, q1) if q0 < q1 else (0, 0)


def grid_coords(grid: Grid, device=None) -> torch.Tensor:
    """(N, 3) int64 coordinates (t, h, w) of a grid in raster order."""
    t, h, w = torch.meshgrid(
        *(torch.arange(n, device=device) for n in grid), indexing="ij"
    )
    return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)


def visible(q_coords: torch.Tensor, k_coords: torch.Tensor, q_grid: Grid, kv_grid: Grid,
            extent: Grid, causal: Causal, *, dilation=1, stride=1, border: str = "clip",
            after=None) -> torch.Tensor:
    """Boolean mask (Nq, Nk) of visible pairs for the given coordinate lists.

    ``extent`` (and ``after``, the radius after the leader where it differs) must
    be resolved (three ints). Used by the dense reference on the whole grid and by
    the tiled paths on one tile's coordinates. Options at their defaults: today's
    formula, unchanged; otherwise ``windows.visible_general``.
    """
    if not is_plain(causal, dilation, stride, border, after):
        return visible_general(q_coords, k_coords, q_grid, kv_grid, extent, causal, dilation, stride,
                               border, after)
    causal = False if isinstance(causal, (tuple, list)) else bool(causal)   # (False,) * 3 is not raster
    ok = None
    for axis in range(3):
        c = centre(q_coords[:, axis], q_grid[axis], kv_grid[axis])
        near = (k_coords[None, :, axis] - c[:, None]).abs() <= extent[axis]
        ok = near if ok is None else ok & near
    if causal:
        H, W = kv_grid[1], kv_grid[2]
        rq = (q_coords[:, 0] * H + q_coords[:, 1]) * W + q_coords[:, 2]
        rk = (k_coords[:, 0] * H + k_coords[:, 1]) * W + k_coords[:, 2]
        ok = ok & (rk[None, :] <= rq[:, None])
    return ok


def count_visible(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: Causal, *, dilation=1, stride=1,
                  border: str = "clip", after=None) -> int:
    """Number of visible (query, key) pairs, without materialising the mask.

    Non-causal: the per-axis window lengths multiply. Causal (same grid): the
    window pairs with key frame < query frame, plus same-frame pairs with key
    row < query row, plus same-row pairs with key col <= query col. Any v2
    option: ``windows.count_general`` (exact, from per-axis tables).
    """
    if not is_plain(causal, dilation, stride, border, after):
        return count_general(q_grid, kv_grid, extent, causal, dilation, stride, border, after)
    causal = False if isinstance(causal, (tuple, list)) else bool(causal)   # (False,) * 3 is not raster
    def lengths(axis):
        n, m, e = q_grid[axis], kv_grid[axis], extent[axis]
        return [min(m - 1, centre_int(i, n, m) + e) - max(0, centre_int(i, n, m) - e) + 1
                for i in range(n)]

    lt, lh, lw = (lengths(a) for a in range(3))
    if not causal:
        return sum(lt) * sum(lh) * sum(lw)
    T, H, W = q_grid
    et, eh, ew = extent
    # Causal pairs: split by where the key first differs from the query in raster order.
    before_t = sum(min(t, et) for t in range(T))            # key frames strictly before
    before_h = sum(min(h, eh) for h in range(H))
    upto_w = sum(min(w, ew) + 1 for w in range(W))           # same row, key col <= query col
    return (before_t * sum(lh) * sum(lw) * 1 + T * before_h * sum(lw) + T * H * upto_w)
