"""The window tables of the kernels' table path (the v2 options, docs/design.md section 7).

Every v2 window on an axis (dilation d, stride s, per-axis causal, shifted
borders, asymmetric radii) is ``range(start, stop, d)`` inside the residue class
of the query's centre (``windows.axis_window``). Re-laying the axis by residue
makes it a contiguous run, and the kernels then walk it as they walk a plain
window, with table lookups where the plain path computes centres:

* keys in the order (j mod d, j): ``pk[j']`` is re-laid key j''s position on the grid;
* queries in the order (c mod d, p), c = floor(p * m / n) the centre: ``pq[i']``;
* ``lo[i'], hi[i']``: re-laid query i''s window, [lo, hi) in re-laid key
  coordinates (per-axis causality folded into hi);
* ``q0[j'], q1[j']``: the re-laid queries whose window holds re-laid key j', [q0, q1);
* ``ld[i']``: the re-laid index of re-laid query i''s leader (``windows.axis_leaders``). A
  window key shares the leader's residue class, where re-laid keys are d grid positions
  apart, so its relative position bias index (j - l) // d + R is j' - ld[i'] + R: linear
  in the walked coordinates, as j - c + R is on the plain path.

lo and hi are non-decreasing in i': within a residue class the window's ends are
monotone in the centre, and class r's keys all precede class r + 1's. So a tile of
consecutive re-laid queries reaches the key box [lo[first], hi[last]) per axis,
and the queries that see a key form one run, q0 = #{i: hi[i] <= j}, q1 = #{i: lo[i] <= j}
(``searchsorted``); a key tile's run is [q0[first], q1[last]).

Raster causality (``causal=True``, self-attention) is checked on re-laid raster
indices: there c = p, so queries and keys share one re-layout per axis, and a
window's keys share the query's residue, where the re-layout keeps the grid's
order. Within the windows, re-laid raster order is the grid's, and the plain
path's causal skips (walk tails, dK/dV heads) hold unchanged.

The kernels read the grid through ``pq`` / ``pk`` (no copy of q, k, v): outputs,
gradients and the log-sum-exp land at their grid positions. ``packed`` lays the
tables of the three axes into one int32 tensor (``jit.axis_tables`` reads it; the
leader tables follow the three axes' blocks, ``jit.axis_leaders``);
``window_tables`` gives them to the tile planner (``plan.computed_pairs``) as tuples.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence, Tuple

import torch

from nuwa3dna.kernels.windows import Options, axis_leaders, axis_windows

Grid = Tuple[int, int, int]
FIELDS = ("lo", "hi", "pq", "pk", "q0", "q1")     # the packed order of one axis


class AxisTable(NamedTuple):
    """One axis's tables (tuples of ints; see the module docstring)."""
    lo: Tuple[int, ...]     # n: window start, re-laid key coordinates
    hi: Tuple[int, ...]     # n: window end (exclusive)
    pq: Tuple[int, ...]     # n: re-laid query -> grid position
    pk: Tuple[int, ...]     # m: re-laid key -> grid position
    q0: Tuple[int, ...]     # m: first re-laid query whose window holds the key
    q1: Tuple[int, ...]     # m: last + 1
    ld: Tuple[int, ...]     # n: re-laid index of the query's leader (the bias's origin)


@functools.lru_cache(maxsize=512)
def axis_table(n: int, m: int, before: int, after: int, dilation: int = 1, stride: int = 1,
               causal: bool = False, shift: bool = False) -> AxisTable:
    """The tables of one axis of n queries and m keys (radii resolved)."""
    d = dilation
    start, stop = axis_windows(n, m, before, after, d, stride, causal, shift)
    p, j = torch.arange(n), torch.arange(m)
    r = torch.div(p * m, n, rounding_mode="floor") % d                       # the centre's residue
    sizes = torch.bincount(j % d, minlength=d)                              # keys per residue class
    first = torch.cumsum(sizes, 0) - sizes                                  # re-laid index of class r's first key
    lo = first[r] + torch.div(start - r, d, rounding_mode="floor")
    hi = first[r] + torch.div(stop - r, d, rounding_mode="floor")
    pq = torch.argsort(r * n + p)                                           # (residue, position) order
    pk = torch.argsort((j % d) * m + j)
    lo, hi = lo[pq].contiguous(), hi[pq].contiguous()
    q0 = torch.searchsorted(hi, j, right=True)                              # #{i: hi[i] <= j}
    q1 = torch.searchsorted(lo, j, right=True)                              # #{i: lo[i] <= j}
    lead = axis_leaders(n, m, d, stride, causal)                            # grid position, residue r
    ld = (first[r] + torch.div(lead - r, d, rounding_mode="floor"))[pq]
    return AxisTable(*(tuple(x.tolist()) for x in (lo, hi, pq, pk, q0, q1, ld)))


@functools.lru_cache(maxsize=256)
def window_tables(q_grid: Grid, kv_grid: Grid, extent: Grid, options: Options) -> Tuple[AxisTable, ...]:
    """The three axes' tables for a resolved ``extent`` and ``options`` (not plain)."""
    return tuple(axis_table(q_grid[a], kv_grid[a], **options.axis(a, extent)) for a in range(3))


def packed_size(q_grid: Sequence[int], kv_grid: Sequence[int]) -> int:
    return sum(3 * (n + m) + n for n, m in zip(q_grid, kv_grid))


@functools.lru_cache(maxsize=64)
def _packed(q_grid: Grid, kv_grid: Grid, extent: Grid, options: Options, device: torch.device) -> torch.Tensor:
    tables = window_tables(q_grid, kv_grid, extent, options)
    flat = [x for t in tables for name in FIELDS for x in getattr(t, name)] + [x for t in tables for x in t.ld]
    return torch.tensor(flat, dtype=torch.int32).to(device)


def packed(q_grid, kv_grid, extent, options: Options, device) -> torch.Tensor:
    """int32 (3 * (T + T2 + H + H2 + W + W2) + T + H + W,): per axis t, h, w the fields lo, hi,
    pq (n each), pk, q0, q1 (m each), back to back (``jit.axis_tables``), then the leader
    tables ld of t, h, w (``jit.axis_leaders``). Cached per device."""
    return _packed(tuple(q_grid), tuple(kv_grid), tuple(extent), options, torch.device(device))
