"""Windows v2 of 3DNA, one axis at a time (docs/design.md section 7).

Options: dilation d, stride s, per-axis causal, borders clipped or shifted
(NATTEN's), and an asymmetric window (``before`` keys before the leader,
``after`` after it; the public extent e is before = after = e, NATTEN's even
kernel size K is before = K // 2, after = K // 2 - 1).

For a query at p on an axis of n queries, keys on an axis of m, centre
c = floor(p*m/n):

* S = the key positions j = c (mod d), in order; L = |S|; g = c // d (c's index in S).
* leader = min((g // s)*s + s // 2, L - 1); on a causal axis min((g // s)*s + s - 1, L - 1).
* clip: S[max(0, leader - before) : leader + after + 1]; causal: S[max(0, leader - before) : leader + 1].
* shift (K = before + after + 1): S[start : start + K], start = clamp(leader - before, 0, L - K),
  all of S when L <= K; causal: S[max(0, leader - K + 1) : leader + 1].
* a causal axis also hides j > p.

A window is always an arithmetic run of keys: range(start, stop, d). With
d = s = 1, clip, before = after = e and no per-axis causality this is
[c - e, c + e] clipped, today's window (``geometry.visible``'s fast path).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

Grid = Tuple[int, int, int]
Causal = Union[bool, Tuple[bool, bool, bool]]
BORDERS = ("clip", "shift")


def per_axis(x, what: str = "value") -> tuple:
    """An int (every axis) or a 3-sequence, as a 3-tuple (values unchecked)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 3:
            raise ValueError(f"{what} must have 3 entries (t, h, w), got {x!r}")
        return tuple(x)
    return (x, x, x)


def axis_causal(causal: Causal) -> Tuple[bool, bool, bool]:
    """Per-axis causality: ``causal=True`` is raster order (not per axis), so (False,) * 3 then."""
    return tuple(bool(c) for c in causal) if isinstance(causal, (tuple, list)) else (False, False, False)


def is_plain(causal: Causal = False, dilation=1, stride=1, border: str = "clip", after=None) -> bool:
    """True if every v2 option is at its default (today's windows; the fast backends' case)."""
    return (not isinstance(causal, (tuple, list)) or not any(causal)) and border == "clip" \
        and after is None and all(int(d) == 1 for d in per_axis(dilation)) \
        and all(int(s) == 1 for s in per_axis(stride))


def options_text(causal: Causal = False, dilation=1, stride=1, border: str = "clip", after=None) -> str:
    """The non-default options, e.g. "dilation=(1, 2, 2), border='shift'" (for messages)."""
    parts = []
    if isinstance(causal, (tuple, list)) and any(causal):
        parts.append(f"causal={tuple(causal)} (per axis)")
    for name, x in (("dilation", dilation), ("stride", stride)):
        if any(int(v) != 1 for v in per_axis(x)):
            parts.append(f"{name}={x!r}")
    if border != "clip":
        parts.append(f"border={border!r}")
    if after is not None:
        parts.append(f"after={after!r} (asymmetric window)")
    return ", ".join(parts)


def axis_window(p: int, n: int, m: int, before: int, after: Optional[int] = None, dilation: int = 1,
                stride: int = 1, causal: bool = False, shift: bool = False) -> Tuple[int, int, int]:
    """Keys query ``p`` sees on one axis, in closed form: ``range(start, stop, step)``.

    ``before``/``after`` are resolved radii (ints); ``after`` defaults to ``before``.
    ``causal`` is this axis' own causality (self-attention, n == m).
    """
    after = before if after is None else after
    d, s = dilation, stride
    c = p * m // n
    r, g = c % d, c // d
    L = (m - 1 - r) // d + 1
    lead = min((g // s) * s + (s - 1 if causal else s // 2), L - 1)
    K = before + after + 1
    if shift and causal:
        lo, hi = max(0, lead - K + 1), lead + 1
    elif shift:
        lo = min(max(lead - before, 0), max(L - K, 0))
        hi = min(lo + K, L)
    else:
        lo, hi = max(0, lead - before), min(L, lead + 1 if causal else lead + after + 1)
    if causal:
        hi = min(hi, (p - r) // d + 1)          # j <= p
    hi = max(hi, lo)
    return r + lo * d, r + hi * d, d


def axis_windows(n: int, m: int, before: int, after: Optional[int] = None, dilation: int = 1,
                 stride: int = 1, causal: bool = False, shift: bool = False,
                 device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``axis_window`` for every query 0..n-1 of an axis at once: (start, stop) int64 tensors (step = d)."""
    after = before if after is None else after
    d = dilation
    p, r, L, lead = _leaders(n, m, dilation, stride, causal, device)
    K = before + after + 1
    if shift and causal:
        lo, hi = (lead - K + 1).clamp(min=0), lead + 1
    elif shift:
        lo = torch.minimum((lead - before).clamp(min=0), (L - K).clamp(min=0))
        hi = torch.minimum(lo + K, L)
    else:
        lo = (lead - before).clamp(min=0)
        hi = torch.minimum(lead + (1 if causal else after + 1), L)
    if causal:
        hi = torch.minimum(hi, torch.div(p - r, d, rounding_mode="floor") + 1)
    hi = torch.maximum(hi, lo)
    return r + lo * d, r + hi * d


def axis_leaders(n: int, m: int, dilation: int = 1, stride: int = 1, causal: bool = False,
                 device=None) -> torch.Tensor:
    """Key position of each query's leader on one axis (l = r + leader*d; the centre c when s = 1):
    (n,) int64. The relative position bias indexes a window key j by (j - l) // d."""
    _, r, _, lead = _leaders(n, m, dilation, stride, causal, device)
    return r + lead * dilation


def _leaders(n: int, m: int, d: int, s: int, causal: bool, device):
    """Per query of an axis: (p, residue r = c mod d, L = |S|, the leader's index in S)."""
    p = torch.arange(n, device=device)
    c = torch.div(p * m, n, rounding_mode="floor")
    r, g = c % d, torch.div(c, d, rounding_mode="floor")
    L = torch.div(m - 1 - r, d, rounding_mode="floor") + 1
    lead = torch.minimum(torch.div(g, s, rounding_mode="floor") * s + (s - 1 if causal else s // 2), L - 1)
    return p, r, L, lead


def bias_radius(before: int, after: Optional[int] = None, shift: bool = False) -> int:
    """R of one axis of a relative position bias (2R + 1 entries): the farthest a window key can
    sit from the leader, in dilation steps: max(before, after) clipped, before + after shifted
    (a shifted window moves up to K - 1 = 2e past its leader at a border)."""
    after = before if after is None else after
    return before + after if shift else max(before, after)


def axis_offsets(n: int, m: int, before: int, after: Optional[int] = None, dilation: int = 1,
                 stride: int = 1, causal: bool = False, shift: bool = False, device=None,
                 radius: Optional[int] = None) -> torch.Tensor:
    """(n, m) int64: the bias index (j - l) // d + R of key j for query p (valid where ``axis_mask``
    is True; clamped into [0, 2R] elsewhere so a gather never leaves the table).

    ``radius``: R from the bias's own shape ((size - 1) // 2), which backends must use: they get
    the extent capped at the axis length (``geometry.resolve_extent``), the bias is shaped by the
    user's extent. Default ``bias_radius(before, after, shift)``."""
    R = bias_radius(before, after, shift) if radius is None else radius
    lead = axis_leaders(n, m, dilation, stride, causal, device)
    j = torch.arange(m, device=device)[None, :]
    off = torch.div(j - lead[:, None], dilation, rounding_mode="floor") + R
    return off.clamp(0, 2 * R)


def axis_mask(n: int, m: int, before: int, after: Optional[int] = None, dilation: int = 1, stride: int = 1,
              causal: bool = False, shift: bool = False, device=None) -> torch.Tensor:
    """(n, m) boolean table of one axis: True where key j is in query p's window."""
    start, stop = axis_windows(n, m, before, after, dilation, stride, causal, shift, device)
    j = torch.arange(m, device=device)[None, :]
    start, stop = start[:, None], stop[:, None]
    return (j >= start) & (j < stop) & ((j - start) % dilation == 0)


def axis_masks(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: Causal = False, dilation=1, stride=1,
               border: str = "clip", after=None, device=None):
    """The three per-axis tables (T x T', H x H', W x W') for resolved ``extent`` (and ``after``)."""
    after = per_axis(after) if after is not None else extent
    dil, st, caus = per_axis(dilation), per_axis(stride), axis_causal(causal)
    return [axis_mask(q_grid[a], kv_grid[a], extent[a], after[a], dil[a], st[a], caus[a],
                      border == "shift", device) for a in range(3)]


def visible_general(q_coords: torch.Tensor, k_coords: torch.Tensor, q_grid: Grid, kv_grid: Grid,
                    extent: Grid, causal: Causal = False, dilation=1, stride=1, border: str = "clip",
                    after=None) -> torch.Tensor:
    """(Nq, Nk) visibility for any options: per-axis tables gathered at the coordinates,
    and raster order when ``causal is True``."""
    tables = axis_masks(q_grid, kv_grid, extent, causal, dilation, stride, border, after, q_coords.device)
    ok = None
    for axis, table in enumerate(tables):
        near = table[q_coords[:, axis]][:, k_coords[:, axis]]
        ok = near if ok is None else ok & near
    if causal is True:
        H, W = kv_grid[1], kv_grid[2]
        rq = (q_coords[:, 0] * H + q_coords[:, 1]) * W + q_coords[:, 2]
        rk = (k_coords[:, 0] * H + k_coords[:, 1]) * W + k_coords[:, 2]
        ok = ok & (rk[None, :] <= rq[:, None])
    return ok


def count_general(q_grid: Grid, kv_grid: Grid, extent: Grid, causal: Causal = False, dilation=1, stride=1,
                  border: str = "clip", after=None) -> int:
    """Exact visible pairs for any options, from the per-axis tables (O(n*m) per axis).

    Visibility is a product over axes, so without raster causality the per-axis
    pair counts multiply. Raster causal (same grids): pairs split by the first
    axis where the key precedes the query, as in ``geometry.count_visible``.
    """
    tables = [x.to(torch.int64) for x in axis_masks(q_grid, kv_grid, extent, causal, dilation, stride,
                                                     border, after)]
    if causal is not True:
        out = 1
        for x in tables:
            out *= int(x.sum())
        return out
    (At, Ah, Aw) = tables
    before = lambda x: int(x.tril(-1).sum())                  # key index < query index
    diag = lambda x: int(x.diagonal().sum())                  # key index == query index
    rows = lambda x: int(x.sum())
    upto = int(Aw.tril().sum())                               # key col <= query col
    return (before(At) * rows(Ah) * rows(Aw) + diag(At) * before(Ah) * rows(Aw)
            + diag(At) * diag(Ah) * upto)



class Options(tuple):
    """The v2 options as the backends carry them: (dilation, stride, axis_causal, shift, after),
    each per axis a 3-tuple (``after`` None or resolved ints), hashable (cache keys).

    ``Options()`` is plain (every option at its default). ``encode``/``decode`` turn it into
    the flat int list a ``torch.library`` custom op takes (empty for plain)."""

    def __new__(cls, dilation=(1, 1, 1), stride=(1, 1, 1), axis_causal=(False, False, False),
                shift: bool = False, after=None):
        return super().__new__(cls, (tuple(int(x) for x in per_axis(dilation)),
                                     tuple(int(x) for x in per_axis(stride)),
                                     tuple(bool(x) for x in axis_causal), bool(shift),
                                     None if after is None else tuple(int(x) for x in after)))

    dilation = property(lambda self: self[0])
    stride = property(lambda self: self[1])
    axis_causal = property(lambda self: self[2])
    shift = property(lambda self: self[3])
    after = property(lambda self: self[4])

    @classmethod
    def of(cls, causal: Causal = False, dilation=1, stride=1, border: str = "clip", after=None) -> "Options":
        """From the public arguments (``after`` resolved); ``causal=True`` (raster) is not an option here."""
        return cls(dilation, stride, axis_causal(causal), border == "shift", after)

    @property
    def plain(self) -> bool:
        return self == Options()

    def causal(self, raster: bool) -> Causal:
        """The ``causal`` argument of ``geometry.visible``: the per-axis tuple, or raster order."""
        return self.axis_causal if any(self.axis_causal) else bool(raster)

    def kwargs(self) -> dict:
        """``dilation``, ``stride``, ``border``, ``after`` keywords of ``geometry.visible``."""
        return dict(dilation=self.dilation, stride=self.stride, border="shift" if self.shift else "clip",
                    after=self.after)

    def axis(self, a: int, extent) -> dict:
        """Keywords of ``axis_windows``/``axis_mask`` for axis ``a`` (``extent`` resolved)."""
        return dict(before=extent[a], after=extent[a] if self.after is None else self.after[a],
                    dilation=self.dilation[a], stride=self.stride[a], causal=self.axis_causal[a],
                    shift=self.shift)

    def encode(self) -> list:
        if self.plain:
            return []
        after = self.after if self.after is not None else (-1, -1, -1)
        return [*self.dilation, *self.stride, *(int(c) for c in self.axis_causal), int(self.shift), *after]

    @classmethod
    def decode(cls, xs) -> "Options":
        if not xs:
            return cls()
        xs = [int(x) for x in xs]
        after = None if xs[10] < 0 else tuple(xs[10:13])
        return cls(tuple(xs[0:3]), tuple(xs[3:6]), tuple(bool(x) for x in xs[6:9]), bool(xs[9]), after)
